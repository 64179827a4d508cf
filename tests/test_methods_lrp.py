"""LRP: docs/methods.md's worked example, conservation, rule properties, agreement with zennit's
own composites (reference used only here) and clean-up of the model."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import densenet121, resnet18, vgg11
from torchvision.models.resnet import BasicBlock, ResNet
from zennit.attribution import Gradient
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
)
from zennit.rules import Epsilon
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

import xaiwidgets as xw
from xaiwidgets.families.lrp import (
    CONSERVATION_TOLERANCE,
    LRPWarning,
    make_composite,
    rule,
)

from .helpers import assert_model_unchanged, model_snapshot, randomise_batchnorms
from .lrp_reference import relevance

# ---------------------------------------------------------------- SPEC worked example
# x = (1, 2); hidden z = (x1 + 2 x2, -x1 + x2) = (5, 1); y = a1 - 2 a2 = 3 (no biases)
HIDDEN = [[1.0, 2.0], [-1.0, 1.0]]
OUT = [1.0, -2.0]


def spec_mlp() -> nn.Sequential:
    first, second = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    first.weight.data = torch.tensor(HIDDEN)
    second.weight.data = torch.tensor([OUT])
    return nn.Sequential(first, nn.ReLU(), second)


@pytest.mark.parametrize("kind, params, expected", [
    ("zero", {}, (3.0, 0.0)),
    ("alpha_beta", {"alpha": 1.0, "beta": 0.0}, (1.0, 2.0)),
    ("zplus", {}, (1.0, 2.0)),
    ("alpha_beta", {"alpha": 2.0, "beta": 1.0}, (4.0, 4.0)),
    ("gamma", {"gamma": 0.25}, (2.333333, 0.666667)),
    ("epsilon", {"epsilon": 1.0}, (1.833333, 1.333333)),
])
def test_spec_worked_example_rule_at_first_layer(kind, params, expected):
    composite = SpecialFirstLayerMapComposite(
        layer_map=[(nn.Linear, rule("zero"))], first_map=[(nn.Linear, rule(kind, **params))])
    r = relevance(spec_mlp(), torch.tensor([[1.0, 2.0]]), torch.tensor([0]), composite)
    np.testing.assert_allclose(r[0].numpy(), expected, rtol=1e-5)


def test_alpha_beta_without_alpha_minus_beta_equal_one():
    # α3β1 by hand: positive parts P = (1, 4)/5·5 + (0, 2)/2·(-2) = (1, 2),
    # negative parts N = (-1, 0)/(-1)·(-2) = (-2, 0); R = 3P - N = (5, 6)
    composite = SpecialFirstLayerMapComposite(
        layer_map=[(nn.Linear, rule("zero"))],
        first_map=[(nn.Linear, rule("alpha_beta", alpha=3.0, beta=1.0))])
    r = relevance(spec_mlp(), torch.tensor([[1.0, 2.0]]), torch.tensor([0]), composite)
    np.testing.assert_allclose(r[0].numpy(), (5.0, 6.0), rtol=1e-5)


def spec_cnn(identity_first: bool = False) -> nn.Sequential:
    """The worked example as 1x1 convolutions on (1, 3, 1, 1) inputs (third channel 0)."""
    hidden = nn.Conv2d(3, 2, 1, bias=False)
    hidden.weight.data = torch.tensor([HIDDEN[0] + [0.0], HIDDEN[1] + [0.0]]).reshape(2, 3, 1, 1)
    head = nn.Linear(2, 2, bias=False)
    head.weight.data = torch.tensor([OUT, [0.0, 0.0]])
    layers = [hidden, nn.ReLU(), nn.Flatten(), head]
    if identity_first:  # z^B on an identity layer passes relevance through unchanged
        identity = nn.Conv2d(3, 3, 1, bias=False)
        identity.weight.data = torch.eye(3).reshape(3, 3, 1, 1)
        layers.insert(0, identity)
    return nn.Sequential(*layers)


SPEC_X = torch.tensor([1.0, 2.0, 0.0]).reshape(1, 3, 1, 1)


@pytest.mark.parametrize("params, expected", [
    ({"composite": "zero"}, (3.0, 0.0)),
    ({"composite": "alpha_beta", "alpha": 1.0, "beta": 0.0}, (1.0, 2.0)),
    ({"composite": "alpha_beta", "alpha": 1.0}, (1.0, 2.0)),  # beta = alpha - 1
    ({"composite": "alpha_beta", "beta": 0.0}, (1.0, 2.0)),  # alpha = beta + 1
    ({"composite": "alpha_beta"}, (4.0, 4.0)),  # defaults α = 2, β = 1
    ({"composite": "epsilon_plus"}, (1.0, 2.0)),  # α1β0 on conv, ~LRP-0 on dense
    # ε = 1 on both layers: R_hidden = (5, -2)·3/4, then R_x = (1.375, 1.0)
    ({"composite": "epsilon", "epsilon": 1.0}, (1.375, 1.0)),
])
def test_spec_example_through_the_public_api(params, expected):
    r = xw.explain(spec_cnn(), SPEC_X, "lrp", target=0, reduce=None, **params)
    np.testing.assert_allclose(r.values[0, :, 0, 0], expected + (0.0,), rtol=1e-5, atol=1e-6)


def test_gamma_composite_on_the_spec_example():
    r = xw.explain(spec_cnn(identity_first=True), SPEC_X, "lrp", target=0, reduce=None,
                   composite="epsilon_gamma_box", gamma=0.25)
    np.testing.assert_allclose(r.values[0, :, 0, 0], (2.333333, 0.666667, 0.0), rtol=1e-5,
                               atol=1e-6)


def test_alpha_beta_resolution_and_attrs():
    ex = xw.Explainer(spec_cnn(), SPEC_X)
    r = ex.explain("lrp", target=0, composite="alpha_beta", alpha=3.0)
    assert (r.attrs["alpha"], r.attrs["beta"], r.attrs["composite"]) == (3.0, 2.0, "alpha_beta")
    r = ex.explain("lrp", target=0, composite="alpha_beta", alpha=3.0, beta=1.0)
    assert (r.attrs["alpha"], r.attrs["beta"]) == (3.0, 1.0)  # α − β = 1 not required
    default = ex.explain("lrp", target=0)
    assert default.attrs["composite"] == "epsilon_plus_flat"
    assert default.attrs["epsilon"] == 1e-6 and default.attrs["gamma"] == 0.25
    with pytest.raises(ValueError, match="alpha"):
        ex.explain("lrp", composite="alpha_beta", alpha=0.5)
    with pytest.raises(ValueError, match="beta"):
        ex.explain("lrp", composite="alpha_beta", beta=-1.0)
    with pytest.raises(ValueError, match="composite"):
        ex.explain("lrp", composite="gamma")


# ------------------------------------------------------------------- conservation
def bias_free_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16, bias=False), nn.ReLU(),
        nn.Linear(16, 4, bias=False),
    ).eval()


def target_logits(model, x, target):
    with torch.no_grad():
        return model(x).gather(1, torch.as_tensor(target)[:, None])[:, 0].numpy()


def test_lrp0_conserves_relevance_without_biases(images):
    model = bias_free_cnn()
    r = xw.explain(model, images, "lrp", composite="zero", target=[1, 2], reduce=None)
    np.testing.assert_allclose(r.values.sum(axis=(1, 2, 3)),
                               target_logits(model, images, [1, 2]), rtol=1e-4)


def resnet18_without_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
    model.fc.bias.data.zero_()
    return model.eval()


def test_lrp0_conserves_through_resnet18_residual_sums():
    model = resnet18_without_batchnorm()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ex = xw.Explainer(model, x)
    target = ex.logits().argmax(1)
    logit = target_logits(model, x, target)
    r = ex.explain("lrp", composite="zero", reduce=None).values.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(r, logit, rtol=1e-3)
    # without the explicit residual Sum, relevance crosses additions as a gradient and
    # is not conserved: the wrapper's canonizer is what makes the check pass
    naive = relevance(model, x, target, make_composite("zero", canonizers=[]))
    assert not np.allclose(naive.sum(dim=(1, 2, 3)).numpy(), logit, rtol=1e-2)


def test_epsilon_tends_to_lrp0_and_absorbs_relevance(images):
    # no average pool: its proportional split has a fixed 1e-6 stabiliser in every
    # composite but LRP-0, which would blur the limit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                          nn.Flatten(), nn.Linear(128, 4)).eval()
    ex = xw.Explainer(model, images)
    zero = ex.explain("lrp", composite="zero", reduce=None).values
    errors = [np.abs(ex.explain("lrp", composite="epsilon", epsilon=eps, reduce=None).values
                     - zero).max() for eps in (1e-1, 1e-3, 1e-5, 1e-9)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4 * np.abs(zero).max() < errors[0]
    large = ex.explain("lrp", composite="epsilon", epsilon=10.0, reduce=None).values
    assert np.abs(large).sum() < 0.5 * np.abs(zero).sum()


def all_conv_net() -> nn.Sequential:
    """No dense layer: every layer gets the conv rule, so α1β0 holds end to end (the
    average pool sees non-negative inputs, so its proportional split keeps signs)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 5, 1), nn.Flatten(),
    ).eval()


