"""Model loading: shipped shapes models (offline, accurate), torchvision names, training."""

from __future__ import annotations

import functools
import inspect
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core.layers import block_outputs
from xaiwidgets.models import WeightsUnavailableError, train_video
from xaiwidgets.models import train as train_script
from xaiwidgets.models.train import TEST_SEED, TRAIN_SEED, train

SHAPES_MODELS = ("shapes-vgg", "shapes-resnet")


@pytest.fixture(scope="module")
def fresh_shapes():
    """Images never seen in training (training used seeds >= TRAIN_SEED)."""
    assert 123 < min(TRAIN_SEED, TEST_SEED)
    return xw.datasets.shapes(n=200, seed=123)


def test_shipped_models_are_available() -> None:
    assert set(SHAPES_MODELS) <= set(xw.models.available())


@pytest.mark.parametrize("name", SHAPES_MODELS)
def test_shipped_model_accuracy_on_fresh_data(name: str, fresh_shapes) -> None:
    model, preprocess, classes = xw.models.load(name)
    assert not model.training and not any(m.training for m in model.modules())
    assert classes == fresh_shapes.attrs["classes"]
    with torch.no_grad():
        logits = model(preprocess(torch.from_numpy(fresh_shapes.image.values)))
    accuracy = (logits.argmax(1).numpy() == fresh_shapes.label.values).mean()
    assert accuracy >= 0.95, f"{name}: {accuracy:.3f}"


def test_architectures_look_like_their_families() -> None:
    vgg = xw.models.load("shapes-vgg").model
    assert isinstance(vgg.features, nn.Sequential) and isinstance(vgg.classifier, nn.Sequential)
    relus = [m for m in vgg.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)  # as in torchvision's VGG
    resnet = xw.models.load("shapes-resnet").model
    blocks = [m for m in resnet.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) >= 8 and len(block_outputs(resnet)) == len(blocks)
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())


def test_shuffled_labels_model_is_near_chance(fresh_shapes) -> None:
    if "shapes-vgg-shuffled" not in xw.models.available():
        pytest.fail("shapes-vgg-shuffled weights are missing from the package")
    model, preprocess, _ = xw.models.load("shapes-vgg-shuffled")
    with torch.no_grad():
        logits = model(preprocess(torch.from_numpy(fresh_shapes.image.values)))
    assert (logits.argmax(1).numpy() == fresh_shapes.label.values).mean() < 0.5


def test_random_init_and_local_weights_path(tmp_path) -> None:
    trained = xw.models.load("shapes-resnet")
    random = xw.models.load("shapes-resnet", weights=None)
    assert random.classes == trained.classes and not random.model.training
    x = trained.preprocess(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        assert not torch.allclose(trained.model(x), random.model(x))
    path = tmp_path / "weights.pt"
    torch.save(trained.model.state_dict(), path)  # a bare state_dict works too
    again = xw.models.load("shapes-resnet", weights=path)
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), trained.model(x))


def test_preprocess_normalises_per_channel() -> None:
    preprocess = xw.models.load("shapes-vgg").preprocess
    images = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(images), (images - mean) / std)


def test_torchvision_random_init() -> None:
    model, preprocess, classes = xw.models.load("resnet18", weights=None)
    assert not model.training and len(classes) == 1000 and classes[281] == "tabby"
    assert preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    with torch.no_grad():
        assert model(preprocess(torch.rand(1, 3, 64, 64))).shape == (1, 1000)


def test_offline_error_names_the_alternatives(monkeypatch, tmp_path) -> None:
    """No cached weights (empty TORCH_HOME) and a download that fails, as without network."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        xw.models.load("resnet18")
    message = str(info.value)
    assert "weights=None" in message and "shapes-vgg" in message and "path" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        xw.models.load("resnet-18")


def test_training_script_is_seeded_and_writes_a_loadable_checkpoint(tmp_path) -> None:
    kwargs = dict(n_train=32, n_test=16, epochs=1, batch_size=16, threads=1)
    first = train("shapes-resnet", out=tmp_path / "a.pt", **kwargs)
    second = train("shapes-resnet", out=tmp_path / "b.pt", **kwargs)
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(value, second["state_dict"][key])
    assert first["state_dict"]["fc.weight"].dtype == torch.float16
    loaded = xw.models.load("shapes-resnet", weights=tmp_path / "a.pt")
    assert loaded.preprocess.mean == pytest.approx(first["mean"])
    shuffled = train("shapes-resnet", out=tmp_path / "c.pt", shuffle_labels=True, **kwargs)
    assert shuffled["shuffle_labels"] and not np.isclose(
        float(shuffled["state_dict"]["fc.weight"].float().sum()),
        float(first["state_dict"]["fc.weight"].float().sum()),
    )


@pytest.mark.parametrize("script", [train_script, train_video])
def test_training_commands_pass_their_options_to_train(script, monkeypatch) -> None:
    real, seen = script.train, {}
    defaults = {k: p.default for k, p in inspect.signature(real).parameters.items()}
    monkeypatch.setattr(script, "train", functools.wraps(real)(lambda **kw: seen.update(kw)))
    script.main(["--n-train", "12", "--lr", "0.5", "--out", "w.pt"])
    assert seen == {**defaults, "n_train": 12, "lr": 0.5, "out": "w.pt"}
    if script is train_script:
        script.main(["--model", "shapes-resnet", "--shuffle-labels", "--no-augment"])
        assert (seen["name"], seen["shuffle_labels"], seen["augment"]) == ("shapes-resnet",
                                                                          True, False)


def test_prepare_draws_disjoint_seeds_and_the_training_statistics() -> None:
    data = train_script.prepare(xw.datasets.moving_shapes, 3, 2, seed=1, threads=None)
    clips = xw.datasets.moving_shapes(n=3, seed=TRAIN_SEED + 1).image.values
    held = xw.datasets.moving_shapes(n=2, seed=TEST_SEED + 1).image.values
    np.testing.assert_array_equal(data.inputs.numpy(), np.rint(clips * 255).astype(np.uint8))
    np.testing.assert_array_equal(data.x_test.numpy(), held)
    per_channel = clips.transpose(1, 0, 2, 3, 4).reshape(3, -1)
    np.testing.assert_allclose(data.mean, per_channel.mean(1), rtol=1e-5)
    np.testing.assert_allclose(data.std, per_channel.std(1), rtol=1e-4)
    assert data.preprocess.mean == pytest.approx(per_channel.mean(1))
