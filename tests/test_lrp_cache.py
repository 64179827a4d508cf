"""LRP keeps its canonized copy and one forward graph per Context: every composite,
parameter and target change is one backward pass on it, equal to a fresh computation;
the kept graph goes with the images, the weights and ``clear_cache``."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.resnet import BasicBlock, ResNet

import xaiwidgets as xw
from xaiwidgets.families import lrp as lrp_module
from xaiwidgets.families.lrp import engine as lrp_engine

from .helpers import assert_model_unchanged, model_snapshot, randomise_batchnorms
from .lrp_reference import relevance

#: (composite, parameters) in the order a user moves the sliders
CHANGES = [
    ("epsilon", {"epsilon": 1e-6}), ("epsilon", {"epsilon": 0.1}), ("epsilon", {"epsilon": 3.0}),
    ("epsilon_plus_flat", {"epsilon": 0.01}), ("epsilon_plus", {"epsilon": 1e-3}),
    ("epsilon_gamma_box", {"gamma": 0.25}), ("epsilon_gamma_box", {"gamma": 1.5}),
    ("alpha_beta", {"alpha": 2.0, "beta": 1.0}), ("alpha_beta", {"alpha": 3.0, "beta": 0.5}),
    ("zero", {}), ("epsilon", {"epsilon": 1e-6}),
]


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorms(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4).eval())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class CountCalls:
    """Counts forward calls of the model (a pre-hook registered before the Explainer
    exists travels into LRP's shadow copy, so its passes count too)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, 0
        model.register_forward_pre_hook(self.count)

    def count(self, *_: object) -> None:
        self.calls += 1


class ConvCounter(TorchDispatchMode):
    """Counts forward convolutions run by any code, backward passes included."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.convs += 1
        return func(*args, **(kwargs or {}))


def test_every_change_is_one_backward_and_equals_a_fresh_computation(images):
    model = small_resnet()
    counter = CountCalls(model)
    ex = xw.Explainer(model, images, progress=False)
    ex.explain("lrp", target=[1, 2])  # builds the canonized copy and keeps its forward
    before = counter.calls
    kept = [ex.explain("lrp", composite=c, target=[1, 2], reduce=None, **p) for c, p in CHANGES]
    assert counter.calls == before, "a parameter change ran the model"
    # a target change too: the forward graph does not depend on the target
    other = ex.explain("lrp", composite="epsilon", target=[3, 0], reduce=None)
    assert counter.calls == before
    model._forward_pre_hooks.popitem()  # fresh runs below are not counted
    # the changes do change the map (a rule reading stale parameters would not)
    assert not np.allclose(kept[1].values, kept[2].values)
    assert not np.allclose(kept[5].values, kept[6].values)
    assert not np.allclose(kept[7].values, kept[8].values)
    for (composite, params), result in zip(CHANGES, kept, strict=True):
        fresh = xw.explain(model, images, "lrp", composite=composite, target=[1, 2],
                           reduce=None, **params)
        np.testing.assert_allclose(result.values, fresh.values, rtol=1e-5,
                                   atol=1e-6 * np.abs(fresh.values).max(),
                                   err_msg=f"{composite} {params}")
        assert result.attrs["lrp_rules"] == fresh.attrs["lrp_rules"]
        np.testing.assert_allclose(result.attrs["conservation_error"],
                                   fresh.attrs["conservation_error"], rtol=1e-4, atol=1e-7)
    fresh = xw.explain(model, images, "lrp", composite="epsilon", target=[3, 0], reduce=None)
    np.testing.assert_allclose(other.values, fresh.values, rtol=1e-5,
                               atol=1e-6 * np.abs(fresh.values).max())


def test_epsilon_changes_re_evaluate_no_layer(images):
    # LRP-ε reads the kept layer outputs and runs each layer's own backward; zennit's
    # generic rule re-runs every convolution (z+ twice)
    ex = xw.Explainer(small_resnet(), images, progress=False)
    ex.explain("lrp", composite="epsilon", target=[1, 2])
    with ConvCounter() as epsilon:
        ex.explain("lrp", composite="epsilon", epsilon=0.5, target=[1, 2])
    with ConvCounter() as zplus:
        ex.explain("lrp", composite="epsilon_plus", target=[1, 2])
    assert epsilon.convs == 0
    assert zplus.convs >= 2 * 5  # α1β0 on every convolution but the first's special rule


def test_alpha_beta_zplus_and_gamma_layers_are_evaluated_once_per_kept_forward(images):
    # their parts x⁺w⁺ and x⁺w⁻ (after a ReLU x⁻ = 0) depend on no α, β, γ or ε: a change
    # re-runs no convolution, only the backward (equality: the tests above and below);
    # they are kept from a rule's second backward, so a one-shot call keeps nothing
    # extra, and one rule's at a time (z⁺ and α/β share theirs: the same stabilised parts)
    model = small_resnet()
    n = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    ex = xw.Explainer(model, images, progress=False)
    counts = []
    for composite, params in [("alpha_beta", {"alpha": 2.0, "beta": 1.0}),
                              ("alpha_beta", {"alpha": 3.0, "beta": 2.0}),
                              ("alpha_beta", {"alpha": 1.5, "beta": 0.5}),
                              ("epsilon_plus", {"epsilon": 0.1}),  # z⁺: α/β's parts
                              ("epsilon_plus", {"epsilon": 0.2}),
                              ("epsilon_gamma_box", {"gamma": 0.5}),  # γ: parts of its own
                              ("epsilon_gamma_box", {"gamma": 1.0}),
                              ("epsilon_gamma_box", {"gamma": 2.0}),
                              ("alpha_beta", {"alpha": 2.0, "beta": 1.0})]:
        with ConvCounter() as counter:
            ex.explain("lrp", composite=composite, target=[1, 2], **params)
        counts.append(counter.convs)
    # the first call also runs the forward pass; z^B (γ's first layer) evaluates its
    # 3 terms on every call; α/β after γ: γ's parts replaced α/β's, except on the
    # first layer (z^B under γ), which still holds α/β's
    assert counts[0] > 2 * n
    assert counts[1:] == [2 * n, 0, 0, 0, 2 * (n - 1) + 3, 2 * (n - 1) + 3, 3, 2 * (n - 1)]


def test_fused_stabiliser_and_sum_layout_give_zennits_numbers(images, monkeypatch):
    # LRP-ε layers, residual sums and the average pool (Norm) take the fused path:
    # kept sign, one addcmul, summand-major sums. With it switched off, zennit's own
    # rule code runs on every module instead: the maps must agree bit for bit
    model = small_resnet()
    changes = [0.1, 0.2, 0.1, 1e-6]  # the third and fourth read the kept signs
    fused_ex = xw.Explainer(model, images, progress=False)
    fused = [fused_ex.explain("lrp", composite="epsilon", epsilon=e, target=[1, 2],
                              reduce=None).values for e in changes]
    calls = []
    real_shift = lrp_engine._shift
    monkeypatch.setattr(lrp_engine, "_shift", lambda hook: calls.append(real_shift(hook)))
    generic_ex = xw.Explainer(model, images, progress=False)
    for e, ours in zip(changes, fused, strict=True):
        generic = generic_ex.explain("lrp", composite="epsilon", epsilon=e, target=[1, 2],
                                     reduce=None).values
        np.testing.assert_array_equal(ours, generic)
    # every conv, the linear head, the sums and the pool were fused-path candidates
    n_sums = sum(isinstance(m, BasicBlock) for m in model.modules())
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert sum(c is not None for c in calls) == len(changes) * (n_layers + n_sums + 1)
    np.testing.assert_array_equal(fused[0], fused[2])
    assert not np.array_equal(fused[0], fused[1])


@pytest.mark.parametrize("composite, param, values, used_per_call, convs_per_change", [
    # z^B first layer (3 terms), the conv after a conv falls back (4 γ terms, not kept)
    ("epsilon_gamma_box", "gamma", [0.25, 1.5, 0.0, 0.25], [True, True, False], 3 + 4),
    # the first layer sees the images (≥ 0); the fallback's α/β terms are kept too
    ("alpha_beta", "alpha", [2.0, 1.0, 3.0, 2.0], [True, True, False, True], 0),
    ("epsilon_plus", "epsilon", [0.1, 0.5, 1e-6, 0.1], [True, True, False, True], 0),
])
def test_nonnegative_input_path_equals_the_rules_own_terms(images, monkeypatch, composite, param,
                                                           values, used_per_call,
                                                           convs_per_change):
    # layers after a ReLU take the kept parts P = x⁺w⁺, N = x⁺w⁻ (γ: z + γ·P by
    # linearity); the one whose input has negative values (conv after conv, no ReLU
    # between) must fall back to the rule's own terms
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(),
                          nn.Linear(4, 3)).eval()
    used = []
    real = lrp_engine.nonnegative_layer

    def spy(*args):
        result = real(*args)
        used.append(result is not None)
        return result

    monkeypatch.setattr(lrp_engine, "nonnegative_layer", spy)
    ex = xw.Explainer(model, images, progress=False)
    fast = []
    for i, value in enumerate(values):
        with ConvCounter() as counter:
            fast.append(ex.explain("lrp", composite=composite, target=[0, 2], reduce=None,
                                   **{param: value}).values)
        if i >= 2:  # the parts kept from the second change: the fast layers run no conv
            assert counter.convs == convs_per_change
    # per call, in backward order: conv 4 and 3 fast, conv 2 falls back (its input has
    # negatives), then conv 1 unless it is γ's z^B first layer; the Linears get LRP-ε
    assert used == used_per_call * len(values)
    monkeypatch.setattr(lrp_engine, "nonnegative_layer", lambda *args: None)
    generic = xw.Explainer(model, images, progress=False)
    for value, ours in zip(values, fast, strict=True):
        theirs = generic.explain("lrp", composite=composite, target=[0, 2], reduce=None,
                                 **{param: value}).values
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    assert not np.allclose(fast[0], fast[1])
    np.testing.assert_allclose(fast[0], fast[3], rtol=1e-6, atol=0)


def test_kept_epsilon_equals_zennits_generic_rule(images):
    # the shortcut against zennit's own Epsilon hook (rule re-run on the layer)
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution
    from zennit.types import Linear as AnyLinear

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    torch.manual_seed(3)
    composite = LayerMapComposite([(Activation, Pass()), (AvgPool, Norm()),
                                   (Convolution, Epsilon(0.25)), (AnyLinear, Epsilon(0.25))])
    reference = relevance(model, images, torch.tensor([0, 2]), composite)
    ours = xw.explain(model, images, "lrp", composite="epsilon", epsilon=0.25, target=[0, 2],
                      reduce=None)
    np.testing.assert_allclose(ours.values, reference.numpy(), rtol=1e-5,
                               atol=1e-6 * reference.abs().max().item())


def test_in_place_change_of_a_layer_output_falls_back_to_the_rule():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            z = self.conv(x)
            z.mul_(2.0)  # changes the conv's output after the rule saw it
            return self.head(torch.relu(z).mean((2, 3)))

    torch.manual_seed(0)
    model, x = InPlace().eval(), torch.rand(1, 3, 8, 8)
    ex = xw.Explainer(model, x, progress=False)
    with pytest.warns(lrp_module.LRPWarning):
        kept = ex.explain("lrp", composite="epsilon", epsilon=0.3, target=1, reduce=None)
    # the changed output cannot serve as z: the generic rule re-runs the conv
    with pytest.warns(lrp_module.LRPWarning), ConvCounter() as again:
        second = ex.explain("lrp", composite="epsilon", epsilon=0.3, target=1, reduce=None)
    assert again.convs == 1
    np.testing.assert_array_equal(kept.values, second.values)
    with pytest.warns(lrp_module.LRPWarning):
        fresh = xw.explain(model, x, "lrp", composite="epsilon", epsilon=0.3, target=1,
                           reduce=None)
    np.testing.assert_allclose(kept.values, fresh.values, rtol=1e-5, atol=1e-7)


def test_weights_changed_in_place_rebuild_the_copy(images):
    model = small_resnet()
    ex = xw.Explainer(model, images, progress=False)
    ex.explain("lrp", composite="epsilon_plus", target=[1, 2])
    old = ex.context.memoized(lrp_module.canonized, None)
    with torch.no_grad():  # what a model-randomisation sanity check does
        model.fc.weight.normal_()
        model.layer1[0].bn1.running_mean.add_(0.3)
    changed = ex.explain("lrp", composite="epsilon_plus", target=[1, 2], reduce=None)
    assert ex.context.memoized(lrp_module.canonized, None) is not old
    fresh = xw.explain(model, images, "lrp", composite="epsilon_plus", target=[1, 2],
                       reduce=None)
    np.testing.assert_allclose(changed.values, fresh.values, rtol=1e-5,
                               atol=1e-6 * np.abs(fresh.values).max())


def test_the_kept_graph_is_released_with_the_cache_and_the_images(images):
    model = small_resnet()
    ex = xw.Explainer(model, images, progress=False)
    ex.explain("lrp", target=[1, 2])
    kept = ex.context.memoized(lrp_module.canonized, None)
    assert kept.keep and kept.logits.grad_fn is not None  # one graph, on this Context
    logits, leaf = weakref.ref(kept.logits), weakref.ref(kept.x)
    del kept
    ex.context.clear_cache()
    assert logits() is None and leaf() is None, "clear_cache left the graph alive"
    ex.explain("lrp", target=[1, 2])
    logits = weakref.ref(ex.context.memoized(lrp_module.canonized, None).logits)
    ex.set_images(images.flip(-1))  # new images: a new Context, the old graph goes
    assert logits() is None
    assert ex.context.memoized(lrp_module.canonized, None) is None


def test_one_call_without_a_context_keeps_nothing(images):
    model = small_resnet()
    kept = lrp_module.Canonized.build(model, images)
    first = kept.explain(torch.tensor([0, 1]), "epsilon", {})
    assert kept.logits is None and first.relevance.shape == images.shape
    with pytest.raises(RuntimeError, match="keep=False"):
        kept.explain(torch.tensor([0, 1]), "epsilon", {})


def test_model_unchanged_by_kept_copies_also_after_a_failing_rule(images, monkeypatch):
    from zennit import rules

    model = small_resnet()
    before = model_snapshot(model)
    ex = xw.Explainer(model, images, progress=False)
    good = ex.explain("lrp", composite="epsilon_plus", target=[1, 2]).values

    def failing(self, module, grad_input, grad_output):
        raise RuntimeError("injected rule failure")

    with monkeypatch.context() as patch:
        patch.setattr(rules.ZPlus, "backward", failing)
        with pytest.raises(RuntimeError, match="injected rule failure"):
            ex.explain("lrp", composite="epsilon_plus", target=[1, 2])
    assert_model_unchanged(model, before, "lrp with a failing kept backward")
    # the kept graph survives the failed backward pass
    np.testing.assert_array_equal(
        ex.explain("lrp", composite="epsilon_plus", target=[1, 2]).values, good)
    assert_model_unchanged(model, before, "lrp on a kept copy")


def test_threads_share_one_copy_one_at_a_time(images):
    model = small_resnet()
    ex = xw.Explainer(model, images, progress=False)
    jobs = [c for c, _ in CHANGES[:6]] * 2
    serial = [ex.explain("lrp", composite=c, target=[1, 2]).values for c in jobs]
    ex.context.clear_cache()
    seen = set()
    real = lrp_module.Canonized.build.__func__

    def build(cls, *args, **kwargs):
        seen.add(threading.get_ident())
        return real(cls, *args, **kwargs)

    lrp_module.Canonized.build = classmethod(build)
    try:
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(
                lambda c: ex.explain("lrp", composite=c, target=[1, 2]).values, jobs))
    finally:
        lrp_module.Canonized.build = classmethod(real)
    assert len(seen) == 1, "each thread built its own copy"
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("first, fast", [
    (nn.Conv2d(3, 6, 5, stride=2, padding=3, dilation=2), True),  # borders see fewer taps
    (nn.Conv2d(3, 6, (3, 1), stride=(1, 2), padding=(1, 0)), True),
    (nn.Conv2d(3, 6, 3, padding=1, groups=3), False),  # groups: zennit's own terms
])
def test_flat_first_layer_equals_zennits_flat_rule(images, monkeypatch, first, fast):
    # LRP-flat by the channel-summed mapped gradient spread over each window, against
    # zennit's EpsilonPlusFlat (its Flat rule runs the layer with kernels of ones)
    from zennit.composites import EpsilonPlusFlat

    torch.manual_seed(4)
    model = nn.Sequential(first, nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    used = []
    real = lrp_engine.flat_layer
    monkeypatch.setattr(lrp_engine, "flat_layer",
                        lambda *args: used.append(real(*args) is not None) or real(*args))
    targets = torch.tensor([0, 2])
    ours = xw.explain(model, images, "lrp", composite="epsilon_plus_flat", epsilon=0.1,
                      target=targets, reduce=None).values
    theirs = relevance(model, images, targets, EpsilonPlusFlat(epsilon=0.1)).numpy()
    assert used == [fast]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    assert np.abs(ours).max() > 0


def test_flat_first_linear_layer_equals_zennits_flat_rule():
    from zennit.composites import EpsilonPlusFlat

    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, targets = torch.randn(2, 1, 3, 4), torch.tensor([1, 2])
    ours = xw.explain(model, x, "lrp", composite="epsilon_plus_flat", target=targets,
                      reduce=None).values
    theirs = relevance(model, x, targets, EpsilonPlusFlat()).numpy()
    # every input of an image gets the same relevance: Σ_j R_j / (12 + ε)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())


@pytest.mark.parametrize("n, stride", [(1, (1, 1)), (1, (2, 2)), (2, (2, 1)), (3, (1, 3))])
def test_pointwise_input_gradient_is_the_transposed_convolution(n, stride):
    from xaiwidgets.families.lrp.fast_terms import pointwise_input_gradient

    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(7, 5, 1, 1, generator=generator)
    shape = torch.Size((n, 5, 9, 8))
    out = [(size - 1) // s + 1 for size, s in zip(shape[2:], stride, strict=True)]
    grad = torch.randn(n, 7, *out, generator=generator)
    theirs = torch.nn.grad.conv2d_input(shape, weight, grad, stride=stride)
    ours = pointwise_input_gradient(shape, weight, grad, stride)
    assert ours.shape == shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_channel_click_is_one_backward_from_the_layer_without_reconfiguring(images,
                                                                           monkeypatch):
    # after the first clicks: no model call, no forward convolution, the rules stay
    # set (no composite is made); the maps equal a fresh
    # Explainer's and the same click gives the same map bit for bit
    model = small_resnet()
    counter = CountCalls(model)
    ex = xw.Explainer(model, images, progress=False)
    clicks = [[0], [3], [0], [5, 7]]
    for channels in clicks[:2]:
        ex.explain("lrp", target=[1, 2], layer="layer3", channels=channels, reduce=None)
    made = []
    real = lrp_engine.make_composite
    monkeypatch.setattr(lrp_engine, "make_composite",
                        lambda *a, **k: made.append(a) or real(*a, **k))
    before = counter.calls
    with ConvCounter() as convs:
        maps = [ex.explain("lrp", target=[1, 2], layer="layer3", channels=channels,
                           reduce=None).values for channels in clicks]
    assert (counter.calls, convs.convs, made) == (before, 0, [])
    model._forward_pre_hooks.popitem()
    fresh = xw.Explainer(model, images, progress=False)
    for channels, ours in zip(clicks, maps, strict=True):
        theirs = fresh.explain("lrp", target=[1, 2], layer="layer3", channels=channels,
                               reduce=None).values
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    np.testing.assert_array_equal(maps[0], maps[2])
    assert not np.allclose(maps[0], maps[1])
    # a parameter change after the clicks reconfigures (and the kept denominators give
    # way to the new ε)
    made.clear()
    changed = ex.explain("lrp", target=[1, 2], layer="layer3", channels=[0], epsilon=0.5,
                         reduce=None).values
    assert len(made) == 1
    np.testing.assert_allclose(
        changed, fresh.explain("lrp", target=[1, 2], layer="layer3", channels=[0],
                               epsilon=0.5, reduce=None).values, rtol=1e-5,
        atol=1e-6 * np.abs(changed).max())
