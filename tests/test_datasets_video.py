"""Moving shapes: layout, determinism, geometry of the motion, simulated gaze, and that
the class is in the motion, not in any single frame."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import xaiwidgets as xw
from xaiwidgets.datasets.moving_shapes import _DIRECTIONS, MOTIONS
from xaiwidgets.evaluation.gfdm import default_sigma

from .conftest import assert_netcdf_round_trip, assert_seeded


@pytest.fixture(scope="module")
def ds():
    return xw.datasets.moving_shapes(n=48, frames=6, size=48, clutter=2, seed=3)


def _circular_centroid(masks: np.ndarray) -> np.ndarray:
    """(..., 2) centre (y, x) of each (..., H, W) mask on the torus: the angle of the mean
    of exp(2 pi i coordinate / side), independent of where the mask wraps."""
    size = masks.shape[-1]
    phase = np.exp(2j * np.pi * np.arange(size) / size)
    weight = masks.sum(axis=(-2, -1))
    y = (masks.sum(axis=-1) * phase).sum(axis=-1) / weight
    x = (masks.sum(axis=-2) * phase).sum(axis=-1) / weight
    return np.mod(np.angle(np.stack([y, x], -1)) * size / (2 * np.pi), size)


def _wrapped(delta: np.ndarray, size: int) -> np.ndarray:
    """A displacement on the torus brought into [-size / 2, size / 2)."""
    return np.mod(delta + size / 2, size) - size / 2


def test_variables_dims_dtypes(ds) -> None:
    assert ds.image.dims == ("image", "channel", "t", "y", "x")
    assert ds.image.shape == (48, 3, 6, 48, 48) and ds.image.dtype == np.float32
    assert float(ds.image.min()) >= 0 and float(ds.image.max()) <= 1
    assert ds.label.dims == ("image",) and np.issubdtype(ds.label.dtype, np.integer)
    assert set(np.unique(ds.label.values)) == {0, 1, 2, 3}
    volume = ("image", "t", "y", "x")
    assert ds.mask.dims == volume and ds.mask.dtype == bool
    assert ds.distractors.dims == volume and ds.distractors.dtype == bool
    assert ds.fixations.dims == volume and np.issubdtype(ds.fixations.dtype, np.integer)
    assert ds.gfdm.dims == volume and ds.gfdm.dtype == np.float32
    assert ds.attrs["classes"] == ["right", "left", "up", "down"] == list(MOTIONS)
    assert ds.attrs["sigma"] == default_sigma(48) == 3.0
    assert list(ds.t.values) == list(range(6))


def test_attrs_are_netcdf_safe(ds, tmp_path) -> None:
    assert_netcdf_round_trip(ds, tmp_path / "clips.nc")


def test_same_seed_same_data_other_seed_differs() -> None:
    assert_seeded(xw.datasets.moving_shapes, n=4, frames=3, size=32)


def test_mask_is_the_painted_target(ds) -> None:
    """Inside the mask every pixel of a frame has one colour (up to the pixel noise),
    the colour stays the same over the clip, and the area is constant (a rigid motion)."""
    noise = ds.attrs["noise"]
    images, masks = ds.image.values, ds.mask.values
    for clip, mask in zip(images, masks, strict=True):
        colours = np.stack([clip[:, t][:, mask[t]].mean(axis=1) for t in range(len(mask))])
        spread = [clip[:, t][:, mask[t]].std(axis=1).max() for t in range(len(mask))]
        assert max(spread) < 2 * noise
        assert np.ptp(colours, axis=0).max() < noise
    area = masks.sum(axis=(2, 3))
    assert (area.min(axis=1) > 0.9 * area.max(axis=1)).all()  # rasterisation only
    assert not (ds.distractors.values & masks).any()


def test_target_moves_in_its_class_direction(ds) -> None:
    """The mask's centre on the torus moves by a constant step per frame, along the
    label's direction, at a speed in the documented range."""
    size = ds.attrs["size"]
    centre = _circular_centroid(ds.mask.values)  # (image, t, 2)
    step = _wrapped(np.diff(centre, axis=1), size)  # (image, t - 1, 2)
    direction = _DIRECTIONS[ds.label.values][:, None]
    along = (step * direction).sum(-1)
    across = (step * direction[..., ::-1]).sum(-1)
    low, high = np.array(ds.attrs["speed"]) * size
    assert along.min() > 0.8 * low and along.max() < 1.2 * high
    assert np.abs(across).max() < 0.5
    # constant velocity: every step of a clip is the same up to rasterisation
    assert np.abs(along - along.mean(axis=1, keepdims=True)).max() < 0.5


def test_distractors_move_too(ds) -> None:
    visible = ds.distractors.values
    changed = (visible[:, 1:] != visible[:, :-1]).sum(axis=(2, 3))
    assert (changed > 0).all()


