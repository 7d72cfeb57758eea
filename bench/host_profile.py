"""Where a step's time goes: the loop's Python (cProfile) and, on CUDA, the GPU kernels.

    python bench/host_profile.py [--device cpu|cuda] [--batch 64] [--prompt 128] [--new 128] [--top 30]

On a CPU the model is a 1-layer, 64-wide random model with SmolLM2's
vocabulary, so the forward pass is nearly free and what remains of each step
is the loop's own Python: scheduling, filling the inputs, bookkeeping,
detokenizing, streaming and telemetry. On CUDA it is the real SmolLM2-135M
shape in bf16 (random weights), workload (a) of bench/gpu_vs_transformers.py,
and a torch.profiler table of the kernels follows. The steps run on this
thread (the loop thread is not started), so cProfile sees them.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the checkout, for `python bench/host_profile.py` without an install
sys.path.insert(0, str(ROOT / "bench"))


def build_engine(device: str, batch: int, freeze_gc: bool | None = None, prefix_caching: bool = False,
                 num_blocks: int | None = 4096, shape_name: str = "smollm2", decode_steps: int | None = None):
    import torch
    import transformers

    import workbench
    from shapes import LLAMA3_8B, SMOLLM2_135M
    from workbench.loading import LoadedModel
    from workbench.models import DecoderModel, ModelConfig

    shape = dict({"smollm2": SMOLLM2_135M, "llama3-8b": LLAMA3_8B}[shape_name])
    if device == "cpu":
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1)
    mc = ModelConfig.from_hf(transformers.LlamaConfig(**shape))
    torch.manual_seed(0)
    with torch.device(device):
        model = DecoderModel(mc)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    tok = transformers.AutoTokenizer.from_pretrained(ROOT / ".cache" / "gpu" / "smollm2")
    loaded = LoadedModel(model.eval(), tok, mc, f"random {mc.num_layers}-layer", frozenset({2}))
    return workbench.Engine(loaded, device=device, dtype=str(dtype).removeprefix("torch."), max_batch=batch,
                            token_budget=4096, num_blocks=num_blocks, prefix_caching=prefix_caching, freeze_gc=freeze_gc,
                            start=False, **({"decode_steps": decode_steps} if decode_steps else {}))


def run_threaded(engine, prompts, new_tokens: int) -> int:
    """As an application drives it: the loop thread steps, this thread submits and waits."""
    before = engine.stats()["step"]
    handles = [engine.submit(p, max_new_tokens=new_tokens, ignore_eos=True) for p in prompts]
    assert all(h.result(timeout=300).finish_reason == "length" for h in handles)
    return engine.stats()["step"] - before


def run(engine, prompts, new_tokens: int) -> int:
    if engine.is_running:
        return run_threaded(engine, prompts, new_tokens)
    engine._running = True  # drive the loop by hand on this thread
    handles = [engine.submit(p, max_new_tokens=new_tokens, ignore_eos=True) for p in prompts]
    steps = 0
    while engine.core.has_work() or engine._pending:
        engine._drain_inbox(block=False)
        engine.core.step()
        steps += 1
    assert all(h.done and h.output.finish_reason == "length" for h in handles)
    engine._running = False
    return steps


class GcClock:
    """Time spent in the garbage collector, per generation, while `on`."""

    def __init__(self) -> None:
        self.seconds, self.counts, self._t = [0.0, 0.0, 0.0], [0, 0, 0], 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds, self.counts = [0.0, 0.0, 0.0], [0, 0, 0]

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._t
            self.counts[info["generation"]] += 1

    def __str__(self) -> str:
        return ", ".join(f"gen{g} {n}x {1e3 * s:.1f} ms" for g, (n, s) in enumerate(zip(self.counts, self.seconds)))


def probe_replay(engine, batch: int, args_context: int, n: int = 200) -> None:
    """Host cost of one graph launch, and a replay's latency, outside the loop."""
    import torch

    graphs = engine.runner.graphs
    stream = engine.runner.compute_stream
    with torch.cuda.stream(stream):
        for sync_each in (False, True):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                graphs.replay((next(b for b in graphs.context_bounds if b >= args_context), graphs.bucket(batch)), batch)
                if sync_each:
                    stream.synchronize()
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            what = "replay + sync each" if sync_each else "replays queued back to back"
            print(f"graph probe, batch {batch}, context {args_context}, {what}: {1e6 * host / n:.1f} us host per call, "
                  f"{1e6 * total / n:.1f} us per replay all in")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--sort", default="tottime", help="pstats order: tottime or cumulative")
    p.add_argument("--freeze-gc", choices=("auto", "on", "off"), default="auto", help="EngineConfig.freeze_gc")
    p.add_argument("--passes-only", action="store_true", help="skip cProfile and the kernel table")
    p.add_argument("--threaded", action="store_true", help="run the engine's own loop thread (as the benchmark does)")
    p.add_argument("--prefix-caching", action="store_true", help="EngineConfig.prefix_caching (off by default here)")
    p.add_argument("--num-blocks", type=int, default=4096, help="KV blocks (0: sized from free memory, as the benchmark)")
    p.add_argument("--shape", choices=("smollm2", "llama3-8b"), default="smollm2",
                   help="model shape on CUDA (llama3-8b with --batch 32 --new 512 is workload (c))")
    p.add_argument("--decode-steps", type=int, default=None, help="EngineConfig.decode_steps (default: the device's)")
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(args.prompt)] for _ in range(args.batch)]
    engine = build_engine(args.device, args.batch, {"auto": None, "on": True, "off": False}[args.freeze_gc],
                          args.prefix_caching, args.num_blocks or None, args.shape, args.decode_steps)
    print(f"threaded={args.threaded} prefix_caching={args.prefix_caching} num_blocks={engine.blocks.limit} "
          f"decode_steps={engine.config.decode_steps}")
    clock = GcClock()
    print(f"gc: {gc.get_freeze_count()} objects frozen by the engine, {len(gc.get_objects())} tracked")
    run(engine, prompts, args.new)  # warm-up: every shape compiled
    if args.device == "cuda" and not args.threaded:
        for context in engine.runner.graphs.context_bounds:
            probe_replay(engine, args.batch, context)
    if args.threaded:
        engine.start()
    for k, label in enumerate(("timed", "timed again", "timed a third time"), start=1):
        engine.telemetry.clear()
        clock.reset()
        other = [[(x + k * 7919) % 49000 + 3 for x in p] for p in prompts]  # no prefix-cache hits either
        t = time.perf_counter()
        steps = run(engine, other, args.new)
        wall = time.perf_counter() - t
        rec = engine.telemetry.steps()
        mean = lambda f: 1e3 * sum(map(f, rec)) / len(rec)  # noqa: E731
        gpu = [1e3 * (s.gpu_end - s.gpu_start) for s in rec if s.gpu_start is not None]
        gaps = sorted(1e3 * (b.t_end - a.t_end) for a, b in zip(rec, rec[1:]))
        print(f"{label}: {steps} steps, {args.batch * args.new / wall:.0f} tok/s, {1e3 * wall / steps:.3f} ms/step; "
              f"per step: schedule {mean(lambda s: s.schedule_s):.3f}, prepare {mean(lambda s: s.prepare_s):.3f}, "
              f"launch/forward {mean(lambda s: s.forward_s):.3f}, postprocess {mean(lambda s: s.postprocess_s):.3f} ms"
              + (f"; GPU span median {sorted(gpu)[len(gpu) // 2]:.3f} ms" if gpu else ""))
        decode = [s for s in rec if s.slots and all(x.kind == "decode" for x in s.slots)]
        if decode:  # a launch of a decode run does k steps' work: its host time per step of the run
            per = lambda f: 1e3 * sum(f(s) / s.slots[0].num_tokens for s in decode) / len(decode)  # noqa: E731
            print(f"    decode launches {len(decode)}, {sum(s.slots[0].num_tokens for s in decode) / len(decode):.2f} "
                  f"steps each; host per decode step: schedule {per(lambda s: s.schedule_s):.3f}, prepare "
                  f"{per(lambda s: s.prepare_s):.3f}, launch {per(lambda s: s.forward_s):.3f}, output "
                  f"{per(lambda s: s.postprocess_s):.3f} ms")
        print(f"    step to step: median {gaps[len(gaps) // 2]:.3f}, p90 {gaps[9 * len(gaps) // 10]:.3f}, "
              f"max {gaps[-1]:.3f} ms; garbage collector: {clock}")
        first, last = rec[0], rec[-1]
        print(f"    submit to first step start {1e3 * (first.t_start - t):.2f} ms, last step end to done "
              f"{1e3 * (t + wall - last.t_end):.2f} ms; slowest steps:")
        for s in sorted(rec, key=lambda s: s.t_end - s.t_start, reverse=True)[:4]:
            span = f"{1e3 * (s.gpu_end - s.gpu_start):.2f}" if s.gpu_start is not None else "-"
            print(f"      step {s.step}: {s.num_tokens} tokens, graphed {s.graphed}, start to end "
                  f"{1e3 * (s.t_end - s.t_start):.2f} ms (schedule {1e3 * s.schedule_s:.2f}, prepare "
                  f"{1e3 * s.prepare_s:.2f}, launch {1e3 * s.forward_s:.2f}, post {1e3 * s.postprocess_s:.2f}), "
                  f"GPU {span} ms")
    if args.passes_only:
        engine.stop()
        return 0
    prof = cProfile.Profile()
    prof.enable()
    run(engine, prompts, args.new)
    prof.disable()
    pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
    if args.device == "cuda":
        import torch
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            run(engine, prompts, args.new)
            torch.cuda.synchronize()
        print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
    engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
