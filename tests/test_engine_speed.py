"""The engine's speed and memory shortcuts keep their results (benchmarks/README.md).

Each shortcut is checked against the slow way it replaced, and for the work it saves
(model calls, rows per call) with a forward pre-hook that counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core.ops import minmax, upsample
from xaiwidgets.core.scoped import relu_backward
from xaiwidgets.families.cam import gradcam_map


class Rows:
    """Counts model calls and the rows each one gets."""

    def __init__(self, model: nn.Module) -> None:
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(
            lambda _m, args: self.sizes.append(len(args[0])))


class Doubling(nn.Module):
    """Doubles its first conv's output *in place*, after that output was recorded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a.mul_(2)
        return self.head(a)


def test_uncopied_records_fall_back_to_copies_when_overwritten(images):
    model = Doubling().eval()
    ex = xw.Explainer(model, images)
    with torch.no_grad():
        expected = model.conv(images)
    np.testing.assert_allclose(ex.activations(["conv"])["conv"].numpy(), expected.numpy(),
                               rtol=1e-6)


def test_cold_fem_runs_one_forward(tiny_resnet, images):
    for target in (None, [1, 2]):
        ex = xw.Explainer(tiny_resnet, images)
        rows = Rows(tiny_resnet)
        result = ex.explain("fem", target=target)
        rows.handle.remove()
        assert len(rows.sizes) == 1
        predicted = tiny_resnet(images).argmax(1).tolist()
        assert list(result.attrs["target"]) == (predicted if target is None else target)


def test_guided_gradcam_one_forward_equals_two_pass_definition(tiny_cnn, images):
    # tiny_cnn's default layer is followed by nothing but a pool and a linear; use a
    # layer with a ReLU after it, where guided and plain gradients differ
    layer = "4"  # second conv: its ReLU ("5") lies between the layer and the logits
    target = torch.tensor([1, 3])
    ex = xw.Explainer(tiny_cnn, images)
    ex.logits()  # explicit targets are range-checked against the cached logits
    rows = Rows(tiny_cnn)
    fast = ex.explain("guided_gradcam", target=target.tolist(), layer=layer).values
    rows.handle.remove()
    assert len(rows.sizes) == 1
    cam = minmax(upsample(gradcam_map(ex, target, layer), ex.size))
    with relu_backward("guided"):
        guided = ex.input_gradient(ex.inputs, target)
    slow = minmax(guided.abs().amax(dim=1) * cam).numpy()
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    with relu_backward("guided"):  # the guided rule does change the layer's gradient
        _, guided_layer_grad = ex.layer_gradient(layer, target)
    assert not torch.allclose(guided_layer_grad, ex.layer_gradient(layer, target)[1])


def test_ig_and_smoothgrad_build_at_most_batch_size_rows_per_call(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    ex.logits()
    for method, params in (("integrated_gradients", {"steps": 9}), ("smoothgrad", {"n": 9})):
        rows = Rows(tiny_resnet)
        ex.explain(method, target=[0, 1], batch_size=5, **params)
        rows.handle.remove()
        assert max(rows.sizes) <= 5 and sum(rows.sizes) == 9 * len(images), rows.sizes


def test_summed_input_gradient_matches_stacked_gradients(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    target = torch.tensor([2, 0])
    samples = [images * (k + 1) / 5 for k in range(5)]
    stacked = ex.input_gradient(torch.cat(samples), target.repeat(5))
    expected = stacked.reshape(5, *images.shape).sum(0)
    built: list[int] = []
    seen = []  # samples built when each model call starts
    handle = tiny_resnet.register_forward_pre_hook(lambda *_: seen.append(len(built)))

    def sample(k: int) -> torch.Tensor:
        built.append(k)
        return samples[k]

    summed = ex.summed_input_gradient(sample, 5, target, batch_size=3)
    handle.remove()
    np.testing.assert_allclose(summed.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # 10 rows, 3 per call: each call has built only the samples its rows need
    assert built == [0, 1, 2, 3, 4] and seen == [2, 3, 5, 5]


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "gradcam", "guided_gradcam"])
@pytest.mark.parametrize("explicit", [False, True])
def test_first_gradient_call_runs_the_model_once_and_fills_the_prediction_cache(
        tiny_resnet, images, method, explicit):
    reference = xw.Explainer(tiny_resnet, images)
    predicted = reference.predict(top=1).label[:, 0].values.tolist()
    chosen = [(t + 1) % 4 for t in predicted] if explicit else predicted
    expected = reference.explain(method, target=chosen)
    ex = xw.Explainer(tiny_resnet, images)
    rows = Rows(tiny_resnet)
    # the predicted classes, or explicit ones checked against the same pass
    result = ex.explain(method, target=chosen if explicit else None)
    top = ex.predict(top=1)
    rows.handle.remove()
    assert len(rows.sizes) == 1  # one pass: the ReLU precondition read the construction pass
    assert top.label[:, 0].values.tolist() == predicted
    assert list(result.attrs["target"]) == chosen
    np.testing.assert_allclose(result.values, expected.values, rtol=1e-5, atol=1e-6)


def test_explicit_targets_out_of_range_fail_in_the_first_pass(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    with pytest.raises(ValueError, match="out of range"):
        ex.explain("gradcam", target=99)