def test_alpha1_beta0_relevance_has_the_sign_of_the_logit():
    # exactly true: with β = 0 every neuron passes on relevance of its own sign, and the
    # output relevance is the target logit (inputs may be negative: a⁻w⁻ counts as positive)
    model = all_conv_net()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = [0, 1, 2, 3]
    sign = np.sign(target_logits(model, x, targets))[:, None, None, None]
    assert (sign > 0).any() and (sign < 0).any()
    r = xw.explain(model, x, "lrp", composite="alpha_beta", alpha=1.0, beta=0.0,
                   target=targets, reduce=None).values
    assert (r * sign >= 0).all()
    r21 = xw.explain(model, x, "lrp", composite="alpha_beta", target=targets, reduce=None).values
    assert (r21 * sign < 0).any()  # β > 0 brings counter-evidence


# ------------------------------------------------------------- agreement with zennit
@pytest.fixture(scope="module")
def torchvision_models():
    torch.manual_seed(0)
    vgg = vgg11(num_classes=10).eval()
    resnet = resnet18(num_classes=10).eval()
    for m in resnet.modules():  # non-trivial BatchNorm statistics to merge
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.eps = 0.0  # zennit's own merge is exact only then (see lrp.MergeBatchNorm)
    return {"vgg": (vgg, VGGCanonizer), "resnet": (resnet, ResNetCanonizer)}


