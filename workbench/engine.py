"""Engine: the front of the continuous batcher, and the thread its loop runs on.

Callers never touch engine state directly. `submit` validates and tokenizes in
the caller's thread (inputs.py), then hands a closure to the loop through an
inbox; the loop drains the inbox at each step boundary (so submissions,
cancels and reconfigurations land between steps) and has the core (core.py)
plan, launch and finish steps; the output processor (outputs.py) pushes each
request's chunk to its `RequestHandle` the moment its step ends.

Threads (docs/engine_threads.md): every public method may be called from any
thread, and from an `on_done` callback. No lock is ever held while user code
runs: callbacks run on the loop thread between steps, after the commands of
the inbox, with no engine lock held; a call made from a callback posts its
work (or, for a command, runs it right there at that step boundary).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Sequence

import torch

from .blocks import BlockManager
from .config import CUDA_DECODE_STEPS, LIVE_FIELDS, EngineConfig
from .core import EngineCore
from .detokenizer import detokenizer_factory
from .handle import RequestHandle
from .inputs import InputProcessor, QueueFullError, check_fits, check_request_id, make_params
from .loading import LoadedModel, load
from .openmp import release_idle_workers
from .outputs import LiveRequest, OutputProcessor, new_live
from .request import Request, RequestOutput, SamplingParams, StreamChunk
from .runner import ModelRunner
from .sampling import derived_seed
from .scheduler import Scheduler
from .telemetry import Telemetry

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_BLOCKS = 512
MAX_AUTO_BLOCKS = 65536


class Engine:
    """A running continuous batcher. See README for the API in use.

    Thread rule (docs/engine_threads.md): every public method is safe from any thread and from an
    `on_done` callback, and the engine never holds a lock while user code runs: callbacks run on the
    loop thread between steps, with no lock held. A callback may submit, cancel or reconfigure
    (on the loop thread a reconfigure applies at once), but must never wait on the engine
    (`handle.result()`, iterating a handle): the loop that would end the wait is the one running it.
    """

    def __init__(self, model: Any = None, config: EngineConfig | None = None, *, start: bool = True,
                 **overrides: Any) -> None:
        config = (config or EngineConfig()).replace(**overrides)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but no CUDA device is available; use device='cpu' or None")
        dtype = DTYPES[config.dtype] if config.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.loaded: LoadedModel = model if isinstance(model, LoadedModel) else load(model, dtype=dtype, device=device)
        self.loaded.model.place(device, dtype, config.block_weights)  # before sizing the KV cache from free memory
        self.tokenizer = self.loaded.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.loaded.config.vocab_size)
        self.new_detokenizer = detokenizer_factory(self.tokenizer)  # one per request, given its prompt ids
        self.device, self.dtype = device, dtype
        num_blocks = config.num_blocks or self._auto_blocks(config)
        config = config.replace(num_blocks=num_blocks)
        if config.overlap is None:
            config = config.replace(overlap=device.type == "cuda")
        if config.freeze_gc is None:
            config = config.replace(freeze_gc=device.type == "cuda")
        if config.decode_steps is None:
            config = config.replace(decode_steps=self._default_decode_steps(device))
        self.capacity = num_blocks
        model_len = config.max_model_len or self.loaded.config.max_position_embeddings
        if self.loaded.config.sliding_window:
            model_len = min(model_len, self.loaded.config.sliding_window)  # no sliding-window kernel (yet)
        self.loaded.model.extend_rope(model_len)
        self.runner = ModelRunner(self.loaded, num_blocks=num_blocks, block_size=config.block_size, device=device,
                                  dtype=dtype, kernel_backend=config.kernels, seed=config.seed,
                                  max_model_len=min(model_len, num_blocks * config.block_size),
                                  max_batch=config.max_batch, token_budget=config.token_budget,
                                  cuda_graphs=config.cuda_graphs)
        if self.runner.graphs is not None:
            log.info("capturing CUDA graphs: decode steps of %s requests, mixed steps of %s tokens ...",
                     self.runner.graphs.sizes, self.runner.mixed_graphs.sizes)
            self.runner.capture_graphs()
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_batch, config.token_budget, config.policy,
                                   config.decode_steps)
        self.telemetry = Telemetry(config.telemetry_steps, max_events=64 * config.telemetry_steps)
        self.outputs = OutputProcessor(self.loaded.eos_token_ids, self.telemetry, release=self.scheduler.remove)
        self.core = EngineCore(config, self.runner, self.scheduler, self.blocks, self.telemetry, self.outputs,
                               model_len)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._numbers = itertools.count()  # internal request numbers: unseeded requests' seeds derive from them
        self._thread: threading.Thread | None = None
        self._running = False
        self._pending = 0  # submitted, not yet handed to the scheduler (guarded by _lock)
        self._lock = threading.Lock()  # orders submit against stop, so no request slips past a stop
        self._posted: EngineConfig | None = None  # the config the last reconfigure will leave
        if config.freeze_gc:
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
            self.runner.close()  # the CPU's compute worker; a restart makes a new one
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._running

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def config(self) -> EngineConfig:
        """The applied config (a reconfigure shows here once the loop has applied it)."""
        return self.core.config

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + new) one request may hold: the model's context or the usable KV cache."""
        return self.core.max_model_len

    @property
    def num_failed_steps(self) -> int:
        """Steps that failed in a row just now (0 once a step succeeds)."""
        return self.core.num_failed_steps

    # ================================================================ public API
    def submit(self, prompt: Any, *, request_id: str | None = None, params: SamplingParams | None = None,
               on_done: Callable[[RequestHandle], None] | None = None, **sampling: Any) -> RequestHandle:
        """Validate, tokenize and queue a request; returns at once with its handle.

        `on_done(handle)` runs on the loop thread once the request has ended, with no lock held: it may
        call this API (submit, cancel, reconfigure), but must not block on the engine."""
        if not self._running:
            raise RuntimeError("the engine is stopped; call engine.start() first")
        self._yield_cpu_workers()
        live = self._prepare(prompt, request_id, params, sampling, on_done)
        self._enqueue([live])
        return live.handle

    def submit_many(self, prompts: Sequence[Any], *, on_done: Callable[[RequestHandle], None] | None = None,
                    **sampling: Any) -> list[RequestHandle]:
        """Submit a burst that reaches the scheduler at one step boundary.

        Every prompt is validated, tokenized and checked to fit first: one bad prompt raises
        ValueError and nothing of the burst is submitted."""
        if not self._running:
            raise RuntimeError("the engine is stopped; call engine.start() first")
        if isinstance(prompts, (str, bytes, dict)) or not hasattr(prompts, "__iter__"):
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        prompts = list(prompts)
        if "request_id" in sampling:
            raise ValueError("request_id cannot be given to submit_many (each request gets its own)")
        self._yield_cpu_workers()
        params = make_params(sampling.pop("params", None), sampling)
        lives = [self._prepare(p, None, params, {}, on_done) for p in prompts]
        self._enqueue(lives)
        return [live.handle for live in lives]

    def _prepare(self, prompt: Any, request_id: str | None, params: SamplingParams | None,
                 sampling: dict[str, Any], on_done: Callable[[RequestHandle], None] | None) -> LiveRequest:
        """Input processing in the caller's thread: params, tokens, fit, the request and its handle."""
        params = make_params(params, sampling)
        if on_done is not None and not callable(on_done):
            raise ValueError(f"on_done must be a callable or None, got {type(on_done).__name__}")
        rid = check_request_id(request_id) if request_id is not None else f"req-{next(self._ids)}"
        ids = self.tokenize(prompt)
        check_fits(len(ids), params, self.max_model_len, self.blocks.limit)
        request = Request(rid, ids, params)
        request.seed = params.seed if params.seed is not None else derived_seed(self.config.seed, next(self._numbers))
        request.timings.queued = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return new_live(request, RequestHandle(rid, loop, on_done), self.new_detokenizer(ids))

    def _enqueue(self, lives: list[LiveRequest]) -> None:
        """Register validated requests and post them to the loop as one command (one step boundary)."""
        with self._lock:  # a stop() either comes after this (and ends the requests) or made us raise
            if not self._running:
                raise RuntimeError("the engine is stopped; call engine.start() first")
            ids = [live.request.request_id for live in lives]
            taken = [rid for rid in ids if rid in self.outputs.live]
            if taken or len(set(ids)) != len(ids):
                raise ValueError(f"request_id must be a new non-empty string, got {(taken or ids)[0]!r}")
            queued = self._pending + len(self.scheduler.waiting)
            if self.config.max_queue is not None and queued + len(lives) > self.config.max_queue:
                raise QueueFullError(f"queue is full: max_queue={self.config.max_queue} requests are already waiting")
            for live in lives:
                self.outputs.live[live.request.request_id] = live
            self._pending += len(lives)
            self._inbox.put(lambda: self._admit(lives))

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
                self._cancel_handle(handle)

    def generate_batch(self, prompts: Sequence[Any], *, progress: bool = True, timeout: float | None = None,
                       **sampling: Any) -> list[RequestOutput]:
        """Blocking convenience for scripts: all prompts at once, results in input order.

        On a timeout (or an interrupt) the batch's unfinished requests are cancelled before it raises."""
        from tqdm.auto import tqdm

        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
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
                    raise TimeoutError(f"generate_batch did not finish within {timeout} s; "
                                       "its unfinished requests were cancelled") from None
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for handle in handles:
                if not handle.done:
                    self._cancel_handle(handle)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [h.result() for h in handles]

    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request; its stream ends with finish_reason 'cancelled'.

        The request is the one that holds `request_id` now: if that id is later reused, the new
        request is not touched by this call."""
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        live = self.outputs.live.get(request_id)
        if live is not None:
            self._call(lambda: self.core.cancel(live))

    def _cancel_handle(self, handle: RequestHandle) -> None:
        live = self.outputs.live.get(handle.request_id)
        if live is not None and live.handle is handle:
            self._call(lambda: self.core.cancel(live))

    def reconfigure(self, *, wait: bool = True, **changes: Any) -> EngineConfig:
        """Change live knobs (max_batch, num_blocks, token_budget, prefix_caching, policy, overlap, decode_steps)
        at the next step.

        With `wait=False` the change is posted and the validated config that will apply is returned at
        once: a UI thread must never wait on the loop. Each post builds on the one before (two quick
        posts of different knobs both hold), posts apply in order, and `engine.config` shows the applied
        config. From an `on_done` callback (the loop thread) the
        change applies at once, at that step boundary."""
        for key in changes:
            if key not in LIVE_FIELDS:
                raise ValueError(f"{key} cannot change while the engine runs; live fields are {list(LIVE_FIELDS)}")
        if "num_blocks" in changes:
            n = changes["num_blocks"]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.capacity:
                raise ValueError(f"num_blocks must be an integer in [1, {self.capacity}] (the KV cache allocated "
                                 f"at start), got {n!r}")
        if "overlap" in changes and changes["overlap"] is None:
            changes["overlap"] = self.device.type == "cuda"  # None: the device's default, as at start
        if "decode_steps" in changes and changes["decode_steps"] is None:
            changes["decode_steps"] = self._default_decode_steps(self.device)
        with self._lock:  # build on the last posted config, so quick posts of different knobs all hold
            new = (self._posted or self.config).replace(**changes)
            self._posted = new
        done = threading.Event()

        def apply() -> None:
            self.core.apply_config(new)
            done.set()

        self._call(apply)
        if not wait:
            return new
        if self._running and threading.current_thread() is not self._thread:
            done.wait(60)
        return self.config

    def tokenize(self, prompt: Any) -> list[int]:
        """A string, a chat (list of {role, content}) or token ids -> token ids; ValueError on bad input
        (also for a prompt too long to fit this engine, refused before tokenizing)."""
        return self.inputs.tokenize(prompt, self.max_model_len)

    def stats(self) -> dict[str, Any]:
        last = self.telemetry.last_step()
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "free_blocks": self.blocks.num_free, "num_blocks": self.blocks.limit, "step": self.core.step_index,
            "prefix_hit_rate": self.blocks.stats.hit_rate, "preemptions": self.scheduler.num_preemptions,
            "last_step_ms": None if last is None else 1e3 * (last.t_end - last.t_start),
            "cuda_graph_mib": self.runner.graph_memory_bytes / 2**20,
        }

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
            if threading.current_thread() is not self._thread:
                self._run_callbacks()  # the loop is not running: the caller's thread delivers them
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
                busy = self.core.has_work()
                if not busy:
                    self._yield_cpu_workers()  # idle: the cores are the notebook's until work comes
                    self.runner.idle()
                self._drain_inbox(block=not busy)
                if self._running and self.core.has_work():
                    self.core.step()
        except BaseException as exc:
            log.exception("the engine loop died; every request in flight is failed")
            reason = f"engine stopped: {type(exc).__name__}: {exc}"  # the cause reaches every caller
            raise
        finally:
            self._running = False  # a dead loop must refuse new work, not queue it forever
            self._drain_inbox(block=False)
            self.core.end_all(reason)
            self._run_callbacks()

    def _yield_cpu_workers(self) -> None:
        """On a CPU, free this thread's idle OpenMP workers: one thread's team at a time runs unthrottled."""
        if self.device.type == "cpu":
            release_idle_workers()

    def _drain_inbox(self, block: bool) -> None:
        """Run the posted commands, then the callbacks of requests that ended meanwhile.

        No lock is held here: a command or a callback may submit, cancel or reconfigure, and
        what it posts runs in this same drain (a burst is one command, so it lands at one step
        boundary). Callbacks run after the step that ended their requests, never inside it."""
        self._run_callbacks()
        try:
            fn = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a bad command must not take the loop down
                log.exception("an engine command failed")
            self._run_callbacks()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run_callbacks(self) -> None:
        """Call the on_done of every request that has ended, with no lock held (loop thread)."""
        callbacks = self.outputs.callbacks
        while callbacks:
            handle = callbacks.pop(0)
            try:
                handle.run_on_done()
            except Exception:  # noqa: BLE001 - a caller's on_done callback must not hurt the engine
                log.exception("on_done callback of %s raised", handle.request_id)

    def _admit(self, lives: list[LiveRequest]) -> None:
        """Hand a submitted burst to the scheduler (those not cancelled before they got here)."""
        for live in lives:
            self._admit_one(live)

    def _admit_one(self, live: LiveRequest) -> None:
        self.core.admit(live)
        with self._lock:
            self._pending -= 1  # after the add: max_queue counts the request in one place or the other

    @staticmethod
    def _default_decode_steps(device: torch.device) -> int:
        """decode_steps=None: runs on a GPU, where a small model's step is shorter than the host's
        work for it; one step at a time on a CPU, whose forward dwarfs the host's work anyway."""
        return CUDA_DECODE_STEPS if device.type == "cuda" else 1

    def _auto_blocks(self, config: EngineConfig) -> int:
        per_block = self.loaded.config.kv_bytes_per_token(self.dtype) * config.block_size
        if self.device.type != "cuda":
            return CPU_DEFAULT_BLOCKS
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(16, min(MAX_AUTO_BLOCKS, int(free * config.gpu_memory_fraction) // per_block))


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

