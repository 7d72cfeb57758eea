"""CUDA graphs for whole steps: decode-only steps, and prefill or mixed steps.

A step of a small model is hundreds of tiny kernel launches; replaying a
captured graph turns them into one launch. Graphs need fixed shapes and fixed
addresses, so each family owns one int64 buffer of static inputs: a step is
staged into a pinned mirror of its layout (`stage`), copied to the device in one
H2D copy, moved into place with one device copy on the compute stream (`load`),
then replayed (`replay`). The graph itself begins by gathering the carried-over
tokens from the previous step's samples and ends with every row's greedy token,
so a greedy step launches nothing else. Padding
tokens get slot -1 (their K/V are written nowhere) and read block 0 (never
used). Logits of padding rows are computed and ignored.

* `DecodeGraphs`: one token per request, one graph per padded batch size.
* `MixedGraphs`: prefill chunks and decodes together, one graph per padded
  token count. Eagerly, such a step is ~300 Python-launched kernels, 10-25 ms
  of host time on the lent H100's host for 2-3 ms of GPU work.

Attention is captured with a bound on the context (`max_seqlen_k`), which only
decides how the Triton kernel splits the keys, never what it computes. Long
contexts at small batch need the split (one program per KV head and request
cannot keep the memory busy); short ones lose by it (each piece reads a tile
or two and a merge kernel follows). So every bucket is captured twice: for
contexts under `SHORT_CONTEXT` and for any context up to `max_model_len`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from .models import AttentionContext

if TYPE_CHECKING:
    import numpy as np

    from .runner import ModelRunner, StepInputs
    from .scheduler import Batch

log = logging.getLogger(__name__)

SHORT_CONTEXT = 511  # the split heuristic never splits decode keys below 512


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8, 16, 24, 32) if s < max_batch]
    sizes += list(range(48, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def token_buckets(token_budget: int, smallest: int = 64) -> list[int]:
    """Padded token counts of mixed steps: 64, 96, 128, 192, ... (never more than 1.5x
    the real count), up to the budget."""
    sizes, n = set(), smallest
    while n < token_budget:
        sizes |= {n, n * 3 // 2}
        n *= 2
    return sorted({x for x in sizes if x < token_budget} | {token_budget})


class _StepGraphs:
    """What both families share: the static buffer, the capture loop, load and replay."""

    kind = ""

    def __init__(self, runner: "ModelRunner", numel: int, keys: list[tuple[int, int]], rows: int) -> None:
        self.runner = runner
        # Every graph of the family writes its logits (model dtype) into this one buffer: a step's
        # logits are read on the compute stream before the next replay, so they never collide.
        model = runner.model
        vocab = (model.embed_tokens if model.lm_head is None else model.lm_head).weight.shape[0]
        self.out = torch.empty((rows, vocab), dtype=model.embed_tokens.weight.dtype, device=runner.device)
        self.width = runner.max_blocks
        self.numel = numel
        self.static = torch.zeros(numel, dtype=torch.int64, device=runner.device)
        self.keys = keys  # one graph each, captured in this order (largest first)
        self.max_values = torch.empty(rows, dtype=self.out.dtype, device=runner.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        self.replays: Counter[tuple[int, int]] = Counter()

    def _views(self, top: int, names: tuple[str, ...]) -> None:
        """Carve `top` entries per name off the front of the static buffer."""
        for i, name in enumerate(names):
            setattr(self, name, self.static[i * top : (i + 1) * top])

    def load(self, staged: torch.Tensor, numel: int) -> None:
        """On the compute stream: the staged step into the static inputs."""
        self.static[:numel].copy_(staged[:numel])

    def carry_in(self, rows: int) -> None:
        """The first nodes of every graph: tokens of rows staged as carried (carry >= 0) come
        from the step before, which left its sampled tokens in the runner's `last_sampled`."""
        source, carry = self.runner.last_sampled, self.carry[:rows]
        picked = source[carry.clamp(0, source.numel() - 1)]
        self.ids[:rows].copy_(torch.where(carry >= 0, picked, self.ids[:rows]))

    def _argmax_out(self, logits: torch.Tensor) -> torch.Tensor:
        """The last nodes: every row's greedy token, into `last_sampled` (the next step carries
        from there; the sampler overwrites the rows that do not sample greedily)."""
        rows = logits.shape[0]
        torch.max(logits, dim=-1, out=(self.max_values[:rows], self.runner.last_sampled[:rows]))
        return logits

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> tuple | None:
        """Capture every key, largest first so the smaller ones reuse its memory pool (shared
        with the other family: steps never overlap); return the pool."""
        device = self.runner.device
        start, before = time.perf_counter(), torch.cuda.memory_allocated(device)
        stream = torch.cuda.Stream(device)
        for key in self.keys:
            self._capture_layout(key)
            with torch.cuda.stream(stream):
                self._forward(key)  # warm-up: compiles the Triton kernels outside capture
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._forward(key)  # its logits land in self.out
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize(device)
        self.memory_bytes = torch.cuda.memory_allocated(device) - before + self.out.numel() * self.out.element_size()
        log.info("captured %d %s CUDA graphs %s in %.1f s, %.0f MiB", len(self.graphs), self.kind,
                 sorted(self.graphs), time.perf_counter() - start, self.memory_bytes / 2**20)
        return pool

    def _capture_layout(self, key: tuple[int, int]) -> None:
        """Valid inputs for capturing `key` (the graph keeps the addresses, not the values)."""

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, key: tuple[int, int], rows: int) -> torch.Tensor:
        self.graphs[key].replay()
        self.replays[key] += 1
        return self.out[:rows]