def zennit_reference(name, canonizer, low, high):
    eps = 0.01
    if name == "epsilon":  # zennit has no ε-everywhere composite: override its conv rule
        return EpsilonPlus(epsilon=eps, canonizers=[canonizer()],
                           layer_map=[(Convolution, Epsilon(epsilon=eps))])
    return {
        "epsilon_plus": lambda: EpsilonPlus(epsilon=eps, canonizers=[canonizer()]),
        "epsilon_plus_flat": lambda: EpsilonPlusFlat(epsilon=eps, canonizers=[canonizer()]),
        "alpha_beta": lambda: EpsilonAlpha2Beta1(epsilon=eps, canonizers=[canonizer()]),
        "epsilon_gamma_box": lambda: EpsilonGammaBox(low=low, high=high, epsilon=eps,
                                                     gamma=0.25, canonizers=[canonizer()]),
    }[name]()


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
@pytest.mark.parametrize("name", ["epsilon", "epsilon_plus", "epsilon_plus_flat",
                                  "alpha_beta", "epsilon_gamma_box"])
def test_agrees_with_zennit_composites(torchvision_models, arch, name):
    model, canonizer = torchvision_models[arch]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([4])
    ours = xw.explain(model, x, "lrp", target=4, composite=name, epsilon=0.01,
                      reduce=None).values
    low, high = x.amin(), x.amax()  # what we derive without a preprocess
    # zennit's own canonizers change the model they run on under zennit 1.0 (BatchNorm eps,
    # conv biases, weights): the reference runs on a copy
    with Gradient(copy.deepcopy(model), zennit_reference(name, canonizer, low, high)) \
            as attributor:
        _, theirs = attributor(x.clone(), attr_output=lambda out: nn.functional.one_hot(
            target, out.shape[1]) * out)
    theirs = theirs.numpy()
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_lrp0_equals_gradient_times_input_on_vgg(torchvision_models):
    # for piecewise-linear nets LRP-0 is gradient × input (biases absorb the rest):
    # an independent check of the rule placement, max-pools and average pools
    model, _ = torchvision_models["vgg"]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ex = xw.Explainer(model, x)
    ours = ex.explain("lrp", composite="zero", target=7, reduce=None).values
    grad_x_input = (ex.context.input_gradient(x, torch.tensor([7])) * x).numpy()
    np.testing.assert_allclose(ours, grad_x_input, rtol=1e-3, atol=1e-4 * np.abs(ours).max())


