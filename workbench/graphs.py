"""CUDA graphs for decode-only steps, one per padded batch size.

A decode step of a small model is hundreds of tiny kernel launches; replaying
a captured graph turns them into one launch. Graphs need fixed shapes and
fixed addresses, so each batch-size bucket owns static input buffers: the
step's inputs are copied in, padding rows get slot -1 (their K/V are written
nowhere) and a one-token context in block 0 (read, never used). Attention is
captured with `max_seqlen_k = max_model_len`, which only affects how the
Triton kernel splits long contexts, never what it computes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from .models import AttentionContext

if TYPE_CHECKING:
    from .runner import ModelRunner, StepInputs
    from .scheduler import Batch

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8, 16, 24, 32) if s < max_batch]
    sizes += list(range(48, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_batch: int) -> None:
        self.runner = runner
        self.sizes = bucket_sizes(max_batch)
        top, dev = self.sizes[-1], runner.device
        self.ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros((top, runner.max_blocks), dtype=torch.int32, device=dev)
        self.rows = torch.arange(top, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self.memory_bytes = 0

    def can_run(self, batch: "Batch", T: int, B: int, S: int) -> bool:
        return bool(self.graphs) and T == B == S and B <= self.sizes[-1] and all(i.kind == "decode" for i in batch.items)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        start, before = time.perf_counter(), torch.cuda.memory_allocated(self.runner.device)
        stream = torch.cuda.Stream(self.runner.device)
        for size in reversed(self.sizes):
            ctx = self._context(size)
            with torch.cuda.stream(stream):
                self._forward(size, ctx)  # warm-up: compiles the Triton kernels outside capture
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.logits[size] = self._forward(size, ctx)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.runner.device)
        self.memory_bytes = torch.cuda.memory_allocated(self.runner.device) - before
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s, %.0f MiB", len(self.graphs),
                 self.sizes[0], self.sizes[-1], time.perf_counter() - start, self.memory_bytes / 2**20)

    def _context(self, size: int) -> AttentionContext:
        return AttentionContext(
            cu_seqlens_q=self.cu[: size + 1], seq_lens=self.seq_lens[:size], block_tables=self.tables[:size],
            slot_mapping=self.slot_mapping[:size], max_seqlen_q=1, max_seqlen_k=self.runner.max_model_len,
            kv_caches=self.runner.kv_caches,
        )

    def _forward(self, size: int, ctx: AttentionContext) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.ids[:size], self.positions[:size], ctx)
        return model.compute_logits(hidden).float()

    def run(self, inputs: "StepInputs", batch: int) -> torch.Tensor:
        """Copy the step into the smallest bucket that holds it, replay, return its logits."""
        size = next(s for s in self.sizes if s >= batch)
        ctx = inputs.ctx
        width = ctx.block_tables.shape[1]
        self.ids[:batch].copy_(inputs.input_ids)
        self.positions[:batch].copy_(inputs.positions)
        self.slot_mapping[:batch].copy_(ctx.slot_mapping)
        self.seq_lens[:batch].copy_(ctx.seq_lens)
        self.tables[:batch, :width].copy_(ctx.block_tables)
        if size > batch:
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].fill_(1)
            self.tables[batch:size, :1].zero_()
        self.graphs[size].replay()
        return self.logits[size][:batch]
