"""Any channel count (#14 item 5): grayscale (1), RGB and multispectral (C ≥ 1) inputs
work for every method; 28×28 inputs too; rendering shows RGB, gray or a triplet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.rendering import display_image


def model_for(channels: int) -> nn.Module:
    torch.manual_seed(channels)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("method", xw.methods())
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
