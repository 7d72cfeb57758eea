"""The Dashboard object without a browser: drain pattern, streamed outputs, controls, on a real engine."""

from __future__ import annotations

import asyncio
import html
import time
from collections import Counter

import param
import pytest

pn = pytest.importorskip("panel")

from bokeh.document import Document  # noqa: E402
from bokeh.document.events import ColumnDataChangedEvent, ColumnsPatchedEvent, ColumnsStreamedEvent  # noqa: E402

from workbench.ui import Dashboard  # noqa: E402
from workbench.ui import data  # noqa: E402


def attach(dash: Dashboard) -> list:
    """Put the dashboard's models in a Document and collect every data change made to its sources."""
    doc = Document()
    doc.add_root(dash.layout.get_root(doc))
    assert dash.sources["slots"].document is doc
    changes: list = []

    def on_change(event) -> None:
        if isinstance(event, (ColumnsStreamedEvent, ColumnsPatchedEvent)):
            changes.append(event.model.name)
        elif isinstance(event, ColumnDataChangedEvent):
            changes.append(event.model.name)
        elif getattr(event, "attr", None) == "data":
            changes.append(event.model.name)

    doc.on_change(on_change)
    return changes


def release(slider, value: int) -> None:
    """What letting go of a slider in the page does: value, then value_throttled."""
    slider.value = value
    with param.edit_constant(slider):
        slider.value_throttled = value


