"""A stream-K variant of the skinny GEMM (kernels/triton_gemm.py), a candidate not yet measured.

Workload (c)'s projections lose read speed to ramps, tails and uneven waves (bench/NOTES.md,
entry 28). Here the grid's work is dealt out in equal (tile, K step) units, so every program
reads the same bytes whatever N is; tiles cut between programs are summed in a fixed order
(deterministic, independent of the batch). bench/probes/splitk_probe.py times it against the current
kernel; it moves into kernels/triton_gemm.py only if it wins there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from workbench_kernels.launch import pdl, release_next, wait_for_previous  # noqa: E402
from workbench_kernels.triton_gemm import config_for  # noqa: E402

# --------------------------------------------------------------------------- stream-K
# A (tile, K step) pair is a unit; program p walks units [start(p), start(p + 1)) with
# start(p) = p * TOTAL // PROGRAMS (shares differ by one unit at most) in one pipelined loop,
# crossing tile boundaries. A tile walked by several programs is split: each parks its fp32
# piece in a workspace slot (every program has two: the piece of its first tile, 0, and of its
# last, 1), and the last to arrive at the tile's counter adds the pieces in program order and
# stores. That order is fixed by N, K and PROGRAMS alone: the sum depends neither on the batch
# nor on timing. PROGRAMS = tiles x S, S dividing the K steps, is plain split-K. Nothing waits
# inside the K walk: a barrier there (`debug_barrier`) stops Triton 3.6 from pipelining the
# loop, so pieces are only parked in it and all arrivals come after it.


@triton.jit
def _store_rows(acc, acc_up, out_ptr, tile, M, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr):
    """The epilogue: out[:, tile's columns] = acc, or silu(gate) * up, rounded to out's dtype."""
    rows = tl.arange(0, BLOCK_M)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = out_ptr.dtype.element_ty
    if GATE_UP:
        # round gate and up to the output dtype first, as the unfused GEMM + silu_and_mul do
        gate = acc.to(dtype).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype), mask=rows[:, None] < M)


@triton.jit
def _first_unit(program, TOTAL: tl.constexpr, PROGRAMS: tl.constexpr):
    """Where `program`'s share of the units begins (`program` = PROGRAMS: where all end)."""
    return program * TOTAL // PROGRAMS


@triton.jit
def _owner(unit, TOTAL: tl.constexpr, PROGRAMS: tl.constexpr):
    """The program whose units hold `unit`: the last p with p * TOTAL // PROGRAMS <= unit."""
    return ((unit + 1) * PROGRAMS - 1) // TOTAL


@triton.jit
def _slot(program, tile, STEPS: tl.constexpr, TOTAL: tl.constexpr, PROGRAMS: tl.constexpr,
          SLOT_SIZE: tl.constexpr):
    """Offset of `program`'s piece of `tile`: slot 0 if the tile began before the program did."""
    began_before = tile * STEPS < _first_unit(program, TOTAL, PROGRAMS)
    return (2 * program + 1 - began_before.to(tl.int32)) * SLOT_SIZE


@triton.jit
def _end_tile(acc, acc_up, tile, start, end, out_ptr, ws_ptr, M, stride_om,
              STEPS: tl.constexpr, TOTAL: tl.constexpr, PROGRAMS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr):
    """Store a tile this program walked whole, or park its piece of a split one."""
    first = tile * STEPS  # the tile's units are [first, first + STEPS)
    if (first >= start) & (first + STEPS <= end):
        _store_rows(acc, acc_up, out_ptr, tile, M, stride_om, BLOCK_M, BLOCK_N, GATE_UP)
    else:
        plane: tl.constexpr = BLOCK_M * BLOCK_N
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        piece = ws_ptr + _slot(tl.program_id(0), tile, STEPS, TOTAL, PROGRAMS, plane * (2 if GATE_UP else 1))
        tl.store(piece + offs, acc)
        if GATE_UP:
            tl.store(piece + plane + offs, acc_up)


@triton.jit
def _arrive(tile, out_ptr, ws_ptr, count_ptr, M, stride_om, STEPS: tl.constexpr, TOTAL: tl.constexpr,
            PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr):
    """Count this program's piece of `tile` in; the last piece to arrive sums them all in program
    order and stores, then zeroes the count for the next call (or graph replay)."""
    lo = _owner(tile * STEPS, TOTAL, PROGRAMS)
    hi = _owner(tile * STEPS + STEPS - 1, TOTAL, PROGRAMS)  # programs lo..hi share the tile
    if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == hi - lo:
        plane: tl.constexpr = BLOCK_M * BLOCK_N
        PIECES: tl.constexpr = (STEPS - 1) // (TOTAL // PROGRAMS) + 2  # >= the programs a tile can span
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(PIECES):
            piece = ws_ptr + _slot(lo + i, tile, STEPS, TOTAL, PROGRAMS, plane * (2 if GATE_UP else 1))
            used = (tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32) + lo + i) <= hi
            acc += tl.load(piece + offs, mask=used, other=0.0, cache_modifier=".cg")
            if GATE_UP:
                acc_up += tl.load(piece + plane + offs, mask=used, other=0.0, cache_modifier=".cg")
        _store_rows(acc, acc_up, out_ptr, tile, M, stride_om, BLOCK_M, BLOCK_N, GATE_UP)
        tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _streamk_unit(u, acc, acc_up, x_ptrs, w_ptrs, row_ok, start, end, out_ptr, ws_ptr, M,
                  stride_wn, stride_om, UP_OFFSET: tl.constexpr, STEPS: tl.constexpr, TOTAL: tl.constexpr,
                  PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GATE_UP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One unit; a tile that ends before the program's last unit is stored or parked here."""
    x = tl.load(x_ptrs, mask=row_ok, other=0.0)
    acc = tl.dot(x, tl.trans(tl.load(w_ptrs)), acc, input_precision=DOT_PRECISION)
    if GATE_UP:
        acc_up = tl.dot(x, tl.trans(tl.load(w_ptrs + UP_OFFSET * stride_wn)), acc_up,
                        input_precision=DOT_PRECISION)
    tile_done = (u + 1) % STEPS == 0
    if tile_done & (u + 1 < end):
        _end_tile(acc, acc_up, u // STEPS, start, end, out_ptr, ws_ptr, M, stride_om,
                  STEPS, TOTAL, PROGRAMS, BLOCK_M, BLOCK_N, GATE_UP)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the next K step, or back to K = 0 on the next tile's rows
    x_ptrs += tl.where(tile_done, -(STEPS - 1) * BLOCK_K, BLOCK_K)
    w_ptrs += tl.where(tile_done, BLOCK_N * stride_wn - (STEPS - 1) * BLOCK_K, BLOCK_K)
    return acc, acc_up, x_ptrs, w_ptrs


@triton.jit
def _streamk_gemm_kernel(
    x_ptr, w_ptr, out_ptr, ws_ptr, count_ptr,
    M, stride_xm, stride_wn, stride_om,
    K: tl.constexpr, UP_OFFSET: tl.constexpr,
    TOTAL: tl.constexpr,  # units of work: tiles x K steps
    PROGRAMS: tl.constexpr,  # the grid: each program gets TOTAL // PROGRAMS units or one more
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATE_UP: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    INTERPRETED: tl.constexpr,  # Triton 3.6's interpreter takes no tensor `range` bound (see attention)
):
    """out = x W^T (or the gate/up epilogue), program p walking units [start(p), start(p + 1))."""
    wait_for_previous(USE_PDL)
    STEPS: tl.constexpr = K // BLOCK_K
    start = _first_unit(tl.program_id(0), TOTAL, PROGRAMS)
    end = _first_unit(tl.program_id(0) + 1, TOTAL, PROGRAMS)
    rows = tl.arange(0, BLOCK_M)
    ks = (start % STEPS) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = (start // STEPS) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    row_ok = rows[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRETED:
        u = start
        while u < end:
            acc, acc_up, x_ptrs, w_ptrs = _streamk_unit(
                u, acc, acc_up, x_ptrs, w_ptrs, row_ok, start, end, out_ptr, ws_ptr, M, stride_wn, stride_om,
                UP_OFFSET, STEPS, TOTAL, PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GATE_UP, DOT_PRECISION)
            u += 1
    else:
        for u in range(start, end):
            acc, acc_up, x_ptrs, w_ptrs = _streamk_unit(
                u, acc, acc_up, x_ptrs, w_ptrs, row_ok, start, end, out_ptr, ws_ptr, M, stride_wn, stride_om,
                UP_OFFSET, STEPS, TOTAL, PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GATE_UP, DOT_PRECISION)
    release_next(USE_PDL)
    head, tail = start // STEPS, (end - 1) // STEPS
    _end_tile(acc, acc_up, tail, start, end, out_ptr, ws_ptr, M, stride_om, STEPS, TOTAL, PROGRAMS,
              BLOCK_M, BLOCK_N, GATE_UP)
    head_split = (start % STEPS != 0) & (head != tail)  # its piece was parked inside the loop
    tail_split = (tail * STEPS < start) | (tail * STEPS + STEPS > end)
    if head_split | tail_split:
        tl.debug_barrier()  # every thread's pieces are written before a count says so
        if head_split:
            _arrive(head, out_ptr, ws_ptr, count_ptr, M, stride_om, STEPS, TOTAL, PROGRAMS, BLOCK_M, BLOCK_N, GATE_UP)
        if tail_split:
            _arrive(tail, out_ptr, ws_ptr, count_ptr, M, stride_om, STEPS, TOTAL, PROGRAMS, BLOCK_M, BLOCK_N, GATE_UP)


_SPLIT_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_buffers(device: torch.device, key: tuple, ws_floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 workspace and per-tile arrival counts for one GEMM shape, made once and kept:
    the counts return to zero after every call, so CUDA-graph replays find them ready. The first
    call of a shape must come before graph capture (the engine's warm-up pass does that)."""
    full_key = (device, *key)
    if full_key not in _SPLIT_BUFFERS:
        _SPLIT_BUFFERS[full_key] = (torch.empty(ws_floats, dtype=torch.float32, device=device),
                                    torch.zeros(tiles, dtype=torch.int32, device=device))
    return _SPLIT_BUFFERS[full_key]


def streamk_linear(x: torch.Tensor, weight: torch.Tensor, *, programs: int, out: torch.Tensor | None = None,
                   gate_up: bool = False, **config: int) -> torch.Tensor:
    """`skinny_linear` with the (tile, K step) units dealt out evenly to `programs` programs:
    tiles x S of them is split-K in S, SMs x 1 or 2 stream-K (equal bytes for every program)."""
    M, K = x.shape
    N = weight.shape[0] // (2 if gate_up else 1)
    cfg = {**config_for(N, K), **config}
    tiles, steps = N // cfg["block_n"], K // cfg["block_k"]
    programs = min(programs, tiles * steps)
    ws_floats = 2 * programs * (2 if gate_up else 1) * 64 * cfg["block_n"]
    ws, counts = _split_buffers(x.device, (N, K, gate_up, programs, cfg["block_n"], cfg["block_k"]), ws_floats, tiles)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    _streamk_gemm_kernel[(programs,)](
        x, weight, out, ws, counts, M, x.stride(0), weight.stride(0), out.stride(0),
        K=K, UP_OFFSET=N, TOTAL=tiles * steps, PROGRAMS=programs,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        GATE_UP=gate_up, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        INTERPRETED=x.device.type != "cuda",
        num_stages=cfg["num_stages"], num_warps=cfg["num_warps"], **pdl(x.device),
    )
    return out