def test_lrp0_equals_gradient_times_input_on_resnet_with_batchnorm():
    # BatchNorm merged (its eps included), residual sums split in proportion: still
    # gradient × input. In float64: float32 gradients of such nets can lose ~1e-3 to
    # cancellation, which would hide a real error of that size
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)).double()
    ex = xw.Explainer(model, x)
    ours = ex.explain("lrp", composite="zero", target=7, reduce=None).values
    grad_x_input = (ex.context.input_gradient(x, torch.tensor([7])) * x).numpy()
    np.testing.assert_allclose(ours, grad_x_input, rtol=1e-5, atol=1e-7 * np.abs(ours).max())


# ----------------------------------------------------------------------- clean-up
def small_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()


class Explode(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def model_state(model: nn.Module):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    patched = [name for name, m in model.named_modules()
               if "forward" in vars(m) or hasattr(m, "canonizer_sum")]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    biases = [m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d)]
    return hooks, patched, state, biases, [type(m) for m in model.modules()]


def assert_same(before, after):
    assert after[0] == before[0] == 0, "hooks left on the model"
    assert after[1] == before[1] == [], "canonizer left a patched forward or Sum module"
    assert after[2].keys() == before[2].keys()
    for key, value in before[2].items():
        assert torch.equal(value, after[2][key]), f"{key} changed"
    assert after[3] == before[3] and after[4] == before[4]


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_model_unchanged_after_success_and_after_an_error(composite):
    model = small_resnet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 32, 32)
    before = model_state(model)
    xw.explain(model, x, "lrp", composite=composite)
    assert_same(before, model_state(model))
    head = model.fc
    model.fc = Explode()  # fails after canonizers and hooks are in place
    try:
        with pytest.raises(RuntimeError, match="boom"):
            xw.explain(model, x, "lrp", composite=composite, target=0)
    finally:
        model.fc = head
    assert_same(before, model_state(model))


def test_unmergeable_batchnorm_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    before = model_state(model)
    r = xw.explain(model, torch.rand(1, 3, 8, 8), "lrp", target=0)
    assert np.isfinite(r.values).all()
    assert_same(before, model_state(model))


def test_box_bounds_come_from_the_preprocess():
    from xaiwidgets.families.lrp import input_bounds

    mean = torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1)
    ex = xw.Explainer(all_conv_net(), torch.rand(2, 3, 8, 8), preprocess=lambda x: (x - mean) / 0.2)
    low, high = input_bounds(ex)
    np.testing.assert_allclose(low[0, :, 0, 0], (-mean / 0.2).flatten(), rtol=1e-6)
    np.testing.assert_allclose(high[0, :, 0, 0], ((1 - mean) / 0.2).flatten(), rtol=1e-6)
    assert low.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("name", ["shapes-vgg", "shapes-resnet"])
