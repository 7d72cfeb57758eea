"""Prometheus metrics of one API server, with vLLM's names and meanings under `workbench:`.

A vLLM Grafana board reads these after swapping the `vllm:` prefix for `workbench:`.
Each server owns its `CollectorRegistry` (never the process-global one), so two
servers, or a test's server and the next one, never share counts.

Where the numbers come from (one source each, the same for `/metrics` and for
`ServerMetrics.snapshot()` in the notebook):

- Request metrics (the latency histograms, token counters, prefix-cache counters,
  `request_success_total`) come from each finished request's `RequestOutput` and its
  `timings` (queued, first_scheduled, first_token, tokens, finished), recorded once per
  request of this server on the server's event loop when the request ends.
- Engine metrics (running / waiting / KV usage gauges, `num_preemptions_total`) read
  `engine.stats()` when scraped; the step-duration histogram folds the telemetry's step
  records (a cursor, advanced at each scrape) and the GPU-busy gauge is `Telemetry.gpu_busy`,
  the one definition the dashboard uses too.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..request import RequestOutput

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

PREFIX = "workbench:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it read ours alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The collectors of one server and the two ways they are fed (finished requests, telemetry)."""

    def __init__(self, engine: "Engine", model_name: str) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r, labels, m = self.registry, ["model_name"], model_name

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(m)

        def counter(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(m)

        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS)
        self.step_time = histogram("step_duration_seconds",
                                   "Histogram of engine step wall time (schedule, forward, output) in seconds.",
                                   STEP_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.steps_dropped = counter("telemetry_steps_dropped",
                                     "Engine steps that left the telemetry ring before a scrape folded them.")
        self.success = Counter(PREFIX + "request_success", "Count of finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        self._model = m
        self._step_cursor = engine.stats()["step"] - 1  # steps from this server's start on
        self._fold_lock = threading.Lock()  # a scrape (event loop) and snapshot() (a notebook) may fold at once
        self.registry.register(_EngineCollector(engine, m))

    # ------------------------------------------------------------- feeding
    def record(self, output: RequestOutput) -> None:
        """Observe one ended request (call once per request, on the server's event loop)."""
        t = output.timings
        prompt_len = len(output.prompt_token_ids)
        if t.first_scheduled is not None:
            self.queue_time.observe(max(0.0, t.first_scheduled - t.queued))
        if t.first_token is not None:
            self.ttft.observe(t.first_token - t.queued)
        for earlier, later in zip(t.tokens, t.tokens[1:]):
            self.itl.observe(later - earlier)
        if t.finished is not None:
            self.e2e.observe(t.finished - t.queued)
        self.prompt_tokens.inc(prompt_len)
        self.generation_tokens.inc(len(output.token_ids))
        self.prefix_queries.inc(prompt_len)
        self.prefix_hits.inc(min(output.num_cached_tokens, prompt_len))
        self.success.labels(self._model, output.finish_reason).inc()

    def fold_steps(self) -> None:
        """Observe the step records the telemetry added since the last fold."""
        with self._fold_lock:
            steps = self.engine.telemetry.steps(since=self._step_cursor)
            if not steps:
                return
            missed = steps[0].step - self._step_cursor - 1
            if missed > 0:
                self.steps_dropped.inc(missed)
            for record in steps:
                self.step_time.observe(record.t_end - record.t_start)
            self._step_cursor = steps[-1].step

    # ------------------------------------------------------------- reading
    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (what GET /metrics answers)."""
        self.fold_steps()
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, float]:
        """Every sample as {name or name{labels}: value}: the numbers /metrics shows, in-process.

        The `model_name` label is left out of the keys (one model per server)."""
        self.fold_steps()
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                key = sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                                     if labels else "")
                out[key] = sample.value
        return out


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's public stats and telemetry at scrape time."""

    def __init__(self, engine: "Engine", model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Any]:
        stats = self.engine.stats()
        labels, values = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        yield gauge("num_requests_running", "Number of requests in model execution batches.", stats["running"])
        yield gauge("num_requests_waiting", "Number of requests waiting to be processed.", stats["waiting"])
        usage = 1.0 - stats["free_blocks"] / stats["num_blocks"] if stats["num_blocks"] else 0.0
        yield gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield gauge("engine_running", "1 while the engine loop runs, 0 once it stopped or failed.",
                    float(self.engine.is_running))
        busy = self.engine.telemetry.gpu_busy()
        if busy is not None:  # no GPU spans on a CPU engine: the series is absent rather than a made-up 0
            yield gauge("gpu_busy_perc", "Fraction of wall time the GPU computed over the last 200 steps.", busy)
        c = CounterMetricFamily(PREFIX + "num_preemptions", "Cumulative number of preemption from the engine.",
                                labels=labels)
        c.add_metric(values, stats["preemptions"])
        yield c
