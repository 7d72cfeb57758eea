"""Plot data as pure functions of telemetry.

Everything the dashboard draws is computed here from `StepRecord`s and
`RequestEvent`s (and, where a bar must end "now", an explicit `now`), so the
numbers can be checked against the engine in unit tests without a browser.
Functions return plain column dicts (`{name: list}`) ready for a Bokeh
`ColumnDataSource`. The two folds (`fold_context`, `fold_requests`) update an
accumulator the caller owns, so the dashboard can drain telemetry
incrementally and a test can fold a whole run at once; same result.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

from ..telemetry import RequestEvent, StepRecord, gpu_busy  # noqa: F401  (the one GPU-busy definition)

Columns = dict[str, list]

# Category20, dark shades first then light ones, so neighbouring request ids differ clearly.
_CAT20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
          "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
          "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"]
PALETTE: tuple[str, ...] = tuple(_CAT20[::2] + _CAT20[1::2])
FREE_COLOR = "#ffffff"
OFF_COLOR = "#d9d9d9"       # blocks past the usable limit (num_blocks slider)
PADDING_COLOR = "#bdbdbd"   # static-policy slots held for finished batch members
PHASE_COLORS = {"schedule": "#9467bd", "prepare": "#ff7f0e", "forward": "#1f77b4",
                "postprocess": "#2ca02c", "compute": "#d62728"}
PHASES = ("schedule", "prepare", "forward", "postprocess")
CELL = 0.86  # cell size in grid units, leaving a gap between neighbours
_TRAILING_INT = re.compile(r"(\d+)$")


def request_color(request_id: str) -> str:
    """A stable colour per request: `req-N` cycles the palette, other ids hash into it."""
    m = _TRAILING_INT.search(request_id)
    n = int(m.group(1)) if m else zlib.crc32(request_id.encode())
    return PALETTE[n % len(PALETTE)]


# ===================================================================== batch slots
def slot_cells(steps: Iterable[StepRecord]) -> Columns:
    """One heatmap cell per (step, slot): who held the slot, prefill chunk (pale) or decode (solid), tokens."""
    cols: Columns = {k: [] for k in ("step", "slot", "request_id", "kind", "num_tokens", "color", "alpha")}
    for r in steps:
        for i, s in enumerate(r.slots):
            cols["step"].append(r.step)
            cols["slot"].append(i)
            cols["request_id"].append(s.request_id or "(padding)")
            cols["kind"].append(s.kind)
            cols["num_tokens"].append(s.num_tokens)
            cols["color"].append(PADDING_COLOR if s.kind == "padding" else request_color(s.request_id))
            cols["alpha"].append(0.35 if s.kind == "prefill" else 1.0)
    return cols


def slot_occupancy(cells: Columns) -> dict[int, list[tuple[str, str, int]]]:
    """Heatmap cells regrouped per step as [(request_id, kind, num_tokens)] in slot order."""
    out: dict[int, list[tuple[str, str, int]]] = {}
    for step, slot, rid, kind, n in zip(cells["step"], cells["slot"], cells["request_id"], cells["kind"],
                                        cells["num_tokens"]):
        row = out.setdefault(step, [])
        assert slot == len(row), "cells must be in slot order"
        row.append((rid, kind, n))
    return out


# ======================================================================= KV blocks
def fold_context(context: dict[str, int], steps: Iterable[StepRecord]) -> dict[str, int]:
    """Tokens each running request has computed since it was (re)admitted, folded over steps.

    Prefix-cache hits are whole blocks, so this count modulo the block size is
    the fill of the request's last block even though cached tokens are not in
    it. A preempted request starts again from zero; finished ones drop out.
    """
    for r in steps:
        for rid in r.preempted:
            context.pop(rid, None)
        for s in r.slots:
            if s.kind != "padding":
                context[s.request_id] = context.get(s.request_id, 0) + s.num_tokens
        for rid in [rid for rid in context if rid not in r.block_tables]:
            del context[rid]
    return context


def block_fills(record: StepRecord, context: dict[str, int], block_size: int) -> dict[int, int]:
    """Tokens held by each owned block after `record`.

    A request's blocks fill in order, so all but its last block are full, and
    the folded `context` gives the fill of the last one.
    """
    fills: dict[int, int] = {}
    for rid, table in record.block_tables.items():
        if not table:
            continue
        for b in table[:-1]:
            fills[b] = block_size
        n = context.get(rid, 0)
        last = (n - 1) % block_size + 1 if n > 0 else block_size
        fills[table[-1]] = max(fills.get(table[-1], 0), last)
    return fills


def block_owners(record: StepRecord) -> dict[int, list[str]]:
    """Which requests hold each block (more than one for shared prefix blocks)."""
    owners: dict[int, list[str]] = {}
    for rid, table in record.block_tables.items():
        for b in table:
            owners.setdefault(b, []).append(rid)
    return owners


def grid_shape(capacity: int) -> tuple[int, int]:
    """Columns and rows for `capacity` blocks: about twice as wide as tall, rows of a multiple of 8."""
    cols = 8
    while cols * cols < 2 * capacity:
        cols += 8
    return cols, -(-capacity // cols)


@lru_cache(maxsize=8)
def _unowned_grid(capacity: int, limit: int) -> dict[str, tuple]:
    """The grid with no block owned (free below `limit`, off past it); owned cells are written over a copy."""
    ncols, _ = grid_shape(capacity)
    free = [b < limit for b in range(capacity)]
    return {
        "block": tuple(range(capacity)), "x": tuple(b % ncols for b in range(capacity)),
        "y": tuple(b // ncols for b in range(capacity)), "owner": ("",) * capacity,
        "owners": tuple("-" if f else "(past num_blocks)" for f in free),
        "state": tuple("free" if f else "off" for f in free), "fill": (0,) * capacity, "fill_frac": (0.0,) * capacity,
        "color": tuple(FREE_COLOR if f else OFF_COLOR for f in free), "alpha": (1.0,) * capacity,
        "line_color": ("#c8c8c8",) * capacity, "line_width": (0.5,) * capacity,
        "bar_y": tuple(b // ncols + CELL / 2 for b in range(capacity)), "bar_h": (0.0,) * capacity,
    }


def kv_cells(record: StepRecord | None, capacity: int, block_size: int, context: dict[str, int],
             limit: int | None = None) -> Columns:
    """One cell per physical KV block: owner colour, fill (a bar rising from the bottom), shared outline."""
    limit = capacity if limit is None else limit
    cols: Columns = {k: list(v) for k, v in _unowned_grid(capacity, limit).items()}
    if record is None:
        return cols
    fills = block_fills(record, context, block_size)
    ncols, _ = grid_shape(capacity)
    for b, who in block_owners(record).items():
        if not 0 <= b < capacity:
            continue
        shared = len(who) > 1
        fill = fills.get(b, 0)
        h = CELL * fill / block_size
        cols["owner"][b] = who[0]
        cols["owners"][b] = ", ".join(who)
        cols["state"][b] = "shared" if shared else "owned"
        cols["fill"][b] = fill
        cols["fill_frac"][b] = fill / block_size
        cols["color"][b] = request_color(who[0])
        cols["alpha"][b] = 0.25
        cols["line_color"][b] = "#000000" if shared else "#c8c8c8"
        cols["line_width"][b] = 2.5 if shared else 0.5
        cols["bar_h"][b] = h
        cols["bar_y"][b] = b // ncols + CELL / 2 - h / 2  # y points down: the bar sits on the cell's bottom
    return cols


def column_patch(old: Columns, new: Columns) -> dict[str, list[tuple[int, object]]]:
    """The `ColumnDataSource.patch` argument turning `old` into `new` (same length), changed cells only."""
    patch: dict[str, list[tuple[int, object]]] = {}
    for name, values in new.items():
        before = old[name]
        if before == values:  # the common case, compared in C
            continue
        changed = [(i, v) for i, (a, v) in enumerate(zip(before, values)) if a != v]
        if changed:
            patch[name] = changed
    return patch


# ================================================================ request timelines
@dataclass(slots=True)
class RequestSummary:
    """What telemetry says about one request's life; times are perf_counter seconds."""

    request_id: str
    row: int
    queued: float | None = None
    scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: list[float] = field(default_factory=list)
    end: float | None = None
    end_kind: str = ""
    detail: str = ""
    max_tokens: int | None = None  # prompt + max_new_tokens, from the queued event

    @property
    def num_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None or self.queued is None else self.first_token - self.queued

    @property
    def mean_token_gap(self) -> float | None:
        """Mean time between consecutive tokens (the per-token decode latency)."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def status(self) -> str:
        if self.end is not None:
            return self.end_kind if self.end_kind != "finished" else f"finished ({self.detail})"
        if self.preemptions and self.preemptions[-1] >= max(self.token_times[-1:] + [self.scheduled or 0.0]):
            return "preempted (to recompute)"
        return "running" if self.scheduled is not None else "queued"


@dataclass(slots=True)
class RequestLog:
    """Per-request summaries folded from events; rows are numbered in order of first sighting."""

    by_id: dict[str, RequestSummary] = field(default_factory=dict)
    next_row: int = 0
    num_ended: int = 0

    def recent(self, n: int) -> list[RequestSummary]:
        """The `n` most recently seen requests, oldest first."""
        return sorted(self.by_id.values(), key=lambda s: s.row)[-n:]

    def prune(self, keep: int) -> None:
        """Forget ended requests older than the newest `keep` (rows keep counting)."""
        if len(self.by_id) > keep:
            old = sorted(self.by_id.values(), key=lambda s: s.row)[:-keep]
            for s in old:
                if s.end is not None:
                    del self.by_id[s.request_id]


def fold_requests(log: RequestLog, events: Iterable[RequestEvent]) -> RequestLog:
    """Fold request events into `log` (mutated and returned)."""
    for e in events:
        if e.kind == "reconfigured":
            continue
        s = log.by_id.get(e.request_id)
        if s is None:
            s = log.by_id[e.request_id] = RequestSummary(e.request_id, log.next_row)
            log.next_row += 1
        if e.kind == "queued":
            s.queued = e.time
            s.max_tokens = int(e.detail) if e.detail.isdigit() else None
        elif e.kind == "scheduled":
            s.scheduled = e.time
        elif e.kind in ("first_token", "token"):
            if s.first_token is None:
                s.first_token = e.time
            s.token_times.append(e.time)
        elif e.kind == "preempted":
            s.preemptions.append(e.time)
        elif e.kind in ("finished", "cancelled", "error"):
            if s.end is None:
                log.num_ended += 1
            s.end, s.end_kind, s.detail = e.time, e.kind, e.detail
    return log


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.0f} ms"


def timeline_bars(summaries: Sequence[RequestSummary], t0: float, now: float) -> Columns:
    """Gantt bars: one 'waiting' bar (queued -> first scheduled) and one 'active' bar per request."""
    cols: Columns = {k: [] for k in ("row", "left", "right", "phase", "request_id", "color", "alpha", "ttft",
                                     "gap", "tokens", "status")}
    for s in summaries:
        if s.queued is None:
            continue
        end = s.end if s.end is not None else now
        spans = [("waiting", s.queued, s.scheduled if s.scheduled is not None else end)]
        if s.scheduled is not None:
            spans.append(("active", s.scheduled, end))
        for phase, a, b in spans:
            cols["row"].append(s.row)
            cols["left"].append(a - t0)
            cols["right"].append(max(b, a) - t0)
            cols["phase"].append(phase)
            cols["request_id"].append(s.request_id)
            cols["color"].append("#dddddd" if phase == "waiting" else request_color(s.request_id))
            cols["alpha"].append(1.0 if phase == "waiting" else 0.3)
            cols["ttft"].append(_ms(s.ttft))
            cols["gap"].append(_ms(s.mean_token_gap))
            cols["tokens"].append(s.num_tokens)
            cols["status"].append(s.status)
    return cols


def timeline_marks(summaries: Sequence[RequestSummary], t0: float) -> Columns:
    """Preemptions (x) and ends (finish / cancel / error) as markers on the Gantt rows."""
    cols: Columns = {k: [] for k in ("row", "t", "marker", "color", "label", "request_id")}
    for s in summaries:
        for t in s.preemptions:
            cols["row"].append(s.row)
            cols["t"].append(t - t0)
            cols["marker"].append("x")
            cols["color"].append("#d62728")
            cols["label"].append("preempted")
            cols["request_id"].append(s.request_id)
        if s.end is not None:
            cols["row"].append(s.row)
            cols["t"].append(s.end - t0)
            cols["marker"].append({"finished": "circle", "cancelled": "square"}.get(s.end_kind, "triangle"))
            cols["color"].append({"finished": "#000000", "cancelled": "#7f7f7f"}.get(s.end_kind, "#d62728"))
            cols["label"].append(s.status)
            cols["request_id"].append(s.request_id)
    return cols


def token_ticks(events: Sequence[RequestEvent], rows: dict[str, RequestSummary], t0: float) -> Columns:
    """One tick per decoded token, with its latency since the previous token (TTFT for the first).

    `rows` must already include these events (fold first); the latency of a
    token is measured from the token before it in the same summary.
    """
    cols: Columns = {k: [] for k in ("row", "t", "request_id", "index", "latency_ms")}
    seen: dict[str, int] = {}
    pending: dict[str, int] = {}
    for e in events:
        if e.kind in ("first_token", "token"):
            pending[e.request_id] = pending.get(e.request_id, 0) + 1
    for e in events:
        if e.kind not in ("first_token", "token"):
            continue
        s = rows.get(e.request_id)
        if s is None:
            continue
        # index of this token within the request: tokens before this batch + position in it
        base = s.num_tokens - pending[e.request_id]
        i = base + seen.get(e.request_id, 0)
        seen[e.request_id] = seen.get(e.request_id, 0) + 1
        prev = s.token_times[i - 1] if i > 0 else s.queued
        cols["row"].append(s.row)
        cols["t"].append(e.time - t0)
        cols["request_id"].append(e.request_id)
        cols["index"].append(i)
        cols["latency_ms"].append(None if prev is None else round(1e3 * (e.time - prev), 1))
    return cols


def prefill_chunks(steps: Iterable[StepRecord], rows: dict[str, RequestSummary], t0: float) -> Columns:
    """Each prefill chunk a request ran, as a dark segment over the step that ran it."""
    cols: Columns = {k: [] for k in ("row", "left", "right", "request_id", "num_tokens", "step", "color")}
    for r in steps:
        for s in r.slots:
            if s.kind != "prefill" or s.request_id not in rows:
                continue
            cols["row"].append(rows[s.request_id].row)
            cols["left"].append(r.t_start - t0)
            cols["right"].append(r.t_end - t0)
            cols["request_id"].append(s.request_id)
            cols["num_tokens"].append(s.num_tokens)
            cols["step"].append(r.step)
            cols["color"].append(request_color(s.request_id))
    return cols


# ===================================================================== CPU/GPU spans
def span_quads(steps: Iterable[StepRecord], t0: float) -> Columns:
    """The loop's host phases of each step on lane 0, its compute span (GPU or worker, if recorded) on lane 1.

    x is in seconds on the engine's clock, so an overlapped loop shows step N+1's host work beside step N's
    compute; a sync loop on a CPU records no compute span and lane 1 stays empty.
    """
    cols: Columns = {k: [] for k in ("left", "right", "bottom", "top", "phase", "color", "step", "ms")}

    def add(a: float, b: float, lane: int, phase: str, step: int) -> None:
        cols["left"].append(a - t0)
        cols["right"].append(b - t0)
        cols["bottom"].append(lane - 0.4)
        cols["top"].append(lane + 0.4)
        cols["phase"].append(phase)
        cols["color"].append(PHASE_COLORS[phase])
        cols["step"].append(step)
        cols["ms"].append(round(1e3 * (b - a), 2))

    for r in steps:
        t = r.t_start
        for phase, dur in zip(PHASES, (r.schedule_s, r.prepare_s, r.forward_s, r.postprocess_s)):
            add(t, t + dur, 0, phase, r.step)
            t += dur
        if r.gpu_start is not None and r.gpu_end is not None:
            add(r.gpu_start, r.gpu_end, 1, "compute", r.step)
    return cols


def forward_share(steps: Sequence[StepRecord]) -> float | None:
    """Fraction of the steps' wall time spent in the model forward (what a sync loop can hope to overlap)."""
    if not steps:
        return None
    wall = steps[-1].t_end - steps[0].t_start
    return sum(r.forward_s for r in steps) / wall if wall > 0 else None


