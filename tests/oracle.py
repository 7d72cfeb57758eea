"""Teacher forcing through our own scheduler, block manager and runner.

`forced_logits` pushes given token sequences through the real paged path —
chunked prefill under a token budget, decode steps of one token, several
requests per batch — but appends the given continuation instead of sampling,
so the logits at every position can be compared with transformers'.
"""

from __future__ import annotations

import torch

from workbench.blocks import BlockManager
from workbench.loading import LoadedModel
from workbench.request import Request, SamplingParams
from workbench.runner import ModelRunner
from workbench.scheduler import Scheduler


def forced_logits(loaded: LoadedModel, prompts: list[list[int]], continuations: list[list[int]], *,
                  block_size: int = 16, token_budget: int = 4096, max_batch: int = 64,
                  num_blocks: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  kernel_backend: str = "torch") -> list[torch.Tensor]:
    """Logits [len(prompt) + len(cont) - 1, V] for each request, position by position."""
    total = sum(len(p) + len(c) for p, c in zip(prompts, continuations))
    num_blocks = num_blocks or (total // block_size + 2 * len(prompts) + 1)
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=block_size, device=torch.device(device),
                         dtype=dtype, kernel_backend=kernel_backend, cuda_graphs=False)
    blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
    scheduler = Scheduler(blocks, max_batch=max_batch, token_budget=token_budget)
    requests = [Request(f"r{i}", list(p), SamplingParams(max_new_tokens=len(c) + 1, ignore_eos=True))
                for i, (p, c) in enumerate(zip(prompts, continuations))]
    for r in requests:
        scheduler.add(r)
    rows: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    wanted = {r.request_id: len(p) + len(c) - 1 for r, p, c in zip(requests, prompts, continuations)}
    cont = {r.request_id: c for r, c in zip(requests, continuations)}
    by_id = {r.request_id: r for r in requests}
    while scheduler.has_work():
        plan = scheduler.schedule()
        assert len(plan), "scheduler made no progress"
        logits = runner.logits(plan)
        scheduler.advance()
        offset = 0
        for rid, n, samples in zip(plan.request_ids, plan.num_tokens, plan.samples):
            r = by_id[rid]
            rows[rid].append(logits[offset : offset + n])
            offset += n
            if samples:
                done = sum(len(x) for x in rows[rid]) >= wanted[rid]
                if done:
                    scheduler.finish(r)
                else:  # the given token instead of a sampled one, on the host and in the runner
                    token = cont[rid][len(r.output_token_ids)]
                    runner.table.force_tokens(rid, len(r.prompt_token_ids) + len(r.output_token_ids), [token])
                    r.receive(token)
        scheduler.check()
    assert blocks.num_free == num_blocks
    return [torch.cat(rows[r.request_id])[: wanted[r.request_id]].cpu() for r in requests]


def hf_logits(hf_model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + continuation], device=hf_model.device)
    with torch.no_grad():
        return hf_model(ids).logits[0, :-1].float().cpu()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt], device=hf_model.device)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return out[0, len(prompt):].tolist()
