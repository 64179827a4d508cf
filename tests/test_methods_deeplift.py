"""DeepLIFT (rescale): worked example (docs/methods.md), summation to delta, Captum."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import xaiwidgets as xw
from xaiwidgets.families.deeplift import rescale_rule

from .conftest import Activated


def spec_net() -> nn.Sequential:
    """SPEC's example as 1x1 convolutions: z = (x1 + 2x2, -x1 + x2), y = a1 - 2a2."""
    hidden = nn.Conv2d(3, 2, 1, bias=False)
    hidden.weight.data = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 1.0, 0.0]]).reshape(2, 3, 1, 1)
    head = nn.Linear(2, 2, bias=False)
    head.weight.data = torch.tensor([[1.0, -2.0], [0.0, 0.0]])
    return nn.Sequential(hidden, nn.ReLU(inplace=True), nn.Flatten(), head)


def test_spec_worked_example():
    x = torch.tensor([1.0, 2.0, 0.0]).reshape(1, 3, 1, 1)
    reference = torch.tensor([2.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    r = xw.explain(spec_net(), x, "deeplift", target=0, baseline=reference, reduce=None)
    np.testing.assert_allclose(r.values[0, :, 0, 0], (-5 / 3, 8 / 3, 0.0), rtol=1e-6)
    assert r.attrs["rule"] == "rescale"
    # gradient × Δx would give (-3, 0): the rescale multipliers (1, 1/3) matter
    ex = xw.Explainer(spec_net(), x)
    grad = ex.context.input_gradient(x, torch.tensor([0]))
    np.testing.assert_allclose(((x - reference) * grad)[0, :2, 0, 0], (-3.0, 0.0))


def delta(model, x, reference, target):
    with torch.no_grad():
        out = model(x) - model(reference)
    return out.gather(1, torch.as_tensor(target)[:, None])[:, 0].double().numpy()


def assert_sums_to_delta(model, x, baseline, target, rtol=1e-4):
    ex = xw.Explainer(model, x)
    r = ex.explain("deeplift", target=target, baseline=baseline, reduce=None)
    reference = torch.full_like(x, baseline) if isinstance(baseline, float) else baseline
    expected = delta(model, x, reference, target)
    assert np.abs(expected).min() > 1e-3  # a meaningful relative check
    np.testing.assert_allclose(r.values.astype(np.float64).sum(axis=(1, 2, 3)), expected,
                               rtol=rtol)
    return r


def test_summation_to_delta_on_a_conv_net(tiny_cnn, images):
    # BatchNorm (eval), in-place ReLUs, a max-pool and an average pool
    tiny_cnn[1].running_mean.uniform_(-0.5, 0.5)
    tiny_cnn[1].running_var.uniform_(0.5, 2.0)
    assert_sums_to_delta(tiny_cnn, images, 0.0, [0, 3])
    assert_sums_to_delta(tiny_cnn, images, images.flip(0) * 0.5, [1, 2])


def test_summation_to_delta_with_a_relu_module_used_twice(tiny_resnet, images):
    # TinyBlock calls self.relu twice and adds in place, like torchvision's BasicBlock
    assert_sums_to_delta(tiny_resnet, images, 0.5, [0, 1])


def test_summation_to_delta_on_resnet18():
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = (model(x) - model(torch.zeros_like(x))).abs().argmax(1).tolist()
    assert_sums_to_delta(model, x, 0.0, target)


def test_max_pool_rule_keeps_summation_where_input_equals_reference():
    # half of the image equal to the reference: zero differences inside pooling windows
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    reference = x.clone()
    reference[..., 8:] = 0.3
    assert_sums_to_delta(model, x, reference, [0, 2])


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU,
                                        nn.LeakyReLU, nn.ReLU6])
