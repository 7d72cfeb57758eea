"""Programmatic dependent launch (PDL): a kernel's blocks start while the kernel before it drains.

A decode step is a chain of a few hundred short kernels, each waiting for the one before, so
every boundary costs a launch: the next grid is scheduled only once the previous has fully
retired. On Hopper, a kernel launched with `launch_pdl=True` may be scheduled as soon as every
block of the previous kernel has called `release_next` (or exited); it must then call
`wait_for_previous` before it reads anything an earlier kernel wrote. Every Triton kernel here
does both: wait first, release just before its final stores. A kernel launched the usual way
(cuBLAS, torch) still waits for everything before it, so mixing the two is safe. CUDA graphs
keep these edges when they capture the launches.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> dict:
    """Launch arguments for a kernel on `device`: PDL on Hopper or newer (WORKBENCH_PDL=0 turns
    it off, to measure what it brings), never under the interpreter."""
    on = (device.type == "cuda" and os.environ.get("WORKBENCH_PDL", "1") != "0"
          and _device_supports(device.index if device.index is not None else torch.cuda.current_device()))
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Block until the kernels before this one have finished and their writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next(USE_PDL: tl.constexpr):
    """Let the next kernel's blocks be scheduled: this block has no more long work to do."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
