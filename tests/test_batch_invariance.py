"""The fp32 path computes every row the same way whatever else shares its step.

Why it matters: the overlapped loop sees a finished request one step late, so its steps hold other
requests than the synchronous loop's; a CUDA graph pads a step to its bucket; a preempted request
recomputes its KV cache in a prefill where it was first written by decodes. If a row's fp32 result
depended on the batch around it (cuBLAS picks kernels by matrix size; the attention heuristics
split keys by batch size and longest context), an argmax near a tie would flip and the loops would
disagree. These tests pin the property down where it is made: the GEMM and the attention kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_kernels.py: the kernels run interpreted

from workbench_kernels.table import triton_available

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not (CUDA or triton_available("cpu")),
                                  reason="needs a CUDA device or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _randn(shape, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32)


@needs_triton
def test_invariant_gemm_matches_float64_with_bias_and_odd_sizes():
    """Correctness first (also under the interpreter): odd M, N, K, a bias, an `out` buffer."""
    from workbench_kernels.triton_gemm import invariant_linear

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x, w, b = _randn((5, 72), gen), _randn((40, 72), gen), _randn((40,), gen)
    want = (x.double() @ w.double().T + b.double()).float()
    got = invariant_linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = torch.empty(5, 40, device=DEVICE)
    assert invariant_linear(x, w, out=out) is out
    torch.testing.assert_close(out, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp32"):
        invariant_linear(x.half(), w.half())


@pytest.mark.gpu
def test_invariant_gemm_rows_are_bitwise_equal_at_every_batch_size():
    """Row i of x W^T is the same bits computed with 1, 7, 64, 65 or 300 rows, at any place in a tile."""
    from workbench_kernels.triton_gemm import invariant_linear

    gen = torch.Generator(device="cuda").manual_seed(1)
    x, w = _randn((300, 576), gen), _randn((1728, 576), gen)
    full = invariant_linear(x, w)
    for m in (1, 7, 64, 65, 200):
        assert torch.equal(invariant_linear(x[-m:], w), full[-m:]), m
        assert torch.equal(invariant_linear(x[3 : 3 + m], w), full[3 : 3 + m]), m


def _paged(q_lens: list[int], seq_lens: list[int], kv_heads: int, group: int, d: int, block_size: int, gen):
    """A paged KV cache for requests of these lengths (blocks scattered) and their queries."""
    used = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(used) + 2
    order = torch.randperm(num_blocks, generator=gen, device=DEVICE).int()
    tables = torch.zeros((len(seq_lens), max(used)), dtype=torch.int32, device=DEVICE)
    start = 0
    for i, n in enumerate(used):
        tables[i, :n] = order[start : start + n]
        start += n
    shape = (num_blocks, block_size, kv_heads, d)
    k, v = _randn(shape, gen), _randn(shape, gen)
    cu = torch.tensor([0, *q_lens], device=DEVICE).cumsum(0).int()
    q = _randn((int(cu[-1]), kv_heads * group, d), gen)
    return q, k, v, cu, torch.tensor(seq_lens, device=DEVICE).int(), tables


def _attention(q, k, v, cu, lens, tables, max_q: int):
    from workbench_kernels.triton_attention import paged_attention

    return paged_attention(q, k, v, cu, lens, tables, 0.125, max_q, int(lens.max()))


@pytest.mark.gpu
def test_fp32_attention_rows_do_not_depend_on_the_batch_or_on_decode_versus_prefill():
    """SmolLM2's heads (3 KV heads x 3, dim 64): a request's outputs are the same bits alone or in
    a batch of 150 (where the bf16 heuristics would split the keys), and its last token's output
    is the same bits decoded as one query or computed as the end of a prefill chunk."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    n = 150
    seq_lens = torch.randint(20, 900, (n,), generator=gen, device="cuda").tolist()
    q, k, v, cu, lens, tables = _paged([1] * n, seq_lens, 3, 3, 64, 16, gen)
    batch = _attention(q, k, v, cu, lens, tables, 1)
    one = torch.tensor([0, 1], device="cuda").int()
    for i in (0, 17, n - 1):
        alone = _attention(q[i : i + 1], k, v, one, lens[i : i + 1], tables[i : i + 1], 1)
        assert torch.equal(alone, batch[i : i + 1]), i

    # decode of the last token == last row of a prefill of the whole request
    L = seq_lens[5]
    pq = _randn((L, 9, 64), gen)
    pq[-1] = q[5]
    chunk = _attention(pq, k, v, torch.tensor([0, L], device="cuda").int(), lens[5:6], tables[5:6], L)
    assert torch.equal(chunk[-1:], batch[5:6])


@pytest.mark.gpu
def test_fp32_model_logits_of_a_request_do_not_depend_on_its_neighbours():
    """The whole forward pass (GEMMs, norms, attention, logits) through the engine's runner: a
    request decoded alone and decoded beside 90 others gives the same logits, bit for bit."""
    import workbench
    from workbench.blocks import BlockManager
    from workbench.request import Request, SamplingParams
    from workbench.runner import ModelRunner
    from workbench.scheduler import Scheduler

    from test_gpu import random_smollm2, tokenizer

    loaded = workbench.load(random_smollm2(torch.float32, std=0.05), tokenizer=tokenizer(), dtype=torch.float32,
                            device="cuda")
    gen = torch.Generator().manual_seed(3)

    def logits_of(prompts: list[list[int]]) -> torch.Tensor:
        runner = ModelRunner(loaded, num_blocks=2048, block_size=16, device=torch.device("cuda"),
                             dtype=torch.float32, max_batch=128, token_budget=16384, cuda_graphs=False)
        sched = Scheduler(BlockManager(2048, 16, False), 128, 16384, "fcfs")
        for j, p in enumerate(prompts):
            sched.add(Request(f"r{j}", p, SamplingParams(max_new_tokens=4)))
        plan = sched.schedule()
        return runner.logits(plan)[torch.tensor(prompts_ends(prompts), device="cuda")]

    def prompts_ends(prompts):
        ends, total = [], 0
        for p in prompts:
            total += len(p)
            ends.append(total - 1)
        return ends

    target = torch.randint(3, 49000, (200,), generator=gen).tolist()
    others = [torch.randint(3, 49000, (int(torch.randint(5, 120, (1,), generator=gen)),), generator=gen).tolist()
              for _ in range(90)]
    alone = logits_of([target])
    crowded = logits_of(others[:45] + [target] + others[45:])
    assert torch.equal(alone[0], crowded[45])

