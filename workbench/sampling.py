"""Sampler: logits of the sampling rows to one token id each, the same whatever the batch.

A row's draw depends only on its request's seed, the index of the token being
generated and its own logits row: never on which rows share the batch or in
what order. The noise is counter-based — a 32-bit integer hash of
(seed, token index, vocabulary index), computed with plain tensor ops — and a
token is picked by Gumbel-max: the argmax of logits / T plus Gumbel noise over
the tokens that top-k and top-p allow, which is an exact draw from
softmax(logits / T) restricted to that set. There is no generator state, no
host sync and no Python loop over rows, so `sample_rows` can run on any
device (and, later, inside a CUDA graph) from per-row tensors.

Greedy rows (temperature 0 or top_k 1) take the argmax. The warpers follow
transformers' order: temperature, then top-k, then top-p on what top-k kept;
top_p = 1 cuts nothing (no cumulative sum, so no rounding can cut the tail).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .request import MAX_SEED, SamplingParams

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows
_M1, _M2, _M3 = 0x7FEB352D, 0x5BD1E995, 0x27D4EB2D
_VOCAB_SALT, _SEED_SALT, _COUNTER_SALT = 0x165667B1, 0x2C1B3C6D, 0x61C88647


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of int64 values in [0, 2**32), in int64 arithmetic kept below 2**63."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M3) & _MASK32
    return x ^ (x >> 15)


def row_keys(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from its seed (0 .. 2**63-1) and the index of the token it generates."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = _mix(lo ^ _SEED_SALT)
    key = _mix(key ^ hi)
    return _mix(key ^ ((counter & _MASK32) + _COUNTER_SALT) & _MASK32)


def vocab_hashes(vocab: int, device: torch.device | str) -> torch.Tensor:
    """[vocab] int64: each vocabulary index hashed once (a sampler keeps them between steps)."""
    return _mix(torch.arange(vocab, device=device, dtype=torch.int64) + _VOCAB_SALT)


def uniforms(seed: torch.Tensor, counter: torch.Tensor, vocab: int,
             vocab_hash: torch.Tensor | None = None) -> torch.Tensor:
    """[N, vocab] float32 uniforms in (0, 1), each a pure function of (seed, counter, vocab index).

    The row key and the vocabulary hash are each fully mixed; their XOR then takes two more
    xorshift-multiply rounds, in place (the [N, vocab] int64 work is what a sampling step pays)."""
    if vocab_hash is None:
        vocab_hash = vocab_hashes(vocab, seed.device)
    bits = row_keys(seed, counter)[:, None] ^ vocab_hash[None, :]
    tmp = torch.empty_like(bits)
    for multiplier in (_M1, _M2):
        torch.bitwise_right_shift(bits, 16, out=tmp)
        bits.bitwise_xor_(tmp).mul_(multiplier).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(bits, 15, out=tmp)
    bits.bitwise_xor_(tmp)
    torch.bitwise_right_shift(bits, 8, out=tmp)  # the top 24 of 32 bits: exact in float32
    return tmp.to(torch.float32).add_(0.5).mul_(1.0 / 2**24)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seed: torch.Tensor, counter: torch.Tensor, *, use_top_k: bool = True,
                use_top_p: bool = True, vocab_hash: torch.Tensor | None = None) -> torch.Tensor:
    """logits [N, V]; per-row temperature, top_k (0 = off), top_p, seed, counter [N] -> token ids [N].

    `use_top_k` / `use_top_p` = False skip a warper for every row (a host-side shortcut when no row
    uses it; a graph would pass True). Rows with temperature 0 or top_k 1 give the argmax.
    `vocab_hash` is `vocab_hashes(V, device)`, if the caller keeps it.
    """
    x = logits.float()
    greedy = (temperature <= 0) | (top_k == 1)
    scaled = x / torch.where(greedy, torch.ones_like(temperature), temperature).to(x.dtype)[:, None]
    allowed = allowed_tokens(scaled, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
    noise = uniforms(seed, counter, scaled.shape[-1], vocab_hash).log_().neg_().log_()  # -Gumbel
    drawn = (scaled - noise).masked_fill_(~allowed, float("-inf")).max(dim=-1).indices
    return torch.where(greedy, x.max(dim=-1).indices, drawn)


def allowed_tokens(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, *, use_top_k: bool = True,
                   use_top_p: bool = True) -> torch.Tensor:
    """[N, V] bool: the tokens top-k, then top-p (on what top-k kept), let each row draw from.

    Top-p keeps the smallest prefix of the sorted tokens whose mass reaches top_p (at least one);
    a row with top_p >= 1 keeps everything, whatever the rounding of the cumulative sum. Tokens
    tied with the last kept one are kept too (as transformers' warpers do)."""
    allowed = torch.ones_like(scaled, dtype=torch.bool)
    if not (use_top_k or use_top_p):
        return allowed
    ordered = scaled.sort(dim=-1, descending=True).values
    vocab = scaled.shape[-1]
    if use_top_k:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        ordered = ordered.masked_fill(torch.arange(vocab, device=scaled.device)[None, :] >= k[:, None], float("-inf"))
        allowed &= scaled >= ordered.gather(1, (k - 1)[:, None])
    if use_top_p:
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the better tokens
        keep = (before < top_p.to(probs.dtype)[:, None]) | (top_p >= 1)[:, None]
        keep[:, 0] = True
        last = keep.sum(dim=-1, keepdim=True) - 1  # keep is a prefix of the sorted order
        allowed &= scaled >= ordered.gather(1, last)
    return allowed


def derived_seed(engine_seed: int, number: int) -> int:
    """The seed of an unseeded request: a function of the engine's seed and the request's number."""
    digest = hashlib.blake2b(f"{engine_seed}:{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


class Sampler:
    """Draws the tokens of the rows that do not sample greedily, from per-row parameters.

    Keeps no per-request state: only the vocabulary hashes, made on the first sampling step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._vocab_hash: torch.Tensor | None = None

    def row_tensors(self, params: Sequence[SamplingParams], seeds: Sequence[int],
                    counters: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """temperature, top_k, top_p, seed, counter of each row, on the sampler's device. The counter
        is the index (among its request's generated tokens) of the token the row samples."""
        dev = self.device
        return (torch.tensor([float(p.temperature) for p in params], dtype=torch.float32, device=dev),
                torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
                torch.tensor([float(p.top_p) for p in params], dtype=torch.float32, device=dev),
                torch.tensor(list(seeds), dtype=torch.int64, device=dev),
                torch.tensor(list(counters), dtype=torch.int64, device=dev))

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
               counters: Sequence[int]) -> torch.Tensor:
        """logits [N, V] -> token ids [N] (on the logits' device), row k drawn with params[k]."""
        temperature, top_k, top_p, seed, counter = self.row_tensors(params, seeds, counters)
        vocab = logits.shape[-1]
        if self._vocab_hash is None or self._vocab_hash.numel() != vocab or self._vocab_hash.device != logits.device:
            self._vocab_hash = vocab_hashes(vocab, logits.device)
        return sample_rows(logits, temperature, top_k, top_p, seed, counter,
                           use_top_k=any(p.top_k > 0 for p in params), use_top_p=any(p.top_p < 1 for p in params),
                           vocab_hash=self._vocab_hash)
