"""Standalone HTML handouts (``w.export_html``): every widget, size, no network, and the
page in a real offline Chromium (its slider changes the picture).

Screenshots of the browser test go to ``test-artifacts/browser/handout_*.png``.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import xaiwidgets as xw
from tests.browser_support import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, browser, pixels
from tests.conftest import make_tiny_cnn
from xaiwidgets.widgets.export import MAX_STATES, control_values, quantise
from xaiwidgets.widgets.figures import block_mean, display_values

MB = 1024 * 1024


def small_images(n: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def read_handout(path: Path) -> tuple[dict, list]:
    """(the page's states, its stored parts), decoded as the page's script does."""
    text = path.read_text(encoding="utf-8")
    def block(name: str) -> str:
        return re.search(f"<script type='application/json' id='{name}'>(.*?)</script>",
                         text, re.S).group(1)
    return json.loads(block("xw-data")), json.loads(block("xw-parts"))


def dequantise(q: dict) -> np.ndarray:
    levels = np.frombuffer(base64.b64decode(q["__q"]), dtype=np.uint8).reshape(q["shape"])
    out = q["lo"] + levels * (q["hi"] - q["lo"]) / 254
    return np.where(levels == 255, np.nan, out)


def state_map(data: dict, parts: list, key: str, figure: int = 0, trace: int = 1) -> np.ndarray:
    traces, _ = data["states"][key]["figs"][figure]
    return dequantise(parts[traces[trace]]["z"])


def model_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.fixture(scope="module")
def fem_handout(tmp_path_factory) -> tuple[Path, xw.ExplainerWidget, dict]:
    model = make_tiny_cnn()
    before = model_state(model)
    w = xw.ExplainerWidget(model, small_images(), method="fem", background=False)
    path = w.export_html(tmp_path_factory.mktemp("handout") / "fem.html", progress=False)
    return path, w, before


def test_quantise_round_trip_within_one_level():
    values = np.random.default_rng(0).normal(size=(20, 30))
    values[3, 4] = np.nan
    back = dequantise(quantise(values))
    span = np.nanmax(values) - np.nanmin(values)
    assert np.isnan(back[3, 4])
    assert np.nanmax(np.abs(back - values)) <= span / 254 / 2 + 1e-12


def test_control_values_snap_to_the_step():
    import ipywidgets as W

    assert [v for _, v in control_values(W.FloatSlider(min=0, max=1, step=0.1, value=0.3),
                                         steps=3)] == [0.0, 0.3, 0.5, 1.0]
    assert [v for _, v in control_values(W.IntSlider(min=1, max=3, value=1), steps=7)] == [1, 2, 3]


def test_explainer_handout_size_offline_and_states(fem_handout):
    path, w, before = fem_handout
    text = path.read_text(encoding="utf-8")
    size = path.stat().st_size
    print(f"two-image ExplainerWidget handout (fem, K slider): {size / MB:.2f} MB")
    assert size <= 10 * MB
    assert not re.search(r"""<script[^>]*\bsrc=""", text)  # plotly.js inlined
    ours = re.sub(r"<script>/\*\*\s*\n?\s*\* plotly\.js.*?</script>", "", text, count=1,
                  flags=re.S)  # plotly.js's own code mentions its web site: leave it out
    assert len(ours) < len(text) - 4_000_000
    assert "http://" not in ours and "https://" not in ours
    assert text.count("plotly.js v") <= 2  # plotly.js inlined once (its banner)
    data, parts = read_handout(path)
    names = [c["name"] for c in data["controls"]]
    assert names == ["image", "K"]
    k_values = [float(v) for v in data["controls"][1]["labels"]]
    assert len(data["states"]) == 2 * len(k_values)
    # the stored map of image 1 at a K equals the engine's map (as the figure shows it)
    ex = xw.Explainer(w.model, w.images[1:2])
    for j in (0, len(k_values) - 1):
        expected = display_values(block_mean(
            np.asarray(ex.explain("fem", K=k_values[j]).xai.map2d(), dtype=np.float64), 1))
        stored = state_map(data, parts, f"1-{j}", trace=3)
        span = np.nanmax(expected) - np.nanmin(expected)
        assert np.nanmax(np.abs(stored - expected)) <= span / 254 / 2 + 1e-9
    assert not np.allclose(state_map(data, parts, "1-0", trace=3),
                           state_map(data, parts, f"1-{len(k_values) - 1}", trace=3))
    assert_same_state(w.model, before)


def test_export_puts_the_controls_back(tmp_path):
    w = xw.ExplainerWidget(make_tiny_cnn(), small_images(), method="fem", background=False)
    w.controls["K"].value = 2.0
    shown = w.result.values.copy()
    w.export_html(tmp_path / "a.html", progress=False)
    assert w.controls["K"].value == 2.0 and w.index == 0
    np.testing.assert_array_equal(w.result.values, shown)


def test_every_widget_exports(tmp_path):
    model, images = make_tiny_cnn(), small_images()
    before = model_state(model)
    fem = xw.FEMStackWidget(model, images, background=False)
    path = fem.export_html(tmp_path / "stack.html", progress=False)
    data, _ = read_handout(path)
    assert [c["name"] for c in data["controls"]] == ["image", "layer"]
    assert len(data["states"]) == 2 * len(fem.layers)
    assert len(next(iter(data["states"].values()))["figs"]) == 2  # the layer grid too

    compare = xw.CompareWidget(model, images, ["gradient", "gradcam"], background=False)
    data, parts = read_handout(compare.export_html(tmp_path / "compare.html", progress=False))
    assert list(data["states"]) == ["0", "1"]
    a, b = (state_map(data, parts, k) for k in ("0", "1"))
    assert not np.allclose(a, b)  # each image its own maps

    labels = torch.arange(10) % 4
    explorer = xw.DatasetExplorer(model, TensorDataset(small_images(10, 32), labels),
                                  methods=["gradient", "gradcam"], page_size=4,
                                  background=False)
    data, parts = read_handout(explorer.export_html(tmp_path / "explorer.html", progress=False))
    assert [c["labels"] for c in data["controls"]] == [["gradient", "gradcam"], ["1", "2", "3"]]
    page = parts[data["states"]["1-2"]["html"][0]]
    assert page.count("<img") == 2 and "#8" in page and "#9" in page  # the last page
    assert explorer.controls["page"].value == 1
    assert_same_state(model, before)


def test_export_refuses_bad_requests(tmp_path):
    w = xw.ExplainerWidget(make_tiny_cnn(), small_images(), method="fem", background=False)
    with pytest.raises(ValueError, match="no control 'brightness'"):
        w.export_html(tmp_path / "a.html", sweep=["brightness"])
    with pytest.raises(ValueError, match=f"more than {MAX_STATES}"):
        w.export_html(tmp_path / "a.html", sweep={"image": [0, 1], "K": list(range(1, 300))})
    with pytest.raises(ValueError, match=r"\.html"):
        w.export_html(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="create the folder"):
        w.export_html(tmp_path / "missing" / "a.html")
    assert not list(tmp_path.iterdir())


def test_export_of_a_failing_state_raises_and_writes_nothing(tmp_path, monkeypatch):
    w = xw.ExplainerWidget(make_tiny_cnn(), small_images(), method="fem", background=False)

    def broken(*args, **kwargs):
        raise RuntimeError("the engine broke")

    real = w.explainer(1).explain
    monkeypatch.setattr(w.explainer(1), "explain",
                        lambda name, **kw: broken() if kw.get("K") == 3.0 else real(name, **kw))
    with pytest.raises(RuntimeError, match=r"state \{'image': 1, 'K': 3.0\} failed"):
        w.export_html(tmp_path / "a.html", sweep={"image": [0, 1], "K": [1.0, 3.0]})
    assert not (tmp_path / "a.html").exists()


def test_export_with_nothing_computed_yet_computes_first(tmp_path):
    w = xw.CompareWidget(make_tiny_cnn(), small_images(), ["gradient"], background=True)
    w.cancel()  # nothing drawn yet (or the first result): the handout computes what it needs
    data, parts = read_handout(w.export_html(tmp_path / "c.html", progress=False))
    assert np.isfinite(state_map(data, parts, "1")).all()
    w.close()


# ------------------------------------------------------------------ in Chromium
FIGURE_Z = """() => { const gd = document.getElementById('xw-fig-0');
  const t = gd.data.filter(t => t.type === 'heatmap' && t.z).pop();
  return {z: t.z.flat(), opacity: t.opacity, state: document.body.dataset.state}; }"""


@browser
@pytest.mark.timeout(180)
def test_handout_in_offline_chromium(fem_handout, tmp_path):
    from playwright.sync_api import sync_playwright

    path, _, _ = fem_handout
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    asked: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1000, "height": 760},
                                           offline=True)

            def block(route):
                asked.append(route.request.url)
                route.abort()
            context.route(re.compile(r"^(?!file:|data:).*"), block)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_function("() => document.body.dataset.state !== undefined")
            page.wait_for_selector("#xw-fig-0 .heatmaplayer image")
            page.wait_for_timeout(300)
            first = page.evaluate(FIGURE_Z)
            before = page.screenshot(path=ARTIFACTS / "handout_1_first.png")
            # the K slider: the keyboard moves it to its last value, as a user would
            slider = page.locator("input[data-control='K']")
            slider.focus()
            slider.press("End")
            page.wait_for_function(f"() => document.body.dataset.state !== {first['state']!r}")
            page.wait_for_timeout(300)
            moved = page.evaluate(FIGURE_Z)
            after = page.screenshot(path=ARTIFACTS / "handout_2_K_last.png")
            last = len(read_handout(path)[0]["controls"][1]["labels"]) - 1
            assert moved["state"] == f"0-{last}"
            assert np.abs(np.subtract(moved["z"], first["z"], dtype=float)).max() > 1e-3
            assert np.abs(pixels(after) - pixels(before)).mean() > 0.5
            # the image picker and the in-page opacity slider
            page.select_option("select[data-control='image']", "1")
            page.wait_for_function("() => document.body.dataset.state.startsWith('1-')")
            opacity = page.locator("input[data-control='opacity']")
            opacity.focus()
            opacity.press("Home")
            page.wait_for_timeout(300)
            assert page.evaluate(FIGURE_Z)["opacity"] == 0
            page.screenshot(path=ARTIFACTS / "handout_3_image1_opacity0.png")
        finally:
            chromium.close()
    assert not errors, errors
    assert not asked, f"the handout asked the network for {asked}"

