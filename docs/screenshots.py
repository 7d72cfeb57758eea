"""Take the dashboard screenshots of docs/dashboard.md from the served app, in Debian's Chromium.

    .venv/bin/python docs/screenshots.py [--out docs/img]

Starts `python -m workbench serve` on a free loopback port, opens it with Playwright (the system's
`chromium`, loopback only), presses Burst, waits for the plots to fill, and saves the whole page plus
one picture per panel. The panels are found by their Bokeh canvases in layout order (counters,
then batch slots | KV blocks, requests over time, step times | CPU/GPU spans), so a changed layout
shows up as misnamed pictures: look at them before committing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]
log = logging.getLogger("screenshots")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def canvases(page) -> list[dict]:
    """Bounding boxes of the page's plot canvases (through shadow roots), largest per position."""
    boxes = page.evaluate("""() => {
      const out = [];
      const walk = (root) => {
        for (const el of root.querySelectorAll('*')) {
          if (el.tagName === 'CANVAS') {
            const r = el.getBoundingClientRect();
            if (r.width > 150 && r.height > 80) out.push({x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height});
          }
          if (el.shadowRoot) walk(el.shadowRoot);
        }
      };
      walk(document);
      return out;
    }""")
    unique: dict[tuple[int, int], dict] = {}
    for b in boxes:
        key = (round(b["x"]), round(b["y"]))
        if key not in unique or b["w"] * b["h"] > unique[key]["w"] * unique[key]["h"]:
            unique[key] = b
    return sorted(unique.values(), key=lambda b: (round(b["y"] / 20), b["x"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--wait", type=float, default=4.0, help="seconds between Burst and the screenshots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "--no-show", "--port", str(port),
                               "--max-batch", "4", "--num-blocks", "64", "--token-budget", "128",
                               "--max-new-tokens", "96"], cwd=ROOT)
    try:
        wait_for(url + "status", 300)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1250}, device_scale_factor=1)
            page.set_default_timeout(180_000)  # a loaded 2-core machine renders slowly
            page.route("**/*", lambda r: r.continue_() if "127.0.0.1" in r.request.url else r.abort())
            page.goto(url)
            page.get_by_role("button", name="Burst").wait_for(timeout=120_000)
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Burst").click()
            page.wait_for_timeout(500)
            page.get_by_role("button", name="Burst").click()  # two bursts: a queue behind a full batch
            page.mouse.move(1490, 5)  # no tooltip over the controls
            page.wait_for_timeout(args.wait * 1000)
            page.screenshot(path=args.out / "dashboard-served.png", timeout=180_000,  # the top: plots and the first cards
                            clip={"x": 0, "y": 0, "width": 1500, "height": 980}, full_page=True)
            boxes = canvases(page)
            names = ["slots", "kv", "timeline", "steps", "spans"]
            log.info("found %d plot canvases: %s", len(boxes), boxes)
            for name, b in zip(names, boxes):
                page.screenshot(path=args.out / f"panel-{name}.png",
                                clip={"x": b["x"], "y": b["y"], "width": b["w"], "height": b["h"]}, full_page=True)
            if boxes:
                top = boxes[0]
                page.screenshot(path=args.out / "panel-counters.png", full_page=True,
                                clip={"x": top["x"], "y": max(0, top["y"] - 56), "width": 1500 - top["x"] - 10, "height": 54})
                page.screenshot(path=args.out / "panel-controls.png", full_page=True,
                                clip={"x": 0, "y": max(0, top["y"] - 56), "width": max(200, top["x"] - 5), "height": 880})
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
