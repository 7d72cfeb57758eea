"""One step's inputs: built on the host from a plan (`HostStep`), then on the device (`StepTensors`).

The host side is a handful of numpy arrays computed for the whole batch at once
from the request table's rows: positions, KV slots, sequence offsets, block
tables, and where each sampled token goes. Python touches each request once
(its row id), so a decode step of 64 requests costs tens of microseconds.

`StepTensors` is the typed metadata a forward pass reads. It is built either
eagerly (`to_device`, fresh tensors each step) or as views of a CUDA graph
family's static buffers (graphs.py); `run_step` then computes the same thing
from either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models import AttentionContext
from .plan import StepPlan
from .request import SamplingParams
from .request_table import RequestTable


@dataclass(slots=True)
class DrawnRows:
    """The sampling rows that draw (temperature > 0), with their parameters as they were at launch:
    the step may run after the loop thread has moved the request table on (the CPU's compute worker)."""

    index: np.ndarray  # [N] int64, positions among the step's sampling rows
    params: list[SamplingParams]
    seeds: list[int]
    counters: list[int]


@dataclass(slots=True)
class HostStep:
    """A step's flat, ragged inputs on the host: T tokens over B requests, S of which sample."""

    host_ids: np.ndarray  # [T] int64, -1 where only the device has the token (table_index says where)
    table_index: np.ndarray  # [T] int64, flat index of each token in the table's device_tokens
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64, the KV cache slot each token's K/V is written to
    cu_seqlens: np.ndarray  # [B + 1] int64, token offsets of the requests
    seq_lens: np.ndarray  # [B] int64, each request's context length after this step
    logits_index: np.ndarray  # [S] int64, the token whose logits each sampling row reads
    out_index: np.ndarray  # [S] int64, flat table index each sampled token is written to
    tables: np.ndarray  # [B, W] int32, block tables (W = the longest of the batch)
    sample_rows: np.ndarray  # [S] int64, table rows of the sampling requests
    counters: np.ndarray  # [S] int64, index among its generated tokens of each sampled token
    decode_only: bool
    drawn: "DrawnRows | None" = None  # the sampling rows that do not take the argmax (None: all greedy)

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_samples(self) -> int:
        return len(self.logits_index)


def build_host_step(plan: StepPlan, rows: np.ndarray, table: RequestTable, block_size: int) -> HostStep:
    """The plan's step as flat arrays (rows: each request's row in the table, from `table.apply`)."""
    B = len(plan)
    starts = np.array(plan.starts, dtype=np.int64)
    lens = np.array(plan.num_tokens, dtype=np.int64)
    cu = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    if plan.decode_only:
        token_rows, positions, sampling = rows, starts, np.ones(B, dtype=bool)
    else:
        token_rows = np.repeat(rows, lens)
        positions = np.arange(cu[-1]) + np.repeat(starts - cu[:-1], lens)
        sampling = np.array(plan.samples, dtype=bool)
    width = max(1, int(table.num_blocks[rows].max()))
    tables = table.blocks[rows, :width]
    token_seq = np.arange(B) if plan.decode_only else np.repeat(np.arange(B), lens)
    slots = tables[token_seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
    ends = starts + lens
    sample_rows = rows[sampling]
    counters = ends[sampling] - table.prompt_len[sample_rows]
    return HostStep(
        host_ids=table.host_tokens[token_rows, positions], table_index=token_rows * table.width + positions,
        positions=positions, slots=slots, cu_seqlens=cu, seq_lens=ends, logits_index=cu[1:][sampling] - 1,
        out_index=sample_rows * table.width + ends[sampling], tables=tables, sample_rows=sample_rows,
        counters=counters, decode_only=plan.decode_only, drawn=_drawn_rows(table, sample_rows, counters))


def next_decode_step(step: HostStep, table: RequestTable, block_size: int) -> HostStep:
    """The decode step after `step` in a decode run: every request one position further, reading the
    token `step` samples (on the device: the host has none there, unless teacher forcing put one).

    Arithmetic on `step`'s arrays; the block tables are the same (a run's blocks come with its plan)."""
    positions = step.positions + 1
    rows = step.sample_rows
    slots = step.tables[np.arange(len(rows)), positions // block_size].astype(np.int64) * block_size
    drawn = step.drawn
    if drawn is not None:
        drawn = DrawnRows(drawn.index, drawn.params, drawn.seeds, [c + 1 for c in drawn.counters])
    return HostStep(
        host_ids=table.host_tokens.ravel()[step.table_index + 1], table_index=step.table_index + 1,
        positions=positions, slots=slots + positions % block_size, cu_seqlens=step.cu_seqlens,
        seq_lens=step.seq_lens + 1, logits_index=step.logits_index, out_index=step.out_index + 1, tables=step.tables,
        sample_rows=rows, counters=step.counters + 1, decode_only=True, drawn=drawn)


def _drawn_rows(table: RequestTable, sample_rows: np.ndarray, counters: np.ndarray) -> DrawnRows | None:
    drawing = ~table.greedy[sample_rows]
    if not drawing.any():
        return None
    index = np.flatnonzero(drawing)
    rows = sample_rows[index].tolist()
    return DrawnRows(index, [table.params[r] for r in rows], [table.seeds[r] for r in rows],
                     counters[index].tolist())


@dataclass(slots=True)
class StepTensors:
    """What a forward pass of one step reads on the device."""

    host_ids: torch.Tensor  # [T] int64, -1: read device_tokens[table_index]
    table_index: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    logits_index: torch.Tensor | None  # [S] int64; None: every token's row samples (decode graphs)
    out_index: torch.Tensor  # [S] int64
    ctx: AttentionContext


def to_device(step: HostStep, staged: "PinnedStep", device: torch.device,
              kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepTensors:
    """Eager step inputs: the step staged in `staged`, then copied to fresh device tensors
    (asynchronously on CUDA). A graphed step skips this: it is staged in its graph's layout."""
    staged.write(step)
    T, B, S, W = step.num_tokens, step.num_seqs, step.num_samples, step.tables.shape[1]
    nb = device.type == "cuda"

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=nb)

    ctx = AttentionContext(
        cu_seqlens_q=dev(staged.cu[: B + 1]), seq_lens=dev(staged.seq_lens[:B]),
        block_tables=dev(staged.tables[:B, :W]), slot_mapping=dev(staged.slots[:T]),
        max_seqlen_q=int(np.diff(step.cu_seqlens).max()), max_seqlen_k=int(step.seq_lens.max()),
        kv_caches=kv_caches)
    return StepTensors(dev(staged.host_ids[:T]), dev(staged.table_index[:T]), dev(staged.positions[:T]),
                       dev(staged.logits_index[:S]), dev(staged.out_index[:S]), ctx)


class PinnedStep:
    """Host buffers a step is staged in before its copy to the device (pinned on CUDA, so the copy
    is asynchronous). The runner keeps two and alternates, so the CPU never overwrites what a copy
    still reads."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool, steps: int = 1) -> None:
        def buf(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.max_tokens, self.max_seqs, self.steps = max_tokens, max_seqs, steps
        self.host_ids, self.table_index = buf(max_tokens), buf(max_tokens)
        self.positions, self.slots = buf(max_tokens), buf(max_tokens)
        self.cu, self.seq_lens = buf(max_seqs + 1, dtype=torch.int32), buf(max_seqs, dtype=torch.int32)
        self.logits_index, self.out_index = buf(max_seqs), buf(max_seqs)
        self.tables = buf(max_seqs, max_blocks, dtype=torch.int32)
        self.sampled = buf(max_seqs * steps)  # where the D2H copy puts the step's (or run's) tokens

    def fits(self, step: HostStep) -> bool:
        return step.num_tokens <= self.max_tokens and step.num_seqs <= self.max_seqs

    def write(self, step: HostStep) -> None:
        T, B, S, W = step.num_tokens, step.num_seqs, step.num_samples, step.tables.shape[1]
        self.host_ids.numpy()[:T] = step.host_ids
        self.table_index.numpy()[:T] = step.table_index
        self.positions.numpy()[:T] = step.positions
        self.slots.numpy()[:T] = step.slots
        self.cu.numpy()[: B + 1] = step.cu_seqlens
        self.seq_lens.numpy()[:B] = step.seq_lens
        self.logits_index.numpy()[:S] = step.logits_index
        self.out_index.numpy()[:S] = step.out_index
        self.tables.numpy()[:B, :W] = step.tables


def gather_input_ids(tokens: torch.Tensor, t: StepTensors) -> torch.Tensor:
    """Each token's id: the host's, or the one the device sampled into the table (the carry-over)."""
    return torch.where(t.host_ids >= 0, t.host_ids, tokens[t.table_index])
