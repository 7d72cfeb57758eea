"""Summary statistics of a load, and goodput under latency SLOs.

The definitions follow vLLM's `benchmarks/serve.py` so numbers compare with
`vllm bench serve`:

- TTFT: first token minus send time. E2E: end minus send time.
- TPOT (time per output token, excluding the first): (E2E - TTFT) / (output tokens - 1),
  for requests with more than one output token.
- ITL: every gap between consecutive streamed chunks, pooled over all requests.
- Goodput (DistServe's definition): completed requests per second that meet every SLO
  given for TTFT, TPOT and E2E; a request with a single output token has TPOT 0 there.
  With no SLO every completed request counts. `goodput_pct` divides by every measured
  request (errors and cancellations included: they never meet an SLO).

Percentiles are numpy's default (linear interpolation). Errors and cancelled
requests are counted, never dropped, and kept out of the latency statistics.
A p99 ITL objective (`itl_p99_ms`) is a property of the whole run, not of a
request, so it is reported as met or missed beside goodput.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .records import ENDED_OK, RequestRecord

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
LABELS = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
          "itl": "Inter-token latency", "e2el": "End-to-end latency"}


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency objectives in milliseconds; None leaves one out."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_p99_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms", "itl_p99_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ValueError(f"{name} must be a finite number of milliseconds > 0 or None, got {v!r}")

    @property
    def per_request(self) -> bool:
        """Whether any objective applies to single requests (and so to goodput)."""
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(values: Sequence[float], percentiles: Iterable[int]) -> dict[str, float | None]:
    """mean / median / std / pNN in milliseconds (None for every field when there are no values)."""
    keys = ["mean", "median", "std"] + [f"p{p:g}" for p in percentiles]
    if not len(values):
        return dict.fromkeys(keys)
    a = np.asarray(values, dtype=float) * 1e3
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    out.update({f"p{p:g}": float(np.percentile(a, p)) for p in percentiles})
    return out


def tpot(record: RequestRecord) -> float:
    """(E2E - TTFT) / (output tokens - 1); 0 for a single-token output (as vLLM's goodput counts it)."""
    if record.output_tokens <= 1 or record.e2e is None or record.ttft is None:
        return 0.0
    return (record.e2e - record.ttft) / (record.output_tokens - 1)


def is_good(record: RequestRecord, slo: SLO) -> bool:
    """Completed and within every per-request objective (DistServe's goodput)."""
    if not record.ok:
        return False
    checks = ((slo.ttft_ms, record.ttft), (slo.tpot_ms, tpot(record)), (slo.e2e_ms, record.e2e))
    return all(value is not None and value <= limit / 1e3 for limit, value in checks if limit is not None)


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None, *, duration_s: float | None = None,
              percentiles: Sequence[int] = PERCENTILES) -> dict[str, Any]:
    """Throughput, latency statistics, goodput and error counts over the measured (non-warm-up) records."""
    slo = slo or SLO()
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    cancelled = [r for r in measured if r.finish_reason == "cancelled"]
    errors = [r for r in measured if not r.ok and r.finish_reason != "cancelled"]
    if duration_s is None:
        ends = [r.end for r in measured if r.end is not None]
        duration_s = max(ends) if ends else None
    dur = duration_s if duration_s and duration_s > 0 else None
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(is_good(r, slo) for r in ok)
    lat = {
        "ttft": [r.ttft for r in ok],
        "tpot": [tpot(r) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itls],
        "e2el": [r.e2e for r in ok],
    }
    summary: dict[str, Any] = {
        "requests": len(measured), "completed": len(ok), "errors": len(errors), "cancelled": len(cancelled),
        "error_messages": sorted({r.error for r in errors if r.error})[:5],
        "duration_s": duration_s, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / dur if dur else None,
        "output_throughput": out_tokens / dur if dur else None,
        "total_token_throughput": (in_tokens + out_tokens) / dur if dur else None,
        "good": good, "goodput_rps": good / dur if dur else None,
        "goodput_pct": 100.0 * good / len(measured) if measured else None,
        "slo": slo.as_dict(), "slo_per_request": slo.per_request,
    }
    for name in METRICS:
        summary[name + "_ms"] = _stats(lat[name], percentiles)
    p99_itl = summary["itl_ms"].get("p99")
    summary["itl_p99_met"] = None if slo.itl_p99_ms is None or p99_itl is None else p99_itl <= slo.itl_p99_ms
    lags = [r.lag for r in measured if r.lag is not None]
    summary["lag_ms"] = _stats(lags, percentiles) | {"max": 1e3 * max(lags) if lags else None}
    pre = [r.preemptions for r in ok if r.preemptions is not None]
    hits = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    summary["preemptions"] = sum(pre) if pre else None
    summary["requests_preempted"] = sum(p > 0 for p in pre) if pre else None
    summary["cached_tokens"] = sum(hits) if hits else None
    return summary


def _f(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def format_summary(summary: dict[str, Any], title: str = "Load result") -> str:
    """A vLLM-style text table of a summary."""
    w = 50
    lines = [f" {title} ".center(w, "=")]

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<38}{value:>12}")

    row("Requests (measured):", str(summary["requests"]))
    row("Completed:", str(summary["completed"]))
    row("Errors:", str(summary["errors"]))
    row("Cancelled:", str(summary["cancelled"]))
    for msg in summary.get("error_messages") or []:
        lines.append(f"  error: {msg[:w - 9]}")
    row("Duration (s):", _f(summary["duration_s"]))
    row("Input / output tokens:", f"{summary['input_tokens']} / {summary['output_tokens']}")
    row("Request throughput (req/s):", _f(summary["request_throughput"]))
    row("Output token throughput (tok/s):", _f(summary["output_throughput"]))
    slo = summary["slo"]
    slo_txt = ", ".join(f"{k[:-3]}<={v:g}ms" for k, v in slo.items() if v is not None and k != "itl_p99_ms")
    row("Goodput (req/s):", _f(summary["goodput_rps"]))
    row("Goodput (% of requests):", _f(summary["goodput_pct"], ".1f"))
    lines.append(f"  SLOs: {slo_txt or 'none (every completed request counts)'}")
    if slo.get("itl_p99_ms") is not None:
        row(f"p99 ITL <= {slo['itl_p99_ms']:g} ms:", {True: "met", False: "MISSED", None: "-"}[summary["itl_p99_met"]])
    for name in METRICS:
        s = summary[name + "_ms"]
        lines.append(f" {LABELS[name]} (ms) ".center(w, "-"))
        for key in ("mean", "p50", "p90", "p99"):
            if key in s:
                row(f"{key.capitalize() if key == 'mean' else key.upper()} {name.upper()} (ms):", _f(s[key]))
    lines.append(" Generator ".center(w, "-"))
    row("Send lag p99 / max (ms):", f"{_f(summary['lag_ms'].get('p99'))} / {_f(summary['lag_ms'].get('max'))}")
    if summary.get("preemptions") is not None:
        row("Preemptions (requests preempted):", f"{summary['preemptions']} ({summary['requests_preempted']})")
        row("Prefix-cache hit tokens:", str(summary["cached_tokens"]))
    lines.append("=" * w)
    return "\n".join(lines)


__all__ = ["SLO", "summarize", "format_summary", "tpot", "is_good", "PERCENTILES", "METRICS", "ENDED_OK"]
