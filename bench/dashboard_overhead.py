"""Engine tokens/s with the live dashboard attached and draining vs detached (CPU benchmark).

    python bench/dashboard_overhead.py [--repeats 5] [--requests 8] [--max-new-tokens 48]

"Attached" is what `workbench serve` does per browser session, minus the socket
write and the browser: a Dashboard whose models live in a held Bokeh Document,
drained every 100 ms by a task on the asyncio loop (as the server's IO loop
runs it), each tick's document events serialized into the PATCH-DOC message a
server would send, and every request submitted through the dashboard so its
output card streams through its own task. "Detached" is the same workload
through `engine.submit` with no dashboard. Runs alternate (detached/attached,
then attached/detached) so load drifting on a shared machine hits both alike;
the report gives every pair's ratio and their median.

The engine's tokens/s is generated tokens over the wall time from the first
submit to the last request's end; the engine-only figure (tokens over the
span of its recorded steps) is reported beside it. On a shared machine wall
time swings with other jobs, so the process's tokens per CPU-second (engine
plus dashboard, all threads) is reported too: it moves much less with
outside load, and the dashboard's own work shows up in it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_name  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a haiku about a busy kitchen.", "What is continuous batching? One sentence.",
           "Name three planets and one fact about each.", "Give me a short tip for learning a language.",
           "Why is the sea salty?", "Write a two-line poem about tea.", "List five colours.",
           "Explain what a KV cache is to a child."]


class ServerLikeDoc:
    """A held Document whose events are serialized per tick the way a Bokeh server session does."""

    def __init__(self, dash: Any) -> None:
        from bokeh.document import Document
        from bokeh.protocol import Protocol

        self.doc = Document()
        self.doc.add_root(dash.layout.get_root(self.doc))
        self.protocol = Protocol()
        self.events: list = []
        self.doc.on_change(self.events.append)
        self.bytes = 0
        self.messages = 0

    def flush(self) -> None:
        from bokeh.document.events import DocumentPatchedEvent

        events = [e for e in self.events if isinstance(e, DocumentPatchedEvent)]
        self.events.clear()
        if events:
            msg = self.protocol.create("PATCH-DOC", events)
            self.bytes += len(msg.content_json) + sum(len(b.to_bytes()) for b in msg.buffers)
            self.messages += 1


async def run_once(engine: Any, attached: bool, n: int, max_new_tokens: int) -> dict[str, Any]:
    from workbench.ui import Dashboard

    engine.telemetry.clear()
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    dash = server = None
    tick_s: list[float] = []
    stop = asyncio.Event()

    async def drain() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            dash.tick()
            server.flush()
            tick_s.append(time.perf_counter() - t)
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    if attached:
        dash = Dashboard(engine)
        server = ServerLikeDoc(dash)
        dash.tick()
        server.flush()
        drainer = asyncio.ensure_future(drain())
    t0, c0 = time.perf_counter(), time.process_time()
    if attached:
        handles = [dash.submit(c, max_new_tokens=max_new_tokens, ignore_eos=True) for c in chats]
    else:
        handles = [engine.submit(c, max_new_tokens=max_new_tokens, ignore_eos=True) for c in chats]
    outputs = [await (dash.result(h) if attached else h.result_async()) for h in handles]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if attached:
        await asyncio.sleep(0.15)  # the last tick renders the ends
        stop.set()
        await drainer
        assert all(dash._outputs[o.request_id].text == o.text for o in outputs), "dashboard cards lost text"
    tokens = sum(len(o.token_ids) for o in outputs)
    steps = engine.telemetry.steps()
    span = steps[-1].t_end - steps[0].t_start
    return {"mode": "attached" if attached else "detached", "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "engine_tokens_per_s": tokens / span, "steps": len(steps),
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu,
            "ticks": len(tick_s), "tick_ms_mean": 1e3 * statistics.fmean(tick_s) if tick_s else None,
            "tick_ms_max": 1e3 * max(tick_s) if tick_s else None,
            "patch_bytes": server.bytes if server else None, "patch_messages": server.messages if server else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard_overhead"))
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = p.parse_args(argv)

    import bokeh
    import panel
    import torch

    import workbench

    engine = workbench.Engine(max_batch=args.max_batch)
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []

    async def warmup() -> None:
        await run_once(engine, False, 2, 8)
        await run_once(engine, True, 2, 8)

    asyncio.run(warmup())
    for r in range(args.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        pair = {}
        for attached in order:
            res = asyncio.run(run_once(engine, attached, args.requests, args.max_new_tokens))
            res["repeat"] = r
            runs.append(res)
            pair[res["mode"]] = res
            print(f"repeat {r} {res['mode']:>8}: {res['tokens_per_s']:6.1f} tok/s wall, "
                  f"{res['tokens_per_cpu_s']:6.1f} tok/cpu-s, "
                  f"{res['engine_tokens_per_s']:6.1f} tok/s engine"
                  + (f", {res['ticks']} ticks of {res['tick_ms_mean']:.2f} ms" if res["ticks"] else ""), flush=True)
        pair_ratio = pair["attached"]["tokens_per_s"] / pair["detached"]["tokens_per_s"]
        print(f"repeat {r} ratio attached/detached: {pair_ratio:.3f}", flush=True)
    engine.stop()
    load_after = os.getloadavg()

    def ratios(key: str) -> list[float]:
        by = {(x["repeat"], x["mode"]): x[key] for x in runs}
        return [by[(r, "attached")] / by[(r, "detached")] for r in range(args.repeats)]

    wall_ratios, engine_ratios = ratios("tokens_per_s"), ratios("engine_tokens_per_s")
    cpu_ratios = ratios("tokens_per_cpu_s")
    attached_runs = [x for x in runs if x["mode"] == "attached"]
    duty = sum(x["ticks"] * x["tick_ms_mean"] for x in attached_runs) / 1e3 / sum(x["wall_s"] for x in attached_runs)
    summary = {
        "date": args.date, "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs)",
        "command": "python bench/dashboard_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "panel": panel.__version__,
                     "bokeh": bokeh.__version__, "workbench": workbench.__version__},
        "workload": {"requests": args.requests, "max_new_tokens": args.max_new_tokens, "ignore_eos": True,
                     "max_batch": args.max_batch, "model": engine.loaded.name},
        "load_average_before": load_before, "load_average_after": load_after,
        "ratio_wall_median": statistics.median(wall_ratios), "ratio_wall_min": min(wall_ratios),
        "ratio_wall_max": max(wall_ratios), "ratio_engine_median": statistics.median(engine_ratios),
        "ratio_tokens_per_cpu_s_median": statistics.median(cpu_ratios), "ratio_tokens_per_cpu_s_min": min(cpu_ratios),
        "ratio_tokens_per_cpu_s_max": max(cpu_ratios), "tick_duty_cycle": duty,
        "ratios_wall": wall_ratios, "ratios_engine": engine_ratios, "ratios_tokens_per_cpu_s": cpu_ratios,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"\nattached/detached tokens/s: median {summary['ratio_wall_median']:.3f} "
          f"(min {summary['ratio_wall_min']:.3f}, max {summary['ratio_wall_max']:.3f}); "
          f"engine-only median {summary['ratio_engine_median']:.3f}; tokens per CPU-second median "
          f"{summary['ratio_tokens_per_cpu_s_median']:.3f} (min {summary['ratio_tokens_per_cpu_s_min']:.3f}, max "
          f"{summary['ratio_tokens_per_cpu_s_max']:.3f}); ticks busy {100 * duty:.1f}% of the wall time; "
          f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
