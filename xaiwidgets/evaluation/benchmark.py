"""Saliency-benchmark metrics as pysaliency 0.2.22 defines them, and the EMD.

* :func:`shuffled_auc`: ROC area of the map's values at the fixated pixels against its
  values at the *other images'* fixated pixels (centre bias cancels out);
* :func:`info_gain`: bits per fixation of the map as a density over a baseline density
  (Kümmerer et al. 2015);
* :func:`emd`: earth mover's distance between the two maps as distributions (POT).

Fixation maps are counts or masks: a fixated pixel counts once (> 0), so pysaliency on
the list of distinct fixated pixels gives the same numbers. Ties count 1/2 in the AUC.

>>> import numpy as np
>>> s = np.array([[0.9, 0.1], [0.5, 0.2]])
>>> shuffled_auc(s, np.array([[1, 0], [0, 0]]), np.array([[0, 1], [1, 0]]))
1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import _distribution, _flat, _metric

#: maps with a side above this are block-summed before the EMD (an exact transport problem
#: over P pixels costs about P³: 16² pixels take ~10 ms, 32² about 1 s; the MIT benchmark's
#: EMD shrinks maps to 1/32 of their side)
EMD_MAX_SIDE = 16


def _require_density(name: str, *maps: np.ndarray) -> None:
    for m in maps:
        if m is not None and (m < 0).any():
            raise ValueError(
                f"{name} treats maps as densities and got negative values; pass a "
                "non-negative map (e.g. np.abs(map) or map.clip(0), or an unsigned method)"
            )


@_metric(higher_is_better=True, needs="shuffled")
def shuffled_auc(saliency: Any, fixations: Any, other_fixations: Any) -> Any:
    """Shuffled AUC: P(s at a fixated pixel > s at another image's fixated pixel), ties ½.

    ``other_fixations`` marks the pixels fixated on *other* images (e.g. the union of the
    rest of the dataset's fixation maps); pysaliency's ``nonfixations="shuffled"``
    averaged over fixations. NaN when the image has no fixations; an error when the
    other images have none (shuffled AUC needs at least two images with fixations).

    >>> shuffled_auc(np.array([[1.0, 1.0]]), np.array([[1, 0]]), np.array([[0, 1]]))
    0.5
    """
    s, f, o = _flat(saliency), _flat(fixations), _flat(other_fixations)
    if not o.any(axis=1).all():
        raise ValueError(
            "shuffled_auc needs negatives: other_fixations (the fixated pixels of *other* "
            "images) is empty for some map; pass the union of the other images' fixation "
            "maps (it needs at least two images with fixations)"
        )
    out = np.full(len(s), np.nan)
    for i in np.flatnonzero(f.any(axis=1)):
        negatives = np.sort(s[i][o[i]])
        positives = s[i][f[i]]
        below = np.searchsorted(negatives, positives, side="left")
        not_above = np.searchsorted(negatives, positives, side="right")
        out[i] = ((below + not_above) / 2).mean() / negatives.size
    return out


@_metric(higher_is_better=True, needs="fixations", optional=("baseline",))
def info_gain(saliency: Any, fixations: Any, baseline: Any = None) -> Any:
    """Information gain (bits per fixation) of saliency/Σ over baseline/Σ at fixated pixels.

    ``baseline`` is a non-negative map (e.g. a centre bias), by default the uniform
    density (pysaliency's default ``UniformModel``). No ε: a zero density at a fixated
    pixel gives -inf (or +inf for the baseline), as pysaliency. A map without mass
    counts as the uniform density. Negative values are an error (densities). NaN
    without fixations.

    >>> round(info_gain(np.array([[3.0, 1.0]]), np.array([[1, 0]])), 6)  # log2(0.75 / 0.5)
    0.584963
    """
    s, f = _flat(saliency), _flat(fixations)
    b = None if baseline is None else _flat(baseline)
    _require_density("info_gain", s, b)
    p = _distribution(s)
    q = np.full_like(p, 1.0 / p.shape[1]) if b is None else _distribution(b)
    rows = np.nonzero(f)[0]  # logarithms only at the fixated pixels
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.log2(p[f]) - np.log2(q[f])
        return np.bincount(rows, gain, len(p)) / f.sum(axis=1)


def _block_sum(a: np.ndarray, factor: int) -> np.ndarray:
    """(B, H, W) maps summed over ``factor``×``factor`` blocks (zero-padded at the end)."""
    b, h, w = a.shape
    a = np.pad(a, ((0, 0), (0, -h % factor), (0, -w % factor)))
    return a.reshape(b, a.shape[1] // factor, factor, a.shape[2] // factor, factor).sum((2, 4))


def _ground_distance(h: int, w: int, scale: float) -> np.ndarray:
    """Euclidean distances between all pixel centres of an h×w grid, times ``scale``."""
    y, x = np.divmod(np.arange(h * w), w)
    points = np.stack([y, x], axis=1).astype(np.float64)
    diff = points[:, None, :] - points[None, :, :]
    return np.sqrt((diff**2).sum(-1)) * scale


@_metric(higher_is_better=False, needs="map")
def emd(saliency: Any, reference: Any) -> Any:
    """Earth mover's distance between the maps as distributions (sum 1), Euclidean ground
    distance in pixels of the maps as given (POT's exact ``ot.emd2``).

    Maps with a side above :data:`EMD_MAX_SIDE` are first summed over blocks of
    f×f pixels (f = ⌈side / 16⌉, the last blocks zero-padded) and the distance is
    measured between block centres, times f: the mass moves the same way at a coarser
    grain (error at most about f pixels). A map without mass counts as the uniform
    density; negative values are an error. Lower is better. Needs ``pip install pot``.

    >>> emd(np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0]]))
    2.0
    """
    try:
        import ot
    except ImportError:
        raise ImportError("emd needs the POT package: pip install pot") from None
    _require_density("emd", saliency, reference)
    factor = max(1, -(-max(saliency.shape[1:]) // EMD_MAX_SIDE))
    if factor > 1:
        saliency, reference = _block_sum(saliency, factor), _block_sum(reference, factor)
    p, q = _distribution(_flat(saliency)), _distribution(_flat(reference))
    cost = _ground_distance(*saliency.shape[1:], float(factor))
    return np.array([ot.emd2(a, b, cost) for a, b in zip(p, q, strict=True)])
