"""The Dashboard object without a browser: drain pattern, streamed outputs, controls, on a real engine."""

from __future__ import annotations

import asyncio
import html
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
            if last is not None and last.block_tables and last.step == dash._last_step:
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
    assert [dash._cards_shown[i][0] for i in range(4)] == ["req-3", "req-2", "req-1", "req-0"]  # newest on top
    assert not dash._cards[4][2].visible
    assert len(set(lengths)) > 2, f"req-0's text did not grow tick by tick: {lengths}"
    assert 'data-testid="counter-ended">4<' in dash.counters_pane.object

    # sliders -> engine.reconfigure, and the config readout follows the engine
    release(dash.max_batch, 2)
    release(dash.token_budget, 64)
    assert engine.config.max_batch == 2 and engine.config.token_budget == 64
    dash.tick()
    assert 'data-testid="cfg-max_batch">2<' in dash.config_pane.object
    assert 'data-testid="cfg-token_budget">64<' in dash.config_pane.object
    # a change made elsewhere (a notebook cell) moves the widgets, without a reconfigure loop
    engine.reconfigure(max_batch=5)
    dash.tick()
    assert dash.max_batch.value == 5 and engine.config.max_batch == 5
    # a bad value lands in the alert, the engine keeps its config
    dash._reconfigure("num_blocks", engine.capacity + 1)
    assert dash.alert.visible and "num_blocks" in dash.alert.object and engine.config.num_blocks == 32
    # no overlapped loop on a CPU: the toggle is shown disabled and says why
    assert dash.overlap.disabled and "CUDA" in dash.overlap.description


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


def test_readme_dashboard_example_runs():
    """The README's notebook example, run as a notebook would (top-level await inside the kernel's loop)."""
    import re
    import textwrap
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Dashboard"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "dash.burst(8)" in code and "await dash.result" in code
    namespace: dict = {}
    exec(compile("async def _cell():\n" + textwrap.indent(code, "    ") + "    return locals()\n", "README.md", "exec"),
         namespace)
    cell = asyncio.run(namespace["_cell"]())
    try:
        out = cell["out"]
        assert out.request_id == "req-0" and out.text and out.finish_reason in ("stop", "length")
        assert cell["dash"]._outputs["req-0"].text == out.text
    finally:
        cell["engine"].stop()
