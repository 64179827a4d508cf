"""Widgets on video clips (N, C, T, H, W): a ``frame`` slider linked to a Play control;
a frame change puts that frame of the stored maps and of the clip into the existing
traces with no model call and no recomputation. Expected maps come from the engine
called directly, expected scores from per-frame metric loops (no widget code)."""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import pytest
import torch
import xarray as xr
from ipywidgets.widgets.widget_link import Link
from torch import nn

import xaiwidgets as xw
from xaiwidgets import metrics, rendering
from xaiwidgets.core.registry import get_method, methods
from xaiwidgets.widgets.controls import is_visible
from xaiwidgets.widgets.figures import image_uri
from xaiwidgets.widgets.live_scores import score_map

from .conftest import count_calls, count_forwards

FRAMES = 4


def tiny_3d_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 4),
    ).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_3d_net()


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return xw.datasets.moving_shapes(2, frames=FRAMES, size=32, seed=0)


@pytest.fixture(scope="module")
def clips(ds) -> torch.Tensor:
    return torch.from_numpy(ds.image.values)


def heat(grid, panel: int) -> np.ndarray:
    return np.asarray(grid.heatmap(panel).z, dtype=np.float64)


def assert_frame(grid, panel: int, volume: np.ndarray, frame: int, signed: bool = False) -> None:
    """Panel ``panel`` shows frame ``frame`` of ``volume`` (t, y, x), coloured on the
    whole volume's range."""
    # shown to 5 significant digits of the frame's largest |value| (display_values)
    scale = float(np.abs(volume[frame]).max())
    np.testing.assert_allclose(heat(grid, panel), volume[frame], rtol=0, atol=6e-5 * scale)
    assert not np.allclose(volume[frame], volume[(frame + 1) % len(volume)], atol=1e-3 * scale)
    low, high = rendering.color_limits(volume, signed)
    assert (grid.heatmap(panel).zmin, grid.heatmap(panel).zmax) == pytest.approx((low, high))


def test_explainer_widget_frame_slider_play_and_methods(model, ds, clips):
    w = xw.ExplainerWidget(model, ds, method="gradcam")  # the Dataset: its clips
    assert isinstance(w.play, W.Play) and w.is_clip
    slider = w.controls["frame"]
    assert (slider.min, slider.max, w.play.min, w.play.max) == (0, FRAMES - 1, 0, FRAMES - 1)
    link = w._frame_link
    assert type(link) is Link  # jslink: played in the browser, no kernel round trip
    assert {link.source, link.target} == {(w.play, "value"), (slider, "value")}
    # only the methods that explain clips are offered; asking for another says why
    offered = set(w.controls["method"].options)
    refused = {m for m in methods() if get_method(m).clip_refusal}
    assert "lime" in refused and "meaningful_perturbation" in refused
    assert offered == set(methods()) - refused and "gradcam" in offered
    with pytest.raises(ValueError, match="does not support video clips"):
        xw.ExplainerWidget(model, clips, method="lime")
    # mlfem's NET operator is refused on clips: not offered
    assert "net" not in [v for _, v in w.controls["operator"].options]
    expected = xw.Explainer(model, clips[:1]).explain("gradcam", target=w.controls["target"].value)
    np.testing.assert_allclose(w.result.values, expected.values, atol=1e-6)
    assert_frame(w.grid, w.map_panel, w.result.values[0], 0)


def test_frame_change_redraws_without_recomputing(model, clips, monkeypatch):
    w = xw.ExplainerWidget(model, clips, method="gradient")
    result = w.result
    forwards, handle = count_forwards(model)
    explains = count_calls(monkeypatch, xw.Explainer, "explain")
    try:
        sources = set()
        for frame in (2, 3, 1):
            w.controls["frame"].value = frame
            assert_frame(w.grid, w.map_panel, result.values[0], frame, signed=result.xai.signed)
            assert w.grid.image(0).source == image_uri(clips[0, :, frame])
            assert w.grid.image(w.map_panel).source == w.grid.image(0).source
            assert f"frame {frame} of 0–{FRAMES - 1}" in w.figure.layout.annotations[0].text
            sources.add(w.grid.image(0).source)
        assert forwards == [] and explains == [] and w.result is result
        assert len(sources) == 3  # the clip moves: each frame its own picture
    finally:
        handle.remove()
    # the PNG export shows the frame shown
    png = w.png_bytes()
    assert png.startswith(b"\x89PNG")


def test_a_parameter_change_keeps_the_frame(model, clips):
    w = xw.ExplainerWidget(model, clips, method="gradcam")
    w.controls["frame"].value = 3
    w.controls["method"].value = "fem"
    w.controls["K"].value = 1.5
    assert w.frame == 3 and w.result.attrs["K"] == 1.5
    expected = xw.Explainer(model, clips[:1]).explain("fem", K=1.5).values[0]
    assert_frame(w.grid, w.map_panel, expected, 3)
    w.controls["image"].value = 1  # another clip: same frame, its picture
    assert w.frame == 3 and w.grid.image(0).source == image_uri(clips[1, :, 3])


