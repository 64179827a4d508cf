"""The DatasetExplorer in a real browser: JupyterLab + headless Chromium (Playwright).

Reuses the JupyterLab server and helpers of ``tests/browser_support.py``; the
explorer's notebook is written to the server through its contents API. The test
waits for the gallery's thumbnails, then picks "wrong" in the outcome dropdown and
clicks a cell of the confusion heatmap, and checks each time that the gallery shows
other images (captions and pixels). Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import re
import urllib.request

import nbformat
import numpy as np
import pytest

from tests.browser_support import (  # noqa: F401
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    control,
    lab,
    pixels,
    run_notebook,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium"),
]

NOTEBOOK = "explorer_demo.ipynb"
SOURCE = """\
import numpy as np
import torch
from torch.utils.data import TensorDataset

import xaiwidgets as xw

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
).eval()
images = torch.nn.functional.interpolate(torch.rand(40, 3, 6, 6), size=48,
                                         mode="bicubic").clamp(0, 1)
labels = torch.from_numpy(np.arange(40) % 3)
x = xw.DatasetExplorer(model, TensorDataset(images, labels), classes=["cat", "dog", "car"],
                       methods=["gradient", "gradcam"], page_size=4)
x"""

# the explorer's thumbnails as the page shows them: caption text and the image's source
GALLERY = """() => {
  const tiles = [...document.querySelectorAll('.widget-gridbox .widget-vbox')].filter(
      t => t.offsetParent !== null && t.querySelector('img'));
  return tiles.map(t => ({caption: t.innerText.trim(),
                          drawn: t.querySelector('img').naturalWidth > 0}));
}"""


def put_notebook(url: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SOURCE)]
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python",
                                  "name": "python3"}}
    body = json.dumps({"type": "notebook", "format": "json",
                       "content": json.loads(nbformat.writes(nb))}).encode()
    request = urllib.request.Request(f"{url}/api/contents/{NOTEBOOK}", data=body,
                                     method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (200, 201)


def indices(gallery: list[dict]) -> list[int]:
    return [int(re.match(r"#(\d+)", g["caption"]).group(1)) for g in gallery]


@pytest.mark.timeout(300)
def test_explorer_filters_react_in_chromium(lab):  # noqa: F811 - the imported fixture
    from playwright.sync_api import sync_playwright

    put_notebook(lab)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            run_notebook(page, f"{lab}/lab/tree/{NOTEBOOK}")
            # four thumbnails with their scores (the background job has finished)
            page.wait_for_function(
                f"() => {{ const g = ({GALLERY})(); return g.length === 4 && "
                "g.every(t => t.drawn && !t.caption.includes('…')); }", timeout=120_000)
            page.wait_for_timeout(500)
            first = page.evaluate(GALLERY)
            assert indices(first) == [0, 1, 2, 3]
            page.screenshot(path=ARTIFACTS / "explorer_0_all.png")
            gallery = page.locator(".widget-gridbox").first
            before = gallery.screenshot()

            # the outcome dropdown: only wrong predictions
            control(page, "dropdown", "outcome").locator("select").select_option("wrong")
            page.wait_for_function(
                f"() => {{ const g = ({GALLERY})(); return g.length > 0 && "
                f"g[0].caption !== {json.dumps(first[0]['caption'])} && "
                "g.every(t => !t.caption.includes('…')); }", timeout=60_000)
            page.wait_for_timeout(500)
            wrong = page.evaluate(GALLERY)
            page.screenshot(path=ARTIFACTS / "explorer_1_wrong.png")
            for tile in wrong:  # every caption: true class differs from the prediction
                true = re.search(r"true (\w+)", tile["caption"]).group(1)
                pred = re.search(r"pred (\w+)", tile["caption"]).group(1)
                assert true != pred, tile["caption"]
            assert np.abs(pixels(gallery.screenshot()) - pixels(before)).mean() > 1.0

            # a click on the confusion heatmap's largest off-diagonal cell
            page.wait_for_function(
                "() => [...document.querySelectorAll('.js-plotly-plot')].some(g => g.data && "
                "g.data.some(t => t.type === 'heatmap') && g.querySelector('.nsewdrag'))",
                timeout=60_000)
            page.wait_for_timeout(500)
            cell = page.evaluate("""() => {
              const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
                  g => g.data && g.data.some(t => t.type === 'heatmap'));
              const t = gd.data[0], z = t.z;
              let best = null;
              for (let i = 0; i < z.length; i++) for (let j = 0; j < z[i].length; j++)
                if (i !== j && z[i][j] > 0 && (!best || z[i][j] > best.n))
                  best = {i: i, j: j, n: z[i][j]};
              const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
              const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
              return {x: box.left + xa.l2p(best.j), y: box.top + ya.l2p(best.i),
                      true: t.y[best.i], pred: t.x[best.j], n: best.n};
            }""")
            page.mouse.click(cell["x"], cell["y"])
            page.wait_for_function(
                f"() => {{ const g = ({GALLERY})(); return g.length > 0 && g.every("
                f"t => t.caption.includes('true ' + {json.dumps(cell['true'])}) && "
                f"t.caption.includes('pred ' + {json.dumps(cell['pred'])})); }}",
                timeout=60_000)
            page.wait_for_timeout(500)
            pair = page.evaluate(GALLERY)
            assert len(pair) == min(4, cell["n"])
            page.screenshot(path=ARTIFACTS / "explorer_2_confusion_click.png")
        except Exception:
            page.screenshot(path=ARTIFACTS / "explorer_failed.png", full_page=True)
            raise
        finally:
            browser.close()
