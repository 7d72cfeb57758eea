"""The dashboard's tick planner without Panel: hand-made telemetry in, the view's updates out.

Each rule a class would hit live is checked here on records whose answer is
known: a posted config is pending until applied and the widgets never move
back to an older one; the KV slider's floor follows the largest live request;
axes stay fixed (slots 0..max_batch-1, no negative steps) at 1 and at 256
slots; a long step reads "running for X s"; live cards are never dropped.
"""

from __future__ import annotations

import sys

import pytest

from workbench.telemetry import RequestEvent, Snapshot, SlotRecord, StepRecord
from workbench.ui import data, planner

OPT = planner.Options(capacity=64, block_size=16, window_steps=300, span_steps=40, timeline_rows=16)
CFG = {"max_batch": 4, "num_blocks": 64, "token_budget": 256, "prefix_caching": True, "policy": "continuous",
       "overlap": None}


def step(i: int, slots, tables, t: float, **kw) -> StepRecord:
    return StepRecord(step=i, t_start=t, t_end=t + 0.1, slots=[SlotRecord(*s) for s in slots], block_tables=tables,
                      shared_blocks=[], num_blocks=64, num_free_blocks=64 - sum(map(len, tables.values())),
                      num_running=len(tables), num_waiting=0, tokens_emitted=len(slots), **kw)


class Events:
    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, rid: str, kind: str, t: float, detail: str = "") -> RequestEvent:
        self.seq += 1
        return RequestEvent(self.seq, t, rid, kind, 0, detail)


def cfg(**kw) -> dict:
    return {**CFG, **kw}


def test_the_planner_imports_no_panel_or_bokeh():
    import subprocess

    code = "import sys, workbench.ui.planner; print(sorted(m for m in sys.modules if m.split('.')[0] in ('panel', 'bokeh')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_posted_config_is_pending_until_applied_and_widgets_never_move_back():
    st = planner.new_state(OPT, CFG)
    first = planner.plan(st, Snapshot([], [], 0.0), cfg(), OPT)
    assert first.widgets == CFG and 'data-testid="cfg-pending"' not in first.config_html
    # two quick drags: the UI posts B, then C (the whole desired config each time)
    st.posted = cfg(num_blocks=20)
    st.posted = cfg(num_blocks=20, token_budget=824)
    p = planner.plan(st, Snapshot([], [], 1.0), cfg(), OPT)          # nothing applied yet
    assert p.widgets is None and 'data-testid="cfg-pending"' in p.config_html
    assert "num_blocks 64 &rarr; 20" in p.config_html and "token_budget 256 &rarr; 824" in p.config_html
    p = planner.plan(st, Snapshot([], [], 2.0), cfg(num_blocks=20), OPT)  # the older post applied first
    assert p.widgets is None, "the widgets moved back to an older applied config"
    assert st.posted is not None and 'data-testid="cfg-num_blocks">20<' in p.config_html
    p = planner.plan(st, Snapshot([], [], 3.0), cfg(num_blocks=20, token_budget=824), OPT)
    assert st.posted is None and p.widgets == cfg(num_blocks=20, token_budget=824)
    assert 'data-testid="cfg-pending"' not in p.config_html
    # a change made elsewhere (a notebook cell) moves the widgets when nothing is pending
    p = planner.plan(st, Snapshot([], [], 4.0), cfg(max_batch=7), OPT)
    assert p.widgets == cfg(max_batch=7)
    p = planner.plan(st, Snapshot([], [], 5.0), cfg(max_batch=7), OPT)
    assert p.widgets is None and p.config_html is None  # nothing changed: nothing sent


def test_pending_ends_when_our_post_was_applied_then_overridden_elsewhere():
    ev = Events()
    st = planner.new_state(OPT, CFG)
    planner.plan(st, Snapshot([], [], 0.0), cfg(), OPT)
    st.posted = cfg(max_batch=2)
    live = {k: v for k, v in cfg(max_batch=2).items()}
    applied_ours = ev("engine", "reconfigured", 1.0, repr(live))
    p = planner.plan(st, Snapshot([], [applied_ours, ev("engine", "reconfigured", 1.1, "{}")], 1.2),
                     cfg(max_batch=9), OPT)
    assert st.posted is None and p.widgets == cfg(max_batch=9)


def test_kv_floor_follows_the_largest_live_request():
    ev = Events()
    st = planner.new_state(OPT, CFG)
    p = planner.plan(st, Snapshot([], [ev("req-0", "queued", 0.0, "70"), ev("req-1", "queued", 0.0, "20")], 0.1),
                     cfg(), OPT)
    assert p.kv_min == 5 and p.kv_min_reason == "req-0"  # 70 tokens need ceil(70 / 16) = 5 blocks
    assert "&ge; 5" in p.config_html
    assert data.kv_floor(st.log, 16) == (5, "req-0")
    p = planner.plan(st, Snapshot([], [ev("req-0", "finished", 1.0, "length")], 1.1), cfg(), OPT)
    assert p.kv_min == 2  # req-1's 20 tokens: 2 blocks
    p = planner.plan(st, Snapshot([], [ev("req-1", "cancelled", 2.0)], 2.1), cfg(), OPT)
    assert p.kv_min == 1
    # the floor never exceeds the applied size (a request accepted under it fits it)
    st2 = planner.new_state(OPT, CFG)
    assert planner.plan(st2, Snapshot([], [ev("x", "queued", 0.0, "500")], 0.1), cfg(num_blocks=10), OPT).kv_min == 10


