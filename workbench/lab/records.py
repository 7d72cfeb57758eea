"""One request's life as the load generator saw it.

Times are seconds from the start of the run (the moment the first measured
request was planned), on the `time.perf_counter` clock. A record is written
by one target while its request runs and read by the metrics once it ended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ENDED_OK = ("stop", "length")  # finish reasons of a completed request; anything else is an error or a cancel


@dataclass(slots=True)
class RequestRecord:
    """Planned and actual send time, first token, every token, end; tokens in and out; how it ended."""

    index: int
    planned: float                      # when the schedule meant to send it
    sent: float | None = None           # when it was actually sent (after any concurrency wait)
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per streamed chunk (a chunk may hold several tokens)
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None    # stop | length | cancelled | error
    error: str | None = None
    request_id: str = ""
    warmup: bool = False
    group: int | None = None            # shared-prefix group, if any
    preemptions: int | None = None      # in-process targets only
    cached_tokens: int | None = None    # in-process targets only (prefix-cache hits)

    @property
    def ok(self) -> bool:
        """Completed normally: it counts in the latency statistics."""
        return self.finish_reason in ENDED_OK and self.error is None and self.first_token is not None

    @property
    def lag(self) -> float | None:
        """How late the generator sent it (actual minus planned)."""
        return None if self.sent is None else self.sent - self.planned

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None or self.sent is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.end is None or self.sent is None else self.end - self.sent

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
