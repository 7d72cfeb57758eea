"""Results on disk: one JSON file per load, and `compare A.json B.json`.

A result keeps everything needed to recompute its summary: the spec, the
workload's parameters, the target, the config in force, the SLOs and every
request's record (warm-up ones flagged). `compare` recomputes nothing; it
lines up the two summaries and shows the relative change of each figure.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .records import RequestRecord

FORMAT = "cb-workbench.lab/1"


def environment() -> dict[str, Any]:
    """Where a result was measured: host, Python, the packages that matter."""
    versions = {}
    for pkg in ("cb-workbench", "torch", "httpx", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "versions": versions}


@dataclass(slots=True)
class LoadResult:
    label: str
    started_at: float
    target: dict[str, Any]
    config: dict[str, Any]
    spec: dict[str, Any]
    workload: dict[str, Any]
    slo: dict[str, Any]
    summary: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    t0: float | None = None  # the run's origin on time.perf_counter: record time + t0 = telemetry time

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "label": self.label,
                "started_at": dt.datetime.fromtimestamp(self.started_at, dt.timezone.utc).isoformat(),
                "target": self.target, "config": self.config, "spec": self.spec,
                "workload": _jsonable(self.workload), "slo": self.slo, "summary": self.summary,
                "environment": self.environment, "t0": self.t0, "records": [r.as_dict() for r in self.records]}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def save_result(result: LoadResult, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result.as_dict(), indent=1, default=str))
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    """A saved result as a dict (records as `RequestRecord`s under 'records')."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cb-workbench lab result (format {FORMAT!r})")
    data["records"] = [RequestRecord.from_dict(r) for r in data.get("records", [])]
    return data


COMPARED = [("request_throughput", "req/s", +1), ("output_throughput", "tok/s", +1), ("goodput_rps", "good req/s", +1),
            ("goodput_pct", "% good", +1), ("ttft_ms.p50", "ms", -1), ("ttft_ms.p99", "ms", -1),
            ("tpot_ms.p50", "ms", -1), ("tpot_ms.p99", "ms", -1), ("itl_ms.p50", "ms", -1),
            ("itl_ms.p99", "ms", -1), ("e2el_ms.p50", "ms", -1), ("e2el_ms.p99", "ms", -1),
            ("errors", "", -1), ("cancelled", "", -1), ("preemptions", "", -1)]


def _get(summary: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        summary = summary.get(part) if isinstance(summary, dict) else None
    return summary


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: A, B, B/A - 1, and whether B is better (higher throughput, lower latency)."""
    rows = []
    for key, unit, sign in COMPARED:
        va, vb = _get(a["summary"], key), _get(b["summary"], key)
        change = (vb / va - 1.0) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
        better = None if change is None or change == 0 else (change * sign > 0)
        rows.append({"metric": key, "unit": unit, "a": va, "b": vb, "change": change, "b_better": better})
    return rows


def compare(a: str | Path | dict[str, Any], b: str | Path | dict[str, Any]) -> str:
    """A side-by-side table of two results (paths or loaded dicts)."""
    da = load_result(a) if not isinstance(a, dict) else a
    db = load_result(b) if not isinstance(b, dict) else b
    name_a, name_b = da.get("label") or "A", db.get("label") or "B"
    lines = [f"{'metric':<22}{name_a[:14]:>14}{name_b[:14]:>14}{'change':>10}"]
    for row in compare_rows(da, db):
        fa = "-" if row["a"] is None else f"{row['a']:.2f}"
        fb = "-" if row["b"] is None else f"{row['b']:.2f}"
        ch = "" if row["change"] is None else f"{100 * row['change']:+.1f}%"
        mark = {True: " better", False: " worse", None: ""}[row["b_better"]]
        lines.append(f"{row['metric']:<22}{fa:>14}{fb:>14}{ch:>10}{mark}")
    for side, d in ((name_a, da), (name_b, db)):
        lines.append(f"{side}: target {d.get('target')}, config {d.get('config')}, spec rate={d['spec'].get('rate')} "
                     f"n={d['summary'].get('requests')}")
    return "\n".join(lines)
