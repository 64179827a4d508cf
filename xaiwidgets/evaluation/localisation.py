"""Localisation metrics: does the map put its relevance on the target object?

Each compares a saliency map with a boolean target mask (the shapes' ``mask``) as
Quantus 0.6 defines it (Arras et al. 2022, CLEVR-XAI; Zhang et al. 2018, the pointing
game), per map, for stacks of maps at once. Quantus first divides a map by its largest
absolute value (``normalise=True``): none of the three depends on a positive scale, so
the maps are used as given. An empty mask gives NaN (the question has no answer).

>>> import numpy as np
>>> s = np.array([[0.1, 0.9], [0.3, 0.2]]); m = np.array([[False, True], [False, False]])
>>> pointing_game(s, m), relevance_mass(s, m), relevance_rank(s, m)
(1.0, 0.6, 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import _flat, _metric


def _dilate(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """(B, H, W) masks grown by every pixel within ``tolerance`` pixels (Euclidean)."""
    from scipy.ndimage import binary_dilation

    r = int(np.floor(tolerance))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (y**2 + x**2) <= tolerance**2
    return binary_dilation(mask, structure=disk[None])


@_metric(higher_is_better=True, needs="mask")
def pointing_game(saliency: Any, mask: Any, tolerance: float = 0) -> Any:
    """Pointing game: 1.0 if a pixel attaining the map's maximum lies in the mask, else 0.0.

    Every pixel equal to the maximum counts (ties: any of them hits), as Quantus'
    ``PointingGame``. ``tolerance`` (pixels, default 0 = Quantus) also counts a maximum
    within that Euclidean distance of the mask as a hit, the 15-pixel margin of Zhang et
    al.'s original pointing game (Quantus has none: its issue #296). NaN for an empty mask.

    >>> pointing_game(np.array([[0.0, 1.0, 0.0]]), np.array([[1, 0, 0]]), tolerance=1)
    1.0
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0 (pixels)")
    s, m = _flat(saliency), _flat(mask)
    empty = ~m.any(axis=1)
    if tolerance > 0:
        m = _flat(_dilate(mask, tolerance))
    top = s == s.max(axis=1, keepdims=True)
    hit = (top & m).any(axis=1).astype(np.float64)
    hit[empty] = np.nan
    return hit


@_metric(higher_is_better=True, needs="mask")
def relevance_mass(saliency: Any, mask: Any) -> Any:
    """Relevance mass accuracy: Σ of the map inside the mask / Σ of the whole map.

    Signed maps are used as given (Quantus' default ``abs=False``), so negative
    relevance outside the mask can push the ratio above 1. NaN for an empty mask and
    for a map summing to 0 (all-zero: no relevance to place).

    >>> relevance_mass(np.array([[3.0, 1.0]]), np.array([[True, False]]))
    0.75
    """
    s, m = _flat(saliency), _flat(mask)
    total = s.sum(axis=1)
    inside = np.add.reduce(s, axis=1, where=m)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = inside / total
    out[~m.any(axis=1) | (total == 0)] = np.nan
    return out


@_metric(higher_is_better=True, needs="mask")
def relevance_rank(saliency: Any, mask: Any) -> Any:
    """Relevance rank accuracy: the fraction of the K highest pixels (K = the mask's
    size) that lie in the mask.

    Ties at the K-th value are taken in raster order (a stable descending sort; Quantus
    uses NumPy's default unstable ``argsort``, which agrees on maps without ties). NaN
    for an empty mask.

    >>> relevance_rank(np.array([[0.5, 0.5, 0.1]]), np.array([[False, True, False]]))
    0.0
    """
    s, m = _flat(saliency), _flat(mask)
    k = m.sum(axis=1)
    out = np.full(len(s), np.nan)
    for i in np.flatnonzero(k):
        row, kk = s[i], int(k[i])
        # the K-th largest value in O(P); pixels above it are in, ties fill up in raster order
        kth = np.partition(row, row.size - kk)[row.size - kk]
        above = row > kth
        ties = np.flatnonzero(row == kth)[:kk - int(above.sum())]
        out[i] = (np.count_nonzero(above & m[i]) + np.count_nonzero(m[i][ties])) / kk
    return out
