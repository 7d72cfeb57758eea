"""CUDA graphs for whole steps: decode-only steps, and prefill or mixed steps.

A step of a small model is hundreds of tiny kernel launches; replaying a
captured graph turns them into one launch. Graphs need fixed shapes and fixed
addresses, so each family owns one int64 buffer of static inputs, carved into
named views (`carve`) that form the step's `StepTensors`. The contract, per step:

* `prepare(step, host)`: write the step, padded to its bucket, into a pinned
  mirror of the static layout; return the graph's key and how much to copy.
  `prepare_run` stages a decode run's steps one after another (each later
  step only its per-row vectors: its block tables are the first step's).
* `load(staged, numel)`: on the compute stream, the staged copy into place.
* `replay(key)`: run the captured step; its logits and greedy tokens.

`capture(step_fn, kv_caches)` records `step_fn` (the runner's greedy step:
gather the input ids from the request table, forward, logits, argmax, write the
tokens back to the table) once per key. The family knows nothing of the runner.
Padding tokens get slot -1 (their K/V are written nowhere) and read block 0
(never used); padding rows write their token to the table's scratch cell.

* `DecodeGraphs`: one token per request, one graph per padded batch size.
* `MixedGraphs`: prefill chunks and decodes together, one graph per padded
  token count. Eagerly, such a step is ~300 Python-launched kernels, 10-25 ms
  of host time on the lent H100's host for 2-3 ms of GPU work.

Attention is captured with a bound on the context (`max_seqlen_k`), which only
decides how the Triton kernel splits the keys, never what it computes. Long
contexts at small batch need the split (one program per KV head and request
cannot keep the memory busy); short ones lose by it (each piece reads a tile
or two and a merge kernel follows). So every decode bucket is captured twice:
for contexts under `SHORT_CONTEXT` and for any context up to `max_model_len`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Callable, Mapping

import numpy as np
import torch

from .models import AttentionContext
from .step_inputs import HostStep, StepTensors

log = logging.getLogger(__name__)

SHORT_CONTEXT = 511  # the split heuristic never splits decode keys below 512
KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
StepFn = Callable[[StepTensors, torch.Tensor, torch.Tensor], None]  # (inputs, logits out, tokens out)
Key = tuple[int, int]
Load = tuple[Key, int, int]  # a staged step: its graph, where it starts in the staged buffer, its length


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


def carve(buffer: np.ndarray | torch.Tensor, layout: Mapping[str, tuple[int, ...]]) -> dict:
    """Named views of consecutive pieces of a flat buffer, in the layout's order and shapes."""
    views, offset = {}, 0
    for name, shape in layout.items():
        n = math.prod(shape)
        piece = buffer[offset : offset + n]
        views[name] = piece.reshape(shape) if len(shape) > 1 else piece
        offset += n
    return views


def layout_size(layout: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in layout.values())


