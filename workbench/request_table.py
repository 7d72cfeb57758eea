"""RequestTable: the runner's state for each request it runs, one row each.

A row holds what the device side needs across steps:

* the request's tokens by position. Prompt tokens are known on the host
  (`host_tokens`); generated tokens are written on the device by the step that
  samples them (`device_tokens`). A step's input ids are the host's where it
  has them and the device's elsewhere, so the token sampled by the step still
  in flight is read on the device by the step after it (the overlapped loop's
  carry-over is this one gather) and no sentinel travels through requests.
* its KV block list, appended from each plan's `new_block_ids`;
* its sampling parameters and seed, and whether it samples greedily.

Rows live from a request's first admission until it leaves the engine, across
preemptions: a preempted request keeps its generated tokens here and only its
block list starts afresh. Admission is FIFO with preempted requests at the
front, so the rows in use never exceed the largest `max_batch` the engine has
had; the table grows if a live reconfiguration raises it (graphs captured on
the old table then stop being used: see `generation`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .plan import StepPlan
from .request import SamplingParams

log = logging.getLogger(__name__)

NOT_ON_HOST = -1  # host_tokens entry of a position whose token only the device has


class RequestTable:
    def __init__(self, rows: int, max_model_len: int, max_blocks: int, device: torch.device,
                 default_seed: int = 0) -> None:
        self.width = max_model_len + 1  # positions per row: every token a request may hold, plus one
        self.max_blocks = max_blocks
        self.device = device
        self.default_seed = default_seed
        self.generation = 0  # bumped when the table is reallocated (the device tensor's address changes)
        self.row_of: dict[str, int] = {}
        self._allocate(max(1, rows))

    def _allocate(self, rows: int) -> None:
        """Arrays for `rows` rows plus one scratch row (padding rows of a step point there)."""
        self.capacity = rows
        self.host_tokens = np.full((rows + 1, self.width), NOT_ON_HOST, dtype=np.int64)
        self.device_tokens = torch.zeros((rows + 1) * self.width, dtype=torch.int64, device=self.device)
        self.blocks = np.zeros((rows + 1, self.max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(rows + 1, dtype=np.int64)
        self.prompt_len = np.zeros(rows + 1, dtype=np.int64)
        self.greedy = np.ones(rows + 1, dtype=bool)
        self.params: list[SamplingParams | None] = [None] * (rows + 1)
        self.seeds = [0] * (rows + 1)
        self._free = list(range(rows - 1, -1, -1))

    @property
    def scratch(self) -> int:
        """A flat index into `device_tokens` that no request reads: padding rows write here."""
        return self.capacity * self.width

    # ------------------------------------------------------------ from plans
    def apply(self, plan: StepPlan) -> np.ndarray:
        """Take in a plan's bookkeeping; return the row of each of its requests."""
        for request_id in plan.finished_ids:
            self._release(request_id)
        for request_id in plan.preempted_ids:
            row = self.row_of.get(request_id)
            if row is not None:
                self.num_blocks[row] = 0  # its KV is gone; re-admission brings the new block list
        for admission in plan.admitted:
            row = self.row_of.get(admission.request_id)
            if row is None:
                row = self._take_row(admission.request_id)
                prompt = admission.prompt_token_ids
                self.host_tokens[row, : len(prompt)] = prompt
                self.prompt_len[row] = len(prompt)
                self.params[row], self.greedy[row] = admission.params, admission.params.greedy
                self.seeds[row] = admission.seed if admission.seed is not None else self.default_seed
            self.num_blocks[row] = 0
        rows = np.fromiter(map(self.row_of.__getitem__, plan.request_ids), dtype=np.int64, count=len(plan))
        for row, new in zip(rows.tolist(), plan.new_block_ids):
            if new:
                n = self.num_blocks[row]
                self.blocks[row, n : n + len(new)] = new
                self.num_blocks[row] = n + len(new)
        return rows

    def has_rows_for(self, plan: StepPlan) -> bool:
        """Can the plan's new requests get rows without the table growing?"""
        new = sum(a.request_id not in self.row_of for a in plan.admitted)
        return new <= len(self._free) + sum(rid in self.row_of for rid in plan.finished_ids)

    def force_tokens(self, request_id: str, start: int, token_ids: list[int]) -> None:
        """Put host-given tokens at positions start.. of a request (teacher forcing: they take
        precedence over what the device sampled there)."""
        row = self.row_of[request_id]
        self.host_tokens[row, start : start + len(token_ids)] = token_ids

    def _take_row(self, request_id: str) -> int:
        if not self._free:
            self._grow(2 * self.capacity)
        row = self._free.pop()
        self.row_of[request_id] = row
        return row

    def _release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is None:
            return  # never admitted (cancelled while queued)
        self.host_tokens[row, :] = NOT_ON_HOST
        self.num_blocks[row] = self.prompt_len[row] = 0
        self.params[row] = None
        self._free.append(row)

    def _grow(self, rows: int) -> None:
        """More rows than ever before (max_batch was raised live): reallocate, keeping every row.
        The caller makes sure no step in flight still writes the old device tensor."""
        log.info("request table grows from %d to %d rows (max_batch was raised); CUDA graphs captured "
                 "on the old table are no longer used", self.capacity, rows)
        old = (self.capacity, self.host_tokens, self.device_tokens, self.blocks, self.num_blocks,
               self.prompt_len, self.greedy, self.params, self.seeds)
        n, host, dev, blocks, num_blocks, prompt_len, greedy, params, seeds = old
        self._allocate(rows)
        self.host_tokens[:n] = host[:n]
        self.device_tokens[: n * self.width].copy_(dev[: n * self.width])
        self.blocks[:n], self.num_blocks[:n], self.prompt_len[:n] = blocks[:n], num_blocks[:n], prompt_len[:n]
        self.greedy[:n], self.params[:n], self.seeds[:n] = greedy[:n], params[:n], seeds[:n]
        self._free = [r for r in range(rows - 1, -1, -1) if r >= n]
        self.generation += 1
