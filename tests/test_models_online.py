"""Real weights where online, a visible fallback where not: ``xw.models.load_or_fallback``.

The download is patched (``torchvision.models._api.load_state_dict_from_url``, what
torchvision's weight enums call), so both paths run offline and fast.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import xaiwidgets as xw

ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD = "torchvision.models._api.load_state_dict_from_url"


@pytest.fixture
def offline(monkeypatch) -> list[str]:
    """Every weight download fails as it does without network; returns the URLs asked for."""
    asked: list[str] = []

    def fail(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(DOWNLOAD, fail)
    return asked


def test_online_loads_the_pretrained_weights_and_imagenet_classes(monkeypatch):
    torch.manual_seed(1)
    served = torchvision.models.resnet50(weights=None).state_dict()
    asked: list[str] = []

    def download(url, *args, **kwargs):
        asked.append(url)
        return served

    monkeypatch.setattr(DOWNLOAD, download)
    choice = xw.models.load_or_fallback("resnet50", fallback="shapes-vgg")
    enum = torchvision.models.ResNet50_Weights.DEFAULT
    assert asked == [enum.url]
    assert choice.name == "resnet50" and not choice.offline
    model, preprocess, classes = choice.loaded
    # the downloaded tensors, not a fresh random init
    for key, value in model.state_dict().items():
        assert torch.equal(value, served[key]), key
    assert classes == list(enum.meta["categories"]) and len(classes) == 1000
    assert classes[281] == "tabby"
    assert not model.training
    assert "pretrained" in choice.note and "Offline" not in choice.note


def test_offline_falls_back_to_the_shipped_model(offline):
    choice = xw.models.load_or_fallback("resnet50", fallback="shapes-vgg")
    assert offline == [torchvision.models.ResNet50_Weights.DEFAULT.url]  # it did try
    assert choice.offline and choice.name == "shapes-vgg"
    assert choice.note.startswith("Offline") and "'resnet50'" in choice.note
    model, _, classes = choice.loaded
    shipped, _, shipped_classes = xw.models.load("shapes-vgg")
    assert classes == shipped_classes
    for key, value in model.state_dict().items():
        assert torch.equal(value, shipped.state_dict()[key]), key


def test_offline_without_fallback_is_the_same_architecture_with_random_weights(offline):
    choice = xw.models.load_or_fallback("resnet18")
    assert choice.offline and choice.name == "resnet18"
    assert "RANDOM" in choice.note
    model, _, classes = choice.loaded
    assert isinstance(model, torchvision.models.ResNet)
    assert len(classes) == 1000
    # two offline loads draw different random weights: nothing pretrained came in
    other = xw.models.load_or_fallback("resnet18").loaded.model
    assert not torch.equal(model.conv1.weight, other.conv1.weight)


def test_a_broken_download_is_not_mistaken_for_offline(monkeypatch):
    def corrupt(url, *args, **kwargs):
        raise RuntimeError("invalid hash value")

    monkeypatch.setattr(DOWNLOAD, corrupt)
    with pytest.raises(RuntimeError, match="invalid hash"):
        xw.models.load_or_fallback("resnet18", fallback="shapes-vgg")


def test_shipped_models_need_no_fallback(offline):
    choice = xw.models.load_or_fallback("shapes-resnet", fallback="shapes-vgg")
    assert not choice.offline and choice.name == "shapes-resnet" and offline == []


@pytest.mark.parametrize("source", ["00_tour.py", "app.py"])
def test_the_tour_and_the_app_try_real_weights_first(source):
    text = (ROOT / "notebooks" / "src" / source).read_text()
    assert "load_or_fallback(" in text and '"resnet50"' in text
    assert ".note" in text  # the reader is told which weights they look at