class _GraphFamily:
    """What both families share: the static buffer and its views, capture, load and replay."""

    kind = ""

    def __init__(self, layout: dict[str, tuple[int, ...]], keys: list[Key], rows: int, vocab: int,
                 logits_dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.numel = layout_size(layout)
        self.static = torch.zeros(self.numel, dtype=torch.int64, device=device)
        self.views: dict[str, torch.Tensor] = carve(self.static, layout)
        self.keys = keys  # one graph each, captured in this order (largest first)
        # Every graph of the family writes its logits and greedy tokens here: a step's are read on
        # the compute stream before the next replay, so they never collide.
        self.logits = torch.empty((rows, vocab), dtype=logits_dtype, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        self.replays: Counter[Key] = Counter()

    def host_views(self, host: np.ndarray) -> dict[str, np.ndarray]:
        """The same named views over a host mirror of the static buffer."""
        return carve(host, self.layout)

    def prepare_run(self, steps: list[HostStep], host: np.ndarray, scratch: int) -> list[Load]:
        """Every step of a plan, one after the other in the host mirror: (key, offset, numel) each.
        A decode run's later steps stage only what changes (`prepare_next`)."""
        loads, offset = [], 0
        for j, step in enumerate(steps):
            key, numel = (self.prepare(step, host[offset:], scratch) if j == 0
                          else self.prepare_next(step, host[offset:], scratch))
            loads.append((key, offset, numel))
            offset += numel
        return loads

    def staging_size(self, steps: int) -> int:
        """Host mirror elements `prepare_run` needs for a plan of `steps` steps (a later step of a run
        stages only its vectors, but its views are carved from a whole layout's worth after its offset)."""
        return self.numel if steps == 1 else self.numel * (steps + 1)

    def prepare(self, step: HostStep, host: np.ndarray, scratch: int) -> tuple[Key, int]:
        raise NotImplementedError

    def prepare_next(self, step: HostStep, host: np.ndarray, scratch: int) -> tuple[Key, int]:
        raise NotImplementedError(f"{self.kind} graphs run one step per plan")

    def load(self, staged: torch.Tensor, numel: int) -> None:
        """On the compute stream: the staged step into the static inputs."""
        self.static[:numel].copy_(staged[:numel])

    @torch.inference_mode()
    def capture(self, step_fn: StepFn, kv_caches: KVCaches, pool: tuple | None = None) -> tuple | None:
        """Capture every key, largest first so the smaller ones reuse its memory pool (shared
        with the other family: steps never overlap); return the pool."""
        device = self.static.device
        start, before = time.perf_counter(), torch.cuda.memory_allocated(device)
        stream = torch.cuda.Stream(device)
        for key in self.keys:
            self._capture_layout(key)
            inputs, rows = self.inputs(key, kv_caches), self.rows(key)
            with torch.cuda.stream(stream):
                step_fn(inputs, self.logits[:rows], self.tokens[:rows])  # warm-up: compiles the Triton kernels
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                step_fn(inputs, self.logits[:rows], self.tokens[:rows])
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize(device)
        self.memory_bytes = (torch.cuda.memory_allocated(device) - before
                             + self.logits.numel() * self.logits.element_size())
        log.info("captured %d %s CUDA graphs %s in %.1f s, %.0f MiB", len(self.graphs), self.kind,
                 sorted(self.graphs), time.perf_counter() - start, self.memory_bytes / 2**20)
        return pool

    def replay(self, key: Key, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the captured step; the logits and greedy tokens of its `samples` sampling rows."""
        self.graphs[key].replay()
        self.replays[key] += 1
        return self.logits[:samples], self.tokens[:samples]

    def _capture_layout(self, key: Key) -> None:
        """Valid inputs for capturing `key` (the graph keeps the addresses, not the values)."""

    def inputs(self, key: Key, kv_caches: KVCaches) -> StepTensors:
        raise NotImplementedError

    def rows(self, key: Key) -> int:
        raise NotImplementedError


class DecodeGraphs(_GraphFamily):
    """Decode graphs per (context bound, padded batch size): one token per request, each sampled."""

    kind = "decode"

    def __init__(self, max_batch: int, max_model_len: int, max_blocks: int, vocab: int,
                 logits_dtype: torch.dtype, device: torch.device) -> None:
        self.sizes = bucket_sizes(max_batch)
        top = self.top = self.sizes[-1]
        self.context_bounds = sorted({min(SHORT_CONTEXT, max_model_len), max_model_len})
        keys = [(bound, size) for bound in reversed(self.context_bounds) for size in reversed(self.sizes)]
        layout = {name: (top,) for name in ("host_ids", "table_index", "positions", "slots", "seq_lens",
                                            "out_index")}
        layout["tables"] = (top, max_blocks)
        super().__init__(layout, keys, top, vocab, logits_dtype, device)
        self.views["slots"].fill_(-1)
        self.views["seq_lens"].fill_(1)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=device)

    def can_run(self, step: HostStep) -> bool:
        return bool(self.graphs) and step.decode_only and step.num_seqs <= self.top

    def bucket(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    def prepare(self, step: HostStep, host: np.ndarray, scratch: int) -> tuple[Key, int]:
        """Write a B-request decode step, padded to its bucket, into the host mirror; return the
        graph's key and how many leading elements to copy."""
        key, v = self._write_rows(step, host, scratch)
        B, size, W = step.num_seqs, key[1], step.tables.shape[1]
        v["tables"][:B, :W] = step.tables
        v["tables"][B:size, 0] = 0
        return key, self.numel - (self.top - size) * v["tables"].shape[1]

    def prepare_next(self, step: HostStep, host: np.ndarray, scratch: int) -> tuple[Key, int]:
        """A later step of a decode run: only the per-row vectors (they come first in the layout);
        the block tables that the run's first step loaded stay in place."""
        key, v = self._write_rows(step, host, scratch)
        return key, self.numel - self.top * v["tables"].shape[1]

    def _write_rows(self, step: HostStep, host: np.ndarray, scratch: int) -> tuple[Key, dict[str, np.ndarray]]:
        B = step.num_seqs
        size = self.bucket(B)
        v = self.host_views(host)
        for name, values, pad in (("host_ids", step.host_ids, 0), ("table_index", step.table_index, 0),
                                  ("positions", step.positions, 0), ("slots", step.slots, -1),
                                  ("seq_lens", step.seq_lens, 1), ("out_index", step.out_index, scratch)):
            v[name][:B] = values
            v[name][B:size] = pad  # padding rows: no KV slot, a 1-token context, token to the scratch cell
        bound = next(b for b in self.context_bounds if b >= int(step.seq_lens.max()))
        return (bound, size), v

    def inputs(self, key: Key, kv_caches: KVCaches) -> StepTensors:
        bound, size = key
        v = self.views
        ctx = AttentionContext(cu_seqlens_q=self.cu[: size + 1], seq_lens=v["seq_lens"][:size],
                               block_tables=v["tables"][:size], slot_mapping=v["slots"][:size], max_seqlen_q=1,
                               max_seqlen_k=bound, kv_caches=kv_caches)
        return StepTensors(v["host_ids"][:size], v["table_index"][:size], v["positions"][:size], None,
                           v["out_index"][:size], ctx)

    def rows(self, key: Key) -> int:
        return key[1]


class MixedGraphs(_GraphFamily):
    """Prefill / mixed graphs per padded token count, for up to `max_batch` requests.

    Every graph sees `max_batch + 1` sequences: the step's B requests, one padding
    sequence holding the padding tokens (a causal context of its own, stored
    nowhere), then empty ones.
    """

    kind = "mixed"

    def __init__(self, max_batch: int, token_budget: int, max_model_len: int, max_blocks: int, block_size: int,
                 vocab: int, logits_dtype: torch.dtype, device: torch.device) -> None:
        # a capture puts every token in one sequence, whose blocks must fit one table row
        self.sizes = token_buckets(min(token_budget, max_model_len))
        tm, p = self.tm, self.p = self.sizes[-1], max_batch + 1
        self.max_model_len, self.block_size = max_model_len, block_size
        layout = {name: (tm,) for name in ("host_ids", "table_index", "positions", "slots")}
        layout |= {"cu": (p + 1,), "seq_lens": (p,), "logits_index": (p,), "out_index": (p,),
                   "tables": (p, max_blocks)}
        super().__init__(layout, [(size, 0) for size in reversed(self.sizes)], p, vocab, logits_dtype, device)
        self.views["slots"].fill_(-1)

    def can_run(self, step: HostStep) -> bool:
        return bool(self.graphs) and step.num_tokens <= self.tm and step.num_seqs < self.p

    def bucket(self, tokens: int) -> int:
        return next(s for s in self.sizes if s >= tokens)

    def prepare(self, step: HostStep, host: np.ndarray, scratch: int) -> tuple[Key, int]:
        """Write a step of T tokens over B requests, padded to its token bucket, into the host
        mirror; return the graph's key and how many leading elements to copy."""
        T, B, S = step.num_tokens, step.num_seqs, step.num_samples
        size = self.bucket(T)
        v = self.host_views(host)
        for name, values, pad in (("host_ids", step.host_ids, 0), ("table_index", step.table_index, 0),
                                  ("positions", step.positions, 0), ("slots", step.slots, -1)):
            v[name][:T] = values
            v[name][T:size] = pad
        v["cu"][: B + 1] = step.cu_seqlens
        v["cu"][B + 1 :] = size  # the padding sequence ends the step; the rest are empty
        v["seq_lens"][:B] = step.seq_lens
        v["seq_lens"][B] = size - T
        v["seq_lens"][B + 1 :] = 0
        v["logits_index"][:S], v["logits_index"][S:] = step.logits_index, 0
        v["out_index"][:S], v["out_index"][S:] = step.out_index, scratch
        W = step.tables.shape[1]
        v["tables"][:B, :W] = step.tables
        v["tables"][B, : -(-(size - T) // self.block_size)] = 0  # the padding sequence reads block 0
        return (size, 0), self.numel - (self.p - B - 1) * v["tables"].shape[1]

    def _capture_layout(self, key: Key) -> None:
        """One sequence owning all `size` tokens, as its own context, stored nowhere."""
        size, v = key[0], self.views
        v["cu"].fill_(size)
        v["cu"][0] = 0
        v["seq_lens"].zero_()
        v["seq_lens"][0] = size
        v["tables"][0].zero_()

    def inputs(self, key: Key, kv_caches: KVCaches) -> StepTensors:
        size, v = key[0], self.views
        ctx = AttentionContext(cu_seqlens_q=v["cu"], seq_lens=v["seq_lens"], block_tables=v["tables"],
                               slot_mapping=v["slots"][:size], max_seqlen_q=size, max_seqlen_k=self.max_model_len,
                               kv_caches=kv_caches)
        return StepTensors(v["host_ids"][:size], v["table_index"][:size], v["positions"][:size],
                           v["logits_index"], v["out_index"], ctx)

    def rows(self, key: Key) -> int:
        return self.p
