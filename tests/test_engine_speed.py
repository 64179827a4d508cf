"""The engine's speed and memory shortcuts keep their results (benchmarks/README.md).

Each shortcut is checked against the slow way it replaced, and for the work it saves
(model calls, rows per call) with a forward pre-hook that counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum import attr as captum
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core.context import Context
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
    cam = minmax(upsample(gradcam_map(ex.context, target, layer), ex.size))
    with relu_backward("guided"):
        guided = ex.context.input_gradient(ex.inputs, target)
    slow = minmax(guided.abs().amax(dim=1) * cam).numpy()
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    with relu_backward("guided"):  # the guided rule does change the layer's gradient
        _, guided_layer_grad = ex.context.layer_gradient(layer, target)
    assert not torch.allclose(guided_layer_grad, ex.context.layer_gradient(layer, target)[1])


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
    stacked = ex.context.input_gradient(torch.cat(samples), target.repeat(5))
    expected = stacked.reshape(5, *images.shape).sum(0)
    built: list[int] = []
    seen = []  # samples built when each model call starts
    handle = tiny_resnet.register_forward_pre_hook(lambda *_: seen.append(len(built)))

    def sample(k: int) -> torch.Tensor:
        built.append(k)
        return samples[k]

    summed = ex.context.summed_input_gradient(sample, 5, target, batch_size=3)
    handle.remove()
    np.testing.assert_allclose(summed.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # 10 rows, 3 per call: each call has built only the samples its rows need
    assert built == [0, 1, 2, 3, 4] and seen == [2, 3, 5, 5]


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "gradcam", "guided_gradcam",
                                    "deeplift"])
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
    # one pass over the images: the ReLU precondition read the construction pass
    # (DeepLIFT's reference runs first, as one row without autograd)
    assert rows.sizes == [1] * (method == "deeplift") + [len(images)]
    assert top.label[:, 0].values.tolist() == predicted
    assert list(result.attrs["target"]) == chosen
    np.testing.assert_allclose(result.values, expected.values, rtol=1e-5, atol=1e-6)


def test_occlusion_scores_the_images_once_through_the_prediction_cache(tiny_resnet, images):
    n, windows = len(images), 4  # a 32² image, window 16, stride 16: 4 windows
    expected = xw.Explainer(tiny_resnet, images).explain(
        "occlusion", target=[1, 2], window=16, stride=16, batch_size=1)  # one row a call
    for target in ([1, 2], None):
        ex = xw.Explainer(tiny_resnet, images)
        rows = Rows(tiny_resnet)
        result = ex.explain("occlusion", target=target, window=16, stride=16,
                            batch_size=n * windows)
        ex.predict()
        rows.handle.remove()
        # the clean images once (the base scores, then the predictions, from one pass;
        # with target=None that pass comes first), then every window in one call
        assert rows.sizes == [n, n * windows], target
        if target is not None:  # the same map as with the scores of a pass of their own
            np.testing.assert_allclose(result.values, expected.values, rtol=1e-5, atol=1e-6)
    # the clean scores against a forward of the model itself
    with torch.no_grad():
        clean = tiny_resnet(images)[[0, 1], [1, 2]]
    ex = xw.Explainer(tiny_resnet, images)
    torch.testing.assert_close(ex.context.scores(ex.inputs, torch.tensor([1, 2])), clean)


def test_explicit_targets_out_of_range_fail_in_the_first_pass(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    with pytest.raises(ValueError, match="out of range"):
        ex.explain("gradcam", target=99)


# ------------------------------------------- Grad-CAM: autograd only after the layer
def full_autograd_layer_grad(model: nn.Module, x: torch.Tensor, layer: str,
                             target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow definition: the whole pass with autograd, ∂ logit / ∂ (last call's output)."""
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        outputs.append(output)
        return output.clone()  # later in-place ops must not change the recorded output

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        handle.remove()
    score = logits.gather(1, torch.tensor(target)[:, None]).sum()
    (grad,) = torch.autograd.grad(score, outputs[-1])
    return outputs[-1].detach(), grad


def grad_enabled_by_module(model: nn.Module) -> tuple[dict[str, bool], list]:
    """Forward hooks noting, per module, whether it ran with autograd on."""
    seen: dict[str, bool] = {}
    handles = [module.register_forward_hook(
        lambda _m, _i, _o, name=name: seen.__setitem__(name, torch.is_grad_enabled()))
        for name, module in model.named_modules() if name]
    return seen, handles


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2),
                                       num_init_features=16, num_classes=10).eval()


