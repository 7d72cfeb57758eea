"""`workbench serve` in a real browser: Debian's Chromium driven by Playwright, no network beyond loopback.

Submits a prompt and watches its text stream, the KV grid and the slot heatmap
change (both in what BokehJS holds and in the pixels it draws), moves the
max-batch slider and reads the engine's config back from the page and from
`/status`. The screenshot goes to the test's tmp dir, and also to
$WORKBENCH_ARTIFACTS when that names a directory (a CI artifact folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).absolute().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
LOOPBACK = {"127.0.0.1", "localhost"}

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def get_status(url: str) -> dict:
    with urllib.request.urlopen(url + "status", timeout=5) as r:
        return json.load(r)


def loopback_only(context, external: list[str]) -> None:
    """Let the browser reach nothing but loopback: a CDN request is recorded in `external` and refused."""
    def route(r):
        if urlparse(r.request.url).hostname in LOOPBACK:
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    context.route("**/*", route)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def watch_kv_grid(page) -> None:
    """Keep, in the page, the most distinct owners any update of the KV grid carried.

    A burst can be over in a few seconds on a fast machine, so polling the grid's
    current state could fall between its updates every time; the page sees them all.
    """
    page.evaluate("""() => {
      window.wbKvOwners = 0;
      for (const d of Bokeh.documents) {
        const m = d.get_model_by_name("kv-cells");
        if (!m) continue;
        const owners = () => new Set(m.data.owner.filter(o => o)).size;
        const note = () => { window.wbKvOwners = Math.max(window.wbKvOwners, owners()) };
        m.patching.connect(note); m.streaming.connect(note); m.change.connect(note);
      }
    }""")


def kv_owners_seen(page) -> int:
    return page.evaluate("() => window.wbKvOwners")


@pytest.fixture
def server(tmp_path):
    """`python -m workbench serve` on a free loopback port; yields its URL."""
    from workbench.ui.app import free_port

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench", "serve", "--no-show", "--port", str(port), "--num-blocks", "48",
         "--max-batch", "2", "--max-new-tokens", "64"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"workbench serve exited with {proc.returncode}:\n"
                                 f"{(tmp_path / 'serve.log').read_text()[-3000:]}")
        try:
            return get_status(url)
        except OSError:
            return None

    try:
        wait_until(up, 180, "workbench serve to answer /status", interval=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_dashboard_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url = server
    assert get_status(url)["config"]["max_batch"] == 2
    external, failed, errors, scripts = [], [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1150})

            loopback_only(context, external)
            page = context.new_page()
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("response", lambda r: scripts.append((r.url, r.status)) if r.url.split("?")[0].endswith(".js")
                    else None)
            page.goto(url)
            js = "name => { const m = Bokeh.documents[0].get_model_by_name(name); return m ? m.data : null }"
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name('kv-cells') !== null", timeout=60_000)
            assert page.title() == "cb-workbench dashboard"
            figures = page.locator(".bk-Figure")
            assert figures.count() == 5  # slots, KV, timeline, per-step ms, host/compute lanes
            kv_before = page.evaluate(js, "kv-cells")
            assert len(kv_before["owner"]) == 48 and not any(kv_before["owner"])
            assert len(page.evaluate(js, "slot-cells")["step"]) == 0
            slots_png, kv_png = figures.nth(0).screenshot(), figures.nth(1).screenshot()

            # ---- submit a prompt; its text must grow in the page while the plots fill
            page.locator("textarea").fill("Tell me about whales and the songs they sing.")
            page.get_by_role("button", name="Submit").click()
            text = page.locator('[data-rid="req-0"] [data-testid="output-text"]')
            state = page.locator('[data-rid="req-0"] [data-testid="state"]')
            wait_until(lambda: text.count() == 1, 30, "an output pane for req-0")
            lengths, owners_seen, slot_counts = [], set(), []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                lengths.append(len(text.inner_text()))
                owners_seen |= set(page.evaluate(js, "kv-cells")["owner"])
                slot_counts.append(len(page.evaluate(js, "slot-cells")["step"]))
                if state.inner_text() != "streaming":
                    break
                page.wait_for_timeout(150)
            assert state.inner_text() in ("length", "stop"), state.inner_text()
            grew = sorted(set(lengths))
            assert len(grew) >= 3 and grew[-1] > 0, f"streamed text did not grow step by step: {lengths}"
            assert "req-0" in owners_seen, "the KV grid never showed req-0's blocks"
            assert slot_counts[-1] > slot_counts[0] >= 0 and slot_counts[-1] >= 10
            slot_data = page.evaluate(js, "slot-cells")
            assert set(slot_data["request_id"]) == {"req-0"} and "decode" in slot_data["kind"]
            assert figures.nth(0).screenshot() != slots_png, "the slot heatmap's pixels never changed"

            # ---- the max-batch slider reaches the engine, and the page shows the engine's new config
            handle = page.locator(".bk-input-group", has_text="max batch").locator(".noUi-handle")
            if handle.count() != 1:
                handle = page.locator(".noUi-handle").nth(1)  # sliders: max new tokens, max batch, ...
            handle.focus()
            handle.press("ArrowRight")
            wait_until(lambda: get_status(url)["config"]["max_batch"] == 3, 30, "the engine's max_batch to become 3")
            readout = page.locator('[data-testid="cfg-max_batch"]')
            wait_until(lambda: readout.inner_text() == "3", 30, "the config readout to show max_batch=3")

            # ---- a burst: three run at once now, and the grid holds several owners
            watch_kv_grid(page)
            page.get_by_role("button", name="Burst").click()
            wait_until(lambda: kv_owners_seen(page) >= 2, 60, "two requests' blocks in the KV grid at once")
            assert figures.nth(1).screenshot() != kv_png, "the KV grid's pixels never changed"
            wait_until(lambda: max(page.evaluate(js, "slot-cells")["slot"]) == 2, 90,
                       "a step with three requests in the batch (slots 0, 1, 2)")
            page.mouse.move(0, 0)
            page.wait_for_timeout(500)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    if os.environ.get("WORKBENCH_ARTIFACTS"):
        out = Path(os.environ["WORKBENCH_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "dashboard_browser.png")
    assert shot.stat().st_size > 50_000
    assert not external, f"the page asked for non-loopback resources: {external}"
    assert not failed, f"requests failed: {failed}"
    assert not errors, f"console errors: {errors}"
    bokeh_js = [(u, s) for u, s in scripts if "/static/js/bokeh.min.js" in u]
    assert bokeh_js and all(urlparse(u).hostname in LOOPBACK and s == 200 for u, s in bokeh_js), scripts


def slider_values(page) -> dict[str, int]:
    """What the page's config sliders show (the Bokeh models behind them)."""
    return page.evaluate("""() => {
      const out = {};
      const titles = {"max batch": "max_batch", "usable KV blocks": "num_blocks", "token budget per step": "token_budget"};
      for (const m of Bokeh.documents[0].all_models) {
        if (m.title in titles && typeof m.value === "number") out[titles[m.title]] = m.value;
      }
      return out;
    }""")


