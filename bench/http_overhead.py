"""What the HTTP API costs: output tok/s through it against in-process, same engine, workload and run.

In-process: `engine.generate_batch(prompts, ...)` (the whole burst submitted at once).
HTTP: the same prompts as concurrent streaming `/v1/chat/completions` requests from a
client in another process (httpx, one connection per stream, the usage chunk counts the
tokens), to `workbench.serve_api(engine, port=0)` on 127.0.0.1 over the very same engine. Rounds
alternate in-process / HTTP so load from elsewhere on the machine falls on both; the
ratio per round and its median are reported. Every request is greedy with `ignore_eos`,
so both sides generate exactly `requests x max_tokens` tokens.

    .venv/bin/python bench/http_overhead.py                       # prints a markdown record
    .venv/bin/python bench/http_overhead.py --out bench/results/http_overhead_cpu_$(date +%F).md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # bench/machine.py: this script's folder is on sys.path

TOPICS = ["the sea", "tea", "a busy kitchen", "the moon", "trains", "rain", "a library", "bees", "mountains",
          "a market", "snow", "clocks", "bicycles", "a garden", "the desert", "owls"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})."}]
            for i in range(n)]


# ---------------------------------------------------------------- the client (its own process)
async def _client(url: str, n: int, max_tokens: int, timeout: float) -> dict[str, float]:
    import httpx

    async def one(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> int:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        last = ""
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = line
        return json.loads(last[6:])["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        cpu0, t0 = time.process_time(), time.perf_counter()
        tokens = await asyncio.wait_for(asyncio.gather(*(one(client, m) for m in prompts(n))), timeout)
        seconds = time.perf_counter() - t0
    return {"tokens": sum(tokens), "seconds": seconds, "cpu": time.process_time() - cpu0}


def run_client(url: str, n: int, max_tokens: int, timeout: float) -> dict[str, float]:
    """One HTTP round from a fresh client process (its start-up is outside the timed part)."""
    out = subprocess.run([sys.executable, __file__, "--client", url, "--requests", str(n), "--max-tokens",
                          str(max_tokens), "--timeout", str(timeout)], capture_output=True, text=True,
                         timeout=timeout + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- CPU time by thread
def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of each thread of this process, by thread name."""
    import os
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {"process": time.process_time()}  # also counts threads that have ended
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        name = names.get(int(tid))
        if name is not None:
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds spent between two `thread_cpu` readings: the engine loop, the API thread, the rest."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    engine = delta.get("workbench-engine", 0.0)
    compute = sum(v for k, v in delta.items() if k.startswith("workbench-compute"))  # the CPU forward's thread
    api = sum(v for k, v in delta.items() if k.startswith("workbench-api"))
    return {"engine": engine, "compute": compute, "api": api, "rest": delta["process"] - engine - compute - api}


# ---------------------------------------------------------------- the benchmark
def versions() -> dict[str, str]:
    import fastapi
    import httpx
    import torch
    import uvicorn

    import workbench

    import os

    commit = os.environ.get("WORKBENCH_COMMIT") or subprocess.run(  # a copied tree has no .git: the caller says
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__, "httpx": httpx.__version__, "workbench": workbench.__version__,
            "commit": commit or "?"}


def device() -> str:
    cpu = cpu_name()
    import os

    import torch

    return (f"{cpu}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} logical CPUs usable by this process, "
            f"torch threads {torch.get_num_threads()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown record here too")
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)  # internal: run one HTTP round
    args = ap.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(_client(args.client, args.requests, args.max_tokens, args.timeout))))
        return 0

    import workbench

    engine = workbench.Engine(args.model, max_batch=args.max_batch, device=args.device)
    server = workbench.serve_api(engine, port=0)
    kw = dict(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, progress=False, timeout=args.timeout)
    rows = []
    try:
        engine.generate_batch(prompts(args.requests), **(kw | {"max_new_tokens": 4}))  # warm-up, both paths
        run_client(server.url, 4, 4, args.timeout)
        for r in range(args.rounds):
            c0, s0, t0 = thread_cpu(), engine.stats()["step"], time.perf_counter()
            outs = engine.generate_batch(prompts(args.requests), **kw)
            local = {"tokens": sum(len(o.token_ids) for o in outs), "seconds": time.perf_counter() - t0}
            c1, s1 = thread_cpu(), engine.stats()["step"]
            http = run_client(server.url, args.requests, args.max_tokens, args.timeout)
            c2, s2 = thread_cpu(), engine.stats()["step"]
            assert local["tokens"] == http["tokens"] == args.requests * args.max_tokens, (local, http)
            row = {"round": r, "local_tok_s": local["tokens"] / local["seconds"],
                   "http_tok_s": http["tokens"] / http["seconds"], "local_cpu": cpu_split(c0, c1),
                   "http_cpu": cpu_split(c1, c2), "client_cpu": http["cpu"],
                   "local_steps": s1 - s0, "http_steps": s2 - s1}
            row["ratio"] = row["http_tok_s"] / row["local_tok_s"]
            rows.append(row)
            print(f"round {r}: in-process {row['local_tok_s']:.1f} tok/s, HTTP {row['http_tok_s']:.1f} tok/s, "
                  f"ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)
    finally:
        server.stop()
        engine.stop()
    median = statistics.median(r["ratio"] for r in rows)
    command = "python bench/http_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    v = versions()
    lines = [
        f"# HTTP overhead: output tok/s through the API vs in-process ({datetime.date.today()})", "",
        f"- device: {device()}; engine on {engine.device} ({engine.dtype}), kernels {engine.runner.kernels_name}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command.strip()}`",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- workload: {args.requests} chat requests at once, {args.max_tokens} new tokens each (greedy, ignore_eos), "
        f"max_batch {args.max_batch}, model {engine.loaded.name}",
        "- in-process: `engine.generate_batch`; HTTP: streaming /v1/chat/completions from a separate httpx "
        "process over 127.0.0.1, one connection per request, to `workbench.serve_api` on the same engine", "",
        "| round | in-process tok/s | HTTP tok/s | HTTP / in-process | engine steps in-process / HTTP |",
        "|---|---|---|---|---|",
        *[f"| {r['round']} | {r['local_tok_s']:.1f} | {r['http_tok_s']:.1f} | {r['ratio']:.3f} | "
          f"{r['local_steps']} / {r['http_steps']} |" for r in rows],
        "", f"**Median HTTP / in-process: {median:.3f}** (target >= 0.90 on CPU)", "",
        "CPU seconds per round in the engine's process: its loop thread, its compute worker (the CPU",
        "forward), the API thread (from /proc/self/task), the rest of the process (OpenMP workers, the",
        "tokenizing executor, the caller); and the whole client process:", "",
        "| round | path | engine loop | compute worker | API thread | rest | client process |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['round']} | {path} | {c['engine']:.2f} | {c['compute']:.2f} | {c['api']:.2f} | {c['rest']:.2f} "
          f"| {client} |"
          for r in rows for path, c, client in (("in-process", r["local_cpu"], "-"),
                                                ("HTTP", r["http_cpu"], f"{r['client_cpu']:.2f}"))],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
