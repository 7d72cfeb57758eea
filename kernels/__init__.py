"""Kernels for the decoder: one public function per operation, two implementations.

`select(device, backend)` returns a `Kernels` table whose functions all share the
signatures of `kernels.reference`. The model only ever calls through that table,
so it never knows which implementation runs.

`paged_attention`, `rope_store_kv` and `rope_store_attention` also take `scratch`: a dict the caller makes once per
forward pass and hands to every layer. An implementation may keep there what it derives from
the step's metadata alone (positions, slots, lengths, block tables), never from q, k or v, so
the layers after the first reuse it: the torch references keep their gather index, mask and
RoPE rows there. A caller that passes none loses nothing but that reuse.
"""

from __future__ import annotations

import os
from typing import Callable, Literal, NamedTuple

import torch

from . import reference

Backend = Literal["auto", "torch", "triton"]


class Kernels(NamedTuple):
    name: str
    linear: Callable
    gate_up_silu: Callable
    rms_norm: Callable
    rope: Callable
    rope_store_kv: Callable
    silu_and_mul: Callable
    store_kv: Callable
    paged_attention: Callable
    rope_store_attention: Callable


TORCH = Kernels("torch", reference.linear, reference.gate_up_silu, reference.rms_norm, reference.rope,
                reference.rope_store_kv, reference.silu_and_mul, reference.store_kv, reference.paged_attention,
                reference.rope_store_attention)


def triton_available(device: torch.device | str) -> bool:
    """Triton runs on CUDA, or anywhere under TRITON_INTERPRET=1 (slow, for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def select(device: torch.device | str, backend: Backend = "auto") -> Kernels:
    """Pick the implementation: Triton on CUDA, torch references elsewhere, unless told."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    device = torch.device(device)
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TORCH
    if not triton_available(device):
        if backend == "triton":
            raise ValueError("kernel backend 'triton' needs a CUDA device or TRITON_INTERPRET=1")
        return TORCH
    try:
        from . import triton_ops
    except ImportError:
        if backend == "triton":
            raise
        return TORCH
    return triton_ops.KERNELS