class DecodeGraphs(_StepGraphs):
    """Decode graphs per (context bound, padded batch size).

    Layout (top = the largest bucket, W = max blocks per request): ids, positions,
    slots, carry and seq_lens, `top` entries each, then the block tables [top, W].
    """

    kind = "decode"

    def __init__(self, runner: "ModelRunner", max_batch: int) -> None:
        self.sizes = bucket_sizes(max_batch)
        top = self.top = self.sizes[-1]
        self.context_bounds = sorted({min(SHORT_CONTEXT, runner.max_model_len), runner.max_model_len})
        keys = [(bound, size) for bound in reversed(self.context_bounds) for size in reversed(self.sizes)]
        super().__init__(runner, 5 * top + top * runner.max_blocks, keys, top)
        self._views(top, ("ids", "positions", "slot_mapping", "carry", "seq_lens"))
        self.tables = self.static[5 * top :].view(top, self.width)
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=runner.device)

    def can_run(self, batch: "Batch", T: int, B: int, S: int) -> bool:
        return bool(self.graphs) and T == B == S and B <= self.top and all(i.kind == "decode" for i in batch.items)

    def bucket(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    def stage(self, host: "np.ndarray", ids: "np.ndarray", positions: "np.ndarray", slots: "np.ndarray",
              carry: "np.ndarray", cu: "np.ndarray", seq_lens: "np.ndarray", logits_idx: "np.ndarray",
              tables: "np.ndarray") -> int:
        """Write a B-request decode step, padded to its bucket, into a pinned mirror of the
        static layout; return how many leading elements to copy. (`cu` and `logits_idx` are
        implied: one token per request, every one sampled.)"""
        top, B = self.top, len(ids)
        size = self.bucket(B)
        for i, (values, pad) in enumerate(((ids, 0), (positions, 0), (slots, -1), (carry, -1), (seq_lens, 1))):
            host[i * top : i * top + B] = values
            host[i * top + B : i * top + size] = pad  # padding rows: no KV slot, a 1-token context
        view = host[5 * top : 5 * top + size * self.width].reshape(size, self.width)
        view[:B, : tables.shape[1]] = tables
        view[B:, 0] = 0
        return 5 * top + size * self.width

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        bound, size = key
        ctx = AttentionContext(
            cu_seqlens_q=self.cu[: size + 1], seq_lens=self.seq_lens[:size], block_tables=self.tables[:size],
            slot_mapping=self.slot_mapping[:size], max_seqlen_q=1, max_seqlen_k=bound,
            kv_caches=self.runner.kv_caches,
        )
        model = self.runner.model
        self.carry_in(size)
        return self._argmax_out(model.compute_logits(model(self.ids[:size], self.positions[:size], ctx),
                                                     out=self.out[:size]))

    def replay(self, T: int, B: int, S: int, max_context: int) -> torch.Tensor:
        """Replay the graph for a loaded step of B requests whose longest context is
        `max_context` tokens; its logits."""
        return self._run((next(b for b in self.context_bounds if b >= max_context), self.bucket(B)), B)


class MixedGraphs(_StepGraphs):
    """Prefill / mixed graphs per padded token count, for up to `max_batch` requests.

    Every graph sees `max_batch + 1` sequences: the step's B requests, one padding
    sequence holding the padding tokens (a causal context of its own, stored
    nowhere), then empty ones. Layout (Tm = the largest bucket, P = max_batch + 1):
    ids, positions, slots, carry [Tm each], cu_seqlens [P + 1], seq_lens [P],
    logits indices [P], block tables [P, W].
    """

    kind = "mixed"

    def __init__(self, runner: "ModelRunner", max_batch: int, token_budget: int) -> None:
        # a capture puts every token in one sequence, whose blocks must fit one table row
        self.sizes = token_buckets(min(token_budget, runner.max_model_len))
        tm, p = self.sizes[-1], max_batch + 1
        self.tm, self.p = tm, p
        self.offsets = {"cu": 4 * tm, "seq_lens": 4 * tm + p + 1, "logits_idx": 4 * tm + 2 * p + 1,
                        "tables": 4 * tm + 3 * p + 1}
        super().__init__(runner, self.offsets["tables"] + p * runner.max_blocks,
                         [(size, 0) for size in reversed(self.sizes)], p)
        self._views(tm, ("ids", "positions", "slot_mapping", "carry"))
        o = self.offsets
        self.cu, self.seq_lens = self.static[o["cu"] : o["seq_lens"]], self.static[o["seq_lens"] : o["logits_idx"]]
        self.logits_idx = self.static[o["logits_idx"] : o["tables"]]
        self.tables = self.static[o["tables"] :].view(p, self.width)
        self.slot_mapping.fill_(-1)

    def can_run(self, batch: "Batch", T: int, B: int, S: int) -> bool:
        return bool(self.graphs) and T <= self.tm and B < self.p

    def bucket(self, tokens: int) -> int:
        return next(s for s in self.sizes if s >= tokens)

    def stage(self, host: "np.ndarray", ids: "np.ndarray", positions: "np.ndarray", slots: "np.ndarray",
              carry: "np.ndarray", cu: "np.ndarray", seq_lens: "np.ndarray", logits_idx: "np.ndarray",
              tables: "np.ndarray") -> int:
        """Write a step of T tokens over B requests, padded to its token bucket, into a pinned
        mirror of the static layout; return how many leading elements to copy."""
        tm, T, B, S = self.tm, len(ids), len(seq_lens), len(logits_idx)
        size, o = self.bucket(T), self.offsets
        for i, (values, pad) in enumerate(((ids, 0), (positions, 0), (slots, -1), (carry, -1))):
            host[i * tm : i * tm + T] = values
            host[i * tm + T : i * tm + size] = pad
        host[o["cu"] : o["cu"] + B + 1] = cu
        host[o["cu"] + B + 1 : o["seq_lens"]] = size  # the padding sequence ends the step; the rest are empty
        host[o["seq_lens"] : o["seq_lens"] + B] = seq_lens
        host[o["seq_lens"] + B] = size - T
        host[o["seq_lens"] + B + 1 : o["logits_idx"]] = 0
        host[o["logits_idx"] : o["logits_idx"] + S] = logits_idx
        host[o["logits_idx"] + S : o["tables"]] = 0
        view = host[o["tables"] : o["tables"] + (B + 1) * self.width].reshape(B + 1, self.width)
        view[:B, : tables.shape[1]] = tables
        view[B, : -(-(size - T) // self.runner.block_size)] = 0  # the padding sequence reads block 0
        return o["tables"] + (B + 1) * self.width

    def _capture_layout(self, key: tuple[int, int]) -> None:
        """One sequence owning all `size` tokens, as its own context, stored nowhere."""
        size = key[0]
        self.cu.fill_(size)
        self.cu[0] = 0
        self.seq_lens.zero_()
        self.seq_lens[0] = size
        self.tables[0].zero_()

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        size = key[0]
        ctx = AttentionContext(
            cu_seqlens_q=self.cu, seq_lens=self.seq_lens, block_tables=self.tables,
            slot_mapping=self.slot_mapping[:size], max_seqlen_q=size, max_seqlen_k=self.runner.max_model_len,
            kv_caches=self.runner.kv_caches,
        )
        model = self.runner.model
        self.carry_in(size)
        hidden = model(self.ids[:size], self.positions[:size], ctx)
        return self._argmax_out(model.compute_logits(hidden[self.logits_idx], out=self.out[: self.p]))

    def replay(self, T: int, B: int, S: int, max_context: int) -> torch.Tensor:
        """Replay the graph for a loaded step of T tokens; the logits of its S sampling rows."""
        return self._run((self.bucket(T), 0), S)
