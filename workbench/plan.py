"""StepPlan: one step as the scheduler decided it, in plain data.

This is the contract between the scheduler (pure Python, owns `Request`s and KV
blocks) and the runner (owns the device). It holds no live `Request`: only
request ids, the span of tokens each one runs, the KV blocks it got since the
runner last heard of it, and the requests the runner meets for the first time
or will not meet again. The runner keeps its own per-request state from these
(request_table.py), so a plan stays small however long the requests are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .request import SamplingParams

Kind = Literal["prefill", "decode"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A request (re)entering the running set: what the runner needs to hold it.

    After a preemption the same request is admitted again; the runner then keeps
    the state it had (its generated tokens live on the device) and starts its
    block list afresh from this plan's `new_block_ids`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None  # None: the runner's default seed


@dataclass(slots=True)
class StepPlan:
    """Row k runs tokens [starts[k], starts[k] + num_tokens[k]) of request request_ids[k].

    A decode run (`steps` > 1, decode rows only) is that step and the `steps - 1` after it, each
    one position further, launched together: step j reads the token step j - 1 sampled, on the
    device. Its blocks are all in `new_block_ids` already; its tokens come back step by step."""

    request_ids: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)  # the chunk ends at the request's last token
    kinds: list[Kind] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # per row: blocks appended since the last plan
    admitted: list[Admission] = field(default_factory=list)  # rows whose block list starts afresh
    preempted_ids: list[str] = field(default_factory=list)  # lost their KV this step (recomputed later)
    finished_ids: list[str] = field(default_factory=list)  # left the engine since the last plan
    padded_slots: int = 0  # empty batch slots a static batch holds (telemetry only)
    steps: int = 1  # a decode run: the same rows decode this many steps in a row, one token each per step

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def total_tokens(self) -> int:
        """Tokens of one step (of a run: of each of its steps)."""
        return sum(self.num_tokens)

    @property
    def sampling_ids(self) -> list[str]:
        """The ids of the rows that sample, in row order: the order of the step's tokens."""
        return [rid for rid, s in zip(self.request_ids, self.samples) if s]

    @property
    def decode_only(self) -> bool:
        return all(k == "decode" for k in self.kinds)
