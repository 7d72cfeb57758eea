"""The kernel table: one public function per operation, two implementations, and `select`.

`select(device, backend)` returns a `Kernels` table whose functions all share the signatures of
`torch_backend` (the tuned torch implementation, which is how the engine runs on a CPU) and of
`triton_ops` (Triton, on CUDA). The model only ever calls through that table, so it never knows
which implementation runs. `naive` holds the plain float64 oracle both are tested against.

`paged_attention`, `rope_store_kv` and `rope_store_attention` also take `scratch`: a dict the caller makes once per
forward pass and hands to every layer. An implementation may keep there what it derives from
the step's metadata alone (positions, slots, lengths, block tables), never from q, k or v, so
the layers after the first reuse it: the torch backend keeps its gather index, mask and
RoPE rows there. A caller that passes none loses nothing but that reuse.

Where this package comes from: the repository's top-level `kernels/` folder, installed under the
import name `workbench_kernels` (pyproject.toml, `[tool.setuptools] package-dir`). The folder has no
`__init__.py` on purpose: it is then a namespace portion, and a regular package later on `sys.path`
wins over it (PEP 420), so `import kernels` from the repository root still finds the `kernels`
distribution that transformers imports (tests/test_kernels_package.py).
"""

from __future__ import annotations

import os
from typing import Callable, Literal, NamedTuple

import torch

from . import torch_backend

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


def _table(name: str, module: object) -> Kernels:
    """A module's functions, one per operation, as a table (the modules never import this one)."""
    return Kernels(name, *(getattr(module, op) for op in Kernels._fields[1:]))


TORCH = _table("torch", torch_backend)


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
    """Pick the implementation: Triton on CUDA, the torch backend elsewhere, unless told."""
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
    return _table("triton", triton_ops)
