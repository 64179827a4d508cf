"""The widgets on a Vision Transformer in a real browser: JupyterLab + headless Chromium.

Reuses the JupyterLab server and helpers of ``tests/browser_support.py``;
``tests/browser/vit_demo.ipynb`` (the shipped ``shapes-vit``) is written to the server
through its contents API. Checked: the ExplainerWidget's figure is drawn, its layer
list is the ViT's patch embedding and blocks (default ``blocks.3.norm1``), choosing a
block and then attention rollout draws new maps; the FEMStackWidget's figure is drawn
and its layer slider moves over the blocks (the convolutional stem's, then the
transformer's). Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.browser_support import (  # noqa: F401 - lab and chromium are fixtures
    ARTIFACTS,
    CHROMIUM,
    HEATMAP,
    assert_drawn,
    changed,
    chromium,
    control,
    drag_to_left,
    lab,
    open_page,
    pixels,
    run_notebook,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium"),
]

NOTEBOOK = Path(__file__).parent / "browser" / "vit_demo.ipynb"

# the z values' sum of every visible figure's first heatmap, in page order
HEATMAP_SUMS = """() => [...document.querySelectorAll('.js-plotly-plot')].filter(
    g => g.offsetParent !== null && g.data && g.data.some(t => t.type === 'heatmap' && t.z)
         && g.querySelector('.heatmaplayer image')).map(g => {
    const t = g.data.find(t => t.type === 'heatmap' && t.z);
    return Array.from(t.z, row => Array.from(row)).flat().reduce((a, b) => a + Math.abs(b), 0);
})"""


def put_notebook(url: str) -> None:
    """Copy the demo notebook onto the server (its contents API)."""
    body = json.dumps({"type": "notebook", "format": "json",
                       "content": json.loads(NOTEBOOK.read_text())}).encode()
    request = urllib.request.Request(f"{url}/api/contents/{NOTEBOOK.name}", data=body,
                                     method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (200, 201)


@pytest.mark.timeout(300)
def test_widgets_on_shapes_vit_in_jupyterlab(lab, chromium):  # noqa: F811 - fixtures
    put_notebook(lab)
    with open_page(chromium, "lab_vit_failed.png") as page:
        run_notebook(page, f"{lab}/lab/tree/{NOTEBOOK.name}")
        page.evaluate("window.jupyterapp.shell.collapseLeft()")
        first = page.wait_for_function(HEATMAP, timeout=120_000).json_value()
        plot = page.locator(".js-plotly-plot:visible", has=page.locator(".heatmaplayer")).first
        plot.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        before = plot.screenshot(path=ARTIFACTS / "lab_vit_1_gradcam.png")
        assert_drawn(before)

        layer = control(page, "dropdown", "layer").locator("select")
        options = layer.locator("option").all_inner_texts()
        # the hybrid's convolutional patch embedding, then the transformer blocks
        assert options[-6:] == ["patch_embed.proj", "blocks.0", "blocks.1", "blocks.2",
                                "blocks.3.norm1", "blocks.3"], options
        assert options[0] == "patch_embed.backbone.conv1", options
        assert layer.input_value() == "blocks.3.norm1"
        layer.select_option("blocks.1")
        page.wait_for_function(changed(first), timeout=60_000)
        page.wait_for_timeout(500)
        block = page.evaluate(HEATMAP)
        after_layer = plot.screenshot(path=ARTIFACTS / "lab_vit_2_gradcam_blocks1.png")
        assert_drawn(after_layer)
        assert np.abs(np.asarray(block["z"]) - np.asarray(first["z"])).max() > 0.05

        control(page, "dropdown", "method").locator("select").select_option(
            "attention_rollout")
        page.wait_for_function(changed(block), timeout=60_000)
        page.wait_for_timeout(500)
        rollout = plot.screenshot(path=ARTIFACTS / "lab_vit_3_rollout.png")
        assert_drawn(rollout)
        assert np.abs(pixels(rollout) - pixels(after_layer)).mean() > 1.0

        # the FEM stack below: its figure drawn, its layer slider over the blocks
        page.wait_for_function(f"() => ({HEATMAP_SUMS})().length >= 2", timeout=120_000)
        stack_plot = page.locator(".js-plotly-plot:visible",
                                  has=page.locator(".heatmaplayer")).nth(1)
        stack_plot.scroll_into_view_if_needed()
        page.wait_for_timeout(800)
        stack_before = stack_plot.screenshot(path=ARTIFACTS / "lab_vit_4_fem_stack.png")
        assert_drawn(stack_before)
        sums = page.evaluate(HEATMAP_SUMS)
        # the slider's layer label: the stem's 6 residual blocks, then the 4 transformer blocks
        assert "blocks.3 (10/10)" in page.inner_text("body")
        slider = page.locator(".widget-hslider:has(> label:text-is('layer')):visible").first
        assert slider.is_visible()
        drag_to_left(page, slider)  # the last block -> the first
        page.wait_for_function(
            f"() => {{ const s = ({HEATMAP_SUMS})(); return s.length >= 2 && "
            f"Math.abs(s[1] - {sums[1]!r}) > 1e-6; }}", timeout=60_000)
        page.wait_for_timeout(800)
        assert "patch_embed.backbone.layer1.0 (1/10)" in page.inner_text("body")
        stack_after = stack_plot.screenshot(path=ARTIFACTS / "lab_vit_5_fem_stack_blocks0.png")
        assert_drawn(stack_after)
        page.screenshot(path=ARTIFACTS / "lab_vit_page.png", full_page=True)
