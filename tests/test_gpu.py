"""The engine on CUDA with the Triton kernels (skipped without a GPU; run on the device, results in bench/results/)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import transformers

import workbench
from oracle import forced_logits, hf_greedy, hf_logits

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
pytestmark = pytest.mark.gpu


def tokenizer():
    folder = Path(__file__).parents[1] / ".cache" / "gpu" / "smollm2"
    return transformers.AutoTokenizer.from_pretrained(folder)


def random_smollm2(dtype: torch.dtype, seed: int = 0, std: float = 0.02):
    """A SmolLM2-135M-shaped transformers model with random weights, on the GPU."""
    from shapes import config

    torch.manual_seed(seed)
    cfg = config("smollm2")
    cfg.initializer_range = std
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).cuda().eval()


@pytest.fixture(scope="module")
def hf32():
    return random_smollm2(torch.float32, std=0.05)


def prompts(n: int, seed: int, lo: int = 8, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_bf16_triton_logits_match_transformers_fp32(hf32):
    """Our bf16 Triton path is as close to fp32 transformers as transformers' own bf16 run is."""
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.bfloat16, device="cuda")
    hf16 = random_smollm2(torch.float32, std=0.05).to(torch.bfloat16)
    hf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf32.state_dict().items()})
    ps = prompts(6, 1)
    conts = [hf_greedy(hf32, p, 32) for p in ps]
    ours = forced_logits(loaded, ps, conts, block_size=16, token_budget=97, device="cuda", dtype=torch.bfloat16,
                         kernel_backend="triton")
    for p, c, o in zip(ps, conts, ours):
        ref = hf_logits(hf32, p, c)
        peer = hf_logits(hf16, p, c)
        rel = ((o - ref).norm() / ref.norm()).item()
        rel_peer = ((peer - ref).norm() / ref.norm()).item()
        assert rel < max(2e-2, 1.5 * rel_peer), f"ours {rel:.2e} vs transformers bf16 {rel_peer:.2e}"


def test_fp32_triton_greedy_equals_transformers(hf32):
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    ps = prompts(8, 2)
    expected = [hf_greedy(hf32, p, 32) for p in ps]
    with workbench.Engine(loaded, dtype="float32", device="cuda", num_blocks=1024, token_budget=256) as engine:
        assert engine.runner.kernels_name == "triton"
        outs = engine.generate_batch(ps, max_new_tokens=32, ignore_eos=True, progress=False)
    assert [o.token_ids for o in outs] == expected


