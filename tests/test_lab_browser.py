"""The dashboard's Load view in real Chromium (Debian's, driven by Playwright; loopback only): start a load,
watch the tiles fill, move the max-batch slider while it runs, see the tiles follow, stop it; no console errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, loopback_only, wait_until

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture
def load_view_server(tmp_path):
    from workbench.ui.app import free_port

    port = free_port()
    log = (tmp_path / "load_view.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench", "serve", "--port", str(port), "--no-show", "--num-blocks", "64",
         "--max-batch", "2", "--token-budget", "64"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/load"  # the dashboard's Load view, on the served engine

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the load view exited with {proc.returncode}:\n"
                                 f"{(tmp_path / 'load_view.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(up, 240, "the load view to answer", interval=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_load_view_in_chromium(load_view_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url = load_view_server
    external, failed, errors = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1300})
            loopback_only(context, external)
            page = context.new_page()
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name('load-gantt') !== null", timeout=60_000)
            tile = lambda key: page.locator(f'[data-testid="tile-{key}"]')  # noqa: E731
            wait_until(lambda: tile("state").count() == 1, 30, "the tiles")
            assert tile("state").inner_text() == "idle" and tile("max_batch").inner_text() == "2"
            assert tile("itl_p99").inner_text() == "-"

            # ---- start a load: the tiles fill from what the engine measures
            page.get_by_role("button", name="Start load").click()
            wait_until(lambda: tile("state").inner_text() == "running", 30, "the load to start")
            wait_until(lambda: int(tile("completed").inner_text()) >= 2 and tile("itl_p50").inner_text() != "-",
                       180, "two completed requests and an ITL in the tiles")
            assert tile("ttft_p50").inner_text().endswith(" ms")
            gantt = page.evaluate("() => Bokeh.documents[0].get_model_by_name('load-gantt').data.phase")
            assert {"queued", "decode"} <= set(gantt)
            done_before = int(tile("completed").inner_text())

            # ---- move the max-batch slider during the load: the engine and the tiles follow within seconds
            handle = page.locator(".bk-input-group", has_text="max batch").locator(".noUi-handle")
            assert handle.count() == 1
            handle.focus()
            handle.press("ArrowRight")
            wait_until(lambda: tile("max_batch").inner_text() == "3", 15, "the max batch tile to show 3")
            wait_until(lambda: int(tile("completed").inner_text()) > done_before, 120, "more requests to complete")

            # ---- stop: in-flight requests are cancelled and counted
            page.get_by_role("button", name="Stop").click()
            wait_until(lambda: tile("state").inner_text() == "stopped", 60, "the load to stop")
            wait_until(lambda: tile("in_flight").inner_text() == "0", 30, "nothing left in flight")
            page.mouse.move(0, 0)
            page.wait_for_timeout(600)
            shot = tmp_path / "load_view.png"
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    if os.environ.get("WORKBENCH_ARTIFACTS"):
        out = Path(os.environ["WORKBENCH_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "load_view_browser.png")
    assert shot.stat().st_size > 30_000
    assert not external, f"the page asked for non-loopback resources: {external}"
    assert not failed, f"requests failed: {failed}"
    assert not errors, f"console errors: {errors}"