# ============================================================ per-step milliseconds
FLOOR_MS = 0.01  # the log axis's floor: a stack starts here, so a 0.05 ms phase still shows as a band
HOST_FIRST = ("schedule", "prepare", "postprocess", "forward")  # small host phases low, where a log axis widens them


def step_bars(steps: Iterable[StepRecord]) -> Columns:
    """Each step's phases stacked in milliseconds (host bar at step - 0.2) and its compute span (at step + 0.2).

    Meant for a log y axis: on a CPU the forward is ~99% of a step, and on a linear axis the host
    phases vanish; stacked from a 0.01 ms floor, small phases first, each is a visible band.
    """
    cols: Columns = {k: [] for k in ("x", "bottom", "top", "phase", "color", "step", "ms")}

    def add(x: float, bottom: float, top: float, phase: str, step: int, ms: float) -> None:
        cols["x"].append(x)
        cols["bottom"].append(bottom)
        cols["top"].append(top)
        cols["phase"].append(phase)
        cols["color"].append(PHASE_COLORS[phase])
        cols["step"].append(step)
        cols["ms"].append(round(ms, 3))

    for r in steps:
        ms = {"schedule": r.schedule_s, "prepare": r.prepare_s, "postprocess": r.postprocess_s, "forward": r.forward_s}
        y = FLOOR_MS
        for phase in HOST_FIRST:
            v = 1e3 * ms[phase]
            add(r.step - 0.2, y, y + v, phase, r.step, v)
            y += v
        if r.gpu_start is not None and r.gpu_end is not None:
            v = 1e3 * (r.gpu_end - r.gpu_start)
            add(r.step + 0.2, FLOOR_MS, FLOOR_MS + v, "compute", r.step, v)
    return cols


