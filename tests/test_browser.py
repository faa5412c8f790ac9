"""Notebook 01 in a real browser: JupyterLab headless, Chromium driven by Playwright.

Runs every cell of ``notebooks/01_quickstart.ipynb`` through JupyterLab's own menu, waits until
the plotly figures and the widgets have rendered, saves ``reports/browser_01_quickstart.png``,
then moves the budget slider and checks that the live panel re-ran. Skips where Chromium
(Debian's ``chromium``; ``.ci/run`` installs it when apt can) or Playwright is missing; Playwright
drives the system browser, it never downloads one. The notebook file is never written: autosave
is off in a throwaway settings folder, and its bytes are checked afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
SCREENSHOT = ROOT / "reports" / "browser_01_quickstart.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """JupyterLab settings for the test: no autosave (the notebook stays as committed), no news."""
    files = {"@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
             "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                                 "checkForUpdates": False}}
    for name, value in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@contextmanager
def _jupyter_lab(root: Path, tmp_path: Path):
    """``jupyter lab`` on a free port with a random token, serving ``root``; yields (url, token)."""
    port, token = _free_port(), secrets.token_hex(16)
    _settings(tmp_path / "settings")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--notebook-dir={root}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = tmp_path / "jupyter.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"jupyter lab did not start: {log_path.read_text()[-2000:]}")
                    time.sleep(0.5)
            yield url, token
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()


def _browser(p, tmp_path: Path):
    return p.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
        viewport={"width": 1400, "height": 1800}, args=CHROMIUM_FLAGS)


def _menu(page, *names: str) -> None:
    """Click through JupyterLab's menu bar, e.g. Run > Run All Cells."""
    for name in names:
        page.locator(".lm-MenuBar-itemLabel, .lm-Menu-itemLabel").filter(
            has_text=re.compile(f"^{re.escape(name)}$")).first.click()


ALL_RAN = """n => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                              .map(e => e.textContent.trim());
                   return p.length === n && p.every(t => /^\\[\\d+\\]:$/.test(t)); }"""


def _open_and_run_all(page, url: str, token: str, path: str, code_cells: int) -> None:
    page.goto(f"{url}/lab/tree/{path}?token={token}", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    # the kernel is up when the status bar says Idle
    page.wait_for_function("() => document.body.innerText.includes('Idle')", timeout=120_000)
    _menu(page, "Run", "Run All Cells")
    # every code cell has run when each prompt shows a number (a running cell shows [*])
    page.wait_for_function(ALL_RAN, arg=code_cells, timeout=300_000)


def test_quickstart_runs_and_renders_in_jupyterlab(tmp_path):
    before = hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest()
    code_cells = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
    with _jupyter_lab(ROOT, tmp_path) as (url, token), playwright.sync_playwright() as p:
        browser = _browser(p, tmp_path)
        try:
            page = browser.new_page()
            _open_and_run_all(page, url, token, f"notebooks/{NOTEBOOK.name}", code_cells)
            page.wait_for_selector(".js-plotly-plot .main-svg", state="attached", timeout=60_000)
            page.wait_for_selector(".jupyter-widgets .widget-slider", state="attached", timeout=60_000)
            text = page.locator(".jp-Notebook").inner_text()
            assert "Traceback" not in text
            assert "same tokens as all-resident: True" in text
            plots = page.locator(".js-plotly-plot").count()
            sliders = page.locator(".jupyter-widgets .widget-slider").count()
            assert plots >= 2 and sliders >= 3, (plots, sliders)   # the timeline, the live panel's; its sliders

            panel = page.locator(".jupyter-widgets .widget-slider").first
            panel.scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))

            # live: one step down on the slots slider re-runs the generation with 15 slots
            panel.locator(".noUi-handle").first.focus()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("() => document.body.innerText.includes('15 of 64')", timeout=120_000)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    assert hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest() == before, "the browser session wrote the notebook"


LIVE_NOTEBOOK = [
    "from lab.widgets import Knobs, budget_slider\nimport plotly.graph_objects as go\n"
    "knobs = Knobs(slots=budget_slider(4))\nknobs",
    "knobs.live(lambda slots: (f'**{slots} slots**', go.Figure(go.Bar(x=list(range(slots)), y=[1] * slots),\n"
    "                                                        layout=dict(title=f'{slots} bars'))))",
]


def test_lab_live_outputs_redraw_in_place(tmp_path):
    """``Knobs.live``'s outputs (plain displays with a display id) are replaced in JupyterLab when a
    knob moves, the plotly figure included."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    folder = tmp_path / "nb"
    folder.mkdir()
    nb = new_notebook(cells=[new_code_cell(src) for src in LIVE_NOTEBOOK])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "live.ipynb")
    with _jupyter_lab(folder, tmp_path) as (url, token), playwright.sync_playwright() as p:
        browser = _browser(p, tmp_path)
        try:
            page = browser.new_page()
            _open_and_run_all(page, url, token, "live.ipynb", len(LIVE_NOTEBOOK))
            page.wait_for_selector(".js-plotly-plot .gtitle", state="attached", timeout=60_000)
            assert page.locator(".js-plotly-plot .gtitle").text_content() == "4 bars"
            page.locator(".widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                                   ".some(e => e.textContent === '5 bars')", timeout=60_000)
            assert page.locator(".js-plotly-plot").count() == 1      # replaced, not added
            assert "5 slots" in page.locator(".jp-OutputArea").last.inner_text()
        finally:
            browser.close()


OFFLINE_NOTEBOOK = [
    "import ipywidgets as widgets\nimport plotly.graph_objects as go\nfrom IPython.display import display\n"
    "display(widgets.IntSlider(value=7, min=0, max=10, description='slots'),\n"
    "        widgets.Dropdown(options=['duoserve', 'lru'], value='lru', description='policy'))\n"
    "go.Figure(go.Bar(x=[1, 2, 3], y=[3, 1, 2]), layout=dict(title='offline bars'))",
]


def test_html_report_renders_its_widgets_and_figures_offline(tmp_path):
    """A report of ``lab.notebook_runner`` opened from disk with every request off this file refused:
    the slider and the dropdown render at their saved values and the plotly figure draws, from what
    the HTML carries (the widget renderer and plotly.js inlined). No script is asked of a CDN, MathJax
    included (nothing here writes TeX: a formula in markdown stays as its source text)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from lab.notebook_runner import run_notebook

    nb = new_notebook(cells=[new_code_cell(src) for src in OFFLINE_NOTEBOOK])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "00_offline.ipynb")
    run = run_notebook(tmp_path / "00_offline.ipynb", tmp_path / "out")
    assert run.ok, run.error
    html = run.html.read_text()
    # nbconvert's lab template asks cdnjs for require.js and MathJax unless told otherwise
    assert not re.findall(r"""<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", html, re.I)

    refused = []

    def offline(route):
        if route.request.url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    with playwright.sync_playwright() as p:
        browser = _browser(p, tmp_path)
        try:
            browser.route("**/*", offline)
            page = browser.new_page()
            page.goto(run.html.as_uri())
            page.wait_for_selector(".widget-slider .noUi-handle", timeout=60_000)
            page.wait_for_selector(".widget-dropdown select", timeout=60_000)
            page.wait_for_selector(".js-plotly-plot .main-svg", state="attached", timeout=60_000)
            assert page.locator(".widget-slider .widget-readout").first.inner_text().strip() == "7"
            assert page.locator(".widget-dropdown select").first.input_value() == "lru"
            assert page.locator(".js-plotly-plot .gtitle").first.text_content() == "offline bars"
        finally:
            browser.close()
    assert not refused, refused
