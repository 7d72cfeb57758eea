"""The tuning lab: load generation, latency SLOs, sweeps and a Pareto view.

    from workbench import lab
    result = await lab.arun_load(lab.EngineTarget(engine), lab.RandomWorkload(input_len=32, output_len=16),
                                 lab.LoadSpec(rate=4, num_requests=40), slo=lab.SLO(ttft_ms=500, tpot_ms=80))
    print(lab.format_summary(result.summary))

Named `lab` so it cannot be confused with `workbench.load` (loading a model).
Targets are the in-process engine or any OpenAI-compatible URL (this engine's
`workbench.serve_api`, vLLM, SGLang, `transformers serve`). Nothing here touches engine
internals: the in-process target uses the public `submit` / `cancel` /
`reconfigure` API and the request's own timings.
"""

from __future__ import annotations

from .arrivals import ArrivalSchedule, arrival_times
from .metrics import SLO, format_summary, summarize
from .pareto import Recommendation, pareto_front, recommend, transformers_config, vllm_flags
from .records import RequestRecord
from .report import LoadResult, compare, load_result, save_result
from .runner import LoadSpec, LoadTest, arun_load, run_load
from .sweep import Sweep, SweepPoint, config_sweep, measure_restart_s, rate_sweep
from .targets import EngineTarget, OpenAITarget, Target
from .workloads import (JsonlWorkload, RandomWorkload, SharedPrefixWorkload, ShareGPTWorkload, WorkItem, Workload,
                        load_sharegpt)

__all__ = [
    "ArrivalSchedule", "arrival_times", "SLO", "format_summary", "summarize", "Recommendation", "pareto_front",
    "recommend", "transformers_config", "vllm_flags", "RequestRecord", "LoadResult", "compare", "load_result",
    "save_result", "LoadSpec", "LoadTest", "arun_load", "run_load", "Sweep", "SweepPoint", "config_sweep",
    "measure_restart_s", "rate_sweep", "EngineTarget", "OpenAITarget", "Target", "JsonlWorkload", "RandomWorkload",
    "SharedPrefixWorkload", "ShareGPTWorkload", "WorkItem", "Workload", "load_sharegpt",
]
