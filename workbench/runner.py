"""ModelRunner: a scheduled batch in, one sampled token per finishing chunk out.

It owns the device side: the KV cache, the flat ragged inputs of each step (no
padding between requests), the forward pass, sampling, and on CUDA the
machinery that lets the CPU run ahead of the GPU:

* `launch` prepares a step into one of two pinned host slots, copies it on an
  H2D stream, runs it on the compute stream and starts an async D2H copy of the
  sampled tokens on a third stream; it returns at once with an `InFlight`.
* `collect` waits for that step's tokens only.
* Carry-over: a request whose last token is still `PENDING` (sampled by the
  step in flight) gets its input id gathered on the device from that step's
  sampled tensor, so no host sync sits between steps.
* Steps replay CUDA graphs (graphs.py): decode-only steps one per padded batch size,
  prefill and mixed steps one per padded token count.

On a CPU the forward passes run on one compute worker thread, in launch order (the
CPU's stream): `launch` returns once the step is prepared and queued, so the
overlapped loop prepares step N+1 while step N computes here too.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from workbench_kernels.table import select

from .graphs import DecodeGraphs, MixedGraphs
from .loading import LoadedModel
from .models import AttentionContext
from .openmp import release_idle_workers
from .request import PENDING
from .sampling import Sampler
from .scheduler import Batch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    logits_indices: torch.Tensor
    ctx: AttentionContext


@dataclass(slots=True)
class InFlight:
    """A launched step: where its tokens will land and how to know they have."""

    batch: Batch
    sampled: torch.Tensor | None  # device tensor [num_sampling], the carry-over source
    host_tokens: torch.Tensor | None  # pinned [num_sampling] once the D2H copy is done
    done: torch.cuda.Event | None
    sample_index: dict[str, int] = field(default_factory=dict)  # request id -> its row in `sampled`
    sampled_ids: list[str] = field(default_factory=list)  # the request ids of `sampled`'s rows, in order
    prepare_s: float = 0.0
    launch_s: float = 0.0
    gpu_start: torch.cuda.Event | None = None
    gpu_end: torch.cuda.Event | None = None
    graphed: bool = False
    tokens: list[int] | None = None
    placeholders: dict[str, int] = field(default_factory=dict)  # request id -> index of its PENDING token
    schedule_s: float = 0.0
    t_start: float = 0.0
    computed: Future | None = None  # CPU: the compute worker's run of this step
    compute_span: tuple[float, float] | None = None  # CPU: when the worker computed it (host clock)


class _HostSlot:
    """One of the two pinned staging areas, so the CPU never overwrites what a copy still reads."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool, graph_numel: int = 0,
                 device: torch.device | None = None) -> None:
        def buf(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(n, dtype=dtype, pin_memory=pin)

        # a decode step for the CUDA graphs, staged in their static layout: one H2D copy
        self.graph_host = torch.zeros(graph_numel, dtype=torch.int64, pin_memory=pin)
        self.graph_dev = torch.zeros(graph_numel, dtype=torch.int64, device=device) if graph_numel else None
        self.consumed: torch.cuda.Event | None = None  # the compute stream has read graph_dev
        # Events of the step that last used this slot, made once and recorded again each time:
        # that step has been collected and recorded before the slot comes round again.
        if pin:
            self.gpu_start, self.gpu_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.done, self.staged, self.loaded = torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event()

        self.ids, self.carry = buf(max_tokens, torch.int64), buf(max_tokens, torch.int64)
        self.positions, self.slots = buf(max_tokens, torch.int64), buf(max_tokens, torch.int64)
        self.cu, self.seq_lens = buf(max_seqs + 1, torch.int32), buf(max_seqs, torch.int32)
        self.logits_idx = buf(max_seqs, torch.int64)
        self.tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, pin_memory=pin)
        self.sampled = buf(max_seqs, torch.int64)
        # this step's tokens on the device, apart from `last_sampled` (which the next step overwrites)
        self.sampled_dev = torch.empty(max_seqs, dtype=torch.int64, device=device) if pin else None
        self.copied: torch.cuda.Event | None = None
        self.computed: Future | None = None  # CPU: the worker's step that reads this slot


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
        self.sampler = Sampler(device, seed)
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.cuda = device.type == "cuda"
        max_tokens, max_seqs = max(token_budget, max_batch), max_batch
        # every step's sampled tokens, on the device: graphs carry over from here (graphs.py)
        self.last_sampled = torch.zeros(max_batch + 1, dtype=torch.int64, device=device)
        if self.cuda:
            self.compute_stream = torch.cuda.Stream(device)
            self.h2d_stream = torch.cuda.Stream(device)
            self.d2h_stream = torch.cuda.Stream(device)
        self.graphs = DecodeGraphs(self, max_batch) if (self.cuda and cuda_graphs) else None
        self.mixed_graphs = MixedGraphs(self, max_batch, token_budget) if (self.cuda and cuda_graphs) else None
        self.graph_families = [g for g in (self.graphs, self.mixed_graphs) if g is not None]  # tried in this order
        self._slots = [self._new_slot(max_tokens, max_seqs) for _ in range(2)]
        self._next_slot = 0
        # On a CPU the forward passes run on one worker thread, in launch order: the CPU's stream.
        # The loop thread then prepares step N+1 while step N computes (the overlapped loop), and
        # only this thread ever runs torch's parallel regions (one OpenMP team: see openmp.py).
        self._compute = _ComputeWorker() if not self.cuda else None

    def _new_slot(self, max_tokens: int, max_seqs: int) -> _HostSlot:
        graph_numel = max((g.numel for g in self.graph_families), default=0)
        return _HostSlot(max_tokens, max_seqs, self.max_blocks, self.cuda, graph_numel, self.device)

    def capture_graphs(self) -> None:
        """Capture the decode and the mixed-step graphs (warm-up time; one shared memory pool)."""
        pool = None
        for graphs in self.graph_families:
            pool = graphs.capture(pool)

    @property
    def graph_memory_bytes(self) -> int:
        return sum(g.memory_bytes for g in self.graph_families)

    def _graphs_for(self, batch: Batch, T: int, B: int, S: int, prev: InFlight | None
                    ) -> DecodeGraphs | MixedGraphs | None:
        if prev is not None and prev.sampled is not None and prev.sampled.numel() > self.last_sampled.numel():
            return None  # max_batch grew live: the step before sampled more rows than the graphs carry from
        return next((g for g in self.graph_families if g.can_run(batch, T, B, S)), None)

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

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    # --------------------------------------------------------------- prepare
    def _fill(self, slot: _HostSlot, batch: Batch, prev: InFlight | None) -> tuple[int, int, int, int]:
        """Write the batch into a pinned slot; return (tokens, seqs, sampling rows, table width).

        Python touches each request once (its tokens and block table, in `_gather`); positions,
        slots, offsets and the table layout are computed for the whole batch in numpy, so a
        decode step of 64 requests costs tens of microseconds, not a loop of small array
        writes per request.
        """
        g = _gather(batch)
        B, T = len(batch.items), len(g.ids)
        lens_a, tlens = np.array(g.lens, dtype=np.int64), np.array(g.table_lens, dtype=np.int64)
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lens_a, out=cu[1:])
        width = max(1, int(tlens.max()))
        tables = slot.tables.numpy()
        t_off = np.cumsum(tlens) - tlens
        tables[np.repeat(np.arange(B), tlens), np.arange(len(g.blocks)) - np.repeat(t_off, tlens)] = g.blocks
        starts_a = np.array(g.starts, dtype=np.int64)
        if g.decode_only:
            rows, pos = np.arange(B), starts_a
        else:
            rows = np.repeat(np.arange(B), lens_a)
            pos = np.arange(T) + np.repeat(starts_a - cu[:-1], lens_a)
        bs = self.block_size
        slot.ids.numpy()[:T] = g.ids
        slot.positions.numpy()[:T] = pos
        slot.slots.numpy()[:T] = tables[rows, pos // bs].astype(np.int64) * bs + pos % bs
        carry = slot.carry.numpy()
        carry[:T] = -1
        if g.pending:
            index = {} if prev is None else prev.sample_index
            sources = [index.get(request_id, -1) for _, request_id in g.pending]
            if -1 in sources:
                missing = g.pending[sources.index(-1)][1]
                raise RuntimeError(f"{missing}: pending token with no step in flight to carry it from")
            carry[[i for i, _ in g.pending]] = sources
        slot.cu.numpy()[: B + 1] = cu
        slot.seq_lens.numpy()[:B] = starts_a + lens_a
        logits = cu[1:] - 1 if g.decode_only else cu[1:][np.array(g.samples, dtype=bool)] - 1
        slot.logits_idx.numpy()[: len(logits)] = logits
        return T, B, len(logits), width

    def _to_device(self, slot: _HostSlot, T: int, B: int, S: int, width: int) -> StepInputs:
        dev, nb = self.device, self.cuda
        ids = slot.ids[:T].to(dev, non_blocking=nb)
        ctx = AttentionContext(
            cu_seqlens_q=slot.cu[: B + 1].to(dev, non_blocking=nb), seq_lens=slot.seq_lens[:B].to(dev, non_blocking=nb),
            block_tables=slot.tables[:B, :width].to(dev, non_blocking=nb),
            slot_mapping=slot.slots[:T].to(dev, non_blocking=nb),
            max_seqlen_q=int(np.diff(slot.cu.numpy()[: B + 1]).max()), max_seqlen_k=int(slot.seq_lens.numpy()[:B].max()),
            kv_caches=self.kv_caches,
        )
        return StepInputs(ids, slot.positions[:T].to(dev, non_blocking=nb), slot.logits_idx[:S].to(dev, non_blocking=nb), ctx)

    def _carry(self, slot: _HostSlot, T: int, prev: InFlight | None) -> torch.Tensor | None:
        """Device indices into the previous step's sampled tokens (-1 = keep the host id), or None."""
        if prev is None or prev.sampled is None or not bool((slot.carry[:T] >= 0).any()):
            return None
        return slot.carry[:T].to(self.device, non_blocking=self.cuda)

    @staticmethod
    def _apply_carry(inputs: StepInputs, carry: torch.Tensor | None, prev: InFlight | None) -> None:
        """Runs on the compute stream, after the previous step: its sampled tokens exist by then."""
        if carry is not None and prev is not None:
            inputs.input_ids = torch.where(carry >= 0, prev.sampled[carry.clamp_min(0)], inputs.input_ids)

    def prepare(self, batch: Batch, prev: InFlight | None = None) -> StepInputs:
        slot = self._slots[self._next_slot]
        T, B, S, width = self._fill(slot, batch, prev)
        inputs = self._to_device(slot, T, B, S, width)
        self._apply_carry(inputs, self._carry(slot, T, prev), prev)
        return inputs

    # ---------------------------------------------------------------- launch
    @torch.inference_mode()
    def launch(self, batch: Batch, prev: InFlight | None = None) -> InFlight:
        """Start one step; on CUDA this returns before the GPU has finished it."""
        t0 = time.perf_counter()
        slot = self._slots[self._next_slot]
        if slot.copied is not None:
            slot.copied.synchronize()  # the copy from two steps ago has read this slot
        if slot.computed is not None:
            slot.computed.exception()  # CPU: the worker has finished reading this slot (two steps ago);
            # its error, if any, was raised by collect() and already failed that step: not this one
        if batch.num_tokens > len(slot.ids) or len(batch.items) > len(slot.cu) - 1:
            slot = self._slots[self._next_slot] = self._new_slot(  # the budget or batch grew live
                max(batch.num_tokens, len(slot.ids)), max(len(batch.items), len(slot.cu) - 1))
        self._next_slot ^= 1
        T, B, S, width = self._fill(slot, batch, prev)
        sampling = [i for i in batch.items if i.samples]
        ids = [i.request.request_id for i in sampling]
        flight = InFlight(batch, None, None, None, dict(zip(ids, range(len(ids)))), ids)
        t1 = time.perf_counter()
        flight.prepare_s = t1 - t0
        if not self.cuda:
            slot.computed = flight.computed = self._compute.submit(self._compute_cpu, flight, slot, T, B, S, width,
                                                                   prev, sampling)
            flight.launch_s = time.perf_counter() - t1
            return flight
        prior = torch.cuda.current_stream(self.device)
        try:  # set_stream directly: a `torch.cuda.stream` context costs several device queries each
            self._launch_cuda(flight, slot, batch, prev, T, B, S, width, sampling)
        finally:
            torch.cuda.set_stream(prior)
        flight.launch_s = time.perf_counter() - t1
        return flight

    @torch.inference_mode()
    def _compute_cpu(self, flight: InFlight, slot: _HostSlot, T: int, B: int, S: int, width: int,
                     prev: InFlight | None, sampling: list) -> None:
        """On the compute worker: the step's forward and sampling. Steps run in launch order, so the
        previous step's sampled tokens exist when this one gathers its carried-over inputs."""
        flight.compute_span = (time.perf_counter(), 0.0)
        inputs = self._to_device(slot, T, B, S, width)
        self._apply_carry(inputs, self._carry(slot, T, prev), prev)
        flight.sampled = self._forward_sample(inputs, sampling)
        flight.tokens = flight.sampled.tolist()
        flight.compute_span = (flight.compute_span[0], time.perf_counter())

    def _launch_cuda(self, flight: InFlight, slot: _HostSlot, batch: Batch, prev: InFlight | None,
                     T: int, B: int, S: int, width: int, sampling: list) -> None:
        """Copy in on the H2D stream, run on the compute stream, copy the tokens out on the D2H
        stream; events order the three, and nothing here waits for the GPU."""
        graphs = self._graphs_for(batch, T, B, S, prev)
        torch.cuda.set_stream(self.h2d_stream)
        if graphs is not None:
            numel = self._stage_graph(graphs, slot, T, B, S, width)
        else:
            inputs = self._to_device(slot, T, B, S, width)
            carry = self._carry(slot, T, prev)
        slot.copied = slot.staged
        slot.copied.record(self.h2d_stream)

        torch.cuda.set_stream(self.compute_stream)
        self.compute_stream.wait_event(slot.copied)
        if prev is not None and prev.gpu_end is not None:
            self.compute_stream.wait_event(prev.gpu_end)
        flight.gpu_start = slot.gpu_start
        flight.gpu_start.record(self.compute_stream)
        if graphs is not None:
            graphs.load(slot.graph_dev, numel)
            slot.consumed = slot.loaded
            slot.consumed.record(self.compute_stream)
            logits = graphs.replay(T, B, S, int(slot.seq_lens.numpy()[:B].max()))
            greedy = self.sampler.sample(logits, sampling, greedy=self.last_sampled[:S])
            sampled = slot.sampled_dev[:S].copy_(greedy)  # a slot buffer: lives as long as the runner
        else:
            self._apply_carry(inputs, carry, prev)
            sampled = self._forward_sample(inputs, sampling)  # runs the model even if nothing samples
            if 0 < S <= self.last_sampled.numel():
                self.last_sampled[:S].copy_(sampled)  # for a graphed step next
            for t in (inputs.input_ids, inputs.positions, inputs.logits_indices, inputs.ctx.slot_mapping,
                      inputs.ctx.cu_seqlens_q, inputs.ctx.seq_lens, inputs.ctx.block_tables,
                      *([carry] if carry is not None else [])):
                t.record_stream(self.compute_stream)
            sampled.record_stream(self.d2h_stream)
        flight.gpu_end = slot.gpu_end
        flight.gpu_end.record(self.compute_stream)
        flight.graphed, flight.sampled = graphs is not None, sampled

        torch.cuda.set_stream(self.d2h_stream)
        self.d2h_stream.wait_event(flight.gpu_end)
        flight.host_tokens = slot.sampled[: len(sampling)]
        flight.host_tokens.copy_(sampled, non_blocking=True)
        flight.done = slot.done
        flight.done.record(self.d2h_stream)

    def _stage_graph(self, graphs: DecodeGraphs | MixedGraphs, slot: _HostSlot, T: int, B: int, S: int,
                     width: int) -> int:
        """On the H2D stream: the step, in the graphs' static layout, to this slot's device copy."""
        assert slot.graph_dev is not None
        if slot.consumed is not None:
            self.h2d_stream.wait_event(slot.consumed)  # the compute stream has read it two steps ago
        numel = graphs.stage(slot.graph_host.numpy(), slot.ids.numpy()[:T], slot.positions.numpy()[:T],
                             slot.slots.numpy()[:T], slot.carry.numpy()[:T], slot.cu.numpy()[: B + 1],
                             slot.seq_lens.numpy()[:B], slot.logits_idx.numpy()[:S], slot.tables.numpy()[:B, :width])
        slot.graph_dev[:numel].copy_(slot.graph_host[:numel], non_blocking=True)
        return numel

    def _forward_sample(self, inputs: StepInputs, sampling: list) -> torch.Tensor:
        """Forward (always: a prefill-only step still writes its K/V), then sample the finishing rows."""
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        if not sampling:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
        return self.sampler.sample(logits, sampling)

    def collect(self, flight: InFlight) -> list[int]:
        """The step's sampled tokens on the host, waiting only for that step."""
        if flight.computed is not None:
            flight.computed.result()  # the compute worker's step (CPU): its exception, if any, is raised here
        if flight.tokens is None:
            assert flight.done is not None and flight.host_tokens is not None
            flight.done.synchronize()
            flight.tokens = flight.host_tokens.tolist()
        return flight.tokens

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits at every position of the batch (teacher forcing in tests and notebooks)."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
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


def _token_slice(prompt: list[int], output: list[int], start: int, n: int) -> list[int]:
    """tokens[start:start+n] of prompt+output without building the concatenation."""
    p = len(prompt)
    if start >= p:
        return output[start - p : start - p + n]
    if start + n <= p:
        return prompt[start : start + n]
    return prompt[start:] + output[: start + n - p]


@dataclass(slots=True)
class _Gathered:
    """What `_fill` needs from each request of a batch, in batch order."""

    ids: list[int]  # input token ids, flat (PENDING ones as 0)
    blocks: list[int]  # every request's block table, concatenated
    starts: list[int]
    lens: list[int]
    table_lens: list[int]
    samples: list[bool]
    pending: list[tuple[int, str]]  # (index into ids, request id) of tokens still on the device
    decode_only: bool


def _gather(batch: Batch) -> _Gathered:
    """Read each request once. A decode-only batch (the steady state) takes list comprehensions:
    each decode's input is its last token (an output token, or the prompt's last when a chunked
    prefill left only that one), and every decode samples."""
    items = batch.items
    if all(i.kind == "decode" for i in items):
        requests = [i.request for i in items]
        ids = [(r.output_token_ids or r.prompt_token_ids)[-1] for r in requests]
        tables = [r.block_ids for r in requests]
        pending = [(k, r.request_id) for k, (r, t) in enumerate(zip(requests, ids)) if t == PENDING]
        for k, _ in pending:
            ids[k] = 0
        return _Gathered(ids, [b for t in tables for b in t], [i.start for i in items], [1] * len(items),
                         list(map(len, tables)), [True] * len(items), pending, True)
    g = _Gathered([], [], [], [], [], [], [], False)
    for item in items:
        r, s, n = item.request, item.start, item.num_tokens
        tokens = _token_slice(r.prompt_token_ids, r.output_token_ids, s, n)
        if tokens[-1] == PENDING:
            g.pending.append((len(g.ids) + n - 1, r.request_id))
            tokens = tokens[:-1] + [0]
        g.ids += tokens
        g.blocks += r.block_ids
        g.starts.append(s)
        g.lens.append(n)
        g.table_lens.append(len(r.block_ids))
        g.samples.append(item.samples)
    return g
