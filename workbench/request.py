"""Requests and what comes back from them.

A `Request` is the engine's record of one generation: its tokens, how far the
KV cache has computed them, its blocks and its timestamps. `StreamChunk` is
one streamed token; `RequestOutput` is the finished result.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


MAX_SEED = 2**63 - 1  # seeds are hashed as 64-bit integers (sampling.py)
MAX_NEW_TOKENS = 10_000_000
MAX_TEMPERATURE = 1e4  # past this every allowed token is equally likely anyway
MAX_TOP_K = 2**31 - 1


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
        """Normalise `stop` to a tuple when it is a string or a list; `validate` judges the rest
        (construction never raises, so every bad value gets validate's ValueError)."""
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            self.stop = tuple(self.stop)

    def validate(self) -> "SamplingParams":
        """Check every field; a bad one raises ValueError naming it and its usable range."""
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {m!r}")
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number in [0, {MAX_TEMPERATURE}] (0 = greedy), got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off), got {k!r}")
        p = self.top_p
        if not _is_real(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, {MAX_SEED}] (0 .. 2**63-1), got {s!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not all(_is_unicode(x) for x in self.stop):
            raise ValueError("stop must be valid Unicode text (a lone surrogate cannot be encoded)")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_unicode(text: str) -> bool:
    """False for text the tokenizer cannot take: a lone surrogate has no UTF-8 encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


@dataclass(slots=True, eq=False)
class Request:
    """The scheduler's view of one generation (pure Python: no torch here).

    `num_computed` counts tokens whose K/V are in the cache. Each step computes
    tokens `[num_computed, num_computed + n)`; when that reaches the last token,
    the step samples the next one. A sampled token exists on the device first
    (the runner's token table); `num_in_flight` counts those the host has not
    received yet, so the scheduler can plan the next step before they arrive.
    `receive` is the one writer of `output_token_ids`.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
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
    seed: int | None = None  # the sampling seed: params.seed, or one the engine derived (sampling.derived_seed)
    num_in_flight: int = 0  # sampled by a step whose tokens the host has not received yet

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, counting those still on their way from the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_in_flight

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_in_flight

    @property
    def all_token_ids(self) -> list[int]:
        """The tokens the host knows: prompt and received output (not those in flight)."""
        return self.prompt_token_ids + self.output_token_ids

    def receive(self, token: int) -> None:
        """A sampled token reaches the host (the output processor calls this, once per token)."""
        self.output_token_ids.append(token)
        self.num_in_flight -= 1

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
