"""Outputs users have (#13): tuple/dict outputs with ``output=``, single-logit binary
models, class lists of the wrong length, ``torch.compile``d models, constant maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import xaiwidgets as xw
from tests.conftest import make_tiny_cnn


class Wrapped(nn.Module):
    """The tiny CNN returning its logits inside a dict or a tuple."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = make_tiny_cnn()
        self.kind = kind

    def forward(self, x: torch.Tensor):
        logits = self.net(x)
        features = x.mean((2, 3))
        if self.kind == "dict":
            return {"features": features, "logits": logits}
        return features, logits


@pytest.mark.parametrize(("kind", "output"), [("dict", "logits"), ("tuple", 1),
                                              ("dict", lambda out: out["logits"])])
def test_tuple_and_dict_outputs_are_selected(kind, output, images):
    plain = xw.Explainer(make_tiny_cnn(), images).explain("gradient", target=2)
    ex = xw.Explainer(Wrapped(kind), images, output=output)
    np.testing.assert_allclose(ex.explain("gradient", target=2).values, plain.values,
                               rtol=1e-6)
    torch.testing.assert_close(ex.logits(), make_tiny_cnn()(images))


@pytest.mark.parametrize(("kind", "hint"), [("dict", "output='logits'"),
                                            ("tuple", "output=0")])
def test_unselected_outputs_are_refused_at_construction(kind, hint, images):
    # the message names the parts and suggests output=...; no explain call needed
    with pytest.raises(ValueError, match=hint) as info:
        xw.Explainer(Wrapped(kind), images)
    assert "(1, 4)" in str(info.value)  # the construction pass runs one image
    with pytest.raises(ValueError, match="does not select"):
        xw.Explainer(Wrapped("dict"), images, output="scores")


class OneLogit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_single_logit_model_is_binary(images):
    model = OneLogit().eval()
    z = model(images)[:, 0].detach()
    ex = xw.Explainer(model, images, classes=["no", "yes"])
    probs = ex.predict(top=2)
    # predict: sigmoid(z) for class 1, 1 - sigmoid(z) for class 0 (not a constant 1.0)
    p1 = torch.sigmoid(z).numpy()
    got = np.where(probs.label.values == 1, probs.values, 1 - probs.values)[:, 0]
    np.testing.assert_allclose(got, p1, rtol=1e-6)
    np.testing.assert_allclose(probs.values.sum(1), 1.0, rtol=1e-6)
    # class 1 is explained by z, class 0 by -z
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    for target, sign in ((1, 1.0), (0, -1.0)):
        got = ex.explain("gradient", target=target, reduce="sum").values
        np.testing.assert_allclose(got, sign * grad.sum(1).numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="out of range"):
        ex.explain("gradient", target=2)


