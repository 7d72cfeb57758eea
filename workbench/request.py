"""Requests and what comes back from them.

A `Request` is the engine's record of one generation: its tokens, how far the
KV cache has computed them, its blocks and its timestamps. `StreamChunk` is
one streamed token; `RequestOutput` is the finished result.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any


PENDING = -1  # a token sampled by the step still on the GPU; filled in when that step is collected


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)

    def validate(self) -> "SamplingParams":
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {m!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(slots=True)
class Timings:
    """Wall-clock stamps (time.perf_counter seconds) of a request's life."""

    queued: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    tokens: list[float] = field(default_factory=list)
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.queued

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.queued


@dataclass(slots=True)
class StreamChunk:
    """One step's news for a request: usually one token and its text."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    time: float = 0.0


@dataclass(slots=True)
class RequestOutput:
    """The whole result of a finished (or cancelled, or failed) request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    timings: Timings
    error: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        t = self.timings
        return {
            "request_id": self.request_id, "text": self.text, "token_ids": self.token_ids,
            "finish_reason": self.finish_reason, "error": self.error, "ttft_s": t.ttft,
            "latency_s": t.latency, "num_tokens": len(self.token_ids),
        }


@dataclass(slots=True, eq=False)
class Request:
    """The scheduler's view of one generation (pure Python: no torch here).

    `num_computed` counts tokens whose K/V are in the cache. Each step computes
    `tokens[num_computed : num_computed + n]`; when that reaches the end of
    `tokens`, the last position's logits are sampled and a token is appended.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    timings: Timings = field(default_factory=Timings)
    text: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def remaining(self) -> int:
        """Tokens still to push through the model before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.remaining > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def max_total_tokens(self) -> int:
        """Tokens this request may hold in the KV cache at the very most."""
        return len(self.prompt_token_ids) + self.params.max_new_tokens
