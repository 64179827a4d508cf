"""Gradient family, CAM and occlusion against hand-worked and analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw

from .conftest import Activated


class Product(nn.Module):
    """Logit 0 = x[0,0,0] * x[1,0,0] (the SPEC's IG example); logit 1 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0, 0, 0] * x[:, 1, 0, 0]
        return torch.stack([p, torch.zeros_like(p)], dim=1)


def product_input() -> torch.Tensor:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = 2.0, 3.0
    return x


def test_gradient_of_linear_model_is_its_weight_row():
    torch.manual_seed(0)
    linear = nn.Linear(3 * 4 * 4, 5)
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(2, 3, 4, 4)
    a = xw.explain(model, x, "gradient", target=[3, 1], reduce=None)
    assert a.dims == ("image", "channel", "y", "x")
    expected = linear.weight.detach()[[3, 1]].reshape(2, 3, 4, 4).numpy()
    np.testing.assert_allclose(a.values, expected, rtol=1e-6, atol=1e-7)
    # default reduction: max over channels of |a| (the survey's RGB rule)
    d = xw.explain(model, x, "gradient", target=[3, 1])
    np.testing.assert_allclose(d.values, np.abs(expected).max(axis=1), rtol=1e-6)


def test_integrated_gradients_spec_example_right_riemann():
    a = xw.explain(Product(), product_input(), "integrated_gradients", target=0, steps=4,
                   reduce=None)
    assert a.values[0, 0, 0, 0] == pytest.approx(3.75)
    assert a.values[0, 1, 0, 0] == pytest.approx(3.75)
    exact = xw.explain(Product(), product_input(), "integrated_gradients", target=0, steps=4000,
                       reduce=None)
    assert exact.values[0, :2, 0, 0] == pytest.approx([3.0, 3.0], rel=1e-3)


def test_integrated_gradients_first_estimates_only_when_shown(monkeypatch):
    ex = xw.Explainer(Product(), product_input(), progress=False)
    offered = []
    monkeypatch.setattr(ex.context, "report_partial", lambda *args: offered.append(args))
    ex.explain("integrated_gradients", target=0, steps=4, batch_size=1)
    ex.explain("smoothgrad", target=0, n=4, batch_size=1)
    assert offered == []  # nobody draws estimates: no snapshot of the running sum
    monkeypatch.undo()
    shown = []
    with ex.context.partial_results(lambda done, total, estimate: shown.append(
            (done, total, estimate()[0, :2, 0, 0].tolist()))):
        final = ex.explain("integrated_gradients", target=0, steps=4, batch_size=1, reduce=None)
    assert not ex.context.wants_partial  # the block ended: no callback left behind
    # by hand: f = x0·x1 at (2, 3), ∇f(αx) = α(3, 2); steps in spread order α = 1/4,
    # 3/4, 2/4: the mean α so far is 1/4, 1/2, 1/2, so (x − 0)·mean ∇ = α·(6, 6)
    assert shown == [(1, 4, [1.5, 1.5]), (2, 4, [3.0, 3.0]), (3, 4, [3.0, 3.0])]
    assert final.values[0, :2, 0, 0].tolist() == [3.75, 3.75]


def test_integrated_gradients_completeness_on_a_cnn(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    with torch.no_grad():
        delta = tiny_resnet(images) - tiny_resnet(torch.zeros_like(images))
    target = delta.abs().argmax(dim=1).tolist()  # a well-conditioned relative check
    expected = delta[[0, 1], target].numpy()
    ig = ex.explain("integrated_gradients", target=target, steps=256, batch_size=100,
                    reduce=None)
    np.testing.assert_allclose(ig.values.sum(axis=(1, 2, 3)), expected, rtol=0.01)
    # batch_size only changes chunking, not the result
    small = ex.explain("integrated_gradients", target=target, steps=256, batch_size=7,
                       reduce=None)
    np.testing.assert_allclose(small.values, ig.values, rtol=1e-4, atol=1e-7)


def test_integrated_gradients_black_baseline_uses_preprocess(tiny_cnn, images):
    mean = torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1)

    def preprocess(x):
        return (x - mean) / 0.25

    ex = xw.Explainer(tiny_cnn, images, preprocess=preprocess)
    ig = ex.explain("integrated_gradients", target=1, steps=300, baseline="black", reduce=None)
    with torch.no_grad():
        delta = tiny_cnn(preprocess(images))[:, 1] - tiny_cnn(preprocess(0 * images))[:, 1]
    np.testing.assert_allclose(ig.values.sum(axis=(1, 2, 3)), delta.numpy(), rtol=0.02)


def two_layer():
    """x (3×1×2) → Linear(6→4) → ReLU → Linear(4→2); first-layer pre-activations mixed signs."""
    torch.manual_seed(3)
    first, second = nn.Linear(6, 4, bias=False), nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        second.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, -0.5], [0.3, 0.2, -1.0, 1.0]]))
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(inplace=True), second), first, second


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "deconvnet"])
def test_relu_backward_rules_on_two_layer_net(method):
    model, first, second = two_layer()
    x = torch.randn(1, 3, 1, 2, generator=torch.Generator().manual_seed(1))
    z = first(x.flatten(1))[0].detach()
    g = second.weight[0].detach()  # gradient of logit 0 w.r.t. the ReLU output
    if method == "gradient":
        back = g * (z > 0)
    elif method == "guided_backprop":
        back = g.clamp(min=0) * (z > 0)
    else:
        back = g.clamp(min=0)
    expected = (first.weight.detach().T @ back).reshape(1, 3, 1, 2)
    assert (z > 0).any() and (z <= 0).any() and (g < 0).any()
    a = xw.explain(model, x, method, target=0, reduce=None)
    np.testing.assert_allclose(a.values, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_guided_rules_reach_shared_and_functional_relus():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.relu(self.a(x.flatten(1)))
            h = torch.nn.functional.relu(h - 0.1)  # functional ReLU
            return self.b(self.relu(h - 0.2))      # the module used a second time

    model = Shared()
    x = torch.randn(1, 3, 1, 2, generator=torch.Generator().manual_seed(2))
    deconv = xw.explain(model, x, "deconvnet", target=1, reduce=None).values.ravel()
    # DeconvNet by hand: clamp the backward signal at every ReLU, ignore forward signs
    g = model.b.weight[1].detach().clamp(min=0)
    g = g.clamp(min=0)
    g = (model.a.weight.detach().T @ g.clamp(min=0))
    np.testing.assert_allclose(deconv, g.numpy(), rtol=1e-5, atol=1e-7)


def test_smoothgrad_of_linear_model_equals_gradient_and_is_seeded(tiny_cnn, images):
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    g = xw.explain(linear, images, "gradient", target=1)
    s = xw.explain(linear, images, "smoothgrad", target=1, n=5, sigma=0.3)
    np.testing.assert_allclose(s.values, g.values, rtol=1e-5, atol=1e-7)
    ex = xw.Explainer(tiny_cnn, images)
    a = ex.explain("smoothgrad", target=1, n=4, seed=1)
    b = ex.explain("smoothgrad", target=1, n=4, seed=1, batch_size=3)
    c = ex.explain("smoothgrad", target=1, n=4, seed=2)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a.values, c.values)


