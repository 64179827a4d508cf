"""The shipped 3D CNN ``shapes-video``: loading, accuracy on fresh clips, that it reads
the motion, and the training script's label-mapping augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.core.layers import block_outputs
from xaiwidgets.datasets.moving_shapes import _DIRECTIONS, MOTIONS
from xaiwidgets.models import WEIGHTS_DIR
from xaiwidgets.models.train import accuracy
from xaiwidgets.models.train_video import augment


@pytest.fixture(scope="module")
def loaded():
    return xw.models.load("shapes-video")


@pytest.fixture(scope="module")
def fresh():
    # seeds below 10_000 were never used for training
    return xw.datasets.moving_shapes(n=100, frames=8, size=64, seed=123)


def test_load_returns_a_3d_cnn(loaded) -> None:
    model, preprocess, classes = loaded
    assert classes == list(MOTIONS) and not model.training
    assert "shapes-video" in xw.models.available()
    assert any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    with torch.no_grad():
        assert model(preprocess(torch.rand(2, 3, 8, 64, 64))).shape == (2, 4)
    # residual block outputs for FEM stacks / MLFEM
    assert block_outputs(model) == ["layer1.0", "layer2.0", "layer3.0"]


def test_weights_are_small_float16() -> None:
    path = WEIGHTS_DIR / "shapes-video.pt"
    assert path.stat().st_size <= 10e6
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    floats = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert checkpoint["test_accuracy"] >= 0.9 and checkpoint["classes"] == list(MOTIONS)


def test_preprocess_normalises_each_channel_of_a_clip(loaded) -> None:
    _, preprocess, _ = loaded
    clips = torch.rand(2, 3, 4, 8, 8)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(preprocess(clips), (clips - mean) / std)


def test_accuracy_on_fresh_clips(loaded, fresh) -> None:
    model, preprocess, _ = loaded
    clips = torch.from_numpy(fresh.image.values)
    labels = torch.from_numpy(fresh.label.values)
    assert accuracy(model, preprocess, clips, labels) >= 0.9


def test_the_model_reads_motion_not_frames(loaded, fresh) -> None:
    """Freeze each clip on one of its frames (all frames equal): the class is gone and
    the model falls to about chance, while the moving clips are classified correctly."""
    model, preprocess, _ = loaded
    clips = torch.from_numpy(fresh.image.values)
    labels = torch.from_numpy(fresh.label.values)
    for t in (0, 7):
        frozen = clips[:, :, t : t + 1].expand_as(clips).contiguous()
        assert accuracy(model, preprocess, frozen, labels) < 0.45


def _steps(masks: torch.Tensor) -> np.ndarray:
    """Mean (dy, dx) per frame of each (N, T, H, W) mask's centroid on the torus."""
    size = masks.shape[-1]
    phase = np.exp(2j * np.pi * np.arange(size) / size)
    m = masks.numpy().astype(float)
    centre = np.stack(
        [(m.sum(-1) * phase).sum(-1), (m.sum(-2) * phase).sum(-1)], -1
    )  # (N, T, 2), complex
    step = np.angle(centre[:, 1:] / centre[:, :-1]) * size / (2 * np.pi)
    return step.mean(axis=1)


def test_augment_maps_labels_to_the_new_motion() -> None:
    """For all 16 combinations of flips, transpose and time reversal, the transformed
    target moves in the direction of the mapped label (measured on the masks, so
    independently of the label tables)."""
    ds = xw.datasets.moving_shapes(n=8, frames=4, size=32, seed=6)
    masks = torch.from_numpy(ds.mask.values)[:, None]  # (N, 1, T, H, W)
    labels = torch.from_numpy(ds.label.values)
    seen = set()
    for seed in itertools.count():
        generator = torch.Generator().manual_seed(seed)
        flips = tuple((torch.rand(4, generator=generator) < 0.5).tolist())
        if flips in seen:
            continue
        seen.add(flips)
        moved, mapped = augment(masks, labels, torch.Generator().manual_seed(seed))
        step = _steps(moved[:, 0])
        # speeds are >= 0.8 px per frame at 32 px; the cross-axis step is ~0
        direction = np.where(np.abs(step) > 0.4, np.sign(step), 0)
        np.testing.assert_array_equal(direction, _DIRECTIONS[mapped.numpy()])
        if len(seen) == 16:
            break