def release_at(page, title: str, value: int) -> None:
    """What letting go of a slider does in the page: its Bokeh model's value, then value_throttled, change.

    Set on the model (as noUiSlider's end-of-drag handler does) rather than by synthetic mouse or key
    events: on a loaded 2-core machine those take seconds each to dispatch, and the burst would end first.
    """
    page.evaluate("""([title, value]) => {
      for (const m of Bokeh.documents[0].all_models) {
        if (m.title === title && "value_throttled" in m.properties) { m.value = value; m.value_throttled = value; return }
      }
      throw new Error("no slider titled " + title);
    }""", [title, value])


def test_rapid_drags_during_a_burst_end_with_widgets_readout_and_engine_equal(server, tmp_path):
    """Issue 23's second finding: after quick drags of three sliders mid-burst, all three views agree."""
    from playwright.sync_api import sync_playwright

    url = server
    keys = ("max_batch", "num_blocks", "token_budget")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1150})
            external: list[str] = []
            loopback_only(context, external)
            page = context.new_page()
            page.set_default_timeout(90_000)  # a loaded 2-core machine can stall the page for seconds
            page.goto(url)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents[0].get_model_by_name('kv-cells') !== null", timeout=60_000)
            release_at(page, "max new tokens", 256)  # long requests: the burst outlasts the moves
            size = page.locator(".wb-burst-size input")
            size.fill("12")
            size.press("Enter")
            wait_until(lambda: size.input_value() == "12", 10, "the burst size to read 12")
            page.get_by_role("button", name="Burst").click()
            running = page.locator('[data-testid="counter-running"]')
            wait_until(lambda: running.inner_text() not in ("", "0"), 60, "the burst to start running")
            moves = [("max batch", 5), ("usable KV blocks", 40), ("token budget per step", 100), ("max batch", 3),
                     ("usable KV blocks", 44), ("token budget per step", 700), ("max batch", 6),
                     ("usable KV blocks", 36), ("token budget per step", 300)]
            during = [get_status(url)["stats"]]
            for title, value in moves:  # nine releases, no pauses
                release_at(page, title, value)
            cards = page.locator('[data-testid="state"]')
            # twelve live requests, twelve cards (the old view kept the newest 8 and dropped running ones)
            wait_until(lambda: cards.count() == 12, 30, "twelve cards, one per burst request")
            states = {cards.nth(i).inner_text() for i in range(cards.count())}
            pending = page.locator('[data-testid="cfg-pending"]')
            wait_until(lambda: pending.count() == 0, 120, "the posted config to be applied")

            def agree():
                engine = {k: get_status(url)["config"][k] for k in keys}
                readout = {k: int(page.locator(f'[data-testid="cfg-{k}"]').inner_text()) for k in keys}
                widgets = slider_values(page)
                return (engine, readout, widgets) if engine == readout == widgets else None

            engine, readout, widgets = wait_until(agree, 30, "sliders, readout and engine config to agree")
            # the moves came mid-burst, and the last of each won
            assert during[0]["running"] + during[0]["waiting"] > 0, during
            assert engine == {"max_batch": 6, "num_blocks": 36, "token_budget": 300}, engine
            # still agreeing a few ticks later (no late sync moves a widget back)
            page.wait_for_timeout(1000)
            assert agree() is not None
            assert states <= {"queued", "streaming", "preempted", "length", "stop"}, states
            assert page.locator('[data-testid="state"]', has_text="error").count() == 0
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert not external, external