def host_ms(steps: Sequence[StepRecord]) -> float | None:
    """Median host work per step (schedule + prepare + postprocess), in ms."""
    if not steps:
        return None
    return 1e3 * sorted(r.schedule_s + r.prepare_s + r.postprocess_s for r in steps)[len(steps) // 2]


# ================================================================= live-tuning guards
def kv_floor(log: RequestLog, block_size: int) -> tuple[int, str | None]:
    """The fewest usable KV blocks that keep every live request finishable, and the request that sets it.

    A request may hold prompt + max_new_tokens tokens; a cache smaller than that can never finish it
    (preempting and recomputing does not help), so the engine would end it with an error. Above this
    floor a shrink only preempts. (1, None) when nothing is live.
    """
    floor, who = 1, None
    for s in log.by_id.values():
        if s.end is None and s.max_tokens is not None:
            need = -(-s.max_tokens // block_size)
            if need > floor:
                floor, who = need, s.request_id
    return floor, who


def slot_window(last_step: int, max_batch: int, window_steps: int, max_cells: int = 24_000) -> tuple[int, float, float]:
    """Steps shown and the x range (start, end) of the slot heatmap: never negative, never auto-ranged.

    The window shrinks at large batches so a view of 256 slots stays under `max_cells` cells.
    """
    window = max(20, min(window_steps, max_cells // max(1, max_batch)))
    end = max(last_step, window - 1) + 0.5
    return window, end - window, end


def card_order(live: Sequence[str], ended: Sequence[str], keep_ended: int) -> list[str]:
    """Which requests get an output card, top to bottom: every live one (newest first), then the newest ended.

    `live` and `ended` are in submission order. A live request's card never drops off; ended ones
    beyond `keep_ended` do.
    """
    return list(reversed(live)) + list(reversed(ended))[:max(0, keep_ended)]


def request_state(summary: RequestSummary | None) -> str:
    """A live request's card label: queued, running or preempted (to recompute)."""
    if summary is None or summary.scheduled is None:
        return "queued"
    status = summary.status
    return "preempted" if status.startswith("preempted") else "streaming"


# ========================================================================= counters
@dataclass(slots=True)
class Counters:
    running: int = 0
    waiting: int = 0
    finished: int = 0
    tokens_per_s: float = 0.0
    free_blocks: int = 0
    num_blocks: int = 0
    step_ms: float | None = None
    step: int = -1
    preemptions: int = 0
    prefix_hit_rate: float = 0.0
    running_for: float | None = None  # seconds since the last step ended while work is live (a long step)


def counters(recent: Sequence[StepRecord], log: RequestLog, preemptions: int, now: float,
             window_s: float = 2.0) -> Counters:
    """The headline numbers: queue sizes, ended requests, tokens/s over the last `window_s` seconds."""
    c = Counters()
    c.finished = log.num_ended
    c.preemptions = preemptions
    if not recent:
        return c
    last = recent[-1]
    c.running, c.waiting, c.step = last.num_running, last.num_waiting, last.step
    c.free_blocks, c.num_blocks = last.num_free_blocks, last.num_blocks
    c.step_ms = 1e3 * (last.t_end - last.t_start)
    c.prefix_hit_rate = last.prefix_hit_rate
    window = [r for r in recent if r.t_end >= now - window_s]
    if window:
        span = max(now, window[-1].t_end) - min(window[0].t_start, now - window_s)
        c.tokens_per_s = sum(r.tokens_emitted for r in window) / span if span > 0 else 0.0
    return c
