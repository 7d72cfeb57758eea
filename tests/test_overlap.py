"""The overlapped loop (schedule and launch step N+1 before finishing step N) on the CPU.

On a CPU the compute worker runs each step while the loop plans the next, and the engine runs the
overlapped protocol: tokens in flight read from the request table, stops seen
one step late, preemption with a token in flight. Outputs must equal the
synchronous loop's exactly.
"""

from __future__ import annotations

import random

import pytest

CHATS = [[{"role": "user", "content": q}] for q in (
    "Say hi.", "Count from one to five.", "Write two sentences about the sea.", "What is 3+4?",
    "List four fruits.", "Describe a cat in one line.", "Write a short poem about rain.", "Name a planet.")]


def run(make_engine, overlap: bool, prompts, **kw):
    engine = make_engine(overlap=overlap, **{k: kw.pop(k) for k in list(kw) if k in ("num_blocks", "max_batch", "token_budget", "decode_steps")})
    outs = engine.generate_batch(prompts, progress=False, **kw)
    steps = engine.telemetry.steps()
    engine.check_invariants()
    return outs, steps, engine


def test_overlap_matches_sync_with_eos_and_lengths(make_engine):
    rng = random.Random(0)
    prompts = [CHATS[i % len(CHATS)] for i in range(12)]
    lengths = [rng.randint(4, 40) for _ in prompts]
    sync_out, sync_steps, _ = run(make_engine, False, prompts, max_new_tokens=40, max_batch=6)
    over_out, over_steps, _ = run(make_engine, True, prompts, max_new_tokens=40, max_batch=6)
    assert [o.token_ids for o in over_out] == [o.token_ids for o in sync_out]
    assert [o.text for o in over_out] == [o.text for o in sync_out]
    assert [o.finish_reason for o in over_out] == [o.finish_reason for o in sync_out]
    assert all(s.overlapped for s in over_steps) and not any(s.overlapped for s in sync_steps)
    assert sum(s.tokens_emitted for s in over_steps) == sum(len(o.token_ids) for o in over_out)
    del lengths


def test_overlap_matches_sync_under_preemption(make_engine):
    """A KV cache far too small for the batch: preemptions with tokens in flight, same outputs."""
    prompts = CHATS
    kw = dict(max_new_tokens=48, ignore_eos=True, num_blocks=24, max_batch=8, token_budget=64)
    sync_out, sync_steps, _ = run(make_engine, False, prompts, **dict(kw))
    over_out, over_steps, engine = run(make_engine, True, prompts, **dict(kw))
    assert sum(len(s.preempted) for s in over_steps) > 0, "the test must force preemption"
    assert [o.token_ids for o in over_out] == [o.token_ids for o in sync_out]
    assert all(len(o.token_ids) == 48 for o in over_out)


