"""The torch backend: every kernel in plain torch ops, tuned for a CPU.

This is how the engine runs on a CPU (and on CUDA when asked for `backend="torch"`). It is fast
rather than plain: oneDNN's packed GEMM, the GGUF block GEMM of `cpu_blocks`, views that store
K and V in one copy, per-step plans kept in `scratch`. Its functions define the signatures the
Triton kernels (`triton_ops`) share; what they must compute is `naive`'s, and the tests hold both
implementations against it (tests/test_kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_blocks

__all__ = ["linear", "gate_up_silu", "rms_norm", "rope", "rope_store_kv", "silu_and_mul", "store_kv", "paged_attention",
           "rope_store_attention"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b. A weight packed for oneDNN (`is_mkldnn`, CPU) goes through oneDNN's GEMM; one
    held as GGUF blocks (`cpu_blocks.BlockWeight`) through the block GEMM for few rows."""
    if isinstance(weight, cpu_blocks.BlockWeight):
        if x.dim() == 2 and x.shape[0] <= weight.max_rows and x.dtype == torch.float32 and out is None:
            return cpu_blocks.linear(x, weight, bias)
        weight = weight.dense
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
        # The CPU path, in few torch ops: after a GEMM has streamed megabytes of weights through
        # the caches each op starts cold (tens of us), and F.rms_norm is eight of them inside.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        # a 0-dim CPU tensor broadcasts for free on a CPU; on a GPU the eps must live on the device
        eps_t = torch.tensor(eps, dtype=x.dtype) if x.device.type == "cpu" else torch.full_like(norm, eps)
        scale = torch.addcmul(eps_t, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
        return torch.mul(x, scale).mul_(weight), residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotary embedding (rotate-half / NeoX layout) applied in place.

    q: [T, Hq, D], k: [T, Hk, D], positions: [T] int, cos_sin: [max_pos, D] fp32
    holding cos in the first D/2 columns and sin in the last D/2.
    """
    _rotate(q, k, *_rope_rows(positions, cos_sin, None))


def _rope_rows(positions: torch.Tensor, cos_sin: torch.Tensor, scratch: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at each token's position, [T, 1, D/2] each: the same for every layer of a step."""
    if scratch is not None and "rope_rows" in scratch:
        return scratch["rope_rows"]
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions.long())[:, None, :]
    rows = cs[..., :half], cs[..., half:]
    if scratch is not None:
        scratch["rope_rows"] = rows
    return rows


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = q.shape[-1] // 2
    for t in _adjacent_heads(q, k):
        x1, x2 = t[..., :half], t[..., half:]
        f1, f2 = x1.float(), x2.float()  # the same storage when t is fp32: compute both halves first
        first = torch.addcmul(f1 * cos, f2, sin, value=-1)  # fewer ops: on a CPU each costs ~5 us
        second = torch.addcmul(f2 * cos, f1, sin)
        x1.copy_(first)
        x2.copy_(second)


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q and k as one [T, Hq + Hk, D] view) when k's heads follow q's in memory, as they do in
    the model's qkv rows, else (q, k): one pass of six small ops instead of two on a CPU."""
    if _heads_follow(q, k):
        return (q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride()),)
    return q, k


def _heads_follow(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do b's heads start right after a's in each row ([T, H, D] views of one qkv tensor)?"""
    return (a.dim() == b.dim() == 3 and a.stride() == b.stride() and a.stride(2) == 1
            and a.stride(1) == a.shape[2] and a.dtype == b.dtype and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() - a.storage_offset() == a.shape[1] * a.shape[2])


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, scratch: dict | None = None) -> None:
    """`rope` on q and k in place, then `store_kv` of the rotated k and v: what attention needs
    before it runs, as one operation so a GPU can do it in one kernel.

    `scratch` (see the package docstring): the cos/sin rows and the cache slots are derived
    once per step and reused by every layer.
    """
    _rotate(q, k, *_rope_rows(positions, cos_sin, scratch))
    _store(k, v, k_cache, v_cache, *_store_slots(slot_mapping, scratch))


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
    _store(k, v, k_cache, v_cache, *_store_slots(slot_mapping, None))


def _store_slots(slot_mapping: torch.Tensor, scratch: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots to write and, when some tokens are padding (slot -1), which tokens to keep."""
    if scratch is not None and "store_slots" in scratch:
        return scratch["store_slots"]
    slots, keep = slot_mapping.long(), None
    if slots.numel() and bool((slots < 0).any()):
        keep = slots >= 0
        slots = slots[keep]
    if scratch is not None:
        scratch["store_slots"] = slots, keep
    return slots, keep


def _store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slots: torch.Tensor, keep: torch.Tensor | None) -> None:
    if keep is not None:  # padding tokens: store the rest
        k, v = k[keep], v[keep]
    planes, pair = _kv_planes(k_cache, v_cache), _stacked(k, v)
    if planes is not None and pair is not None and k.dtype == k_cache.dtype:  # both in one copy
        planes.flatten(1, 2).index_copy_(1, slots, pair)
        return
    k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
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
    scratch: dict | None = None,
) -> torch.Tensor:
    """Causal attention for a ragged batch whose K/V live in paged blocks.

    q: [T, Hq, D] — request i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are
    the *last* q_len tokens of its seq_lens[i]-token context (already stored in the
    cache). block_tables: [B, max_blocks] int, entries past the used blocks ignored.
    `scratch`: see the package docstring. Returns [T, Hq, D].
    """
    if max_seqlen_q == 1:
        return _decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, max_seqlen_k, scratch)
    outs = []
    for start, end, seq_len, blocks, mask in _prefill_plan(cu_seqlens_q, seq_lens, block_tables, k_cache.shape[1],
                                                           k_cache.shape[0], scratch):
        k_i, v_i = (t.flatten(0, 1)[:seq_len].transpose(0, 1).to(q.dtype)
                    for t in _gather_kv_blocks(k_cache, v_cache, blocks))
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k_i, v_i, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        outs.append(o.transpose(0, 1))
    out = torch.cat(outs) if outs else q[:0]
    if out.shape[0] < q.shape[0]:  # rows past the last request (padding) belong to nobody
        out = torch.cat((out, torch.zeros_like(q[out.shape[0]:])))
    return out


