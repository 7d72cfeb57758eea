"""The Pareto frontier of a sweep, the recommended setting, and what it means for other engines.

A setting is on the frontier when no other setting has both a lower p99
latency and a higher goodput. The recommendation is the setting with the
best goodput under the SLOs (ties go to the lower p99 latency); it is
printed as this engine's config, as vLLM flags and as transformers'
`ContinuousBatchingConfig` fields, with a note on each mapping that is only
approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .metrics import SLO


def metric(summary: dict[str, Any], key: str) -> float | None:
    """A summary figure by dotted key, e.g. 'itl_ms.p99' or 'goodput_rps'."""
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def pareto_front(xs: Sequence[float | None], ys: Sequence[float | None]) -> list[int]:
    """Indices of the points no other point beats on both lower x and higher y, by increasing x.

    Points with a missing value are never on the frontier; of equal points the first is kept.
    """
    order = sorted((i for i in range(len(xs)) if xs[i] is not None and ys[i] is not None),
                   key=lambda i: (xs[i], -ys[i], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if ys[i] > best:  # type: ignore[operator]
            front.append(i)
            best = ys[i]  # type: ignore[assignment]
    return front


VLLM_NOTES = {
    "max_num_seqs": "same meaning: the most sequences in one step",
    "max_num_batched_tokens": "same meaning with chunked prefill (vLLM's default): tokens per step, prefill chunks "
                              "included",
    "block_size": "same meaning (tokens per KV block); vLLM's attention backends accept only some sizes "
                  "(16 is the default and always works)",
    "num_gpu_blocks_override": "approximate: keeps the same token capacity (blocks x block_size), but a block of a "
                               "bigger model costs more memory; without it vLLM sizes the cache from "
                               "--gpu-memory-utilization",
    "enable_prefix_caching": "same meaning (hash-based reuse of full prompt blocks)",
}
TRANSFORMERS_NOTES = {
    "max_requests_per_batch": "same meaning as max_batch",
    "max_batch_tokens": "approximate: transformers' token budget per step; its scheduler (scheduler_type) differs "
                        "from this engine's decode-first chunked prefill",
    "page_size": "same meaning as block_size (transformers' default is 256 tokens)",
    "num_blocks": "approximate: blocks of page_size tokens per layer; same token capacity when page_size matches",
    "allow_block_sharing": "same meaning as prefix_caching",
}


def vllm_args(config: dict[str, Any]) -> dict[str, Any]:
    """vLLM engine arguments equivalent to this engine's live config (keys as in `vllm serve --help`)."""
    args: dict[str, Any] = {}
    if "max_batch" in config:
        args["max_num_seqs"] = config["max_batch"]
    if "token_budget" in config:
        args["max_num_batched_tokens"] = config["token_budget"]
    if "block_size" in config:
        args["block_size"] = config["block_size"]
    if config.get("num_blocks") is not None:
        args["num_gpu_blocks_override"] = config["num_blocks"]
    if "prefix_caching" in config:
        args["enable_prefix_caching"] = bool(config["prefix_caching"])
    return args


def vllm_flags(config: dict[str, Any]) -> str:
    """The same as `vllm serve` flags."""
    parts = []
    for key, value in vllm_args(config).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def transformers_config(config: dict[str, Any]) -> dict[str, Any]:
    """`transformers.ContinuousBatchingConfig` keyword arguments for the same setting."""
    out: dict[str, Any] = {}
    if "block_size" in config:
        out["page_size"] = config["block_size"]
    if config.get("num_blocks") is not None:
        out["num_blocks"] = config["num_blocks"]
    if "token_budget" in config:
        out["max_batch_tokens"] = config["token_budget"]
    if "max_batch" in config:
        out["max_requests_per_batch"] = config["max_batch"]
    if "prefix_caching" in config:
        out["allow_block_sharing"] = bool(config["prefix_caching"])
    out["scheduler_type"] = "fifo"
    return out


@dataclass(slots=True)
class Recommendation:
    index: int
    config: dict[str, Any]
    summary: dict[str, Any]
    reason: str
    notes: list[str] = field(default_factory=list)

    @property
    def vllm(self) -> str:
        return vllm_flags(self.config)

    @property
    def transformers(self) -> dict[str, Any]:
        return transformers_config(self.config)

    def text(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        args = ", ".join(f"{k}={v!r}" for k, v in self.transformers.items())
        lines = [f"Recommended: {cfg}", f"  why: {self.reason}", f"  vLLM:         vllm serve MODEL {self.vllm}",
                 f"  transformers: ContinuousBatchingConfig({args})", "  how close each mapping is:"]
        for key in vllm_args(self.config):
            lines.append(f"    vLLM {key}: {VLLM_NOTES[key]}")
        for key in self.transformers:
            if key in TRANSFORMERS_NOTES:
                lines.append(f"    transformers {key}: {TRANSFORMERS_NOTES[key]}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def recommend(configs: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]], slo: SLO | None = None,
              latency: str = "itl_ms.p99") -> Recommendation | None:
    """The setting with the best goodput among those that meet the p99 ITL objective (if one is given).

    Goodput already holds the per-request TTFT / TPOT / E2E objectives. Ties
    (within 2%, a noisy machine's margin) go to the lower p99 latency.
    None when no point has any goodput or every point misses the ITL objective.
    """
    slo = slo or SLO()
    ok = []
    for i, s in enumerate(summaries):
        g = metric(s, "goodput_rps")
        lat = metric(s, latency)
        if not g or lat is None:
            continue
        if slo.itl_p99_ms is not None and (metric(s, "itl_ms.p99") or math.inf) > slo.itl_p99_ms:
            continue
        ok.append(i)
    if not ok:
        return None
    best_g = max(metric(summaries[i], "goodput_rps") or 0.0 for i in ok)
    near = [i for i in ok if (metric(summaries[i], "goodput_rps") or 0.0) >= 0.98 * best_g]
    pick = min(near, key=lambda i: metric(summaries[i], latency) or math.inf)
    s = summaries[pick]
    reason = (f"goodput {metric(s, 'goodput_rps'):.2f} req/s ({s.get('goodput_pct') or 0:.0f}% of requests within "
              f"the SLOs), {latency} = {metric(s, latency):.1f} ms; {len(ok)} of {len(summaries)} settings qualified")
    notes = ["measured on this engine, model and device: the best point moves with model size, GPU and kernels, "
             "so confirm it by sweeping the real server (an OpenAI URL target)"]
    if configs[pick].get("policy", "continuous") != "continuous":
        notes.append(f"policy={configs[pick]['policy']} has no vLLM or transformers equivalent")
    return Recommendation(pick, dict(configs[pick]), s, reason, notes)
