"""Triton implementations of every kernel in `torch_backend`, with the same signatures.

The element-wise kernels here are memory bound: each program handles one token (one row),
reads its inputs once, computes in fp32 and writes once. Paged attention, the only kernel
with real structure, lives in `triton_attention`.

Under TRITON_INTERPRET=1 (set before this module is imported) the same code runs on the
CPU through Triton's interpreter, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import torch_backend
from .launch import pdl, release_next, wait_for_previous
from .triton_attention import decode_with_rope, paged_attention, rotate_pair
from .triton_gemm import fits, invariant_linear, skinny_linear

__all__ = ["linear", "gate_up_silu", "rms_norm", "rope", "rope_store_kv", "silu_and_mul", "store_kv",
           "paged_attention", "rope_store_attention"]


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _warps_for(elements: int) -> int:
    """Enough warps that each thread holds a few 16-byte vectors of a row, at most 16."""
    return max(1, min(16, elements // 1024))


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    n_cols, eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Round the sum to the input dtype, as `x + residual` in torch does: the next layer
        # adds to exactly this stream.
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    release_next(USE_PDL)
    if HAS_RESIDUAL:
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # reference rounds here too
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim, optionally fused with `x + residual` (see reference)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    res2 = res_out = res_out2 = None
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out2 = res_out.view(-1, hidden)
    rows = x2.shape[0]
    if rows:
        block = _pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, res2 if res2 is not None else x2, weight.contiguous(), out2,
            res_out2 if res_out2 is not None else out2,
            x2.stride(0), res2.stride(0) if res2 is not None else 0,
            out2.stride(0), res_out2.stride(0) if res_out2 is not None else 0,
            hidden, eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=_warps_for(block), **pdl(x.device),
        )
    return out, res_out


# --------------------------------------------------------------------------- RoPE


@triton.jit
def _rotate_heads(ptr, stride_h, cos, sin,
                  HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotate-half on one token's [HEADS, 2 * HALF] slice, in place, in fp32."""
    heads = tl.arange(0, HEADS_PAD)
    cols = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < HEADS) & (cols[None, :] < HALF)
    lo_ptr = ptr + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    r1, r2 = rotate_pair(x1, x2, cos, sin)
    tl.store(lo_ptr, r1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(lo_ptr + HALF, r2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(cos_sin_ptr, pos_ptr, token, stride_cs, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """This token's cos and sin rows, [1, HALF_PAD] each, for broadcasting over heads."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    row = cos_sin_ptr + pos * stride_cs + cols
    cos = tl.load(row, mask=cols < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF, mask=cols < HALF, other=0.0)[None, :]
    return cos, sin


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    K_HEADS: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cos_sin_ptr, pos_ptr, token, stride_cs, HALF, HALF_PAD)
    release_next(USE_PDL)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, K_HEADS, K_HEADS_PAD, HALF, HALF_PAD)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotary embedding (rotate-half layout) applied in place to q [T, Hq, D] and k [T, Hk, D]."""
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin.stride(1) != 1:
        raise ValueError("rope needs the head dim contiguous in q, k and cos_sin")
    tokens, q_heads, dim = q.shape
    k_heads = k.shape[1]
    half = dim // 2
    if tokens == 0:
        return
    _rope_kernel[(tokens,)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        Q_HEADS=q_heads, Q_HEADS_PAD=_pow2(q_heads), K_HEADS=k_heads, K_HEADS_PAD=_pow2(k_heads),
        HALF=half, HALF_PAD=_pow2(half), num_warps=_warps_for(_pow2(q_heads) * _pow2(half) * 2),
        **pdl(q.device),
    )


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    K_HEADS: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """`_rope_kernel` and `_store_kv_kernel` in one pass: the rotated K goes to its cache slot
    from registers, V is copied alongside (one launch per layer fewer)."""
    wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cos_sin_ptr, pos_ptr, token, stride_cs, HALF, HALF_PAD)
    release_next(USE_PDL)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    cols = tl.arange(0, HALF_PAD)
    heads = tl.arange(0, K_HEADS_PAD)[:, None]
    mask = (heads < K_HEADS) & (cols[None, :] < HALF)
    k_lo = k_ptr + token * stride_kt + heads * stride_kh + cols[None, :]
    x1 = tl.load(k_lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_lo + HALF, mask=mask, other=0.0).to(tl.float32)
    r1, r2 = rotate_pair(x1, x2, cos, sin)
    r1, r2 = r1.to(k_ptr.dtype.element_ty), r2.to(k_ptr.dtype.element_ty)
    tl.store(k_lo, r1, mask=mask)
    tl.store(k_lo + HALF, r2, mask=mask)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # else a padding token: nothing to keep
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + cols[None, :]
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + cols[None, :]
        v_lo = v_ptr + token * stride_vt + heads * stride_vh + cols[None, :]
        tl.store(k_dst, r1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, tl.load(v_lo, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst + HALF, tl.load(v_lo + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, scratch: dict | None = None) -> None:
    """`rope` then `store_kv`, fused (see reference.rope_store_kv); nothing to keep in `scratch`."""
    if any(t.stride(-1) != 1 for t in (q, k, v, cos_sin, k_cache, v_cache)):
        raise ValueError("rope_store_kv needs the head dim contiguous in q, k, v, cos_sin and both caches")
    tokens, q_heads, dim = q.shape
    k_heads, half = k.shape[1], dim // 2
    if tokens == 0:
        return
    _rope_store_kernel[(tokens,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Q_HEADS=q_heads, Q_HEADS_PAD=_pow2(q_heads), K_HEADS=k_heads, K_HEADS_PAD=_pow2(k_heads),
        HALF=half, HALF_PAD=_pow2(half), BLOCK_SIZE=k_cache.shape[1],
        num_warps=_warps_for(_pow2(q_heads) * _pow2(half) * 2), **pdl(q.device),
    )


# --------------------------------------------------------------------------- SiLU * mul


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    release_next(USE_PDL)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for x = [gate | up] along the last dim."""
    width = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and width:
        block = min(1024, _pow2(width))
        _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](
            x2, out.view(-1, width), x2.stride(0), width, width, BLOCK=block,
            num_warps=max(1, block // 256), **pdl(x.device),
        )
    return out


# --------------------------------------------------------------------------- KV store


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to keep
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    release_next(USE_PDL)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V into its cache slot; slot -1 means skip."""
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("store_kv needs the head dim contiguous in k, v and both caches")
    tokens, heads, dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS=heads, HEADS_PAD=_pow2(heads), HEAD_DIM=dim, HEAD_DIM_PAD=_pow2(dim),
        BLOCK_SIZE=k_cache.shape[1], num_warps=_warps_for(_pow2(heads) * _pow2(dim)), **pdl(k.device),
    )


# --------------------------------------------------------------------------- GEMMs


_STREAMED = (torch.bfloat16, torch.float16)  # fp32 has no tensor-core dot: cuBLAS does it better


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b: the weight-streaming kernel (triton_gemm) for up to 64 rows of bf16/fp16 on a
    GPU, the batch-invariant GEMM for fp32 on a GPU, else cuBLAS."""
    if x.is_cuda and x.dtype == torch.float32:
        return invariant_linear(x, weight, bias, out)
    if bias is None and x.is_cuda and x.dtype in _STREAMED and fits(x, weight):
        return skinny_linear(x, weight, out=out)
    return torch_backend.linear(x, weight, bias, out)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up in the GEMM's epilogue for up to 64 rows on a GPU, else GEMM + silu_and_mul."""
    if x.is_cuda and x.dtype in _STREAMED and fits(x, weight, gate_up=True):
        return skinny_linear(x, weight, gate_up=True)
    return silu_and_mul(linear(x, weight))


def rope_store_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor, scale: float, max_seqlen_q: int, max_seqlen_k: int,
                         scratch: dict | None = None) -> torch.Tensor:
    """`rope_store_kv` then `paged_attention`; a decode step's in one kernel (see
    triton_attention), other steps as the two kernels."""
    if max_seqlen_q != 1 or q.shape[0] != seq_lens.shape[0] or q.dtype == torch.float32:
        # fp32 decodes take the general kernel too: one launch shape for every step (batch invariance)
        rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
        return paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                               max_seqlen_q, max_seqlen_k)
    return decode_with_rope(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, cu_seqlens_q, seq_lens,
                            block_tables, scale, max_seqlen_k)
