"""The dashboard's Load view: run a load against the engine and see whether a setting meets its SLOs.

    from workbench.ui.load_view import load_view
    load_view(engine)                      # a Panel layout: a notebook cell, or a tab of the dashboard
    python -m workbench.ui.load_view       # served alone (loopback), for a browser

Controls start and stop a load (workload, rate, SLOs), move max batch and the
token budget while it runs (`engine.reconfigure(wait=False)`: the UI thread
never waits on the engine), and run a small config sweep. Views: tiles over
the last few seconds (p50/p99 TTFT and ITL, goodput %, waiting / running,
preemptions), TTFT and ITL histograms, a per-request phase Gantt (queued,
prefill, decode with each inter-token gap coloured against two thresholds,
preempted), and the sweep's settings with the Pareto frontier and the
current setting ringed.

As in the dashboard, what is drawn is a pure function (`plan`) of the load's
records and the engine's telemetry (folded with `workbench.ui.data`), and a
thin `tick` applies it to the Bokeh sources. The load runs as an asyncio task
on the loop of the session (the server's or the notebook kernel's), through
`workbench.lab` and the engine's public API.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..lab.metrics import SLO, is_good
from ..lab.records import RequestRecord
from . import data

if TYPE_CHECKING:
    from ..engine import Engine
    from ..lab.runner import LoadTest
    from ..lab.sweep import Sweep

log = logging.getLogger(__name__)

PHASE_COLORS = {"queued": "#d9d9d9", "prefill": "#9467bd", "preempted": "#8c564b", "error": "#d62728"}
ITL_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")  # gap <= warn, <= SLO, over the SLO
TILE_KEYS = ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "goodput", "completed", "errors", "in_flight", "waiting",
             "running", "preemptions", "max_batch", "token_budget", "state")
GANTT_COLUMNS = ("row", "left", "right", "phase", "color", "request", "detail")


# ====================================================================== the pure part
@dataclass(slots=True)
class ViewData:
    """Everything the view draws at one tick."""

    tiles: dict[str, str]
    raw: dict[str, float | None]
    ttft_hist: data.Columns
    itl_hist: data.Columns
    gantt: data.Columns
    marks: data.Columns
    rows: list[int] = field(default_factory=list)


def _pct(values: Sequence[float], p: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), p)) if len(values) else None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def itl_color(gap_ms: float, warn_ms: float, slo_ms: float) -> str:
    """Green within the warning threshold, orange within the SLO, red past it."""
    return ITL_COLORS[0] if gap_ms <= warn_ms else ITL_COLORS[1] if gap_ms <= slo_ms else ITL_COLORS[2]


def _histogram(values_ms: Sequence[float], bins: int = 24) -> data.Columns:
    cols: data.Columns = {"left": [], "right": [], "top": []}
    if not len(values_ms):
        return cols
    a = np.asarray(values_ms, dtype=float)
    hi = max(float(np.percentile(a, 99.5)) * 1.05, 1.0)
    counts, edges = np.histogram(np.clip(a, 0, hi), bins=bins, range=(0.0, hi))
    return {"left": edges[:-1].tolist(), "right": edges[1:].tolist(), "top": counts.tolist()}


def plan(records: Sequence[RequestRecord], log_: data.RequestLog, t0: float | None, now: float, slo: SLO,
         itl_warn_ms: float, stats: dict[str, Any], config: dict[str, Any], state: str = "idle",
         window_s: float = 5.0, rows: int = 24) -> ViewData:
    """Tiles, histograms and the phase Gantt from the load's records and the engine's folded request events.

    `records` are the load's (times in seconds since `t0`, a perf_counter value);
    `log_` holds the engine's request events (perf_counter times), so tokens of a
    request still running count at once. Tiles cover the last `window_s` seconds, so
    a moved slider shows within seconds; histograms cover the whole load.
    """
    origin = t0 if t0 is not None else now
    rel_now = now - origin
    itl_slo = slo.itl_p99_ms if slo.itl_p99_ms is not None else 2 * itl_warn_ms
    ttft_recent, ttft_all, itl_recent, itl_all, ended = [], [], [], [], []
    gantt: data.Columns = {k: [] for k in GANTT_COLUMNS}
    marks: data.Columns = {k: [] for k in ("row", "t", "color", "request", "label")}
    sent = [r for r in records if r.sent is not None and not r.warmup]
    shown = _gantt_rows_shown(sent, log_, rows)
    for r in sent:
        s = log_.by_id.get(r.request_id) if r.request_id else None
        first = (s.first_token - origin) if s is not None and s.first_token is not None else r.first_token
        tokens = [t - origin for t in s.token_times] if s is not None and s.token_times else r.token_times
        if first is not None:
            ttft = 1e3 * (first - r.sent)
            ttft_all.append(ttft)
            if rel_now - first <= window_s:
                ttft_recent.append(ttft)
        for a, b in zip(tokens, tokens[1:]):
            gap = 1e3 * (b - a)
            itl_all.append(gap)
            if rel_now - b <= window_s:
                itl_recent.append(gap)
        if r.end is not None and rel_now - r.end <= window_s:
            ended.append(r)
        if r.index in shown:
            _gantt_rows(gantt, marks, r, s, origin, rel_now, first, tokens, itl_warn_ms, itl_slo)
    good = sum(is_good(r, slo) for r in ended)
    raw: dict[str, float | None] = {
        "ttft_p50": _pct(ttft_recent, 50), "ttft_p99": _pct(ttft_recent, 99),
        "itl_p50": _pct(itl_recent, 50), "itl_p99": _pct(itl_recent, 99),
        "goodput": 100.0 * good / len(ended) if ended else None,
        "completed": sum(r.ok for r in sent), "errors": sum(r.end is not None and not r.ok for r in sent),
        "in_flight": sum(r.end is None for r in sent),
    }
    tiles = {"ttft_p50": _ms(raw["ttft_p50"]), "ttft_p99": _ms(raw["ttft_p99"]), "itl_p50": _ms(raw["itl_p50"]),
             "itl_p99": _ms(raw["itl_p99"]), "goodput": "-" if raw["goodput"] is None else f"{raw['goodput']:.0f}%",
             "completed": str(raw["completed"]), "errors": str(raw["errors"]), "in_flight": str(raw["in_flight"]),
             "waiting": str(stats.get("waiting", "-")), "running": str(stats.get("running", "-")),
             "preemptions": str(stats.get("preemptions", "-")), "max_batch": str(config.get("max_batch", "-")),
             "token_budget": str(config.get("token_budget", "-")), "state": state}
    return ViewData(tiles, raw, _histogram(ttft_all), _histogram(itl_all), gantt, marks, sorted(shown))


def _gantt_rows_shown(sent: Sequence[RequestRecord], log_: data.RequestLog, rows: int) -> set[int]:
    """The newest requests that started (scheduled or ended), and the oldest few still queued behind them.

    Under overload the newest requests are all still queued: showing only those would hide every
    decode, so three quarters of the rows go to requests that got into the batch.
    """
    def started(r: RequestRecord) -> bool:
        s = log_.by_id.get(r.request_id) if r.request_id else None
        return r.end is not None or (s is not None and s.scheduled is not None)

    queued_rows = rows // 4
    active = [r for r in sent if started(r)]
    waiting = [r for r in sent if not started(r)]
    return {r.index for r in active[-(rows - min(queued_rows, len(waiting))):] + waiting[:queued_rows]}


def _gantt_rows(gantt: data.Columns, marks: data.Columns, r: RequestRecord, s: data.RequestSummary | None,
                origin: float, rel_now: float, first: float | None, tokens: list[float], warn_ms: float,
                slo_ms: float) -> None:
    """One request's phases: queued -> prefill -> decode gaps (ITL-coloured); preemptions; a failed end."""
    end = r.end if r.end is not None else rel_now
    scheduled = (s.scheduled - origin) if s is not None and s.scheduled is not None else first
    preempts = [p - origin for p in s.preemptions] if s is not None else []

    def bar(left: float, right: float, phase: str, color: str, detail: str) -> None:
        gantt["row"].append(r.index)
        gantt["left"].append(left)
        gantt["right"].append(max(left, right))
        gantt["phase"].append(phase)
        gantt["color"].append(color)
        gantt["request"].append(r.request_id or f"#{r.index}")
        gantt["detail"].append(detail)

    queued_end = scheduled if scheduled is not None else end
    bar(r.sent, queued_end, "queued", PHASE_COLORS["queued"], f"{1e3 * (queued_end - r.sent):.0f} ms")
    if scheduled is not None:
        prefill_end = first if first is not None else end
        bar(scheduled, prefill_end, "prefill", PHASE_COLORS["prefill"], f"{1e3 * (prefill_end - scheduled):.0f} ms")
    for a, b in zip(tokens, tokens[1:]):
        gap = 1e3 * (b - a)
        bar(a, b, "decode", itl_color(gap, warn_ms, slo_ms), f"ITL {gap:.0f} ms")
    for p in preempts:
        after = [t for t in tokens if t > p]
        bar(p, after[0] if after else end, "preempted", PHASE_COLORS["preempted"], "preempted: recomputing")
        marks["row"].append(r.index)
        marks["t"].append(p)
        marks["color"].append(PHASE_COLORS["preempted"])
        marks["request"].append(r.request_id)
        marks["label"].append("preempted")
    if r.end is not None and not r.ok:
        marks["row"].append(r.index)
        marks["t"].append(r.end)
        marks["color"].append(PHASE_COLORS["error"])
        marks["request"].append(r.request_id or f"#{r.index}")
        marks["label"].append(f"{r.finish_reason}: {r.error or ''}"[:120])