def test_shipped_models_lrp0_is_gradient_times_input_and_model_unchanged(name):
    # trained weights and BatchNorm statistics; float64 as above
    model, preprocess, _ = xw.models.load(name)
    model = model.double()
    images = torch.from_numpy(xw.datasets.shapes(n=2, seed=0).image.values).double()
    ex = xw.Explainer(model, images, preprocess=preprocess)
    before = model_state(model)
    ours = ex.explain("lrp", composite="zero", reduce=None).values
    grad_x_input = (ex.context.input_gradient(ex.inputs, ex.logits().argmax(1)) * ex.inputs).numpy()
    np.testing.assert_allclose(ours, grad_x_input, rtol=1e-5, atol=1e-7 * np.abs(ours).max())
    for composite in ("epsilon_plus_flat", "epsilon_gamma_box", "alpha_beta"):
        assert np.isfinite(ex.explain("lrp", composite=composite).values).all()
    assert_same(before, model_state(model))


# ------------------------------------------------- canonizers that check themselves
def lrp0_equals_gradient_times_input(model, x, target=1):
    """LRP-0 of a piecewise-linear float64 net is gradient × input (an independent check)."""
    ex = xw.Explainer(model, x.double())
    ours = ex.explain("lrp", composite="zero", target=target, reduce=None)
    grad = ex.context.input_gradient(ex.inputs, torch.tensor([target]))
    grad_x_input = (grad * ex.inputs).numpy()
    np.testing.assert_allclose(ours.values, grad_x_input, rtol=1e-6,
                               atol=1e-9 * np.abs(grad_x_input).max())
    return ours


def test_batchnorms_merge_by_the_forward_pass_not_the_declaration_order():
    from .helpers import OutOfOrder

    torch.manual_seed(0)
    model = randomise_batchnorms(OutOfOrder().eval()).double()
    before = model_snapshot(model)
    r = lrp0_equals_gradient_times_input(model, torch.rand(1, 3, 12, 12))
    # norm_a and norm_b merged (traced pairs); pre (BatchNorm -> ReLU -> conv) is a layer
    assert r.attrs["lrp_rules"].startswith("AdaptiveAvgPool2d: norm; BatchNorm2d: merged, zero;")
    assert_model_unchanged(model, before)


def test_densenet121_gets_lrp_maps_with_batchnorm_before_the_conv():
    torch.manual_seed(0)
    model = randomise_batchnorms(densenet121(num_classes=5).eval())
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = model_snapshot(model)
    with pytest.warns(LRPWarning, match="functional average pooling"):
        r = xw.explain(model, x, "lrp", target=2)
    assert np.isfinite(r.values).all() and np.abs(r.values).max() > 0
    assert "BatchNorm2d: epsilon, merged" in r.attrs["lrp_rules"]
    assert_model_unchanged(model, before)


class BranchReadsConv(nn.Module):
    """The conv's output is read by its BatchNorm and, functionally, by a concatenation:
    merging the BatchNorm into the conv would change the second reader."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        c2 = self.conv2(torch.relu(self.conv(x)))
        y = torch.relu(self.bn(c2))
        both = torch.cat([y, c2 * 1.0], 1)  # a functional reader: only the logits see it
        return self.fc(nn.functional.adaptive_max_pool2d(both, 1).flatten(1))


def test_a_merge_that_changes_the_logits_is_undone_and_named():
    torch.manual_seed(0)
    model = randomise_batchnorms(BranchReadsConv().eval()).double()
    before = model_snapshot(model)
    with pytest.warns(LRPWarning, match=r"merging the BatchNorms \['bn'\].*changed"):
        r = lrp0_equals_gradient_times_input(model, torch.rand(1, 3, 8, 8))
    assert "BatchNorm2d: zero" in r.attrs["lrp_rules"]
    assert_model_unchanged(model, before)


class ShiftedBlock(BasicBlock):
    """A torchvision BasicBlock subclass whose forward is not torchvision's."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_a_residual_canonizer_that_changes_the_logits_raises_naming_the_blocks():
    model = ResNet(ShiftedBlock, [1, 1, 1, 1], num_classes=3).eval()
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match=r"canonizer changes this model's output.*layer1\.0"):
        xw.explain(model, torch.rand(1, 3, 32, 32), "lrp", target=0)
    assert_model_unchanged(model, before)