class SimpleLRPModel(nn.Module):
    """Captum's ``SimpleLRPModel`` (tests/helpers/basic_models.py): x -> 2·1ᵀ -> ReLU
    -> 3·1ᵀ, one output. On x = [1, 2, 3] the output is 3·3·12 = 108 and LRP-0 gives
    each input its share x_i / 6 of it: [18, 36, 54] (Captum's expected values)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3, bias=False)
        self.linear.weight.data.fill_(2.0)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(3, 1, bias=False)
        self.linear2.weight.data.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear(x.flatten(1))))


@pytest.mark.parametrize("composite", ["zero", "epsilon"])
def test_lrp_follows_the_single_logit_convention(composite):
    # class 1 is z (Captum's [18, 36, 54]), class 0 is -z: its relevance is -[18, 36, 54]
    x = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    ex = xw.Explainer(SimpleLRPModel(), x, progress=False)
    for target, sign in ((1, 1.0), (0, -1.0)):
        got = ex.explain("lrp", target=target, composite=composite, reduce=None)
        np.testing.assert_allclose(got.values.ravel(), sign * np.array([18.0, 36.0, 54.0]),
                                   rtol=1e-5)
        np.testing.assert_allclose(got.attrs["conservation_error"], 0.0, atol=1e-5)
    # the predicted class is 1 (z = 108 > 0): both classes are in the prediction
    ex = xw.Explainer(SimpleLRPModel(), x, progress=False)
    default = ex.explain("lrp", composite="zero", reduce=None)
    assert int(default.target[0]) == 1
    assert ex.predict(top=2).label.values.tolist() == [[1, 0]]


@pytest.mark.filterwarnings("ignore:LRP.s rules cannot see")  # OneLogit's mean
def test_lrp_keeps_the_selected_logits_for_predict(images):
    # after one LRP call (its own pass fills the prediction cache) predict shows 2 classes
    ex = xw.Explainer(OneLogit().eval(), images, progress=False)
    ex.explain("lrp", target=0)
    probs = ex.predict(top=2)
    assert probs.shape == (len(images), 2)
    np.testing.assert_allclose(probs.values.sum(1), 1.0, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:LRP.s rules cannot see")  # Wrapped's features (a mean)
@pytest.mark.parametrize(("kind", "output"), [("tuple", 1), ("dict", "logits")])
def test_lrp_selects_the_output_like_every_method(kind, output, images):
    plain = xw.Explainer(make_tiny_cnn(), images, progress=False)
    ex = xw.Explainer(Wrapped(kind), images, output=output, progress=False)
    got = ex.explain("lrp", target=2, composite="epsilon")
    np.testing.assert_allclose(got.values, plain.explain("lrp", target=2,
                                                         composite="epsilon").values,
                               rtol=1e-5, atol=1e-6)
    assert ex.predict(top=4).shape == (len(images), 4)


def test_single_logit_perturbation_methods_are_not_flat(images):
    ex = xw.Explainer(OneLogit().eval(), images)
    mp = ex.explain("meaningful_perturbation", target=1, steps=5)
    assert float(np.abs(mp.values).max()) > 0  # the softmax of one logit was constant
    lime = ex.explain("lime", target=1, n_samples=16, n_segments=8)
    assert float(np.abs(lime.values).max()) > 0


def test_class_list_of_the_wrong_length_is_refused_at_construction(tiny_cnn, images):
    with pytest.raises(ValueError, match="3 class names for a model with 4 outputs"):
        xw.Explainer(tiny_cnn, images, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="single logit"):
        xw.Explainer(OneLogit().eval(), images, classes=["only"])


def test_compiled_models_explain_the_wrapped_module(images):
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    compiled = torch.compile(model, backend="eager")
    ex = xw.Explainer(compiled, torch.rand(2, 3, 64, 64))
    reference = xw.Explainer(model, ex.images)
    assert ex.model is model and ex.default_layer() == "layer4.1"
    ex.explain("gradient", target=1)  # an earlier pass, then FEM (was KeyError '_orig_mod.3')
    for method in ("fem", "gradcam"):
        np.testing.assert_allclose(ex.explain(method, target=1).values,
                                   reference.explain(method, target=1).values, rtol=1e-5)
    # a layer named as the compiled wrapper names it still resolves
    named = ex.explain("gradcam", target=1, layer="_orig_mod.layer3.1")
    np.testing.assert_allclose(named.values, reference.explain(
        "gradcam", target=1, layer="layer3.1").values, rtol=1e-5)


def test_constant_maps_stay_constant_and_say_so():
    # ResNet-18 at 16×16: layer4 is 1×1, its upsampled Grad-CAM map was min-max
    # stretched into a 0/0.5/1 rounding pattern
    model = torchvision.models.resnet18(weights=None).eval()
    ex = xw.Explainer(model, torch.rand(2, 3, 16, 16))
    assert ex.context.shapes()["layer4.1"][-2:] == (1, 1)
    result = ex.explain("gradcam", layer="layer4.1", target=0)
    assert np.all(result.values == 0) and list(result.attrs["informative"]) == [0, 0]
    # an informative map says so too
    informative = ex.explain("gradient", target=0)
    assert list(informative.attrs["informative"]) == [1, 1]


def test_upsampling_never_invents_contrast():
    from xaiwidgets.core.ops import minmax, upsample

    maps = torch.tensor([[[0.1234567]], [[3.0]]]).expand(2, 1, 1).contiguous()
    up = upsample(maps, (37, 23))
    assert all(len(torch.unique(m)) == 1 for m in up)
    # a map differing only by float32 rounding (relative 1e-7) normalises to zeros
    noisy = torch.full((1, 8, 8), 0.3) + torch.rand(1, 8, 8) * 0.3 * 1e-7
    assert float(minmax(noisy).abs().max()) == 0.0
    # a real contrast of 1e-5 relative is kept
    assert float(minmax(noisy + torch.eye(8) * 3e-6).max()) == pytest.approx(1.0)
    # upsampled values stay inside each map's range
    rough = torch.randn(3, 5, 5)
    big = upsample(rough, (40, 40))
    assert torch.all(big.amax((1, 2)) <= rough.amax((1, 2)))
    assert torch.all(big.amin((1, 2)) >= rough.amin((1, 2)))


def test_a_loaded_model_bundle_is_refused_with_how_to_unpack_it():
    bundle = xw.models.load("shapes-vgg")
    with pytest.raises(TypeError, match=r"model, preprocess, classes = xw.models.load"):
        xw.Explainer(bundle, torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match=r"torch.nn.Module, got str$"):
        xw.Explainer("resnet18", torch.rand(1, 3, 64, 64))
