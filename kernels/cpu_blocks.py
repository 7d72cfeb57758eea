"""Weights that are exactly GGUF blocks, kept as blocks for decode-sized GEMMs on a CPU.

The embedded model is a Q4_1 GGUF (its token embedding Q8_0): every fp32 weight transformers
hands us is `d * q + m` (Q4_1) or `d * q` (Q8_0) for 32-weight blocks with fp16 `d`, `m`.
A decode step on a CPU is bound by reading the weights; read as blocks they are 0.75 or
1.125 bytes a weight instead of 4. `from_dense` recovers the blocks from the fp32 matrix and
keeps them only if rebuilding gives every weight back bit for bit, so the GEMM multiplies the
very numbers an fp32 GEMM would (`cpu_blocks.c`; only the order of the sums differs).

The C file is compiled on first use with the machine's C compiler (`-march=native`, about
a second) into the workbench cache; where there is none, or no AVX2, `available()` is False
and callers keep dense weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_blocks.c")
BLOCK = 32


@dataclass(slots=True)
class BlockWeight:
    """W [out_features, in_features] as blocks, plus the dense copy for many-row GEMMs."""

    format: str  # "q4_1" or "q8_0"
    qs: torch.Tensor  # q4_1: uint8 [N, K / 2] (two 4-bit values a byte); q8_0: int8 [N, K]
    scales: torch.Tensor  # q4_1: float32 [N, K / 32, 2] (d, m); q8_0: float32 [N, K / 32]
    dense: torch.Tensor  # the same weight for more rows than `max_rows`: plain, or packed for oneDNN
    max_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.scales.shape[1] * BLOCK

    def to_dense(self) -> torch.Tensor:
        """The fp32 weight, rebuilt exactly as the GEMM rebuilds it."""
        if self.format == "q4_1":
            q = _unpack_nibbles(self.qs).float()
            d, m = self.scales[..., :1], self.scales[..., 1:]
            return torch.addcmul(m, d, q.unflatten(1, (-1, BLOCK))).flatten(1)
        return (self.qs.float().unflatten(1, (-1, BLOCK)) * self.scales[..., None]).flatten(1)


def available() -> bool:
    return _library() is not None


def from_dense(weight: torch.Tensor) -> BlockWeight | None:
    """The blocks `weight` (fp32, [N, K]) is made of, or None when it is not exactly Q4_1 or Q8_0."""
    lib = _library()
    if lib is None or weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK:
        return None
    w = weight.detach().contiguous().unflatten(1, (-1, BLOCK))  # [N, groups, 32]
    for fmt, recover in (("q4_1", _recover_q4_1), ("q8_0", _recover_q8_0)):
        found = recover(w)
        if found is not None:
            qs, scales = found
            return BlockWeight(fmt, qs, scales, weight, lib.max_rows())
    return None


def linear(x: torch.Tensor, weight: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for x [M, K] fp32 with M <= weight.max_rows."""
    lib = _library()
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = weight.qs.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    gemm = lib.q4_1_gemm if weight.format == "q4_1" else lib.q8_0_gemm
    gemm(x.data_ptr(), x.stride(0), M, K, weight.qs.data_ptr(), weight.scales.data_ptr(), N, y.data_ptr(), N)
    return y if bias is None else y.add_(bias)


# ------------------------------------------------------------------ recovering the blocks
def _fp16_neighbours(approx: torch.Tensor) -> list[torch.Tensor]:
    """fp16 values next to `approx`'s rounding (a stored scale is off by an ulp or two at most), as fp32."""
    bits = approx.half().view(torch.int16)
    return [(bits + k).view(torch.float16).float() for k in (-1, 1, -2, 2)]


