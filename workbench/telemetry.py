"""Telemetry: what happened at every step, in bounded ring buffers.

The engine appends one `StepRecord` per step and one `RequestEvent` per
request milestone; readers (the dashboard, notebooks, trace export) take
snapshots. The UI reads only this, never the engine's internals.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

SlotKind = Literal["prefill", "decode", "padding"]
EventKind = Literal["queued", "scheduled", "first_token", "token", "preempted", "finished",
                    "cancelled", "error", "reconfigured"]


@dataclass(slots=True)
class SlotRecord:
    """One batch slot at one step: who held it and how many tokens it pushed through."""

    request_id: str
    num_tokens: int
    kind: SlotKind


@dataclass(slots=True)
class StepRecord:
    step: int
    t_start: float
    t_end: float
    slots: list[SlotRecord]
    block_tables: dict[str, list[int]]
    shared_blocks: list[int]
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    tokens_emitted: int
    finished: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    postprocess_s: float = 0.0
    gpu_start: float | None = None
    gpu_end: float | None = None
    prefix_hit_rate: float = 0.0
    overlapped: bool = False
    graphed: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.slots)


@dataclass(slots=True)
class RequestEvent:
    """A request milestone. `detail`: a finish reason or error, the live config of a `reconfigured`
    event, and for `queued` the most tokens the request may hold (prompt + max_new_tokens)."""

    seq: int
    time: float
    request_id: str
    kind: EventKind
    step: int
    detail: str = ""


@dataclass(slots=True)
class Snapshot:
    """What a reader drains at once: steps and events newer than its cursors, and `now` on their clock."""

    steps: list[StepRecord]
    events: list[RequestEvent]
    now: float


def gpu_busy(steps: "list[StepRecord] | tuple[StepRecord, ...]") -> float | None:
    """The one definition of GPU busy: the union of the steps' compute spans over the window they cover.

    A step's compute span comes from CUDA events on a GPU and from the compute worker's clock on a
    CPU (there it reads "compute busy"). The window runs from the first recorded start to the last
    end, so host work before the first launch and after the last sync does not count as idle; the
    union counts overlapping spans (an overlapped loop queues step N+1 before step N ends) once.
    None when no step recorded a span.
    """
    spans = sorted((r.gpu_start, r.gpu_end) for r in steps if r.gpu_start is not None and r.gpu_end is not None)
    if not spans:
        return None
    window = max(b for _, b in spans) - spans[0][0]
    if window <= 0:
        return None
    busy, cursor = 0.0, spans[0][0]
    for a, b in spans:
        a = max(a, cursor)
        if b > a:
            busy += b - a
            cursor = b
    return busy / window


class Telemetry:
    """Thread-safe ring buffers of steps and request events."""

    def __init__(self, max_steps: int = 4096, max_events: int = 65536) -> None:
        self._steps: deque[StepRecord] = deque(maxlen=max_steps)
        self._events: deque[RequestEvent] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self._seq = 0
        self.t0 = time.perf_counter()

    def record_step(self, record: StepRecord) -> None:
        with self._lock:
            self._steps.append(record)

    def event(self, request_id: str, kind: EventKind, step: int, detail: str = "", t: float | None = None) -> None:
        with self._lock:
            self._events.append(RequestEvent(self._seq, t or time.perf_counter(), request_id, kind, step, detail))
            self._seq += 1

    def events_at(self, items: list[tuple[str, EventKind]], step: int, t: float) -> None:
        """Many requests' events of one moment (a step's tokens) under one lock."""
        with self._lock:
            seq = self._seq
            self._events.extend(RequestEvent(seq + i, t, rid, kind, step) for i, (rid, kind) in enumerate(items))
            self._seq = seq + len(items)

    def steps(self, since: int = -1) -> list[StepRecord]:
        """Step records with `step > since`, oldest first."""
        with self._lock:
            return [r for r in self._steps if r.step > since]

    def events(self, since: int = -1) -> list[RequestEvent]:
        """Request events with `seq > since`, oldest first."""
        with self._lock:
            return [e for e in self._events if e.seq > since]

    def last_step(self) -> StepRecord | None:
        with self._lock:
            return self._steps[-1] if self._steps else None

    def snapshot(self, since_step: int = -1, since_seq: int = -1) -> "Snapshot":
        """New steps and events, and the time, read under one lock: the views drawn from them agree."""
        with self._lock:
            return Snapshot([r for r in self._steps if r.step > since_step],
                            [e for e in self._events if e.seq > since_seq], time.perf_counter())

    def gpu_busy(self, last: int = 200) -> float | None:
        """`gpu_busy` over the last `last` steps."""
        return gpu_busy(self.steps()[-last:])

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._events.clear()

    # ----------------------------------------------------------------- export
    def chrome_trace(self) -> dict:
        """The steps as a Chrome / Perfetto trace (load it at ui.perfetto.dev or chrome://tracing)."""
        us = lambda t: (t - self.t0) * 1e6  # noqa: E731
        events: list[dict] = []
        for r in self.steps():
            t = r.t_start
            for name, dur in (("schedule", r.schedule_s), ("prepare", r.prepare_s),
                              ("forward", r.forward_s), ("postprocess", r.postprocess_s)):
                events.append({"name": name, "ph": "X", "pid": 1, "tid": 1, "ts": us(t), "dur": dur * 1e6,
                               "args": {"step": r.step}})
                t += dur
            if r.gpu_start is not None and r.gpu_end is not None:
                events.append({"name": f"step {r.step}", "ph": "X", "pid": 1, "tid": 2, "ts": us(r.gpu_start),
                               "dur": (r.gpu_end - r.gpu_start) * 1e6})
            events.append({"name": "batch", "ph": "C", "pid": 1, "ts": us(r.t_start),
                           "args": {"tokens": r.num_tokens, "running": r.num_running, "free_blocks": r.num_free_blocks}})
        for e in self.events():
            events.append({"name": e.kind, "ph": "i", "s": "t", "pid": 2, "tid": e.request_id, "ts": us(e.time),
                           "args": {"step": e.step, "detail": e.detail}})
        meta = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "CPU (engine loop)"}},
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "GPU"}}]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def save_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path

    def summary(self) -> dict:
        steps = self.steps()
        if not steps:
            return {"steps": 0}
        span = steps[-1].t_end - steps[0].t_start
        tokens = sum(r.tokens_emitted for r in steps)
        return {"steps": len(steps), "tokens": tokens, "tokens_per_s": tokens / span if span > 0 else 0.0,
                "mean_step_ms": 1e3 * span / len(steps), "last": asdict(steps[-1])}
