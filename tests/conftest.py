"""Shared fixtures and helpers: tiny models (built in the test, random-initialised,
seeded), the registry's quick parameters, checks every synthetic dataset passes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from torch.utils.hooks import RemovableHandle

import xaiwidgets as xw


def cnn_methods() -> list[str]:
    """Every registered method a CNN can run: those without ``Method.requires`` (attention
    rollout needs self-attention; tests/test_transformers.py covers it)."""
    return [name for name in xw.methods() if not xw.get_method(name).requires]


class TinyBlock(nn.Module):
    """A residual block with a ReLU module used twice and an in-place add (like torchvision)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        return self.relu(out)


class Activated(nn.Module):
    """conv -> activation -> conv -> activation -> pool -> linear, the activation given
    as a callable (a module or any function)."""

    def __init__(self, act) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.act = act
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def make_tiny_cnn(seed: int = 0, classes: int = 4) -> nn.Module:
    """Plain conv stack with in-place ReLUs, BatchNorm and a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 16, classes),
    ).eval()


def make_tiny_resnet(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        TinyBlock(8), TinyBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    ).eval()


@pytest.fixture
def tiny_cnn() -> nn.Module:
    return make_tiny_cnn()


@pytest.fixture
def tiny_resnet() -> nn.Module:
    return make_tiny_resnet()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def quick(method: str) -> dict:
    """The registry's fast parameters for ``method`` (few steps/samples), for contract tests."""
    return dict(xw.get_method(method).quick_params)


def assert_seeded(make: Callable[..., xr.Dataset], **kwargs) -> None:
    """``make(seed=7, **kwargs)`` twice gives the same arrays; ``seed=8`` other images
    and other fixations."""
    a, b, c = make(seed=7, **kwargs), make(seed=7, **kwargs), make(seed=8, **kwargs)
    assert list(a.variables) == list(b.variables)
    for name in a.variables:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert not np.array_equal(a.image.values, c.image.values)
    assert not np.array_equal(a.fixations.values, c.fixations.values)


def assert_netcdf_round_trip(ds: xr.Dataset, path: Path) -> None:
    """Attrs are netCDF-safe (strings, numbers, lists of them), and the first two images
    written to ``path`` read back identical."""
    for value in ds.attrs.values():
        plain = (str, int, float)
        assert isinstance(value, plain) or all(isinstance(v, plain) for v in value), value
    pytest.importorskip("h5netcdf")
    part = ds.isel(image=slice(0, 2))
    part.to_netcdf(path, engine="h5netcdf")
    xr.testing.assert_identical(xr.load_dataset(path, engine="h5netcdf"), part)


def count_forwards(model: nn.Module) -> tuple[list[int], RemovableHandle]:
    """Count the passes ``model`` starts (a forward pre-hook: a FEM pass that stops after
    its layer counts too); the list's length is the count, remove the handle when done.

    Example: ``forwards, handle = count_forwards(model)``, later ``handle.remove()``.
    """
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    """Wrap ``cls.name`` (undone by ``monkeypatch``) so every call is counted (the count is
    the list's length). Example: ``calls = count_calls(monkeypatch, xw.Explainer, "explain")``.
    """
    calls: list[int] = []
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls
