"""Meaningful perturbation: blur and total variation against independent computations,
localisation on a model that looks only at the top-left quadrant, determinism."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

import xaiwidgets as xw
from xaiwidgets.families.meaningful_perturbation import gaussian_blur, total_variation

from .test_methods_lime import TopLeftTexture, noise_images


def test_blur_matches_scipy():
    x = noise_images(1, 24)
    ours = gaussian_blur(x, 2.0)[0].numpy()
    # scipy's "nearest" mode replicates edges; truncate=3 gives the same 6-pixel radius
    theirs = np.stack([gaussian_filter(c, 2.0, mode="nearest", truncate=3.0)
                       for c in x[0].numpy()])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_total_variation_by_hand():
    m = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]).reshape(1, 1, 2, 3)
    # vertical |Δ|³: (0, 0.125, 1) -> mean 0.375; horizontal: (0.125, 0.125, 0, 0) -> 0.0625
    np.testing.assert_allclose(total_variation(m, 3.0).numpy(), [0.4375])


def test_deletion_mask_covers_the_top_left_quadrant():
    ex = xw.Explainer(TopLeftTexture(), noise_images(2, 64), progress=False)
    r = ex.explain("meaningful_perturbation", target=0, steps=100, l1=0.05).values
    assert r.min() >= 0 and r.max() <= 1
    quadrants = [r[:, :32, :32], r[:, :32, 32:], r[:, 32:, :32], r[:, 32:, 32:]]
    means = np.stack([q.mean(axis=(1, 2)) for q in quadrants])
    assert (means[0] > 0.9).all()  # the evidence is deleted
    assert (means[0] > 2 * means[1:]).all()
    # the perturbed image no longer shows the class
    with torch.no_grad():
        keep = 1 - torch.from_numpy(r)[:, None]
        x = ex.inputs
        perturbed = x * keep + gaussian_blur(x, 10.0) * (1 - keep)
        assert (torch.softmax(ex.model(perturbed), 1)[:, 0] < 0.5).all()


def test_deterministic_given_the_seed_and_all_images_at_once():
    x = noise_images(2, 32)
    ex = xw.Explainer(TopLeftTexture(), x, progress=False)
    a = ex.explain("meaningful_perturbation", target=0, steps=15, seed=1).values
    b = ex.explain("meaningful_perturbation", target=0, steps=15, seed=1).values
    c = ex.explain("meaningful_perturbation", target=0, steps=15, seed=2).values
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (2, 32, 32)


def test_progress_is_reported_per_step():
    calls = []
    ex = xw.Explainer(TopLeftTexture(), noise_images(1, 16),
                      progress=lambda done, total: calls.append((done, total)))
    ex.explain("meaningful_perturbation", target=0, steps=7)
    assert calls[-1] == (7, 7) and len(calls) == 7
