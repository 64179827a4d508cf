"""ConceptExplorer: channels, conditional maps, region ranking, references, NMF, errors.

Every number the widget shows is checked against the engine called directly (an
Explainer of its own) or, for the region ranking and the activation maps, against an
independent computation from the conditional maps / a forward hook.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import xarray as xr
from plotly.callbacks import BoxSelector, Points
from torch import nn
from torch.utils.data import TensorDataset

import xaiwidgets as xw
from tests.helpers import assert_unchanged, snapshot
from xaiwidgets.widgets import concept_explorer as cx
from xaiwidgets.widgets.concept_explorer import ConceptExplorer

pytest.importorskip("ipywidgets")

CLASSES = ["cat", "dog", "car"]
SIZE = 32
BOX = (4, 6, 20, 26)  # y0, x0, y1, x1
LAYER = "4"  # the last ReLU: the default layer


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    noise = torch.rand(10, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    return nn.functional.interpolate(noise, size=SIZE, mode="bicubic").clamp(0, 1)


@pytest.fixture(scope="module")
def dataset(images) -> TensorDataset:
    return TensorDataset(images, torch.arange(len(images)) % 3)


@pytest.fixture(scope="module")
def explorer(model, dataset) -> ConceptExplorer:
    return ConceptExplorer(model, dataset, classes=CLASSES, background=False, browse=4, top=3)


def explainer(model, images, i: int = 0) -> xw.Explainer:
    return xw.Explainer(model, images[i:i + 1], classes=CLASSES, progress=False)


def reset(c: ConceptExplorer, **values) -> None:
    """Put the controls back to a known state in one update."""
    settings = {"image": 0, "layer": LAYER, "measure": "lrp", "mode": cx.CHANNELS, **values}
    with c.hold():
        for name, value in settings.items():
            c.controls[name].value = value
    assert c.error is None, c.error


def expected_ranking(scores: np.ndarray, top: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:top]


def test_opens_on_the_default_layer_with_the_top_channels(explorer, model, images):
    ex = explainer(model, images)
    assert explorer.controls["layer"].value == ex.default_layer() == LAYER
    assert explorer.controls["measure"].value == "lrp"
    target = int(ex.predict(top=1).label.values[0, 0])
    assert explorer.controls["target"].value == target
    contributions = ex.channels(LAYER, method="lrp", target=target).values[0]
    ch = explorer.channels
    assert ch.dims == ("rank",) and "channel" in ch.coords
    np.testing.assert_array_equal(ch.channel.values, expected_ranking(contributions, 10))
    np.testing.assert_allclose(ch.values, np.sort(contributions)[::-1], rtol=1e-5, atol=1e-7)
    # the bar chart shows exactly these channels, the picked one (the top one) highlighted
    bar = explorer.bar_figure.data[0]
    assert list(bar.x) == [f"ch {k}" for k in ch.channel.values]
    np.testing.assert_allclose(bar.y, ch.values, rtol=1e-6)
    assert explorer.channel == int(ch.channel.values[0])
    assert bar.marker.color[0] != bar.marker.color[1]
    # the map panel shows the measure's map, the channel panel its conditional map
    np.testing.assert_allclose(explorer.overall.values,
                               ex.explain("lrp", target=target).values, rtol=1e-5, atol=1e-7)
    assert explorer.grid.heatmap(0).z is not None and explorer.grid.heatmap(1).z is not None


@pytest.mark.parametrize("measure", ["gradcam", "fem", "activation"])
def test_controls_change_the_channels(explorer, model, images, measure):
    reset(explorer, image=1, measure=measure)
    ex = explainer(model, images, 1)
    target = None if measure in ("fem", "activation") else explorer.controls["target"].value
    expected = ex.channels(LAYER, method=measure, target=target).values[0]
    np.testing.assert_allclose(explorer.contributions.values, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(explorer.channels.channel.values,
                                  expected_ranking(expected, 10))
    assert explorer.controls["target"].disabled == (measure in ("fem", "activation"))
    # another layer: its own channels
    explorer.controls["layer"].value = "1"
    assert explorer.error is None and explorer.contributions.sizes["channel"] == 6
    np.testing.assert_allclose(explorer.contributions.values,
                               ex.channels("1", method=measure, target=target).values[0],
                               rtol=1e-5, atol=1e-7)
    if measure == "fem":  # the engine refuses FEM before the ReLU: shown inline, named
        explorer.controls["layer"].value = "0"
        assert explorer.error.startswith("ValueError") and "layer='1'" in explorer.error
        assert explorer.contributions.sizes["channel"] == 6  # the last result stays
    reset(explorer)


def test_target_change_reranks(explorer, model, images):
    reset(explorer)
    other = [v for _, v in explorer.controls["target"].options][-1]
    explorer.controls["target"].value = other
    expected = explainer(model, images).channels(LAYER, method="lrp", target=other).values[0]
    np.testing.assert_allclose(explorer.contributions.values, expected, rtol=1e-5, atol=1e-7)
    assert explorer.overall.attrs["target"] == other or \
        int(np.atleast_1d(explorer.overall.attrs["target"])[0]) == other
    reset(explorer)


@pytest.mark.parametrize("measure", ["lrp", "gradcam", "fem"])
def test_select_channel_is_the_conditional_map(explorer, model, images, measure):
    reset(explorer, measure=measure)
    k = int(explorer.channels.channel.values[2])
    explorer.select_channel(k)
    assert explorer.error is None and explorer.channel == k
    target = None if measure == "fem" else explorer.controls["target"].value
    expected = explainer(model, images).explain(measure, target=target, layer=LAYER,
                                                channels=[k])
    np.testing.assert_allclose(explorer.result.values, expected.values, rtol=1e-5, atol=1e-7)
    assert explorer.result.attrs["channels"] == [k]
    shown = np.asarray(explorer.grid.heatmap(1).z, dtype=float)  # 5 significant digits
    np.testing.assert_allclose(shown, expected.values[0],
                               atol=1e-4 * np.abs(expected.values).max())
    reset(explorer)


def hooked_activation(model, images) -> torch.Tensor:
    """The second conv's output on image 0, read by a forward hook."""
    seen = {}
    handle = model[4].register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        handle.remove()
    return seen["a"]