# -------------------------------------------------- what the rules cannot see
def test_hand_written_residual_add_and_functional_pooling_are_reported():
    from .helpers import HandResidual

    torch.manual_seed(0)
    model = HandResidual().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.bias = None
    with pytest.warns(LRPWarning) as caught:
        r = xw.explain(model, torch.rand(1, 3, 8, 8), "lrp", composite="zero", target=1)
    text = " ".join(str(w.message) for w in caught)
    assert "residual add" in text and "(the model's forward)" in text
    assert "functional average pooling or mean" in text
    # bias-free LRP-0 must conserve: the unseen operations break it, and that is reported
    assert r.attrs["conservation_error"][0] > CONSERVATION_TOLERANCE
    assert "misses the target logit" in text


def test_conservation_error_is_recorded_and_silent_where_relevance_is_conserved(images):
    model = bias_free_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LRPWarning)
        r = xw.explain(model, images, "lrp", composite="zero", target=[1, 2])
    logits = target_logits(model, images, [1, 2])
    expected = np.abs(r.values.sum(axis=(1, 2)) - logits) / np.abs(logits)
    np.testing.assert_allclose(r.attrs["conservation_error"], expected, rtol=1e-2, atol=1e-6)
    assert (r.attrs["conservation_error"] < 1e-4).all()
    assert r.attrs["lrp_unseen"] == ""


def test_functional_relu_is_seen_as_harmless_and_lrp0_still_exact():
    from .helpers import FunctionalNet

    torch.manual_seed(0)
    model = FunctionalNet().eval()
    with pytest.warns(LRPWarning, match="functional average pooling") as caught:
        model_out = xw.explain(model, torch.rand(1, 3, 8, 8), "lrp", composite="zero", target=0)
    assert "residual add" not in " ".join(str(w.message) for w in caught)
    assert "relu" not in model_out.attrs["lrp_unseen"]


# --------------------------------------------------------------- side effects
def test_two_composites_in_a_row_leave_torchvision_resnet_exactly_as_before():
    # under zennit 1.0 this used to zero every BatchNorm eps, add conv biases and,
    # on the second call, change the conv weights for good (.ci/run runs both versions)
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 32, 32)
    before = model_snapshot(model)
    first = xw.explain(model, x, "lrp", composite="epsilon_plus", target=1).values
    for composite in ("epsilon_gamma_box", "zero", "alpha_beta", "epsilon_plus"):
        last = xw.explain(model, x, "lrp", composite=composite, target=1).values
        assert_model_unchanged(model, before, composite)
    # the model's tensors are checked bit for bit above; the maps only to round-off:
    # torch's own CPU convolution backward is not bitwise reproducible with more
    # threads than cores (a plain autograd gradient of this ResNet18 differs in ~2,900
    # of 3,072 input pixels between two identical calls at 8 threads on 2 cores)
    np.testing.assert_allclose(first, last, rtol=1e-5, atol=1e-6 * np.abs(first).max())


