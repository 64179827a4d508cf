"""Complexity metrics: how concentrated is a map? (Quantus 0.6 definitions, per map.)

Both take |a| divided by the map's largest absolute value (Quantus' defaults
``abs=True, normalise=True``; Quantus normalises by the largest value of the whole
*batch* it is given, here each map is its own batch, so a stack gives the same numbers
as one map at a time).

* :func:`sparseness` (Chalasani et al. 2020): the Gini index of the normalised values
  (+1e-7 as Quantus); 1 = all relevance on one pixel, 0 for a constant or all-zero map.
  Higher is better.
* :func:`complexity` (Bhatt et al. 2020): the entropy (nats) of the normalised values
  as a distribution; ln(P) for a constant map, 0 for an all-zero map (Quantus: NaN).
  Lower is better.

>>> import numpy as np
>>> round(sparseness(np.array([[0.0, 0.0, 0.0, 1.0]])), 6), complexity(np.ones((2, 2))) > 1.38
(0.75, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import _flat, _metric

#: added to every normalised value before the Gini index (Quantus' Sparseness)
SPARSENESS_EPS = 1e-7
#: inside the logarithm of the entropy (Quantus' Complexity)
COMPLEXITY_EPS = 1e-12


def _normalised_abs(saliency: np.ndarray) -> np.ndarray:
    """|a| / max|a| per row (all-zero rows stay zero, as Quantus' ``normalise_by_max``)."""
    a = np.abs(_flat(saliency))
    top = a.max(axis=1, keepdims=True)
    a /= np.where(top > 0, top, 1.0)
    return a


@_metric(higher_is_better=True, needs="none")
def sparseness(saliency: Any) -> Any:
    """Sparseness: Gini index of |a| / max|a| (+1e-7 as Quantus); 0 for constant maps.

    >>> sparseness(np.ones((3, 3)))
    0.0
    """
    a = np.sort(_normalised_abs(saliency) + SPARSENESS_EPS, axis=1)
    n = a.shape[1]
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    out = np.einsum("ij,j->i", a, weights) / (n * a.sum(axis=1))  # no BLAS threads
    out[a[:, 0] == a[:, -1]] = 0.0  # constant: exactly 0 (the sum above rounds)
    return out


@_metric(higher_is_better=False, needs="none")
def complexity(saliency: Any) -> Any:
    """Complexity: entropy of |a| / Σ|a| (nats, log(p + 1e-12) as Quantus); 0 for an
    all-zero map.

    >>> round(complexity(np.array([[1.0, 1.0, 0.0, 0.0]])), 6)
    0.693147
    """
    a = _normalised_abs(saliency)
    total = a.sum(axis=1, keepdims=True)
    p = a / np.where(total > 0, total, 1.0)
    return -np.einsum("ij,ij->i", p, np.log(p + COMPLEXITY_EPS))
