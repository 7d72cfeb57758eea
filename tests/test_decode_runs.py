"""Decode runs (`decode_steps` > 1): several decode steps planned and launched at once, on the CPU.

While the batch holds still, the scheduler plans up to `decode_steps` decode
steps as one run; the runner launches them together, each reading the token the
one before sampled from the request table, and the loop processes the tokens
step by step. Outputs must equal one-step-at-a-time exactly (greedy and seeded
sampling, stops mid-run, preemption, both loops), the KV blocks must come back,
and a deliberately wrong run must fail the comparison.
"""

from __future__ import annotations

import pytest

from test_overlap import CHATS, run


def outputs(make_engine, decode_steps: int, overlap: bool, prompts, **kw):
    outs, steps, engine = run(make_engine, overlap, prompts, decode_steps=decode_steps, **kw)
    return outs, steps


def runs_in(steps) -> int:
    """Launches that ran more than one decode step (a slot's token count is the run's length)."""
    return sum(1 for s in steps if any(x.kind == "decode" and x.num_tokens > 1 for x in s.slots))


@pytest.mark.parametrize("overlap", [False, True])
def test_runs_equal_single_steps_with_eos_lengths_and_sampling(make_engine, overlap):
    prompts = CHATS[:6]
    kw = dict(max_new_tokens=30, max_batch=6)
    one, one_steps = outputs(make_engine, 1, overlap, prompts, **kw)
    four, four_steps = outputs(make_engine, 4, overlap, prompts, **kw)
    assert [o.token_ids for o in four] == [o.token_ids for o in one]
    assert [o.text for o in four] == [o.text for o in one]
    assert [o.finish_reason for o in four] == [o.finish_reason for o in one]
    assert {o.finish_reason for o in one} == {"stop", "length"}, "the workload must stop both ways"
    assert runs_in(four_steps) > 0 and runs_in(one_steps) == 0
    assert len(four_steps) < len(one_steps)
    assert sum(s.tokens_emitted for s in four_steps) == sum(len(o.token_ids) for o in four)

    drawn = dict(kw, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    one, _ = outputs(make_engine, 1, overlap, prompts, **drawn)
    five, five_steps = outputs(make_engine, 5, overlap, prompts, **drawn)
    assert runs_in(five_steps) > 0
    assert [o.token_ids for o in five] == [o.token_ids for o in one]


def test_runs_equal_single_steps_under_preemption(make_engine):
    """A KV cache too small for the batch: runs only where the blocks for them exist."""
    kw = dict(max_new_tokens=48, ignore_eos=True, num_blocks=24, max_batch=8, token_budget=64)
    one, _ = outputs(make_engine, 1, True, CHATS, **kw)
    runs, steps = outputs(make_engine, 8, True, CHATS, **kw)
    assert sum(len(s.preempted) for s in steps) > 0, "the test must force preemption"
    assert runs_in(steps) > 0
    assert [o.token_ids for o in runs] == [o.token_ids for o in one]
    assert all(len(o.token_ids) == 48 for o in runs)


def test_a_stop_inside_a_run_cuts_there(make_engine):
    engine = make_engine(decode_steps=8)
    prompt = [{"role": "user", "content": "Count from one to ten."}]
    full = engine.generate_batch([prompt], max_new_tokens=40, ignore_eos=True, progress=False)[0]
    stop = full.text[len(full.text) // 2 :][:3]
    cut = engine.generate_batch([prompt], max_new_tokens=40, ignore_eos=True, stop=[stop], progress=False)[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids)
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    exact = engine.generate_batch(CHATS[:3], max_new_tokens=7, ignore_eos=True, progress=False)
    assert [len(o.token_ids) for o in exact] == [7, 7, 7]


def test_cancel_mid_run_and_retune_decode_steps_live(make_engine):
    engine = make_engine(overlap=True, max_batch=4, decode_steps=6)
    handles = [engine.submit(c, max_new_tokens=120, ignore_eos=True) for c in CHATS[:4]]
    next(iter(handles[0]))
    engine.cancel(handles[1].request_id)
    assert engine.reconfigure(decode_steps=1).decode_steps == 1
    engine.cancel(handles[2].request_id)
    assert engine.reconfigure(decode_steps=3).decode_steps == 3
    outs = [h.result(timeout=120) for h in handles]
    assert outs[1].finish_reason == outs[2].finish_reason == "cancelled"
    assert len(outs[0].token_ids) == len(outs[3].token_ids) == 120
    alone = engine.generate_batch([CHATS[0], CHATS[3]], max_new_tokens=120, ignore_eos=True, progress=False)
    assert [outs[0].token_ids, outs[3].token_ids] == [o.token_ids for o in alone]
    assert runs_in(engine.telemetry.steps()) > 0


@pytest.mark.parametrize("value", [0, 65, -1, True, 2.0, "4"])
def test_bad_decode_steps_is_refused_by_name(make_engine, value):
    engine = make_engine()
    with pytest.raises(ValueError, match=r"decode_steps must be None .* \[1, 64\]"):
        engine.reconfigure(decode_steps=value)
    assert engine.generate_batch(CHATS[:1], max_new_tokens=3, ignore_eos=True, progress=False)[0].token_ids


def test_a_run_that_reads_the_wrong_position_fails_the_comparison(make_engine, monkeypatch):
    """The exact comparisons above can fail: a run whose later steps read the input token one
    position back (the token before the one just sampled) changes the outputs."""
    from workbench import runner as runner_module

    prompts = CHATS[:4]
    kw = dict(max_new_tokens=16, ignore_eos=True, max_batch=4)
    one, _ = outputs(make_engine, 1, False, prompts, **kw)
    advance = runner_module.next_decode_step

    def one_position_behind(step, table, block_size):
        nxt = advance(step, table, block_size)
        nxt.table_index = step.table_index
        nxt.host_ids = table.host_tokens.ravel()[step.table_index]
        return nxt

    monkeypatch.setattr(runner_module, "next_decode_step", one_position_behind)
    broken, steps = outputs(make_engine, 4, False, prompts, **kw)
    assert runs_in(steps) > 0
    assert [o.token_ids for o in broken] != [o.token_ids for o in one]


def test_a_staged_run_in_the_decode_graph_layout_equals_eager_steps(embedded):
    """A decode run staged the way CUDA graphs take it (`prepare_run`: the first step whole, the
    later ones only their per-row vectors, over stale buffers) and run step by step through the
    function the graph captures: the same tokens, request table and KV cache as eager steps. Five
    requests in a bucket of six, so padding rows must stay harmless in every step."""
    import numpy as np
    import torch

    from test_overlap import _cpu_families
    from workbench.blocks import BlockManager
    from workbench.request import Request, SamplingParams
    from workbench.runner import ModelRunner
    from workbench.scheduler import Scheduler
    from workbench.step_inputs import build_host_step, next_decode_step

    runner = ModelRunner(embedded, num_blocks=64, block_size=16, device=torch.device("cpu"), dtype=torch.float32,
                         kernel_backend="torch", max_model_len=256, max_batch=6, token_budget=256)
    decode, _ = _cpu_families(runner, 6, 256)
    scheduler = Scheduler(BlockManager(64, 16), max_batch=6, token_budget=256, decode_steps=5)
    for i, n in enumerate([5, 30, 17, 14, 9]):
        scheduler.add(Request(f"r{i}", [(7 * i + 3 * k) % 900 + 10 for k in range(n)],
                              SamplingParams(max_new_tokens=12, ignore_eos=True)))
    runs = 0
    with torch.inference_mode():
        while scheduler.has_work():
            plan = scheduler.schedule()
            rows = runner.table.apply(plan)
            steps = [build_host_step(plan, rows, runner.table, 16)]
            for _ in range(1, plan.steps):
                steps.append(next_decode_step(steps[-1], runner.table, 16))
            tokens_before, kv_before = runner.table.device_tokens.clone(), runner.kv_cache.clone()
            eager = [runner._eager_step(step, runner._slots[0]).tolist() for step in steps]
            tokens_eager, kv_eager = runner.table.device_tokens.clone(), runner.kv_cache.clone()
            if plan.steps > 1:
                runs += 1
                runner.table.device_tokens.copy_(tokens_before)
                runner.kv_cache.copy_(kv_before)
                host = np.full(decode.staging_size(plan.steps), 99, dtype=np.int64)  # stale everywhere
                decode.static.fill_(77)
                for step, want, (key, offset, numel) in zip(steps, eager, decode.prepare_run(
                        steps, host, runner.table.scratch)):
                    decode.load(torch.from_numpy(host[offset:]), numel)
                    runner._greedy_step(decode.inputs(key, runner.kv_caches), decode.logits[: key[1]],
                                        decode.tokens[: key[1]])
                    assert decode.tokens[: step.num_samples].tolist() == want
                scratch = runner.table.scratch
                assert torch.equal(runner.table.device_tokens[:scratch], tokens_eager[:scratch])
                assert torch.equal(runner.kv_cache, kv_eager), "a padding row wrote K/V somewhere"
            scheduler.advance()
            for j in range(plan.steps):
                for rid, token in zip(plan.sampling_ids, eager[j]):
                    request = next((r for r in scheduler.running if r.request_id == rid), None)
                    if request is None:
                        continue
                    request.receive(token)
                    if len(request.output_token_ids) == 12:
                        scheduler.finish(request)
    assert runs >= 2, runs