def test_concurrent_lrp_in_threads_equals_serial():
    from concurrent.futures import ThreadPoolExecutor

    model = small_resnet()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    jobs = ["epsilon_plus_flat", "zero", "alpha_beta", "epsilon_gamma_box"] * 2
    serial = [xw.explain(model, x, "lrp", composite=c, target=[0, 1]).values for c in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(
            lambda c: xw.explain(model, x, "lrp", composite=c, target=[0, 1]).values, jobs))
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- overflow and scale
def overflowing_sigmoid_net(scale: float) -> nn.Sequential:
    """conv (no bias) -> Sigmoid -> mean -> linear × ``scale``: where a conv's receptive
    field is black its output is 0 but sigmoid(0) = 0.5 carries relevance, which LRP-ε
    divides by ε; with logits ~1e34 that overflows float32 (inf, and 0 · inf = NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Sigmoid(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model.eval()


def half_black(n: int = 2, size: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.rand(n, 3, size, size)
    x[..., : size // 2] = 0
    return x


def test_an_overflowing_map_warns_naming_the_cause_and_the_fix():
    from xaiwidgets.core.ops import NonFiniteWarning

    model, x = overflowing_sigmoid_net(1e36), half_black()
    with pytest.warns(NonFiniteWarning, match="overflowed float32") as caught:
        r = xw.Explainer(model, x, progress=False).explain("lrp", composite="epsilon")
    message = str(caught[0].message)
    assert "logits reach" in message and "float64" in message and "epsilon" in message
    assert np.isnan(r.values).any() and (r.attrs["non_finite"] > 0).all()
    # both fixes it names give finite maps, without the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        warnings.simplefilter("ignore", LRPWarning)  # sigmoid(0) = 0.5 acts as a bias
        wide = xw.Explainer(copy.deepcopy(model).double(), x.double(), progress=False)
        larger = xw.Explainer(model, x, progress=False)
        for r in (wide.explain("lrp", composite="epsilon"),
                  larger.explain("lrp", composite="epsilon", epsilon=1.0)):
            assert np.isfinite(r.values).all() and "non_finite" not in r.attrs


def test_lrp_on_overflowing_logits_says_so():
    model = overflowing_sigmoid_net(1e30)
    model.append(nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[-1].weight.mul_(1e30)  # logits ~1e58: inf in float32
    ex = xw.Explainer(model, half_black(), progress=False)
    with pytest.raises(ValueError, match="logits are NaN or infinite.*overflow.*float64"):
        ex.explain("lrp", target=0)


@pytest.mark.parametrize(("scale", "fix"), [(1e-5, "a smaller epsilon"),
                                            (1e-13, "epsilon cannot go below 1e-09")])
def test_an_epsilon_large_against_the_activations_is_named(images, scale, fix):
    # no bias, ε = 1e-6 <= 1e-3: the composite conserves, unless ε dwarfs z (EfficientNet-B0
    # with random weights has logits ~1e-14); the warning says so instead of "lost"
    model = bias_free_cnn()
    with torch.no_grad():
        model[-1].weight.mul_(scale / float(model(images).abs().max()))
    with pytest.warns(LRPWarning, match="is large against this model's activations") as caught:
        r = xw.explain(model, images, "lrp", composite="epsilon", target=[1, 2])
    message = " ".join(str(w.message) for w in caught)
    assert fix in message and "trained weights" in message and "although" not in message
    assert (r.attrs["conservation_error"] > CONSERVATION_TOLERANCE).all()
    if fix == "a smaller epsilon":  # and it works: ε = 1e-9 ≪ |z| conserves again
        with warnings.catch_warnings():
            warnings.simplefilter("error", LRPWarning)
            r = xw.explain(model, images, "lrp", composite="epsilon", target=[1, 2],
                           epsilon=1e-9)
        assert (r.attrs["conservation_error"] < 0.05).all()


def test_a_sigmoid_that_acts_as_a_bias_is_named_as_the_cause_of_lost_relevance():
    # black pixels give the bias-free conv 0, sigmoid(0) = 0.5 then carries relevance that
    # no pixel caused: the warning names the sigmoid, not an unseen operation
    model, x = overflowing_sigmoid_net(1.0), half_black()
    with pytest.warns(LRPWarning, match=r"activation modules '1' are not 0.*sigmoid\(0\)") \
            as caught:
        r = xw.Explainer(model, x, progress=False).explain("lrp", composite="epsilon")
    assert not any("outside the rules' view" in str(w.message) for w in caught)
    assert (r.attrs["conservation_error"] > 0.05).all()
    # where no conv output is 0, the same model conserves relevance: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", LRPWarning)
        r = xw.Explainer(model, torch.rand(2, 3, 8, 8), progress=False).explain(
            "lrp", composite="epsilon")
    assert (r.attrs["conservation_error"] < 1e-3).all()
