"""Engine: the continuous-batching loop on one background thread.

Callers never touch engine state directly. `submit` validates and tokenizes
in the caller's thread, then hands a closure to the loop through an inbox;
the loop drains the inbox at each step boundary (so submissions, cancels and
reconfigurations land between steps), schedules, runs the model, appends the
sampled tokens and pushes each request's chunk to its `RequestHandle` the
moment its step ends.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import torch

from .blocks import BlockManager
from .config import LIVE_FIELDS, EngineConfig
from .detokenizer import Detokenizer, detokenizer_factory, push_many
from .handle import RequestHandle, wake_all
from .loading import LoadedModel, load
from .openmp import release_idle_workers
from .request import PENDING, Request, RequestOutput, SamplingParams, Status, StreamChunk
from .runner import InFlight, ModelRunner
from .scheduler import Batch, Scheduler
from .telemetry import SlotRecord, StepRecord, Telemetry

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_BLOCKS = 512
MAX_AUTO_BLOCKS = 65536


class QueueFullError(ValueError):
    """Raised by submit when `max_queue` requests are already waiting."""


@dataclass(slots=True)
class _Live:
    """Per-request state the loop keeps beside the scheduler's `Request`."""

    request: Request
    handle: RequestHandle
    detok: Detokenizer
    sent: int = 0  # characters of request.text already streamed
    hold: int = 0  # characters held back while they could still start a stop string