# inside a block (bn2's output gets ``out += identity`` in place), a block's first
# conv, and block outputs
@pytest.mark.parametrize("layer", ["layer2.0.bn2", "layer3.1.conv1", "layer3.0", "layer4.1"])
def test_layer_gradient_without_autograd_before_the_layer_matches_full_autograd(
        resnet18, layer):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = [3, 7]
    expected_act, expected_grad = full_autograd_layer_grad(resnet18, x, layer, target)
    ex = xw.Explainer(resnet18, x)
    act, grad = ex.context.layer_gradient(layer, torch.tensor(target))
    np.testing.assert_allclose(act.numpy(), expected_act.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=1e-4, atol=1e-7)
    # and Grad-CAM itself against Captum's LayerGradCam (its own full autograd pass)
    theirs = captum.LayerGradCam(resnet18, resnet18.get_submodule(layer)).attribute(
        x, target=target, relu_attributions=True)[:, 0]
    ours = gradcam_map(ex.context, torch.tensor(target), layer)
    np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-4,
                               atol=1e-5 * float(theirs.detach().abs().max()))


@pytest.mark.parametrize("layer", ["features.denseblock1.denselayer1.conv2",
                                   "features.transition1", "features.denseblock3"])
def test_layer_gradient_on_a_densenet_where_outputs_are_concatenated(densenet, layer):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = full_autograd_layer_grad(densenet, x, layer, [1, 4])
    act, grad = xw.Explainer(densenet, x).context.layer_gradient(layer, torch.tensor([1, 4]))
    for ours, theirs in zip((act, grad), expected, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-7)


def test_layer_run_twice_gives_the_last_calls_gradient(tiny_resnet, images):
    layer = "2.relu"  # TinyBlock's ReLU module runs twice per pass
    expected = full_autograd_layer_grad(tiny_resnet, images, layer, [0, 3])
    ctx = xw.Explainer(tiny_resnet, images).context
    act, grad = ctx.layer_gradient(layer, torch.tensor([0, 3]))
    for ours, theirs in zip((act, grad), expected, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-7)


def test_gradcam_records_no_autograd_before_its_layer(resnet18):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ex = xw.Explainer(resnet18, x)
    layer = "layer3.1"
    seen, handles = grad_enabled_by_module(resnet18)
    try:
        ex.explain("gradcam", target=2, layer=layer)
    finally:
        for handle in handles:
            handle.remove()
    order = list(seen)  # modules in the order they finished
    before = order[:order.index(layer) + 1]  # the layer itself runs without autograd
    assert not any(seen[name] for name in before)
    assert all(seen[name] for name in ("layer4.0", "layer4.1", "avgpool", "fc"))
    assert torch.is_grad_enabled()  # the hook's switch ended with the pass
    assert all(not m._forward_hooks for m in resnet18.modules())


def test_grad_mode_is_restored_when_the_pass_fails_after_the_layer(tiny_resnet, images):
    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom after the layer")

    model = nn.Sequential(*list(tiny_resnet)[:3], Failing()).eval()
    ex = Context(model, images)
    for outer in (True, False):
        with torch.set_grad_enabled(outer):
            with pytest.raises(RuntimeError, match="boom"):
                ex.layer_gradient("2", torch.tensor([0, 1]))
            assert torch.is_grad_enabled() is outer
    assert all(not m._forward_hooks for m in model.modules())


