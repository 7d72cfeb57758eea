"""The dashboard's Load view: its pure plan against numpy on known records and events, and the view on a real
engine (start a load, move a knob, the tiles follow)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from workbench.lab import SLO
from workbench.lab.records import RequestRecord
from workbench.telemetry import RequestEvent
from workbench.ui import data
from workbench.ui.load_view import ITL_COLORS, PHASE_COLORS, itl_color, plan, tiles_html

T0 = 1000.0  # the load's origin on the perf_counter clock


def _events(rid: str, queued: float, scheduled: float, tokens: list[float], preempt: list[float] = (),
            end: float | None = None, kind: str = "finished") -> list[RequestEvent]:
    ev = [("queued", queued), ("scheduled", scheduled)] + [("first_token" if i == 0 else "token", t)
                                                           for i, t in enumerate(tokens)]
    ev += [("preempted", t) for t in preempt]
    if end is not None:
        ev.append((kind, end))
    return [RequestEvent(0, T0 + t, rid, k, 0) for k, t in sorted(ev, key=lambda x: x[1])]


def test_plan_tiles_histograms_and_gantt():
    # three requests: one finished long ago, one finished recently, one still running (preempted once)
    recs = [
        RequestRecord(0, planned=0.0, sent=0.0, first_token=0.5, token_times=[0.5, 0.6, 0.8], end=0.8,
                      output_tokens=3, finish_reason="length", request_id="req-0"),
        RequestRecord(1, planned=8.0, sent=8.0, first_token=8.3, token_times=[8.3, 8.35, 8.9], end=8.9,
                      output_tokens=3, finish_reason="length", request_id="req-1"),
        RequestRecord(2, planned=9.0, sent=9.0, request_id="req-2"),
        RequestRecord(3, planned=9.1, sent=9.1, end=9.1, finish_reason="error", error="too long"),
    ]
    log = data.RequestLog()
    data.fold_requests(log, _events("req-0", 0.0, 0.1, [0.5, 0.6, 0.8], end=0.8)
                       + _events("req-1", 8.0, 8.1, [8.3, 8.35, 8.9], end=8.9)
                       + _events("req-2", 9.0, 9.2, [9.4, 9.45, 9.9], preempt=[9.6]))
    slo = SLO(ttft_ms=400, itl_p99_ms=300)
    view = plan(recs, log, T0, T0 + 10.0, slo, itl_warn_ms=100, stats={"waiting": 1, "running": 1, "preemptions": 1},
                config={"max_batch": 4, "token_budget": 64}, state="running", window_s=5.0)
    # the window (last 5 s) holds req-1 and req-2 (its tokens come from telemetry while it runs)
    ttft_recent = [300.0, 400.0]
    itl_recent = [50.0, 550.0, 50.0, 450.0]
    assert view.raw["ttft_p50"] == pytest.approx(np.percentile(ttft_recent, 50))
    assert view.raw["ttft_p99"] == pytest.approx(np.percentile(ttft_recent, 99))
    assert view.raw["itl_p99"] == pytest.approx(np.percentile(itl_recent, 99))
    assert view.raw["goodput"] == pytest.approx(50.0)  # req-1 good (TTFT 300 <= 400); the error is not
    assert (view.raw["completed"], view.raw["errors"], view.raw["in_flight"]) == (2, 1, 1)
    assert view.tiles["max_batch"] == "4" and view.tiles["waiting"] == "1" and view.tiles["state"] == "running"
    assert sum(view.itl_hist["top"]) == 6 and sum(view.ttft_hist["top"]) == 3  # histograms: whole load
    g = view.gantt
    rows2 = [i for i, r in enumerate(g["row"]) if r == 2]
    assert [g["phase"][i] for i in rows2] == ["queued", "prefill", "decode", "decode", "preempted"]
    assert [round(g["left"][i], 3) for i in rows2] == [9.0, 9.2, 9.4, 9.45, 9.6]
    assert [round(g["right"][i], 3) for i in rows2] == [9.2, 9.4, 9.45, 9.9, 9.9]  # preempted until the next token
    assert [g["color"][i] for i in rows2[2:4]] == [ITL_COLORS[0], ITL_COLORS[2]]  # 50 ms <= warn; 450 > SLO
    assert g["color"][rows2[4]] == PHASE_COLORS["preempted"]
    assert "too long" in " ".join(view.marks["label"]) and 9.6 in [round(t, 3) for t in view.marks["t"]]
    html = tiles_html(view.tiles, slo, view.raw)
    assert 'data-testid="tile-itl_p99"' in html and "#f8d7da" in html  # p99 ITL over 300 ms: a red tile
    assert itl_color(250, 100, 300) == ITL_COLORS[1]


def test_plan_with_nothing_yet():
    view = plan([], data.RequestLog(), None, 5.0, SLO(), 100, {}, {}, "idle")
    assert view.tiles["itl_p99"] == "-" and view.tiles["goodput"] == "-" and not view.gantt["row"]


def test_view_runs_a_load_and_follows_a_knob(make_engine):
    pytest.importorskip("panel")
    import param

    from workbench.ui.load_view import LoadView

    engine = make_engine(num_blocks=48, max_batch=2, token_budget=64)
    view = LoadView(engine)
    view.input_len.value, view.output_len.value, view.rate.value, view.duration.value = 16, 4, 8.0, 120

    async def main():
        test = view.start()
        assert test is not None and view.start_button.disabled
        for _ in range(600):  # bounded: 60 s
            await asyncio.sleep(0.1)
            if sum(r.ok for r in test.records) >= 3:
                break
        first = view.tick()
        with param.edit_constant(view.max_batch):  # what letting go of the slider sends
            view.max_batch.param.update(value=3, value_throttled=3)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.config.max_batch == 3:
                break
        second = view.tick()
        view.stop_load()
        await asyncio.wait_for(view._task, 60)
        return test, first, second

    test, first, second = asyncio.run(main())
    assert first.raw["completed"] >= 3 and first.tiles["ttft_p50"] != "-" and first.tiles["itl_p50"] != "-"
    assert first.tiles["max_batch"] == "2" and second.tiles["max_batch"] == "3"
    assert engine.config.max_batch == 3
    assert test.state == "stopped" and all(r.end is not None for r in test.records)
    assert set(first.gantt["phase"]) >= {"queued", "prefill", "decode"}
    assert not view.start_button.disabled