def workload_b(n: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    ps = [[rng.randrange(3, 49152) for _ in range(rng.randint(16, 1024))] for _ in range(n)]
    return ps, [rng.randint(16, 512) for _ in range(n)]


def test_overlap_equals_sync_fp32_with_preemption(hf32):
    """Workload (b) in fp32, KV cache far too small: preemptions happen, both loops give the same tokens."""
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    ps, outs = workload_b()
    results, preempted = {}, {}
    for overlap in (False, True):
        with workbench.Engine(loaded, dtype="float32", device="cuda", num_blocks=1500, max_batch=128,
                              token_budget=2048, overlap=overlap) as engine:
            handles = [engine.submit(p, max_new_tokens=m, ignore_eos=True) for p, m in zip(ps, outs)]
            results[overlap] = [h.result(timeout=600).token_ids for h in handles]
            preempted[overlap] = sum(len(s.preempted) for s in engine.telemetry.steps())
            engine.check_invariants()
    assert preempted[True] > 0 and preempted[False] > 0
    assert [len(r) for r in results[True]] == outs
    assert results[True] == results[False]


def test_decode_steps_replay_cuda_graphs(hf32):
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.bfloat16, device="cuda")
    with workbench.Engine(loaded, device="cuda", num_blocks=512, max_batch=16) as engine:
        a = engine.generate_batch(prompts(5, 3), max_new_tokens=24, ignore_eos=True, progress=False)
        steps = engine.telemetry.steps()
        assert all(s.gpu_start is not None for s in steps)
        assert sum(engine.runner.graphs.replays.values()) >= 20  # a decode run is one launch, a replay per step
        assert engine.telemetry.gpu_busy() is not None
        engine.reconfigure(overlap=False)
        b = engine.generate_batch(prompts(5, 3), max_new_tokens=24, ignore_eos=True, progress=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_decode_runs_equal_single_steps_fp32_graphed_and_eager(hf32):
    """Decode runs of 8 steps (staged at once, replayed back to back, each step reading the token
    the one before sampled on the device) give the tokens of one step per launch, in fp32, with
    preemptions, seeded sampling rows, and with and without CUDA graphs."""
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    rng = random.Random(8)
    ps = prompts(40, 8, lo=8, hi=160)
    kw = [dict(max_new_tokens=rng.randint(8, 96), ignore_eos=True) | (dict(temperature=0.7, seed=i)
                                                                     if i % 4 == 0 else {}) for i in range(len(ps))]
    outs, runs = {}, {}
    for steps, graphs in ((1, True), (8, True), (8, False)):
        with workbench.Engine(loaded, dtype="float32", device="cuda", num_blocks=160, max_batch=32,
                              token_budget=512, decode_steps=steps, cuda_graphs=graphs) as engine:
            handles = [engine.submit(p, **k) for p, k in zip(ps, kw)]
            outs[steps, graphs] = [h.result(timeout=300).token_ids for h in handles]
            records = engine.telemetry.steps()
            runs[steps, graphs] = [s for s in records if any(x.kind == "decode" and x.num_tokens > 1 for x in s.slots)]
            assert sum(len(s.preempted) for s in records) > 0, "the KV cache must be too small"
            engine.check_invariants()
    assert not runs[1, True] and runs[8, True] and runs[8, False]
    assert all(s.graphed for s in runs[8, True]) and not any(s.graphed for s in runs[8, False])
    assert [len(o) for o in outs[8, True]] == [k["max_new_tokens"] for k in kw]
    assert outs[8, True] == outs[1, True] and outs[8, False] == outs[1, True]


def test_short_and_long_context_graphs_give_the_eager_tokens(hf32):
    """Contexts that grow past the short-context bound switch graph sets mid-request (unsplit
    attention below it, split above), and the prefill steps replay mixed-step graphs; fp32
    greedy tokens equal the eager path's."""
    from workbench.graphs import SHORT_CONTEXT

    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    ps = prompts(6, 4, lo=SHORT_CONTEXT - 40, hi=SHORT_CONTEXT - 10)
    outs = {}
    for graphs in (True, False):
        with workbench.Engine(loaded, dtype="float32", device="cuda", num_blocks=512, max_batch=8,
                              cuda_graphs=graphs) as engine:
            outs[graphs] = [o.token_ids for o in engine.generate_batch(ps, max_new_tokens=48, ignore_eos=True,
                                                                       progress=False)]
            if graphs:
                bounds = {bound for bound, _ in engine.runner.graphs.replays}
                assert bounds == set(engine.runner.graphs.context_bounds) and len(bounds) == 2, bounds
                assert sum(engine.runner.mixed_graphs.replays.values()) > 0  # the prefill steps
    assert outs[True] == outs[False]


def test_mixed_step_graphs_equal_eager_with_chunked_prefill_and_sampling(hf32):
    """Prefill chunks beside decodes (small token budget), seeded sampling rows and greedy ones:
    mixed-step graphs give exactly the eager path's tokens in fp32."""
    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    ps = prompts(12, 5, lo=30, hi=300)
    kw = [dict(max_new_tokens=20 + 3 * i, ignore_eos=True) | (dict(temperature=0.8, top_p=0.9, seed=i)
                                                                if i % 3 == 0 else {}) for i in range(len(ps))]
    outs = {}
    for graphs in (True, False):
        with workbench.Engine(loaded, dtype="float32", device="cuda", num_blocks=512, max_batch=8,
                              token_budget=200, cuda_graphs=graphs) as engine:
            handles = [engine.submit(p, **k) for p, k in zip(ps, kw)]
            outs[graphs] = [h.result(timeout=120).token_ids for h in handles]
            steps = engine.telemetry.steps()
            if graphs:
                mixed = [s for s in steps if any(x.kind == "prefill" for x in s.slots)]
                assert mixed and all(s.graphed for s in mixed), "every prefill step under the budget replays"
                assert any(len(s.slots) > 1 and {x.kind for x in s.slots} == {"prefill", "decode"} for s in mixed)
    assert outs[True] == outs[False]


def test_one_wrong_carried_over_token_fails_the_overlap_comparison(hf32, monkeypatch):
    """The exact comparison above can fail: break the carry-over of one token once (its row reads
    id 0 from the host instead of the token sampled on the device) and overlap != sync."""
    import numpy as np

    from workbench import runner as runner_module

    loaded = workbench.load(hf32, tokenizer=tokenizer(), dtype=torch.float32, device="cuda")
    ps = prompts(8, 6, lo=8, hi=40)

    def run(overlap: bool) -> list[list[int]]:
        with workbench.Engine(loaded, dtype="float32", device="cuda", num_blocks=256, max_batch=8,
                              overlap=overlap) as engine:
            return [o.token_ids for o in engine.generate_batch(ps, max_new_tokens=24, ignore_eos=True,
                                                                progress=False)]

    sync = run(False)
    build, broken = runner_module.build_host_step, []

    def build_with_one_wrong_carry(plan, rows, table, block_size):
        step = build(plan, rows, table, block_size)
        carried = np.flatnonzero(step.host_ids < 0)
        if not broken and len(carried) >= 4:
            step.host_ids[carried[-1]] = 0  # that row reads id 0, not the token its last step sampled
            broken.append(plan.request_ids[-1])
        return step

    monkeypatch.setattr(runner_module, "build_host_step", build_with_one_wrong_carry)
    assert run(True) != sync and broken
