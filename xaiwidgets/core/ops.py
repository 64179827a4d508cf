"""Small tensor and naming helpers shared by every layer.

>>> import torch
>>> minmax(torch.tensor([[[1.0, 3.0]]]))
tensor([[[0., 1.]]])
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def minmax(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Min-max normalise to [0, 1] over ``dims``; a constant map becomes all zeros.

    >>> minmax(torch.full((1, 2, 2), 5.0)).sum().item()
    0.0
    """
    if tuple(dims) == (-2, -1) and maps.ndim >= 2:
        # one pass for both extremes (a slider re-normalises whole FEM stacks)
        low, high = torch.aminmax(maps.flatten(-2), dim=-1, keepdim=True)
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)
    else:
        low = maps.amin(dim=dims, keepdim=True)
        high = maps.amax(dim=dims, keepdim=True)
    span = high - low
    # a constant map has maps - low == 0 everywhere: dividing by 1 keeps it all zeros
    return (maps - low).div_(torch.where(span > 0, span, torch.ones_like(span)))


def value_span(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Per-map ``max - min`` over ``dims`` (0 for a constant map).

    >>> value_span(torch.tensor([[[1.0, 4.0]]])).tolist()
    [3.0]
    """
    return maps.amax(dim=dims) - maps.amin(dim=dims)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (N, H, W) or (N, C, H, W) maps to ``size``.

    >>> upsample(torch.zeros(1, 2, 2), (4, 4)).shape
    torch.Size([1, 4, 4])
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    squeeze = maps.ndim == 3
    x = maps.unsqueeze(1) if squeeze else maps
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.squeeze(1) if squeeze else x


def reduce_channels(attribution: torch.Tensor, how: str) -> torch.Tensor:
    """(N, C, H, W) → (N, H, W): ``max_abs`` (survey's RGB rule), ``sum``, ``sum_abs``.

    >>> reduce_channels(torch.tensor([[[[1.0]], [[-2.0]]]]), "max_abs").item()
    2.0
    """
    if how == "max_abs":
        return attribution.abs().amax(dim=1)
    if how == "sum":
        return attribution.sum(dim=1)
    if how == "sum_abs":
        return attribution.abs().sum(dim=1)
    raise ValueError(f"unknown reduction {how!r}; choose max_abs, sum or sum_abs")


def attr_value(value: Any) -> Any:
    """A parameter as a netCDF-safe attribute (str, number or array; never None/dict).

    >>> attr_value(None), attr_value(True), attr_value(["a", "b"])
    ('none', 1, 'a,b')
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if isinstance(value, torch.Tensor):
        return "tensor" if value.numel() > 1 else float(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return ",".join(value)
        return np.asarray(value)
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)


def close_matches(word: str, options: Sequence[str], n: int = 5) -> list[str]:
    """Options that look like ``word`` (for 'did you mean' errors).

    >>> close_matches("gradcm", ["gradcam", "fem"])
    ['gradcam']
    """
    matches = difflib.get_close_matches(str(word), list(options), n=n, cutoff=0.5)
    if not matches:
        matches = [o for o in options if str(word).lower() in o.lower()][:n]
    return matches


def did_you_mean(kind: str, word: Any, options: Sequence[str]) -> str:
    """The message of an unknown-name error, with close matches and the known names.

    >>> did_you_mean("method", "gradcm", ["gradcam", "fem"])
    "unknown method 'gradcm'. Did you mean ['gradcam']? Known methods: fem, gradcam"
    """
    close = close_matches(str(word), options, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return f"unknown {kind} {word!r}.{hint} Known {kind}s: {', '.join(sorted(options))}"


def model_tag(model: nn.Module) -> str:
    """The package name a model was loaded under (``xw.models.load`` tags it), else ``""``.

    >>> model_tag(nn.Linear(1, 1))
    ''
    """
    return str(getattr(model, "xaiwidgets_name", "") or "")


def model_device(model: nn.Module, default: str | torch.device = "cpu") -> torch.device:
    """The device of a model's first parameter or buffer (``default`` when it has none).

    >>> model_device(nn.Linear(1, 1)).type
    'cpu'
    """
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device(default)
