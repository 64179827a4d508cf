"""Heatmaps as pictures: colormaps, overlays on the image, PNG export.

Engine-side (matplotlib only, no widgets): the widgets and any script draw maps
the same way. Also registers the ``.xai`` accessor on every ``xr.DataArray``::

    >>> import numpy as np, xarray as xr
    >>> da = xr.DataArray(np.random.rand(1, 8, 8), dims=("image", "y", "x"))
    >>> da.xai.overlay().shape          # RGB uint8 of the map (no image: on black)
    (8, 8, 3)
    >>> da.xai.to_png("map.png", image=np.random.rand(3, 8, 8))  # doctest: +SKIP

Signed maps (``attrs["signed"]``) get a diverging colormap centred at 0; the
others a perceptually uniform sequential one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import numpy as np
import xarray as xr

#: sequential default (perceptually uniform) and the diverging default for signed maps
SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"
#: colormaps offered by the widgets; "auto" picks SEQUENTIAL or DIVERGING by the sign
COLORMAPS = ("auto", "inferno", "viridis", "magma", "jet", "gray", DIVERGING)


def resolve_colormap(name: str | None, signed: bool) -> str:
    """The matplotlib colormap to use: ``None``/``"auto"`` → by sign, else ``name``.

    >>> resolve_colormap("auto", signed=True), resolve_colormap(None, signed=False)
    ('RdBu_r', 'inferno')
    """
    if name in (None, "auto"):
        return DIVERGING if signed else SEQUENTIAL
    if name not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {name!r}; try one of {list(COLORMAPS)}")
    return name


def color_limits(values: Any, signed: bool) -> tuple[float, float]:
    """Colour range of a map: symmetric ±max|v| when signed (0 at the centre), else min..max.

    A constant map gets a unit-wide range so it draws as one flat colour, never NaN.

    >>> color_limits(np.array([-1.0, 3.0]), signed=True)
    (-3.0, 3.0)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (-1.0, 1.0) if signed else (0.0, 1.0)
    if signed:
        bound = float(np.abs(v).max())
        return (-bound, bound) if bound > 0 else (-1.0, 1.0)
    low, high = float(v.min()), float(v.max())
    return (low, high) if high > low else (low, low + 1.0)


def coverage(scaled: Any, signed: bool) -> np.ndarray:
    """How much of the colour covers the image, per colour-scale position in [0, 1].

    Signed maps fade to transparent at 0 (the middle of the scale), so the image
    shows where the attribution is neutral and colour marks evidence for or against;
    unsigned maps cover evenly.

    >>> coverage(np.array([0.0, 0.5, 1.0]), signed=True)
    array([1., 0., 1.])
    """
    scaled = np.asarray(scaled, dtype=np.float64)
    return np.abs(2.0 * scaled - 1.0) if signed else np.ones_like(scaled)


def colorize(values: Any, colormap: str | None = None, signed: bool = False,
             limits: tuple[float, float] | None = None) -> np.ndarray:
    """A 2-D map as RGBA floats in [0, 1], shape (H, W, 4); alpha is :func:`coverage`.

    >>> colorize(np.array([[0.0, 1.0]]), "gray")[0, :, 0]
    array([0., 1.])
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"colorize takes one 2-D map, got shape {v.shape}")
    low, high = limits if limits is not None else color_limits(v, signed)
    scaled = np.clip((np.nan_to_num(v, nan=low) - low) / (high - low), 0.0, 1.0)
    rgba = matplotlib.colormaps[resolve_colormap(colormap, signed)](scaled)
    rgba[..., 3] = coverage(scaled, signed)
    return rgba


#: channels shown as red, green, blue for images with other than 1 or 3 channels
#: (multispectral); set per call with ``display_image(image, channels=(3, 2, 1))``
DEFAULT_CHANNELS = (0, 1, 2)


def display_image(image: Any, channels: tuple[int, int, int] | None = None) -> np.ndarray:
    """An image as (H, W, 3) floats in [0, 1] for display.

    Takes (C, H, W) arrays, tensors or DataArrays (or (H, W, 3), (H, W)): RGB when
    C = 3, gray for one channel, else the ``channels`` triplet (default
    :data:`DEFAULT_CHANNELS`; a 2-channel image shows its first channel in gray).
    Values outside [0, 1] (a model input that was already normalised) are min-max scaled.

    >>> display_image(np.zeros((1, 4, 5))).shape
    (4, 5, 3)
    >>> display_image(np.random.rand(13, 4, 4), channels=(3, 2, 1)).shape
    (4, 4, 3)
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 2:
        img = img[None]
    if img.ndim == 3 and not (img.shape[-1] == 3 and img.shape[0] != 3):
        img = pick_channels(img, channels).transpose(1, 2, 0)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an image (C,H,W), (H,W,3) or (H,W), got shape {img.shape}")
    low, high = float(img.min()), float(img.max())
    if low < -1e-3 or high > 1 + 1e-3:
        img = (img - low) / (high - low) if high > low else np.zeros_like(img)
    return np.clip(img, 0.0, 1.0)


