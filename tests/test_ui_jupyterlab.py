"""The Dashboard in a JupyterLab cell: a real `jupyter lab` on loopback, Debian's Chromium, no network.

One cell builds an engine and displays a Dashboard; once its plots have
rendered and the cell has finished, the test presses Burst (so the burst cannot
be over before the view is up, as it could be on a loaded 2-core machine) and
checks that the burst reaches the engine, that the KV grid's updates carry its
requests' blocks (watched in the page: the burst can be over in seconds), that
the plots keep changing (the notebook's periodic callback drains telemetry and
pushes over the comm), that output cards stream, and that nothing is fetched
from outside loopback (`pn.extension(inline=True)`). A failure reports the
cell's output, the browser console and jupyter lab's log. The screenshot goes to
the tmp dir; with WORKBENCH_DOCS_SCREENSHOT=1 it also replaces
docs/dashboard-jupyterlab.png.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, kv_owners_seen, loopback_only, wait_until, watch_kv_grid

ROOT = Path(__file__).absolute().parents[1]
DOCS = os.environ.get("WORKBENCH_DOCS_SCREENSHOT") == "1"
CELLS = [  # no pn.extension() cell: displaying a Dashboard loads Panel's extension inline itself
    "import workbench\nfrom workbench.ui import Dashboard\n\n"
    "engine = workbench.Engine(max_batch=4, num_blocks=96)\n"
    "dash = Dashboard(engine, max_new_tokens=64)\n"
    "dash",
]

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"),
              pytest.mark.slow]


@pytest.fixture
def jupyter_lab(tmp_path):
    """`jupyter lab` on a free loopback port, token off, its own config/runtime/workspace dirs; yields its URL."""
    import nbformat

    from workbench.ui.app import free_port

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / "dashboard.ipynb")
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
         f"--ServerApp.root_dir={tmp_path / 'nb'}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {proc.returncode}:\n{(tmp_path / 'lab.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "api/status", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(up, 120, "jupyter lab to answer", interval=0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernel it started (its own session)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def output_text(page) -> str:
    """What the notebook shows under its cells (errors, log lines, the dashboard's own alerts), for a failure."""
    try:
        return "\n".join(page.locator(".jp-Notebook .jp-OutputArea-output").all_inner_texts())[-3000:]
    except Exception as e:  # the page itself may be what broke
        return f"(unreadable: {e})"


def test_dashboard_in_a_jupyterlab_cell(jupyter_lab, tmp_path):
    from playwright.sync_api import sync_playwright

    external, errors = [], []
    js = ("name => { for (const d of Bokeh.documents) { const m = d.get_model_by_name(name); if (m) return m.data }"
          " return null }")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1300})

            loopback_only(context, external)
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(jupyter_lab + "lab/tree/dashboard.ipynb?reset")
            cells = page.locator(".jp-Notebook .jp-Cell:visible")
            wait_until(lambda: cells.count() == len(CELLS), 90, "the notebook to open")
            status = page.locator(".jp-StatusBar-TextItem", has_text="Idle")
            wait_until(lambda: status.count() > 0, 90, "the kernel to be idle")
            no = page.get_by_role("button", name="No", exact=True)  # the news question, if JupyterLab asks it
            if no.count():
                no.first.click()
            browser_tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
            if browser_tab.count():
                browser_tab.first.click()  # fold the file browser away: more room for the dashboard
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            output = cells.nth(0).locator(".jp-OutputArea")
            wait_until(lambda: output.locator(".bk-Figure").count() == 5, 120, "the dashboard's five plots")
            running = output.locator('[data-testid="counter-running"]')
            ended = output.locator('[data-testid="counter-ended"]')
            wait_until(lambda: status.count() > 0 and running.count() == 1, 120, "the cell to finish and counters")
            watch_kv_grid(page)  # every update of the grid counts, however brief its owners are
            page.mouse.move(5, 5)
            output.get_by_role("button", name="Burst").click()  # six varied prompts at once
            page.evaluate("el => el.scrollIntoView({block: 'start'})", cells.nth(0).element_handle())
            seen = lambda: int(running.inner_text()) + int(ended.inner_text()) > 0  # noqa: E731
            if DOCS:  # for the README: mid-burst, some requests done and the batch still full
                wait_until(lambda: int(ended.inner_text()) >= 1 and int(running.inner_text()) >= 3, 180,
                           "a mid-burst moment", interval=0.1)
            else:  # the burst reached the engine, and its requests held KV blocks in the grid's updates
                wait_until(seen, 90, "the burst's requests in the counters", interval=0.1)
                wait_until(lambda: kv_owners_seen(page) > 0, 90,
                           "requests' blocks in the KV grid", interval=0.1)
            shot = tmp_path / "dashboard-jupyterlab.png"
            page.screenshot(path=str(shot))
            # the notebook's periodic drain keeps the view moving and the text streaming
            wait_until(lambda: len(page.evaluate(js, "slot-cells")["step"]) >= 40, 120, "the slot heatmap to fill")
            text = output.locator('[data-rid="req-0"] [data-testid="output-text"]')
            wait_until(lambda: text.count() == 1 and len(text.inner_text()) > 10, 60, "req-0's text to stream")
            # every (step, slot) cell once: the frontend's echo of a stream must not come back as new rows
            cells_js = page.evaluate(js, "slot-cells")
            pairs = list(zip(cells_js["step"], cells_js["slot"]))
            assert len(set(pairs)) == len(pairs), "slot heatmap rows were duplicated"
        except AssertionError as e:
            page.screenshot(path=str(tmp_path / "failure.png"))
            (tmp_path / "console.txt").write_text("\n".join(console))
            raise AssertionError(f"{e}\n--- the cell's output ---\n{output_text(page)}\n--- browser console ---\n"
                                 + "\n".join(console[-20:]) + "\n--- jupyter lab's log ---\n"
                                 + (tmp_path / "lab.log").read_text()[-3000:]) from e
        finally:
            browser.close()
    if DOCS:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "dashboard-jupyterlab.png")
    assert not external, f"the notebook asked for non-loopback resources: {external}"
    assert not errors, f"console errors: {errors}"
