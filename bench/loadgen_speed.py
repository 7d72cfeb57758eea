"""How fast the lab's load generator schedules, against a trivial loopback endpoint.

    python bench/loadgen_speed.py [--rates 250,500,1000,2000] [--num-requests 3000] [--out bench/results/...md]

The endpoint (`workbench.lab.echo_server`) runs in its own process and answers
every request at once with a fixed SSE stream, so what limits a run is the
generator (and the HTTP stack under it). For each offered rate it reports the
achieved send rate, the generator's lag (actual minus planned send time:
p50 / p99 / max) and the completions. The peer in the same run is the
endpoint's own capacity: a closed loop of 64 concurrent streaming clients with
no schedule at all (as fast as they can), which says whether a shortfall is the
generator's or the endpoint's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np

from workbench import lab

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


def run_rate(url: str, rate: float, n: int) -> dict:
    spec = lab.LoadSpec(rate=rate, num_requests=n, seed=0, warmup=20)
    result = lab.run_load(lab.OpenAITarget(url, max_connections=2048), lab.RandomWorkload(8, 4), spec,
                          progress=False)
    recs = [r for r in result.records if not r.warmup]
    sent = np.array(sorted(r.sent for r in recs if r.sent is not None))
    lag = np.array([1e3 * r.lag for r in recs if r.lag is not None])
    s = result.summary
    return {"rate": rate, "n": n, "achieved_send_rate": (len(sent) - 1) / (sent[-1] - sent[0]),
            "lag_p50_ms": float(np.percentile(lag, 50)), "lag_p99_ms": float(np.percentile(lag, 99)),
            "lag_max_ms": float(lag.max()), "completed": s["completed"], "errors": s["errors"],
            "completions_per_s": s["request_throughput"], "ttft_p99_ms": s["ttft_ms"]["p99"]}


async def closed_loop(url: str, n: int, concurrency: int = 64) -> float:
    """The peer: `concurrency` clients streaming back to back, no schedule; requests/s."""
    import httpx

    body = {"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 4, "stream": True}
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker(k: int) -> None:
            nonlocal done
            for _ in range(k):
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for _line in r.aiter_lines():
                        pass
                done += 1

        t = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        return done / (time.perf_counter() - t)


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in ("httpx", "httpcore", "uvicorn", "fastapi", "numpy"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="250,500,1000,2000")
    ap.add_argument("--num-requests", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    proc, url = start_endpoint(args.tokens)
    try:
        load_before = os.getloadavg()
        peer = asyncio.run(closed_loop(url, args.num_requests))
        rows = [run_rate(url, float(r), args.num_requests) for r in args.rates.split(",")]
        load_after = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(10)
    today = dt.date.today().isoformat()
    lines = [f"# Load generator speed against a trivial loopback endpoint ({today})", "",
             f"- device: {cpu_name()}, {os.cpu_count()} cores (CPU only); load average before / after: "
             f"{load_before[0]:.1f} / {load_after[0]:.1f} (the machine is shared with other jobs)",
             f"- command: `python bench/loadgen_speed.py --rates {args.rates} --num-requests {args.num_requests} "
             f"--tokens {args.tokens}`",
             f"- versions: {versions()}",
             f"- endpoint: `workbench.lab.echo_server` in its own process ({args.tokens} SSE chunks + finish + usage "
             "per request, no model); generator: `lab.OpenAITarget` + `lab.LoadTest`, Poisson arrivals, "
             "20 warm-up requests, random 8-token prompts", "",
             f"Peer, same run: the endpoint's own capacity, 64 closed-loop streaming httpx clients: "
             f"**{peer:.0f} req/s**.", "",
             "| offered req/s | achieved send req/s | lag p50 ms | lag p99 ms | lag max ms | completed | errors "
             "| completions/s | TTFT p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate']:.0f} | {r['achieved_send_rate']:.0f} | {r['lag_p50_ms']:.2f} | "
                     f"{r['lag_p99_ms']:.2f} | {r['lag_max_ms']:.1f} | {r['completed']}/{r['n']} | {r['errors']} | "
                     f"{r['completions_per_s']:.0f} | {r['ttft_p99_ms']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
