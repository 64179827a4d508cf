"""Channels of a layer (#23): ex.channels and conditional maps explain(..., channels=[...]).

Each measure and map is checked against an independent computation: the LRP partition
identity and R_k = Σ (channel k's map) under a conserving composite, Grad-CAM's
α_k·Σ A_k with plain hooks, FEM by hand; a channel change on a kept LRP forward runs
no model pass; the model is untouched after every call; bad input gets clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xaiwidgets as xw
from tests.conftest import count_forwards
from tests.helpers import assert_unchanged, snapshot

LAYER = "features.20"  # shapes-vgg's third block at 64 px: 64 channels on 8×8


@pytest.fixture(scope="module")
def vgg():
    model, preprocess, classes = xw.models.load("shapes-vgg")
    images = xw.datasets.shapes(n=3, size=64, seed=3).image.values
    return model, preprocess, classes, images


def bias_free(seed: int = 0) -> nn.Module:
    """A CNN without biases or BatchNorm: LRP-0 conserves relevance exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3, bias=False),
    ).eval()


def test_lrp_partition_of_channels_sums_to_the_full_map(vgg):
    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    full = ex.explain("lrp", target=3, reduce=None).values
    groups = [list(range(start, 64, 4)) for start in range(4)]  # interleaved partition
    parts = [ex.explain("lrp", target=3, layer=LAYER, channels=g, reduce=None) for g in groups]
    assert parts[0].attrs["channels"].tolist() == groups[0]
    assert parts[0].attrs["layer"] == LAYER
    np.testing.assert_allclose(sum(p.values for p in parts), full,
                               atol=1e-5 * np.abs(full).max())
    # reduce="sum" (the default) is linear too
    summed = sum(ex.explain("lrp", target=3, layer=LAYER, channels=g).values for g in groups)
    np.testing.assert_allclose(summed, ex.explain("lrp", target=3).values,
                               atol=1e-5 * np.abs(full).max())


def test_channel_relevance_is_the_sum_of_its_map_under_lrp_zero():
    model = bias_free()
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    ex = xw.Explainer(model, images, progress=False)
    R = ex.channels("3", "lrp", target=[0, 2], composite="zero")
    assert R.dims == ("image", "channel") and R.sizes["channel"] == 8
    logits = model(images).detach()
    # conservation: the channels' relevances add up to the target logit
    np.testing.assert_allclose(R.values.sum(1), [logits[0, 0], logits[1, 2]], rtol=1e-4)
    for k in (0, 5):
        rk = ex.explain("lrp", target=[0, 2], layer="3", channels=[k], composite="zero")
        np.testing.assert_allclose(rk.values.sum((1, 2)), R.values[:, k], rtol=1e-4,
                                   atol=1e-6)


