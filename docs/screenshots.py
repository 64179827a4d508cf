"""Re-take the widget screenshots of the documentation in a real browser.

JupyterLab runs a small notebook with the shipped ``shapes-vgg`` / ``shapes-resnet``
models; headless Chromium (Debian's, driven by Playwright, as in ``tests/browser_support.py``)
waits for each widget's heatmap, switches the ExplainerWidget to FEM, and saves the
pictures to ``docs/_static/screenshots/``. Not part of the build: the PNGs are committed.

    .venv/bin/python docs/screenshots.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the browser test's helpers

from tests.browser_support import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    control,
    free_port,
    run_notebook,
    wait_http,
)

OUT = ROOT / "docs" / "_static" / "screenshots"
CELLS = [
    "import xaiwidgets as xw\n"
    "model, preprocess, classes = xw.models.load('shapes-vgg')\n"
    "data = xw.datasets.shapes(n=4, seed=3)\n"
    "w = xw.ExplainerWidget(model, data.image.values, preprocess=preprocess, "
    "classes=classes, background=False)\n"
    "w",
    "resnet, pre, names = xw.models.load('shapes-resnet')\n"
    "xw.FEMStackWidget(resnet, data.image.values, preprocess=pre, classes=names, "
    "background=False)",
    "xw.CompareWidget(model, data.image.values, ['gradient', 'gradcam', 'fem'], "
    "reference=data, preprocess=preprocess, classes=classes, background=False)",
]
#: every plotly figure with heatmaps inside the element has drawn them
DRAWN = """e => { const plots = [...e.querySelectorAll('.js-plotly-plot')].filter(
      p => p.data && p.data.some(t => t.type === 'heatmap'));
  return plots.length > 0 && plots.every(p => !!p.querySelector('.heatmaplayer image')); }"""


def notebook() -> dict:
    cells = [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
              "outputs": [], "source": source} for i, source in enumerate(CELLS)]
    return {"cells": cells, "metadata": {"kernelspec": {
        "display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}


def widget_of(page, index: int):
    """The output area holding the ``index``-th widget."""
    return page.locator(".jp-OutputArea-output:has(.widget-vbox)").nth(index)


def main() -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "root").mkdir()
        (home / "root" / "demo.ipynb").write_text(json.dumps(notebook()))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTER_CONFIG_DIR": str(home / "c"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "s"), "IPYTHONDIR": str(home / "i"),
               "JUPYTERLAB_WORKSPACES_DIR": str(home / "w"), "JUPYTER_RUNTIME_DIR": str(home)}
        # no "get notified about Jupyter news?" toast over the widgets
        settings = home / "s" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
        port = free_port()
        lab = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             f"--port={port}", "--ip=127.0.0.1", "--IdentityProvider.token=",
             f"--ServerApp.root_dir={home / 'root'}", "--LabApp.expose_app_in_browser=True",
             "--LabApp.news_url=", "--LabApp.extension_manager=readonly"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/api/status", lab, timeout=60)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 1400})
                run_notebook(page, f"{url}/lab/tree/demo.ipynb")
                page.evaluate("window.jupyterapp.commands.execute('application:toggle-left-area')")

                def shoot(index: int, name: str) -> None:
                    widget = widget_of(page, index)
                    widget.wait_for(timeout=300_000)
                    widget.scroll_into_view_if_needed()
                    try:
                        page.wait_for_function(DRAWN, arg=widget.element_handle(),
                                               timeout=120_000)
                    except PlaywrightTimeout:
                        page.screenshot(path=OUT.parent / f"failed-{name}.png")
                        print(f"{name}: the figure was not drawn; see failed-{name}.png")
                        return
                    page.wait_for_timeout(1500)  # plotly's transitions
                    widget.screenshot(path=OUT / f"{name}.png")

                shoot(0, "explainer-gradcam")
                control(page, "dropdown", "method").locator("select").select_option("fem")
                page.wait_for_timeout(4000)
                shoot(0, "explainer-fem")
                shoot(1, "fem-stack")
                shoot(2, "compare")
                browser.close()
        finally:
            lab.terminate()
            lab.wait(timeout=15)
    print("\n".join(str(path.relative_to(ROOT)) for path in sorted(OUT.glob("*.png"))))


if __name__ == "__main__":
    main()
