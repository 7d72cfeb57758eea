"""When each request is sent: Poisson or gamma arrivals, an optional linear ramp.

A schedule is a list of planned send times (seconds from the start of the
measured run), drawn once from a seeded generator so a run can be repeated
exactly. Inter-arrival gaps follow a gamma distribution of shape k
("burstiness", as in vLLM's `bench serve`): k = 1 is a Poisson process, k < 1
burstier, k > 1 more regular. The mean gap is 1/rate whatever k is, and the
coefficient of variation of the gaps is 1/sqrt(k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_REQUESTS = 1_000_000  # a duration-bounded schedule never plans more than this


@dataclass(frozen=True, slots=True)
class ArrivalSchedule:
    """How requests arrive. `rate` in requests/s (inf: all at once); `ramp_to` moves the rate linearly."""

    rate: float = math.inf
    burstiness: float = 1.0
    ramp_to: float | None = None

    def validate(self) -> "ArrivalSchedule":
        if not isinstance(self.rate, (int, float)) or isinstance(self.rate, bool) or not self.rate > 0:
            raise ValueError(f"rate must be a number > 0 requests/s (inf = all at once), got {self.rate!r}")
        b = self.burstiness
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 < b <= 1000:
            raise ValueError(f"burstiness must be a gamma shape in (0, 1000] (1 = Poisson), got {b!r}")
        if self.ramp_to is not None:
            r = self.ramp_to
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r < math.inf:
                raise ValueError(f"ramp_to must be a finite rate > 0 requests/s, got {r!r}")
            if math.isinf(self.rate):
                raise ValueError("a ramp needs a finite starting rate")
        return self


def arrival_times(schedule: ArrivalSchedule, *, num_requests: int | None = None, duration_s: float | None = None,
                  seed: int = 0) -> list[float]:
    """Planned send times in seconds from the start, for `num_requests` or until `duration_s` (or both: first hit).

    With a ramp, request i's gap is drawn at the rate interpolated linearly from
    `rate` to `ramp_to` over the run (by request index with a count, by time with a duration).
    """
    schedule.validate()
    if num_requests is None and duration_s is None:
        raise ValueError("give num_requests or duration_s (or both)")
    if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int)
                                     or not 0 <= num_requests <= MAX_REQUESTS):
        raise ValueError(f"num_requests must be an integer in [0, {MAX_REQUESTS}], got {num_requests!r}")
    if duration_s is not None and not (isinstance(duration_s, (int, float)) and 0 < duration_s < math.inf):
        raise ValueError(f"duration_s must be a finite number of seconds > 0, got {duration_s!r}")
    if math.isinf(schedule.rate):
        if num_requests is None:
            raise ValueError("rate=inf sends everything at once: give num_requests")
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    k = float(schedule.burstiness)
    limit = num_requests if num_requests is not None else MAX_REQUESTS
    times: list[float] = []
    t = 0.0  # the first request goes at once (as in vLLM's benchmark): the run's duration starts with it
    while len(times) < limit and (duration_s is None or t <= duration_s):
        times.append(t)
        rate = _rate_at(schedule, len(times), t, num_requests, duration_s)
        t += float(rng.gamma(k, 1.0 / (rate * k)))
    return times


def _rate_at(schedule: ArrivalSchedule, i: int, t: float, n: int | None, duration_s: float | None) -> float:
    if schedule.ramp_to is None:
        return schedule.rate
    if n is not None:
        frac = min(1.0, i / (n - 1)) if n > 1 else 0.0
    else:
        assert duration_s is not None
        frac = min(1.0, t / duration_s)
    return schedule.rate + (schedule.ramp_to - schedule.rate) * frac
