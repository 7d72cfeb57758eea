"""Paged attention in Triton: one kernel for a ragged batch of prefill chunks and decodes.

How the work is cut
-------------------
Query rows are flat, `q[T, Hq, D]`; request i owns rows `cu_seqlens_q[i]:cu_seqlens_q[i+1]`,
the last `q_len` tokens of its `seq_lens[i]`-token context. One program handles one *query
tile* and one KV head:

* a query tile is up to BLOCK_Q consecutive tokens of ONE request, each with all G = Hq / Hk
  query heads that share the KV head, packed as the BLOCK_M = BLOCK_Q * G rows of a matrix
  (row r is token r // G, head r % G). Every K/V tile the program loads serves all G heads,
  so the cache is read once per KV head, not once per query head;
* the program walks the request's keys TILE_N at a time, finding each key's cache slot
  through the block table (so any block size works, and table entries past the request's
  last block are never read), with an online softmax in fp32.

Request i's tiles are numbered from `cu_seqlens_q[i] // BLOCK_Q + i`. That start is known
on the device, never on the host, and `T // BLOCK_Q + B` bounds the total, so the grid is
sized from shapes and python ints alone: no host synchronisation, and the launch can be
captured in a CUDA graph. A program finds its request by binary search over those starts;
programs past the end of a request's rows return at once.

Decode steps (one query token per request) skip that search: program i is request i. They
may also bring RoPE and the KV store along (`rope` in `paged_attention_with`): the program
rotates its request's q heads in registers, the program whose keys include the new token
rotates that token's k and writes k and v to the cache, and then it reads them back with the
rest. This saves a launch per layer, and the program reads its request's length, position and
slot before it waits for the kernel ahead of it (the QKV GEMM), since only q, k and v come
from that kernel.

Split-K (flash decoding): when a decode batch has too few programs to fill the GPU (few
requests, long contexts) each program's key range is also cut into NUM_SPLITS pieces along
a third grid axis; each piece writes an unnormalised partial output with its running max
and sum, and a second small kernel merges them. `choose_config` decides, from python ints.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import pdl, release_next, wait_for_previous

__all__ = ["AttentionConfig", "RopeInputs", "choose_config", "decode_with_rope", "paged_attention",
           "paged_attention_with"]

LOG2E = 1.4426950408889634


class RopeInputs(NamedTuple):
    """What a decode launch needs to do RoPE and the KV store itself (`rope_store_kv`'s inputs)."""

    k: torch.Tensor  # [T, Hk, D], not yet rotated
    v: torch.Tensor  # [T, Hk, D]
    positions: torch.Tensor  # [T]
    cos_sin: torch.Tensor  # [max_pos, D] fp32
    slot_mapping: torch.Tensor  # [T], -1 = store nowhere


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of the attention kernel (tile shapes, split count, pipelining)."""

    block_m: int  # query rows per program: BLOCK_Q tokens x G heads, a power of two >= 16
    tile_n: int  # keys per inner-loop step, a power of two >= 16
    num_splits: int  # pieces each program's key range is cut into (1 = no split-K)
    num_warps: int = 4
    num_stages: int = 3
    decode: bool = False  # one query token per request (cu_seqlens_q = 0, 1, ..., B): no search


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: keep grids small, but still exercise split-K on long contexts


def choose_config(
    num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_sms: int,
) -> AttentionConfig:
    """Pick tile shapes and the split count from python ints only (never from device data).

    * block_m: one token of the whole head group at least; for prefill up to 64 rows, so a
      chunk reuses each K/V tile across many query tokens.
    * tile_n: K and V tiles of at most 16 KB each, so three pipeline stages fit in shared
      memory for any head dim up to 256; for decode with head dim >= 128, 128 keys where three
      stages of both tiles fit in 192 KB (bf16 / fp16 at head dim 128). A program then walks
      half as many steps: on the H100, batch 32 of Llama-3-8B heads, 14.5 -> 11.6 us at context
      256 and 31.2 -> 28.1 us at 480 (bench/results/attn_tiles_h100_2026-11-23.txt); at head
      dim 64 (SmolLM2) 64 keys stayed the best, with 2 warps and 5 stages: batch 64 with K/V
      read from DRAM, 9.8 -> 8.5 us at context 192, 11.7 -> 9.7 us at 256
      (bench/results/attn_cold_h100_2026-12-05.txt).
    * num_splits: decode batches only (a prefill chunk brings many query tiles of its own).
      When their programs (one per request and KV head) fall short of ~3 per multiprocessor,
      the fewest power-of-two pieces that reach it, each still streaming >= 4 key tiles. Measured on an H100 (bench/NOTES.md):
      batch 64 x 8 KV heads = 512 programs streams at 91 % of copy unsplit and loses with 2
      pieces; batch 4 at context 32k runs 3x faster split.
    """
    group = num_q_heads // num_kv_heads
    block_m = max(16, _next_pow2(group))
    if max_seqlen_q > 1:
        block_m = max(block_m, min(64, _next_pow2(max_seqlen_q * group)))

    d_pad = _next_pow2(head_dim)
    tile_n = max(16, min(64, 16384 // (d_pad * dtype.itemsize)))
    num_warps, num_stages = 4, 3
    if max_seqlen_q == 1 and d_pad >= 128 and 2 * 3 * 128 * d_pad * dtype.itemsize <= 192 * 1024:
        tile_n = 128  # decode, Llama-3-8B heads: fewer, longer steps per program (measured below)
    elif max_seqlen_q == 1 and d_pad <= 64:
        num_warps, num_stages = 2, 5  # decode, SmolLM2 heads: a deeper pipeline, half the warps

    num_splits = 1
    programs = num_seqs * num_kv_heads
    target = 3 * num_sms
    if max_seqlen_q == 1 and programs < target:
        most = max(1, max_seqlen_k // (4 * tile_n))
        most = 1 << (most.bit_length() - 1)  # round down to a power of two
        num_splits = min(_next_pow2(-(-target // max(programs, 1))), most, 32)
    return AttentionConfig(block_m=block_m, tile_n=tile_n, num_splits=num_splits, num_warps=num_warps,
                           num_stages=num_stages, decode=max_seqlen_q == 1)


@triton.jit
def _find_request(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with cu_seqlens_q[i] // BLOCK_Q + i <= tile: the request owning this tile."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def rotate_pair(x1, x2, cos, sin):
    """RoPE on the two halves (x1, x2) of a head, in fp32, with explicit FMAs: left to itself the
    compiler contracts `x1 * cos - x2 * sin` one way in one kernel and another way in the next,
    and every kernel that rotates must round exactly alike (the fused decode kernel and
    `rope_store_kv` feed the same cache)."""
    return tl.fma(x1, cos, -(x2 * sin)), tl.fma(x2, cos, x1 * sin)


@triton.jit
def _rotate_half(x, partner, lo, cos, sin):
    """`rotate_pair` on a whole head whose columns are paired with `partner` (the other half)."""
    first, second = rotate_pair(tl.where(lo, x, partner).to(tl.float32), tl.where(lo, partner, x).to(tl.float32),
                                cos, sin)
    return tl.where(lo, first, second)


@triton.jit
def _attend_key_tile(
    q, q_pos, m, l, acc, t, kv_end, table, k_head, v_head, dims, dim_ok, qk_scale,
    stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys t*TILE_N .. (t+1)*TILE_N - 1 of the request."""
    pos = t * TILE_N + tl.arange(0, TILE_N)
    pos_ok = pos < kv_end
    block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    k_off = block * stride_kb + slot * stride_ks
    v_off = block * stride_vb + slot * stride_vs
    k = tl.load(k_head + k_off[None, :] + dims[:, None],
                mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)  # [D, N]
    v = tl.load(v_head + v_off[:, None] + dims[None, :],
                mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)  # [N, D]

    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(pos_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet stay at 0
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m - m_ref)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _attention_kernel(
    out_ptr,  # [T, Hq, D] final output, or [S, T, Hq, D_PAD] fp32 partials when split
    m_ptr,  # [S, T, Hq] fp32 running max (log2 domain) per split; unused unless split
    l_ptr,  # [S, T, Hq] fp32 running sum per split; unused unless split
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hk, D]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hk, D]
    cu_seqlens_q_ptr,  # [B + 1]
    seq_lens_ptr,  # [B]
    block_tables_ptr,  # [B, max_blocks]
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    num_seqs,
    stride_qt, stride_qh,
    stride_ot, stride_oh, stride_os,  # stride_os: between splits (partials only)
    stride_ml_t, stride_ml_s,  # m/l strides over tokens and splits (heads are contiguous)
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    pos_ptr,  # [T] positions; with FUSE_ROPE only, as the five below
    cos_sin_ptr,  # [max_pos, HEAD_DIM] fp32: cos | sin
    k_new_ptr,  # [T, Hk, D] this step's k (not yet rotated)
    v_new_ptr,  # [T, Hk, D] this step's v
    slot_ptr,  # [T] cache slot of each token, -1 = store nowhere
    stride_cs, stride_knt, stride_knh, stride_vnt, stride_vnh,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DECODE: tl.constexpr,  # one query token per request: program i is request i
    FUSE_ROPE: tl.constexpr,  # decode only: rotate q and the new k here, store the new k / v
    DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,  # running under TRITON_INTERPRET=1: see the two work-arounds
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE:
        # Lengths, positions and slots were written before the kernel ahead of this one started,
        # so they may be read before waiting for it (kernels/launch.py).
        req = tile
        q_start = req
        q_len = 1
        first = 0
    else:
        wait_for_previous(USE_PDL)
        req = _find_request(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q)
        q_start = tl.load(cu_seqlens_q_ptr + req)
        q_len = tl.load(cu_seqlens_q_ptr + req + 1) - q_start
        first = (tile - (q_start // BLOCK_Q + req)) * BLOCK_Q  # first token of the tile, in-request
        if first >= q_len:
            return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len  # keys before the request's first query token

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows // GROUP < BLOCK_Q) & (tok < q_len)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)

    # Keys this tile can see, cut into NUM_SPLITS pieces of whole key tiles.
    kv_end = tl.minimum(seq_len, context + first + BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    q_at = q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh
    q_mask = row_ok[:, None] & dim_ok[None, :]
    if FUSE_ROPE:
        half_cols = dims % (HEAD_DIM // 2)
        lo = dims < HEAD_DIM // 2
        partner = tl.where(lo, dims + HEAD_DIM // 2, dims - HEAD_DIM // 2)
        cs_row = cos_sin_ptr + tl.load(pos_ptr + req).to(tl.int64) * stride_cs
        cos = tl.load(cs_row + half_cols, mask=dim_ok, other=0.0)
        sin = tl.load(cs_row + HEAD_DIM // 2 + half_cols, mask=dim_ok, other=0.0)
        slot = tl.load(slot_ptr + req).to(tl.int64)
    if DECODE:
        wait_for_previous(USE_PDL)
    if FUSE_ROPE:
        q = _rotate_half(tl.load(q_at + dims[None, :], mask=q_mask, other=0.0),
                         tl.load(q_at + partner[None, :], mask=q_mask, other=0.0),
                         lo[None, :], cos[None, :], sin[None, :]).to(q_ptr.dtype.element_ty)
        if (slot >= 0) & (tile_lo < num_tiles) & (num_tiles <= tile_hi):  # this piece reads the new key
            k_at = k_new_ptr + req * stride_knt + kv_head * stride_knh
            k_new = _rotate_half(tl.load(k_at + dims, mask=dim_ok, other=0.0),
                                 tl.load(k_at + partner, mask=dim_ok, other=0.0), lo, cos, sin)
            v_new = tl.load(v_new_ptr + req * stride_vnt + kv_head * stride_vnh + dims, mask=dim_ok)
            block = slot // BLOCK_SIZE
            offset = slot % BLOCK_SIZE
            k_dst = k_cache_ptr + block * stride_kb + offset * stride_ks + kv_head * stride_kh + dims
            v_dst = v_cache_ptr + block * stride_vb + offset * stride_vs + kv_head * stride_vh + dims
            tl.store(k_dst, k_new.to(k_new_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty), mask=dim_ok)
            tl.store(v_dst, v_new.to(v_cache_ptr.dtype.element_ty), mask=dim_ok)
        tl.debug_barrier()  # every thread of the program sees the new key before the loop reads it
    else:
        q = tl.load(q_at + dims[None, :], mask=q_mask, other=0.0)
    if INTERPRETED:
        # Triton 3.6's interpreter multiplies bf16 dot operands as raw bits: dot in fp32.
        q = q.to(tl.float32)
    q_pos = context + tok  # absolute position of each row's query: it sees keys 0..q_pos

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table = block_tables_ptr + req * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    if INTERPRETED:
        # Triton 3.6's interpreter cannot take a tensor as a `range` bound under numpy >= 2.4
        # (triton-lang/triton#9171); a while loop is equivalent but is not software-pipelined
        # when compiled, so it is used only where the kernel is interpreted.
        t = tile_lo
        while t < tile_hi:
            m, l, acc = _attend_key_tile(
                q, q_pos, m, l, acc, t, kv_end, table, k_head, v_head, dims, dim_ok, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, BLOCK_SIZE, TILE_N, DOT_PRECISION)
            t += 1
    else:
        for t in range(tile_lo, tile_hi):
            m, l, acc = _attend_key_tile(
                q, q_pos, m, l, acc, t, kv_end, table, k_head, v_head, dims, dim_ok, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, BLOCK_SIZE, TILE_N, DOT_PRECISION)

    release_next(USE_PDL)
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = split * stride_os + q_rows[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_ptr + part + dims[None, :], acc, mask=out_mask)
        ml = split * stride_ml_s + q_rows * stride_ml_t + head
        tl.store(m_ptr + ml, m, mask=row_ok)
        tl.store(l_ptr + ml, l, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [T, Hq, D]
    part_ptr,  # [S, T, Hq, D_PAD] fp32
    m_ptr,  # [S, T, Hq] fp32
    l_ptr,  # [S, T, Hq] fp32
    stride_ot, stride_oh,
    stride_ps, stride_pt, stride_ph,
    stride_ml_s, stride_ml_t,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Rescale each split's partial sums to the common max and normalise once."""
    wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    ml = splits * stride_ml_s + token * stride_ml_t + head
    m = tl.load(m_ptr + ml)
    weight = tl.exp2(m - tl.max(m, 0))  # empty splits carry m = -inf: weight 0
    l = tl.sum(tl.load(l_ptr + ml) * weight, 0)
    part = tl.load(part_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph
                   + dims[None, :])
    out = tl.sum(part * weight[:, None], 0) / l
    release_next(USE_PDL)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def invariant_config(num_q_heads: int, num_kv_heads: int, head_dim: int) -> AttentionConfig:
    """The one launch of the fp32 path, for prefill chunks and decodes alike: fixed tiles, the
    general (non-decode) program layout, no split of the keys. A query row then walks its keys in
    the same TILE_N steps with the same reductions whatever the batch, the step's longest context
    or chunk, or whether it is decoded or recomputed after a preemption, so fp32 results are
    bit-identical across batch layouts (the engine's overlap == sync and graphs == eager promise).
    The price is speed, which the fp32 path does not chase: bf16 keeps the tuned heuristics."""
    group = num_q_heads // num_kv_heads
    d_pad = _next_pow2(head_dim)
    return AttentionConfig(block_m=max(16, _next_pow2(group)), tile_n=max(16, min(64, 8192 // d_pad)),
                           num_splits=1, num_warps=4, num_stages=2, decode=False)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scratch: dict | None = None,
) -> torch.Tensor:
    """Triton version of `torch_backend.paged_attention`: same signature, same result (the launch
    needs nothing from `scratch`)."""
    config = (invariant_config(q.shape[1], k_cache.shape[2], q.shape[2]) if q.dtype == torch.float32
              else _heuristic_config(q, k_cache, seq_lens, max_seqlen_q, max_seqlen_k))
    return paged_attention_with(config, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)


def _heuristic_config(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int) -> AttentionConfig:
    return choose_config(seq_lens.shape[0], q.shape[1], k_cache.shape[2], q.shape[2], q.dtype,
                         max_seqlen_q, max_seqlen_k, _num_sms(q.device))


def decode_with_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, max_seqlen_k: int) -> torch.Tensor:
    """A decode step's RoPE, KV store and attention in one launch (one query token per request);
    same result as `rope_store_kv` then `paged_attention`."""
    return paged_attention_with(_heuristic_config(q, k_cache, seq_lens, 1, max_seqlen_k), q, k_cache, v_cache,
                                cu_seqlens_q, seq_lens, block_tables, scale,
                                rope=RopeInputs(k, v, positions, cos_sin, slot_mapping))


def paged_attention_with(
    config: AttentionConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    rope: RopeInputs | None = None,
) -> torch.Tensor:
    """Run the kernel with explicit launch parameters (tests and benchmarks pick their own).

    With `rope` (decode configs only), q and rope.k are this step's projections before RoPE:
    the kernel rotates them, stores the new k and v to the cache, then attends (see above)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if config.decode and num_tokens != num_seqs:
        raise ValueError(f"a decode config needs one query token per request, got {num_tokens} "
                         f"tokens for {num_seqs} requests")
    if rope is not None and not config.decode:
        raise ValueError("RoPE and the KV store ride along only in decode configs")
    if rope is not None and (head_dim % 2 or any(t.stride(-1) != 1 for t in (rope.k, rope.v, rope.cos_sin))):
        raise ValueError("fused RoPE needs an even head dim, contiguous in k, v and cos_sin")
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if group * num_kv_heads != num_q_heads or config.block_m < group:
        raise ValueError(f"{num_q_heads} query heads over {num_kv_heads} KV heads with "
                         f"block_m={config.block_m}")
    for name in ("block_m", "tile_n", "num_splits"):
        value = getattr(config, name)
        if value & (value - 1) or value < (1 if name == "num_splits" else 16):
            raise ValueError(f"{name} must be a power of two (>= 16 for tiles), got {value}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged_attention needs the head dim contiguous in q and both caches")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    block_q = config.block_m // group
    d_pad = max(16, _next_pow2(head_dim))
    splits = config.num_splits
    grid = (num_seqs if config.decode else num_tokens // block_q + num_seqs, num_kv_heads, splits)
    fused = rope if rope is not None else RopeInputs(q, q, q, q, q)  # unused without FUSE_ROPE
    interpreted = q.device.type != "cuda"  # Triton runs off-GPU only through its interpreter
    if splits == 1:
        target, m, l = out, out, out  # m / l are never touched without splits
        stride_os, stride_ml = 0, (0, 0)
    else:
        target = torch.empty((splits, num_tokens, num_q_heads, d_pad), dtype=torch.float32,
                             device=q.device)
        m = torch.empty((splits, num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        stride_os, stride_ml = target.stride(0), (m.stride(1), m.stride(0))
    _attention_kernel[grid](
        target, m, l, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1),
        target.stride(-3), target.stride(-2), stride_os,
        *stride_ml,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        fused.positions, fused.cos_sin, fused.k, fused.v, fused.slot_mapping,
        fused.cos_sin.stride(0), fused.k.stride(0), fused.k.stride(1), fused.v.stride(0), fused.v.stride(1),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=config.block_m,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=block_size,
        TILE_N=config.tile_n, NUM_SPLITS=splits, DECODE=config.decode, FUSE_ROPE=rope is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
        INTERPRETED=interpreted,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl(q.device),
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out, target, m, l,
            out.stride(0), out.stride(1),
            target.stride(0), target.stride(1), target.stride(2),
            m.stride(0), m.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, NUM_SPLITS=splits, **pdl(q.device),
        )
    return out