def test_still_images_get_no_frame_controls():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    w = xw.ExplainerWidget(net, torch.rand(1, 3, 16, 16), method="gradient")
    assert not w.is_clip and w.play is None and "frame" not in w.controls
    assert "lime" in w.controls["method"].options


def test_add_image_takes_a_clip(model, clips):
    w = xw.ExplainerWidget(model, clips[:1], method="gradient")
    index = w.add_image(clips[1].numpy(), label="second")
    assert index == 1 and w.result.image.values.tolist() == [1]
    with pytest.raises(ValueError, match=r"one clip \(C,T,H,W\)"):
        w.add_image(np.random.rand(3, 32, 32).astype("float32"))
    with pytest.raises(ValueError, match="resize"):
        w.add_image(np.random.rand(3, FRAMES + 1, 32, 32).astype("float32"))


def test_fem_stack_widget_on_clips(model, clips, monkeypatch):
    layers = ["1", "3"]
    w = xw.FEMStackWidget(model, clips, layers=layers)
    assert w.stack.dims == ("image", "layer", "t", "y", "x")
    assert "net" not in [v for _, v in w.controls["operator"].options]
    expected = xw.Explainer(model, clips[:1]).fem_stack(layers=layers, K=w.controls["K"].value)
    np.testing.assert_allclose(w.stack.values, expected.values, atol=1e-6)
    forwards, handle = count_forwards(model)
    stacks = count_calls(monkeypatch, xw.Explainer, "fem_stack")
    try:
        w.controls["frame"].value = 2
        w.controls["layer"].value = "1"
        assert forwards == [] and stacks == []
    finally:
        handle.remove()
    assert_frame(w.grid, 0, w.stack.values[0, 0], 2)
    assert_frame(w.grid, 1, w.result.values[0], 2)
    for i in range(len(layers)):
        assert_frame(w.layers_grid, i, w.stack.values[0, i], 2)
    w.controls["operator"].value = "add"  # re-fuses, keeps the frame
    assert w.frame == 2 and w.result.attrs["operator"] == "add"
    assert_frame(w.grid, 1, w.result.values[0], 2)


def test_compare_widget_on_clips_scores_volumes(model, ds, clips, monkeypatch):
    w = xw.CompareWidget(model, clips, ["gradient", "gradcam"], reference=ds,
                         metrics=("pcc", "sim", "nss"))
    gfdm, fixations = ds.gfdm.values[0], ds.fixations.values[0]
    for name in ("gradient", "gradcam"):
        volume = w.results[name].values[0]
        for metric, ref in (("pcc", gfdm), ("sim", gfdm), ("nss", fixations)):
            per_frame = [getattr(metrics, metric)(volume[t], ref[t]) for t in range(FRAMES)]
            shown = float(w.scores.sel({"method": name, "metric": metric}))
            assert shown == pytest.approx(np.nanmean(per_frame))
    forwards, handle = count_forwards(model)
    explains = count_calls(monkeypatch, xw.Explainer, "explain")
    try:
        w.controls["frame"].value = 3
        assert forwards == [] and explains == []
    finally:
        handle.remove()
    for i, name in enumerate(w.methods):
        da = w.results[name]
        assert_frame(w.grid, i, da.values[0], 3, signed=da.xai.signed)
    assert_frame(w.grid, 2, ds.gfdm.values[0].astype(np.float64), 3)  # the reference
    assert w.grid.image(2).source == image_uri(clips[0, :, 3])
    with pytest.raises(ValueError, match="does not support video clips"):
        xw.CompareWidget(model, clips, ["gradcam", "lime"])


def test_live_scores_of_a_clip_use_the_gaze_volume(model, ds, clips):
    ex = xw.Explainer(model, clips[:1])
    saliency = ex.explain("gradcam")
    gaze = ds.gfdm.values[0]
    scores, curves = score_map(ex, saliency, gaze)
    volume = saliency.values[0]
    for name in ("pcc", "sim"):
        per_frame = [getattr(metrics, name)(volume[t], gaze[t]) for t in range(FRAMES)]
        assert scores[name] == pytest.approx(np.mean(per_frame))
    assert curves == {} and "deletion" not in scores  # perturbation curves: stills only
    with pytest.raises(ValueError, match=r"\(t, y, x\) volume per clip"):
        score_map(ex, saliency, gaze[0])
    w = xw.ExplainerWidget(model, clips, method="gradcam", gaze=ds)
    w.live.enabled = True
    w.controls["method"].value = "gradient"
    assert w.live.scores["pcc"] == pytest.approx(
        float(metrics.pcc(w.result.isel(image=0), xr.DataArray(gaze, dims=("t", "y", "x")))))
    assert "still images only" in w.live.table.value
    assert w.error is None and not is_visible(w.live.figure_box)  # no curves: no plot
