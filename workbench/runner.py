"""ModelRunner: a step plan in, one sampled token per sampling row out.

It owns the device side: the model and its KV cache, the request table (each
request's tokens, blocks and sampling parameters: request_table.py), the
staging of step inputs, the CUDA graphs and the streams. Per step:

* `launch(plan)` takes in the plan's bookkeeping, builds the step's inputs on
  the host (step_inputs.py), and starts it: on CUDA it copies the inputs on an
  H2D stream, runs the step on the compute stream (a graph replay, or eagerly)
  and copies the sampled tokens out on a D2H stream, and returns a
  `StepResult` before the GPU is done; on a CPU the compute worker thread runs
  the step, in launch order (the CPU's stream).
* Every step reads its input ids from the host where the host has them and
  from the request table's device tokens elsewhere, and writes the tokens it
  samples there. So the step after one still in flight needs nothing from the
  host to carry on (the carry-over is that gather), whatever the loop.
* A decode run (`plan.steps` > 1) launches its steps together: on CUDA they are
  staged in one copy and replayed one after the other, each reading the token
  the one before sampled from the table. The host plans, prepares and
  launches once for all of them.
* `collect(result)` waits for that step's tokens only (a run's, step after step).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from workbench_kernels.table import select

from .graphs import DecodeGraphs, MixedGraphs
from .loading import LoadedModel
from .openmp import release_idle_workers
from .plan import StepPlan
from .request_table import RequestTable
from .sampling import Sampler
from .step_inputs import (HostStep, PinnedStep, StepTensors, build_host_step, gather_input_ids, next_decode_step,
                          to_device)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    """A launched step: its sampled tokens on the device, their host copy, and how to know it landed."""

    tokens: torch.Tensor | None = None  # device [steps * S]: each step's sampled tokens in turn
    host_tokens: torch.Tensor | None = None  # pinned [steps * S], filled by the D2H copy (CUDA)
    done: torch.cuda.Event | None = None  # the D2H copy has landed (CUDA)
    token_list: list[int] | None = None  # the tokens on the host, once collected
    prepare_s: float = 0.0
    launch_s: float = 0.0
    graphed: bool = False
    gpu_start: torch.cuda.Event | None = None
    gpu_end: torch.cuda.Event | None = None
    computed: Future | None = None  # CPU: the compute worker's run of this step
    compute_span: tuple[float, float] | None = None  # CPU: when the worker computed it (host clock)


@dataclass(slots=True)
class _Slot:
    """One of the two staging areas a step goes through, with what tells when it is free again."""

    pinned: PinnedStep
    graph_host: torch.Tensor  # a pinned mirror of the graphs' static layout (one per step of a run)
    graph_dev: torch.Tensor | None  # its device copy, loaded into the graph on the compute stream
    sampled_dev: torch.Tensor | None  # this step's (run's) tokens on the device, safe from the next replay
    events: dict[str, torch.cuda.Event] = field(default_factory=dict)
    copied: torch.cuda.Event | None = None  # the H2D copy has read the pinned buffers
    consumed: torch.cuda.Event | None = None  # the compute stream has read graph_dev
    computed: Future | None = None  # CPU: the worker's step that reads this slot


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, kernel_backend: str = "auto", seed: int = 0, max_model_len: int = 8192,
                 max_batch: int = 256, token_budget: int = 8192, cuda_graphs: bool = True) -> None:
        self.model = loaded.model
        self.model.kernels = select(device, kernel_backend)
        self.model.place(device, dtype)  # idempotent: the engine has usually placed it already
        self.device, self.dtype, self.block_size = device, dtype, block_size
        cfg = loaded.config
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.table = RequestTable(max_batch, max_model_len, self.max_blocks, device, default_seed=seed)
        self.sampler = Sampler(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute_stream = torch.cuda.Stream(device)
            self.h2d_stream = torch.cuda.Stream(device)
            self.d2h_stream = torch.cuda.Stream(device)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        if self.cuda and cuda_graphs:
            vocab = (self.model.embed_tokens if self.model.lm_head is None else self.model.lm_head).weight.shape[0]
            logits_dtype = self.model.embed_tokens.weight.dtype
            self.graphs = DecodeGraphs(max_batch, max_model_len, self.max_blocks, vocab, logits_dtype, device)
            self.mixed_graphs = MixedGraphs(max_batch, token_budget, max_model_len, self.max_blocks, block_size,
                                            vocab, logits_dtype, device)
        self.graph_families = [g for g in (self.graphs, self.mixed_graphs) if g is not None]  # tried in this order
        self._graph_generation = -1  # the request table's generation the graphs were captured on
        self._slots = [self._new_slot(max(token_budget, max_batch), max_batch, 1) for _ in range(2)]
        self._next_slot = 0
        # On a CPU the forward passes run on one worker thread, in launch order: the CPU's stream.
        # The loop thread then prepares step N+1 while step N computes (the overlapped loop), and
        # only this thread ever runs torch's parallel regions (one OpenMP team: see openmp.py).
        self._compute = _ComputeWorker() if not self.cuda else None

    def _new_slot(self, max_tokens: int, max_seqs: int, steps: int) -> _Slot:
        graph_numel = max((g.staging_size(steps) for g in self.graph_families), default=0)
        slot = _Slot(PinnedStep(max_tokens, max_seqs, self.max_blocks, self.cuda, steps),
                     torch.zeros(graph_numel, dtype=torch.int64, pin_memory=self.cuda),
                     torch.zeros(graph_numel, dtype=torch.int64, device=self.device) if graph_numel else None,
                     torch.empty(max_seqs * steps, dtype=torch.int64, device=self.device) if self.cuda else None)
        if self.cuda:  # made once, recorded again each time the slot comes round
            slot.events = {"gpu_start": torch.cuda.Event(enable_timing=True),
                           "gpu_end": torch.cuda.Event(enable_timing=True),
                           "done": torch.cuda.Event(), "staged": torch.cuda.Event(), "loaded": torch.cuda.Event()}
        return slot

    def capture_graphs(self) -> None:
        """Capture the decode and the mixed-step graphs (warm-up time; one shared memory pool)."""
        pool = None
        for graphs in self.graph_families:
            pool = graphs.capture(self._greedy_step, self.kv_caches, pool)
        self._graph_generation = self.table.generation

    @property
    def graph_memory_bytes(self) -> int:
        return sum(g.memory_bytes for g in self.graph_families)

    @property
    def kernels_name(self) -> str:
        return self.model.kernels.name

    def idle(self) -> None:
        """The loop has no work: free the compute worker's idle OpenMP threads (the cores are the
        notebook's until work comes)."""
        if self._compute is not None:
            self._compute.submit(release_idle_workers)

    def close(self) -> None:
        """Stop the compute worker (CPU); the runner must not launch again."""
        if self._compute is not None:
            self._compute.close()

    # ------------------------------------------------------------- the step
    def _greedy_step(self, t: StepTensors, logits_out: torch.Tensor | None = None,
                     tokens_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids from the table, forward, the sampling rows' logits and argmax, and those tokens
        back into the table. Eager steps call it as is; graphs capture it over their static buffers."""
        device_tokens = self.table.device_tokens
        hidden = self.model(gather_input_ids(device_tokens, t), t.positions, t.ctx)
        if t.logits_index is not None:
            if t.logits_index.numel() == 0:  # a prefill-only step: its K/V are what it was for
                return hidden[:0], t.out_index
            hidden = hidden[t.logits_index]
        logits = self.model.compute_logits(hidden, out=logits_out)
        if tokens_out is None:
            tokens_out = logits.max(dim=-1).indices  # max's index, as argmax's; ~3x faster on a CPU (49k vocab)
        else:
            torch.max(logits, dim=-1, out=(torch.empty(tokens_out.shape, dtype=logits.dtype, device=logits.device),
                                           tokens_out))
        device_tokens.index_copy_(0, t.out_index, tokens_out)
        return logits, tokens_out

    def _sample_others(self, step: HostStep, logits: torch.Tensor, tokens: torch.Tensor,
                       out_index: torch.Tensor) -> None:
        """Replace the argmax of the rows that draw (temperature > 0), in `tokens` and in the table.
        Their parameters come from the step, as they were at launch (never from the table now)."""
        drawn = step.drawn
        if drawn is None:
            return
        where = torch.from_numpy(drawn.index).to(logits.device)
        picked = self.sampler.sample(logits[where], drawn.params, drawn.seeds, drawn.counters)
        tokens[where] = picked
        self.table.device_tokens.index_copy_(0, out_index[where], picked)

    def _eager_step(self, step: HostStep, slot: _Slot) -> torch.Tensor:
        t = to_device(step, slot.pinned, self.device, self.kv_caches)
        logits, tokens = self._greedy_step(t)
        self._sample_others(step, logits, tokens, t.out_index)
        return tokens

    # ---------------------------------------------------------------- launch
    def apply(self, plan: StepPlan) -> None:
        """Take in an empty plan's bookkeeping (requests that left) without running a step."""
        self.table.apply(plan)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> StepResult:
        """Start one step; on CUDA (and on a CPU, through the compute worker) this returns before
        the step has been computed."""
        t0 = time.perf_counter()
        slot = self._free_slot(plan)
        if plan.admitted and not self.table.has_rows_for(plan):
            self._drain()  # the table grows: no step in flight may still write the old one
        rows = self.table.apply(plan)
        steps = [build_host_step(plan, rows, self.table, self.block_size)]
        for _ in range(1, plan.steps):
            steps.append(next_decode_step(steps[-1], self.table, self.block_size))
        result = StepResult()
        t1 = time.perf_counter()
        result.prepare_s = t1 - t0
        if self.cuda:
            prior = torch.cuda.current_stream(self.device)
            try:  # set_stream directly: a `torch.cuda.stream` context costs several device queries each
                self._launch_cuda(result, slot, steps)
            finally:
                torch.cuda.set_stream(prior)
        else:
            slot.computed = result.computed = self._compute.submit(self._compute_cpu, result, slot, steps)
        result.launch_s = time.perf_counter() - t1
        return result

    def _free_slot(self, plan: StepPlan) -> _Slot:
        """The staging slot of two steps ago, once what read it is done (a bigger one if the token
        budget or the batch grew live)."""
        slot = self._slots[self._next_slot]
        if slot.copied is not None:
            slot.copied.synchronize()  # the H2D copy of two steps ago has read it
        if slot.computed is not None:
            slot.computed.exception()  # CPU: the worker has finished reading it (its error, if any,
            # was raised by collect() and already failed that step: not this one)
        p = slot.pinned
        if plan.total_tokens > p.max_tokens or len(plan) > p.max_seqs or plan.steps > p.steps:
            self._drain()  # rare (a knob was raised live): nothing in flight may still read the old buffers
            slot = self._slots[self._next_slot] = self._new_slot(
                max(plan.total_tokens, p.max_tokens), max(len(plan), p.max_seqs), max(plan.steps, p.steps))
        self._next_slot ^= 1
        return slot

    def _drain(self) -> None:
        """Wait until no launched step is still computing."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for slot in self._slots:
            if slot.computed is not None:
                slot.computed.exception()

    def _compute_cpu(self, result: StepResult, slot: _Slot, steps: list[HostStep]) -> None:
        """On the compute worker: the step's (or run's) forwards and sampling. Steps run in launch
        order, so the tokens the step before sampled are in the table when this one gathers its inputs."""
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = [self._eager_step(step, slot) for step in steps]
        result.tokens = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
        result.token_list = result.tokens.tolist()
        result.compute_span = (start, time.perf_counter())

    def _graphs_for(self, steps: list[HostStep]) -> DecodeGraphs | MixedGraphs | None:
        if self.table.generation != self._graph_generation:
            return None  # the table was reallocated (max_batch grew live): the graphs read the old one
        run = len(steps) > 1  # only decode graphs take a run's later steps
        return next((g for g in self.graph_families if g.can_run(steps[0]) and (not run or g.kind == "decode")),
                    None)

    def _launch_cuda(self, result: StepResult, slot: _Slot, steps: list[HostStep]) -> None:
        """Copy in on the H2D stream, run on the compute stream, copy the tokens out on the D2H
        stream; events order the three, and nothing here waits for the GPU."""
        graphs, ev = self._graphs_for(steps), slot.events
        result.gpu_start, result.gpu_end = ev["gpu_start"], ev["gpu_end"]
        if graphs is not None:
            sampled = self._run_graphed(graphs, steps, slot, result.gpu_start)
        else:
            sampled = self._run_eager(steps, slot, result.gpu_start)
        result.gpu_end.record(self.compute_stream)
        result.graphed, result.tokens = graphs is not None, sampled

        torch.cuda.set_stream(self.d2h_stream)
        self.d2h_stream.wait_event(result.gpu_end)
        result.host_tokens = slot.pinned.sampled[: sampled.numel()]
        result.host_tokens.copy_(sampled, non_blocking=True)
        result.done = ev["done"]
        result.done.record(self.d2h_stream)

    def _run_graphed(self, graphs: DecodeGraphs | MixedGraphs, steps: list[HostStep], slot: _Slot,
                     gpu_start: torch.cuda.Event) -> torch.Tensor:
        """Stage every step in the graphs' layout and copy them in at once; then, on the compute
        stream, load and replay each in turn. The tokens sampled, step after step."""
        torch.cuda.set_stream(self.h2d_stream)
        if slot.consumed is not None:
            self.h2d_stream.wait_event(slot.consumed)  # the compute stream has read it two launches ago
        loads = graphs.prepare_run(steps, slot.graph_host.numpy(), self.table.scratch)
        end = loads[-1][1] + loads[-1][2]
        slot.graph_dev[:end].copy_(slot.graph_host[:end], non_blocking=True)
        slot.copied = slot.events["staged"]
        slot.copied.record(self.h2d_stream)

        torch.cuda.set_stream(self.compute_stream)
        self.compute_stream.wait_event(slot.copied)
        gpu_start.record(self.compute_stream)
        S = steps[0].num_samples
        for j, (step, (key, offset, numel)) in enumerate(zip(steps, loads)):
            graphs.load(slot.graph_dev[offset:], numel)
            logits, greedy = graphs.replay(key, S)
            sampled = slot.sampled_dev[j * S : (j + 1) * S].copy_(greedy)  # the next replay overwrites `greedy`
            self._sample_others(step, logits, sampled, graphs.views["out_index"][:S])
        slot.consumed = slot.events["loaded"]
        slot.consumed.record(self.compute_stream)
        return slot.sampled_dev[: len(steps) * S]

    def _run_eager(self, steps: list[HostStep], slot: _Slot, gpu_start: torch.cuda.Event) -> torch.Tensor:
        """Each step copied in on the H2D stream and run eagerly on the compute stream. A run's steps
        share the slot's staging buffers: each is staged once the copy before it has read them."""
        tokens = []
        for j, step in enumerate(steps):
            if j:
                slot.copied.synchronize()
            torch.cuda.set_stream(self.h2d_stream)
            t = to_device(step, slot.pinned, self.device, self.kv_caches)
            slot.copied = slot.events["staged"]
            slot.copied.record(self.h2d_stream)
            torch.cuda.set_stream(self.compute_stream)
            self.compute_stream.wait_event(slot.copied)
            if not j:
                gpu_start.record(self.compute_stream)
            logits, sampled = self._greedy_step(t)
            self._sample_others(step, logits, sampled, t.out_index)
            for x in (t.host_ids, t.table_index, t.positions, t.logits_index, t.out_index, t.ctx.slot_mapping,
                      t.ctx.cu_seqlens_q, t.ctx.seq_lens, t.ctx.block_tables):
                x.record_stream(self.compute_stream)
            tokens.append(sampled)
        sampled = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
        sampled.record_stream(self.d2h_stream)
        return sampled

    def collect(self, result: StepResult) -> list[int]:
        """The step's sampled tokens on the host, waiting only for that step."""
        if result.computed is not None:
            result.computed.result()  # the compute worker's step (CPU): its exception, if any, is raised here
        if result.token_list is None:
            assert result.done is not None and result.host_tokens is not None
            result.done.synchronize()
            result.token_list = result.host_tokens.tolist()
        return result.token_list

    # ------------------------------------------------------------ teacher forcing
    @torch.inference_mode()
    def logits(self, plan: StepPlan) -> torch.Tensor:
        """Logits at every position of the plan's step, computed eagerly on the calling thread
        (teacher forcing in tests and notebooks: `table.force_tokens` gives the tokens to read)."""
        assert plan.steps == 1, "teacher forcing runs one step at a time"
        self._drain()
        rows = self.table.apply(plan)
        step = build_host_step(plan, rows, self.table, self.block_size)
        t = to_device(step, self._slots[self._next_slot].pinned, self.device, self.kv_caches)
        hidden = self.model(gather_input_ids(self.table.device_tokens, t), t.positions, t.ctx)
        return self.model.compute_logits(hidden).float()


class _ComputeWorker:
    """One named thread that runs submitted steps in order (a CPU's stand-in for a CUDA stream).

    Owned by the runner, started on first use, stopped by `close`; a step's exception is kept in
    its Future and raised where the loop collects it."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self.submit(lambda: None)  # the thread exists from the start, as the engine's loop does

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workbench-compute")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