def plain_gradcam_terms(model, inputs, layer, target):
    """α_k and A_k with a plain forward hook and autograd (independent of the engine)."""
    module = dict(model.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        logits = model(inputs)
        (grad,) = torch.autograd.grad(logits[range(len(inputs)), target].sum(), seen[0])
    finally:
        handle.remove()
    return grad.mean((2, 3)), seen[0].detach()


def test_gradcam_channel_terms_and_conditional_map_against_plain_hooks(vgg):
    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    target = [1, 3, 0]
    alpha, A = plain_gradcam_terms(model, preprocess(torch.as_tensor(images)), LAYER, target)
    terms = ex.channels(LAYER, "gradcam", target=target)
    np.testing.assert_allclose(terms.values, (alpha * A.sum((2, 3))).numpy(), rtol=1e-4,
                               atol=1e-5)
    chosen = [2, 7, 11, 40]
    cam = torch.relu((alpha[:, chosen, None, None] * A[:, chosen]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(1).values[:, None, None]
    high = cam.flatten(1).max(1).values[:, None, None]
    expected = ((cam - low) / (high - low).clamp(min=1e-12)).numpy()
    got = ex.explain("gradcam", target=target, layer=LAYER, channels=chosen)
    np.testing.assert_allclose(got.values, expected, atol=1e-4)
    # every channel: the unconditional map
    everything = ex.explain("gradcam", target=target, layer=LAYER, channels=range(64))
    np.testing.assert_allclose(everything.values, ex.explain("gradcam", target=target,
                                                             layer=LAYER).values, atol=1e-5)
    guided = ex.explain("guided_gradcam", target=target, layer=LAYER, channels=chosen)
    assert guided.dims == ("image", "y", "x") and guided.attrs["channels"].tolist() == chosen


def test_fem_shares_and_conditional_map_by_hand(vgg):
    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    A = ex.activations([LAYER])[LAYER].double().numpy()
    mean = A.mean((2, 3), keepdims=True)
    fired = A >= mean + 1.5 * A.std((2, 3), keepdims=True)
    terms = (mean[..., 0, 0] * fired.sum((2, 3)))
    shares = ex.channels(LAYER, "fem", K=1.5)
    np.testing.assert_allclose(shares.values, terms / terms.sum(1, keepdims=True), rtol=1e-4)
    chosen = [0, 3, 9]
    raw = (mean[:, chosen] * fired[:, chosen]).sum(1)  # Σ_{k∈S} μ_k B_k at 8×8
    got = ex.explain("fem", layer=LAYER, channels=chosen, K=1.5)
    assert got.attrs["channels"].tolist() == chosen
    small = F.interpolate(torch.as_tensor(raw)[:, None], size=(64, 64), mode="bilinear",
                          align_corners=False)[:, 0].numpy()
    small = (small - small.min((1, 2), keepdims=True)) / np.ptp(small, (1, 2))[:, None, None]
    np.testing.assert_allclose(got.values, small, atol=1e-4)


def test_activation_measure_is_each_channels_maximum(vgg):
    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes, progress=False)
    _, A = plain_gradcam_terms(model, preprocess(torch.as_tensor(images)), LAYER, [0, 0, 0])
    got = ex.channels(LAYER, "activation")
    np.testing.assert_allclose(got.values, A.amax((2, 3)).numpy(), rtol=1e-5)
    assert got.attrs["method"] == "activation" and got.attrs["layer"] == LAYER
    assert "class_name" in got.coords


def test_default_layer_is_the_last_feature_map(vgg):
    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    assert ex.channels(method="activation").attrs["layer"] == ex.default_layer()
    assert ex.explain("lrp", channels=[0]).attrs["layer"] == ex.default_layer()


def test_a_channel_change_on_a_kept_lrp_forward_runs_no_model_pass(vgg):
    model, preprocess, classes, images = vgg
    forwards, handle = count_forwards(model)  # travels into LRP's shadow copy
    try:
        ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
        ex.explain("lrp", target=3)
        ex.channels(LAYER, "lrp", target=3)
        before = len(forwards)
        maps = [ex.explain("lrp", target=3, layer=LAYER, channels=[k]) for k in (0, 5, 9)]
        ex.channels(LAYER, "lrp", target=1, composite="epsilon")  # target/rule change too
        ex.explain("lrp", target=1, layer=LAYER, channels=[5], composite="epsilon")
        assert len(forwards) == before, "a channel change ran the model"
        assert not np.allclose(maps[0].values, maps[1].values)
    finally:
        handle.remove()


def test_the_model_is_untouched_after_every_call(vgg):
    model, preprocess, classes, images = vgg
    before = snapshot(model)
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    for method in ("lrp", "gradcam", "fem", "activation"):
        ex.channels(LAYER, method)
    for method in ("lrp", "gradcam", "guided_gradcam", "fem"):
        ex.explain(method, layer=LAYER, channels=[1, 2])
    with pytest.raises(ValueError):
        ex.explain("lrp", layer=LAYER, channels=[999])
    assert_unchanged(model, before)


def test_bad_input_gets_clear_errors(vgg):
    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    with pytest.raises(ValueError, match="no channels.*Explainer.layers"):
        ex.channels("classifier.0", "activation")  # a Linear output
    with pytest.raises(ValueError, match="no channels"):
        ex.explain("lrp", layer="classifier.0", channels=[0])
    with pytest.raises(ValueError, match=r"channel 64 is out of range.*0\.\.63"):
        ex.explain("gradcam", layer=LAYER, channels=[3, 64])
    with pytest.raises(ValueError, match="channels is empty"):
        ex.explain("fem", layer=LAYER, channels=[])
    with pytest.raises(TypeError, match="channel indices"):
        ex.explain("fem", layer=LAYER, channels=[1.5])
    with pytest.raises(ValueError, match="no conditional map.*gradcam"):
        ex.explain("gradient", channels=[0])
    with pytest.raises(ValueError, match="no channel measure"):
        ex.channels(LAYER, "occlusion")
    with pytest.raises(ValueError, match="unknown layer"):
        ex.channels("features.99", "lrp")
    # fine again after the errors
    assert ex.explain("fem", layer=LAYER, channels=[0]).dims == ("image", "y", "x")


def test_the_crp_worked_example_of_the_docs():
    """docs/methods.md, Concepts: x = (1, 2), a = ReLU((x1 + x2, x2)), f = a1 + 2·a2 = 7."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(2, 2, 1, 1))
        head.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).eval()
    ex = xw.Explainer(model, torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1), progress=False)
    R = ex.channels("1", "lrp", target=0, composite="zero")
    np.testing.assert_allclose(R.values, [[3.0, 4.0]], rtol=1e-5)
    maps = [ex.explain("lrp", target=0, layer="1", channels=[k], composite="zero",
                       reduce=None).values[0, :, 0, 0] for k in (0, 1)]
    np.testing.assert_allclose(maps, [[1.0, 2.0], [0.0, 4.0]], rtol=1e-5, atol=1e-6)


def test_channels_and_conditional_maps_on_clips():
    model, preprocess, _ = xw.models.load("shapes-video")
    clip = xw.datasets.moving_shapes(n=1, seed=0).image.values
    ex = xw.Explainer(model, clip, preprocess=preprocess, progress=False)
    layer = ex.default_layer()
    count = ex.context.shapes()[layer][1]
    for method in ("lrp", "gradcam", "fem", "activation"):
        assert ex.channels(layer, method).shape == (1, count), method
    for method in ("gradcam", "fem"):
        assert ex.explain(method, layer=layer, channels=[0]).dims == ("image", "t", "y", "x")
    full = ex.explain("lrp", reduce=None).values
    halves = [list(range(start, count, 2)) for start in (0, 1)]
    parts = sum(ex.explain("lrp", layer=layer, channels=h, reduce=None).values for h in halves)
    np.testing.assert_allclose(parts, full, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("rows", [1, 5, 8, 100])
def test_box_contributions_of_lrp_equal_the_channel_loop(vgg, rows):
    """Batched CRP (``rows`` channels per backward; 5 leaves a partial last pass) against
    one ``ex.explain(channels=[k])`` per channel summed over the box."""
    from xaiwidgets.concepts.regions import box_contributions

    model, preprocess, classes, images = vgg
    before = snapshot(model)
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    box = (10, 5, 41, 50)
    loop = np.array([ex.explain("lrp", target=3, layer=LAYER, channels=[k]).values[1][
        10:41, 5:50].sum(dtype=np.float64) for k in range(64)])
    seen = []
    batched = box_contributions(ex, LAYER, box, "lrp", target=3, image=1, rows=rows,
                                progress=lambda done, total: seen.append((done, total)))
    assert batched.dims == ("channel",) and batched.attrs["region"] == list(box)
    np.testing.assert_allclose(batched.values, loop, rtol=1e-5, atol=1e-6 * np.abs(loop).max())
    np.testing.assert_array_equal(np.argsort(-batched.values, kind="stable")[:10],
                                  np.argsort(-loop, kind="stable")[:10])
    passes = -(-64 // min(rows, 64))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == passes
    assert seen[-1] == (64, 64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["gradcam", "fem", "activation"])
def test_box_contributions_in_closed_form_equal_the_channel_loop(vgg, method):
    """Grad-CAM / FEM: contribution × the share of the channel's normalised conditional
    map in the box, each map from ex.explain; activation: the upsampled maximum there."""
    from xaiwidgets.concepts.regions import box_contributions

    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    target = 2 if method == "gradcam" else None
    y0, x0, y1, x1 = box = (0, 20, 30, 64)
    expected = []
    if method == "activation":
        acts = ex.activations([LAYER])[LAYER][2:3]
        up = F.interpolate(acts, size=(64, 64), mode="bilinear", align_corners=False)[0]
        expected = up[:, y0:y1, x0:x1].flatten(1).amax(1).double().numpy()
    else:
        terms = ex.channels(LAYER, method, target=target).values[2]
        for k in range(64):
            m = ex.explain(method, target=target, layer=LAYER, channels=[k]).values[2]
            m = m.astype(np.float64)
            expected.append(0.0 if m.sum() == 0 else terms[k] * m[y0:y1, x0:x1].sum() / m.sum())
    batched = box_contributions(ex, LAYER, box, method, target=target, image=2)
    np.testing.assert_allclose(batched.values, expected, rtol=1e-6, atol=1e-9)


def test_box_contributions_refuse_bad_input(vgg):
    from xaiwidgets.concepts.regions import box_contributions

    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images[:1], preprocess=preprocess, progress=False)
    with pytest.raises(ValueError, match="inside the 64×64 input"):
        box_contributions(ex, LAYER, (0, 0, 65, 10))
    with pytest.raises(ValueError, match="y0 < y1"):
        box_contributions(ex, LAYER, (5, 0, 5, 10))
    with pytest.raises(ValueError, match="no box measure"):
        box_contributions(ex, LAYER, (0, 0, 8, 8), "gradient")
    with pytest.raises(ValueError, match="rows="):
        box_contributions(ex, LAYER, (0, 0, 8, 8), rows=0)
    with pytest.raises(ValueError, match="no channels"):
        box_contributions(ex, "classifier.0", (0, 0, 8, 8))


def test_box_contributions_take_fewer_rows_when_memory_is_short(vgg, monkeypatch):
    """A repeated forward that would not fit ``regions.MEMORY`` gets fewer rows (here 1:
    one backward per channel), with the same numbers."""
    from xaiwidgets.concepts import regions

    model, preprocess, classes, images = vgg
    ex = xw.Explainer(model, images[:1], preprocess=preprocess, progress=False)
    box = (0, 0, 32, 32)
    wide = regions.box_contributions(ex, LAYER, box, target=1)
    monkeypatch.setattr(regions, "MEMORY", 1)
    seen = []
    narrow = regions.box_contributions(ex, LAYER, box, target=1,
                                       progress=lambda done, total: seen.append(done))
    assert seen == list(range(1, 65))
    np.testing.assert_allclose(narrow.values, wide.values, rtol=1e-5,
                               atol=1e-6 * np.abs(wide.values).max())


def test_nmf_factorises_the_positive_part_of_an_activation_that_dips_below_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    images = torch.rand(3, 3, 16, 16) - 0.5
    ex = xw.Explainer(model, images, progress=False)
    gelu = ex.activations(["1"])["1"]
    assert float(gelu.min()) < 0  # GELU dips to -0.17
    fac = xw.concepts.factorize(ex, "1", n=2, seed=0)
    expected = float(gelu.clamp(max=0).abs().sum() / gelu.abs().sum())
    assert fac.attrs["clamped_share"] == pytest.approx(expected, rel=1e-6) and expected > 0
    assert float(fac.maps.min()) >= 0 and float(fac.basis.min()) >= 0
    with pytest.raises(ValueError, match="negative activations.*activation"):
        xw.concepts.factorize(ex, "0", n=2)  # a convolution's signed output stays refused