def test_fixations_follow_the_target(ds) -> None:
    counts = ds.fixations.values
    assert (counts.sum(axis=(2, 3)) == ds.attrs["observers"]).all()  # one per observer/frame
    inside = (counts * ds.mask.values).sum() / counts.sum()
    # stationary share on the target 5/6, minus lapses and pursuit offsets off the shape
    assert inside >= 0.7
    on_distractors = (counts * ds.distractors.values).sum() / counts.sum()
    assert 0.05 < on_distractors < 0.3


def test_pure_smooth_pursuit_is_on_the_target_centre() -> None:
    """No saccades, lapses, offsets or jitter: every observer looks at the target's
    (rounded) centre in every frame, so the fixations trace its trajectory."""
    ds = xw.datasets.moving_shapes(
        n=8, frames=5, size=40, seed=2, p_saccade=0, p_centre=0, pursuit_spread=0, jitter=0
    )
    counts = ds.fixations.values
    assert (counts.max(axis=(2, 3)) == ds.attrs["observers"]).all()
    assert not (counts * ~ds.mask.values).any()
    peak = np.stack(np.unravel_index(counts.reshape(8, 5, -1).argmax(-1), (40, 40)), -1)
    centre = _circular_centroid(ds.mask.values)
    assert np.abs(_wrapped(peak - centre, 40)).max() <= 1.0


def test_saccades_to_distractors_follow_p_saccade() -> None:
    """With p_return = 0 an observer who left the target stays away: the share of
    samples on the target at frame t is (1 - p_saccade) ** (t + 1)."""
    p = 0.3
    ds = xw.datasets.moving_shapes(
        n=200,
        frames=4,
        size=32,
        seed=5,
        p_saccade=p,
        p_return=0,
        p_centre=0,
        pursuit_spread=0,
        jitter=0,
        clutter=1,
    )
    counts = ds.fixations.values
    # off the target mask = on the distractor (pursuit with no offset lands on a centre)
    on_target = (counts * ds.mask.values).sum(axis=(0, 2, 3)) / counts.sum(axis=(0, 2, 3))
    expected = (1 - p) ** np.arange(1, 5)
    # the distractor's centre can lie under the target: on-target shares are a bit higher
    assert np.all(on_target >= expected - 0.04) and np.all(on_target <= expected + 0.08)
    none = xw.datasets.moving_shapes(n=4, frames=3, size=32, seed=0, clutter=0)
    assert not none.distractors.values.any()


def test_gfdm_of_each_frame(ds) -> None:
    np.testing.assert_allclose(
        ds.gfdm.values[:3, 2],
        xw.gfdm(ds.fixations.values[:3, 2], sigma=ds.attrs["sigma"]),
        atol=1e-6,
    )
    assert np.allclose(ds.gfdm.max(("y", "x")), 1)


def test_frame_zero_does_not_depend_on_the_label() -> None:
    """Same seed, other motions: frame 0 is the same picture (pixels, noise, masks);
    later frames differ in the target's position only."""
    right = xw.datasets.moving_shapes(n=6, frames=4, size=32, seed=4, labels=["right"] * 6)
    up = xw.datasets.moving_shapes(n=6, frames=4, size=32, seed=4, labels=[2] * 6)
    assert (right.label.values == 0).all() and (up.label.values == 2).all()
    for name in ("image", "mask", "distractors"):
        np.testing.assert_array_equal(right[name].isel(t=0).values, up[name].isel(t=0).values)
    for name in ("image", "mask"):
        assert not np.array_equal(right[name].isel(t=3).values, up[name].isel(t=3).values)
    # the distractors move the same way whatever the target does (seen where uncovered)
    both = ~right.mask.values & ~up.mask.values
    np.testing.assert_array_equal(right.distractors.values & both, up.distractors.values & both)
    with pytest.raises(ValueError, match="class indices"):
        xw.datasets.moving_shapes(n=2, labels=["sideways", "up"])


def test_no_single_frame_tells_the_class() -> None:
    """In every frame the target's position (the only thing the label changes) has the
    same distribution for every class: a two-sample KS test between classes finds
    nothing per frame, while the same test on the frame-to-frame step separates them."""
    ds = xw.datasets.moving_shapes(n=400, frames=4, size=32, clutter=0, seed=11, observers=1)
    size, label = 32, ds.label.values
    centre = _circular_centroid(ds.mask.values)  # (image, t, (y, x))
    step = _wrapped(np.diff(centre, axis=1), size)
    right, left = label == 0, label == 1
    for t in range(4):
        for axis in (0, 1):
            assert stats.ks_2samp(centre[right, t, axis], centre[left, t, axis]).pvalue > 0.01
    assert stats.ks_2samp(step[right, 0, 1], step[left, 0, 1]).pvalue < 1e-20
    # nor does the target's appearance (frame 0 is even the same picture for any label,
    # see above): its area, for example
    area = ds.mask.values[:, 0].sum(axis=(1, 2))
    assert stats.ks_2samp(area[right], area[left]).pvalue > 0.01
