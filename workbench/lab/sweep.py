"""Sweeps: the same load at several rates, or at several settings of one running engine.

A rate sweep gives the throughput-versus-p99-latency curve. A config sweep
crosses live knobs (max_batch x token_budget, optionally x num_blocks or
decode_steps: decode runs trade inter-token burstiness for host time) and
applies each point with the target's live reconfigure: `engine.reconfigure`
in-process, `POST /v1/engine/config` over HTTP. No restart and no reload; the
sweep records its own wall time beside an estimate of doing the same with a
restart per point (one measured engine construction per point). Every point
replays the same arrival times with prompts of its own (same distribution), so
the prefix cache filled by one point cannot flatter the next.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .metrics import SLO
from .pareto import Recommendation, metric, pareto_front, recommend
from .runner import LoadSpec, LoadTest
from .targets import LIVE_KEYS, Target
from .workloads import Workload

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)
SWEEPABLE = LIVE_KEYS  # the knobs a target reports and reconfigures live


@dataclass(slots=True)
class SweepPoint:
    config: dict[str, Any]
    rate: float
    summary: dict[str, Any]
    wall_s: float
    label: str = ""


@dataclass(slots=True)
class Sweep:
    kind: str  # "rate" | "config"
    points: list[SweepPoint] = field(default_factory=list)
    wall_s: float = 0.0
    restart_s: float | None = None        # one engine construction, measured (or given)
    restart_wall_s: float | None = None   # the same sweep with a restart per point, estimated
    reconfigure_s: list[float] = field(default_factory=list)  # time to apply each point live
    slo: SLO = field(default_factory=SLO)

    def values(self, key: str) -> list[float | None]:
        return [metric(p.summary, key) for p in self.points]

    def frontier(self, x: str = "itl_ms.p99", y: str = "goodput_rps") -> list[int]:
        """Indices of the Pareto-optimal points (lower x, higher y)."""
        return pareto_front(self.values(x), self.values(y))

    def recommend(self, latency: str = "itl_ms.p99") -> Recommendation | None:
        return recommend([p.config for p in self.points], [p.summary for p in self.points], self.slo, latency)

    def table(self, keys: Sequence[str] = ("request_throughput", "goodput_rps", "goodput_pct", "ttft_ms.p99",
                                           "itl_ms.p99", "e2el_ms.p99")) -> list[dict[str, Any]]:
        """One row per point: its config, rate and the chosen figures (for a DataFrame or printing)."""
        front = set(self.frontier())
        return [{**p.config, "rate": p.rate, **{k: metric(p.summary, k) for k in keys}, "pareto": i in front}
                for i, p in enumerate(self.points)]

    def figure(self, current: dict[str, Any] | None = None, x: str = "itl_ms.p99", y: str = "goodput_rps") -> Any:
        """The Bokeh Pareto plot of this sweep; `current` (a config dict) is ringed."""
        from .plots import pareto_columns, pareto_figure

        points, frontier = pareto_columns([p.config for p in self.points], [p.summary for p in self.points],
                                          current, x, y)
        return pareto_figure(points, frontier, slo_x=self.slo.itl_p99_ms if x == "itl_ms.p99" else None)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "wall_s": self.wall_s, "restart_s": self.restart_s,
                "restart_wall_s": self.restart_wall_s, "reconfigure_s": self.reconfigure_s,
                "slo": self.slo.as_dict(), "frontier": self.frontier(),
                "points": [{"config": p.config, "rate": p.rate, "wall_s": p.wall_s, "label": p.label,
                            "summary": p.summary} for p in self.points]}


def _fresh_prompts(spec: LoadSpec, i: int) -> LoadSpec:
    """Point i of a sweep: the same arrival times, its own prompts (of the same distribution).

    Replaying the very same prompts would let the prefix cache, filled by the
    points before, serve a later point's prefills: that point would look faster
    for a reason that is not its setting.
    """
    base = spec.seed if spec.prompt_seed is None else spec.prompt_seed
    return replace(spec, prompt_seed=base + 1_000_003 * (i + 1)).validate()


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    for key, values in grid.items():
        if key not in SWEEPABLE:
            raise ValueError(f"{key} cannot be swept live; sweepable fields are {list(SWEEPABLE)}")
        if not values:
            raise ValueError(f"grid[{key!r}] must list at least one value")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


async def rate_sweep(target: Target, workload: Workload, rates: Sequence[float], spec: LoadSpec,
                     slo: SLO | None = None, *, progress: bool = False) -> Sweep:
    """The same load at each rate (the throughput vs latency curve); the target's config is left as it is."""
    slo = slo or SLO()
    sweep = Sweep("rate", slo=slo)
    t0 = time.perf_counter()
    for i, rate in enumerate(rates):
        point_spec = _fresh_prompts(replace(spec, rate=rate), i)
        t = time.perf_counter()
        result = await LoadTest(target, workload, point_spec, slo, progress=progress, label=f"rate {rate:g}").run()
        sweep.points.append(SweepPoint(result.config, rate, result.summary, time.perf_counter() - t,
                                       f"rate {rate:g}"))
    sweep.wall_s = time.perf_counter() - t0
    return sweep


async def config_sweep(target: Target, workload: Workload, grid: Mapping[str, Sequence[Any]], spec: LoadSpec,
                       slo: SLO | None = None, *, restart_s: float | None = None, restore: bool = True,
                       progress: bool = False) -> Sweep:
    """Run `spec` at every grid point of one live target, each point applied with a live reconfigure.

    `restart_s` is what one restart would cost (see `measure_restart_s`); with
    it the sweep records the wall time a restart-per-point sweep would take.
    `restore` puts the target's settings back as they were at the end.
    """
    slo = slo or SLO()
    points = grid_points(grid)
    sweep = Sweep("config", slo=slo, restart_s=restart_s)
    await target.open()
    try:
        before = await target.config()
        t0 = time.perf_counter()
        for i, changes in enumerate(points):
            t = time.perf_counter()
            config = await target.reconfigure(**changes)
            sweep.reconfigure_s.append(time.perf_counter() - t)
            label = " ".join(f"{k}={v}" for k, v in changes.items())
            result = await LoadTest(target, workload, _fresh_prompts(spec, i), slo, progress=progress,
                                    label=label).run()
            await target.open()  # the load test closes what it opened
            sweep.points.append(SweepPoint(config or dict(changes), spec.rate, result.summary,
                                           time.perf_counter() - t, label))
            log.info("sweep point %s: goodput %.2f req/s, p99 ITL %s ms", label,
                     result.summary.get("goodput_rps") or 0.0, metric(result.summary, "itl_ms.p99"))
        sweep.wall_s = time.perf_counter() - t0
        if restore and before:
            await target.reconfigure(**{k: before[k] for k in grid if k in before})
    finally:
        await target.close()
    if restart_s is not None:
        sweep.restart_wall_s = sum(p.wall_s - r for p, r in zip(sweep.points, sweep.reconfigure_s)) + \
            len(points) * restart_s
    return sweep


def measure_restart_s(engine: "Engine") -> float:
    """Seconds to build a second engine like `engine` from its model source: what a restart per point costs.

    It loads the weights again (from the converted cache for the embedded
    model) and sizes a KV cache, but is never started. Blocking: from async
    code run it with `await asyncio.to_thread(measure_restart_s, engine)`.
    A server restart costs more (process start, imports, warm-up): this is a floor.
    """
    from ..engine import Engine

    source = engine.loaded.path
    t = time.perf_counter()
    other = Engine(str(source) if source is not None else None, config=engine.config, start=False)
    elapsed = time.perf_counter() - t
    del other
    return elapsed
