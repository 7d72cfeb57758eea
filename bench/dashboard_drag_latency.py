"""The served dashboard's responsiveness while a user drags its sliders during a burst (CPU benchmark).

    python bench/dashboard_drag_latency.py [--seconds 30] [--out bench/results/dashboard_drag_latency]

Starts `workbench serve` on a free loopback port, opens it in Debian's Chromium
(Playwright), presses Burst (12 requests of up to 128 tokens, max batch 2),
and then, for `--seconds`, releases one of the three config sliders every
0.25 s (max batch, usable KV blocks, token budget, cycling through values;
each release is set on the slider's Bokeh model, as the end of a drag does).
A thread polls `GET /status` at 10 Hz over the whole run; each answer's
latency is recorded with whether a drag phase was on. `/status` is served by
the same IO loop as every dashboard session, so a callback that waits on the
engine (as `reconfigure` did before issue 23) shows up directly as a slow
status answer. The peer is the same server in the same run before the drags
start (burst running, nobody dragging).

Everything stays on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from machine import cpu_name  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MOVES = [("max batch", v) for v in (3, 5, 2, 6, 4)] + [("usable KV blocks", v) for v in (40, 44, 36, 48, 42)] + \
        [("token budget per step", v) for v in (100, 700, 300, 512, 64)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def poll(url: str, stop: threading.Event, phase: list[str], out: list[tuple[str, float]], limit: int) -> None:
    """GET /status every 0.1 s until `stop` (at most `limit` times); record (phase, seconds)."""
    for _ in range(limit):
        if stop.is_set():
            return
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(url + "status", timeout=30) as r:
                r.read()
            out.append((phase[0], time.perf_counter() - t))
        except OSError:
            out.append((phase[0], float("inf")))
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - t)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long to drag")
    p.add_argument("--quiet-seconds", type=float, default=10.0, help="burst running, nobody dragging (the peer)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard_drag_latency"))
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = p.parse_args(argv)

    import bokeh
    import panel
    import torch
    from playwright.sync_api import sync_playwright

    import workbench
    from test_browser import CHROMIUM, CHROMIUM_ARGS, get_status, loopback_only, wait_until
    from workbench.ui.app import free_port

    if CHROMIUM is None:
        print("Debian's chromium is not installed", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = Path(tempfile.gettempdir()) / "dashboard_drag_latency.serve.log"  # not a result: kept out of results/
    log = log_path.open("w")
    serve = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "--no-show", "--port", str(port),
                              "--num-blocks", "48", "--max-batch", "2", "--max-new-tokens", "128"],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    samples: list[tuple[str, float]] = []
    phase = ["quiet"]
    stop = threading.Event()
    load_before = os.getloadavg()
    moves_done = 0
    try:
        def up():
            if serve.poll() is not None:
                raise RuntimeError(f"workbench serve exited: {log_path.read_text()[-2000:]}")
            try:
                return get_status(url)
            except OSError:
                return None

        wait_until(up, 180, "workbench serve", interval=0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1500, "height": 1150})
            external: list[str] = []
            loopback_only(context, external)
            page = context.new_page()
            page.set_default_timeout(90_000)
            page.goto(url)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name('kv-cells') !== null", timeout=90_000)
            size = page.locator(".wb-burst-size input")
            size.fill("12")
            size.press("Enter")
            page.get_by_role("button", name="Burst").click()
            wait_until(lambda: get_status(url)["stats"]["running"] > 0, 60, "the burst to run")
            poller = threading.Thread(target=poll, args=(url, stop, phase, samples,
                                                         int(10 * (args.seconds + args.quiet_seconds + 60))))
            poller.start()
            time.sleep(args.quiet_seconds)
            phase[0] = "dragging"
            # the releases run in the page on its own timer, so a slow round trip to Python does not thin them out
            page.evaluate("""([moves, ms]) => {
              window.wbMoves = 0;
              const sliders = {};
              for (const m of Bokeh.documents[0].all_models)
                if ("value_throttled" in m.properties) sliders[m.title] = m;
              const t0 = performance.now();
              const id = setInterval(() => {
                if (performance.now() - t0 > ms) { clearInterval(id); return }
                const [title, value] = moves[window.wbMoves % moves.length];
                const m = sliders[title]; m.value = value; m.value_throttled = value;
                window.wbMoves += 1;
              }, 250);
            }""", [MOVES, 1e3 * args.seconds])
            time.sleep(args.seconds + 0.5)
            moves_done = page.evaluate("() => window.wbMoves")
            phase[0] = "after"
            busy_at_end = get_status(url)["stats"]
            last = {}
            for i in range(moves_done):
                title, value = MOVES[i % len(MOVES)]
                last[title] = value
            time.sleep(2.0)
            stop.set()
            poller.join()
            final = get_status(url)
            browser.close()
            if external:
                raise RuntimeError(f"the page asked for non-loopback resources: {external}")
    finally:
        stop.set()
        serve.terminate()
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()

    def stats(name: str) -> dict:
        xs = [1e3 * s for ph, s in samples if ph == name]
        return {"n": len(xs), "median_ms": statistics.median(xs), "p99_ms": percentile(xs, 0.99),
                "max_ms": max(xs)} if xs else {"n": 0}

    summary = {
        "date": args.date,
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs)",
        "command": "python bench/dashboard_drag_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "panel": panel.__version__,
                     "bokeh": bokeh.__version__, "workbench": workbench.__version__,
                     "chromium": subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()},
        "setup": "workbench serve --num-blocks 48 --max-batch 2 --max-new-tokens 128; Burst x12; "
                 "a slider release every 0.25 s; GET /status at 10 Hz",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "moves": moves_done, "quiet": stats("quiet"), "dragging": stats("dragging"),
        "final_config": final["config"], "last_moves": last,
        "running_waiting_when_drags_ended": [busy_at_end["running"], busy_at_end["waiting"]],
        "target": {"median_ms": 100, "p99_ms": 500},
    }
    d = summary["dragging"]
    summary["meets_target"] = bool(d["n"]) and d["median_ms"] < 100 and d["p99_ms"] < 500
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"/status while dragging: median {d['median_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms "
          f"over {d['n']} polls and {moves_done} releases; quiet (same burst, no drags): median "
          f"{summary['quiet']['median_ms']:.1f} ms, p99 {summary['quiet']['p99_ms']:.1f} ms; wrote {out}")
    return 0 if summary["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
