"""What the browser tests share: the Jupyter servers (JupyterLab 4, Notebook 7, Voilà)
as module fixtures (``lab``, ``notebook7``, ``voila``) and :func:`serve`, headless
Chromium (the ``chromium`` fixture: Playwright driving Debian's ``chromium``, never a
downloaded browser), the ``@browser`` mark, pages (:func:`open_page`,
:func:`run_notebook`), plotly's heatmap as the page holds it (``HEATMAP``), pixels and
drawn-figure checks. Screenshots and server logs go to ``ARTIFACTS``.

Example: ``from tests.browser_support import browser, chromium, open_page  # noqa: F401``
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tests" / "browser" / "widget_demo.ipynb"
VIDEO = ROOT / "tests" / "browser" / "video_demo.ipynb"
APP = ROOT / "notebooks" / "app.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
WIDTHS = (1400, 900)



def browser(test):
    """Marks of the tests that drive Chromium (slow; skipped without a chromium)."""
    for mark in (pytest.mark.browser, pytest.mark.slow,
                 pytest.mark.skipif(CHROMIUM is None,
                                    reason="no chromium on PATH: apt-get install chromium")):
        test = mark(test)
    return test


# the first *visible* figure's first heatmap trace with values, as plotly.js holds it
HEATMAP = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
      g => g.offsetParent !== null && g.data && g.data.some(t => t.type === 'heatmap' && t.z));
  if (!gd || !gd.querySelector('.heatmaplayer image')) return null;
  const t = gd.data.find(t => t.type === 'heatmap' && t.z);
  const z = Array.from(t.z, row => Array.from(row));
  return {z: z, opacity: t.opacity, sum: z.flat().reduce((a, b) => a + Math.abs(b), 0)};
}"""

# every visible widget part that sticks out of a clipping box or the window, or whose
# own text is cut; [] when nothing is clipped
CLIPPED = """() => {
  const parts = '.widget-inline-hbox, .jupyter-button, .widget-upload, .widget-readout,'
    + ' .widget-label, .widget-html, .widget-tab .lm-TabBar-tab, .js-plotly-plot';
  const name = e => (e.className.toString().split(' ').filter(c => c.startsWith('widget')
    || c.startsWith('js-') || c.startsWith('jupyter') || c.startsWith('lm-')).join('.')
    || e.tagName) + ' "' + (e.innerText || '').trim().slice(0, 30) + '"';
  const found = [];
  for (const el of document.querySelectorAll(parts)) {
    if (!el.closest('.jupyter-widgets') || el.offsetParent === null) continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const text = el.matches('.jupyter-button, .widget-readout, .widget-label, .lm-TabBar-tab');
    if (text && el.scrollWidth > el.clientWidth + 1) {
      found.push(name(el) + ': text cut (' + el.scrollWidth + ' > ' + el.clientWidth + ' px)');
      continue;
    }
    if (r.right > window.innerWidth + 1) {
      found.push(name(el) + ': right edge ' + Math.round(r.right) + ' outside the window');
      continue;
    }
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX === 'visible') continue;
      const box = a.getBoundingClientRect();
      if (r.right > box.right + 1 || r.left < box.left - 1) {
        found.push(name(el) + ': ' + Math.round(r.left) + '..' + Math.round(r.right)
                   + ' outside ' + name(a) + ' ' + Math.round(box.left) + '..'
                   + Math.round(box.right));
        break;
      }
    }
  }
  return found;
}"""

# JupyterLab and Notebook 7: the notebook is open and its kernel is connected
KERNEL_READY = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return w && w.sessionContext && w.sessionContext.session &&
         w.sessionContext.session.kernel &&
         w.sessionContext.session.kernel.connectionStatus === 'connected'; }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until the server answers at ``url`` (any HTTP status counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{proc.args[2]} did not answer at {url} within {timeout} s")


def serve(kind: str, home: Path, notebook: Path, *more: Path) -> Iterator[str]:
    """Run ``kind`` ("lab", "notebook", "voila") on a copy of ``notebook`` (and ``more``
    notebooks beside it); yield its URL."""
    root = home / "root"
    root.mkdir()
    for path in (notebook, *more):
        shutil.copy(path, root / path.name)
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
    server = ["--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
              "--IdentityProvider.token=", "--ServerApp.password=",
              "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
              "--allow-root"]
    args = {
        "lab": ["jupyterlab", *server, "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        "notebook": ["notebook", *server, "--JupyterNotebookApp.expose_app_in_browser=True"],
        "voila": ["voila", str(root / notebook.name), "--no-browser", f"--port={port}",
                  "--Voila.ip=127.0.0.1", "--show_tracebacks=True"],
    }[kind]
    log_path = home / f"{kind}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/status" if kind != "voila" else f"{url}/voila/static/x",
                  proc, timeout=90)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / log_path.name)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[str]:
    yield from serve("lab", tmp_path_factory.mktemp("lab"), DEMO, VIDEO)


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory) -> Iterator[str]:
    yield from serve("notebook", tmp_path_factory.mktemp("nb7"), DEMO)


