"""The sampler against a numpy oracle, and its batch invariance (no model needed).

The oracle is the textbook definition: softmax(logits / T), keep the k most likely tokens,
renormalise, keep the smallest set of the most likely whose mass reaches top_p, renormalise.
The sampler must draw from exactly that distribution, and a row's draw must be a function of
its (seed, token index, logits row) alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.request import MAX_SEED
from workbench.sampling import allowed_tokens, derived_seed, sample_rows, uniforms

LOGITS = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.4, -1.0, -2.5], dtype=np.float64)


def oracle(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution transformers' warpers (temperature, top-k, top-p) define, in float64."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    keep[order[: top_k or len(p)]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if top_p < 1:
        mass_before = np.cumsum(p[order]) - p[order]
        cut = order[mass_before >= top_p]
        p[cut] = 0.0
        p /= p.sum()
    return p


def draw_many(logits: np.ndarray, n: int, temperature: float, top_k: int, top_p: float, *,
              seeds: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> np.ndarray:
    rows = torch.tensor(logits, dtype=torch.float32).expand(n, -1).contiguous()
    seeds = torch.full((n,), 12345, dtype=torch.int64) if seeds is None else seeds
    counters = torch.arange(n, dtype=torch.int64) if counters is None else counters
    tokens = sample_rows(rows, torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.int64),
                         torch.full((n,), top_p), seeds, counters)
    return np.bincount(tokens.numpy(), minlength=len(logits)) / n


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.7), (2.0, 0, 0.95),
])
def test_draws_follow_the_warped_softmax(temperature, top_k, top_p):
    """Over 40,000 draws (one seed, successive token indices) the frequencies are within a
    total-variation distance of 0.012 of the oracle (the sampling noise alone is ~0.005),
    and tokens the oracle forbids never appear."""
    expected = oracle(LOGITS, temperature, top_k, top_p)
    seen = draw_many(LOGITS, 40_000, temperature, top_k, top_p)
    assert 0.5 * np.abs(seen - expected).sum() < 0.012, (seen.round(4), expected.round(4))
    assert not seen[expected == 0].any(), "a token outside top-k / top-p was drawn"


def test_draws_across_seeds_at_one_token_index_follow_the_softmax_too():
    """Independence across seeds: many requests' first tokens, not one request's stream."""
    n = 40_000
    seeds = torch.tensor([derived_seed(7, i) for i in range(n)], dtype=torch.int64)
    seen = draw_many(LOGITS, n, 1.0, 0, 1.0, seeds=seeds, counters=torch.zeros(n, dtype=torch.int64))
    assert 0.5 * np.abs(seen - oracle(LOGITS, 1.0, 0, 1.0)).sum() < 0.012


def test_uniforms_are_uniform_and_seeds_near_each_other_are_unrelated():
    u = uniforms(torch.tensor([0, 1, MAX_SEED], dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 50_000)
    assert bool(((u > 0) & (u < 1)).all())
    hist = np.histogram(u[0].numpy(), bins=10, range=(0, 1))[0] / 50_000
    assert np.abs(hist - 0.1).max() < 0.01
    assert abs(float(np.corrcoef(u[0].numpy(), u[1].numpy())[0, 1])) < 0.02
    assert abs(float(np.corrcoef(u[1].numpy(), u[2].numpy())[0, 1])) < 0.02


def test_a_rows_draw_does_not_depend_on_the_batch():
    """The same (seed, counter, logits row) gives the same token alone, in a batch, in any order."""
    torch.manual_seed(0)
    n, vocab = 16, 49152
    logits = torch.randn(n, vocab) * 3
    temperature = torch.linspace(0.5, 1.5, n)
    top_k = torch.tensor([0, 40] * (n // 2), dtype=torch.int64)
    top_p = torch.tensor([1.0, 0.9, 0.95, 1.0] * (n // 4))
    seeds = torch.tensor([derived_seed(1, i) for i in range(n)], dtype=torch.int64)
    counters = torch.arange(n, dtype=torch.int64) * 3
    together = sample_rows(logits, temperature, top_k, top_p, seeds, counters)
    perm = torch.randperm(n)
    shuffled = sample_rows(logits[perm], temperature[perm], top_k[perm], top_p[perm], seeds[perm], counters[perm])
    assert torch.equal(shuffled, together[perm])
    alone = [int(sample_rows(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                             seeds[i:i + 1], counters[i:i + 1])) for i in range(n)]
    assert alone == together.tolist()


def test_greedy_rows_are_exactly_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 1000)
    tokens = sample_rows(logits, torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
                         torch.tensor([0, 1, 1, 5, 0, 0]), torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 0.1]),
                         torch.arange(6), torch.zeros(6, dtype=torch.int64))
    argmax = logits.argmax(dim=-1)
    assert tokens[[0, 1, 2, 3, 5]].tolist() == argmax[[0, 1, 2, 3, 5]].tolist()  # T=0 or top_k=1


def test_top_p_of_one_cuts_nothing():
    """top_p=1 is 'off': every token stays allowed, even where the float32 cumulative sum of the
    sorted probabilities reaches 1 before the tail (the old sampler cut ~2,600 of 49,152 here)."""
    torch.manual_seed(0)
    scaled = torch.randn(4, 49152) * 3  # no probability underflows to 0 at this spread
    mask = allowed_tokens(scaled, torch.zeros(4, dtype=torch.int64), torch.ones(4))
    assert bool(mask.all())
    probs = scaled.softmax(dim=-1)  # the premise: the cumulative sum does reach 1 early
    ordered = probs.sort(dim=-1, descending=True).values
    assert bool(((ordered.cumsum(dim=-1) - ordered) >= 1.0).any())


def test_seeds_at_the_ends_of_the_range_sample():
    logits = torch.randn(2, 100)
    tokens = sample_rows(logits, torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2),
                         torch.tensor([0, MAX_SEED], dtype=torch.int64), torch.tensor([0, 2**31], dtype=torch.int64))
    assert tokens.shape == (2,) and bool(((tokens >= 0) & (tokens < 100)).all())


def test_seeded_requests_give_the_same_text_whatever_the_batch_order(make_engine):
    """20 seeded requests at T=1.3, submitted in order and then reversed (each shares its batch
    with the other 19, in another row): every request's text is the same. The old sampler
    (sort, then an inverse-CDF draw) changed one of them at its third token."""
    engine = make_engine(num_blocks=128, max_batch=20)
    prompt = [{"role": "user", "content": "Write a short poem about the sea."}]
    seeds = [1000 + 7 * i for i in range(20)]
    kw = dict(max_new_tokens=12, temperature=1.3, ignore_eos=True)

    def run(order: list[int]) -> dict[int, list[int]]:
        handles = {s: engine.submit(prompt, seed=s, **kw) for s in order}
        return {s: h.result(timeout=300).token_ids for s, h in handles.items()}

    forward = run(seeds)
    backward = run(seeds[::-1])
    assert forward == backward
    assert len({tuple(t) for t in forward.values()}) > 10, "different seeds must give different texts"


def test_unseeded_requests_do_not_depend_on_the_batch_either(make_engine):
    """An unseeded request's seed derives from the engine's seed and its submission number, so the
    same submissions on two engines give the same texts, alone or together."""
    prompt = "Tell me something about rivers."
    kw = dict(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    one = make_engine(num_blocks=64, max_batch=4, seed=5)
    together = [h.result(timeout=120).token_ids for h in [one.submit(prompt, **kw) for _ in range(3)]]
    two = make_engine(num_blocks=64, max_batch=4, seed=5)
    alone = [two.submit(prompt, **kw).result(timeout=120).token_ids for _ in range(3)]
    assert together == alone
    assert len({tuple(t) for t in alone}) == 3


@pytest.mark.gpu
def test_on_cuda_the_sampler_draws_what_it_draws_on_the_cpu_and_follows_the_oracle():
    """The same (seed, counter, logits) give the same tokens on the GPU as on the CPU (the noise is
    integer arithmetic; only a float32 tie in the last bit could differ), the GPU's frequencies
    follow the oracle, and a permutation of the rows permutes the picks."""
    torch.manual_seed(0)
    n, vocab = 64, 49152
    logits = torch.randn(n, vocab) * 3
    temperature, top_k = torch.linspace(0.5, 1.5, n), torch.tensor([0, 40, 0, 1] * (n // 4), dtype=torch.int64)
    top_p = torch.tensor([1.0, 0.9, 0.95, 1.0] * (n // 4))
    seeds = torch.tensor([derived_seed(3, i) for i in range(n)], dtype=torch.int64)
    counters = torch.arange(n, dtype=torch.int64)
    cpu = sample_rows(logits, temperature, top_k, top_p, seeds, counters)
    args = [t.cuda() for t in (logits, temperature, top_k, top_p, seeds, counters)]
    gpu = sample_rows(*args)
    assert (gpu.cpu() == cpu).float().mean() >= 0.98, (gpu.cpu() != cpu).sum()
    perm = torch.randperm(n, device="cuda")
    assert torch.equal(sample_rows(*[a[perm] for a in args]), gpu[perm])
    m = 40_000
    rows = torch.tensor(LOGITS, dtype=torch.float32, device="cuda").expand(m, -1).contiguous()
    tokens = sample_rows(rows, torch.full((m,), 0.9, device="cuda"), torch.full((m,), 5, device="cuda"),
                         torch.full((m,), 0.7, device="cuda"), torch.full((m,), 12345, device="cuda"),
                         torch.arange(m, device="cuda"))
    seen = np.bincount(tokens.cpu().numpy(), minlength=len(LOGITS)) / m
    assert 0.5 * np.abs(seen - oracle(LOGITS, 0.9, 5, 0.7)).sum() < 0.012
