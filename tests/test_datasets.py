"""Shipped data: the synthetic shapes (geometry, gaze, determinism) and the photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.datasets.shapes import TARGET_SIZE, _shape_masks

from .conftest import assert_netcdf_round_trip, assert_seeded


@pytest.fixture(scope="module")
def ds():
    return xw.datasets.shapes(n=64, size=96, clutter=2, seed=3)


def test_variables_dims_dtypes(ds) -> None:
    assert ds.image.dims == ("image", "channel", "y", "x") and ds.image.shape == (64, 3, 96, 96)
    assert ds.image.dtype == np.float32
    assert float(ds.image.min()) >= 0 and float(ds.image.max()) <= 1
    assert ds.label.dims == ("image",) and np.issubdtype(ds.label.dtype, np.integer)
    assert set(np.unique(ds.label.values)) <= {0, 1, 2, 3}
    assert ds.mask.dtype == bool and ds.mask.dims == ("image", "y", "x")
    assert np.issubdtype(ds.fixations.dtype, np.integer) and ds.fixations.dims == ds.mask.dims
    assert ds.gfdm.dtype == np.float32 and ds.gfdm.dims == ds.mask.dims
    assert ds.attrs["classes"] == ["circle", "square", "triangle", "star"]
    assert ds.attrs["sigma"] == 96 / 16 and ds.attrs["clutter"] == 2


def test_attrs_are_netcdf_safe(ds, tmp_path) -> None:
    assert_netcdf_round_trip(ds, tmp_path / "shapes.nc")


def test_same_seed_same_data_other_seed_differs() -> None:
    assert_seeded(xw.datasets.shapes, n=6, size=48)


def test_mask_is_the_painted_target(ds) -> None:
    """Inside the mask every pixel has one colour (up to the pixel noise), and the
    mask's area is the class's area for a size in the documented range."""
    noise = ds.attrs["noise"]
    images, masks = ds.image.values, ds.mask.values
    for image, mask in zip(images, masks, strict=True):
        inside = image[:, mask]
        assert inside.std(axis=1).max() < 2 * noise
    size = ds.attrs["size"]
    # equal-area radius of each mask, as a fraction of the side
    radius = np.sqrt(masks.sum(axis=(1, 2)) / np.pi) / size
    low, high = TARGET_SIZE
    assert radius.min() > 0.9 * low and radius.max() < 1.1 * high


def test_classes_have_their_shape() -> None:
    """Hand-checkable geometry: a single object at the image centre, no rotation."""
    size = 101
    masks = _shape_masks(
        size,
        cy=np.full(4, 50.0),
        cx=np.full(4, 50.0),
        radius=np.full(4, 30.0),
        angle=np.zeros(4),
        label=np.arange(4),
    )
    areas = masks.sum(axis=(1, 2))
    # circle pi R^2, square (tips on the axes) 2 R^2, triangle 3 sqrt(3) / 4 R^2,
    # star: 10 triangles (centre, tip, inner vertex at 0.45 R), 5 * 0.45 R^2 sin(36 deg)
    expected = np.array([np.pi, 2, 3 * np.sqrt(3) / 4, 5 * 0.45 * np.sin(np.pi / 5)]) * 900
    np.testing.assert_allclose(areas, expected, rtol=0.03)
    circle, square, triangle, star = masks
    assert circle[50, 79] and not circle[50, 81]
    assert square[50, 79] and not square[50 + 16, 50 + 16]  # a diamond: the corner is empty
    assert triangle[50, 79] and not triangle[50, 22]  # a tip at angle 0, flat side opposite
    assert star[50, 79] and star[57, 60] and not star[60, 64]  # the notch at 36 degrees


def test_fixations_mostly_inside_the_target(ds) -> None:
    counts = ds.fixations.values
    per_image = ds.attrs["observers"] * ds.attrs["fixations_per_observer"]
    assert (counts.sum(axis=(1, 2)) == per_image).all()
    inside = (counts * ds.mask.values).sum() / counts.sum()
    assert inside >= ds.attrs["p_target"] - 0.05  # p_target = 0.7 by default
    on_distractors = (counts * ds.distractors.values).sum() / counts.sum()
    assert 0.05 < on_distractors < 0.3


def test_gfdm_of_the_fixations(ds) -> None:
    np.testing.assert_allclose(
        ds.gfdm.values[:4], xw.gfdm(ds.fixations.values[:4], sigma=ds.attrs["sigma"]), atol=1e-6
    )
    assert np.allclose(ds.gfdm.max(("y", "x")), 1)


def test_observer_model_parameters() -> None:
    only_target = xw.datasets.shapes(n=8, size=48, seed=0, p_target=1.0, p_distractor=0.0)
    assert not (only_target.fixations.values * ~only_target.mask.values).any()
    no_clutter = xw.datasets.shapes(n=8, size=48, clutter=0, seed=0)
    assert not no_clutter.distractors.values.any()
    with pytest.raises(ValueError):
        xw.datasets.shapes(n=2, p_target=0.8, p_distractor=0.3)


def test_photos_shape_and_range() -> None:
    images, names = xw.datasets.photos(size=64)
    assert isinstance(images, torch.Tensor) and images.dtype == torch.float32
    assert images.shape == (len(names), 3, 64, 64) and "cat" in names
    assert float(images.min()) >= 0 and float(images.max()) <= 1 and float(images.std()) > 0.1
    one, _ = xw.datasets.photos(size=32, names=["coffee"])
    assert one.shape == (1, 3, 32, 32)


def test_resize_crops_the_centre() -> None:
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # the centre square is white, the sides black
    assert float(xw.datasets.resize(wide, size=5).min()) == pytest.approx(1.0)
    assert float(xw.datasets.resize(wide, size=5, crop=False).min()) < 0.5