def rope_store_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor, scale: float, max_seqlen_q: int, max_seqlen_k: int,
                         scratch: dict | None = None) -> torch.Tensor:
    """A layer's attention from its projected q, k, v: `rope_store_kv`, then `paged_attention`.
    One operation, so that a GPU can do a decode step's in one kernel."""
    rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, scratch)
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, max_seqlen_q,
                           max_seqlen_k, scratch)


def _prefill_plan(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                  num_blocks: int, scratch: dict | None) -> list[tuple]:
    """Per request with rows this step: (first row, end row, context length, its blocks, causal mask
    or None), the same for every layer of the step."""
    if scratch is not None and "prefill_plan" in scratch:
        return scratch["prefill_plan"]
    plan, starts = [], cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].clamp(0, num_blocks - 1)
        # the rows are the last q_len of seq_len positions: row r sees keys 0 .. seq_len - q_len + r
        mask = None if q_len == 1 else torch.ones(q_len, seq_len, dtype=torch.bool,
                                                 device=seq_lens.device).tril_(seq_len - q_len)
        plan.append((starts[i], starts[i + 1], seq_len, blocks, mask))
    if scratch is not None:
        scratch["prefill_plan"] = plan
    return plan


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_k: int,
    scratch: dict | None = None,
) -> torch.Tensor:
    """One query per request: gather whole blocks into one padded batch, one SDPA call.

    A KV head's GQA group of query heads rides in SDPA's query-length dimension (q viewed as
    [B, Hk, group, D]) with an additive mask, instead of `enable_gqa` and a boolean mask: the
    same numbers, and on a 2-core CPU 150 instead of 235 us a layer at batch 8. The gather
    index and the mask depend on the step only, so `scratch` keeps them for the next layers
    (inside the engine on 2 cores they had cost 80 of a layer's 280 us).
    """
    batch, block_size = q.shape[0], k_cache.shape[1]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    n_blocks = -(-max_seqlen_k // block_size)
    length = n_blocks * block_size
    blocks, mask = _decode_plan(seq_lens, block_tables, n_blocks, block_size, k_cache.shape[0], q.dtype, scratch)
    k, v = (t.view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
            for t in _gather_kv_blocks(k_cache, v_cache, blocks))
    grouped = q.reshape(batch, num_kv_heads, q.shape[1] // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(grouped, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    return o.reshape(batch, q.shape[1], head_dim)


def _decode_plan(seq_lens: torch.Tensor, block_tables: torch.Tensor, n_blocks: int, block_size: int,
                 num_blocks: int, dtype: torch.dtype, scratch: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat block index to gather and the additive mask (-inf past each context's end)."""
    if scratch is not None and "decode_plan" in scratch:
        return scratch["decode_plan"]
    blocks = block_tables[:, :n_blocks].clamp(0, num_blocks - 1).flatten()  # unused entries may be garbage
    keys = torch.arange(n_blocks * block_size, device=seq_lens.device)
    padding = keys[None, None, None, :] >= seq_lens[:, None, None, None]
    mask = torch.zeros(padding.shape, dtype=dtype, device=seq_lens.device).masked_fill_(padding, float("-inf"))
    if scratch is not None:
        scratch["decode_plan"] = blocks, mask
    return blocks, mask


def _gather_kv_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor,
                      blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache[blocks], v_cache[blocks]: one copy for both when they are two planes of one tensor
    (the engine's cache is [layers, 2, blocks, ...]), each op costing tens of us on a CPU."""
    planes = _kv_planes(k_cache, v_cache)
    if planes is None:
        return _gather_blocks(k_cache, blocks), _gather_blocks(v_cache, blocks)
    rows = planes.flatten(2).index_select(1, blocks)
    return rows[0].view(blocks.shape[0], *k_cache.shape[1:]), rows[1].view(blocks.shape[0], *k_cache.shape[1:])


def _stacked(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """[2, *k.shape] over the same memory when v's heads follow k's (k and v side by side in the
    model's qkv rows), else None."""
    if k.shape != v.shape or not _heads_follow(k, v):
        return None
    return k.as_strided((2, *k.shape), (k.shape[1] * k.shape[2], *k.stride()))


def _kv_planes(k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor | None:
    """[2, *k_cache.shape] over the same memory if v_cache is k_cache's shape one fixed step further
    into the same storage, both contiguous; else None."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
            and k_cache.dtype == v_cache.dtype and k_cache.device == v_cache.device
            and k_cache.untyped_storage().data_ptr() == v_cache.untyped_storage().data_ptr()):
        return None
    step = v_cache.storage_offset() - k_cache.storage_offset()
    if step < k_cache.numel():
        return None  # overlapping or reversed: not two planes
    return k_cache.as_strided((2, *k_cache.shape), (step, *k_cache.stride()))


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] for a [num_blocks, block_size, Hk, D] cache, as whole-block row copies.

    On a CPU, `index_select` along dim 0 of the 4-d cache walks element by element (and with two
    OpenMP threads slower still: 430 us for 48 blocks of 3 KV heads on the 2-core CI machine);
    the same call on a 2-d view of the cache copies each block as one row: 24 us.
    """
    rows = cache.flatten(1).index_select(0, blocks)
    return rows.view(blocks.shape[0], *cache.shape[1:])
