"""CUDA graphs for decode-only steps, one per padded batch size and context bound.

A decode step of a small model is hundreds of tiny kernel launches; replaying
a captured graph turns them into one launch. Graphs need fixed shapes and
fixed addresses, so each batch-size bucket owns static input buffers: the
step's inputs are copied in, padding rows get slot -1 (their K/V are written
nowhere) and a one-token context in block 0 (read, never used).

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

import numpy as np  # noqa: F401 - annotations
import torch

from .models import AttentionContext

if TYPE_CHECKING:
    from .runner import ModelRunner, StepInputs
    from .scheduler import Batch

log = logging.getLogger(__name__)

SHORT_CONTEXT = 511  # the split heuristic never splits decode keys below 512


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8, 16, 24, 32) if s < max_batch]
    sizes += list(range(48, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    """Decode graphs and their static inputs, which live in one int64 buffer.

    Layout (top = the largest bucket, W = max blocks per request): ids, positions,
    slots, carry and seq_lens, `top` entries each, then the block tables [top, W].
    A step is staged into a pinned mirror of that layout (`stage`), copied to the
    device in one H2D copy, and moved into place with one device copy on the
    compute stream (`load`), so the graph reads inputs no other step can touch.
    """

    def __init__(self, runner: "ModelRunner", max_batch: int) -> None:
        self.runner = runner
        self.sizes = bucket_sizes(max_batch)
        top, dev = self.sizes[-1], runner.device
        self.top, self.width = top, runner.max_blocks
        self.numel = 5 * top + top * self.width
        self.static = torch.zeros(self.numel, dtype=torch.int64, device=dev)
        self.ids, self.positions, self.slot_mapping, self.carry, self.seq_lens = (
            self.static[i * top : (i + 1) * top] for i in range(5))
        self.tables = self.static[5 * top :].view(top, self.width)
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.context_bounds = sorted({min(SHORT_CONTEXT, runner.max_model_len), runner.max_model_len})
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (context bound, batch bucket)
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = None
        self.memory_bytes = 0
        self.replays: Counter[tuple[int, int]] = Counter()

    def can_run(self, batch: "Batch", T: int, B: int, S: int) -> bool:
        return bool(self.graphs) and T == B == S and B <= self.sizes[-1] and all(i.kind == "decode" for i in batch.items)

    def bucket(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    def stage(self, host: "np.ndarray", ids: "np.ndarray", positions: "np.ndarray", slots: "np.ndarray",
              carry: "np.ndarray", seq_lens: "np.ndarray", tables: "np.ndarray") -> int:
        """Write a B-request decode step, padded to its bucket, into a pinned mirror of the
        static layout; return how many leading elements to copy."""
        top, B = self.top, len(ids)
        size = self.bucket(B)
        for i, (values, pad) in enumerate(((ids, 0), (positions, 0), (slots, -1), (carry, -1), (seq_lens, 1))):
            host[i * top : i * top + B] = values
            host[i * top + B : i * top + size] = pad  # padding rows: no KV slot, a 1-token context
        view = host[5 * top : 5 * top + size * self.width].reshape(size, self.width)
        view[:B, : tables.shape[1]] = tables
        view[B:, 0] = 0
        return 5 * top + size * self.width

    def load(self, staged: torch.Tensor, numel: int, prev_sampled: torch.Tensor | None) -> None:
        """On the compute stream: the staged step into the static inputs, then the carry-over."""
        self.static[:numel].copy_(staged[:numel])
        if prev_sampled is not None and prev_sampled.numel():
            take = self.carry >= 0
            self.ids.copy_(torch.where(take, prev_sampled[self.carry.clamp(0, prev_sampled.numel() - 1)], self.ids))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        start, before = time.perf_counter(), torch.cuda.memory_allocated(self.runner.device)
        stream = torch.cuda.Stream(self.runner.device)
        for bound in reversed(self.context_bounds):
            for size in reversed(self.sizes):
                ctx = self._context(size, bound)
                with torch.cuda.stream(stream):
                    self._forward(size, ctx)  # warm-up: compiles the Triton kernels outside capture
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.logits[bound, size] = self._forward(size, ctx)
                self.pool = graph.pool()
                self.graphs[bound, size] = graph
        torch.cuda.synchronize(self.runner.device)
        self.memory_bytes = torch.cuda.memory_allocated(self.runner.device) - before
        log.info("captured %d decode CUDA graphs (batch %d..%d, contexts up to %s) in %.1f s, %.0f MiB",
                 len(self.graphs), self.sizes[0], self.sizes[-1], self.context_bounds, time.perf_counter() - start,
                 self.memory_bytes / 2**20)

    def _context(self, size: int, bound: int) -> AttentionContext:
        return AttentionContext(
            cu_seqlens_q=self.cu[: size + 1], seq_lens=self.seq_lens[:size], block_tables=self.tables[:size],
            slot_mapping=self.slot_mapping[:size], max_seqlen_q=1, max_seqlen_k=bound,
            kv_caches=self.runner.kv_caches,
        )

    def _forward(self, size: int, ctx: AttentionContext) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.ids[:size], self.positions[:size], ctx)
        return model.compute_logits(hidden).float()

    def replay(self, batch: int, max_context: int) -> torch.Tensor:
        """Replay the graph for a loaded step of `batch` requests whose longest context is
        `max_context` tokens; its logits."""
        key = (next(b for b in self.context_bounds if b >= max_context), self.bucket(batch))
        self.graphs[key].replay()
        self.replays[key] += 1
        return self.logits[key][:batch]