def tiles_html(tiles: dict[str, str], slo: SLO, raw: dict[str, float | None]) -> str:
    """The tiles as HTML; a latency tile turns red when it misses its objective."""
    labels = {"ttft_p50": "p50 TTFT", "ttft_p99": "p99 TTFT", "itl_p50": "p50 ITL", "itl_p99": "p99 ITL",
              "goodput": "goodput", "completed": "completed", "errors": "errors / cancelled",
              "in_flight": "in flight", "waiting": "waiting", "running": "running", "preemptions": "preemptions",
              "max_batch": "max batch", "token_budget": "token budget", "state": "load"}
    limits = {"ttft_p99": slo.ttft_ms, "itl_p99": slo.itl_p99_ms}
    cells = []
    for key in TILE_KEYS:
        value, limit = raw.get(key), limits.get(key)
        miss = limit is not None and isinstance(value, (int, float)) and value > limit
        style = ' style="background:#f8d7da"' if miss else ""
        cells.append(f'<div class="wb-tile"{style}><div class="v" data-testid="tile-{key}">'
                     f'{html.escape(tiles[key])}</div><div class="k">{labels[key]}</div></div>')
    return f'<div class="wb-tiles">{"".join(cells)}</div>'


CSS = """
.wb-tiles {display:flex; flex-wrap:wrap; gap:6px; font-family:sans-serif;}
.wb-tile {border:1px solid #ddd; border-radius:6px; padding:3px 9px; min-width:78px; background:#fafafa;}
.wb-tile .v {font-size:17px; font-weight:600;}
.wb-tile .k {font-size:10px; color:#666; text-transform:uppercase;}
.wb-note {font-family:sans-serif; font-size:12px; color:#333;}
.wb-alert {color:#842029; background:#f8d7da; border:1px solid #f5c2c7; border-radius:4px; padding:4px 8px;
           font-family:sans-serif; font-size:12px;}
"""


