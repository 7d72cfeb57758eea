"""The async driver: send each request at its planned time, record what comes back.

One coroutine walks the arrival schedule and starts a task per request at its
planned time; a semaphore caps concurrency (a request waiting on it is late,
and its record says by how much). Warm-up requests run first and are kept in
the result but left out of the statistics. Nothing blocks the event loop, so
the same `LoadTest` runs from a script (`run_load`), a notebook cell
(`await arun_load(...)`) or a dashboard callback, and `stop()` ends it early:
requests in flight are cancelled and counted as such, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from .arrivals import ArrivalSchedule, arrival_times
from .metrics import SLO, summarize
from .records import RequestRecord
from .report import LoadResult, environment
from .targets import Target
from .workloads import WorkItem, Workload, describe

log = logging.getLogger(__name__)
_SLICE_S = 0.1  # the scheduler sleeps at most this long at a time, so stop() is seen quickly


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """How the load arrives: rate (req/s, inf = all at once), gamma burstiness, ramp, count or duration, cap."""

    rate: float = math.inf
    burstiness: float = 1.0
    ramp_to: float | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    concurrency: int | None = None
    warmup: int = 0
    seed: int = 0
    prompt_seed: int | None = None  # the workload's seed (default: `seed`); arrival times always follow `seed`
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 300.0

    def validate(self) -> "LoadSpec":
        self.schedule().validate()
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s (or both)")
        if self.concurrency is not None and (isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int)
                                             or not 1 <= self.concurrency <= 100_000):
            raise ValueError(f"concurrency must be an integer in [1, 100000] or None, got {self.concurrency!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= 10_000:
            raise ValueError(f"warmup must be an integer in [0, 10000], got {self.warmup!r}")
        for name in ("seed", "prompt_seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("request_timeout_s", "drain_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {v!r}")
        return self

    def schedule(self) -> ArrivalSchedule:
        return ArrivalSchedule(self.rate, self.burstiness, self.ramp_to)

    def planned_times(self) -> list[float]:
        return arrival_times(self.schedule(), num_requests=self.num_requests, duration_s=self.duration_s,
                             seed=self.seed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadTest:
    """One load against one target. Read `records`, `state` and `summary()` while it runs."""

    def __init__(self, target: Target, workload: Workload, spec: LoadSpec, slo: SLO | None = None, *,
                 progress: bool = False, label: str = "") -> None:
        self.target, self.workload, self.spec = target, workload, spec.validate()
        self.slo = slo or SLO()
        self.progress, self.label = progress, label
        self.records: list[RequestRecord] = []      # measured requests, appended as each is sent
        self.warmup_records: list[RequestRecord] = []
        self.state = "idle"  # idle | warmup | running | draining | done | stopped
        self.t0: float | None = None
        self.planned = 0
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """End the load now: no more sends; requests in flight are cancelled (and recorded as cancelled)."""
        self._stopping = True
        for task in list(self._tasks):
            task.get_loop().call_soon_threadsafe(task.cancel)

    @property
    def running(self) -> bool:
        return self.state in ("warmup", "running", "draining")

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def summary(self) -> dict[str, Any]:
        """Statistics over the requests that have ended so far."""
        ended = [r for r in self.records if r.end is not None]
        return summarize(ended, self.slo, duration_s=self._duration(ended))

    def in_flight(self) -> int:
        return sum(1 for r in self.records if r.end is None and r.sent is not None)

    # ------------------------------------------------------------------ the run
    async def run(self) -> LoadResult:
        """Warm up, send every planned request, wait for the last, and return the result."""
        if self.state != "idle":
            raise RuntimeError("a LoadTest runs once; make a new one")
        spec = self.spec
        times = spec.planned_times()
        self.planned = len(times)
        prompt_seed = spec.seed if spec.prompt_seed is None else spec.prompt_seed
        items = self.workload.items(spec.warmup + len(times), prompt_seed)
        started_at = time.time()
        config: dict[str, Any] = {}
        await self.target.open()
        try:
            config = await self.target.config()
            if spec.warmup and not self._stopping:
                self.state = "warmup"
                await self._warmup(items[: spec.warmup])
            self.state = "running"
            await self._send_all(items[spec.warmup:], times)
            self.state = "draining"
            await self._drain()
        finally:
            self.state = "stopped" if self._stopping else "done"
            await self.target.close()
        ended = [r for r in self.records if r.end is not None]
        return LoadResult(
            label=self.label, started_at=started_at, target=self.target.describe(), config=config,
            spec=spec.as_dict(), workload=describe(self.workload), slo=self.slo.as_dict(),
            summary=summarize(ended, self.slo, duration_s=self._duration(ended)),
            records=self.records + self.warmup_records, environment=environment(), t0=self.t0)

    async def _warmup(self, items: list[WorkItem]) -> None:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.spec.concurrency or len(items))
        for i, item in enumerate(items):
            record = RequestRecord(index=-1 - i, planned=0.0, warmup=True, group=item.group)
            self.warmup_records.append(record)
            self._start(item, record, t0, sem)
        await self._wait_tasks(self.spec.drain_timeout_s)

    async def _send_all(self, items: list[WorkItem], times: list[float]) -> None:
        bar = self._bar(len(times))
        sem = asyncio.Semaphore(self.spec.concurrency) if self.spec.concurrency else None
        self.t0 = t0 = time.perf_counter()
        clock = time.perf_counter
        since_yield = 0
        try:
            for i, (item, planned) in enumerate(zip(items, times)):
                while not self._stopping:
                    delay = t0 + planned - clock()
                    if delay <= 0:
                        break
                    await asyncio.sleep(min(delay, _SLICE_S))
                    since_yield = 0
                if self._stopping:
                    break
                record = RequestRecord(index=i, planned=planned, group=item.group)
                self.records.append(record)
                self._start(item, record, t0, sem, bar)
                since_yield += 1
                if since_yield >= 64:  # on time at a high rate: still let the started tasks send
                    await asyncio.sleep(0)
                    since_yield = 0
        finally:
            if bar is not None:
                bar.close()

    def _start(self, item: WorkItem, record: RequestRecord, t0: float, sem: asyncio.Semaphore | None,
               bar: Any = None) -> None:
        task = asyncio.get_running_loop().create_task(self._one(item, record, t0, sem))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if bar is not None:
                bar.update(1)

        task.add_done_callback(done)

    async def _one(self, item: WorkItem, record: RequestRecord, t0: float, sem: asyncio.Semaphore | None) -> None:
        try:
            if sem is not None:
                async with sem:
                    await self._send(item, record, t0)
            else:
                await self._send(item, record, t0)
        except asyncio.CancelledError:
            record.finish_reason = record.finish_reason or "cancelled"
            if record.end is None:
                record.end = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a target bug fails this request, visibly, not the load
            log.exception("request %d failed in the target", record.index)
            record.finish_reason, record.error = "error", f"{type(exc).__name__}: {exc}"
            if record.end is None:
                record.end = time.perf_counter() - t0

    async def _send(self, item: WorkItem, record: RequestRecord, t0: float) -> None:
        record.sent = time.perf_counter() - t0
        if item.prompt_len is not None:
            record.prompt_tokens = item.prompt_len
        try:
            async with asyncio.timeout(self.spec.request_timeout_s):  # no extra task per request (wait_for makes one)
                await self.target.send(item, record, t0)
        except TimeoutError:
            record.finish_reason = "error"
            record.error = f"timed out after request_timeout_s={self.spec.request_timeout_s} s"
            record.end = time.perf_counter() - t0

    async def _wait_tasks(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while self._tasks:
            left = deadline - time.perf_counter()
            if left <= 0 or self._stopping:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                break
            await asyncio.wait(list(self._tasks), timeout=min(left, _SLICE_S * 5))

    async def _drain(self) -> None:
        await self._wait_tasks(self.spec.drain_timeout_s)
        now = time.perf_counter() - (self.t0 or 0.0)
        for r in self.records:  # cancelled before its task even started: still counted
            if r.end is None:
                r.finish_reason, r.end = r.finish_reason or "cancelled", now

    def _bar(self, total: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=self.label or "load", unit="req")

    def _duration(self, ended: list[RequestRecord]) -> float | None:
        ends = [r.end for r in ended if r.end is not None]
        if self.state in ("done", "stopped") or not self.running:
            return max(ends) if ends else None
        return self.elapsed()


async def arun_load(target: Target, workload: Workload, spec: LoadSpec, slo: SLO | None = None, *,
                    progress: bool = False, label: str = "") -> LoadResult:
    """Run one load in the current event loop (`await` it in a notebook cell)."""
    return await LoadTest(target, workload, spec, slo, progress=progress, label=label).run()


def run_load(target: Target, workload: Workload, spec: LoadSpec, slo: SLO | None = None, *,
             progress: bool = True, label: str = "") -> LoadResult:
    """Blocking form for scripts: runs its own event loop (in a notebook, `await arun_load(...)` instead)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_load(target, workload, spec, slo, progress=progress, label=label))
    raise RuntimeError("run_load was called inside a running event loop; use `await arun_load(...)` there")
