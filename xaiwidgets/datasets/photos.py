"""A handful of real photographs that ship with scikit-image (no download needed).

Good for trying ImageNet models: an astronaut, a cat, a cup of coffee, a rocket
and a motorcycle, centre-cropped to squares and resized.

>>> import xaiwidgets as xw
>>> images, names = xw.datasets.photos(size=64)
>>> tuple(images.shape), names[1]
((5, 3, 64, 64), 'cat')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

#: photo name -> loader; all read files bundled in the scikit-image wheel (no pooch fetch)
PHOTOS = {
    "astronaut": skimage.data.astronaut,
    "cat": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}


def resize(images: Any, size: int = 224, crop: bool = True) -> torch.Tensor:
    """Images (H,W,3)/(3,H,W)/(N,3,H,W), uint8 or float, to float (N,3,size,size) in [0,1].

    ``crop=True`` centre-crops to a square first (keeps the aspect ratio, as ImageNet
    evaluation does); ``crop=False`` squashes. Antialiased bilinear resampling.

    >>> resize(np.zeros((30, 40, 3), np.uint8), size=8).shape
    torch.Size([1, 3, 8, 8])
    """
    array = torch.as_tensor(np.asarray(images))
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] not in (3, 4):
        array = array[..., :3].permute(2, 0, 1)
    if array.ndim == 3:
        array = array.unsqueeze(0)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected (H,W,3), (3,H,W) or (N,3,H,W) images; got {tuple(array.shape)}")
    if array.dtype == torch.uint8:
        array = array.float() / 255
    array = array.float()
    if crop:
        height, width = array.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        array = array[..., top : top + side, left : left + side]
    out = F.interpolate(array, size=(size, size), mode="bilinear", antialias=True)
    return out.clamp(0, 1)


def photos(size: int = 224, names: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Real photos as a float tensor (N, 3, size, size) in [0, 1] and their names.

    Parameters
    ----------
    size
        Side of the square output (224 suits ImageNet models).
    names
        A subset of ``PHOTOS`` (default: all, in its order).

    >>> images, names = photos(size=64)
    >>> tuple(images.shape[1:]), images.dtype
    ((3, 64, 64), torch.float32)
    """
    names = list(PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown photos {unknown}; choose from {list(PHOTOS)}")
    images = torch.cat([resize(PHOTOS[name](), size) for name in names])
    return images, names