def test_summation_to_delta_with_other_elementwise_activations(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), activation(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 6, 3, padding=1), activation(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = (model(x) - model(torch.zeros_like(x))).abs().argmax(1).tolist()
    assert_sums_to_delta(model, x, 0.0, target)


def captum_deeplift(model, x, reference, target):
    from captum.attr import DeepLift

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns about setting requires_grad
        return DeepLift(model).attribute(x, baselines=reference,
                                         target=torch.tensor(target)).detach().numpy()


@pytest.mark.parametrize("with_relu_net", [True, False])
def test_agrees_with_captum(with_relu_net):
    torch.manual_seed(0)
    if with_relu_net:
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * 64, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
        model[1].running_mean.uniform_(-0.5, 0.5)
    else:
        # Captum's max-pool rule is ours, but it breaks summation to delta where a ReLU
        # zeroes both input and reference before the pool (captum issue #1276), so the
        # max-pool comparison uses a net without that case
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(6 * 64, 5)).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    reference = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.2
    target = [0, 1, 4]
    ours = xw.explain(model, x, "deeplift", target=target, baseline=reference,
                      reduce=None).values
    theirs = captum_deeplift(model, x, reference, target)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_black_baseline_uses_the_preprocess():
    mean = torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1)
    model = spec_net()
    x = torch.rand(1, 3, 1, 1)
    ex = xw.Explainer(model, x, preprocess=lambda im: (im - mean) / 0.25)
    black = ex.explain("deeplift", target=0, baseline="black", reduce=None)
    explicit = ex.explain("deeplift", target=0, baseline=-mean / 0.25, reduce=None)
    np.testing.assert_allclose(black.values, explicit.values, rtol=1e-6)