# ====================================================================== the Panel part
class LoadView:
    """Controls, tiles and plots over one engine; `layout` is what a notebook or a tab shows."""

    def __init__(self, engine: "Engine", *, period_ms: int = 500, window_s: float = 5.0, rows: int = 24) -> None:
        import panel as pn
        from bokeh.models import ColumnDataSource, Div, InlineStyleSheet

        from ..lab.targets import EngineTarget

        self.engine = engine
        self.target = EngineTarget(engine)
        self.period_ms, self.window_s, self.rows = period_ms, window_s, rows
        self.test: LoadTest | None = None
        self.sweep: Sweep | None = None
        self._task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None
        self._log = data.RequestLog()
        self._last_seq = -1
        self._callback: Any = None
        self.ticks = 0
        cfg = engine.config
        sheet = InlineStyleSheet(css=CSS)
        self.tiles_div = Div(text="", sizing_mode="stretch_width", stylesheets=[sheet])
        self.note_div = Div(text="", sizing_mode="stretch_width", stylesheets=[sheet])
        self.sources = {
            "gantt": ColumnDataSource({k: [] for k in GANTT_COLUMNS}, name="load-gantt"),
            "marks": ColumnDataSource({k: [] for k in ("row", "t", "color", "request", "label")}, name="load-marks"),
            "ttft": ColumnDataSource({"left": [], "right": [], "top": []}, name="load-ttft-hist"),
            "itl": ColumnDataSource({"left": [], "right": [], "top": []}, name="load-itl-hist"),
            "points": ColumnDataSource({k: [] for k in ("x", "y", "label", "pareto", "current", "color", "size",
                                                        "line_color")}, name="pareto-points"),
            "frontier": ColumnDataSource({"x": [], "y": []}, name="pareto-frontier"),
        }
        w = pn.widgets
        self.workload = w.Select(label="workload", options=["random", "shared-prefix"], value="random", width=160)
        self.input_len = w.IntSlider(label="prompt tokens", start=8, end=256, step=8, value=32, width=300)
        self.output_len = w.IntSlider(label="new tokens", start=2, end=128, value=16, width=300)
        self.rate = w.FloatSlider(label="rate (req/s)", start=0.25, end=32.0, step=0.25, value=2.0, width=300)
        self.burstiness = w.FloatSlider(label="burstiness (gamma shape; 1 = Poisson)", start=0.1, end=4.0, step=0.1,
                                        value=1.0, width=300)
        self.duration = w.IntSlider(label="duration (s)", start=5, end=600, step=5, value=60, width=300)
        self.slo_ttft = w.FloatInput(label="SLO: TTFT (ms)", value=2000.0, start=1.0, width=140)
        self.slo_tpot = w.FloatInput(label="SLO: TPOT (ms)", value=500.0, start=1.0, width=140)
        self.slo_itl = w.FloatInput(label="SLO: p99 ITL (ms)", value=500.0, start=1.0, width=140)
        self.itl_warn = w.FloatInput(label="ITL warn (ms)", value=250.0, start=1.0, width=140)
        self.start_button = w.Button(label="Start load", color="success", width=110)
        self.stop_button = w.Button(label="Stop", color="danger", width=80, disabled=True)
        self.max_batch = w.IntSlider(label="max batch", start=1, end=max(64, cfg.max_batch), value=cfg.max_batch,
                                     width=300)
        self.token_budget = w.IntSlider(label="token budget per step", start=8, end=max(2048, cfg.token_budget), step=8,
                                        value=cfg.token_budget, width=300)
        self.sweep_batches = w.TextInput(label="sweep max batch", value="2,4,8", width=140)
        self.sweep_budgets = w.TextInput(label="sweep token budget", value="16,64,256", width=140)
        self.sweep_button = w.Button(label="Sweep", color="primary", width=90)
        self.alert = Div(text="", visible=False, stylesheets=[sheet])

        self.start_button.on_click(lambda _e: self.start())
        self.stop_button.on_click(lambda _e: self.stop_load())
        self.sweep_button.on_click(lambda _e: self.run_sweep())
        self.max_batch.param.watch(lambda e: self._reconfigure(max_batch=e.new), "value_throttled")
        self.token_budget.param.watch(lambda e: self._reconfigure(token_budget=e.new), "value_throttled")
        self.rate.param.watch(lambda e: self._restart_if_running(), "value_throttled")
        self.figures = self._figures()
        self.layout = self._layout()

    # ------------------------------------------------------------------ building
    def _figures(self) -> dict[str, Any]:
        from bokeh.models import HoverTool
        from bokeh.plotting import figure

        from ..lab.plots import histogram_figure, pareto_figure

        gantt = figure(title="Requests: queued (grey), prefill (purple), decode gaps by ITL (green / orange / red), "
                             "preempted (brown)", height=320, sizing_mode="stretch_width", name="load-gantt-figure",
                       tools="pan,wheel_zoom,box_zoom,reset,save")
        r = gantt.hbar(y="row", left="left", right="right", height=0.7, source=self.sources["gantt"],
                       fill_color="color", line_color=None)
        gantt.scatter(x="t", y="row", source=self.sources["marks"], marker="x", size=10, line_color="color",
                      line_width=2)
        gantt.add_tools(HoverTool(renderers=[r], tooltips=[("request", "@request"), ("phase", "@phase"),
                                                           ("", "@detail")]))
        gantt.y_range.flipped = True
        gantt.xaxis.axis_label, gantt.yaxis.axis_label = "seconds since the load started", "request"
        gantt.toolbar.logo = None
        return {
            "gantt": gantt,
            "ttft": histogram_figure(self.sources["ttft"], "TTFT (whole load)", slo_ms=self.slo_ttft.value,
                                     name="load-ttft-figure"),
            "itl": histogram_figure(self.sources["itl"], "Inter-token latency (whole load)", slo_ms=self.slo_itl.value,
                                    name="load-itl-figure"),
            "pareto": pareto_figure(self.sources["points"], self.sources["frontier"], slo_x=self.slo_itl.value,
                                    height=300),
        }

    def _layout(self) -> Any:
        import panel as pn

        f = self.figures
        controls = pn.Column(
            "#### Load", self.workload, self.input_len, self.output_len, self.rate, self.burstiness, self.duration,
            pn.Row(self.slo_ttft, self.slo_tpot), pn.Row(self.slo_itl, self.itl_warn),
            pn.Row(self.start_button, self.stop_button),
            "#### Engine (live)", self.max_batch, self.token_budget,
            "#### Sweep (applied live)", pn.Row(self.sweep_batches, self.sweep_budgets), self.sweep_button,
            pn.pane.Bokeh(self.alert), width=340)
        plots = pn.Column(
            pn.pane.Bokeh(self.tiles_div, sizing_mode="stretch_width"),
            pn.Row(pn.pane.Bokeh(f["ttft"], sizing_mode="stretch_width"),
                   pn.pane.Bokeh(f["itl"], sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            pn.pane.Bokeh(f["gantt"], sizing_mode="stretch_width"),
            pn.pane.Bokeh(f["pareto"], sizing_mode="stretch_width"),
            pn.pane.Bokeh(self.note_div, sizing_mode="stretch_width"), sizing_mode="stretch_width")
        return pn.Row(controls, plots, sizing_mode="stretch_width", min_width=1000)

    # ------------------------------------------------------------------ actions (move data only)
    def slo(self) -> SLO:
        return SLO(ttft_ms=self.slo_ttft.value or None, tpot_ms=self.slo_tpot.value or None,
                   itl_p99_ms=self.slo_itl.value or None)

    def _workload(self) -> Any:
        from ..lab.workloads import RandomWorkload, SharedPrefixWorkload

        if self.workload.value == "shared-prefix":
            return SharedPrefixWorkload(num_groups=4, prefix_len=self.input_len.value, suffix_len=8,
                                        output_len=self.output_len.value)
        return RandomWorkload(self.input_len.value, self.output_len.value)

    def start(self) -> "LoadTest | None":
        """Start a load with the controls' settings, as a task on the running event loop."""
        from ..lab.runner import LoadSpec, LoadTest

        if self.test is not None and self.test.running:
            return self.test
        try:
            loop = asyncio.get_running_loop()
            spec = LoadSpec(rate=self.rate.value, burstiness=self.burstiness.value, duration_s=self.duration.value,
                            seed=int(time.time()) % 10_000)
            self.test = LoadTest(self.target, self._workload(), spec, self.slo(), label="dashboard")
        except (ValueError, RuntimeError) as exc:
            self._alert(str(exc))
            return None
        self._alert(None)
        self._task = loop.create_task(self._run(self.test))
        self.start_button.disabled, self.stop_button.disabled = True, False
        return self.test

    async def _run(self, test: "LoadTest") -> None:
        try:
            await test.run()
        except Exception as exc:  # noqa: BLE001 - shown in the view, the session goes on
            log.exception("the load failed")
            self._alert(f"the load failed: {exc}")
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True

    def stop_load(self) -> None:
        if self.test is not None:
            self.test.stop()

    def _restart_if_running(self) -> None:
        """A new rate: stop the running load and start another at the new rate (its tiles start afresh)."""
        if self.test is None or not self.test.running or self._task is None:
            return
        old, task = self.test, self._task
        old.stop()

        async def again() -> None:
            await asyncio.gather(task, return_exceptions=True)
            self.start()

        asyncio.get_running_loop().create_task(again())

    def _reconfigure(self, **changes: Any) -> None:
        try:
            self.engine.reconfigure(wait=False, **changes)  # never wait on the loop from the UI
        except ValueError as exc:
            self._alert(str(exc))

    def run_sweep(self) -> None:
        """Sweep max batch x token budget (live) with a short load at the current rate; plots when done."""
        from ..lab.runner import LoadSpec
        from ..lab.sweep import config_sweep

        if self._sweep_task is not None and not self._sweep_task.done():
            return
        try:
            grid = {"max_batch": [int(v) for v in self.sweep_batches.value.split(",")],
                    "token_budget": [int(v) for v in self.sweep_budgets.value.split(",")]}
            spec = LoadSpec(rate=self.rate.value, burstiness=self.burstiness.value, num_requests=8, seed=1)
            coro = config_sweep(self.target, self._workload(), grid, spec, self.slo())
            loop = asyncio.get_running_loop()
        except (ValueError, RuntimeError) as exc:
            self._alert(f"sweep: {exc}")
            return
        self._alert(None)

        async def go() -> None:
            try:
                self.sweep = await coro
            except Exception as exc:  # noqa: BLE001 - shown in the view
                log.exception("the sweep failed")
                self._alert(f"the sweep failed: {exc}")
            finally:
                self.sweep_button.disabled = False

        self.sweep_button.disabled = True
        self._sweep_task = loop.create_task(go())

    def _alert(self, text: str | None) -> None:
        body = "" if text is None else html.escape(text)
        self.alert.text = f'<div class="wb-alert" data-testid="load-alert">{body}</div>' if text is not None else ""
        self.alert.visible = text is not None

    # ------------------------------------------------------------------ the tick: drain, plan, apply
    def tick(self) -> ViewData:
        """Fold new telemetry, plan the view, apply it (one hold)."""
        import panel as pn

        from ..lab.plots import pareto_columns

        events = self.engine.telemetry.events(self._last_seq)
        if events:
            self._last_seq = events[-1].seq
        data.fold_requests(self._log, events)
        self._log.prune(8 * self.rows)
        cfg = self.engine.config
        config = {"max_batch": cfg.max_batch, "token_budget": cfg.token_budget}
        test = self.test
        records = list(test.records) if test is not None else []
        state = test.state if test is not None else "idle"
        view = plan(records, self._log, test.t0 if test is not None else None, time.perf_counter(), self.slo(),
                    self.itl_warn.value or 1.0, self.engine.stats(), config, state, self.window_s, self.rows)
        sweep_note = ""
        with pn.io.hold():
            self.sources["gantt"].data = view.gantt
            self.sources["marks"].data = view.marks
            self.sources["ttft"].data = view.ttft_hist
            self.sources["itl"].data = view.itl_hist
            self.tiles_div.text = tiles_html(view.tiles, self.slo(), view.raw)
            if self.sweep is not None:
                live = {"max_batch": cfg.max_batch, "token_budget": cfg.token_budget}
                points, frontier = pareto_columns([p.config for p in self.sweep.points],
                                                  [p.summary for p in self.sweep.points], live)
                self.sources["points"].data, self.sources["frontier"].data = points, frontier
                rec = self.sweep.recommend()
                sweep_note = (f"Sweep: {len(self.sweep.points)} settings in {self.sweep.wall_s:.0f} s, applied live. "
                              + (f"Recommended: max_batch={rec.config['max_batch']}, token_budget="
                                 f"{rec.config['token_budget']} &middot; vLLM: <code>{html.escape(rec.vllm)}</code>"
                                 if rec is not None else "No setting met the p99 ITL objective."))
            elif self._sweep_task is not None and not self._sweep_task.done():
                sweep_note = "Sweep running..."
            if self.note_div.text != sweep_note:
                self.note_div.text = f'<div class="wb-note" data-testid="sweep-note">{sweep_note}</div>'
            for fig, limit in ((self.figures["ttft"], self.slo_ttft.value), (self.figures["itl"], self.slo_itl.value)):
                span = fig.select_one({"name": "slo-span"})
                if span.location != (limit or 0):
                    span.update(location=limit or 0, visible=bool(limit))
        self.ticks += 1
        if pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            pn.io.push_notebook(self.layout)  # in a notebook raw Bokeh changes travel only when pushed
        return view

    def start_ticking(self) -> None:
        import panel as pn

        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self._safe_tick, period=self.period_ms)

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - one bad tick must not stop the periodic callback
            log.exception("load view tick failed")

    def stop_ticking(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None


def load_view(engine: "Engine", **kwargs: Any) -> Any:
    """The Load view over `engine`, as a Panel layout whose periodic tick drains telemetry."""
    view = LoadView(engine, **kwargs)
    view.tick()
    layout = view.layout
    layout.load_view = view  # the controller, for notebooks and tests: layout.load_view.start()
    view.start_ticking()  # bound to the session's document when served, to the kernel's loop in a notebook
    return layout
