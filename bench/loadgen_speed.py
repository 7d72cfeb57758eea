"""How fast the lab's load generator schedules, against a trivial loopback endpoint.

    python bench/loadgen_speed.py [--rates 250,500,1000,2000] [--num-requests 3000] [--out bench/results/...md]

The endpoint (`workbench.lab.echo_server`) runs in its own process and answers
every request at once with a fixed SSE stream, so what limits a run is the
generator (and the HTTP stack under it). For each offered rate it reports the
achieved send rate, the generator's lag (actual minus planned send time:
p50 / p99 / max), the completions and the generator's CPU per request. Peers
in the same run: the same generator with httpx as its HTTP client, the
scheduler alone with a target that does no I/O, and the endpoint's capacity
(64 requests in flight, no schedule: as fast as they go).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np

from workbench import lab

from machine import cpu_name  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).absolute().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_endpoint(tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workbench.lab.echo_server", "--port", str(port), "--tokens",
                             str(tokens)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the echo endpoint did not start")


class NullTarget:
    """Answers at once without I/O: what the scheduler alone can do."""

    name = "null"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def config(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {"kind": "null"}

    async def send(self, item, record, t0) -> None:
        now = time.perf_counter() - t0
        record.first_token, record.token_times, record.end = now, [now], now
        record.output_tokens, record.finish_reason = 1, "length"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_rate(target, label: str, rate: float, n: int, concurrency: int | None = None) -> dict:
    spec = lab.LoadSpec(rate=rate, num_requests=n, seed=0, warmup=20, concurrency=concurrency)
    c0 = cpu_s()
    result = lab.run_load(target, lab.RandomWorkload(8, 4), spec, progress=False)
    cpu = cpu_s() - c0
    recs = [r for r in result.records if not r.warmup]
    sent = np.array(sorted(r.sent for r in recs if r.sent is not None))
    lag = np.array([1e3 * r.lag for r in recs if r.lag is not None])
    s = result.summary
    return {"label": label, "rate": rate, "n": n, "achieved_send_rate": (len(sent) - 1) / (sent[-1] - sent[0]),
            "lag_p50_ms": float(np.percentile(lag, 50)), "lag_p99_ms": float(np.percentile(lag, 99)),
            "lag_max_ms": float(lag.max()), "completed": s["completed"], "errors": s["errors"],
            "completions_per_s": s["request_throughput"], "cpu_ms_per_req": 1e3 * cpu / (n + 20)}


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in ("httpx", "httpcore", "uvicorn", "fastapi", "numpy"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="250,500,1000,2000")
    ap.add_argument("--num-requests", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    proc, url = start_endpoint(args.tokens)
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    try:
        load_before = os.getloadavg()
        rows.append(run_rate(lab.OpenAITarget(url), "endpoint capacity (http11, 64 in flight, no schedule)",
                             math.inf, args.num_requests, concurrency=64))
        for rate in rates:
            rows.append(run_rate(lab.OpenAITarget(url, client="http11"), "http11 (default)", rate, args.num_requests))
        for rate in rates:
            rows.append(run_rate(lab.OpenAITarget(url, client="httpx"), "httpx (peer)", rate, args.num_requests))
        for rate in rates + [10 * rates[-1]]:
            rows.append(run_rate(NullTarget(), "scheduler alone (no I/O)", rate, 5 * args.num_requests))
        load_after = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(10)
    today = dt.date.today().isoformat()
    lines = [f"# Load generator speed against a trivial loopback endpoint ({today})", "",
             f"- device: {cpu_name()}, {os.cpu_count()} cores (CPU only); load average before / after: "
             f"{load_before[0]:.1f} / {load_after[0]:.1f} (this machine is shared with other jobs: the numbers "
             "are what the generator got, not what 2 idle cores give)",
             f"- command: `python bench/loadgen_speed.py --rates {args.rates} --num-requests {args.num_requests} "
             f"--tokens {args.tokens}`",
             f"- versions: {versions()}",
             f"- endpoint: `workbench.lab.echo_server` (plain ASGI on uvicorn) in its own process, {args.tokens} SSE "
             "chunks + finish + usage per request, no model; generator: `lab.LoadTest` + `lab.OpenAITarget`, "
             "Poisson arrivals, 20 warm-up requests, random 8-token prompts; lag = actual minus planned send time",
             "", "| client | offered req/s | achieved send req/s | lag p50 ms | lag p99 ms | lag max ms | completed "
             "| errors | completions/s | generator CPU ms/req |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['rate']:.0f} | {r['achieved_send_rate']:.0f} | {r['lag_p50_ms']:.2f} | "
                     f"{r['lag_p99_ms']:.2f} | {r['lag_max_ms']:.1f} | {r['completed']}/{r['n']} | {r['errors']} | "
                     f"{r['completions_per_s']:.0f} | {r['cpu_ms_per_req']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