def test_overlap_stop_strings_and_exact_max_new_tokens(make_engine):
    engine = make_engine(overlap=True)
    prompt = [{"role": "user", "content": "Count from one to ten."}]
    full = engine.generate_batch([prompt], max_new_tokens=40, progress=False)[0]
    stop = full.text[len(full.text) // 2 :][:3]
    cut = engine.generate_batch([prompt], max_new_tokens=40, stop=[stop], progress=False)[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    exact = engine.generate_batch(CHATS[:3], max_new_tokens=7, ignore_eos=True, progress=False)
    assert [len(o.token_ids) for o in exact] == [7, 7, 7]
    assert all(-1 not in o.token_ids for o in exact)


def test_overlap_cancel_mid_flight_and_toggle_live(make_engine):
    engine = make_engine(overlap=True, max_batch=4)
    handles = [engine.submit(c, max_new_tokens=200, ignore_eos=True) for c in CHATS[:4]]
    next(iter(handles[0]))
    engine.reconfigure(overlap=False)
    engine.cancel(handles[1].request_id)
    engine.reconfigure(overlap=True)
    engine.cancel(handles[2].request_id)
    outs = [h.result(timeout=120) for h in handles]
    assert outs[1].finish_reason == outs[2].finish_reason == "cancelled"
    assert len(outs[0].token_ids) == len(outs[3].token_ids) == 200
    assert all(-1 not in o.token_ids for o in outs)
    steps = engine.telemetry.steps()
    assert any(s.overlapped for s in steps) and any(not s.overlapped for s in steps)


def test_one_wrong_carried_over_token_fails_the_comparison(make_engine, monkeypatch):
    """The exact overlap == sync comparisons above can fail: one token read from the host (id 0)
    instead of from the request table, where its step sampled it, changes the outputs."""
    import numpy as np

    from workbench import runner as runner_module

    prompts = CHATS[:6]
    kw = dict(max_new_tokens=12, ignore_eos=True, max_batch=6)
    sync_out, _, _ = run(make_engine, False, prompts, **dict(kw))
    build, broken = runner_module.build_host_step, []

    def build_with_one_wrong_carry(plan, rows, table, block_size):
        step = build(plan, rows, table, block_size)
        carried = np.flatnonzero(step.host_ids < 0)
        if not broken and len(carried) >= 4:
            step.host_ids[carried[-1]] = 0
            broken.append(plan.request_ids[-1])
        return step

    monkeypatch.setattr(runner_module, "build_host_step", build_with_one_wrong_carry)
    over_out, _, _ = run(make_engine, True, prompts, **dict(kw))
    assert broken and [o.token_ids for o in over_out] != [o.token_ids for o in sync_out]


@pytest.mark.parametrize("overlap", [False, True])
def test_seeded_sampling_same_in_both_loops(make_engine, overlap):
    engine = make_engine(overlap=overlap)
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, progress=False)
    a = engine.generate_batch([CHATS[6], CHATS[2]], **kw)
    b = engine.generate_batch([CHATS[6]], **kw)
    assert a[0].token_ids == b[0].token_ids


def _cpu_families(runner, max_batch: int, token_budget: int):
    """The two CUDA-graph families' static buffers, made on the CPU (no capture): their layouts
    and the step function a graph records can run there as plain tensor code."""
    from workbench.graphs import DecodeGraphs, MixedGraphs

    vocab, dtype = runner.model.embed_tokens.weight.shape[0], runner.model.embed_tokens.weight.dtype
    return (DecodeGraphs(max_batch, runner.max_model_len, runner.max_blocks, vocab, dtype, runner.device),
            MixedGraphs(max_batch, token_budget, runner.max_model_len, runner.max_blocks, runner.block_size, vocab,
                        dtype, runner.device))


def test_graph_layouts_run_the_same_step_as_eager(embedded):
    """Every step of a mixed workload (chunked prefills, decodes, a carried-over token each decode)
    staged into a graph family's padded static layout and run through the very function the graph
    captures gives the eager step's tokens, and leaves the same tokens in the request table."""
    import numpy as np
    import torch

    from workbench.blocks import BlockManager
    from workbench.request import Request, SamplingParams
    from workbench.runner import ModelRunner
    from workbench.scheduler import Scheduler
    from workbench.step_inputs import build_host_step

    runner = ModelRunner(embedded, num_blocks=64, block_size=16, device=torch.device("cpu"), dtype=torch.float32,
                         kernel_backend="torch", max_model_len=256, max_batch=6, token_budget=48)
    decode, mixed = _cpu_families(runner, 6, 48)
    assert decode.sizes == [1, 2, 4, 6] and mixed.sizes == [48]
    scheduler = Scheduler(BlockManager(64, 16), max_batch=6, token_budget=48)
    lengths = [5, 30, 17, 61, 9]
    for i, n in enumerate(lengths):
        scheduler.add(Request(f"r{i}", [(7 * i + 3 * k) % 900 + 10 for k in range(n)],
                              SamplingParams(max_new_tokens=6, ignore_eos=True)))
    used = {"decode": 0, "mixed": 0}
    with torch.inference_mode():
        while scheduler.has_work():
            plan = scheduler.schedule()
            rows = runner.table.apply(plan)
            step = build_host_step(plan, rows, runner.table, 16)
            before = runner.table.device_tokens.clone()
            eager = runner._eager_step(step, runner._slots[0]).tolist()
            after_eager = runner.table.device_tokens.clone()
            runner.table.device_tokens.copy_(before)
            family = decode if (plan.decode_only and len(plan) <= decode.top) else mixed
            host = np.full(family.numel, 99, dtype=np.int64)  # stale values everywhere
            key, numel = family.prepare(step, host, runner.table.scratch)
            family.static.fill_(77)
            family.load(torch.from_numpy(host), numel)
            if family is mixed:  # the parts of the layout past `numel` are only ever read as padding
                family.views["tables"][len(plan) + 1 :] = 0
            rows_ = family.rows(key)
            runner._greedy_step(family.inputs(key, runner.kv_caches), family.logits[:rows_], family.tokens[:rows_])
            S = step.num_samples
            assert family.tokens[:S].tolist() == eager, (family.kind, plan)
            scratch = runner.table.scratch
            assert torch.equal(runner.table.device_tokens[:scratch], after_eager[:scratch])
            used[family.kind] += 1
            scheduler.advance()
            for rid, token in zip(plan.sampling_ids, eager):
                request = next(r for r in scheduler.running if r.request_id == rid)
                request.receive(token)
                if len(request.output_token_ids) == 6:
                    scheduler.finish(request)
    assert used["decode"] >= 3 and used["mixed"] >= 3, used
    assert not runner.table.row_of or set(runner.table.row_of) <= {f"r{i}" for i in range(5)}


def test_decode_graph_layout_pads_rows_to_nowhere():
    """A decode step padded to its bucket: padding rows store no K/V, read a 1-token context and
    write their token to the table's scratch cell, never a request's row."""
    import numpy as np
    import torch

    from workbench.graphs import DecodeGraphs
    from workbench.step_inputs import HostStep

    graphs = DecodeGraphs(8, 80, 5, 10, torch.float32, torch.device("cpu"))
    step = HostStep(host_ids=np.array([11, -1, -1]), table_index=np.array([17, 81 + 4, 162 + 20]),
                    positions=np.array([17, 4, 20]), slots=np.array([113, 52, 84]), cu_seqlens=np.arange(4),
                    seq_lens=np.array([18, 5, 21]), logits_index=np.arange(3), out_index=np.array([18, 86, 183]),
                    tables=np.array([[7, 8], [3, 0], [5, 6]], dtype=np.int32), sample_rows=np.arange(3),
                    counters=np.zeros(3, dtype=np.int64), decode_only=True)
    host = np.full(graphs.numel, 99, dtype=np.int64)
    key, numel = graphs.prepare(step, host, scratch=999)
    assert key == (80, 4) and graphs.bucket(3) == 4
    graphs.load(torch.from_numpy(host), numel)
    v = graphs.views
    assert v["host_ids"][:4].tolist() == [11, -1, -1, 0]
    assert v["slots"][:4].tolist() == [113, 52, 84, -1]  # the padding row stores nothing
    assert v["seq_lens"][:4].tolist() == [18, 5, 21, 1]
    assert v["out_index"][:4].tolist() == [18, 86, 183, 999]
    assert v["tables"][:3, :2].tolist() == [[7, 8], [3, 0], [5, 6]] and v["tables"][3, 0].item() == 0
    assert numel == graphs.numel - 4 * 5  # the unused bucket rows of the table are not copied


@pytest.mark.parametrize("overlap", [False, True])
def test_raising_max_batch_live_grows_the_request_table_and_keeps_every_token(make_engine, overlap):
    """More requests run at once than the runner's table had rows for (max_batch raised mid-run):
    the table grows, keeping the rows of the requests in flight, and every output equals the one
    the same prompts give on an engine that had room from the start."""
    prompts = CHATS[:7]
    kw = dict(max_new_tokens=20, ignore_eos=True, progress=False)
    roomy = make_engine(overlap=overlap, max_batch=8).generate_batch(prompts, **kw)
    engine = make_engine(overlap=overlap, max_batch=2)
    capacity = engine.runner.table.capacity
    handles = engine.submit_many(prompts, max_new_tokens=20, ignore_eos=True)
    next(iter(handles[0]))  # running, with tokens in flight
    engine.reconfigure(max_batch=7)
    outs = [h.result(timeout=300) for h in handles]
    assert capacity == 2 and engine.runner.table.capacity >= 7 and engine.runner.table.generation >= 1
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert max(len(s.slots) for s in engine.telemetry.steps()) > 2
    engine.check_invariants()
    # rows are freed by the next plan after their requests end: one more request, and only it may hold one
    engine.generate_batch(prompts[:1], **kw)
    assert len(engine.runner.table.row_of) <= 1, f"rows leaked: {sorted(engine.runner.table.row_of)}"


def test_a_step_still_computing_samples_with_the_parameters_it_was_launched_with(make_engine, monkeypatch):
    """CPU overlapped loop: while the compute worker still runs step N, the loop plans step N+1, and a
    request that was cancelled meanwhile leaves the runner's table (its row freed, its sampling
    parameters gone, the row free for a new request). Step N must draw that request's token with
    the parameters it was launched with, and the other requests must not notice."""
    import time

    from workbench.runner import ModelRunner

    greedy_step = ModelRunner._greedy_step

    def slow_greedy_step(self, *args, **kwargs):
        time.sleep(0.05)  # a slower forward: the loop thread always plans the next step meanwhile
        return greedy_step(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "_greedy_step", slow_greedy_step)
    engine = make_engine(overlap=True, max_batch=4)
    drawn = engine.submit(CHATS[0], max_new_tokens=200, temperature=0.9, seed=5, ignore_eos=True)
    others = [engine.submit(c, max_new_tokens=24, temperature=0.7, seed=i, ignore_eos=True)
              for i, c in enumerate(CHATS[1:3])]
    chunks = iter(drawn)
    next(chunks), next(chunks)  # decoding, with its next token being drawn on the worker
    engine.cancel(drawn.request_id)
    assert drawn.result(timeout=60).finish_reason == "cancelled"
    late = engine.submit(CHATS[3], max_new_tokens=24, temperature=0.7, seed=9, ignore_eos=True)  # may take the row
    outs = [h.result(timeout=120) for h in others + [late]]
    assert [o.finish_reason for o in outs] == ["length"] * 3, [o.error for o in outs]
    assert engine.num_failed_steps == 0
    alone = make_engine(overlap=False).generate_batch([CHATS[3]], max_new_tokens=24, temperature=0.7, seed=9,
                                                      ignore_eos=True, progress=False)
    assert outs[2].token_ids == alone[0].token_ids  # its draws depend on its own seed only