def channel_map(acts: torch.Tensor, k: int) -> np.ndarray:
    """Channel k upsampled bilinearly to the input and min-max normalised (a flat
    channel: zeros)."""
    up = nn.functional.interpolate(acts[:, k:k + 1], size=(SIZE, SIZE), mode="bilinear",
                                   align_corners=False)[0, 0].numpy()
    span = up.max() - up.min()
    return (up - up.min()) / span if span > 0 else np.zeros_like(up)


def test_activation_maps_against_a_forward_hook(explorer, model, images):
    reset(explorer, measure="activation")
    k = int(explorer.channels.channel.values[1])
    explorer.select_channel(k)
    acts = hooked_activation(model, images)
    np.testing.assert_allclose(explorer.result.values[0], channel_map(acts, k), atol=1e-5)
    # the measure of every channel is its maximum activation
    np.testing.assert_allclose(explorer.contributions.values,
                               acts[0].flatten(1).max(1).values.numpy(), rtol=1e-5)
    reset(explorer)


def region_scores(model, images, measure: str, target, box) -> np.ndarray:
    """Independent: each channel's conditional map from a fresh Explainer, scored by hand."""
    ex = explainer(model, images)
    y0, x0, y1, x1 = box
    contributions = ex.channels(LAYER, method=measure, target=target).values[0]
    acts = hooked_activation(model, images)
    scores = []
    for k in range(len(contributions)):
        if measure == "activation":  # the raw activation, upsampled
            up = nn.functional.interpolate(acts[:, k:k + 1], size=(SIZE, SIZE),
                                           mode="bilinear", align_corners=False)[0, 0]
            scores.append(float(up[y0:y1, x0:x1].max()))
            continue
        m = ex.explain(measure, target=target, layer=LAYER, channels=[k]).values[0]
        if measure == "lrp":
            scores.append(float(m[y0:y1, x0:x1].sum(dtype=np.float64)))
        else:
            total = m.sum(dtype=np.float64)
            scores.append(0.0 if total == 0 else
                          float(contributions[k] * m[y0:y1, x0:x1].sum(dtype=np.float64) / total))
    return np.asarray(scores)


