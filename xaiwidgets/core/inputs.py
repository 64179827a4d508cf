"""Validation of the images a user passes: shape, channels, dtype, finiteness.

>>> import torch
>>> as_image_batch(torch.rand(3, 8, 8)).shape
torch.Size([1, 3, 8, 8])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr


def as_image_batch(images: Any, name: str = "images") -> torch.Tensor:
    """Validate and return ``images`` as a float tensor (N, C, H, W), or (N, C, T, H, W) clips.

    Accepts a tensor or numpy array of shape (C, H, W) or (N, C, H, W) with any
    number of channels C ≥ 1 (grayscale, RGB, multispectral), or a batch of video
    clips (N, C, T, H, W) for 3D CNNs; rejects other shapes,
    channels-last layouts, integer dtypes and NaN/inf with a message saying how to fix it.

    >>> as_image_batch(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 1, 28, 28])
    >>> as_image_batch(torch.rand(2, 3, 8, 32, 32)).shape
    torch.Size([2, 3, 8, 32, 32])
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, xr.DataArray):
        images = torch.from_numpy(np.asarray(images.values))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N,C,H,W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim not in (4, 5):
        raise ValueError(
            f"{name} must have shape (N,C,H,W) or (C,H,W), or (N,C,T,H,W) for video clips; "
            f"got shape {tuple(images.shape)}"
        )
    if images.shape[-1] in (1, 3) and images.shape[1] > 4 and images.shape[-2] > 4:
        # (N, H, W, 1 or 3): a width of 1 or 3 pixels is far less likely than channels-last
        layout, order = ("(N,C,H,W)", "0, 3, 1, 2") if images.ndim == 4 else \
            ("(N,C,T,H,W)", "0, 4, 1, 2, 3")
        raise ValueError(
            f"{name} look channels-last (shape {tuple(images.shape)}); "
            f"use images.permute({order}) to get {layout}"
        )
    if min(images.shape) == 0:
        raise ValueError(f"{name} are empty (shape {tuple(images.shape)})")
    if not torch.is_floating_point(images):
        raise TypeError(
            f"{name} have dtype {images.dtype}; pass floats, e.g. images.float() / 255 "
            "for uint8 pictures"
        )
    # NaN propagates through min and max, and ±inf is the min or the max: one reduction
    # pass without a mask (isfinite(images).all() allocates one: ~15× slower on CPU)
    if not torch.isfinite(torch.stack(torch.aminmax(images))).all():
        raise ValueError(f"{name} contain NaN or inf values; clean them before explaining")
    return images


def channel_mismatch(model: torch.nn.Module, inputs: torch.Tensor) -> ValueError | None:
    """A clear error when the model's first convolution takes another channel count
    than ``inputs`` have (e.g. grayscale images for an RGB model), else ``None``.

    >>> conv = torch.nn.Conv2d(3, 2, 3)
    >>> str(channel_mismatch(conv, torch.rand(1, 1, 8, 8)))[:40]
    "the model's first convolution ('') takes"
    """
    first = next(((n, m) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is None or first[1].in_channels == inputs.shape[1]:
        return None
    name, conv = first
    hint = ""
    if inputs.shape[1] == 1 and conv.in_channels == 3:
        hint = "; these look grayscale: use images.repeat(1, 3, 1, 1) for an RGB model"
    return ValueError(
        f"the model's first convolution ({name!r}) takes {conv.in_channels} channels, but "
        f"the inputs have {inputs.shape[1]} (shape {tuple(inputs.shape)}){hint}"
    )
