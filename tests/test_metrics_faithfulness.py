"""Explainer-based metrics (faithfulness, robustness, random logit) against Quantus 0.6
on a tiny deterministic model, with the same perturbations: Quantus draws from NumPy's
global generator, ours from ``RandomState(seed)`` in the same order, so seeding NumPy
before the Quantus call aligns them. Plus the defining properties, computed
independently (a linear model, whose exact attribution is its weights)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.evaluation import faithfulness as F
from xaiwidgets.evaluation import robustness as R

if not hasattr(np, "trapz"):  # Quantus' NumPy 1 name, for it only
    np.trapz = np.trapezoid

quantus = pytest.importorskip("quantus")
RTOL = 1e-4


def _model(linear: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if linear:
        return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 3)).eval()
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).eval()


@pytest.fixture(scope="module")
def setup():
    model = _model()
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 16, 16)).astype(np.float32)
    ex = xw.Explainer(model, torch.as_tensor(x), progress=False)
    y = ex.logits().argmax(1).numpy()
    a = rng.random((3, 16, 16))
    return model, x, y, a, ex


def _per_image(metric, model, x, y, a=None, **kwargs):
    """Quantus one image at a time, NumPy seeded with 0 before each (our per-image draws)."""
    out = []
    for i in range(len(x)):
        np.random.seed(0)
        out.append(_call(metric, model, x[i:i + 1], y[i:i + 1],
                         None if a is None else a[i:i + 1], **kwargs))
    return np.concatenate(out, axis=-1)


def _call(metric, model, x, y, a=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=model, x_batch=x, y_batch=y,
                     a_batch=None if a is None else a[:, None], device="cpu", **kwargs)
    return np.asarray(list(out.values()) if isinstance(out, dict) else out, dtype=np.float64)


def test_faithfulness_correlation_matches_quantus(setup):
    model, x, y, a, ex = setup
    ref = _per_image(quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=30,
                                                     return_aggregate=False), model, x, y, a)
    ds = F.faithfulness_correlation(ex, a, target=y, n_runs=20, subset_size=30)
    np.testing.assert_allclose(ds.faithfulness_correlation.values, ref, rtol=RTOL)
    assert ds.attrs["higher_is_better"] == 1
    again = F.faithfulness_correlation(ex, a, target=y, n_runs=20, subset_size=30)
    np.testing.assert_array_equal(again.faithfulness_correlation, ds.faithfulness_correlation)


def test_noisy_linear_imputation_matches_quantus():
    from quantus.functions.perturb_func import noisy_linear_imputation

    rng = np.random.default_rng(4)
    img = rng.random((2, 9, 13))
    idx = rng.choice(9 * 13, 40, replace=False)
    np.random.seed(3)
    ref = noisy_linear_imputation(img.copy(), idx, noise=0.01)
    ours = F.noisy_linear_imputation(img, idx, 0.01, np.random.RandomState(3))
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    # without noise each removed pixel is the weighted mean of its neighbours
    clean = F.noisy_linear_imputation(img, idx, 0.0, np.random.RandomState(0))
    r, c = divmod(int(idx[0]), 13)
    total = weight = 0.0
    for (dy, dx), w in F.IMPUTATION_WEIGHTS:
        if 0 <= r + dy < 9 and 0 <= c + dx < 13:
            total, weight = total + w * clean[:, r + dy, c + dx], weight + w
    np.testing.assert_allclose(clean[:, r, c], total / weight, rtol=1e-9)


def test_road_matches_quantus_and_changes_decisions():
    model = _model(linear=True)
    rng = np.random.default_rng(1)
    x = rng.random((4, 1, 16, 16)).astype(np.float32)
    ex = xw.Explainer(model, torch.as_tensor(x), progress=False)
    y = ex.logits().argmax(1).numpy()
    weights = model[1].weight.detach().numpy().reshape(3, 16, 16)
    a = weights[y] * x[:, 0]  # gradient x input: removing it changes the decision
    ref = _per_image(quantus.ROAD(return_aggregate=False), model, x, y, a)  # per image, per %
    ds = F.road(ex, a, target=y)
    np.testing.assert_array_equal(ds.curve.values, ref.reshape(len(x), -1))
    one = F.road(ex.__class__(model, torch.as_tensor(x[2:3]), progress=False), a[2:3],
                 target=y[2:3])
    np.testing.assert_array_equal(one.curve.values[0], ds.curve.values[2])  # stack = one
    assert 0 < ds.road.mean() < 1 and ds.curve.dims == ("image", "percentage")
    assert ds.attrs["higher_is_better"] == 0


def test_road_works_on_rgb_where_quantus_does_not():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 2)).eval()
    x = torch.rand(2, 3, 12, 12)
    ex = xw.Explainer(model, x, progress=False)
    maps = ex.explain("gradient")
    ds = F.road(ex, maps)
    assert ds.road.shape == (2,) and np.isfinite(ds.road).all()
    y = ex.logits().argmax(1).numpy()
    with pytest.raises(IndexError):  # Quantus 0.6 ranks channel-pixels, counts pixels (#333)
        _call(quantus.ROAD(return_aggregate=False), model, x.numpy(), y, maps.values)


def test_irof_matches_quantus(setup):
    model, x, y, a, ex = setup
    for i in range(2):  # Quantus mixes the images of a batch in its "mean": one at a time
        ref = _call(quantus.IROF(return_aggregate=False), model, x[i:i + 1], y[i:i + 1],
                    a[i:i + 1])
        ours = F.irof(ex, a, target=y).irof.values[i]
        assert ours == pytest.approx(ref[0], rel=RTOL)


def test_infidelity_matches_quantus_and_is_zero_for_the_exact_map():
    model = _model()
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 16, 16)).astype(np.float32)
    ex = xw.Explainer(model, torch.as_tensor(x), progress=False)
    y = ex.logits().argmax(1).numpy()
    a = rng.random((2, 16, 16))
    for i in range(2):  # Quantus indexes the whole batch: one image per call
        ref = _call(quantus.Infidelity(return_aggregate=False), model, x[i:i + 1], y[i:i + 1],
                    a[i:i + 1])
        assert F.infidelity(ex, a, target=y).infidelity.values[i] == pytest.approx(ref[0],
                                                                                   rel=RTOL)
    # a linear model: the weights explain every logit change exactly (both perturbations)
    lin = _model(linear=True).double()
    xl = torch.as_tensor(x, dtype=torch.float64)
    exl = xw.Explainer(lin, xl, progress=False)
    w = lin[1].weight.detach().numpy().reshape(3, 16, 16)
    target = exl.logits().argmax(1).numpy()
    for how in ("patches", "noise"):
        exact = F.infidelity(exl, w[target], target=target, perturbation=how).infidelity
        assert float(exact.max()) < 1e-12  # float64 rounding only
        off = F.infidelity(exl, w[target] * 2, target=target, perturbation=how).infidelity
        assert (off > 1e-6).all()


def _explain_func(model, inputs, targets, **kwargs):
    ex = xw.Explainer(model, torch.as_tensor(np.asarray(inputs)), progress=False)
    return ex.explain("gradient", target=[int(t) for t in targets]).values[:, None]


def test_sensitivities_match_quantus(setup):
    model, x, y, _, ex = setup
    for name, cls in (("max_sensitivity", quantus.MaxSensitivity),
                      ("avg_sensitivity", quantus.AvgSensitivity)):
        ref = _per_image(cls(nr_samples=5, return_aggregate=False, disable_warnings=True),
                         model, x, y, explain_func=_explain_func)
        ours = getattr(R, name)(ex, "gradient", target=y, n_samples=5)[name].values
        np.testing.assert_allclose(ours, ref, rtol=RTOL)
    big = R.max_sensitivity(ex, "gradient", n_samples=5).max_sensitivity
    avg = R.avg_sensitivity(ex, "gradient", n_samples=5).avg_sensitivity
    assert (big >= avg).all() and (avg >= 0).all()
    # an input-independent map (a linear model's gradient) does not move at all
    lin = _model(linear=True)
    zero = R.max_sensitivity(xw.Explainer(lin, torch.as_tensor(x), progress=False), "gradient",
                             n_samples=3).max_sensitivity
    assert float(zero.max()) == 0.0


def test_random_logit_matches_quantus(setup):
    model, x, y, _, ex = setup
    # Quantus divides by the largest value of the whole batch; per map (our convention):
    per_map = {"normalise_axes": [1, 2, 3]}
    ref = _per_image(quantus.RandomLogit(num_classes=3, seed=0, return_aggregate=False,
                                         normalise_func_kwargs=per_map), model, x, y,
                     explain_func=_explain_func)
    ds = R.random_logit(ex, "gradient", target=y)
    np.testing.assert_allclose(ds.random_logit.values, ref, rtol=RTOL)
    assert (ds.other_class.values != y).all()


def test_model_is_untouched(setup):
    model, x, y, a, ex = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    F.road(ex, a, percentages=(10, 50))
    R.avg_sensitivity(ex, "gradient", n_samples=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not model.training and not model._forward_hooks
