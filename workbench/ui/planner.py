"""The dashboard's tick as a pure planner: a telemetry snapshot in, the updates to draw out.

`plan(state, snapshot, applied, options)` folds the new steps and events into
`TickState` (which the dashboard owns) and returns a `Plan`: for each data
source one stream, patch or replace, the HTML of the texts, the axis ranges,
where the config widgets should move, and the KV slider's floor. Nothing here
imports Panel or Bokeh or touches the engine, so every rule of the view is
unit-tested on hand-made records; the dashboard's `_apply` only copies a Plan
into its models.

Counters, plots and texts all come from the same `Snapshot` (one lock, one
`now`), so they never disagree with each other. Config rule: after the UI
posts a change (`TickState.posted`), the widgets never move back to an older
applied config; the readout shows "pending" until the engine has applied it.
"""

from __future__ import annotations

import ast
import html
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from ..telemetry import Snapshot, StepRecord, gpu_busy
from . import data

Op = Literal["stream", "patch", "replace"]
# Counters say "step N running for X s" once the engine has work and no step ended for this long.
STALL_S = 1.0


@dataclass(frozen=True, slots=True)
class Options:
    """What the view is drawn for: fixed for one dashboard."""

    capacity: int
    block_size: int
    device: str = "cpu"
    t0: float = 0.0  # the telemetry's clock origin: x axes read "seconds since the engine started"
    window_steps: int = 300
    span_steps: int = 40
    timeline_rows: int = 16


@dataclass(slots=True)
class TickState:
    """Everything folded from telemetry so far, and what the view already shows."""

    last_step: int = -1
    last_seq: int = -1
    context: dict[str, int] = field(default_factory=dict)
    log: data.RequestLog = field(default_factory=data.RequestLog)
    recent: deque = field(default_factory=lambda: deque(maxlen=64))
    last_record: StepRecord | None = None
    preemptions: int = 0
    kv_cols: data.Columns = field(default_factory=dict)
    kv_key: tuple = ()
    kv_resync: bool = False
    bars_active: bool = False
    bars_at: float = 0.0
    marks_sent: data.Columns = field(default_factory=dict)
    rows_shown: tuple[int, ...] = ()
    slot_view: tuple = ()
    step_view: tuple = ()
    shown_config: dict[str, Any] | None = None
    shown_readout: tuple = ()
    posted: dict[str, Any] | None = None
    kv_min: int = 1


@dataclass(slots=True)
class Update:
    source: str
    op: Op
    columns: Any
    rollover: int | None = None


@dataclass(slots=True)
class Plan:
    """What one tick changes; None / empty means "leave as it is"."""

    updates: list[Update] = field(default_factory=list)
    counters_html: str = ""
    spans_html: str = ""
    config_html: str | None = None
    widgets: dict[str, Any] | None = None
    kv_min: int | None = None
    kv_min_reason: str | None = None
    timeline_rows: tuple[float, float, list[int], dict[int, str]] | None = None
    slot_view: tuple[float, float, float, float] | None = None
    step_view: tuple[float, float] | None = None
    states: dict[str, str] = field(default_factory=dict)


def new_state(options: Options, config: dict[str, Any]) -> TickState:
    """A state before anything is drawn (the KV grid empty, the widgets at `config`)."""
    st = TickState(recent=deque(maxlen=max(options.span_steps, 64)))
    st.kv_cols = data.kv_cells(None, options.capacity, options.block_size, {}, config["num_blocks"])
    return st


