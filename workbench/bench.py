"""`workbench bench`: our engine against transformers on the same prompts, in one run.

Peers: transformers `generate` (one padded static batch) and `generate_batch`
(transformers' own continuous batching), both as called by default (its manager
built and warmed up inside every call) and with a persistent manager (built and
warmed up once, in the warm-up call, as our engine is). All runs are greedy, ignore EOS so
every system produces exactly the same number of tokens, and are timed after
a warm-up. Results go to stdout and to `bench/results/` as Markdown + JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about graphics cards.",
    "Explain continuous batching in one sentence.", "Give me three tips for a good night's sleep.",
    "What does a compiler do?", "Describe the ocean to someone who has never seen it.",
    "Why do leaves change colour in autumn?", "Write a limerick about a cat who codes.",
]


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def measure_interleaved(systems: list[tuple[str, Callable[[], int]]], repeats: int) -> list[dict[str, Any]]:
    """Warm each system up, then time them in turn, `repeats` rounds.

    Interleaving makes a slow spell of the machine (other processes on the two
    cores) fall on every system alike instead of on whichever ran then.
    """
    for _, fn in systems:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in systems}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in systems:
            t = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t)
    rows = []
    for name, _ in systems:
        median = statistics.median(times[name])
        rows.append({"system": name, "tokens": tokens[name], "median_s": median, "times_s": times[name],
                     "tok_per_s": tokens[name] / median})
        print(f"{name:40s} {tokens[name]:6d} tok  {median:7.2f} s  {tokens[name] / median:8.1f} tok/s", flush=True)
    return rows


def run_ours(loaded: Any, prompts: list[list[int]], new_tokens: int, **config: Any) -> Callable[[], int]:
    from .engine import Engine

    engine = Engine(loaded, **config)
    engine.generate_batch(prompts[:2], max_new_tokens=4, ignore_eos=True, progress=False)  # warm-up

    def go() -> int:
        # Every timed run starts with an empty prefix cache: the repeats send the same prompts, and a
        # cache warmed by an earlier repeat would skip most of the prefill that the peers pay for.
        engine.reconfigure(prefix_caching=False)
        engine.reconfigure(prefix_caching=True)
        outs = engine.generate_batch(prompts, max_new_tokens=new_tokens, ignore_eos=True, progress=False)
        return sum(len(o.token_ids) for o in outs)

    go.engine = engine  # type: ignore[attr-defined]
    return go


def run_hf_generate(hf: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> Callable[[], int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def go() -> int:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad)
        return int((out.shape[1] - width) * len(prompts))

    return go


def run_hf_generate_batch(hf: Any, prompts: list[list[int]], new_tokens: int,
                          persistent: bool = False) -> Callable[[], int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # By default generate_batch builds its manager and runs its warm-up (forward passes at the
    # largest sizes; CUDA graph capture on a GPU) inside every call. A persistent manager is the
    # API's best use: built and warmed once, in the untimed warm-up call, like our engine.
    keep = {"persistent_manager": True} if persistent else {}

    def go() -> int:
        out = hf.generate_batch(prompts, generation_config=config, progress_bar=False, **keep)
        return sum(len(o.generated_tokens) for o in out.values())

    return go


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def _dense_and_peers(loaded: Any, prompts: list[list[int]], args: argparse.Namespace
                     ) -> list[tuple[str, Callable[[], int]]]:
    """Our engine on dense fp32 weights, and transformers' `generate` and `generate_batch`."""
    from transformers import AutoModelForCausalLM

    from .loading import load
    from .models.block_linear import BlockLinear

    systems: list[tuple[str, Callable[[], int]]] = []
    if any(isinstance(m, BlockLinear) for m in loaded.model.modules()):
        # the same engine with every weight dense fp32, as the peers hold them (its own model copy:
        # placing one model object both ways would undo the other's packing)
        systems.append(("cb-workbench Engine, dense fp32 weights", run_ours(load(), prompts, args.new_tokens,
                                                                            block_weights=False)))
    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    systems.append(("transformers generate (padded static)",
                    run_hf_generate(hf, loaded.tokenizer, prompts, args.new_tokens)))
    if not args.skip_generate_batch:
        systems.append(("transformers generate_batch (CB, default call)",
                        run_hf_generate_batch(hf, prompts, args.new_tokens)))
        if _accepts(hf.generate_batch, "persistent_manager"):
            # on a model of its own: a default call would pick up the cached manager and destroy it
            hf_kept = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
            systems.append(("transformers generate_batch (CB, persistent manager)",
                            run_hf_generate_batch(hf_kept, prompts, args.new_tokens, persistent=True)))
    return systems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench bench", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--skip-generate-batch", action="store_true")
    parser.add_argument("--loops-only", action="store_true",
                        help="only our engine, sync against overlapped loop (no peers, no dense-weights row)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING)

    import transformers

    from .loading import load

    loaded = load()
    prompts = chat_prompts(loaded.tokenizer, args.requests)
    systems: list[tuple[str, Callable[[], int]]] = [("cb-workbench Engine (continuous)",
                                                     run_ours(loaded, prompts, args.new_tokens))]
    # the same engine with the overlapped loop: host work of step N+1 beside step N's forward on the
    # compute worker (one model object, placed the same way, two engines)
    systems.append(("cb-workbench Engine, overlapped loop", run_ours(loaded, prompts, args.new_tokens, overlap=True)))
    if not args.loops_only:
        systems += _dense_and_peers(loaded, prompts, args)
    rows = measure_interleaved(systems, args.repeats)
    for _, fn in systems:
        if hasattr(fn, "engine"):
            fn.engine.stop()  # type: ignore[attr-defined]
    report = _report(rows, args, transformers.__version__)
    print(report["markdown"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu_{'loops' if args.loops_only else 'bench'}_{dt.date.today().isoformat()}"
    stem.with_suffix(".md").write_text(report["markdown"])
    stem.with_suffix(".json").write_text(json.dumps(report["data"], indent=2))
    return 0


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, tf_version: str) -> dict[str, Any]:
    ours = rows[0]["tok_per_s"]
    dense = next((r["tok_per_s"] for r in rows if "dense" in r["system"]), None)
    for r in rows:
        r["ours_over_this"] = ours / r["tok_per_s"]
        if dense is not None:
            r["dense_over_this"] = dense / r["tok_per_s"]
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(["workbench bench", *args.argv]),
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": tf_version,
        "workload": f"{args.requests} chat prompts x {args.new_tokens} new tokens, greedy, fp32, EOS ignored",
        "weights": ("ours: the embedded GGUF's Q4_1 / Q8_0 blocks for steps of few rows (each weight rebuilt to "
                    "exactly the fp32 value the peers hold, fp32 arithmetic), oneDNN fp32 for prefill; 'dense': "
                    "fp32 everywhere, as the peers hold them") if dense is not None else "dense fp32 everywhere",
        "repeats": args.repeats, "statistic": "median of interleaved repeats after one warm-up each",
    }
    lines = [f"# CPU benchmark, {meta['date']}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [
        "", "| system | tokens | median s | tok/s | ours / this | ours with dense weights / this | all runs s |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
        dense_ratio = f"{r['dense_over_this']:.2f}x" if "dense_over_this" in r else "n/a"
        lines.append(f"| {r['system']} | {r['tokens']} | {r['median_s']:.2f} | {r['tok_per_s']:.1f} | "
                     f"{r['ours_over_this']:.2f}x | {dense_ratio} | {runs} |")
    return {"markdown": "\n".join(lines) + "\n", "data": {"meta": meta, "rows": rows,
                                                          "spread": {r["system"]: statistics.pstdev(r["times_s"]) for r in rows}}}


if __name__ == "__main__":
    sys.exit(main())
