"""`workbench demo | generate | bench | serve | api | loadtest`: the engine from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import time
from typing import Any

DEMO_QUESTIONS = [
    "Write a haiku about a busy kitchen.",
    "What is continuous batching? One sentence.",
    "Name three planets and one fact about each.",
    "Give me a short tip for learning a language.",
    "Why is the sea salty?",
    "Write a two-line poem about tea.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="cb-workbench: continuous batching you can see")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream several concurrent requests to the terminal")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--max-batch", type=int, default=4)
    gen = sub.add_parser("generate", help="generate from one prompt (chat template applied)")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    sub.add_parser("bench", help="our engine vs transformers on the CPU (see workbench.bench)", add_help=False)
    sub.add_parser("serve", help="the live dashboard as a Panel app (see workbench.ui.app)", add_help=False)
    sub.add_parser("loadtest", help="a load with latency SLOs, sweeps, compare (see workbench.lab.cli)",
                   add_help=False)
    sub.add_parser("api", help="an OpenAI-compatible HTTP API + /metrics (see workbench.server.run)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if args.command == "loadtest":
        from .lab.cli import main as loadtest_main

        return loadtest_main(rest)
    if args.command == "api":
        from .server.run import api_main

        return api_main(rest)
    if args.command == "serve":
        from .ui.app import serve_main

        return serve_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        return asyncio.run(run_demo(args.max_new_tokens, args.max_batch))
    return asyncio.run(run_generate(args.prompt, args.max_new_tokens, args.temperature))


async def run_generate(prompt: str, max_new_tokens: int, temperature: float) -> int:
    from .engine import Engine

    engine = Engine()
    try:
        async for chunk in engine.stream([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                                         temperature=temperature):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.stop()
    return 0


async def run_demo(max_new_tokens: int, max_batch: int) -> int:
    """Six requests, at most `max_batch` at once: watch them stream, finish and make room."""
    from .engine import Engine

    engine = Engine(max_batch=max_batch)
    texts = {i: "" for i in range(len(DEMO_QUESTIONS))}
    state = {i: "queued" for i in texts}
    live = sys.stdout.isatty()
    started = time.perf_counter()

    async def one(i: int) -> None:
        prompt = [{"role": "user", "content": DEMO_QUESTIONS[i]}]
        async for chunk in engine.stream(prompt, max_new_tokens=max_new_tokens):
            texts[i] += chunk.text
            state[i] = chunk.finish_reason or "streaming"
            if live:
                _draw(texts, state, engine.stats())
        if not live:
            print(f"[{time.perf_counter() - started:5.1f}s] {DEMO_QUESTIONS[i]}\n    -> {texts[i].strip()}\n", flush=True)

    print(f"cb-workbench demo: {len(texts)} requests, max_batch={max_batch}, model {engine.loaded.name}\n")
    try:
        await asyncio.gather(*(one(i) for i in texts))
    finally:
        engine.stop()
    summary = engine.telemetry.summary()
    print(f"\n{summary.get('tokens', 0)} tokens in {summary.get('steps', 0)} steps, "
          f"{summary.get('tokens_per_s', 0):.1f} tokens/s, mean step {summary.get('mean_step_ms', 0):.1f} ms")
    return 0


def _draw(texts: dict[int, str], state: dict[int, str], stats: dict[str, Any]) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    lines = [f"running {stats['running']}  waiting {stats['waiting']}  free KV blocks {stats['free_blocks']}"
             f"/{stats['num_blocks']}  step {stats['step']}"]
    for i, text in texts.items():
        flat = text.replace("\n", " ").strip()
        label = f"{i} [{state[i]:>9}] "
        lines.append((label + flat[-(width - len(label) - 1):])[: width - 1])
    sys.stdout.write("\x1b[H\x1b[J" + "\n".join(lines) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