def plan(st: TickState, snap: Snapshot, applied: dict[str, Any], opt: Options) -> Plan:
    """Fold `snap` into `st` and say what to draw. `applied` is the engine's live config (LIVE_FIELDS)."""
    out = Plan()
    steps, events, now = snap.steps, snap.events, snap.now
    first = st.last_step < 0 and st.last_seq < 0
    if steps:
        st.last_step, st.last_record = steps[-1].step, steps[-1]
    if events:
        st.last_seq = events[-1].seq
    data.fold_context(st.context, steps)
    data.fold_requests(st.log, events)
    st.log.prune(4 * opt.timeline_rows)
    st.recent.extend(steps[-st.recent.maxlen:])
    st.preemptions += sum(len(r.preempted) for r in steps)
    rows = st.log.recent(opt.timeline_rows)
    by_id = {s.request_id: s for s in rows}

    window, x0, x1 = data.slot_window(st.last_step, applied["max_batch"], opt.window_steps)
    draw = steps[-window:] if first else steps
    if draw:
        out.updates.append(Update("slots", "stream", data.slot_cells(draw), window * max(8, applied["max_batch"])))
        out.updates.append(Update("chunks", "stream", data.prefill_chunks(draw, by_id, opt.t0), 400))
        out.updates.append(Update("spans", "stream", data.span_quads(draw[-opt.span_steps:], opt.t0),
                                  5 * opt.span_steps))
        out.updates.append(Update("steps", "stream", data.step_bars(draw[-opt.span_steps:]), 5 * opt.span_steps))
    view = (x0, x1, applied["max_batch"] - 0.5, -0.5)
    if view != st.slot_view:
        st.slot_view = out.slot_view = view
    s1 = max(st.last_step, opt.span_steps - 1) + 0.5
    if (s1 - opt.span_steps, s1) != st.step_view:
        st.step_view = out.step_view = (s1 - opt.span_steps, s1)

    _plan_kv(st, out, steps, now, applied, opt)
    _plan_timeline(st, out, rows, by_id, events, now, opt.t0)
    out.counters_html = counters_html(_counters(st, now, applied))
    recent = list(st.recent)[-opt.span_steps:]
    out.spans_html = spans_html(gpu_busy(recent), data.host_ms(recent), data.forward_share(recent), opt.device)
    _plan_config(st, out, events, applied, opt)
    out.states = {rid: data.request_state(s) for rid, s in st.log.by_id.items() if s.end is None}
    return out


def _plan_kv(st: TickState, out: Plan, steps: list[StepRecord], now: float, applied: dict[str, Any],
             opt: Options) -> None:
    """The KV grid: patch changed cells; once the engine is quiet for a second, send it whole (self-healing)."""
    key = (st.last_step, applied["num_blocks"])
    if key != st.kv_key or st.kv_resync:
        new = data.kv_cells(st.last_record, opt.capacity, opt.block_size, st.context, applied["num_blocks"])
        st.kv_key = key
    else:
        new = st.kv_cols
    patch = data.column_patch(st.kv_cols, new)
    if patch:
        st.kv_cols, st.kv_resync = new, True
        out.updates.append(Update("kv", "patch", patch))
    elif st.kv_resync and not steps and st.last_record is not None and now - st.last_record.t_end > 1.0:
        st.kv_resync = False
        out.updates.append(Update("kv", "replace", {k: list(v) for k, v in new.items()}))


def _plan_timeline(st: TickState, out: Plan, rows: list[data.RequestSummary], by_id: dict, events: list,
                   now: float, t0: float) -> None:
    """Gantt bars (redrawn on milestones, and at ~2 Hz while requests run), token ticks, marks, rows."""
    active = any(s.end is None for s in rows)
    milestones = any(e.kind not in ("token", "first_token") for e in events)
    if milestones or (st.bars_active and not active) or (active and now - st.bars_at >= 0.5):
        out.updates.append(Update("bars", "replace", data.timeline_bars(rows, t0, now)))
        st.bars_active, st.bars_at = active, now
    if events:
        out.updates.append(Update("ticks", "stream", data.token_ticks(
            [e for e in events if e.request_id in by_id], by_id, t0), 4000))
    if milestones:
        marks = data.timeline_marks(rows, t0)
        if marks != st.marks_sent:
            out.updates.append(Update("marks", "replace", marks))
            st.marks_sent = marks
    shown = tuple(s.row for s in rows)
    if rows and shown != st.rows_shown:
        st.rows_shown = shown
        first, last = rows[0].row, rows[-1].row
        out.timeline_rows = (max(last, first + len(rows) - 1) + 0.5, first - 0.5, list(shown),
                             {s.row: s.request_id for s in rows})


def _counters(st: TickState, now: float, applied: dict[str, Any]) -> data.Counters:
    c = data.counters(list(st.recent), st.log, st.preemptions, now)
    if st.last_record is None:
        c.free_blocks = c.num_blocks = applied["num_blocks"]
    live = [s.queued for s in st.log.by_id.values() if s.end is None and s.queued is not None]
    if live and st.last_record is not None:
        since = max(st.last_record.t_end, min(live))  # an idle engine's quiet time is no step's time
        if now - since > STALL_S:
            c.running_for = now - since
    return c