@pytest.fixture(scope="module")
def voila(tmp_path_factory) -> Iterator[str]:
    yield from serve("voila", tmp_path_factory.mktemp("voila"), APP)


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# anywidget's frontend gives a model 2 s to load its ESM and otherwise drops every message
# to it for good; plotly's bundle is 5 MB of JavaScript, which a CI machine busy with the
# kernel and the server can take longer than that to evaluate (a laptop: well under 1 s).
# The tests check our widgets, not that race: they give the load 2 minutes.
PATIENT_ANYWIDGET = """(() => { const timeout = AbortSignal.timeout.bind(AbortSignal);
  AbortSignal.timeout = ms => timeout(ms === 2000 ? 120000 : ms); })()"""


@contextmanager
def open_page(browser, failed: str, width: int = WIDTHS[0]) -> Iterator:
    """A new page for the block, closed after it; if the block fails, a full-page
    screenshot is saved as ``ARTIFACTS / failed`` first.
    Example: ``with open_page(chromium, "lab_failed.png") as page: ...``"""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.add_init_script(PATIENT_ANYWIDGET)
    try:
        yield page
    except Exception:
        page.screenshot(path=ARTIFACTS / failed, full_page=True)
        raise
    finally:
        page.close()


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def assert_drawn(png: bytes) -> None:
    """The plot is not a blank area: a good part of it differs from the white page."""
    rgb = pixels(png)
    coloured = (np.abs(rgb - 255.0).max(axis=-1) > 40).mean()
    assert coloured > 0.2, f"the figure looks blank: {coloured:.0%} of its pixels are coloured"


def control(page, kind: str, label: str):
    """The first visible ipywidgets control of ``kind`` (dropdown, hslider) named ``label``."""
    return page.locator(f".widget-{kind}:has(> label:text-is('{label}')):visible").first


def drag_to_left(page, slider) -> None:
    """Drag a slider's handle past the left end of its track with the mouse."""
    slider.scroll_into_view_if_needed()  # below the window once the live-scores panel shows
    handle = slider.locator(".noUi-handle").first
    track = slider.locator(".noUi-target, .slider-container").first.bounding_box()
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] - 20, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()


def changed(previous: dict) -> str:
    return (f"() => {{ const h = ({HEATMAP})(); return h && "
            f"Math.abs(h.sum - {previous['sum']!r}) > 1e-6; }}")


def check_widths(page, prefix: str) -> None:
    """At each window width: a full-page screenshot and nothing clipped."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(800)  # let the layout and plotly's autosize settle
        page.screenshot(path=ARTIFACTS / f"{prefix}_{width}px.png", full_page=True)
        clipped = page.evaluate(CLIPPED)
        assert not clipped, f"{prefix} at {width} px: " + "; ".join(clipped)


def exercise_explainer(page, prefix: str, method: bool = True) -> None:
    """Figure drawn; (optionally) the method dropdown and the opacity slider change it."""
    first = page.wait_for_function(HEATMAP, timeout=120_000).json_value()
    # the map figure (the live-scores panel has a plotly figure of its own)
    plot = page.locator(".js-plotly-plot:visible", has=page.locator(".heatmaplayer")).first
    plot.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let plotly finish drawing
    before = plot.screenshot(path=ARTIFACTS / f"{prefix}_1_first.png")
    assert_drawn(before)
    shown = first
    if method:
        control(page, "dropdown", "method").locator("select").select_option("fem")
        page.wait_for_function(changed(first), timeout=60_000)
        assert control(page, "hslider", "K").is_visible()  # fem's parameter appears
        page.wait_for_timeout(500)
        after_method = plot.screenshot(path=ARTIFACTS / f"{prefix}_2_fem.png")
        shown = page.evaluate(HEATMAP)
        assert np.abs(np.asarray(shown["z"]) - np.asarray(first["z"])).max() > 0.05
        assert np.abs(pixels(after_method) - pixels(before)).mean() > 1.0
        before = after_method
    drag_to_left(page, control(page, "hslider", "opacity"))
    page.wait_for_function(f"() => {{ const h = ({HEATMAP})(); return h && h.opacity < 0.1; }}",
                           timeout=30_000)
    page.wait_for_timeout(500)
    faded = plot.screenshot(path=ARTIFACTS / f"{prefix}_3_opacity0.png")
    assert page.evaluate(HEATMAP)["z"] == shown["z"]  # a restyle: the map itself is unchanged
    assert np.abs(pixels(faded) - pixels(before)).mean() > 1.0


def run_notebook(page, url: str) -> None:
    """JupyterLab / Notebook 7: wait for the kernel, run every cell.

    JupyterLab restores the tabs an earlier test opened (its workspace) and could run
    that notebook instead: ``?reset`` opens ``url`` alone."""
    if "/lab/" in url:
        url += "&reset" if "?" in url else "?reset"
    page.goto(url)
    page.wait_for_function(KERNEL_READY, timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
