"""Any channel count (#14 item 5): grayscale (1), RGB and multispectral (C ≥ 1) inputs
work for every method; 28×28 inputs too (occlusion windows and LIME superpixels scale
with the image); rendering shows RGB, gray or a triplet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.rendering import display_image

from .conftest import cnn_methods


def model_for(channels: int) -> nn.Module:
    torch.manual_seed(channels)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("method", cnn_methods())
def test_every_method_on_grayscale_and_multispectral(method, channels):
    x = torch.rand(2, channels, 28, 28, generator=torch.Generator().manual_seed(0))
    ex = xw.Explainer(model_for(channels), x)
    result = ex.explain(method, target=[0, 2], **xw.get_method(method).quick_params)
    assert result.shape == (2, 28, 28) and np.isfinite(result.values).all()
    if xw.get_method(method).default_reduce != "map" and method not in ("gradcam", "fem"):
        full = ex.explain(method, target=[0, 2], reduce=None,
                          **xw.get_method(method).quick_params)
        if full.ndim == 4:
            assert full.sizes["channel"] == channels


def test_gradient_per_channel_matches_autograd():
    x = torch.rand(1, 5, 28, 28)
    model = model_for(5)
    got = xw.Explainer(model, x).explain("gradient", target=1, reduce=None).values[0]
    xr_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr_)[0, 1], xr_)
    np.testing.assert_allclose(got, grad[0].numpy(), rtol=1e-5, atol=1e-8)


def test_channel_mismatch_is_explained():
    with pytest.raises(ValueError, match="takes 3 channels.*grayscale.*repeat"):
        xw.Explainer(model_for(3), torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="takes 1 channels, but the inputs have 5"):
        xw.Explainer(model_for(1), torch.rand(1, 5, 28, 28))


def test_rendering_rgb_gray_and_triplets():
    rgb = np.random.rand(3, 4, 4)
    np.testing.assert_array_equal(display_image(rgb), rgb.transpose(1, 2, 0))
    gray = np.random.rand(1, 4, 4)
    shown = display_image(gray)
    assert shown.shape == (4, 4, 3)
    np.testing.assert_array_equal(shown[..., 0], gray[0])
    np.testing.assert_array_equal(shown[..., 2], gray[0])
    bands = np.random.rand(13, 4, 4)
    np.testing.assert_array_equal(display_image(bands, channels=(3, 2, 1)),
                                  bands[[3, 2, 1]].transpose(1, 2, 0))
    np.testing.assert_array_equal(display_image(bands), bands[:3].transpose(1, 2, 0))
    with pytest.raises(ValueError, match="three indices in 0..12"):
        display_image(bands, channels=(0, 1, 13))


# ------------------------------------------- defaults that scale with the image (#14)
class PixelSum(nn.Module):
    """Logit 1 = sum of channel 0, logit 0 = its negative (cheap, any size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0].flatten(1).sum(1)
        return torch.stack([-s, s], dim=1)


@pytest.mark.parametrize("side, window, stride, segments", [
    (28, 4, 2, 16), (32, 5, 2, 16), (224, 32, 16, 50)])
def test_defaults_scale_with_the_image(side, window, stride, segments):
    # the documented rules (docs/methods.md): window = side / 7 rounded, stride = half
    # of it; one superpixel per 1000 px within [16, 200]
    assert window == max(1, round(side / 7)) and stride == window // 2
    assert segments == min(200, max(16, round(side * side / 1000)))
    ex = xw.Explainer(PixelSum(), torch.rand(1, 1, side, side))
    for method, expected in (("occlusion", {"window": window, "stride": stride}),
                             ("lime", {"n_segments": segments})):
        m = xw.get_method(method)
        used = m.bind(ex.context, m.resolve_params({}))
        assert {k: used[k] for k in expected} == expected
    if side <= 32:  # what a result records is what was used
        result = ex.explain("occlusion", target=1)
        assert (result.attrs["window"], result.attrs["stride"]) == (window, stride)
        lime = ex.explain("lime", target=1, n_samples=8)
        assert lime.attrs["n_segments"] == segments


def test_explicit_window_wins_and_the_stride_follows_it():
    ex = xw.Explainer(PixelSum(), torch.rand(1, 1, 28, 28))
    assert ex.explain("occlusion", target=1, window=6).attrs["stride"] == 3
    r = ex.explain("occlusion", target=1, window=6, stride=4)
    assert (r.attrs["window"], r.attrs["stride"]) == (6, 4)
    assert ex.explain("lime", target=1, n_samples=8, n_segments=9).attrs["n_segments"] == 9


def digits_explainer(n: int = 2) -> xw.Explainer:
    from xaiwidgets.models import digits

    model, preprocess, _ = xw.models.load("digits")
    images, _ = digits.held_out(n)
    return xw.Explainer(model, images, preprocess=preprocess)


def test_occlusion_on_the_digits_model_is_a_fine_map():
    ex = digits_explainer()
    target = ex.logits().argmax(1)
    result = ex.explain("occlusion", target=target.tolist())
    assert (result.attrs["window"], result.attrs["stride"]) == (5, 2)
    raw = ex.explain("occlusion", target=target.tolist(), reduce=None)
    for image in range(2):
        values = result.values[image]
        assert np.isfinite(values).all() and values.std() > 0.05  # not constant
        # 15 × 15 windows: far more distinct values than the 3 × 3 windows a
        # 224²-sized 16-px window would give on 32² (at most 5 × 5 regions)
        assert len(np.unique(raw.values[image].round(6))) > 100


def test_lime_on_grayscale_digits_uses_16_superpixels():
    from xaiwidgets.families.lime import superpixels

    ex = digits_explainer(1)
    result = ex.explain("lime", target=int(ex.logits().argmax()), n_samples=64)
    assert result.attrs["n_segments"] == 16 and result.shape == (1, 32, 32)
    labels = superpixels(ex.images[0], 16)  # the 1-channel display image
    assert 4 <= labels.max() + 1 <= 32
    values = result.values[0]
    assert np.isfinite(values).all() and values.std() > 0
    for label in np.unique(labels):  # one coefficient per superpixel
        assert np.ptp(values[labels == label]) == pytest.approx(0.0, abs=1e-6)