def test_nothing_in_torch_is_replaced_and_the_rule_ends_with_the_block():
    originals = (F.relu, torch.relu, F.max_pool2d, torch.sigmoid, F.gelu)
    with pytest.raises(RuntimeError, match="boom"), rescale_rule(rows=2):
        assert (F.relu, torch.relu, F.max_pool2d, torch.sigmoid, F.gelu) == originals
        raise RuntimeError("boom")
    # outside a paired batch with autograd the functions compute as usual
    with rescale_rule(rows=2):
        x = torch.randn(3, 4)
        assert torch.equal(F.relu(x), x.clamp(min=0))
        y = x.clone()
        F.relu_(y)
        assert torch.equal(y, x.clamp(min=0))
    # after the block a paired batch gets plain gradients again
    both = torch.tensor([[1.0], [-1.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(torch.relu(both).sum(), both)
    assert grad.tolist() == [[1.0], [0.0]]


@pytest.mark.parametrize("name", ["shapes-vgg", "shapes-resnet"])
def test_summation_to_delta_on_the_shipped_models(name):
    model, preprocess, _ = xw.models.load(name)
    images = torch.from_numpy(xw.datasets.shapes(n=2, seed=0).image.values)
    x = preprocess(images)
    with torch.no_grad():
        target = model(x).argmax(1).tolist()
    assert_sums_to_delta(model, x, 0.0, target)


def strongest_target(model, x) -> list[int]:
    with torch.no_grad():
        return (model(x) - model(torch.zeros_like(x))).abs().argmax(1).tolist()


@pytest.mark.parametrize("act", [
    nn.Hardswish(), nn.Hardsigmoid(), nn.Mish(), nn.Softplus(), nn.SELU(),
    lambda t: t.relu(), lambda t: torch.relu(t), lambda t: t.clamp(min=0),
    lambda t: t.sigmoid(), lambda t: torch.nn.functional.threshold(t, 0.1, 0.0),
], ids=["hardswish", "hardsigmoid", "mish", "softplus", "selu", "Tensor.relu",
        "torch.relu", "clamp", "Tensor.sigmoid", "threshold"])
def test_every_way_to_call_an_activation_sums_to_delta_without_warnings(act):
    model = Activated(act)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeepLiftWarning
        r = assert_sums_to_delta(model, x, 0.0, strongest_target(model, x))
    assert max(r.attrs["delta_error"]) < 1e-4


def test_an_activation_applied_to_the_input_itself_gets_the_rule():
    model = nn.Sequential(nn.Tanh(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    model(x)  # materialise the lazy layer
    assert_sums_to_delta(model, x, 0.0, strongest_target(model, x))


def test_delta_error_attr_is_the_relative_summation_error(tiny_cnn, images):
    reference = images.flip(0) * 0.5
    r = xw.explain(tiny_cnn, images, "deeplift", target=[1, 2], baseline=reference,
                   reduce=None)
    expected_delta = delta(tiny_cnn, images, reference, [1, 2])
    total = r.values.astype(np.float64).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(r.attrs["delta_error"],
                               np.abs(total - expected_delta) / np.abs(expected_delta),
                               rtol=1e-3, atol=1e-6)
    assert len(r.attrs["delta_error"]) == 2


class Gated(nn.Module):
    """A squeeze-and-excitation gate (activation × sigmoid of its mean) and a LayerNorm:
    non-linearities without a rescale rule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm([6, 8, 8])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h * torch.sigmoid(h.mean((2, 3), keepdim=True))
        return self.head(self.norm(h).mean((2, 3)))


def test_non_linearities_without_a_rule_are_named_and_the_error_reported():
    model = Gated()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with pytest.warns(xw.families.deeplift.DeepLiftWarning) as caught:
        r = xw.explain(model, x, "deeplift", target=[0, 1], reduce=None)
    messages = " ".join(str(w.message) for w in caught)
    assert "Tensor.mul of two activations" in messages and "F.layer_norm" in messages
    # the recorded error is the true one, computed independently
    expected = delta(model, x, torch.zeros_like(x), [0, 1])
    total = r.values.astype(np.float64).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(r.attrs["delta_error"],
                               np.abs(total - expected) / np.abs(expected), rtol=1e-3)
    assert max(r.attrs["delta_error"]) > xw.families.deeplift.DELTA_TOLERANCE
    assert "miss f(x) - f(x') by" in messages and "above 1%" in messages


class Passes:
    """Records each model call: (rows, whether autograd was on)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.handle = model.register_forward_pre_hook(
            lambda _m, args: self.calls.append((len(args[0]), torch.is_grad_enabled())))


def test_the_reference_runs_once_without_autograd_and_the_backward_has_n_rows(
        tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    passes = Passes(tiny_resnet)
    first = ex.explain("deeplift", target=[0, 1], baseline=0.5, reduce=None)
    # a constant reference is one row without autograd; the images alone with autograd
    assert passes.calls == [(1, False), (2, True)]
    second = ex.explain("deeplift", target=[2, 3], baseline=0.5, reduce=None)
    assert passes.calls[2:] == [(2, True)]  # the reference's values are kept
    ex.explain("deeplift", target=[2, 3], baseline=images.flip(0), reduce=None)
    assert passes.calls[3:] == [(2, False), (2, True)]  # rows differ: not kept
    passes.handle.remove()
    # the kept reference gives what a fresh Explainer computes, summing to delta
    fresh = xw.Explainer(tiny_resnet, images).explain("deeplift", target=[2, 3],
                                                      baseline=0.5, reduce=None)
    np.testing.assert_array_equal(second.values, fresh.values)
    for r, target in ((first, [0, 1]), (second, [2, 3])):
        expected = delta(tiny_resnet, images, torch.full_like(images, 0.5), target)
        np.testing.assert_allclose(r.values.astype(np.float64).sum(axis=(1, 2, 3)), expected,
                                   rtol=1e-4)


class Branching(nn.Module):
    """A second ReLU only for inputs whose first activation is not all zero: the zero
    reference alone takes the other branch (its passes differ from the images')."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu, self.relu2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        if bool(h.sum() > 0):
            h = self.relu2(self.conv2(h))
        return self.head(h.mean((2, 3)))


def test_a_model_whose_passes_differ_runs_image_and_reference_as_one_batch():
    model = Branching().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    ex = xw.Explainer(model, x)
    passes = Passes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeepLiftWarning
        ours = ex.explain("deeplift", target=[0, 2], baseline=0.0, reduce=None)
    passes.handle.remove()
    # the input pass meets a ReLU the reference pass did not: [x; x'] instead, as Captum
    assert passes.calls == [(1, False), (2, True), (4, True)]
    theirs = captum_deeplift(model, x, torch.zeros_like(x), [0, 2])
    np.testing.assert_allclose(ours.values, theirs, rtol=1e-4,
                               atol=1e-5 * np.abs(theirs).max())
