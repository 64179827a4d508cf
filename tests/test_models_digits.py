"""The shipped grayscale classroom model: ``xw.models.load("digits")`` (models/digits.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.models import digits

pytest.importorskip("sklearn")


def test_digits_loads_offline_and_is_accurate():
    model, preprocess, classes = xw.models.load("digits")
    assert "digits" in xw.models.available() and classes == [str(d) for d in range(10)]
    images, labels = digits.held_out()
    assert images.shape == (359, 1, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    # independent count of correct predictions on the held-out split
    with torch.no_grad():
        predicted = model(preprocess(images)).argmax(1)
    assert (predicted == labels).float().mean() >= 0.95
    checkpoint = torch.load(digits.WEIGHTS, weights_only=True)
    assert all(v.dtype == torch.float16 for v in checkpoint["state_dict"].values()
               if v.is_floating_point())
    assert checkpoint["held_out_accuracy"] >= 0.95 and checkpoint["train_cpu_seconds"] > 0


def test_split_is_disjoint_and_seeded():
    train, _ = digits.dataset("train")
    held, _ = digits.dataset("held_out")
    assert len(train) + len(held) == 1797
    flat_train = {tuple(x.flatten().tolist()) for x in train[:200]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in held)
    np.testing.assert_array_equal(digits.dataset("held_out")[1], digits.dataset("held_out")[1])


def test_digits_explained_in_gray():
    model, preprocess, classes = xw.models.load("digits")
    images, labels = digits.held_out(2)
    ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes)
    assert ex.default_layer() == "0.10"  # the last ReLU, 8×8
    assert ex.context.shapes()["0.10"] == (1, 64, 8, 8)
    assert list(ex.predict(top=1).label.values[:, 0]) == labels.tolist()
    for method in ("gradcam", "occlusion", "lime"):
        result = ex.explain(method, **xw.get_method(method).quick_params)
        assert result.shape == (2, 32, 32) and result.attrs["informative"].all()
    picture = xw.rendering.display_image(images[0])
    assert picture.shape == (32, 32, 3) and np.allclose(picture[..., 0], picture[..., 1])


def test_training_command_writes_loadable_weights(tmp_path):
    out = tmp_path / "digits.pt"
    digits.main(["--epochs", "3", "--out", str(out)])
    model, preprocess, classes = digits.load(out)
    meta = torch.load(out, weights_only=True)
    images, labels = digits.held_out()
    assert meta["held_out_accuracy"] == pytest.approx(
        digits.accuracy(model, preprocess, images, labels), abs=0.01)  # float16 rounding
    assert meta["held_out_accuracy"] > 0.5  # three epochs: far above chance (0.1)
