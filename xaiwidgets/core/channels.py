"""Channels of a layer: how many a layer has, which ones a caller asked for, and the
one channel measure that needs no method (the activation maximum).

The channel measures and conditional maps of the methods live with their families
(:meth:`~xaiwidgets.core.registry.Method.channel_terms`,
:meth:`~xaiwidgets.core.registry.Method.conditional`); this module only checks what
the caller passes, so every method refuses a bad channel list the same way.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
>>> from xaiwidgets.core.context import Context
>>> ctx = Context(model, torch.rand(1, 3, 8, 8))
>>> channel_count(ctx, "1"), check_channels(ctx, "1", [2, 0]).tolist()
(4, [0, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context


def channel_count(ctx: Context, layer: str) -> int:
    """Number of channels of ``layer``'s output, from the construction probe (no pass).

    Token layers count as the feature maps they are read as (a ViT block's (N, L, D)
    tokens: D channels on the patch grid, ``Context.layer_grid``). A layer whose output
    is no feature map (N, C, h, w) (or (N, C, t, h, w) for clips) has no channels in
    this sense: a clear error names the fix.
    """
    if layer not in ctx.shapes():
        raise ValueError(f"layer {layer!r} did not run in the model's forward pass; pick a "
                         "layer from Explainer.layers()")
    ctx.layer_grid(layer)  # an ambiguous token layer: its error names how to give the grid
    shape = ctx.map_shapes().get(layer, ctx.shapes()[layer])
    if len(shape) not in (4, 5):
        raise ValueError(
            f"layer {layer!r} outputs shape {tuple(shape)}, not a feature map (N, C, h, w): "
            "it has no channels to look at. Pick a convolutional layer or block from "
            "Explainer.layers() (the default layer is the last feature map)")
    return int(shape[1])


def check_channels(ctx: Context, layer: str, channels: Any) -> torch.Tensor:
    """The channel indices asked for, sorted and unique, as a long tensor; a clear error
    for an empty list, a non-integer or an index out of range of ``layer``."""
    count = channel_count(ctx, layer)
    if isinstance(channels, (int, np.integer)) and not isinstance(channels, bool):
        channels = [int(channels)]
    if isinstance(channels, (torch.Tensor, np.ndarray)):
        channels = channels.reshape(-1).tolist()
    if not isinstance(channels, Sequence) or isinstance(channels, str):
        raise TypeError(f"channels must be a list of channel indices (ints), got "
                        f"{type(channels).__name__}")
    if len(channels) == 0:
        raise ValueError("channels is empty: pass at least one channel index, e.g. "
                         "channels=[0] (ex.channels(...) ranks them)")
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in channels):
        raise TypeError(f"channels must be channel indices (ints), got {list(channels)!r}")
    bad = [int(k) for k in channels if not 0 <= int(k) < count]
    if bad:
        raise ValueError(f"channel {bad[0]} is out of range: layer {layer!r} has {count} "
                         f"channels (valid: 0..{count - 1})")
    return torch.tensor(sorted({int(k) for k in channels}), dtype=torch.long)


def channel_mask(channels: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    """A (1, C, 1, 1) (or (1, C, 1, 1, 1)) 0/1 mask of ``channels``, broadcastable on
    a feature map ``like`` (N, C, ...), in its dtype and device.

    >>> channel_mask(torch.tensor([1]), 3, torch.zeros(2, 3, 4, 4)).flatten().tolist()
    [0.0, 1.0, 0.0]
    """
    mask = torch.zeros(count, dtype=like.dtype, device=like.device)
    mask[channels.to(like.device)] = 1
    return mask.reshape(1, count, *([1] * (like.ndim - 2)))


def activation_terms(activation: torch.Tensor) -> torch.Tensor:
    """Each channel's maximum over its feature map: (N, C, ...) → (N, C).

    >>> activation_terms(torch.arange(8.).reshape(1, 2, 2, 2)).tolist()
    [[3.0, 7.0]]
    """
    return activation.flatten(2).amax(dim=2)
