"""`python -m workbench loadtest ...` and `python -m workbench loadtest compare A.json B.json`.

    workbench loadtest --rate 4 --num-requests 40 --slo-ttft-ms 500 --slo-tpot-ms 80 --out a.json
    workbench loadtest --url http://127.0.0.1:8000 --rate 8 --duration 60 --workload sharegpt
    workbench loadtest --rate 4 --num-requests 24 --sweep max_batch=2,4,8 --sweep token_budget=32,128
    workbench loadtest --sweep-rates 1,2,4,8 --num-requests 32
    workbench loadtest compare a.json b.json

Without `--url` the load goes to an engine built in this process (the
embedded model unless --model); with it, to any OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from .metrics import SLO, format_summary
from .report import compare, save_result
from .runner import LoadSpec, arun_load
from .sweep import Sweep, config_sweep, measure_restart_s, rate_sweep
from .targets import EngineTarget, OpenAITarget, Target
from .workloads import JsonlWorkload, RandomWorkload, SharedPrefixWorkload, ShareGPTWorkload, Workload, load_sharegpt

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench loadtest", description="a load with latency SLOs against this "
                                "engine or an OpenAI-compatible URL; sweeps; `loadtest compare A.json B.json`")
    t = p.add_argument_group("target")
    t.add_argument("--url", default=None, help="an OpenAI-compatible server (default: an engine in this process)")
    t.add_argument("--served-model", default=None, help="model id to send to the URL (default: its first model)")
    t.add_argument("--api-key", default=None)
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", default=True,
                   help="do not send ignore_eos (for servers that reject the vLLM extension)")
    t.add_argument("--model", default=None, help="in-process: HF folder, hub id or .gguf (default: embedded)")
    for name in ("max-batch", "num-blocks", "token-budget", "block-size"):
        t.add_argument(f"--{name}", type=int, default=None, help="in-process engine setting")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=["random", "shared-prefix", "sharegpt", "jsonl"], default="random")
    w.add_argument("--input-len", type=int, default=64)
    w.add_argument("--output-len", type=int, default=32)
    w.add_argument("--range-ratio", type=float, default=0.0)
    w.add_argument("--num-groups", type=int, default=4, help="shared-prefix: how many prefixes")
    w.add_argument("--prefix-len", type=int, default=64)
    w.add_argument("--suffix-len", type=int, default=16)
    w.add_argument("--dataset-path", default=None, help="sharegpt: a ShareGPT JSON file; jsonl: the prompts file")
    w.add_argument("--max-output", type=int, default=None, help="sharegpt: cap each reply's length")
    a = p.add_argument_group("arrivals")
    a.add_argument("--rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    a.add_argument("--ramp-to", type=float, default=None, help="move the rate linearly to this by the end")
    a.add_argument("--num-requests", type=int, default=None)
    a.add_argument("--duration", type=float, default=None, help="seconds of arrivals")
    a.add_argument("--concurrency", type=int, default=None, help="most requests in flight at once")
    a.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the statistics")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--request-timeout", type=float, default=300.0)
    s = p.add_argument_group("SLOs (milliseconds)")
    s.add_argument("--slo-ttft-ms", type=float, default=None)
    s.add_argument("--slo-tpot-ms", type=float, default=None)
    s.add_argument("--slo-e2e-ms", type=float, default=None)
    s.add_argument("--slo-itl-p99-ms", type=float, default=None, help="an objective on the run's p99 ITL")
    o = p.add_argument_group("sweeps and output")
    o.add_argument("--sweep", action="append", default=[], metavar="KNOB=V1,V2",
                   help="config sweep, applied live (max_batch, token_budget, num_blocks, decode_steps); "
                        "repeat to cross knobs")
    o.add_argument("--sweep-rates", default=None, metavar="R1,R2", help="rate sweep")
    o.add_argument("--restart-s", type=float, default=None,
                   help="seconds one restart costs (default: measured once in-process, unknown for a URL)")
    o.add_argument("--out", default=None, help="write the result (or the sweep) as JSON")
    o.add_argument("--label", default="")
    o.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    return p


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--sweep takes KNOB=V1,V2,..., got {item!r}")
        grid[key.strip().replace("-", "_")] = [_value(v) for v in values.split(",")]
    return grid


def _value(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def make_workload(args: argparse.Namespace, tokenizer: Any = None) -> Workload:
    if args.workload == "random":
        return RandomWorkload(args.input_len, args.output_len, args.range_ratio)
    if args.workload == "shared-prefix":
        return SharedPrefixWorkload(args.num_groups, args.prefix_len, args.suffix_len, args.output_len)
    if args.workload == "jsonl":
        if not args.dataset_path:
            raise ValueError("--workload jsonl needs --dataset-path FILE")
        return JsonlWorkload(args.dataset_path, default_max_tokens=args.output_len)
    pairs = load_sharegpt(args.dataset_path)
    if tokenizer is None:
        from transformers import AutoTokenizer  # a URL target: count tokens with the served model's tokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.served_model) if args.served_model else None
    count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else (lambda s: len(s.split()))
    return ShareGPTWorkload(pairs, count, max_output=args.max_output)


def make_spec(args: argparse.Namespace) -> LoadSpec:
    if args.num_requests is None and args.duration is None:
        args.num_requests = 32
    return LoadSpec(rate=args.rate, burstiness=args.burstiness, ramp_to=args.ramp_to, num_requests=args.num_requests,
                    duration_s=args.duration, concurrency=args.concurrency, warmup=args.warmup, seed=args.seed,
                    request_timeout_s=args.request_timeout).validate()


async def run(args: argparse.Namespace) -> int:
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms, args.slo_itl_p99_ms)
    spec = make_spec(args)
    engine = None
    target: Target
    if args.url:
        target = OpenAITarget(args.url, model=args.served_model, api_key=args.api_key, ignore_eos=args.ignore_eos)
        tokenizer = None
    else:
        from ..engine import Engine

        overrides = {k: getattr(args, k) for k in ("max_batch", "num_blocks", "token_budget", "block_size")
                     if getattr(args, k) is not None}
        engine = await asyncio.to_thread(Engine, args.model, **overrides)
        target, tokenizer = EngineTarget(engine, ignore_eos=args.ignore_eos), engine.tokenizer
    try:
        workload = make_workload(args, tokenizer)
        grid = parse_grid(args.sweep)
        if grid or args.sweep_rates:
            return await _sweep(args, target, workload, spec, slo, grid, engine)
        result = await arun_load(target, workload, spec, slo, progress=args.progress, label=args.label)
        print(format_summary(result.summary, title=args.label or "Load result"))
        if args.out:
            print(f"result: {save_result(result, args.out)}")
        return 0 if result.summary["completed"] else 1
    finally:
        if engine is not None:
            engine.stop()


async def _sweep(args: argparse.Namespace, target: Target, workload: Workload, spec: LoadSpec, slo: SLO,
                 grid: dict[str, list[Any]], engine: Any) -> int:
    sweep: Sweep
    if args.sweep_rates:
        rates = [float(r) for r in args.sweep_rates.split(",")]
        sweep = await rate_sweep(target, workload, rates, spec, slo, progress=args.progress)
    else:
        restart_s = args.restart_s
        if restart_s is None and engine is not None:
            restart_s = await asyncio.to_thread(measure_restart_s, engine)
        sweep = await config_sweep(target, workload, grid, spec, slo, restart_s=restart_s, progress=args.progress)
    rows = sweep.table()
    keys = list(rows[0]) if rows else []
    print("  ".join(f"{k[:14]:>14}" for k in keys))
    for row in rows:
        print("  ".join(f"{_fmt(row[k]):>14}" for k in keys))
    print(f"sweep: {len(sweep.points)} points in {sweep.wall_s:.1f} s, each applied live", end="")
    if sweep.restart_wall_s is not None:
        print(f"; with a restart per point ({sweep.restart_s:.1f} s each) about {sweep.restart_wall_s:.1f} s")
    else:
        print()
    if sweep.kind == "config":
        rec = sweep.recommend()
        print(rec.text() if rec is not None else "no setting had any goodput under the SLOs")
    if args.out:
        Path(args.out).write_text(json.dumps(sweep.as_dict(), indent=1, default=str))
        print(f"sweep: {args.out}")
    return 0


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv: list[str]) -> int:
    """Entry point of `workbench loadtest`."""
    if argv and argv[0] == "compare":
        cp = argparse.ArgumentParser(prog="workbench loadtest compare", description="two results side by side")
        cp.add_argument("a")
        cp.add_argument("b")
        ns = cp.parse_args(argv[1:])
        print(compare(ns.a, ns.b))
        return 0
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except ValueError as exc:
        print(f"workbench loadtest: error: {exc}", file=sys.stderr)
        return 2