@pytest.mark.parametrize("measure", ["lrp", "gradcam", "activation"])
def test_select_region_ranks_by_the_contribution_inside_the_box(explorer, model, images,
                                                                measure):
    reset(explorer, measure=measure)
    whole = explorer.channels.copy()
    explorer.select_region(*BOX)
    assert explorer.error is None
    target = None if measure == "activation" else explorer.controls["target"].value
    expected = region_scores(model, images, measure, target, BOX)
    ch = explorer.channels
    np.testing.assert_array_equal(ch.channel.values, expected_ranking(expected, 10))
    np.testing.assert_allclose(ch.values, np.sort(expected)[::-1], rtol=1e-4, atol=1e-6)
    assert explorer.region == BOX and ch.attrs["region"] == list(BOX)
    # the top channel of the box is picked; the box is drawn on the map
    assert explorer.channel == int(ch.channel.values[0])
    shape = explorer.figure.layout.shapes[0]
    assert (shape.x0, shape.y0, shape.x1, shape.y1) == (BOX[1] - 0.5, BOX[0] - 0.5,
                                                        BOX[3] - 0.5, BOX[2] - 0.5)
    # a box over the whole image ranks LRP channels by R_k (conservation at the layer)
    if measure == "lrp":
        explorer.select_region(0, 0, SIZE, SIZE)
        np.testing.assert_array_equal(explorer.channels.channel.values,
                                      whole.channel.values)
    # a new image forgets the box
    explorer.controls["image"].value = 1
    assert explorer.region is None and not explorer.figure.layout.shapes
    reset(explorer)


def test_browser_events_call_the_actions(explorer):
    """What plotly sends on a click on a bar and on a dragged box."""
    reset(explorer)
    second = int(explorer.channels.channel.values[1])
    bar = explorer.bar_figure.data[0]
    explorer._on_bar(bar, Points(point_inds=[1], xs=[bar.x[1]], ys=[bar.y[1]],
                                 trace_name="", trace_index=0), None)
    assert explorer.channel == second
    catcher = explorer.figure.data[-1]
    explorer._on_box(catcher, Points(point_inds=[0], xs=[7.0], ys=[5.0], trace_name="box",
                                     trace_index=len(explorer.figure.data) - 1),
                     BoxSelector(xrange=[5.6, 25.4], yrange=[3.2, 19.9]))
    assert explorer.region == (4, 6, 20, 26)
    reset(explorer)


def test_references_and_class_usage_are_the_engines(explorer, model, dataset, images):
    reset(explorer)
    k = int(explorer.channels.channel.values[0])
    explorer.select_channel(k)
    refs = xw.concepts.references(model, dataset, LAYER, top=3, by="activation")
    xr.testing.assert_equal(explorer.references, refs.sel(channel=k))
    usage = xw.concepts.class_usage(model, dataset, LAYER)
    xr.testing.assert_allclose(explorer.usage, usage.sel(channel=k))
    assert "per class" in explorer.usage_html.value
    # one thumbnail per reference patch, cropped to the patch
    assert len(explorer.patches.children) == refs.sizes["rank"]
    first = refs.sel(channel=k).isel(rank=0)
    box = tuple(int(first[v]) for v in ("y0", "x0", "y1", "x1"))
    crop = cx.crop_thumbnail(images[int(first.image)], box)
    assert crop.shape == (cx.PATCH_PX, cx.PATCH_PX, 3)
    # a click on the first patch's button opens its image
    explorer.patches.children[0].children[1].click()
    assert explorer.dataset_index[explorer.index] == int(first.image)
    np.testing.assert_array_equal(explorer.images[explorer.index].numpy(),
                                  images[int(first.image)].numpy())
    reset(explorer)


def test_nmf_mode_shows_the_factorisation(explorer, model, images):
    reset(explorer)
    explorer.controls["concepts"].value = 3
    explorer.controls["mode"].value = cx.CONCEPTS
    assert explorer.error is None
    ex = xw.Explainer(model, explorer.images, classes=CLASSES, progress=False)
    expected = xw.concepts.factorize(ex, layer=LAYER, n=3, seed=0)
    got = explorer.factors
    np.testing.assert_allclose(np.asarray(got["maps"].values),
                               np.asarray(expected["maps"].values), rtol=1e-5, atol=1e-6)
    # colour-coded map in the channel panel, one bar per concept in its colour
    assert explorer.grid.heatmap(1).z is None
    assert explorer.grid.image(1).source.startswith("data:image/png")
    bar = explorer.bar_figure.data[0]
    assert list(bar.x) == ["concept 0", "concept 1", "concept 2"]
    assert len(set(bar.marker.color)) == 3
    assert len(explorer.patches.children) == 3 * 3
    reset(explorer)


