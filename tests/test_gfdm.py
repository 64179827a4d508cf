"""GFDM: a sum of Gaussians at the fixations, max 1, checked against a direct loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xaiwidgets as xw
from xaiwidgets.evaluation.gfdm import default_sigma, sigma_from_visual_angle


def direct_sum(points: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Textbook GFDM: loop over pixels and fixations, then scale to max 1."""
    out = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            for y, x in points:
                out[i, j] += math.exp(-((i - y) ** 2 + (j - x) ** 2) / (2 * sigma**2))
    return out / out.max()


def test_matches_direct_gaussian_sum() -> None:
    points = np.array([[1.0, 2.0], [6.5, 3.25], [6.5, 3.25], [-2.0, 9.0]])
    expected = direct_sum(points, (8, 11), sigma=1.7)
    np.testing.assert_allclose(xw.gfdm(points, (8, 11), sigma=1.7), expected, atol=1e-6)


def test_count_map_equals_coordinates() -> None:
    counts = np.zeros((9, 7), int)
    counts[2, 3] = 2
    counts[7, 0] = 1
    points = np.array([[2, 3], [2, 3], [7, 0]])
    from_counts = xw.gfdm(counts, sigma=1.5)
    np.testing.assert_allclose(from_counts, xw.gfdm(points, (9, 7), sigma=1.5), atol=1e-6)
    # passing the shape explicitly reads the same array as a count map
    np.testing.assert_array_equal(xw.gfdm(counts, (9, 7), sigma=1.5), from_counts)
    np.testing.assert_allclose(from_counts, direct_sum(points, (9, 7), 1.5), atol=1e-6)


def test_max_one_and_float32() -> None:
    g = xw.gfdm(np.array([[3, 4], [10, 10]]), (16, 16), sigma=2)
    assert g.dtype == np.float32 and g.shape == (16, 16)
    assert g.max() == pytest.approx(1.0) and g.min() >= 0


def test_no_fixation_gives_zeros_not_nan() -> None:
    assert not xw.gfdm(np.zeros((0, 2)), (5, 6), sigma=1).any()
    stacked = np.zeros((2, 5, 6))
    stacked[1, 2, 2] = 1
    g = xw.gfdm(stacked, sigma=1)
    assert np.isfinite(g).all() and not g[0].any() and g[1].max() == pytest.approx(1)


def test_stacked_count_maps_are_independent() -> None:
    rng = np.random.default_rng(0)
    stacked = rng.poisson(0.05, (3, 12, 10))
    g = xw.gfdm(stacked, sigma=2)
    for one, counts in zip(g, stacked, strict=True):
        np.testing.assert_allclose(one, xw.gfdm(counts, sigma=2), atol=1e-6)


def test_sigma_helpers() -> None:
    # 57.3 cm from the screen, 1 degree is ~1 cm: a 2-degree fovea has radius ~1 cm
    assert sigma_from_visual_angle(57.2958, 10) == pytest.approx(10, rel=1e-3)
    assert sigma_from_visual_angle(60, 38, angle_deg=4) == pytest.approx(
        2 * sigma_from_visual_angle(60, 38, angle_deg=2), rel=1e-3
    )
    assert default_sigma((128, 128)) == 8
    # the default sigma is used when none is given
    points = np.array([[20, 30]])
    np.testing.assert_array_equal(xw.gfdm(points, (64, 64)), xw.gfdm(points, (64, 64), 4.0))


@pytest.mark.parametrize(
    ("fixations", "shape", "sigma"),
    [
        (np.zeros((3, 3)), (8, 8), 1),
        (np.zeros((2, 2)), (4, 4), 0),
        (np.array([[np.nan, 1]]), (4, 4), 1),
    ],
)
def test_bad_input_raises(fixations, shape, sigma) -> None:
    with pytest.raises(ValueError):
        xw.gfdm(fixations, shape, sigma)