def _fit(w: torch.Tensor, approx: torch.Tensor, rebuild, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per block of w [N, G, 32], the fp16 scale d near `approx` and integers q in [lo, hi] with
    rebuild(d, q) == w exactly; None if some block has none. Most blocks fit at the first try, so
    the neighbours are tried on the rest only."""
    d = approx.half().float()
    q = rebuild.quantize(w, d).clamp_(lo, hi)
    bad = ~(rebuild(d, q) == w).all(-1)
    if bad.any():
        where = bad.nonzero(as_tuple=True)
        sub_w, sub_approx = w[where], approx[where]
        sub_q, sub_d = q[where], d[where]
        left = torch.ones(sub_w.shape[0], dtype=torch.bool)
        for cand in _fp16_neighbours(sub_approx):
            cand_q = rebuild.quantize(sub_w, cand, where).clamp_(lo, hi)
            fits = (rebuild(cand, cand_q, where) == sub_w).all(-1) & left
            sub_q[fits], sub_d[fits] = cand_q[fits], cand[fits]
            left &= ~fits
        if left.any():
            return None
        q[where], d[where] = sub_q, sub_d
    return d, q


class _Q4_1:
    """w = d * q + m, q in 0..15; m is each block's minimum (its q is 0)."""

    def __init__(self, m: torch.Tensor) -> None:
        self.m = m

    def _m(self, where) -> torch.Tensor:
        return self.m if where is None else self.m[where]

    def quantize(self, w, d, where=None):
        return ((w - self._m(where)) / d.clamp_min(1e-30)).round_()

    def __call__(self, d, q, where=None):
        return torch.addcmul(self._m(where), d, q)


class _Q8_0:
    """w = d * q, q in -127..127."""

    @staticmethod
    def quantize(w, d, where=None):
        return (w / d.clamp_min(1e-30)).round_()

    def __call__(self, d, q, where=None):
        return d * q


def _recover_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    m = w.amin(-1, keepdim=True)
    if not torch.equal(m.half().float(), m):
        return None
    found = _fit(w, (w.amax(-1, keepdim=True) - m) / 15, _Q4_1(m), 0, 15)
    if found is None:
        return None
    d, q = found
    return _pack_nibbles(q.to(torch.uint8).flatten(1)), torch.cat((d, m), -1).contiguous()


def _recover_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    found = _fit(w, w.abs().amax(-1, keepdim=True) / 127, _Q8_0(), -128, 127)
    if found is None:
        return None
    d, q = found
    return q.to(torch.int8).flatten(1).contiguous(), d.squeeze(-1).contiguous()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> [N, K / 2]: in each block, byte j = q[j] | q[j + 16] << 4."""
    blocks = q.unflatten(1, (-1, BLOCK))
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).flatten(1).contiguous()


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    halves = qs.unflatten(1, (-1, 16))
    return torch.cat((halves & 15, halves >> 4), -1).flatten(1)


# ------------------------------------------------------------------ building the library
@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """Compile (once per machine and source) and load cpu_blocks.c; None where it can't run."""
    if os.environ.get("WORKBENCH_CPU_BLOCKS") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if (platform.machine().lower() not in ("x86_64", "amd64") or compiler is None or not _has_avx2()
            or not SOURCE.is_file()):
        return None
    try:
        path = _build(compiler)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))  # after torch: its OpenMP runtime is the one used
    except OSError as e:  # a read-only cache, a library that will not load
        log.info("cpu_blocks unavailable (%s); dense fp32 weights are used", e)
        return None
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for fn in (lib.q4_1_gemm, lib.q8_0_gemm):
        fn.argtypes = [ptr, i64, i32, i32, ptr, ptr, i32, ptr, i64]
        fn.restype = None
    lib.max_rows.restype = i32
    return lib


def _cpu_flags() -> str:
    """The first `flags` line of /proc/cpuinfo ('' where there is none)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _has_avx2() -> bool:
    return {"avx2", "fma"} <= set(_cpu_flags().split())


def _build(compiler: str) -> Path | None:
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode()).hexdigest()[:16]  # -march=native: per CPU kind
    root = Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "cb-workbench") / "kernels"
    path = root / f"cpu_blocks-{key}.so"
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / path.name
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.info("cpu_blocks.c did not build (%s); dense fp32 weights are used", done.stderr.strip()[-300:])
            return None
        os.replace(out, path)  # atomic: a process building beside this one finds a whole file
    return path