@pytest.mark.parametrize("max_batch", [1, 256])
def test_slot_axes_are_fixed_and_never_negative(max_batch):
    st = planner.new_state(OPT, CFG)
    p = planner.plan(st, Snapshot([step(0, [("req-0", 5, "prefill")], {"req-0": [0]}, 0.0)], [], 0.2),
                     cfg(max_batch=max_batch), OPT)
    x0, x1, y0, y1 = p.slot_view
    assert x0 == -0.5 and (y0, y1) == (max_batch - 0.5, -0.5)
    window = x1 - x0
    assert window * max_batch <= 24_000 + max_batch and window >= 20
    slots = next(u for u in p.updates if u.source == "slots")
    assert slots.rollover >= window * max_batch  # the source keeps the whole window
    # much later: the window follows the last step, still never below 0
    late = [step(i, [("req-0", 1, "decode")], {"req-0": [0]}, 0.1 * i) for i in range(1, 1001)]
    p = planner.plan(st, Snapshot(late, [], 200.0), cfg(max_batch=max_batch), OPT)
    x0, x1, _, _ = p.slot_view
    assert x1 == 1000.5 and x0 == 1000.5 - window and x0 >= -0.5


def test_a_long_step_reads_running_for_and_counters_match_the_plots():
    ev = Events()
    st = planner.new_state(OPT, CFG)
    steps = [step(i, [("req-0", 1, "decode")], {"req-0": [0]}, float(i)) for i in range(3)]
    p = planner.plan(st, Snapshot(steps, [ev("req-0", "queued", 0.0, "40"), ev("req-0", "scheduled", 0.0)], 2.2),
                     cfg(), OPT)
    assert 'data-testid="counter-step">2<' in p.counters_html and "running for" not in p.counters_html
    slots = next(u for u in p.updates if u.source == "slots")
    assert max(slots.columns["step"]) == 2  # the counter and the heatmap come from one snapshot
    p = planner.plan(st, Snapshot([], [], 6.1), cfg(), OPT)  # no step ended for 4 s while req-0 is live
    assert 'data-testid="counter-step">3 <span data-testid="running-for">running for 4.0 s' in p.counters_html
    assert p.states == {"req-0": "streaming"}
    p = planner.plan(st, Snapshot([], [ev("req-0", "finished", 6.2, "length")], 9.0), cfg(), OPT)
    assert "running for" not in p.counters_html  # an idle engine is not a long step


def test_an_idle_engine_then_a_new_request_is_not_a_long_step():
    ev = Events()
    st = planner.new_state(OPT, CFG)
    planner.plan(st, Snapshot([step(0, [("a", 3, "prefill")], {"a": [0]}, 0.0)], [ev("a", "queued", 0.0, "4"),
                                                                              ev("a", "finished", 0.1)], 0.2),
                 cfg(), OPT)
    p = planner.plan(st, Snapshot([], [ev("b", "queued", 100.0, "4")], 100.5), cfg(), OPT)
    assert "running for" not in p.counters_html and p.states == {"b": "queued"}
    p = planner.plan(st, Snapshot([], [], 103.0), cfg(), OPT)
    assert "running for 3.0 s" in p.counters_html  # since b arrived, not since the idle engine's last step


def test_step_bars_show_host_phases_on_a_log_axis_and_a_compute_lane_when_recorded():
    r = step(0, [("a", 1, "decode")], {"a": [0]}, 0.0, schedule_s=0.00005, prepare_s=0.0003, forward_s=0.07,
             postprocess_s=0.0001)
    bars = data.step_bars([r])
    assert bars["phase"] == ["schedule", "prepare", "postprocess", "forward"]
    assert bars["bottom"][0] == data.FLOOR_MS and all(b == t0 for b, t0 in zip(bars["bottom"][1:], bars["top"]))
    # on a log axis each band's height is log(top / bottom): every host phase is a visible band (> 5% of a decade)
    import math
    assert all(math.log10(t / b) > 0.05 for b, t in zip(bars["bottom"], bars["top"]))
    assert set(bars["x"]) == {-0.2}
    r.gpu_start, r.gpu_end = 0.001, 0.06
    bars = data.step_bars([r])
    assert bars["phase"][-1] == "compute" and bars["x"][-1] == 0.2 and bars["ms"][-1] == pytest.approx(59.0)


def test_cards_keep_every_live_request():
    live = [f"req-{i}" for i in range(20)]
    ended = [f"done-{i}" for i in range(30)]
    order = data.card_order(live, ended, keep_ended=8)
    assert order[:20] == list(reversed(live)) and order[20:] == [f"done-{i}" for i in range(29, 21, -1)]
    assert data.request_state(None) == "queued"
    s = data.RequestSummary("a", 0, queued=0.0)
    assert data.request_state(s) == "queued"
    s.scheduled = 1.0
    assert data.request_state(s) == "streaming"
    s.preemptions.append(2.0)
    assert data.request_state(s) == "preempted"


def test_spans_note_never_invents_a_gpu_figure_on_a_cpu():
    st = planner.new_state(OPT, CFG)
    r = step(0, [("a", 1, "decode")], {"a": [0]}, 0.0, schedule_s=0.0001, prepare_s=0.0002, forward_s=0.05,
             postprocess_s=0.0003)
    p = planner.plan(st, Snapshot([r], [], 0.2), cfg(), OPT)
    assert "data-testid='gpu-busy'>n/a<" in p.spans_html and "0.60 ms" in p.spans_html
