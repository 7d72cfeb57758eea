"""The oracle: every kernel written the plainest way, in float64, one request at a time.

The tests hold both implementations the model can run, the Triton kernels (`triton_ops`) and the
tuned torch backend (`torch_backend`), against these functions. Nothing here is fast, and nothing
here is shared with them: no private ops, no views that alias two tensors, no state kept between
calls, no cleverness. Each function returns new tensors (float64; a store keeps the cache's dtype)
and never writes to its inputs, so a test compares what an implementation wrote in place with
what this module returns.

The contract each implementation follows, in words:
- `linear`: x W^T + b.  `silu_and_mul`: SiLU(gate) * up for x = [gate | up].
- `rms_norm`: (x + residual) / sqrt(mean((x + residual)^2) + eps) * weight, and the sum itself.
- `rope`: rotate-half (NeoX) rotary embedding; `cos_sin[p]` holds cos in its first half, sin in
  its second, for position p.
- `store_kv`: token t's K and V go to cache slot `slot_mapping[t]` (block = slot // block_size,
  offset = slot % block_size); slot -1 stores nothing.
- `paged_attention`: request i owns query rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1], the last
  q_len of its seq_lens[i] positions; its keys are positions 0 .. seq_len - 1, found through its
  row of block_tables; row r sees keys up to its own position (causal). Query head h reads KV
  head h // (Hq / Hk). Rows past the last request belong to nobody and are zero.
- The GGUF block weights of `cpu_blocks`: Q4_1 is w = d * q + m with q in 0..15, two per byte
  (byte j of a 32-weight block holds q[j] in its low and q[j + 16] in its high four bits); Q8_0 is
  w = d * q with q a signed byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for the annotations only: nothing of cpu_blocks runs here
    from .cpu_blocks import BlockWeight

F64 = torch.float64


# --------------------------------------------------------------------------- dense ops


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for x [..., K] and W [N, K]."""
    out = x.to(F64) @ weight.to(F64).t()
    return out if bias is None else out + bias.to(F64)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out."""
    x = x.to(F64)
    return x / (1.0 + torch.exp(-x))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, where the last dim of x is [gate | up]."""
    half = x.shape[-1] // 2
    return silu(x[..., :half]) * x[..., half:].to(F64)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's first half for the stacked weight [W_gate; W_up]."""
    return silu_and_mul(linear(x, weight))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed, x + residual), or (normed, None) without a residual."""
    x = x.to(F64) if residual is None else x.to(F64) + residual.to(F64)
    mean_square = (x * x).mean(dim=-1, keepdim=True)
    return x / torch.sqrt(mean_square + eps) * weight.to(F64), None if residual is None else x


# --------------------------------------------------------------------------- RoPE and the KV store


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hk, D], each token rotated to its position: with x = [x1 | x2] and
    cos, sin the position's row, [x1 cos - x2 sin | x2 cos + x1 sin]."""
    half = q.shape[-1] // 2
    rows = cos_sin[positions.long()].to(F64)  # [T, D]
    cos, sin = rows[:, None, :half], rows[:, None, half:]  # [T, 1, D/2]: the same for every head

    def rotated(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].to(F64), x[..., half:].to(F64)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotated(q), rotated(k)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches [num_blocks, block_size, Hk, D] with each token's K and V in its slot.

    The copies keep the caches' dtype: a store only converts, and the kernels convert the same way.
    """
    k_out, v_out = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        k_out[block, offset] = k[t].to(k_cache.dtype)
        v_out[block, offset] = v[t].to(v_cache.dtype)
    return k_out, v_out


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k, k_cache, v_cache): `rope`, then `store_kv` of the rotated k and v."""
    q_rot, k_rot = rope(q, k, positions, cos_sin)
    k_cache, v_cache = store_kv(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot, k_cache, v_cache


# --------------------------------------------------------------------------- paged attention


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One request's positions 0 .. seq_len - 1 from the paged cache, [seq_len, Hk, D]: position p
    is slot p % block_size of block block_table[p // block_size]. Only those slots are read, so
    whatever else the cache or the table holds never matters."""
    block_size = cache.shape[1]
    positions = torch.arange(seq_len, device=cache.device)
    blocks = block_table.to(cache.device).long()[positions // block_size]
    return cache[blocks, positions % block_size].to(F64)


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One request: its q_len query rows [q_len, Hq, D], the last q_len of the seq_len positions
    whose keys and values are [seq_len, Hk, D]. Row r sits at position seq_len - q_len + r and sees
    the keys up to it. Query head h reads KV head h // (Hq / Hk)."""
    q_len, num_heads = q.shape[0], q.shape[1]
    seq_len, num_kv_heads = keys.shape[0], keys.shape[1]
    kv_head = torch.arange(num_heads, device=keys.device) // (num_heads // num_kv_heads)
    k, v = keys[:, kv_head], values[:, kv_head]  # [seq_len, Hq, D]
    scores = torch.einsum("qhd,shd->hqs", q.to(F64), k) * scale  # [Hq, q_len, seq_len]
    row_position = seq_len - q_len + torch.arange(q_len, device=keys.device)
    visible = torch.arange(seq_len, device=keys.device)[None, :] <= row_position[:, None]  # [q_len, seq_len]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqs,shd->qhd", weights, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention for a ragged batch of decodes, prefills and prefill chunks; [T, Hq, D] float64.
    Rows past the last request's belong to nobody and stay zero."""
    out = torch.zeros(q.shape, dtype=F64, device=q.device)
    starts, lengths = cu_seqlens_q.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lengths):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue  # no query rows this step
        keys = gather_context(k_cache, block_tables[i], seq_len)
        values = gather_context(v_cache, block_tables[i], seq_len)
        out[start:end] = causal_attention(q[start:end], keys, values, scale)
    return out


def rope_store_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention output, k_cache, v_cache): `rope_store_kv`, then `paged_attention` on the new caches."""
    q_rot, _, k_cache, v_cache = rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    out = paged_attention(q_rot, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)
    return out, k_cache, v_cache


# --------------------------------------------------------------------------- GGUF block weights (cpu_blocks)

BLOCK = 32  # weights per GGUF block


def dequantize_q4_1(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W [N, K] from Q4_1 blocks: qs uint8 [N, K / 2], scales [N, K / 32, 2] holding (d, m)."""
    rows, groups = scales.shape[0], scales.shape[1]
    w = torch.empty(rows, groups * BLOCK, dtype=F64)
    for n in range(rows):
        for g in range(groups):
            d, m = float(scales[n, g, 0]), float(scales[n, g, 1])
            packed = qs[n, g * BLOCK // 2 : (g + 1) * BLOCK // 2].to(torch.int64)  # 16 bytes
            q = torch.cat((packed % 16, packed // 16)).to(F64)  # low nibbles are q[0..15], high q[16..31]
            w[n, g * BLOCK : (g + 1) * BLOCK] = d * q + m
    return w


def dequantize_q8_0(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W [N, K] from Q8_0 blocks: qs int8 [N, K], scales [N, K / 32] holding d."""
    rows, groups = scales.shape[0], scales.shape[1]
    w = torch.empty(rows, groups * BLOCK, dtype=F64)
    for n in range(rows):
        for g in range(groups):
            w[n, g * BLOCK : (g + 1) * BLOCK] = float(scales[n, g]) * qs[n, g * BLOCK : (g + 1) * BLOCK].to(F64)
    return w


def dequantize(weight: BlockWeight) -> torch.Tensor:
    """The float64 matrix a `cpu_blocks.BlockWeight` stands for, read from its blocks alone."""
    if weight.format == "q4_1":
        return dequantize_q4_1(weight.qs, weight.scales)
    if weight.format == "q8_0":
        return dequantize_q8_0(weight.qs, weight.scales)
    raise ValueError(f"block format must be 'q4_1' or 'q8_0', got {weight.format!r}")


def block_linear(x: torch.Tensor, weight: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for W held as GGUF blocks: dequantize, then `linear`."""
    return linear(x, dequantize(weight), bias)