class Engine:
    """A running continuous batcher. See README for the API in use."""

    def __init__(self, model: Any = None, config: EngineConfig | None = None, *, start: bool = True,
                 **overrides: Any) -> None:
        config = (config or EngineConfig()).replace(**overrides)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[config.dtype] if config.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.loaded: LoadedModel = model if isinstance(model, LoadedModel) else load(model, dtype=dtype, device=device)
        self.loaded.model.place(device, dtype, config.block_weights)  # before sizing the KV cache from free memory
        self.tokenizer = self.loaded.tokenizer
        self.new_detokenizer = detokenizer_factory(self.tokenizer)  # one per request, given its prompt ids
        self.device, self.dtype = device, dtype
        num_blocks = config.num_blocks or self._auto_blocks(config)
        self.config = config.replace(num_blocks=num_blocks)
        self.capacity = num_blocks
        model_len = config.max_model_len or self.loaded.config.max_position_embeddings
        if self.loaded.config.sliding_window:
            model_len = min(model_len, self.loaded.config.sliding_window)  # no sliding-window kernel (yet)
        self.loaded.model.extend_rope(model_len)
        self._model_len = model_len
        self.runner = ModelRunner(self.loaded, num_blocks=num_blocks, block_size=config.block_size, device=device,
                                  dtype=dtype, kernel_backend=config.kernels, seed=config.seed,
                                  max_model_len=min(model_len, num_blocks * config.block_size),
                                  max_batch=config.max_batch, token_budget=config.token_budget,
                                  cuda_graphs=config.cuda_graphs)
        if self.config.overlap is None:
            self.config = self.config.replace(overlap=device.type == "cuda")
        self._inflight: InFlight | None = None
        self._gpu_clock: tuple[torch.cuda.Event, float] | None = None
        if self.runner.graphs is not None:
            log.info("capturing CUDA graphs: decode steps of %s requests, mixed steps of %s tokens ...",
                     self.runner.graphs.sizes, self.runner.mixed_graphs.sizes)
            self.runner.capture_graphs()
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_batch, config.token_budget, config.policy)
        self.telemetry = Telemetry(config.telemetry_steps, max_events=64 * config.telemetry_steps)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._tok_lock = threading.Lock()
        self._gate = threading.Lock()  # held while a burst is queued, so it lands at one step boundary
        self._thread: threading.Thread | None = None
        self._running = False
        self._step_index = 0
        self._pending = 0  # submitted, not yet handed to the scheduler (guarded by _lock)
        self._lock = threading.Lock()  # orders submit against stop, so no request slips past a stop
        self.num_failed_steps = 0
        if self.config.freeze_gc is None:
            self.config = self.config.replace(freeze_gc=device.type == "cuda")
        if self.config.freeze_gc:
            _freeze_gc()  # last, so the block table (one object per KV block) is frozen too
        log.info("engine ready: %s on %s/%s, %d KV blocks x %d tokens, kernels=%s", self.loaded.name,
                 device, dtype, num_blocks, config.block_size, self.runner.kernels_name)
        if start:
            self.start()

    # ================================================================ lifecycle
    def start(self) -> "Engine":
        if self._running:
            return self
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="workbench-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still in flight end with an error chunk."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._inbox.put(lambda: None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._running

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + new) one request may hold: the model's context or the usable KV cache."""
        return min(self._model_len, self.blocks.limit * self.config.block_size)

    # ================================================================ public API
    def submit(self, prompt: Any, *, request_id: str | None = None, params: SamplingParams | None = None,
               on_done: Callable[[RequestHandle], None] | None = None, **sampling: Any) -> RequestHandle:
        """Validate, tokenize and queue a request; returns at once with its handle."""
        if not self._running:
            raise RuntimeError("the engine is stopped; call engine.start() first")
        self._yield_cpu_workers()
        params = _make_params(params, sampling)
        ids = self.tokenize(prompt)
        self._check_fits(len(ids), params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"request_id must be a new non-empty string, got {rid!r}")
        request = Request(rid, ids, params)
        request.timings.queued = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(rid, loop, on_done)
        live = _Live(request, handle, self.new_detokenizer(ids),
                     hold=max((len(s) for s in params.stop), default=1) - 1)
        with self._lock:  # a stop() either comes after this (and ends the request) or made us raise
            if not self._running:
                raise RuntimeError("the engine is stopped; call engine.start() first")
            if rid in self._live:
                raise ValueError(f"request_id must be a new non-empty string, got {rid!r}")
            queued = self._pending + len(self.scheduler.waiting)
            if self.config.max_queue is not None and queued >= self.config.max_queue:
                raise QueueFullError(f"queue is full: max_queue={self.config.max_queue} requests are already waiting")
            self._live[rid] = live
            self._pending += 1
            self._inbox.put(lambda: self._admit(live))
        return handle

    def submit_many(self, prompts: Sequence[Any], *, on_done: Callable[[RequestHandle], None] | None = None,
                    **sampling: Any) -> list[RequestHandle]:
        """Submit a burst that reaches the scheduler at one step boundary (all validated first)."""
        ids = [self.tokenize(p) for p in prompts]
        with self._gate:
            return [self.submit(i, on_done=on_done, **sampling) for i in ids]

    async def generate(self, prompt: Any, **sampling: Any) -> RequestOutput:
        """Generate to the end and return text, token ids and timings (await it)."""
        return await self.submit(prompt, **sampling).result_async()

    async def stream(self, prompt: Any, **sampling: Any) -> AsyncIterator[StreamChunk]:
        """Yield each token's chunk as soon as it is sampled; the last has `finished=True`."""
        handle = self.submit(prompt, **sampling)
        try:
            async for chunk in handle.chunks():
                yield chunk
        finally:
            if not handle.done:
                self.cancel(handle.request_id)

    def generate_batch(self, prompts: Sequence[Any], *, progress: bool = True, timeout: float | None = None,
                       **sampling: Any) -> list[RequestOutput]:
        """Blocking convenience for scripts: all prompts at once, results in input order."""
        from tqdm.auto import tqdm

        finished: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        handles = self.submit_many(prompts, on_done=finished.put, **sampling)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=len(handles), desc="generate_batch", unit="req") if progress else None  # off: no thread
        try:
            for _ in handles:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    finished.get(timeout=wait)
                except queue.Empty:
                    raise TimeoutError(f"generate_batch did not finish within {timeout} s") from None
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [h.result() for h in handles]

    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request; its stream ends with finish_reason 'cancelled'."""
        self._call(lambda: self._cancel(request_id))

    def reconfigure(self, *, wait: bool = True, **changes: Any) -> EngineConfig:
        """Change live knobs (max_batch, num_blocks, token_budget, prefix_caching, policy) at the next step.

        With `wait=False` the change is posted and the validated config that will apply is returned at
        once: a UI thread must never wait on the loop. Posts apply in order, so the last one wins;
        `engine.config` shows the applied config."""
        for key in changes:
            if key not in LIVE_FIELDS:
                raise ValueError(f"{key} cannot change while the engine runs; live fields are {list(LIVE_FIELDS)}")
        new = self.config.replace(**changes)
        if not 1 <= new.num_blocks <= self.capacity:
            raise ValueError(f"num_blocks must be an integer in [1, {self.capacity}], got {new.num_blocks!r}")
        done = threading.Event()

        def apply() -> None:
            self._apply_config(new)
            done.set()

        self._call(apply)
        if not wait:
            return new
        if self._running and threading.current_thread() is not self._thread:
            done.wait(60)
        return self.config

    def tokenize(self, prompt: Any) -> list[int]:
        """A string, a chat (list of {role, content}) or token ids -> token ids; ValueError on bad input."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt must be a non-empty string")
            with self._tok_lock:
                return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError("prompt messages must each have string 'role' and 'content'")
            if not any(m["content"].strip() for m in prompt):
                raise ValueError("prompt messages must not all be empty")
            with self._tok_lock:
                text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
                return list(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(prompt, (list, tuple)) and prompt and all(type(t) is int for t in prompt):
            vocab = self.loaded.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must be in [0, {vocab - 1}]")
            return list(prompt)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("prompt must not be empty")
        raise ValueError("prompt must be a string, a list of chat messages ({role, content}) or a list of "
                         f"token ids, got {type(prompt).__name__}")

    def stats(self) -> dict[str, Any]:
        last = self.telemetry.last_step()
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "free_blocks": self.blocks.num_free, "num_blocks": self.blocks.limit, "step": self._step_index,
            "prefix_hit_rate": self.blocks.stats.hit_rate, "preemptions": self.scheduler.num_preemptions,
            "last_step_ms": None if last is None else 1e3 * (last.t_end - last.t_start),
            "cuda_graph_mib": self.runner.graph_memory_bytes / 2**20,
        }

    def serve_api(self, port: int = 8000, host: str = "127.0.0.1", api_key: str | None = None,
                  **options: Any) -> Any:
        """Serve this engine over an OpenAI-compatible HTTP API (+ /metrics) in the background.

        Returns the server's handle: `.url`, `.stop()`, `.metrics()`. `port=0` picks a free port.
        Options: served_model_name, max_body_bytes, log_prompts, access_log (docs/http.md)."""
        from .server import serve  # FastAPI and uvicorn load only when a server starts

        return serve(self, port=port, host=host, api_key=api_key, **options)

    def check_invariants(self) -> None:
        """Assert the block/scheduler invariants (runs on the loop thread between steps)."""
        errors: list[BaseException] = []

        def check() -> None:
            try:
                self.scheduler.check()
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                errors.append(e)

        self._call(check, wait=True)
        if errors:
            raise errors[0]

    # ================================================================ loop side
    def _call(self, fn: Callable[[], None], wait: bool = False) -> None:
        """Run fn on the loop thread at the next step boundary (directly if the loop is not running)."""
        if not self._running or threading.current_thread() is self._thread:
            fn()
            return
        if not wait:
            self._inbox.put(fn)
            return
        done = threading.Event()
        self._inbox.put(lambda: (fn(), done.set()))
        done.wait(60)

    def _loop(self) -> None:
        reason = "engine stopped"
        try:
            while self._running:
                busy = self.scheduler.has_work() or self._inflight is not None
                if not busy:
                    self._yield_cpu_workers()  # idle: the cores are the notebook's until work comes
                self._drain_inbox(block=not busy)
                if self._running and (self.scheduler.has_work() or self._inflight is not None):
                    self._step_guarded()
        except BaseException as exc:
            log.exception("the engine loop died; every request in flight is failed")
            reason = f"engine stopped: {type(exc).__name__}: {exc}"  # the cause reaches every caller
            raise
        finally:
            self._running = False  # a dead loop must refuse new work, not queue it forever
            self._drain_inbox(block=False)
            self._inflight = None
            for live in list(self._live.values()):
                self._end(live, "error", error=reason)

    def _yield_cpu_workers(self) -> None:
        """On a CPU, free this thread's idle OpenMP workers: one thread's team at a time runs unthrottled."""
        if self.device.type == "cpu":
            release_idle_workers()

    def _drain_inbox(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        with self._gate:
            while True:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a bad command must not take the loop down
                    log.exception("an engine command failed")
                try:
                    fn = self._inbox.get_nowait()
                except queue.Empty:
                    return

    def _admit(self, live: _Live) -> None:
        request = live.request
        if request.request_id in self._live:  # else cancelled before it reached the loop
            self.scheduler.add(request)
            self.telemetry.event(request.request_id, "queued", self._step_index, t=request.timings.queued)
        with self._lock:
            self._pending -= 1  # after the add: max_queue counts the request in one place or the other

    def _step_guarded(self) -> None:
        batches: list[Batch] = []
        try:
            self._step(batches)
            self.num_failed_steps = 0
        except Exception as exc:  # noqa: BLE001 - contained: fail the step's requests, keep serving
            log.exception("step %d failed", self._step_index)
            self._inflight = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.num_failed_steps += 1
            victims = [i.request for b in batches for i in b.items] or list(self.scheduler.running)
            if self.num_failed_steps >= 3:
                victims = [live.request for live in list(self._live.values())]  # submit may add meanwhile
            for request in victims:
                live = self._live.get(request.request_id)
                if live is not None:
                    self._end(live, "error", error=f"{type(exc).__name__}: {exc}")

    def _step(self, batches: list[Batch]) -> None:
        """Schedule and launch step N+1, then finish step N (overlap) or N+1 itself (sync).

        With overlap the CPU schedules and launches the next step while the GPU
        still computes the previous one; requests sampled by that step hold a
        PENDING token, which the runner fills on the device (carry-over).
        """
        t0 = time.perf_counter()
        prev = self._inflight
        batch = self.scheduler.schedule() if self.scheduler.has_work() else Batch()
        t1 = time.perf_counter()
        for request in batch.preempted:
            self.telemetry.event(request.request_id, "preempted", self._step_index)
        flight = None
        if batch.items:
            batches.append(batch)
            self._mark_scheduled(batch, t1)
            flight = self.runner.launch(batch, prev)
            flight.schedule_s, flight.t_start = t1 - t0, t0
            for item in batch.items:
                if item.samples:
                    item.request.output_token_ids.append(PENDING)
                    flight.placeholders[item.request.request_id] = len(item.request.output_token_ids) - 1
        if prev is not None:
            batches.append(prev.batch)
            self._inflight = None
            self._finish(prev)
        if flight is None:
            if prev is None:
                self._fail_unschedulable()
            return
        self.scheduler.advance(flight.batch)  # every input token of this step is known by now
        if self.config.overlap:
            self._inflight = flight
        else:
            self._finish(flight)

    def _mark_scheduled(self, batch: Batch, now: float) -> None:
        for item in batch.items:
            if item.request.timings.first_scheduled is None:
                item.request.timings.first_scheduled = now
                self.telemetry.event(item.request.request_id, "scheduled", self._step_index, t=now)

    def _finish(self, flight: InFlight) -> None:
        """Collect a step's tokens, stream them, stop what should stop, record the step."""
        tokens = self.runner.collect(flight)
        t2 = time.perf_counter()
        finished: list[str] = []
        # ended while this step ran (cancelled, or a stop seen one step late): their token is discarded
        kept = [(live, t) for live, t in zip(map(self._live.get, flight.sampled_ids), tokens) if live is not None]
        try:
            deltas = push_many([live.detok for live, _ in kept], [t for _, t in kept])
        except Exception:  # noqa: BLE001 - one bad request must not fail the others: decode one by one
            deltas = [None] * len(kept)
        self.telemetry.events_at([(live.request.request_id, "token" if live.request.timings.first_token else "first_token")
                                  for live, _ in kept], self._step_index, t2)
        for (live, token), delta in zip(kept, deltas):
            position = flight.placeholders[live.request.request_id]
            live.request.output_token_ids[position] = token
            if self._on_token(live, token, position + 1, t2, delta):
                finished.append(live.request.request_id)
        wake_all(live.handle for live, _ in kept if live.handle.output is None)
        t3 = time.perf_counter()
        self._record(flight, len(kept), finished, t3, t3 - t2)
        self._step_index += 1

    def _fail_unschedulable(self) -> None:
        """Nothing could run: the head of the queue cannot fit even alone, so fail it (no livelock)."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        request = self.scheduler.waiting[0]
        live = self._live[request.request_id]
        self._end(live, "error", error=(
            f"request needs {request.max_total_tokens()} tokens of KV cache but only "
            f"{self.blocks.limit * self.config.block_size} exist (num_blocks={self.blocks.limit})"))

    def _on_token(self, live: _Live, token: int, generated: int, now: float, delta: str | None = None) -> bool:
        """Take in one sampled token (the `generated`-th), stream its text, end the request if it should stop."""
        request = live.request
        t = request.timings
        if t.first_token is None:
            t.first_token = now
        t.tokens.append(now)
        params = request.params
        old_len = len(request.text)
        try:
            request.text += live.detok.push(token) if delta is None else delta
        except Exception as exc:  # noqa: BLE001 - this request's text is broken, not the step
            log.exception("detokenizing %s failed", request.request_id)
            self._end(live, "error", error=f"{type(exc).__name__}: {exc}")
            return True
        reason = None
        if not params.ignore_eos and token in self.loaded.eos_token_ids:
            reason = "stop"
        elif generated >= params.max_new_tokens:
            reason = "length"
        if params.stop and _truncate_at_stop(request, old_len):
            reason = "stop"
        if reason is not None:
            self._end(live, reason, token_ids=[token])
            return True
        upto = max(live.sent, len(request.text) - live.hold)
        live.handle.push(StreamChunk(request.request_id, [token], request.text[live.sent:upto], time=now), wake=False)
        live.sent = upto
        return False

    def _end(self, live: _Live, reason: str, *, token_ids: list[int] | None = None, error: str | None = None) -> None:
        """Finish, cancel or fail a request: free its blocks, close its stream with a final chunk."""
        request = live.request
        now = time.perf_counter()
        self.scheduler.remove(request)
        request.status = Status.FINISHED
        request.finish_reason, request.error = reason, error
        request.timings.finished = now
        self.runner.release(request.request_id)
        self._live.pop(request.request_id, None)
        kind = {"cancelled": "cancelled", "error": "error"}.get(reason, "finished")
        self.telemetry.event(request.request_id, kind, self._step_index, detail=error or reason, t=now)
        request.output_token_ids = [t for t in request.output_token_ids if t != PENDING]
        output = RequestOutput(request.request_id, request.prompt_token_ids, list(request.output_token_ids),
                               request.text, reason, request.timings, error, request.num_preemptions,
                               request.num_cached_tokens)
        chunk = StreamChunk(request.request_id, token_ids or [], request.text[live.sent:], True, reason, error, now)
        live.sent = len(request.text)
        try:
            live.handle.push(chunk, output)
        except Exception:  # noqa: BLE001 - a caller's on_done callback must not fail the step
            log.exception("on_done callback of %s raised", request.request_id)

    def _cancel(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self._end(live, "cancelled")

    def _apply_config(self, new: EngineConfig) -> None:
        old = self.config
        self.config = new
        self.scheduler.max_batch, self.scheduler.token_budget = new.max_batch, new.token_budget
        self.scheduler.policy = new.policy
        if new.prefix_caching != old.prefix_caching:
            self.blocks.set_prefix_caching(new.prefix_caching)
        if new.num_blocks != self.blocks.limit:
            self.blocks.set_limit(new.num_blocks)
            for live in list(self._live.values()):
                if live.request.max_total_tokens() > self.max_model_len:
                    self._end(live, "error", error=(
                        f"num_blocks was reduced to {new.num_blocks}: this request needs "
                        f"{live.request.max_total_tokens()} tokens but only {self.max_model_len} fit"))
        self.telemetry.event("engine", "reconfigured", self._step_index, detail=repr(
            {k: getattr(new, k) for k in LIVE_FIELDS}))

    def _record(self, flight: InFlight, accepted: int, finished: list[str], t_end: float, post_s: float) -> None:
        batch = flight.batch
        slots = [SlotRecord(i.request.request_id, i.num_tokens, i.kind) for i in batch.items]
        slots += [SlotRecord("", 0, "padding")] * batch.padded_slots
        tables = {r.request_id: list(r.block_ids) for r in self.scheduler.running}
        gpu_start, gpu_end = self._gpu_times(flight)
        self.telemetry.record_step(StepRecord(
            step=self._step_index, t_start=flight.t_start, t_end=t_end, slots=slots, block_tables=tables,
            shared_blocks=sorted(self.blocks.shared), num_blocks=self.blocks.limit,
            num_free_blocks=self.blocks.num_free, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), tokens_emitted=accepted,
            finished=finished, preempted=[r.request_id for r in batch.preempted], schedule_s=flight.schedule_s,
            prepare_s=flight.prepare_s, forward_s=flight.launch_s, postprocess_s=post_s,
            gpu_start=gpu_start, gpu_end=gpu_end, prefix_hit_rate=self.blocks.stats.hit_rate,
            overlapped=bool(self.config.overlap), graphed=flight.graphed,
        ))

    def _gpu_times(self, flight: InFlight) -> tuple[float | None, float | None]:
        """The step's GPU span on the host clock, from CUDA events (None on a CPU)."""
        if flight.gpu_start is None or flight.gpu_end is None:
            return None, None
        if self._gpu_clock is None:
            ref = torch.cuda.Event(enable_timing=True)
            ref.record(self.runner.compute_stream)
            ref.synchronize()
            self._gpu_clock = (ref, time.perf_counter())
        ref, host = self._gpu_clock
        return host + ref.elapsed_time(flight.gpu_start) / 1e3, host + ref.elapsed_time(flight.gpu_end) / 1e3

    def _auto_blocks(self, config: EngineConfig) -> int:
        per_block = self.loaded.config.kv_bytes_per_token(self.dtype) * config.block_size
        if self.device.type != "cuda":
            return CPU_DEFAULT_BLOCKS
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(16, min(MAX_AUTO_BLOCKS, int(free * config.gpu_memory_fraction) // per_block))

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        limit = self.max_model_len
        if prompt_len + 1 > limit:
            raise ValueError(f"prompt is {prompt_len} tokens; at most {limit - 1} fit this engine "
                             f"(model context / KV cache of {self.blocks.limit} blocks)")
        if prompt_len + params.max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} with a {prompt_len}-token prompt exceeds "
                             f"the {limit}-token limit; max_new_tokens must be <= {limit - prompt_len}")


def _freeze_gc() -> None:
    """Move every object alive now (torch, the model, the tokenizer) out of the collector's sight.

    A full collection walks every tracked object: with torch and transformers
    imported that is several hundred thousand, ~0.1 s on one core, and the
    objects a long run keeps alive trigger one every few thousand tokens. On a
    GPU a 1-2 ms step then waits for it. Frozen objects are still freed by
    reference counting; only cycles among them are never collected.
    """
    gc.collect()
    gc.freeze()
    log.info("froze %d objects out of the garbage collector's full passes", gc.get_freeze_count())


def _make_params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    if params is not None and sampling:
        raise ValueError("pass either params= or sampling keywords, not both")
    if params is None:
        fields = SamplingParams.__dataclass_fields__
        for key in sampling:
            if key not in fields:
                raise ValueError(f"unknown sampling field {key!r}; fields are {sorted(fields)}")
        params = SamplingParams(**sampling)
    return params.validate()


def _truncate_at_stop(request: Request, old_len: int) -> bool:
    """Cut the text at the first stop string that the newest text completed."""
    longest = max(len(s) for s in request.params.stop)
    window_start = max(0, old_len - longest + 1)
    hits = [i for i in (request.text.find(s, window_start) for s in request.params.stop) if i >= 0]
    if not hits:
        return False
    request.text = request.text[: min(hits)]
    return True
