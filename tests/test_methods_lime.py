"""LIME: its pieces against hand computations, localisation on a model that looks only
at the top-left quadrant, determinism."""

from __future__ import annotations

import numpy as np
import pytest

import xaiwidgets as xw
from xaiwidgets.families.lime import kernel_weights, superpixels, weighted_ridge

from .helpers import TopLeftTexture, noise_images


def top_left_share(maps: np.ndarray) -> np.ndarray:
    """Fraction of each map's absolute mass in the top-left quadrant (chance: 0.25)."""
    mass = np.abs(maps)
    h, w = maps.shape[-2:]
    return mass[:, : h // 2, : w // 2].sum(axis=(1, 2)) / mass.sum(axis=(1, 2))


def test_kernel_weights_by_hand():
    masks = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    # cosine to all-on: 1, 1/2, (empty) 0 -> distances 0, 0.5, 1
    expected = np.exp(-np.array([0.0, 0.5, 1.0]) ** 2 / 0.25**2)
    np.testing.assert_allclose(kernel_weights(masks, 0.25), expected)


def test_weighted_ridge_matches_the_normal_equations():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(40, 5)).astype(float)
    y = rng.normal(size=40)
    w = rng.uniform(0.1, 1.0, size=40)
    # augmented least squares with an unpenalised intercept column
    design = np.hstack([x, np.ones((40, 1))])
    penalty = np.diag([1.0] * 5 + [0.0])
    full = np.linalg.solve(design.T @ (w[:, None] * design) + penalty, design.T @ (w * y))
    np.testing.assert_allclose(weighted_ridge(x, y, w, 1.0), full[:5], rtol=1e-10)


def test_superpixels_cover_the_image_and_survive_textures():
    labels = superpixels(noise_images(1, 64)[0], 50)
    count = labels.max() + 1
    assert set(np.unique(labels)) == set(range(count))
    # plain SLIC merges a noise image into a single superpixel; the retry does not
    assert 50 / 4 <= count <= 80


def test_lime_finds_the_top_left_quadrant():
    r = xw.explain(TopLeftTexture(), noise_images(), "lime", target=0, n_samples=300)
    assert r.dims == ("image", "y", "x") and r.attrs["signed"] == 1
    assert (top_left_share(r.values) > 0.7).all()
    # removing evidence lowers the logit: superpixels of the quadrant count positively
    assert (r.values[:, :12, :12].mean(axis=(1, 2)) > 0).all()


def test_lime_is_deterministic_given_the_seed():
    ex = xw.Explainer(TopLeftTexture(), noise_images())
    a = ex.explain("lime", target=0, n_samples=50, seed=3).values
    b = ex.explain("lime", target=0, n_samples=50, seed=3, batch_size=7).values
    c = ex.explain("lime", target=0, n_samples=50, seed=4).values
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, c)


def test_lime_segments_the_display_image_and_reports_progress():
    calls = []
    images = noise_images(1, 32)
    ex = xw.Explainer(TopLeftTexture(), images, preprocess=lambda im: (im - 0.5) / 0.25,
                      progress=lambda done, total: calls.append((done, total)))
    r = ex.explain("lime", target=0, n_samples=40, batch_size=10, n_segments=20)
    # the map is constant on each superpixel of the display image
    labels = superpixels(images[0], 20)
    for label in np.unique(labels):
        assert np.ptp(r.values[0][labels == label]) == pytest.approx(0.0, abs=1e-6)
    assert (4, 4) in calls
