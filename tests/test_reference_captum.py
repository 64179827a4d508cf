"""Agreement with Captum (used only in tests) on random-initialised torchvision models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum import attr as captum

import xaiwidgets as xw

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
    "vgg11": lambda: torchvision.models.vgg11(weights=None, num_classes=10),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, [3, 7]


def close(ours, theirs, rtol=1e-4):
    theirs = theirs.detach().numpy()
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def test_gradient(setup):
    model, x, target = setup
    ours = xw.explain(model, x, "gradient", target=target, reduce=None).values
    close(ours, captum.Saliency(model).attribute(x, target=target, abs=False))


def test_guided_backprop(setup):
    model, x, target = setup
    ours = xw.explain(model, x, "guided_backprop", target=target, reduce=None).values
    close(ours, captum.GuidedBackprop(model).attribute(x, target=target))


def test_deconvnet(setup):
    model, x, target = setup
    ours = xw.explain(model, x, "deconvnet", target=target, reduce=None).values
    close(ours, captum.Deconvolution(model).attribute(x, target=target))


def test_integrated_gradients(setup):
    model, x, target = setup
    ours = xw.explain(model, x, "integrated_gradients", target=target, steps=8,
                      reduce=None).values
    theirs = captum.IntegratedGradients(model).attribute(
        x, target=target, n_steps=8, method="riemann_right", baselines=0.0
    )
    close(ours, theirs, rtol=1e-3)


def test_gradcam(setup):
    model, x, target = setup
    ex = xw.Explainer(model, x)
    layer_name = ex.default_layer()
    layer = dict(model.named_modules())[layer_name]
    ours = ex.explain("gradcam", target=target).values
    theirs = captum.LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    theirs = captum.LayerAttribution.interpolate(theirs, (64, 64), "bilinear")[:, 0]
    low = theirs.amin(dim=(1, 2), keepdim=True)
    theirs = (theirs - low) / (theirs.amax(dim=(1, 2), keepdim=True) - low)
    theirs = theirs.nan_to_num(0.0)  # an all-zero CAM: ours is defined as zeros (docs/methods.md)
    close(ours, theirs, rtol=1e-3)


def test_occlusion(setup):
    model, x, target = setup
    ours = xw.explain(model, x, "occlusion", target=target, window=16, stride=8).values
    theirs = captum.Occlusion(model).attribute(
        x, target=target, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.0
    )
    # captum spreads the drop over the 3 channels; ours is one map per pixel
    close(ours, theirs[:, 0], rtol=1e-3)
