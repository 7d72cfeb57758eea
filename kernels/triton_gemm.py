"""A weight-streaming GEMM for few rows: y = x W^T with x [M, K], M <= 64, W [N, K].

A decode step multiplies a few dozen rows by each weight matrix once, so the GEMM is a
pass over the weights. Each program owns a thin slice of W's rows (BLOCK_N) and walks all
of K with a software pipeline: enough programs to fill every SM, several tiles in flight
each; the whole x (padded to BLOCK_M rows) rides along, tiny next to W. Timed in CUDA
graphs over cold weights on the H100 (bench/results/skinny_gemm_sweep_h100_2026-11-23.txt)
it matches cuBLAS on the Llama-3-8B projections (0.93-1.00 of its time at 32 rows) and
beats it by 10-16 % on SmolLM2's small ones at 64 rows. (An earlier probe had cuBLAS at
68-75 % of copy speed at 32 rows; that was its Python launch cost, not the kernel.) Its
other use is the epilogue: silu(gate) * up computed before the store (`gate_up`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl, release_next, wait_for_previous


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, stride_xm, stride_wn, stride_om,
    K: tl.constexpr,  # a model has two or three K values; a constant trip count pipelines best
    UP_OFFSET: tl.constexpr,  # GATE_UP: rows of W between a gate row and its up row
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATE_UP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32: tl.dot would round fp32 inputs to tf32
    USE_PDL: tl.constexpr,
):
    """out[:, cols] = x W[cols]^T, or with GATE_UP silu(x W[cols]^T) * (x W[cols + UP_OFFSET]^T)."""
    wait_for_previous(USE_PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    row_ok = rows[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):  # K % BLOCK_K == 0 and N % BLOCK_N == 0: no masks on W
        x = tl.load(x_ptrs, mask=row_ok, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs)), acc, input_precision=DOT_PRECISION)
        if GATE_UP:
            acc_up = tl.dot(x, tl.trans(tl.load(w_ptrs + UP_OFFSET * stride_wn)), acc_up,
                            input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    release_next(USE_PDL)
    dtype = out_ptr.dtype.element_ty
    if GATE_UP:
        # round gate and up to the output dtype first, as the unfused GEMM + silu_and_mul do
        gate = acc.to(dtype).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype), mask=row_ok)


def config_for(n: int, k: int, gate_up: bool = False) -> dict[str, int]:
    """Tiles measured best on the H100 (bench/results/skinny_gemm_sweep_h100_2026-11-23.txt,
    splitk_probe_h100_2026-11-23.txt): long rows (Llama-3-8B, K >= 2048) want 256-wide K steps
    and few warps; short ones (SmolLM2) 64-wide steps and a deep pipeline.

    With more programs than SMs (qkv's 192, the fused gate_up's 448) a 3-stage pipeline is
    faster: its smaller shared-memory footprint lets one more program share each SM, which
    evens out the bytes every SM reads (qkv 21.4 -> 20.3 us, gate_up 87.7 -> 83.1 us at 32 rows).
    """
    if k >= 2048:
        return dict(block_n=32, block_k=256, num_stages=3 if gate_up or n > 4096 else 4, num_warps=2)
    if k >= 1024:
        return dict(block_n=16, block_k=128, num_stages=6, num_warps=4)
    return dict(block_n=32, block_k=64, num_stages=6, num_warps=4)


def fits(x: torch.Tensor, weight: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
         gate_up: bool = False) -> bool:
    """Shapes this kernel takes: at most 64 rows, N and K multiples of the tiles, K contiguous."""
    if x.dim() != 2 or weight.dim() != 2:
        return False
    M, K = x.shape
    N = weight.shape[0] // (2 if gate_up else 1)
    cfg = config_for(N, K, gate_up)
    block_n, block_k = block_n or cfg["block_n"], block_k or cfg["block_k"]
    return (1 <= M <= 64 and N % block_n == 0 and K % block_k == 0 and weight.shape[1] == K
            and x.stride(1) == 1 and weight.stride(1) == 1 and x.dtype == weight.dtype)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None,
                  gate_up: bool = False, **config: int) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T -> [M, N] in x's dtype, fp32 accumulation (check `fits` first).

    With `gate_up`, weight is [gate; up] stacked ([2N, K]) and the result is silu(gate) * up
    ([M, N]): the MLP's activation rides in the GEMM's epilogue instead of a kernel of its own.
    """
    M, K = x.shape
    N = weight.shape[0] // (2 if gate_up else 1)
    cfg = {**config_for(N, K, gate_up), **config}
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    _skinny_gemm_kernel[(N // cfg["block_n"],)](
        x, weight, out, M, x.stride(0), weight.stride(0), out.stride(0), K=K, UP_OFFSET=N,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        GATE_UP=gate_up, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_stages=cfg["num_stages"], num_warps=cfg["num_warps"], **pdl(x.device),
    )
    return out


# --------------------------------------------------------------------------- batch-invariant fp32
#
# cuBLAS picks its kernel (tile shape, split-K) from the matrix sizes, so the same row of x gives
# different low bits when it is multiplied alone, beside 63 others or beside 200: a request's fp32
# logits then depend on what else shares its step, and an argmax near a tie flips. The engine's
# promise that overlap on or off and graphs on or off give the same tokens rests on every row
# being computed the same way whatever the batch. This kernel does that by construction: fixed
# tiles, one program per (row tile, column tile), and K walked in the same BLOCK_K steps with
# exact fp32 FMAs ("ieee"), so a row's result never depends on M or on its place in the tile.

INVARIANT_TILES = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32)


@triton.jit
def _invariant_gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, stride_xm, stride_wn, stride_om,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[rows, cols] = x[rows] W[cols]^T (+ b[cols]), each element summed over K in one order."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x W^T (+ b) whose every row is bit-identical whatever the other rows are (see above)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"invariant_linear is the fp32 path, got {x.dtype} x {weight.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], weight.shape[0]
    out2 = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out.view(M, N)
    if M:
        t = INVARIANT_TILES
        grid = (triton.cdiv(M, t["BLOCK_M"]), triton.cdiv(N, t["BLOCK_N"]))
        _invariant_gemm_kernel[grid](
            x2, weight, bias if bias is not None else weight, out2, M, N,
            x2.stride(0), weight.stride(0), out2.stride(0), K=K, HAS_BIAS=bias is not None, **t,
            num_warps=4, num_stages=3,
        )
    return out2.view(*lead, N) if out is None else out
