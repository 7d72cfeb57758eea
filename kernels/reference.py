"""Plain-torch reference implementations of every kernel.

These define the contract: each Triton kernel in this package has the same
signature and must agree with its reference within the dtype's tolerance.
They run anywhere torch runs, which is how the engine works on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear", "gate_up_silu", "rms_norm", "rope", "rope_store_kv", "silu_and_mul", "store_kv", "paged_attention"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b. A weight packed for oneDNN (`is_mkldnn`, CPU) goes through oneDNN's GEMM."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is None:
        return torch.matmul(x, weight.t(), out=out)
    return F.linear(x, weight, bias) if out is None else out.copy_(F.linear(x, weight, bias))


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(x W_gate^T) * (x W_up^T) for the stacked weight [W_gate; W_up]: the MLP's first half."""
    return silu_and_mul(linear(x, weight))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim, optionally fused with `x + residual`.

    Returns `(normed, new_residual)`; `new_residual` is `x + residual` (the
    stream the next layer adds to) or None when no residual was given.
    """
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps), residual  # one fused op (the CPU path)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotary embedding (rotate-half / NeoX layout) applied in place.

    q: [T, Hq, D], k: [T, Hk, D], positions: [T] int, cos_sin: [max_pos, D] fp32
    holding cos in the first D/2 columns and sin in the last D/2.
    """
    half = q.shape[-1] // 2
    cs = cos_sin.index_select(0, positions.long())[:, None, :]
    cos, sin = cs[..., :half], cs[..., half:]
    for t in (q, k):
        x1, x2 = t[..., :half], t[..., half:]
        f1, f2 = x1.float(), x2.float()  # the same storage when t is fp32: compute both halves first
        first = torch.addcmul(f1 * cos, f2, sin, value=-1)  # fewer ops: on a CPU each costs ~5 us
        second = torch.addcmul(f2 * cos, f1, sin)
        x1.copy_(first)
        x2.copy_(second)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """`rope` on q and k in place, then `store_kv` of the rotated k and v: what attention needs
    before it runs, as one operation so a GPU can do it in one kernel."""
    rope(q, k, positions, cos_sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V into its cache slot; slot -1 means skip.

    k, v: [T, Hk, D]; caches: [num_blocks, block_size, Hk, D]; slot = block * block_size + offset.
    """
    slots = slot_mapping.long()
    k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    if slots.numel() and bool((slots < 0).any()):  # padding tokens: keep the rest
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    k_flat.index_copy_(0, slots, k.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, v.to(v_cache.dtype))


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
) -> torch.Tensor:
    """Causal attention for a ragged batch whose K/V live in paged blocks.

    q: [T, Hq, D] — request i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are
    the *last* q_len tokens of its seq_lens[i]-token context (already stored in the
    cache). block_tables: [B, max_blocks] int, entries past the used blocks ignored.
    Returns [T, Hq, D].
    """
    if max_seqlen_q == 1:
        return _decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, max_seqlen_k)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_i = q[starts[i] : starts[i + 1]]
        q_len = q_i.shape[0]
        if q_len == 0:
            continue
        n_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :n_blocks].clamp(0, k_cache.shape[0] - 1)
        k_i = k_cache.index_select(0, blocks).flatten(0, 1)[:seq_len]
        v_i = v_cache.index_select(0, blocks).flatten(0, 1)[:seq_len]
        mask = None
        if q_len > 1:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(
            q_i.transpose(0, 1), k_i.transpose(0, 1).to(q.dtype), v_i.transpose(0, 1).to(q.dtype),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_k: int,
) -> torch.Tensor:
    """One query per request: gather whole blocks into one padded batch, one SDPA call.

    A KV head's GQA group of query heads rides in SDPA's query-length dimension (q viewed as
    [B, Hk, group, D]) with an additive mask, instead of `enable_gqa` and a boolean mask: the
    same numbers, and on a 2-core CPU 150 instead of 235 us a layer at batch 8.
    """
    batch, block_size = q.shape[0], k_cache.shape[1]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    n_blocks = -(-max_seqlen_k // block_size)
    blocks = block_tables[:, :n_blocks].clamp(0, k_cache.shape[0] - 1).flatten()  # unused entries may be garbage
    length = n_blocks * block_size
    k = k_cache.index_select(0, blocks).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    padding = torch.arange(length, device=q.device)[None, None, None, :] >= seq_lens[:, None, None, None]
    mask = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill_(padding, float("-inf"))
    grouped = q.reshape(batch, num_kv_heads, q.shape[1] // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(grouped, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    return o.reshape(batch, q.shape[1], head_dim)
