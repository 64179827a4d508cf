"""Gaze fixation density maps (GFDM): human fixations turned into a smooth reference map.

G = sum over fixations (u, v) of an isotropic Gaussian N((u, v), sigma^2 I), then
scaled to max 1 (an image with no fixation gives an all-zero map, never NaN).
sigma is the projection of the fovea (about 2 degrees of visual angle) on the image,
see :func:`sigma_from_visual_angle`; for the synthetic shapes data the default is
1/16 of the image side (:func:`default_sigma`).

>>> import numpy as np, xaiwidgets as xw
>>> g = xw.gfdm(np.array([[10, 20]]), shape=(32, 48), sigma=3)
>>> g.shape, float(g.max()), [int(i) for i in np.unravel_index(g.argmax(), g.shape)]
((32, 48), 1.0, [10, 20])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def sigma_from_visual_angle(
    distance_cm: float, pixels_per_cm: float, angle_deg: float = 2.0
) -> float:
    """Gaussian sigma in pixels: the fovea's projection, D * tan(angle / 2) * pixels per cm.

    >>> round(sigma_from_visual_angle(60, 38), 2)   # 60 cm from a ~96 dpi screen
    39.8
    """
    if distance_cm <= 0 or pixels_per_cm <= 0 or angle_deg <= 0:
        raise ValueError("distance_cm, pixels_per_cm and angle_deg must be positive")
    return float(distance_cm * math.tan(math.radians(angle_deg) / 2) * pixels_per_cm)


def default_sigma(shape: tuple[int, ...] | int) -> float:
    """The documented default sigma for the synthetic shapes data: 1/16 of the image side.

    >>> default_sigma((128, 128))
    8.0
    """
    side = shape if isinstance(shape, int) else max(shape[-2:])
    return side / 16


def _gaussian_rows(centres: np.ndarray, length: int, sigma: float) -> np.ndarray:
    """(k, length) matrix: exp(-(centre_k - i)^2 / (2 sigma^2)) for pixel index i."""
    d = centres[:, None] - np.arange(length, dtype=np.float64)[None, :]
    return np.exp(-0.5 * (d / sigma) ** 2)


def _normalise_max(maps: np.ndarray) -> np.ndarray:
    """Scale each trailing (H, W) map to max 1; all-zero maps stay zero (no 0/0)."""
    peak = maps.max(axis=(-2, -1), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def gfdm(
    fixations: Any,
    shape: tuple[int, int] | None = None,
    sigma: float | None = None,
) -> np.ndarray:
    """Gaze fixation density map: a sum of isotropic Gaussians at the fixations, max 1.

    Parameters
    ----------
    fixations
        Either an array ``(k, 2)`` of ``(y, x)`` pixel coordinates (floats allowed;
        points outside the image still spread into it), or a fixation *count map*
        ``(H, W)`` (or stacked ``(..., H, W)``, each map handled on its own) whose
        value at a pixel is how many fixations landed there. A 2-D array whose shape
        equals ``shape`` (or any array when ``shape`` is omitted) is read as a count map.
    shape
        ``(H, W)`` of the map; required for coordinates.
    sigma
        Gaussian standard deviation in pixels (see :func:`sigma_from_visual_angle`);
        default :func:`default_sigma`, 1/16 of the image side.

    Returns
    -------
    numpy.ndarray
        float32 map(s) ``(..., H, W)`` scaled to max 1; all zeros where there is no fixation.

    The sum is exact (no kernel truncation): a Gaussian is separable, so the map is
    ``Gy.T @ Gx`` for coordinates and ``Ky @ C @ Kx.T`` for a count map ``C``
    (``K[i, j] = exp(-(i - j)^2 / (2 sigma^2))``).

    >>> counts = np.zeros((5, 5)); counts[2, 2] = 1
    >>> bool(np.allclose(gfdm(counts, sigma=1), gfdm(np.array([[2, 2]]), (5, 5), sigma=1)))
    True
    """
    array = np.asarray(fixations, dtype=np.float64)
    as_counts = shape is None or (
        array.ndim >= 2 and tuple(array.shape[-2:]) == tuple(shape)
    )
    if as_counts:
        if array.ndim < 2:
            raise ValueError(f"a count map must be (H, W) or (..., H, W); got {array.shape}")
        height, width = array.shape[-2:]
    else:
        if array.size == 0:
            array = array.reshape(0, 2)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(
                f"fixations must be (k, 2) (y, x) coordinates or an {tuple(shape)} count map; "
                f"got shape {array.shape}"
            )
        height, width = (int(s) for s in shape)
    sigma = default_sigma((height, width)) if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not np.isfinite(array).all():
        raise ValueError("fixations contain NaN or inf")
    if as_counts:
        ky = _gaussian_rows(np.arange(height, dtype=np.float64), height, sigma)
        kx = _gaussian_rows(np.arange(width, dtype=np.float64), width, sigma)
        # two plain GEMMs over all stacked maps (faster than broadcasting matmul)
        along_x = np.tensordot(array, kx, axes=([-1], [1]))
        density = np.moveaxis(np.tensordot(ky, along_x, axes=([1], [-2])), 0, -2)
    else:
        density = _gaussian_rows(array[:, 0], height, sigma).T @ _gaussian_rows(
            array[:, 1], width, sigma
        )
    return _normalise_max(density).astype(np.float32)
