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
    """Validate and return ``images`` as a float tensor of shape (N, 3, H, W).

    Accepts a tensor or numpy array of shape (3, H, W) or (N, 3, H, W); rejects
    other shapes, grayscale, integer dtypes and NaN/inf with a message saying how to fix it.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, xr.DataArray):
        images = torch.from_numpy(np.asarray(images.values))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N,3,H,W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(
            f"{name} must have shape (N,3,H,W) or (3,H,W); got shape {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        raise ValueError(
            f"{name} look grayscale (1 channel, shape {tuple(images.shape)}); "
            "CNN classifiers take RGB: use images.repeat(1, 3, 1, 1)"
        )
    if images.shape[1] != 3 and images.shape[-1] == 3:
        raise ValueError(
            f"{name} look channels-last (shape {tuple(images.shape)}); "
            "use images.permute(0, 3, 1, 2) to get (N,3,H,W)"
        )
    if images.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (N,3,H,W); got shape {tuple(images.shape)}")
    if not torch.is_floating_point(images):
        raise TypeError(
            f"{name} have dtype {images.dtype}; pass floats, e.g. images.float() / 255 "
            "for uint8 pictures"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf values; clean them before explaining")
    return images