# ------------------------------- FEM: the pass stops at the layer once logits are cached
class Calls:
    """Counts the forward calls of each named module."""

    def __init__(self, model: nn.Module) -> None:
        self.count: dict[str, int] = {}
        self.handles = [module.register_forward_hook(
            lambda _m, _i, _o, name=name: self.count.__setitem__(name, self.count.get(name, 0) + 1))
            for name, module in model.named_modules() if name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def last_output(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """A whole pass without autograd; ``layer``'s last output (a copy, as recorded)."""
    outputs: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, output: outputs.append(output.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return outputs[-1]


def test_activations_inside_a_block_run_the_network_only_up_to_that_layer(resnet18):
    # a convolution inside a block (FEM refuses it: it is before the activation, but its
    # activations are still read, e.g. by Grad-CAM): the pass stops inside the block
    layer = "layer2.1.conv2"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    ex = xw.Explainer(resnet18, x)
    ex.logits()
    calls = Calls(resnet18)
    try:
        acts = ex.activations([layer])[layer]
    finally:
        calls.remove()
    order = list(ex.context.shapes())
    after = {name for name in order[order.index(layer) + 1:] if not name.endswith("relu")}
    assert layer in calls.count and not after & set(calls.count) and "layer2.1.bn2" in after
    np.testing.assert_allclose(acts.numpy(), last_output(resnet18, x, layer).numpy(), rtol=1e-6)
    assert all(not m._forward_hooks for m in resnet18.modules())


@pytest.mark.parametrize("layer", ["layer1.0", "layer2.0", "layer4.1"])
def test_fem_with_cached_logits_runs_the_network_only_up_to_its_layer(resnet18, layer):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    ex = xw.Explainer(resnet18, x)
    logits = ex.logits().clone()
    calls = Calls(resnet18)
    try:
        result = ex.explain("fem", layer=layer)
    finally:
        calls.remove()
    order = list(ex.context.shapes())  # modules in the order they finish
    # nothing after the layer ran (a block's ReLU module also runs before its conv2)
    after = {name for name in order[order.index(layer) + 1:] if not name.endswith("relu")}
    assert layer in calls.count and not after & set(calls.count) and "fc" in after
    np.testing.assert_allclose(ex.activations([layer])[layer].numpy(),
                               last_output(resnet18, x, layer).numpy(), rtol=1e-6)
    assert list(result.attrs["target"]) == logits.argmax(1).tolist()
    # the prediction cache kept the whole pass's logits; the model has no hook left
    assert torch.equal(ex.logits(), logits)
    assert torch.allclose(logits, resnet18(x), rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in resnet18.modules())


def test_early_stop_waits_for_the_last_call_of_a_module_run_twice(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    ex.logits()
    calls = Calls(tiny_resnet)
    try:
        acts = ex.activations(["2.relu", "2.conv1"])
    finally:
        calls.remove()
    assert calls.count["2.relu"] == 2 and "3" not in calls.count and "6" not in calls.count
    for layer in ("2.relu", "2.conv1"):
        np.testing.assert_allclose(acts[layer].numpy(),
                                   last_output(tiny_resnet, images, layer).numpy(), rtol=1e-6)


class OverwritesFirst(nn.Module):
    """``a`` is changed in place before the second recorded layer runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        a.mul_(3)
        return self.head(self.conv2(a))


def test_early_stopped_pass_still_detects_overwritten_records(images):
    model = OverwritesFirst().eval()
    ex = xw.Explainer(model, images)
    ex.logits()
    acts = ex.activations(["conv1", "conv2"])
    for layer in ("conv1", "conv2"):
        np.testing.assert_allclose(acts[layer].numpy(), last_output(model, images, layer).numpy(),
                                   rtol=1e-6)



def test_explicit_targets_need_no_prediction_pass(tiny_resnet, images):
    """The class count comes from the construction probe: checking explicit targets
    runs nothing, so a fresh Explainer's IG makes only its own steps·N rows of calls."""
    ex = xw.Explainer(tiny_resnet, images)
    rows = Rows(tiny_resnet)
    ex.explain("integrated_gradients", target=1, steps=2)
    rows.handle.remove()
    assert sum(rows.sizes) == 2 * len(images)
    with pytest.raises(ValueError, match="out of range"):
        ex.explain("integrated_gradients", target=4, steps=2)


class Tap(nn.Module):
    """Hands its input on (not an affine layer: the pass does not expect a change)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def test_a_record_changed_in_place_is_recomputed_with_copies_and_remembered(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Tap(), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        expected = model[0](images)  # signed: the ReLU after the tap must not show
    assert (expected < 0).any()
    passes = []
    handle = model[0].register_forward_hook(lambda *a: passes.append(1))
    try:
        # in-place ReLUs stay on without autograd: the tap's record is overwritten once,
        # seen by its version counter, and the pass runs again copying it
        first = xw.Explainer(model, images, progress=False)
        passes.clear()
        np.testing.assert_allclose(first.activations(["1"])["1"].numpy(), expected.numpy(),
                                   rtol=1e-6)
        assert len(passes) == 2
        # remembered for this model: the next Explainer copies at once, one pass
        second = xw.Explainer(model, images, progress=False)
        passes.clear()
        np.testing.assert_allclose(second.activations(["1"])["1"].numpy(), expected.numpy(),
                                   rtol=1e-6)
        assert len(passes) == 1
    finally:
        handle.remove()
    assert model[2].inplace is True