def test_concept_overlay_colours_the_strongest_concept():
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0], maps[1, 1, 1] = 1.0, 0.5
    out = cx.concept_overlay(maps, np.zeros((3, 2, 2)), opacity=1.0)
    np.testing.assert_array_equal(out[0, 0], cx.CONCEPT_COLORS[0])
    np.testing.assert_array_equal(out[1, 1],
                                  np.round(np.asarray(cx.CONCEPT_COLORS[1]) * np.sqrt(0.5)))
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])


def test_background_supersedes_and_model_untouched(model, dataset):
    before = snapshot(model)
    c = ConceptExplorer(model, dataset, classes=CLASSES, background=True, browse=2, top=2)
    try:
        assert c.wait(60)
        c.controls["measure"].value = "gradcam"
        c.select_channel(1)
        c.select_channel(4)  # supersedes the first click
        assert c.wait(60) and not c.busy
        assert c.error is None and c.channel == 4
        assert c.result.attrs["channels"] == [4] and c.result.attrs["method"] == "gradcam"
    finally:
        c.close()
    assert_unchanged(model, before)


def test_bad_input_is_named(explorer, model, dataset, images):
    with pytest.raises(ValueError, match="layer"):
        ConceptExplorer(model, dataset, layer="7", background=False)
    with pytest.raises(ValueError, match="by="):
        ConceptExplorer(model, dataset, by="gradient", background=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        ConceptExplorer(model, dataset, batch_size=0, background=False)
    with pytest.raises(IndexError, match="channels 0..7"):
        explorer.select_channel(8)
    with pytest.raises(TypeError, match="int"):
        explorer.select_channel("3")
    with pytest.raises(ValueError, match="inside the 32×32 image"):
        explorer.select_region(4, 4, 40, 8)
    with pytest.raises(ValueError, match="y0 < y1"):
        explorer.select_region(9, 4, 9, 8)
    # a dataset without labels: class usage says why in its panel, the rest works
    unlabelled = ConceptExplorer(model, TensorDataset(images), classes=CLASSES,
                                 background=False, browse=2, top=2)
    unlabelled.select_channel(0)
    assert unlabelled.error is None and isinstance(unlabelled.usage, str)
    assert "label" in unlabelled.usage_html.value


def test_clips_get_channels_and_conditional_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    clips = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    c = ConceptExplorer(model, xr.Dataset({"image": (("image", "channel", "t", "y", "x"),
                                                     clips.numpy())}),
                        background=False)
    assert "frame" in c.controls and c.error is None
    ex = xw.Explainer(model, clips[:1], progress=False)
    layer = c.controls["layer"].value
    np.testing.assert_allclose(c.contributions.values,
                               ex.channels(layer, "lrp", target=c.controls["target"].value)
                               .values[0], rtol=1e-5, atol=1e-7)
    c.controls["measure"].value = "gradcam"
    c.select_channel(2)
    assert c.result.dims == ("image", "t", "y", "x")
    expected = ex.explain("gradcam", target=c.controls["target"].value, layer=layer, channels=[2])
    np.testing.assert_allclose(c.result.values, expected.values, rtol=1e-5, atol=1e-7)
    c.controls["frame"].value = 3  # redraws the stored map at frame 3
    np.testing.assert_allclose(np.asarray(c.grid.heatmap(1).z, dtype=float),
                               expected.values[0, 3], rtol=1e-3, atol=1e-4)
    assert isinstance(c.usage, str)  # no patches for clips: said in the panel


def test_exports(explorer, tmp_path):
    """PNG: the measure's map and the channel's map; the handout steps through measures
    with both figures (bars included) in each state."""
    reset(explorer)
    assert explorer.png_bytes().startswith(b"\x89PNG")
    page = explorer.export_html(tmp_path / "concepts.html", sweep={"measure": ["lrp", "fem"]},
                                progress=False)
    text = page.read_text()
    assert "top channels of" in text and "by fem" in text and "by lrp" in text
    reset(explorer)


def test_cancel_stops_the_dataset_pass_and_the_store_resumes_it(model, dataset, tmp_path,
                                                                 monkeypatch):
    """The references pass shows its image count, stops at its next chunk on Cancel
    (what the button does), keeps its finished chunks, and the next request resumes."""
    refs_module = importlib.import_module("xaiwidgets.concepts.references")
    real_report, shown, armed = ConceptExplorer._report_progress, [], [True]

    def report(self, done, total):
        if total == len(dataset):  # the dataset passes (the box has 8 channels)
            shown.append((done, self.status.value))
            if armed[0] and done >= 6:
                armed[0] = False
                self.cancel()
        real_report(self, done, total)

    monkeypatch.setattr(ConceptExplorer, "_report_progress", report)
    store = tmp_path / "refs.zarr"
    c = ConceptExplorer(model, dataset, classes=CLASSES, background=False, browse=2, top=3,
                        store=str(store), batch_size=3)
    assert c.result is None and c.error is None and "cancelled" in c.status.value
    assert [done for done, _ in shown] == [0, 3, 6]
    assert "reference patches" in shown[-1][1] and "6/10 images" in shown[-1][1]
    assert sorted(p.name for p in (store / "chunks").iterdir()) == ["c000000", "c000001"]
    assert not (store / "result").exists()
    real_chunk, runs = refs_module._chunk, []
    monkeypatch.setattr(refs_module, "_chunk",
                        lambda *a, **k: runs.append(1) or real_chunk(*a, **k))
    shown.clear()
    c.refresh()
    assert c.error is None and len(runs) == 2  # images 6..9 only
    assert [done for done, _ in shown][:3] == [6, 9, 10]
    whole = xw.concepts.references(model, dataset, LAYER, top=3, batch_size=3,
                                   store=str(tmp_path / "whole.zarr"), progress=False)
    xr.testing.assert_identical(c._refs[(LAYER, "activation", None)], whole)
    xr.testing.assert_identical(c.references, whole.sel(channel=c.channel))
    c.close()


def test_a_vision_transformer_opens_on_a_measure_it_allows_with_its_token_channels():
    # shapes-vit: LRP is refused on self-attention, and its default layer's output is
    # (N, 65 tokens, 96): the channels are the 96 features on the 8x8 patch grid
    model, preprocess, classes = xw.models.load("shapes-vit")
    data = xw.datasets.shapes(n=12, seed=1)
    ex = xw.Explainer(model, data.image.values[:2], preprocess=preprocess, progress=False)
    layer = ex.default_layer()
    with pytest.raises(ValueError, match="refused on models with self-attention"):
        ex.channels(layer, "lrp", target=[0, 1])
    terms = ex.channels(layer, "gradcam", target=[0, 1])
    assert terms.sizes["channel"] == 96
    # the same as Grad-CAM's α_k·ΣA_k on the token grid, computed here from the tokens
    a, g = ex.context.layer_gradient(layer, torch.tensor([0, 1]))  # on the patch grid
    assert a.shape == g.shape == (2, 96, 8, 8)
    expected = (g.mean(dim=(2, 3)) * a.sum(dim=(2, 3))).detach().numpy()
    np.testing.assert_allclose(terms.values, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="self-attention"):
        xw.concepts.references(model, data, layer, top=2, by="relevance",
                               preprocess=preprocess, progress=False)
    refs = xw.concepts.references(model, data, layer, top=2, preprocess=preprocess,
                                  progress=False)
    assert refs.sizes["channel"] == 96
    c = ConceptExplorer(model, data, preprocess=preprocess, classes=classes,
                        background=False, browse=4, top=2)
    assert c.controls["measure"].value == "gradcam" and c.error is None
    c.select_channel(int(terms[0].argmax()))
    assert c.error is None
    # FEM needs the layer after the activation, which ex.layers() does not list: given
    # in code, it is offered and used
    fem = ConceptExplorer(model, data, layer="blocks.3.mlp.act", preprocess=preprocess,
                          classes=classes, background=False, browse=4, top=2)
    assert fem.controls["layer"].value == "blocks.3.mlp.act"
    fem.controls["measure"].value = "fem"
    assert fem.error is None
