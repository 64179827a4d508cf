"""Sanity checks: randomising the weights changes model-dependent explanations only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.feature import hog

from xaiwidgets.core import registry
from xaiwidgets.evaluation.sanity import (
    data_randomization,
    hog_correlation,
    model_randomization,
    similarity,
    weight_layers,
)

from .conftest import make_tiny_cnn


@pytest.fixture
def edge_method():
    """A model-independent 'explanation' (image edges): it must fail the sanity check."""

    class Edges(registry.Method):
        name = "test_image_edges"
        default_reduce = "map"

        def attribute(self, ex, target, layer, **params):
            x = ex.inputs.mean(dim=1)
            return (x.diff(dim=-1, prepend=x[..., :1]).abs()
                    + x.diff(dim=-2, prepend=x[..., :1, :]).abs())

    registry.register(Edges)
    yield Edges.name
    del registry._REGISTRY[Edges.name]


def test_cascading_randomisation_changes_gradient_but_not_edges(images, edge_method):
    model = make_tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    ds = model_randomization(model, images, "gradient", progress=False, keep_maps=True)
    # the user's model is untouched: weights, BatchNorm statistics, training flag
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training

    assert ds.spearman.dims == ("mode", "layer", "image")
    assert list(ds.layer.values) == ["8", "4", "0"]  # top-down
    assert list(ds["mode"].values) == ["cascading", "independent"]
    fully_random = ds.sel(mode="cascading", layer="0")
    assert (fully_random.spearman < 0.6).all() and (fully_random.ssim < 0.6).all()
    # both modes randomise only the top layer at the first step
    np.testing.assert_allclose(ds.spearman.sel(layer="8", mode="cascading"),
                               ds.spearman.sel(layer="8", mode="independent"))
    assert ds.saliency.shape == (2, 3, 2, 32, 32) and ds.original.shape == (2, 32, 32)

    edges = model_randomization(model, images, edge_method, modes=["cascading"],
                                progress=False)
    np.testing.assert_allclose(edges.spearman, 1.0)
    np.testing.assert_allclose(edges.ssim, 1.0)


def test_randomisation_is_seeded_and_layers_selectable(images):
    model = make_tiny_cnn()
    kwargs = {"modes": ["independent"], "progress": False, "layers": ["4", "8"]}
    a = model_randomization(model, images, "gradcam", seed=3, **kwargs)
    b = model_randomization(model, images, "gradcam", seed=3, **kwargs)
    np.testing.assert_array_equal(a.spearman, b.spearman)
    assert list(a.layer.values) == ["8", "4"]
    assert a.attrs["method"] == "gradcam" and a.attrs["seed"] == 3
    with pytest.raises(ValueError, match="modes"):
        model_randomization(model, images, "gradient", modes=["sideways"])


def test_weight_layers_in_forward_order(tiny_resnet):
    names = weight_layers(tiny_resnet, torch.rand(1, 3, 16, 16))
    assert names == ["0", "2.conv1", "2.conv2", "3.conv1", "3.conv2", "6"]


def test_similarity_against_references():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 32, 32)), rng.random((2, 32, 32))
    b[1] = a[1] + 0.1 * b[1]
    ds = similarity(a, b)
    for i in range(2):
        assert ds.spearman[i] == pytest.approx(stats.spearmanr(a[i].ravel(), b[i].ravel())[0])
        ha, hb = hog(a[i]), hog((b[i] - b[i].min()) / np.ptp(b[i]))
        expected = np.corrcoef(hog((a[i] - a[i].min()) / np.ptp(a[i])), hb)[0, 1]
        assert hog_correlation(a[i:i + 1], b[i:i + 1])[0] == pytest.approx(expected)
        assert ha.shape == hb.shape
    assert ds.spearman[1] > 0.9 > ds.spearman[0]
    np.testing.assert_allclose(similarity(a, a).to_array(), 1.0)


def test_data_randomisation(images):
    model = make_tiny_cnn(0)
    same = data_randomization(model, make_tiny_cnn(0), images, "gradient")
    np.testing.assert_allclose(same.to_array(), 1.0, atol=1e-9)
    other = data_randomization(model, make_tiny_cnn(5), images, "gradient", target=1)
    assert (other.spearman < 0.9).all()
    np.testing.assert_array_equal(other.target, [1, 1])
    assert other.attrs["method"] == "gradient"


# ------------------------------------------------ sMPRT and eMPRT against Quantus 0.6
def _quantus_setup():
    quantus = pytest.importorskip("quantus")
    if not hasattr(np, "trapz"):  # Quantus' NumPy 1 name, for it only
        np.trapz = np.trapezoid
    from torch import nn

    import xaiwidgets as xw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    y = xw.Explainer(model, torch.as_tensor(x), progress=False).logits().argmax(1).numpy()

    def explain(model, inputs, targets, **kwargs):
        ex = xw.Explainer(model, torch.as_tensor(np.asarray(inputs)), progress=False)
        return ex.explain("gradient", target=[int(t) for t in targets]).values[:, None]

    return quantus, model, x, y, explain


def test_smooth_mprt_matches_quantus():
    import warnings

    quantus, model, x, y, explain = _quantus_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = model_randomization(model, torch.as_tensor(x), "gradient", variant="smooth",
                               target=y, n_samples=4, progress=False)
    assert list(ours.layer.values) == ["original", "0", "4"]
    for i in range(len(x)):  # Quantus on one image at a time, NumPy seeded before each
        np.random.seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Quantus' sMPRT explains through quantus.explain, whatever explain_func says:
            # captum's Saliency (|gradient|) is our "gradient" on one channel
            ref = quantus.SmoothMPRT(nr_samples=4, seed=0, return_aggregate=False,
                                     disable_warnings=True)(
                model=model, x_batch=x[i:i + 1], y_batch=y[i:i + 1], a_batch=None,
                explain_func=explain, explain_func_kwargs={"method": "Saliency"},
                device="cpu")
        assert list(ref) == ["original", "0", "4"]
        np.testing.assert_allclose(ours.smprt.values[:, i], [v[0] for v in ref.values()],
                                   rtol=1e-4)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])


def test_efficient_mprt_matches_quantus_and_entropy_by_hand():
    import warnings

    from xaiwidgets.evaluation.sanity import discrete_entropy

    quantus, model, x, y, explain = _quantus_setup()
    ours = model_randomization(model, torch.as_tensor(x), "gradient", variant="efficient",
                               target=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = quantus.EfficientMPRT(seed=0, return_aggregate=False, disable_warnings=True)(
            model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain,
            device="cpu")
    np.testing.assert_allclose(ours.emprt.values, ref, rtol=1e-4)
    # four values in two bins, 3:1 -> -(3/4 ln 3/4 + 1/4 ln 1/4)
    h = discrete_entropy(np.array([[[0.0, 0.0], [0.0, 1.0]]]), n_bins=2)[0]
    assert h == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    with pytest.raises(ValueError, match="variant"):
        model_randomization(model, torch.as_tensor(x), "gradient", variant="shuffle")
