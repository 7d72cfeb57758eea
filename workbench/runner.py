"""ModelRunner: a scheduled batch in, one sampled token per finishing chunk out.

It owns the device side: the KV cache tensors, the flat ragged input tensors
of each step (no padding between requests), the forward pass and sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


from .kernels import select
from .loading import LoadedModel
from .models import AttentionContext
from .sampling import Sampler
from .scheduler import Batch


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    logits_indices: torch.Tensor
    ctx: AttentionContext


@dataclass(slots=True)
class StepTiming:
    prepare_s: float
    forward_s: float


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, kernel_backend: str = "auto", seed: int = 0) -> None:
        self.model = loaded.model
        self.model.kernels = select(device, kernel_backend)
        if device.type == "cpu":
            self.model.use_cpu_layout()
        self.device, self.dtype, self.block_size = device, dtype, block_size
        cfg = loaded.config
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        self.sampler = Sampler(device, seed)

    @property
    def kernels_name(self) -> str:
        return self.model.kernels.name

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    # --------------------------------------------------------------- prepare
    def prepare(self, batch: Batch) -> StepInputs:
        """Flatten the batch: every request's new tokens back to back, plus their cache slots."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu, seq_lens, logits_idx, tables = [0], [], [], []
        for item in batch.items:
            r, s, n = item.request, item.start, item.num_tokens
            ids.extend(_token_slice(r.prompt_token_ids, r.output_token_ids, s, n))
            positions.extend(range(s, s + n))
            blocks = r.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(s, s + n))
            cu.append(cu[-1] + n)
            seq_lens.append(s + n)
            tables.append(blocks)
            if item.samples:
                logits_idx.append(cu[-1] - 1)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        as_tensor = lambda x, dt: torch.tensor(x, dtype=dt).to(dev, non_blocking=True)  # noqa: E731
        ctx = AttentionContext(
            cu_seqlens_q=as_tensor(cu, torch.int32), seq_lens=as_tensor(seq_lens, torch.int32),
            block_tables=as_tensor(table, torch.int32), slot_mapping=as_tensor(slots, torch.int64),
            max_seqlen_q=max(i.num_tokens for i in batch.items), max_seqlen_k=max(seq_lens),
            kv_caches=self.kv_caches,
        )
        return StepInputs(as_tensor(ids, torch.int64), as_tensor(positions, torch.int64),
                          as_tensor(logits_idx, torch.int64), ctx)

    # --------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, batch: Batch) -> tuple[list[int], StepTiming]:
        """Run one step; return the sampled token of every item whose chunk reached its end."""
        t0 = time.perf_counter()
        inputs = self.prepare(batch)
        t1 = time.perf_counter()
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        sampling = [i for i in batch.items if i.samples]
        tokens: list[int] = []
        if sampling:
            logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
            ids = [i.request.request_id for i in sampling]
            tokens = self.sampler.sample(logits, ids, [i.request.params for i in sampling]).tolist()
        return tokens, StepTiming(prepare_s=t1 - t0, forward_s=time.perf_counter() - t1)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits at every position of the batch (teacher forcing in tests and notebooks)."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        return self.model.compute_logits(hidden).float()


def _token_slice(prompt: list[int], output: list[int], start: int, n: int) -> list[int]:
    """tokens[start:start+n] of prompt+output without building the concatenation."""
    p = len(prompt)
    if start >= p:
        return output[start - p : start - p + n]
    if start + n <= p:
        return prompt[start : start + n]
    return prompt[start:] + output[: start + n - p]