def test_smoothgrad_noise_scale_on_a_quadratic():
    class Square(nn.Module):
        def forward(self, x):
            s = (x ** 2).sum(dim=(1, 2, 3))
            return torch.stack([s, -s], dim=1)

    x = torch.linspace(0, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)
    s = xw.explain(Square(), x, "smoothgrad", target=0, n=4000, sigma=0.2, reduce=None)
    # E[2(x + e)] = 2x; the spread of the estimate is 2·σ/√n
    err = np.abs(s.values - 2 * x.numpy())
    assert err.mean() < 3 * 2 * 0.2 / np.sqrt(4000)


def test_gradcam_on_a_hand_built_conv_net():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -0.5], [0.2, 2.0]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cam = xw.explain(model, x, "gradcam", target=0, layer="1")
    a = torch.relu(conv(x))[0].detach()
    weights = head.weight[0].detach() / 64  # ∂ mean-pool / ∂ A = 1/(h·w)
    expected = torch.relu((weights[:, None, None] * a).sum(0))
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(cam.values[0], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert cam.attrs["layer"] == "1"


def test_guided_gradcam_is_guided_backprop_times_gradcam(tiny_cnn, images):
    ex = xw.Explainer(tiny_cnn, images)
    gg = ex.explain("guided_gradcam", target=2, layer="5").values
    guided = ex.explain("guided_backprop", target=2).values
    cam = ex.explain("gradcam", target=2, layer="5").values
    product = guided * cam
    span = product.max(axis=(1, 2), keepdims=True) - product.min(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(gg, (product - product.min(axis=(1, 2), keepdims=True)) / span,
                               rtol=1e-4, atol=1e-5)


def test_occlusion_of_a_pixel_sum_model():
    class PixelSum(nn.Module):
        def forward(self, x):
            s = x[:, 0].sum(dim=(1, 2))
            return torch.stack([s, 2 * s], dim=1)

    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    occ = xw.explain(PixelSum(), x, "occlusion", target=1, window=4, stride=3).values[0]
    # by hand: windows at 0,3,6 on each axis; drop = 2·Σ window of channel 0
    total, count = np.zeros((10, 10)), np.zeros((10, 10))
    for y in (0, 3, 6):
        for x0 in (0, 3, 6):
            total[y:y + 4, x0:x0 + 4] += 2 * x[0, 0, y:y + 4, x0:x0 + 4].sum().item()
            count[y:y + 4, x0:x0 + 4] += 1
    np.testing.assert_allclose(occ, total / count, rtol=1e-5)


RELU_RULE_METHODS = ["guided_backprop", "deconvnet", "guided_gradcam"]


@pytest.mark.parametrize("method", RELU_RULE_METHODS)
@pytest.mark.parametrize("act, names", [
    (nn.SiLU(), "F.silu.*SiLU"), (nn.GELU(), "F.gelu.*GELU"),
    (nn.LeakyReLU(0.1), "F.leaky_relu.*LeakyReLU"), (nn.Hardswish(), "F.hardswish.*Hardswish"),
])
def test_relu_rules_refuse_networks_without_relus(method, act, names):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"{method} changes the backward rule of ReLUs.*{names}"):
        xw.explain(Activated(act), x, method, target=0)


@pytest.mark.parametrize("method", RELU_RULE_METHODS)
@pytest.mark.parametrize("relu", [torch.relu, torch.nn.functional.relu,
                                  lambda t: t.relu(), lambda t: t.relu_()])
def test_relu_rules_reach_relus_written_as_functions_and_methods(method, relu):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    # the same layer for Guided Grad-CAM (the default follows the modules)
    layer = {"layer": "conv2"} if method == "guided_gradcam" else {}
    ruled = xw.explain(Activated(relu), x, method, target=0, reduce=None, **layer).values
    as_module = xw.explain(Activated(nn.ReLU()), x, method, target=0, reduce=None,
                           **layer).values
    np.testing.assert_array_equal(ruled, as_module)
    if method != "guided_gradcam":  # the rule changes the result: not the plain gradient
        plain = xw.explain(Activated(nn.ReLU()), x, "gradient", target=0, reduce=None).values
        assert not np.allclose(ruled, plain)


@pytest.mark.parametrize("written", [
    (lambda t: t.clamp(min=0), "Tensor.clamp\\(min=0\\)"),
    (lambda t: torch.nn.functional.threshold(t, 0.0, 0.0), "F.threshold\\(x, 0, 0\\)"),
    (lambda t: torch.maximum(t, torch.zeros(())), "torch.maximum\\(x, 0\\)"),
])
def test_relus_written_another_way_are_named_in_a_warning(written):
    act, name = written

    class Mixed(Activated):
        def forward(self, x):  # one real ReLU, one written another way
            x = act(self.conv2(torch.relu(self.conv1(x))))
            return self.head(x.mean((2, 3)))

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(xw.families.gradient.ReluRuleWarning, match=f"{name}.*not ReLU calls"):
        xw.explain(Mixed(nn.ReLU()), x, "guided_backprop", target=0)
    with pytest.raises(ValueError, match=name):  # with no real ReLU: refused, named
        xw.explain(Activated(act), x, "guided_backprop", target=0)


def test_other_activations_next_to_relus_keep_their_gradient_with_a_warning():
    class Gated(Activated):
        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = self.conv2(x) * torch.sigmoid(x.mean((2, 3), keepdim=True))
            return self.head(x.mean((2, 3)))

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(xw.families.gradient.ReluRuleWarning, match="torch.sigmoid.*keep"):
        xw.explain(Gated(nn.ReLU()), x, "deconvnet", target=0)
