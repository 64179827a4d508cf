"""Non-finite or nonsensical parameters get a clear error (#13 item 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import xaiwidgets as xw

BAD = [
    ("occlusion", {"value": math.inf}),
    ("occlusion", {"value": math.nan}),
    ("occlusion", {"window": -4}),
    ("occlusion", {"stride": 0}),
    ("integrated_gradients", {"baseline": math.nan}),
    ("integrated_gradients", {"baseline": torch.full((1, 3, 32, 32), math.nan)}),
    ("deeplift", {"baseline": math.inf}),
    ("deeplift", {"baseline": np.full((3, 32, 32), -np.inf)}),
    ("smoothgrad", {"sigma": -0.1}),
    ("lime", {"kernel_width": math.inf}),
    ("meaningful_perturbation", {"l1": math.nan}),
]


@pytest.mark.parametrize(("method", "params"), BAD,
                         ids=[f"{m}-{next(iter(p))}" for m, p in BAD])
def test_bad_parameters_are_refused_before_computing(method, params, tiny_cnn, images):
    ex = xw.Explainer(tiny_cnn, images)
    name = next(iter(params))
    with pytest.raises(ValueError, match=name) as info:
        ex.explain(method, target=0, **params)
    assert any(word in str(info.value) for word in ("finite", "too small", ">="))


def test_finite_tensor_baselines_still_work(tiny_cnn, images):
    ex = xw.Explainer(tiny_cnn, images)
    baseline = torch.full_like(images, 0.5)
    result = ex.explain("integrated_gradients", target=0, baseline=baseline, steps=4)
    assert np.isfinite(result.values).all()
    assert np.isfinite(ex.explain("occlusion", target=0, value=-2.0, window=8).values).all()
