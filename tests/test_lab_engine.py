"""The tuning lab on the real engine: in-process loads, live config sweeps that lose no request and leak no
block, and a streaming load (and a sweep) through the engine's own OpenAI-compatible HTTP server on loopback."""

from __future__ import annotations

import asyncio

import pytest

import workbench
from workbench import lab

SMALL = dict(num_blocks=48, max_batch=4, token_budget=64)


def test_in_process_load_records_every_token_and_cache_hits(make_engine):
    engine = make_engine(**SMALL)
    work = lab.SharedPrefixWorkload(num_groups=2, prefix_len=32, suffix_len=4, output_len=5)
    spec = lab.LoadSpec(rate=50.0, num_requests=8, warmup=2, seed=3)
    result = lab.run_load(lab.EngineTarget(engine), work, spec, lab.SLO(ttft_ms=60_000), progress=False)
    s = result.summary
    assert (s["requests"], s["completed"], s["errors"], s["cancelled"]) == (8, 8, 0, 0)
    measured = [r for r in result.records if not r.warmup]
    assert all(r.output_tokens == 5 and len(r.token_times) == 5 and r.prompt_tokens == 36 for r in measured)
    assert all(r.sent <= r.first_token == r.token_times[0] <= r.token_times[-1] <= r.end for r in measured)
    assert s["cached_tokens"] > 0  # the warm-up filled the cache with both prefixes: later prompts hit it
    assert s["preemptions"] is not None and s["goodput_pct"] == 100.0
    assert result.config["max_batch"] == 4 and result.target["kind"] == "engine"
    engine.check_invariants()


def test_bad_requests_are_counted_and_the_load_goes_on(make_engine, tmp_path):
    engine = make_engine(**SMALL)
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": [1, 2, 3], "max_tokens": 2}\n{"prompt": [1, 2, 3], "max_tokens": 100000}\n')
    result = lab.run_load(lab.EngineTarget(engine), lab.JsonlWorkload(str(p)), lab.LoadSpec(num_requests=6),
                          progress=False)
    s = result.summary
    assert (s["completed"], s["errors"]) == (3, 3)
    assert any("max_new_tokens" in m for m in s["error_messages"])


def test_live_config_sweep_loses_no_request_and_leaks_no_block(make_engine):
    engine = make_engine(**SMALL)
    grid = {"max_batch": [1, 3], "token_budget": [16, 64]}
    spec = lab.LoadSpec(num_requests=4, seed=1)  # all at once: every point queues and batches
    work = lab.RandomWorkload(input_len=20, output_len=3)
    sweep = asyncio.run(lab.config_sweep(lab.EngineTarget(engine), work, grid, spec, lab.SLO(ttft_ms=60_000),
                                         restart_s=1.0))
    assert [(p.config["max_batch"], p.config["token_budget"]) for p in sweep.points] == [(1, 16), (1, 64), (3, 16),
                                                                                        (3, 64)]
    assert all(p.summary["completed"] == 4 and p.summary["errors"] == 0 for p in sweep.points)
    assert all(p.config["num_blocks"] == 48 for p in sweep.points)
    # each point has prompts of its own: the prefix cache filled by one point never serves the next
    assert all(p.summary["cached_tokens"] == 0 for p in sweep.points)
    assert (engine.config.max_batch, engine.config.token_budget) == (4, 64)  # restored
    assert sweep.restart_wall_s == pytest.approx(sum(p.wall_s for p in sweep.points) - sum(sweep.reconfigure_s) + 4.0)
    assert len(sweep.frontier()) >= 1 and sweep.recommend() is not None
    engine.check_invariants()


def test_a_decode_steps_sweep_runs_each_point_live(make_engine):
    """decode_steps is sweepable: each point applied live, every request done, the points' runs as set."""
    engine = make_engine(**SMALL)
    spec = lab.LoadSpec(num_requests=4, seed=2)
    work = lab.RandomWorkload(input_len=12, output_len=12)
    sweep = asyncio.run(lab.config_sweep(lab.EngineTarget(engine), work, {"decode_steps": [1, 6]}, spec,
                                         lab.SLO(ttft_ms=60_000)))
    assert [p.config["decode_steps"] for p in sweep.points] == [1, 6]
    assert all(p.summary["completed"] == 4 and p.summary["errors"] == 0 for p in sweep.points)
    longest = max(x.num_tokens for s in engine.telemetry.steps() for x in s.slots if x.kind == "decode")
    assert longest == 6, "the last point ran decode runs of 6 steps"
    assert engine.config.decode_steps == 1  # restored
    engine.check_invariants()


def test_reconfigure_during_a_load_loses_nothing(make_engine):
    """Knobs move (max batch, token budget, usable blocks, decode runs) while requests stream: all finish,
    no block leaks."""
    engine = make_engine(**SMALL)
    target = lab.EngineTarget(engine)

    async def main():
        test = lab.LoadTest(target, lab.RandomWorkload(input_len=24, output_len=6), lab.LoadSpec(rate=40.0,
                                                                                                 num_requests=10))
        task = asyncio.create_task(test.run())
        for changes in ({"max_batch": 1}, {"token_budget": 8}, {"num_blocks": 24}, {"max_batch": 4, "num_blocks": 48},
                        {"decode_steps": 5}, {"token_budget": 64}):
            await asyncio.sleep(0.3)
            await target.reconfigure(**changes)
        return await asyncio.wait_for(task, 300)

    result = asyncio.run(main())
    s = result.summary
    assert (s["completed"], s["errors"], s["cancelled"]) == (10, 0, 0)
    assert all(r.output_tokens == 6 for r in result.records)
    engine.check_invariants()


def test_load_and_sweep_through_the_http_server(make_engine):
    engine = make_engine(**SMALL)
    server = workbench.serve_api(engine, port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        target = lab.OpenAITarget(server.url)
        work = lab.RandomWorkload(input_len=16, output_len=4)
        result = lab.run_load(target, work, lab.LoadSpec(rate=20.0, num_requests=5, seed=2), progress=False)
        s = result.summary
        assert (s["completed"], s["errors"]) == (5, 0), s["error_messages"]
        ok = [r for r in result.records if r.ok]
        assert all(r.output_tokens == 4 and r.prompt_tokens == 16 for r in ok)  # usage from the server
        assert all(len(set(r.token_times)) >= 2 for r in ok)  # streamed: chunks arrived at different times
        assert result.config.get("max_batch") == 4  # read from GET /v1/engine/config
        sweep = asyncio.run(lab.config_sweep(target, work, {"max_batch": [1, 2]},
                                             lab.LoadSpec(num_requests=3)))
        assert [p.config["max_batch"] for p in sweep.points] == [1, 2]
        assert all(p.summary["completed"] == 3 for p in sweep.points)
        assert engine.config.max_batch == 4  # restored over HTTP
        with pytest.raises(ValueError, match="max_batch"):
            asyncio.run(_bad_config(target))
    finally:
        server.stop()
    engine.check_invariants()


async def _bad_config(target: lab.OpenAITarget) -> None:
    await target.open()
    try:
        await target.reconfigure(max_batch=0)
    finally:
        await target.close()


def test_url_target_refuses_a_non_http_url():
    with pytest.raises(ValueError, match="base_url"):
        lab.OpenAITarget("127.0.0.1:8000")