def pick_channels(img: np.ndarray, channels: tuple[int, int, int] | None = None) -> np.ndarray:
    """(C, H, W) → (3, H, W): RGB as is, one channel repeated as gray, else a triplet."""
    count = img.shape[0]
    if channels is None:
        if count == 3:
            return img
        if count < 3:
            return np.repeat(img[:1], 3, axis=0)
        channels = DEFAULT_CHANNELS
    if len(channels) != 3 or not all(0 <= int(c) < count for c in channels):
        raise ValueError(
            f"channels={tuple(channels)} must be three indices in 0..{count - 1} "
            "(shown as red, green, blue)"
        )
    return img[list(channels)]


def overlay(values: Any, image: Any = None, colormap: str | None = None, opacity: float = 0.6,
            signed: bool = False, limits: tuple[float, float] | None = None) -> np.ndarray:
    """The coloured map blended over ``image`` (or over black): RGB uint8 (H, W, 3).

    ``opacity`` is the heatmap's weight: 0 shows only the image, 1 only the map
    (for signed maps, times the :func:`coverage` that fades them out around 0).

    >>> overlay(np.array([[0.0, 1.0]]), np.zeros((3, 1, 2)), "gray", opacity=0.5)[0, :, 0]
    array([  0, 128], dtype=uint8)
    """
    rgba = colorize(values, colormap, signed, limits)
    colored, weight = rgba[..., :3], opacity * rgba[..., 3:]
    base = np.zeros_like(colored) if image is None else display_image(image)
    if base.shape[:2] != colored.shape[:2]:
        raise ValueError(f"image {base.shape[:2]} and map {colored.shape[:2]} differ in size")
    mixed = (1.0 - weight) * base + weight * colored
    return np.round(np.clip(mixed, 0.0, 1.0) * 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 or float array as PNG bytes."""
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.asarray(rgb), format="png")
    return buffer.getvalue()


def _is_signed(da: xr.DataArray) -> bool:
    return bool(int(da.attrs.get("signed", 0)))


@xr.register_dataarray_accessor("xai")
class XaiAccessor:
    """``da.xai``: draw an explanation map (dims ``("image","y","x")`` or ``("y","x")``).

    >>> da.xai.overlay(image, index=0, opacity=0.5)   # doctest: +SKIP
    >>> da.xai.to_png("gradcam.png", image=image)     # doctest: +SKIP
    """

    def __init__(self, da: xr.DataArray) -> None:
        self._da = da

    def map2d(self, index: int = 0) -> np.ndarray:
        """The 2-D map of image ``index`` as float64."""
        da = self._da
        if "image" in da.dims:
            da = da.isel(image=index)
        if da.dims != ("y", "x"):
            raise ValueError(
                f"expected dims ('image', 'y', 'x') or ('y', 'x'), got {da.dims}; "
                "reduce channels first (explain(..., reduce='default'))"
            )
        return np.asarray(da.values, dtype=np.float64)

    @property
    def signed(self) -> bool:
        """True when the map is signed (drawn with a diverging colormap centred at 0)."""
        return _is_signed(self._da)

    def overlay(self, image: Any = None, index: int = 0, colormap: str | None = None,
                opacity: float = 0.6) -> np.ndarray:
        """The map of image ``index`` over ``image`` as RGB uint8 (H, W, 3)."""
        if image is not None and np.ndim(image) == 4:
            image = image[index]
        return overlay(self.map2d(index), image, colormap, opacity, self.signed)

    def to_png(self, path: str | Path, image: Any = None, index: int = 0,
               colormap: str | None = None, opacity: float = 0.6) -> Path:
        """Write :meth:`overlay` to a PNG file; returns the path."""
        path = Path(path)
        path.write_bytes(png_bytes(self.overlay(image, index, colormap, opacity)))
        return path