def _plan_config(st: TickState, out: Plan, events: list, applied: dict[str, Any], opt: Options) -> None:
    """Widgets follow the applied config only while nothing the UI posted is still pending."""
    if st.posted is not None:
        applied_ours = any(e.kind == "reconfigured" and _config_of(e.detail) == _live(st.posted) for e in events)
        if _live(applied) == _live(st.posted) or applied_ours:
            st.posted = None
    if st.posted is None and applied != st.shown_config:
        st.shown_config = dict(applied)
        out.widgets = dict(applied)
    floor, who = data.kv_floor(st.log, opt.block_size)
    floor = min(floor, applied["num_blocks"], opt.capacity)
    if floor != st.kv_min:
        st.kv_min = out.kv_min = floor
        out.kv_min_reason = who
    readout = (tuple(sorted(applied.items())), None if st.posted is None else tuple(sorted(st.posted.items())),
               st.kv_min)
    if readout != st.shown_readout:
        st.shown_readout = readout
        out.config_html = config_html(applied, st.posted, opt.capacity, st.kv_min)


def _live(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "overlap"}


def _config_of(detail: str) -> dict[str, Any] | None:
    """The live config a `reconfigured` event carries (a dict repr), or None."""
    try:
        value = ast.literal_eval(detail)
    except (ValueError, SyntaxError):
        return None
    return _live(value) if isinstance(value, dict) else None


# ===================================================================== HTML of the texts
def counters_html(c: data.Counters) -> str:
    step = str(max(c.step, 0)) if c.running_for is None else (
        f'{c.step + 1} <span data-testid="running-for">running for {c.running_for:.1f} s</span>')
    items = [("running", c.running), ("waiting", c.waiting), ("ended", c.finished),
             ("tokens/s", f"{c.tokens_per_s:.1f}"), ("free blocks", f"{c.free_blocks}/{c.num_blocks}"),
             ("step time", "-" if c.step_ms is None else f"{c.step_ms:.0f} ms"), ("step", step),
             ("preemptions", c.preemptions), ("prefix hits", f"{100 * c.prefix_hit_rate:.0f}%")]
    cells = "".join(f'<div class="wb-counter"><div class="v" data-testid="counter-{k.split()[0].split("/")[0]}">'
                    f'{v}</div><div class="k">{k}</div></div>' for k, v in items)
    return f'<div class="wb-counters">{cells}</div>'


def config_html(cfg: dict[str, Any], posted: dict[str, Any] | None, capacity: int, kv_min: int = 1) -> str:
    """The applied config, and while a posted change waits for the next step boundary, what is pending."""
    parts = [f'max_batch=<b data-testid="cfg-max_batch">{cfg["max_batch"]}</b>',
             f'num_blocks=<b data-testid="cfg-num_blocks">{cfg["num_blocks"]}</b>/{capacity}',
             f'token_budget=<b data-testid="cfg-token_budget">{cfg["token_budget"]}</b>',
             f'policy=<b data-testid="cfg-policy">{cfg["policy"]}</b>',
             f'prefix_caching=<b>{cfg["prefix_caching"]}</b>', f'overlap=<b>{cfg.get("overlap")}</b>',
             f'decode_steps=<b data-testid="cfg-decode_steps">{cfg.get("decode_steps")}</b>']
    text = '<div class="wb-config">engine config: ' + " &middot; ".join(parts)
    if posted is not None:
        diff = ", ".join(f"{k} {html.escape(str(cfg[k]))} &rarr; {html.escape(str(v))}"
                         for k, v in posted.items() if cfg.get(k) != v) or "re-applying"
        text += (f' <span data-testid="cfg-pending" style="color:#8a6d3b;background:#fcf8e3;padding:0 4px">'
                 f'pending until the running step ends: {diff}</span>')
    if kv_min > 1:
        text += (f' <span data-testid="kv-floor" style="color:#555">&middot; usable KV blocks &ge; {kv_min} while '
                 f'the largest live request may need them</span>')
    return text + "</div>"


def spans_html(busy: float | None, host: float | None, fwd: float | None, device: str) -> str:
    lane = "GPU" if device == "cuda" else "compute worker"
    if busy is not None:  # telemetry.gpu_busy: the same figure README and the bench report
        text = f"{lane} busy over the last steps: <b data-testid='gpu-busy'>{100 * busy:.0f}%</b>"
    else:
        text = (f"{lane} busy: <b data-testid='gpu-busy'>n/a</b> ({device}: no compute spans recorded; "
                "the forward runs on the loop thread)")
    if host is not None:
        text += f" &middot; host work per step (median): <b data-testid='host-ms'>{host:.2f} ms</b>"
    if fwd is not None:
        text += f" &middot; forward share of step time: <b>{100 * fwd:.0f}%</b>"
    return f"<span style='font-family:sans-serif;font-size:12px'>{text}</span>"