def wait_applied(engine, dash, timeout: float = 60.0, **expected) -> None:
    """Tick until the engine applied `expected` and nothing posted is pending (the loop applies at a step boundary)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dash.tick()
        if all(getattr(engine.config, k) == v for k, v in expected.items()) and dash.state.posted is None:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine config {engine.config} never reached {expected}")


def test_dashboard_drains_telemetry_streams_outputs_and_applies_controls(make_engine):
    engine = make_engine(max_batch=3, num_blocks=32)
    dash = Dashboard(engine, max_new_tokens=12)
    changes = attach(dash)
    per_tick: list[Counter] = []
    kv_checked = []
    lengths: list[int] = []

    async def run():
        handles = dash.burst(4)  # inside a running loop: each output streams through its own task
        assert [h.request_id for h in handles] == [f"req-{i}" for i in range(4)]
        while not all(h.done for h in handles):
            await asyncio.sleep(0.1)
            start = len(changes)
            dash.tick()
            per_tick.append(Counter(changes[start:]))
            lengths.append(len(dash._outputs["req-0"].text))
            last = engine.telemetry.last_step()
            if last is not None and last.block_tables and last.step == dash.state.last_step:
                owners = {o for o in dash.sources["kv"].data["owner"] if o}
                kv_checked.append(owners == set(last.block_tables))
        await asyncio.sleep(0.05)
        dash.tick()
        return [h.output for h in handles]

    outputs = asyncio.run(run())
    # one stream/patch/replace per source per tick, never two
    assert per_tick and all(max(c.values(), default=0) <= 1 for c in per_tick), per_tick
    assert any(c["slot-cells"] for c in per_tick) and any(c["kv-cells"] for c in per_tick)
    # the sources hold exactly what telemetry recorded
    steps = engine.telemetry.steps()
    assert len(dash.sources["slots"].data["step"]) == sum(len(r.slots) for r in steps)
    assert dash.sources["slots"].data["request_id"] == data.slot_cells(steps)["request_id"]
    assert sorted(set(dash.sources["ticks"].data["request_id"])) == [o.request_id for o in outputs]
    assert len(dash.sources["ticks"].data["t"]) == sum(len(o.token_ids) for o in outputs)
    assert kv_checked and all(kv_checked)
    assert set(dash.sources["kv"].data["state"]) == {"free"}  # everything ended: every block free again
    # every output pane streamed, then ended with the request's own text
    for out in outputs:
        shown = dash._outputs[out.request_id]
        assert shown.text == out.text and shown.tokens == len(out.token_ids) and shown.reason == out.finish_reason
        pane, cancel = dash._card_for(out.request_id)
        assert f'data-rid="{out.request_id}"' in pane.object and cancel.disabled
    assert [dash._cards[i].shown[0] for i in range(4)] == ["req-3", "req-2", "req-1", "req-0"]  # newest on top
    assert not dash._cards[4].row.visible
    assert len(set(lengths)) > 2, f"req-0's text did not grow tick by tick: {lengths}"
    assert 'data-testid="counter-ended">4<' in dash.counters_pane.object

    # sliders -> engine.reconfigure(wait=False): posted, pending, then applied and shown
    release(dash.max_batch, 2)
    release(dash.token_budget, 64)
    assert dash.state.posted["max_batch"] == 2 and dash.state.posted["token_budget"] == 64
    wait_applied(engine, dash, max_batch=2, token_budget=64)
    assert 'data-testid="cfg-max_batch">2<' in dash.config_pane.object
    assert 'data-testid="cfg-token_budget">64<' in dash.config_pane.object
    assert 'cfg-pending' not in dash.config_pane.object
    # a change made elsewhere (a notebook cell) moves the widgets, without a reconfigure loop
    engine.reconfigure(max_batch=5)
    dash.tick()
    assert dash.max_batch.value == 5 and engine.config.max_batch == 5 and dash.state.posted is None
    # a bad value lands in the alert, the engine keeps its config
    dash._reconfigure("num_blocks", engine.capacity + 1)
    assert dash.alert.visible and "num_blocks" in dash.alert.object and engine.config.num_blocks == 32
    # the loop toggle is live on a CPU too (the compute worker runs step N while the host prepares N+1)
    assert not dash.overlap.disabled and "compute worker" in dash.overlap.description


def test_loop_toggle_on_a_cpu_overlaps_host_work_with_compute(make_engine):
    """The dashboard's sync/overlap toggle on a CPU engine: in the overlapped loop the host starts
    a step before the compute worker has finished the one before (what the spans view draws as
    host and compute lanes side by side); in the sync loop it never does."""
    from workbench.telemetry import gpu_busy

    engine = make_engine(max_batch=4, overlap=False)
    dash = Dashboard(engine, max_new_tokens=16)
    prompts = [[{"role": "user", "content": q}] for q in ("Say hi.", "Name a fruit.", "Count to five.", "Why?")]

    def run_and_measure() -> tuple[int, int]:
        first = engine.telemetry.last_step()
        engine.generate_batch(prompts, max_new_tokens=24, ignore_eos=True, progress=False)
        steps = [s for s in engine.telemetry.steps() if first is None or s.step > first.step]
        ahead = sum(b.t_start < a.gpu_end for a, b in zip(steps, steps[1:]) if a.gpu_end is not None)
        assert gpu_busy(steps) is not None
        return ahead, len(steps)

    ahead, n = run_and_measure()
    assert n > 20 and ahead == 0, "sync: a step's host work never starts before the last compute ended"
    dash.overlap.value = "overlap"  # the toggle posts reconfigure(overlap=True)
    deadline = time.monotonic() + 30
    while not engine.config.overlap and time.monotonic() < deadline:
        dash.tick()
        time.sleep(0.05)
    assert engine.config.overlap
    ahead, n = run_and_measure()
    assert ahead > n // 2, f"overlapped: only {ahead} of {n} steps started before the last compute ended"
    assert all(s.overlapped for s in engine.telemetry.steps()[-n:])


def test_rapid_slider_moves_end_with_widgets_readout_and_engine_equal(make_engine):
    """Quick drags of different sliders while requests run: the last write wins everywhere, and nothing waits."""
    engine = make_engine(max_batch=2, num_blocks=48)
    dash = Dashboard(engine, max_new_tokens=24)
    calls: list[dict] = []
    reconfigure = engine.reconfigure

    def spy(**kw):  # the real call, recorded
        calls.append(kw)
        return reconfigure(**kw)

    engine.reconfigure = spy

    async def run():
        handles = dash.burst(4)
        while engine.telemetry.last_step() is None:
            await asyncio.sleep(0.02)
        for key, value in (("max_batch", 3), ("token_budget", 100), ("num_blocks", 40), ("max_batch", 1),
                           ("token_budget", 300), ("max_batch", 4)):
            release(getattr(dash, key), value)
        dash.tick()
        pending = dash.config_pane.object
        wait_applied(engine, dash, max_batch=4, token_budget=300, num_blocks=40)
        for h in handles:
            await dash.result(h)
        dash.tick()
        return pending, [h.output for h in handles]

    pending, outputs = asyncio.run(run())
    want = {"max_batch": 4, "token_budget": 300, "num_blocks": 40}
    assert {k: getattr(engine.config, k) for k in want} == want
    assert {k: getattr(dash, k).value for k in want} == want
    for k, v in want.items():
        assert f'data-testid="cfg-{k}">{v}<' in dash.config_pane.object
    assert "cfg-pending" not in dash.config_pane.object
    # six posts, none waiting on the loop, each the whole desired config (so no post undoes another)
    assert len(calls) == 6 and all(c["wait"] is False and set(c) > {"max_batch", "token_budget", "num_blocks"}
                                   for c in calls)
    assert calls[-1]["max_batch"] == 4 and calls[-1]["token_budget"] == 300 and calls[-1]["num_blocks"] == 40
    assert 'data-testid="cfg-pending"' in pending or engine.config.max_batch == 4
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    engine.check_invariants()


def test_kv_shrink_is_clamped_to_the_largest_live_request_and_only_preempts(make_engine):
    engine = make_engine(max_batch=2, num_blocks=32)
    dash = Dashboard(engine)

    async def run():
        prompts = [f"Count from {n} to one hundred, slowly." for n in (1, 50)]
        handles = [dash.submit(p, max_new_tokens=60, ignore_eos=True) for p in prompts]
        need = max(-(-(len(engine.tokenize([{"role": "user", "content": p}])) + 60) // 16) for p in prompts)
        while dash.state.kv_min < need:  # the floor arrives with the requests' queued events
            await asyncio.sleep(0.02)
            dash.tick()
        release(dash.num_blocks, 1)  # what dragging the slider to its left end does
        alert = dash.alert.object if dash.alert.visible else ""
        start = dash.num_blocks.start
        while not all(h.done for h in handles):
            await asyncio.sleep(0.05)
            dash.tick()
        return need, alert, start, [h.output for h in handles]

    need, alert, start, outputs = asyncio.run(run())
    assert engine.config.num_blocks == need and dash.num_blocks.value == need and start == need
    assert f"held at {need}" in alert
    assert [o.finish_reason for o in outputs] == ["length", "length"] and all(len(o.token_ids) == 60 for o in outputs)
    # two requests of `need` blocks each in a cache of `need` blocks: one had to step back and be recomputed
    assert any(r.preempted for r in engine.telemetry.steps())
    engine.check_invariants()
    dash.tick()
    assert dash.num_blocks.start == 1  # nothing live: the whole range is open again


def test_cancel_button_and_submit_outside_an_event_loop(make_engine):
    engine = make_engine(max_batch=2, num_blocks=32)
    dash = Dashboard(engine)

    async def run():
        handle = dash.submit("Count slowly from one to one hundred.", max_new_tokens=200, ignore_eos=True)
        while not handle.done:
            await asyncio.sleep(0.1)
            dash.tick()
            if dash._outputs[handle.request_id].tokens >= 2:
                dash._card_for(handle.request_id)[1].clicks += 1  # what a click in the page does
        dash.tick()
        return handle.output

    out = asyncio.run(run())
    assert out.finish_reason == "cancelled" and 2 <= len(out.token_ids) < 200
    pane, cancel = dash._card_for(out.request_id)
    assert dash._outputs[out.request_id].reason == "cancelled" and cancel.disabled and "cancelled" in pane.object

    # no running event loop (a plain script): nothing can stream, but the final text still arrives
    handle = dash.submit("Say hi.", max_new_tokens=4)
    handle.result(timeout=120)
    dash.tick()
    shown = dash._outputs[handle.request_id]
    assert shown.text == handle.output.text and shown.reason == handle.output.finish_reason
    assert dash._card_for(handle.request_id)[0].object.count(html.escape(handle.output.text)) == 1


def test_docs_dashboard_example_runs():
    """docs/dashboard.md's notebook example, run as a notebook would (top-level await inside the kernel's loop)."""
    import re
    import textwrap
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "dashboard.md").read_text()
    section = doc[doc.index("## In a notebook"):doc.index("## As an app")]
    code = "".join(re.findall(r"```python\n(.*?)```", section, re.S))
    assert "dash.burst(4)" in code and "await dash.result" in code
    namespace: dict = {}
    exec(compile("async def _cell():\n" + textwrap.indent(code, "    ") + "    return locals()\n",
                 "docs/dashboard.md", "exec"), namespace)
    cell = asyncio.run(namespace["_cell"]())
    try:
        out = cell["out"]
        assert out.request_id == "req-0" and out.text and out.finish_reason in ("stop", "length")
        assert cell["dash"]._outputs["req-0"].text == out.text
    finally:
        cell["engine"].stop()
