"""The widget in a real browser: JupyterLab + headless Chromium (Playwright).

Runs ``tests/browser/widget_demo.ipynb`` in JupyterLab, waits for the plotly
figure, then changes the method dropdown and drags the opacity slider with the
mouse, and checks that the plot's data and its pixels changed. Screenshots go
to ``test-artifacts/browser/``. Skipped only when no Chromium is installed
(``apt-get install chromium``); Playwright never downloads a browser here.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tests" / "browser" / "widget_demo.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium"),
]

# the figure's first heatmap trace, as plotly.js holds it in the page
HEATMAP = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
      g => g.data && g.data.some(t => t.type === 'heatmap'));
  if (!gd || !gd.querySelector('.heatmaplayer image')) return null;
  const t = gd.data.find(t => t.type === 'heatmap');
  if (!t.z) return null;
  const z = Array.from(t.z, row => Array.from(row));
  return {z: z, opacity: t.opacity, sum: z.flat().reduce((a, b) => a + Math.abs(b), 0)};
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[str]:
    """A JupyterLab server (no token) serving a copy of the demo notebook."""
    home = tmp_path_factory.mktemp("lab")
    root = home / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           # keep the user's Jupyter settings and runtime files out of it
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ip")}
    # no "get notified about Jupyter news?" toast over the widget
    notification = home / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port = free_port()
    log = open(home / "lab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
         "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/status", proc, timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(home / "lab.log", ARTIFACTS / "lab.log")


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def control(page, kind: str, label: str):
    """The ipywidgets control of ``kind`` (dropdown, hslider) whose description is ``label``."""
    return page.locator(f".widget-{kind}:has(> label:text-is('{label}'))").first


@pytest.mark.timeout(240)
def test_widget_renders_and_reacts_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab}/lab/tree/{NOTEBOOK.name}")
            # the notebook is open and its kernel is ready
            page.wait_for_function(
                "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session &&"
                " w.sessionContext.session.kernel &&"
                " w.sessionContext.session.kernel.connectionStatus === 'connected'; }",
                timeout=60_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            first = page.wait_for_function(HEATMAP, timeout=90_000).json_value()
            plot = page.locator(".js-plotly-plot").first
            plot.scroll_into_view_if_needed()
            page.wait_for_timeout(500)  # let plotly finish drawing
            page.screenshot(path=ARTIFACTS / "0_page.png")
            before = plot.screenshot(path=ARTIFACTS / "1_gradcam.png")
            assert np.asarray(first["z"]).shape == (64, 64)

            # the method dropdown: a new map is computed in the kernel and drawn
            control(page, "dropdown", "method").locator("select").select_option("fem")
            page.wait_for_function(
                f"() => {{ const h = ({HEATMAP})(); return h && "
                f"Math.abs(h.sum - {first['sum']!r}) > 1e-6; }}", timeout=30_000)
            page.wait_for_timeout(500)
            after_method = plot.screenshot(path=ARTIFACTS / "2_fem.png")
            assert control(page, "hslider", "K").is_visible()      # fem's parameter appears
            assert not control(page, "dropdown", "layer").is_hidden()
            second = page.evaluate(HEATMAP)
            assert np.abs(np.asarray(second["z"]) - np.asarray(first["z"])).max() > 0.05
            assert np.abs(pixels(after_method) - pixels(before)).mean() > 1.0

            # drag the opacity slider's handle to the far left with the mouse
            slider = control(page, "hslider", "opacity")
            handle = slider.locator(".noUi-handle").first
            track = slider.locator(".noUi-target, .slider-container").first.bounding_box()
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] - 20, box["y"] + box["height"] / 2, steps=8)
            page.mouse.up()
            page.wait_for_function(
                f"() => {{ const h = ({HEATMAP})(); return h && h.opacity < 0.1; }}",
                timeout=30_000)
            page.wait_for_timeout(500)
            faded = plot.screenshot(path=ARTIFACTS / "3_opacity0.png")
            third = page.evaluate(HEATMAP)
            assert third["z"] == second["z"]  # a restyle: the map itself is unchanged
            assert np.abs(pixels(faded) - pixels(after_method)).mean() > 1.0
            page.screenshot(path=ARTIFACTS / "4_page_end.png")
        finally:
            browser.close()

