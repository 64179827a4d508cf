"""Saliency metrics: compare explanation maps with gaze data (MIT saliency benchmark).

Every metric takes the explanation map first and the reference second, as numpy
arrays, torch tensors or ``xr.DataArray``; it computes one number per map over
the trailing two dims (y, x) and broadcasts the leading dims, so a stack of maps
gives an array of results (a DataArray over the leading dims for DataArray input).

* ``"map"`` metrics compare with a density map (the GFDM): :func:`pcc`, :func:`sim`,
  :func:`kld`, :func:`ssim`, :func:`spearman`, :func:`l1`;
* ``"fixations"`` metrics take a fixation map (counts or a mask; a pixel counts as
  fixated when > 0): :func:`nss`, :func:`auc_judd`, :func:`auc_borji`.

The other families live in their own modules and are re-exported here (one registry,
:data:`METRICS`): localisation against a boolean ``mask`` (``pointing_game``,
``relevance_mass``, ``relevance_rank``: ``evaluation.localisation``), complexity of the map
alone (``sparseness``, ``complexity``: ``evaluation.complexity``), the saliency benchmark's
``shuffled_auc``, ``info_gain`` and ``emd`` (``evaluation.benchmark``), and, registered for
``xw.evaluate`` and the widgets, the explainer-based metrics of ``evaluation.faithfulness`` and
``evaluation.robustness``.

Video: a DataArray with a ``t`` dim (a clip's (t, y, x) volume, e.g. a result on
``xw.datasets.moving_shapes``) is scored **per frame, then averaged over t**
(frames whose score is NaN, e.g. NSS/AUC on a frame without fixations, are left
out of the average). Plain arrays are never averaged: a (T, H, W) array gives one
score per frame.

Degenerate inputs give defined values, never NaN or a crash: a constant map (max ==
min, even where its mean rounds) has PCC/Spearman/NSS 0 and AUC 0.5, a map with no
mass is the uniform density for SIM and KLD. Only a fixation map without fixations
gives NaN (NSS, AUC), as the question has no answer (and an empty mask, localisation).

Speed: a stack is scored a chunk of about one 224² map at a time (:data:`CHUNK_PIXELS`)
on :data:`THREADS` threads; every metric is vectorised over the chunk (SSIM's Gaussian
filters, Spearman's ranks, AUC-Judd's sort). ``python -m benchmarks.metrics`` times them.

Each metric describes itself in :data:`METRICS` (direction, what it needs):

>>> import numpy as np
>>> from xaiwidgets import metrics
>>> e, g = np.array([[0.9, 0.1], [0.4, 0.0]]), np.array([[0.8, 0.2], [0.6, 0.4]])
>>> round(metrics.pcc(e, g), 6), metrics.METRICS["kld"].higher_is_better
(0.894427, False)
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ..core.ops import did_you_mean

EPS = float(np.finfo(np.float64).eps)  # the MIT code's ``eps`` (KLD)
BORJI_THRESHOLDS = np.round(np.arange(11) * 0.1, 10)  # 0, 0.1, ..., 1 (MIT: 0:0.1:max)
#: a stack of maps is scored this many pixels a call (one map of 224²) ...
CHUNK_PIXELS = 2**16
#: ... and its chunks on this many threads (1: all on the calling thread)
THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1)


@dataclass(frozen=True)
class Metric:
    """A registered metric: its function, direction and the reference it needs.

    ``needs`` names what the metric compares the map with: ``"map"`` (a density map
    such as the GFDM), ``"fixations"`` (fixation counts / a binary mask), ``"mask"``
    (a boolean target mask, localisation), ``"shuffled"`` (fixations and the other
    images' fixations, shuffled AUC), ``"none"`` (the map alone, complexity),
    ``"explainer"`` (the model, the images and the map: faithfulness) or ``"method"``
    (the model, the images and the method itself: robustness, random logit).

    >>> METRICS["nss"].needs, METRICS["nss"].higher_is_better
    ('fixations', True)
    """

    name: str
    function: Callable[..., Any]
    higher_is_better: bool
    needs: str
    doc: str

    def __call__(self, saliency: Any, *references: Any, **kwargs: Any) -> Any:
        return self.function(saliency, *references, **kwargs)


def register(name: str, function: Callable[..., Any], higher_is_better: bool, needs: str,
             doc: str = "") -> Metric:
    """Add a metric to :data:`METRICS` (the one registry ``xw.evaluate`` and the
    widgets' sort read). Used by the evaluation modules for metrics that are not
    map-vs-reference functions (faithfulness, robustness).

    >>> register("pcc", pcc, True, "map") == METRICS["pcc"]   # pcc registers itself so
    True
    """
    doc = doc or (function.__doc__ or "").strip().splitlines()[0]
    METRICS[name] = Metric(name, function, higher_is_better, needs, doc)
    return METRICS[name]


METRICS: dict[str, Metric] = {}


def available(needs: str | None = None) -> list[str]:
    """Names of the registered metrics (optionally only those needing ``"map"``/``"fixations"``).

    >>> available("fixations")
    ['nss', 'auc_judd', 'auc_borji', 'info_gain']
    """
    return [name for name, m in METRICS.items() if needs is None or m.needs == needs]


def get(name: str) -> Metric:
    """The metric called ``name``; a clear error lists the known ones.

    >>> get("kld").higher_is_better, get("nss").needs
    (False, 'fixations')
    """
    if name not in METRICS:
        raise ValueError(did_you_mean("metric", name, list(METRICS)))
    return METRICS[name]


# --------------------------------------------------------------------- plumbing
def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, xr.DataArray):
        value = value.values
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor, any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _as_dataarrays(*values: Any) -> list[xr.DataArray]:
    """All inputs as DataArrays; a plain array takes the trailing dim names of the
    first DataArray among them."""
    template = next(v for v in values if isinstance(v, xr.DataArray))
    out = []
    for v in values:
        if not isinstance(v, xr.DataArray):
            arr = _as_array(v)
            v = xr.DataArray(arr, dims=template.dims[template.ndim - arr.ndim:]
                             if arr.ndim <= template.ndim else None)
        out.append(v)
    return out


#: how each kind of input is read: saliency maps and densities as float64, fixations
#: as "fixated" (> 0), masks as booleans (0/1 values only, else a clear error)
def _convert(value: Any, kind: str, name: str) -> np.ndarray:
    arr = _as_array(value)
    if kind == "fixations":
        return arr > 0
    if kind == "mask":
        if arr.dtype != bool:
            if not np.isin(arr, (0, 1)).all():
                raise ValueError(
                    f"{name} must be a boolean mask (True inside the target); got values "
                    f"other than 0/1 (dtype {arr.dtype}): pass e.g. mask > 0.5"
                )
            arr = arr.astype(bool)
        return arr
    return np.asarray(arr, dtype=np.float64)  # no copy if float64


def _stacked(inputs: Sequence[Any], kinds: Sequence[str], names: Sequence[str],
             core: Callable, kwargs: dict) -> Any:
    """Run ``core`` on (B, H, W) stacks (float64 maps, boolean fixations/masks) and give
    back the leading shape. ``None`` inputs (optional ones) are passed as ``None``."""
    arrays = [None if v is None else _convert(v, k, n)
              for v, k, n in zip(inputs, kinds, names, strict=True)]
    given = [a for a in arrays if a is not None]
    if any(a.ndim < 2 for a in given):
        raise ValueError(f"metrics compare 2-D maps (..., y, x); got shapes "
                         f"{[a.shape for a in given]}")
    try:
        given = np.broadcast_arrays(*given)
    except ValueError:
        shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays, strict=True)
                           if a is not None)
        raise ValueError(
            f"shapes do not match ({shapes}); every input needs the same (y, x) size "
            "(resize the saliency map to the reference first)"
        ) from None
    lead, hw = given[0].shape[:-2], given[0].shape[-2:]
    flat = iter([g.reshape(-1, *hw) for g in given])
    arrays = [None if a is None else next(flat) for a in arrays]
    out = _in_chunks(core, arrays, kwargs).reshape(lead)
    return float(out) if not lead else out


def _in_chunks(core: Callable, arrays: list, kwargs: dict) -> np.ndarray:
    """``core`` on (B, H, W) stacks, :data:`CHUNK_PIXELS` pixels a call, on up to
    :data:`THREADS` threads (every metric scores each map on its own, so chunks are
    independent; NumPy and SciPy release the GIL in the work that matters).

    Chunks keep a metric's temporaries small enough to stay in the CPU caches.
    """
    s = arrays[0]
    step = max(1, CHUNK_PIXELS // (s.shape[1] * s.shape[2]))

    def one(i: int) -> np.ndarray:
        part = [None if a is None else a[i:i + step] for a in arrays]
        return np.asarray(core(*part, **kwargs), dtype=np.float64).reshape(-1)

    if len(s) <= step:
        return one(0)
    starts = range(0, len(s), step)
    workers = min(THREADS, len(starts))
    if workers <= 1:
        return np.concatenate([one(i) for i in starts])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="xaiwidgets-metrics") as pool:
        return np.concatenate(list(pool.map(one, starts)))


#: the kind of each reference input, by what a metric needs
_KINDS = {"map": ("map",), "fixations": ("fixations",), "mask": ("mask",), "none": (),
          "shuffled": ("fixations", "fixations")}


def _metric(higher_is_better: bool, needs: str = "map",
            optional: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register a core ``f(saliency (B,H,W), *references (B,H,W), **kw) -> (B,)`` as a
    metric; ``optional`` lists extra (B, H, W) float inputs that may be ``None``.

    The registered function accepts numpy/torch/xarray inputs of any leading shape.
    """
    kinds = ("map", *_KINDS[needs], *("map" for _ in optional))

    def decorate(core: Callable) -> Callable:
        import inspect

        names = list(inspect.signature(core).parameters)[:len(kinds)]

        @functools.wraps(core)
        def metric(saliency: Any, *references: Any, **kwargs: Any) -> Any:
            references = list(references)
            for extra in optional[len(references) - len(_KINDS[needs]):]:
                references.append(kwargs.pop(extra, None))
            if len(references) != len(kinds) - 1:
                raise TypeError(f"{core.__name__} takes the map and {names[1:]}; got "
                                f"{1 + len(references)} inputs")
            inputs = [saliency, *references]
            present = [i for i, v in enumerate(inputs) if v is not None]
            if any(isinstance(inputs[i], xr.DataArray) for i in present):
                arrays = _as_dataarrays(*[inputs[i] for i in present])
                core_dims = [list(a.dims[-2:]) for a in arrays]
                # the (y, x) coordinates are not compared: only the shapes must agree
                arrays = [a.drop_vars([d for d in dims if d in a.indexes])
                          for a, dims in zip(arrays, core_dims, strict=True)]

                def run(*values: Any) -> Any:
                    full: list[Any] = [None] * len(inputs)
                    for i, v in zip(present, values, strict=True):
                        full[i] = v
                    return _stacked(full, kinds, names, core, kwargs)

                out = xr.apply_ufunc(run, *arrays, input_core_dims=core_dims,
                                     dask="parallelized", output_dtypes=[np.float64])
                if "t" in out.dims:  # a clip volume: per frame, then the mean over frames
                    out = _frame_mean(out)
                return out.rename(core.__name__)
            return _stacked(inputs, kinds, names, core, kwargs)

        register(core.__name__, metric, higher_is_better, needs, core.__doc__ or "")
        return metric

    return decorate


def _frame_mean(scores: xr.DataArray) -> xr.DataArray:
    """Mean of per-frame scores over ``t``, NaN frames left out (NaN if all are)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN: NaN
        return scores.mean("t", skipna=True)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


def _minmax(a: np.ndarray) -> np.ndarray:
    """Per-row min-max to [0, 1]; a constant row becomes zeros (docs/methods.md, "normalise")."""
    low, high = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
    span = high - low
    varies = span > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = a - low
        out /= np.where(varies, span, 1.0)
    out[~varies[:, 0]] = 0.0
    return out


def _distribution(a: np.ndarray) -> np.ndarray:
    """Per-row division by the sum; a row without mass becomes the uniform density."""
    total = a.sum(axis=1, keepdims=True)
    mass = total > 0
    out = a / np.where(mass, total, 1.0)
    out[~mass[:, 0]] = 1.0 / a.shape[1]
    return out


def _correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation; 0 where either row is constant (max == min: the
    mean of a constant row may round, leaving tiny residuals that must not count)."""
    varies = _varies(x) & _varies(y)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    # row-wise dot products without the (B, P) temporaries of x * y (a throughput hot spot)
    den = np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
    num = np.einsum("ij,ij->i", x, y)
    ok = varies & (den > 0)
    return np.clip(np.where(ok, num / np.where(ok, den, 1.0), 0.0), -1.0, 1.0)


def _varies(a: np.ndarray) -> np.ndarray:
    """Per row: not constant (max > min; NaN rows count as varying).

    >>> _varies(np.array([[0.4, 0.4, 0.4], [0.0, 1.0, 0.0]]))
    array([False,  True])
    """
    return ~(a.max(axis=1) == a.min(axis=1))


def _sorted_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks 1..P of row-wise sorted values, in that sorted order.

    Each run of equal values gets the mean of its first and last position.

    >>> _sorted_ranks(np.array([[0.1, 0.5, 0.5, 0.9]]))
    array([[1. , 2.5, 2.5, 4. ]])
    """
    n, p = values.shape
    starts = np.ones((n, p), dtype=bool)
    np.not_equal(values[:, 1:], values[:, :-1], out=starts[:, 1:])
    first = np.flatnonzero(starts)  # runs of the rows concatenated (each row starts one)
    length = np.diff(np.append(first, n * p))
    return np.repeat(first % p + (length + 1) / 2, length).reshape(n, p)


def _ranks_in_order(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise sort of a (B, P) array: ``(index, ranks)``, where ``index`` (B·P,) holds
    the flat positions of the sorted values and ``ranks`` (B, P) their average ranks.

    NumPy sorts plain numbers about twice as fast as it argsorts, so each value becomes
    an order-preserving 64-bit integer whose low bits are replaced by its column: one
    ``sort`` gives the order. A row whose sorted keys all differ in their high bits has
    neither ties nor a doubtful order: its ranks are 1..P. Other rows (ties, values
    closer than about 2**-36 relative at 224², NaN) are ranked from their values,
    argsorted again where the key order does not sort them.

    >>> index, ranks = _ranks_in_order(np.array([[0.5, -2.0, 0.5, 0.1]]))
    >>> index[:2], ranks
    (array([1, 3]), array([[1. , 2. , 3.5, 3.5]]))
    """
    n, p = a.shape
    bits = max(1, (p - 1).bit_length())
    if bits > 24:  # too few value bits left for the keys: argsort
        order = np.argsort(a, axis=1)
        ranks = _sorted_ranks(np.take_along_axis(a, order, axis=1))
        return (order + np.arange(0, n * p, p)[:, None]).ravel(), ranks
    a = np.ascontiguousarray(a, dtype=np.float64)
    low = np.uint64(2**bits - 1)
    # IEEE order as unsigned order: flip every bit of negatives, only the sign of the rest
    if a.min(initial=0.0) >= 0:  # (NaN: not >=) the common case, in one pass; -0.0 becomes +0.0
        key = a.view(np.uint64) | np.uint64(2**63)
    else:
        key = a.view(np.uint64) >> np.uint64(63)
        key *= np.uint64(2**63 - 1)
        key |= np.uint64(2**63)
        key ^= a.view(np.uint64)
    key &= ~low
    key |= np.arange(p, dtype=np.uint64)
    key.sort(axis=1)
    high = key >> np.uint64(bits)
    doubtful = np.flatnonzero((high[:, 1:] == high[:, :-1]).any(axis=1))
    key &= low
    index = key.view(np.int64)
    index += np.arange(0, n * p, p, dtype=np.int64)[:, None]  # flat positions
    ranks = np.broadcast_to(np.arange(1, p + 1, dtype=np.float64), (n, p))
    if doubtful.size:
        ranks = ranks.copy()
        values = a.ravel().take(index[doubtful])
        bad = doubtful[~(values[:, 1:] >= values[:, :-1]).all(axis=1)]  # NaN: not >=
        if bad.size:
            index[bad] = np.argsort(a[bad], axis=1) + np.arange(0, n * p, p)[bad, None]
            values = a.ravel().take(index[doubtful])
        ranks[doubtful] = _sorted_ranks(values)
    return index.ravel(), ranks


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Row-wise ranks 1..P with ties given their average rank (``rankdata(a, axis=1)``).

    >>> _average_ranks(np.array([[0.5, 0.1, 0.5, 0.9]]))
    array([[2.5, 1. , 2.5, 4. ]])
    """
    index, ranks = _ranks_in_order(a)
    out = np.empty(a.shape)
    out.ravel()[index] = ranks.ravel()
    return out


# ------------------------------------------------------------------ map metrics
@_metric(higher_is_better=True)
def pcc(saliency: Any, reference: Any) -> Any:
    """Pearson correlation (CC) of the two maps over pixels; 0 when either is constant.

    >>> pcc(np.eye(3), np.eye(3))
    1.0
    """
    return _correlation(_flat(saliency), _flat(reference))


@_metric(higher_is_better=True)
def sim(saliency: Any, reference: Any) -> Any:
    """Similarity (histogram intersection): Σ min(s, g) of the min-max-then-sum normalised maps.

    A constant (or all-zero) map counts as the uniform density. In [0, 1].

    >>> sim(np.eye(3), np.eye(3))
    1.0
    """
    p = _distribution(_minmax(_flat(saliency)))
    q = _distribution(_minmax(_flat(reference)))
    return np.minimum(p, q, out=p).sum(axis=1)


@_metric(higher_is_better=False)
def kld(saliency: Any, reference: Any) -> Any:
    """Kullback-Leibler divergence KL(reference ‖ saliency) of the sum-normalised maps.

    Σ g·log(ε + g/(s + ε)) with ε the float64 machine epsilon (MIT code). Negative
    values (signed methods) are clipped to 0 first, as the MIT code assumes
    non-negative maps; a map without mass counts as the uniform density. Lower is better.

    >>> kld(np.eye(3), np.eye(3)) < 1e-12
    True
    """
    p = _distribution(np.clip(_flat(saliency), 0, None))
    q = _distribution(np.clip(_flat(reference), 0, None))
    p += EPS  # in place, the MIT formula's order of operations: q·log(ε + q/(p + ε))
    np.divide(q, p, out=p)
    p += EPS
    np.log(p, out=p)
    p *= q
    return p.sum(axis=1)


#: SSIM's Gaussian window: scikit-image's ``gaussian_weights=True`` (σ = 1.5, truncated
#: at 3.5 σ: radius 5, an 11×11 window), constants K1 = 0.01, K2 = 0.03, data_range 1
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)


def _gaussian_window() -> np.ndarray:
    """The 1-D weights ``scipy.ndimage.gaussian_filter`` uses for SSIM's σ and radius."""
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
    w = np.exp(-0.5 / SSIM_SIGMA**2 * x**2)
    return w / w.sum()


def _valid_blur(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Gaussian blur of (B, H, W) maps at the pixels SSIM averages: those at least the
    window's radius from every edge, which the border mode never reaches.

    Rows first, then columns, as ``gaussian_filter``; the rows outside are dropped
    before the second pass.
    """
    from scipy.ndimage import correlate1d

    r = SSIM_RADIUS
    rows = correlate1d(x, window, axis=1, mode="reflect")[:, r:-r]
    return correlate1d(rows, window, axis=2, mode="reflect")[:, :, r:-r]


def _ssim_rows(a: np.ndarray, b: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mean SSIM of (B, H, W) maps in [0, 1] (scikit-image's formula, population
    covariances); four blurs: a, b, a·b and a² + b² (only vx + vy is needed)."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ux, uy = _valid_blur(a, window), _valid_blur(b, window)
    uxy = _valid_blur(a * b, window)
    squares = a * a
    squares += b * b
    uss = _valid_blur(squares, window)
    cross = ux * uy  # the products below are in place: five (B, h, w) temporaries at most
    ux *= ux
    uy *= uy
    ux += uy  # ux² + uy²
    uss -= ux  # vx + vy
    uss += c2
    ux += c1  # B1
    uxy -= cross  # vxy
    uxy *= 2
    uxy += c2  # A2
    cross *= 2
    cross += c1  # A1
    cross *= uxy
    ux *= uss
    cross /= ux
    return cross.mean(axis=(1, 2))


@_metric(higher_is_better=True)
def ssim(saliency: Any, reference: Any) -> Any:
    """Structural similarity (scikit-image) of the two min-max normalised maps.

    Gaussian window σ = 1.5 (11×11, as scikit-image with ``gaussian_weights=True``),
    population covariances and ``data_range=1`` (Wang et al.'s settings): scikit-image's
    ``structural_similarity`` with these settings, computed for a whole stack at once.
    Maps must be at least 11×11.

    >>> ssim(np.eye(16), np.eye(16))
    1.0
    """
    h, w = saliency.shape[-2:]
    if min(h, w) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs maps of at least 11x11 pixels (its window); got {h}x{w}")
    return _ssim_rows(_minmax(_flat(saliency)).reshape(saliency.shape),
                      _minmax(_flat(reference)).reshape(reference.shape), _gaussian_window())


@_metric(higher_is_better=True)
def spearman(saliency: Any, reference: Any, abs: bool = False) -> Any:  # noqa: A002
    """Spearman rank correlation over pixels (ties get average ranks); of |s| and |g|
    with ``abs=True`` (Adebayo et al.'s sanity checks use both). 0 for a constant map.

    >>> spearman(np.array([[0.9, 0.1], [0.4, 0.0]]), np.array([[0.8, 0.2], [0.6, 0.4]]))
    0.8
    """
    s, g = _flat(saliency), _flat(reference)
    if abs:
        s, g = np.abs(s), np.abs(g)
    # Pearson on ranks, taken in s's sorted order (no scatter needed for s); the sums
    # of products of centred half-integer ranks are exact, so the order does not matter
    index, ranks = _ranks_in_order(s)
    return _correlation(ranks, _average_ranks(g).ravel().take(index).reshape(ranks.shape))


@_metric(higher_is_better=False)
def l1(saliency: Any, reference: Any, normalize: str = "minmax") -> Any:
    """L1 distance: mean |s − g| of the min-max normalised maps (``normalize="minmax"``).

    ``normalize="distribution"`` gives instead Σ |p − q| of SIM's normalised maps,
    which equals 2 − 2·SIM. Lower is better.

    >>> l1(np.eye(3), 2 * np.eye(3) + 1)
    0.0
    """
    if normalize == "minmax":
        return np.abs(_minmax(_flat(saliency)) - _minmax(_flat(reference))).mean(axis=1)
    if normalize == "distribution":
        p = _distribution(_minmax(_flat(saliency)))
        q = _distribution(_minmax(_flat(reference)))
        return np.abs(p - q).sum(axis=1)
    raise ValueError(f"normalize={normalize!r}: use 'minmax' or 'distribution'")


# ------------------------------------------------------------ fixation metrics
@_metric(higher_is_better=True, needs="fixations")
def nss(saliency: Any, fixations: Any) -> Any:
    """Normalised scanpath saliency: mean of the standardised map at fixated pixels.

    Standardised with the sample std (ddof = 1, as the MIT code). A constant map
    gives 0; a map without fixations gives NaN.

    >>> round(nss(np.array([[0.9, 0.1], [0.4, 0.0]]), np.array([[1, 0], [1, 0]])), 6)
    0.742307
    """
    s, f = _flat(saliency), _flat(fixations)
    std = s.std(axis=1, ddof=1, keepdims=True) if s.shape[1] > 1 else np.zeros((len(s), 1))
    std[~_varies(s)] = 0.0  # constant (max == min): its mean may round, its std is not 0
    z = np.where(std > 0, (s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1), 0)
    n = f.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (z * f).sum(axis=1) / n, np.nan)


@_metric(higher_is_better=True, needs="fixations")
def auc_judd(saliency: Any, fixations: Any) -> Any:
    """AUC-Judd: ROC area with the saliency values at fixated pixels as thresholds.

    At threshold t, TPR = fraction of fixated pixels with s ≥ t and FPR = fraction
    of the other pixels with s ≥ t (ties count as above, no jitter); the curve runs
    from (0, 0) to (1, 1), trapezoidal area. A constant map gives 0.5.

    >>> auc_judd(np.array([[1.0, 0.0], [0.5, 0.2]]), np.array([[1, 0], [0, 0]]))
    1.0
    """
    s, f = _flat(saliency), _flat(fixations)
    n, p = s.shape
    ordered = np.sort(s, axis=1)  # the one O(P log P) step, for the whole stack at once
    fixated_at = np.flatnonzero(f)  # all rows' fixated pixels, row by row
    bounds = np.searchsorted(fixated_at, np.arange(0, n * p + 1, p))
    values = s.ravel()[fixated_at]
    out = np.full(n, np.nan)
    # per map only O(K log P) work on its K fixations (NumPy has no batched searchsorted)
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        fixated = np.sort(values[start:stop])
        n_fix, n_other = fixated.size, p - fixated.size
        if n_fix == 0 or n_other == 0:
            continue
        thresholds = fixated[::-1]
        above = p - np.searchsorted(ordered[i], thresholds, side="left")  # s >= t
        tp = n_fix - np.searchsorted(fixated, thresholds, side="left")
        tpr = np.concatenate([[0.0], tp / n_fix, [1.0]])
        fpr = np.concatenate([[0.0], (above - tp) / n_other, [1.0]])
        out[i] = np.trapezoid(tpr, fpr)
    return out


@_metric(higher_is_better=True, needs="fixations")
def auc_borji(saliency: Any, fixations: Any, seed: int = 0, n_splits: int = 100) -> Any:
    """AUC-Borji: ROC area against uniformly random pixels, averaged over ``n_splits``.

    Each split draws as many random pixels (with replacement, anywhere) as there are
    fixations; thresholds 0, 0.1, …, 1 on the min-max normalised map (MIT code).
    Every map uses its own generator seeded with ``seed``, so a stack gives the same
    numbers as one map at a time.

    >>> 0.9 < auc_borji(np.eye(32), np.eye(32)) <= 1
    True
    """
    s, f = _minmax(_flat(saliency)), _flat(fixations)
    t = BORJI_THRESHOLDS
    nt = len(t)
    out = np.full(len(s), np.nan)
    for i, (row, mask) in enumerate(zip(s, f, strict=True)):
        fixated = row[mask]
        if fixated.size == 0:
            continue
        rng = np.random.default_rng(seed)
        random = row[rng.integers(0, row.size, size=(n_splits, fixated.size))]
        # number of thresholds each value reaches; then counts above each threshold
        level_fix = np.searchsorted(t, fixated, side="right")
        level_rand = np.searchsorted(t, random, side="right")
        hist_fix = np.bincount(level_fix, minlength=nt + 1)
        hist_rand = np.bincount(
            (level_rand + (nt + 1) * np.arange(n_splits)[:, None]).ravel(),
            minlength=(nt + 1) * n_splits,
        ).reshape(n_splits, nt + 1)
        # above[j] = #values >= t[j] = #levels > j; listed from the highest threshold down
        tp = np.cumsum(hist_fix[::-1])[:-1] / fixated.size
        fp = np.cumsum(hist_rand[:, ::-1], axis=1)[:, :-1] / fixated.size
        tp = np.broadcast_to(np.concatenate([[0.0], tp, [1.0]]), (n_splits, nt + 2))
        fp = np.hstack([np.zeros((n_splits, 1)), fp, np.ones((n_splits, 1))])
        out[i] = np.trapezoid(tp, fp, axis=1).mean()
    return out


# the other map metrics live in one module per family (they import this module's
# registry, so it cannot import them: they register when ``xaiwidgets.evaluation`` is
# imported, and are looked up here on first use so that ``xw.metrics.pointing_game`` and
# ``from xaiwidgets.metrics import emd`` work, as docs/guide/metrics.md shows)
_FAMILIES = {"pointing_game": "localisation", "relevance_mass": "localisation",
             "relevance_rank": "localisation", "sparseness": "complexity",
             "complexity": "complexity", "shuffled_auc": "benchmark", "info_gain": "benchmark",
             "emd": "benchmark"}


def __getattr__(name: str) -> Any:
    if name in _FAMILIES:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_FAMILIES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FAMILIES])
