"""EngineCore: the step loop's work, on the engine's loop thread only.

Each turn plans a step (scheduler.py, a plain `StepPlan`), launches it on the
runner (runner.py), and hands the tokens of a finished step to the output
processor (outputs.py), which streams them and ends requests. Two loops:

* `_sync_turn`: launch a step, process its tokens, plan the next. Simple, and
  the host and the device take turns waiting for each other.
* `_overlapped_turn`: launch step N+1, then process step N while N+1 computes.
  A token that N sampled is still on the device when N+1 is planned; N+1 reads
  it there (the runner's request table), so nothing waits for the host.

Either loop may launch a decode run (several decode steps in one plan, while
the batch holds still): its tokens are processed step by step, as if each step
had been launched alone.

A failing step fails its requests and the engine goes on serving. `Engine`
(engine.py) is the front: it owns the thread, the public API and the inbox of
commands, and calls `step` whenever there is work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .blocks import BlockManager
from .config import LIVE_FIELDS, EngineConfig
from .outputs import LiveRequest, OutputProcessor
from .plan import StepPlan
from .runner import ModelRunner, StepResult
from .scheduler import Scheduler
from .telemetry import SlotRecord, StepRecord, Telemetry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Flight:
    """A launched step as the loop keeps it until its tokens are processed."""

    plan: StepPlan
    result: StepResult
    lives: list[LiveRequest]  # the requests of its sampling rows, as they were when it was launched
    schedule_s: float
    t_start: float


class EngineCore:
    def __init__(self, config: EngineConfig, runner: ModelRunner, scheduler: Scheduler, blocks: BlockManager,
                 telemetry: Telemetry, outputs: OutputProcessor, model_len: int) -> None:
        self.config = config
        self.runner, self.scheduler, self.blocks = runner, scheduler, blocks
        self.telemetry, self.outputs = telemetry, outputs
        self.model_len = model_len
        self.inflight: Flight | None = None
        self.step_index = 0
        self.num_failed_steps = 0
        self._gpu_clock: tuple[torch.cuda.Event, float] | None = None

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + new) one request may hold: the model's context or the usable KV cache."""
        return min(self.model_len, self.blocks.limit * self.config.block_size)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None

    # ------------------------------------------------------------ the loops
    def step(self) -> None:
        """One turn of the configured loop; a failure fails the step's requests, not the engine."""
        touched: list[Flight] = []
        try:
            if self.config.overlap:
                self._overlapped_turn(touched)
            else:
                self._sync_turn(touched)
            self.num_failed_steps = 0
        except Exception as exc:  # noqa: BLE001 - contained: fail the step's requests, keep serving
            self._contain(exc, touched)

    def _overlapped_turn(self, touched: list[Flight]) -> None:
        """Launch step N+1, then process step N's tokens while N+1 computes.

        A request that N ends (EOS, a stop string) is seen one step late: N+1's token for it is
        dropped."""
        flight = self._launch_next(touched)
        prev, self.inflight = self.inflight, flight
        if prev is not None:
            self._process(prev)
        elif flight is None:
            self._fail_unschedulable()

    def _sync_turn(self, touched: list[Flight]) -> None:
        """Launch a step and process its tokens before planning the next."""
        prev, self.inflight = self.inflight, None
        if prev is not None:  # launched overlapped, before overlap was switched off
            self._process(prev)
        flight = self._launch_next(touched)
        if flight is not None:
            self._process(flight)
        elif prev is None:
            self._fail_unschedulable()

    def _launch_next(self, touched: list[Flight]) -> Flight | None:
        """Plan the next step and launch it; None when there is nothing to run."""
        if not self.scheduler.has_work():
            return None
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        t1 = time.perf_counter()
        for rid in plan.preempted_ids:
            self.telemetry.event(rid, "preempted", self.step_index)
        if not plan:
            self.runner.apply(plan)  # no step, but the plan's bookkeeping (requests that left) holds
            self.scheduler.advance()
            return None
        self._mark_scheduled(plan, t1)
        lives = [self.outputs.live[rid] for rid in plan.sampling_ids]
        flight = Flight(plan, self.runner.launch(plan), lives, t1 - t0, t0)
        touched.append(flight)
        self.scheduler.advance()
        return flight

    def _process(self, flight: Flight) -> None:
        """A step's tokens to their requests (outputs.py), then the step's record. A decode run's
        tokens go step by step, so a request that stops mid-run drops the tokens after its stop."""
        tokens = self.runner.collect(flight.result)
        t2 = time.perf_counter()
        S, accepted, finished = len(flight.lives), 0, []
        for j in range(flight.plan.steps):
            n, ended = self.outputs.process(flight.lives, tokens[j * S : (j + 1) * S], self.step_index, t2)
            accepted += n
            finished += ended
        t3 = time.perf_counter()
        self._record(flight, accepted, finished, t3, t3 - t2)
        self.step_index += 1

    def _mark_scheduled(self, plan: StepPlan, now: float) -> None:
        """First schedule of each request (only an admission can be one)."""
        for admission in plan.admitted:
            request = self.outputs.live[admission.request_id].request
            if request.timings.first_scheduled is None:
                request.timings.first_scheduled = now
                self.telemetry.event(admission.request_id, "scheduled", self.step_index, t=now)

    def _contain(self, exc: Exception, touched: list[Flight]) -> None:
        """A step failed: fail the requests it ran (after three failures in a row, every request)."""
        log.exception("step %d failed", self.step_index)
        self.inflight = None
        if self.runner.cuda:
            torch.cuda.synchronize(self.runner.device)
        self.num_failed_steps += 1
        ids = [rid for f in touched for rid in f.plan.request_ids] or [r.request_id for r in self.scheduler.running]
        victims = [self.outputs.live.get(rid) for rid in ids]
        if self.num_failed_steps >= 3:
            victims = list(self.outputs.live.values())  # a copy: submit may add meanwhile
        for live in victims:
            if live is not None:
                self.end(live, "error", error=f"{type(exc).__name__}: {exc}")

    def _fail_unschedulable(self) -> None:
        """Nothing could run: the head of the queue cannot fit even alone, so fail it (no livelock)."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        request = self.scheduler.waiting[0]
        live = self.outputs.live.get(request.request_id)
        if live is None or live.request is not request:  # cannot happen: a waiting request is live
            self.scheduler.remove(request)
            return
        self.end(live, "error", error=(
            f"request needs {request.max_total_tokens()} tokens of KV cache but only "
            f"{self.blocks.limit * self.config.block_size} exist (num_blocks={self.blocks.limit})"))

    # ------------------------------------------------- commands (between steps)
    def admit(self, live: LiveRequest) -> None:
        """Hand a submitted request to the scheduler, unless it was cancelled before it got here."""
        request = live.request
        if self.outputs.is_live(live):
            self.scheduler.add(request)
            self.telemetry.event(request.request_id, "queued", self.step_index, t=request.timings.queued,
                                 detail=str(request.max_total_tokens()))  # the UI's KV-shrink floor

    def end(self, live: LiveRequest, reason: str, *, token_ids: list[int] | None = None,
            error: str | None = None) -> None:
        self.outputs.end(live, reason, self.step_index, token_ids=token_ids, error=error)

    def cancel(self, live: LiveRequest) -> None:
        if self.outputs.is_live(live):
            self.end(live, "cancelled")

    def end_all(self, reason: str) -> None:
        """The loop is going away: every open request ends with an error."""
        self.inflight = None
        for live in list(self.outputs.live.values()):
            self.end(live, "error", error=reason)

    def apply_config(self, new: EngineConfig) -> None:
        """A reconfiguration, at a step boundary: the scheduler's knobs, the prefix cache, the KV limit."""
        old = self.config
        self.config = new
        self.scheduler.max_batch, self.scheduler.token_budget = new.max_batch, new.token_budget
        self.scheduler.policy = new.policy
        self.scheduler.decode_steps = new.decode_steps
        if new.prefix_caching != old.prefix_caching:
            self.blocks.set_prefix_caching(new.prefix_caching)
        if new.num_blocks != self.blocks.limit:
            self.blocks.set_limit(new.num_blocks)
            for live in list(self.outputs.live.values()):
                if live.request.max_total_tokens() > self.max_model_len:
                    self.end(live, "error", error=(
                        f"num_blocks was reduced to {new.num_blocks}: this request needs "
                        f"{live.request.max_total_tokens()} tokens but only {self.max_model_len} fit"))
        self.telemetry.event("engine", "reconfigured", self.step_index, detail=repr(
            {k: getattr(new, k) for k in LIVE_FIELDS}))

    # ------------------------------------------------------------- telemetry
    def _record(self, flight: Flight, accepted: int, finished: list[str], t_end: float, post_s: float) -> None:
        plan, result = flight.plan, flight.result
        slots = [SlotRecord(rid, n * plan.steps, kind)
                 for rid, n, kind in zip(plan.request_ids, plan.num_tokens, plan.kinds)]
        slots += [SlotRecord("", 0, "padding")] * plan.padded_slots
        tables = {r.request_id: list(r.block_ids) for r in self.scheduler.running}
        gpu_start, gpu_end = self._compute_span(result)
        self.telemetry.record_step(StepRecord(
            step=self.step_index, t_start=flight.t_start, t_end=t_end, slots=slots, block_tables=tables,
            shared_blocks=sorted(self.blocks.shared), num_blocks=self.blocks.limit,
            num_free_blocks=self.blocks.num_free, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), tokens_emitted=accepted,
            finished=finished, preempted=plan.preempted_ids, schedule_s=flight.schedule_s,
            prepare_s=result.prepare_s, forward_s=result.launch_s, postprocess_s=post_s,
            gpu_start=gpu_start, gpu_end=gpu_end, prefix_hit_rate=self.blocks.stats.hit_rate,
            overlapped=bool(self.config.overlap), graphed=result.graphed,
        ))

    def _compute_span(self, result: StepResult) -> tuple[float | None, float | None]:
        """The step's compute span on the host clock: from CUDA events on a GPU, from the compute
        worker's clock on a CPU (the lane that runs beside the loop's host work)."""
        if result.compute_span is not None:
            return result.compute_span
        if result.gpu_start is None or result.gpu_end is None:
            return None, None
        if self._gpu_clock is None:
            ref = torch.cuda.Event(enable_timing=True)
            ref.record(self.runner.compute_stream)
            ref.synchronize()
            self._gpu_clock = (ref, time.perf_counter())
        ref, host = self._gpu_clock
        return host + ref.elapsed_time(result.gpu_start) / 1e3, host + ref.elapsed_time(result.gpu_end) / 1e3
