"""Faithfulness metrics as Quantus 0.6 defines them: does the model's output move with
what the map calls relevant?

* :func:`faithfulness_correlation` (Bhatt et al. 2020): Pearson correlation, over random
  subsets of input features set to a baseline, between the map's sum over the subset
  and the drop of the target logit; in [-1, 1], higher is better.
* :func:`road` (Rong et al. 2022): remove the most relevant pixels (MoRF, 1 %, 3 %, …,
  99 %) by *noisy linear imputation* and record whether the target class is still
  predicted; ``road`` = mean of that curve, lower is better.
* :func:`irof` (Rieger & Hansen 2020): remove SLIC superpixels most relevant first (set
  to the image mean), the curve of p_c(x⁽ᵏ⁾)/p_c(x); ``irof`` = the area over it
  (number of segments − trapezoidal area), higher is better.
* :func:`infidelity` (Yeh et al. 2019): mean squared difference between the logit drop
  and Σ a·(x − x̃) over perturbations x̃; Quantus' default perturbation (4×4 patches set to
  the image minimum, cumulatively in raster order) or Gaussian noise; ≥ 0, lower is better.

All perturb the **model inputs** (``explainer.inputs``, what Quantus perturbs) with the
map repeated over the channels, and score the **target logit** (ROAD and IROF: the
prediction / softmax probability, as Quantus). Each image draws its randomness from its
own ``np.random.RandomState(seed)`` in Quantus' order, so ``np.random.seed(seed)`` before
a Quantus call on that one image gives the same perturbations, and a stack gives the
numbers of one image at a time (whatever the batch, the chunk or the scheduler). Each
returns an ``xr.Dataset`` with a per-image variable named after the metric (and ``curve``
where there is one).

Where Quantus 0.6 fails, these do not: its ROAD ranks channel-pixels but counts pixels
(multi-channel inputs raise an IndexError; its issue #333), its IROF asserts on
multi-channel inputs and mixes the images of a batch into one "mean", and its
Infidelity cannot pad images whose side is not a multiple of the patch. Here each image
is perturbed on its own (a stack gives the numbers of one image at a time).

>>> ex = xw.Explainer(model, images, preprocess=preprocess)          # doctest: +SKIP
>>> road(ex, ex.explain("gradcam")).road.values                      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..explainer import Explainer
from . import metrics as _metrics
from .perturbation import Saliency, _explainer, _maps, _target
from .results import metric_dataset

#: ROAD's removal percentages (Quantus' default: 1, 3, ..., 99)
ROAD_PERCENTAGES = tuple(range(1, 100, 2))
#: noisy linear imputation: each removed pixel is the weighted mean of its 8 neighbours
IMPUTATION_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                      ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


# ------------------------------------------------------------------ plumbing
def _setup(explainer: Explainer | nn.Module, saliency: Saliency, target: Any, images: Any,
           preprocess: Callable | None) -> tuple[Explainer, np.ndarray, np.ndarray, torch.Tensor]:
    """The explainer, the maps (N, H, W) and inputs (N, C, H, W) as float64, the target."""
    ex = _explainer(explainer, images, preprocess)
    maps = _maps(ex, saliency)
    if tuple(maps.shape[-2:]) != tuple(ex.inputs.shape[-2:]):
        raise ValueError(f"saliency maps are {tuple(maps.shape[-2:])} but the model inputs are "
                         f"{tuple(ex.inputs.shape[-2:])}; pass maps at the input size")
    x = ex.inputs.detach().cpu().numpy().astype(np.float64)
    return ex, maps.cpu().numpy().astype(np.float64), x, _target(ex, saliency, target)


def _logits(ex: Explainer, x: np.ndarray, batch_size: int) -> np.ndarray:
    """All logits (n, classes) of model inputs ``x`` (numpy), in batches, no autograd."""
    dtype = ex.inputs.dtype
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.as_tensor(x[start:start + batch_size], dtype=dtype, device=ex.device)
            out.append(ex.context.forward(batch)[0].float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def _baseline(x: np.ndarray, how: Any) -> float:
    """A replacement value for one image (C, H, W): Quantus' "black" (its minimum),
    "mean", "white" (its maximum) or a number."""
    if isinstance(how, (int, float)) and not isinstance(how, bool):
        return float(how)
    values = {"black": np.min, "mean": np.mean, "white": np.max}
    if how not in values:
        raise ValueError(f"baseline {how!r}: use 'black', 'mean', 'white' or a number")
    return float(values[how](x))


# ------------------------------------------------------- faithfulness correlation
def faithfulness_correlation(
    explainer: Explainer | nn.Module, saliency: Saliency, target: Any = None, seed: int = 0,
    *, n_runs: int = 100, subset_size: int = 224, baseline: Any = "black",
    batch_size: int = 64, images: Any = None, preprocess: Callable | None = None,
) -> xr.Dataset:
    """Faithfulness correlation (Bhatt et al. 2020; Quantus ``FaithfulnessCorrelation``).

    ``n_runs`` times, ``subset_size`` random input features (channel-pixels, without
    replacement) are set to ``baseline`` ("black": the image's minimum); the score is
    the Pearson correlation, over the runs, of the map's sum over the subset with the
    drop of the target logit. Draws: per image ``RandomState(seed)``, a ``choice`` per run
    (Quantus' order for one image). 0 where either series is constant (Quantus/SciPy: NaN).

    Returns an ``xr.Dataset`` with ``faithfulness_correlation`` (image).

    >>> faithfulness_correlation(ex, maps, n_runs=20).faithfulness_correlation  # doctest: +SKIP
    """
    ex, maps, x, target_t = _setup(explainer, saliency, target, images, preprocess)
    n = len(x)
    flat = x.reshape(n, -1)
    a = np.broadcast_to(maps[:, None], x.shape).reshape(n, -1)
    features = flat.shape[1]
    if not 0 < subset_size <= features:
        raise ValueError(f"subset_size={subset_size} must be in [1, {features}] (the number "
                         "of input features: channels x pixels)")
    subsets = np.empty((n_runs, n, subset_size), dtype=np.int64)
    for i in range(n):  # each image its own generator: a stack = one image at a time
        rng = np.random.RandomState(seed)
        for r in range(n_runs):
            subsets[r, i] = rng.choice(features, subset_size, replace=False)
            rng.uniform(size=1)  # Quantus draws a "uniform" baseline per run, used or not
    base = np.array([_baseline(img, baseline) for img in x])
    target_np = target_t.cpu().numpy()
    original = _logits(ex, x, batch_size)[np.arange(n), target_np]
    drops = np.empty((n_runs, n))
    pairs = [(r, i) for r in range(n_runs) for i in range(n)]
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        batch = np.stack([flat[i] for _, i in part])
        for row, (r, i) in enumerate(part):
            batch[row, subsets[r, i]] = base[i]
        logits = _logits(ex, batch.reshape(len(part), *x.shape[1:]), batch_size)
        for row, (r, i) in enumerate(part):
            drops[r, i] = original[i] - logits[row, target_np[i]]
    sums = np.stack([np.take_along_axis(a, subsets[r], axis=1).sum(axis=1) for r in range(n_runs)])
    score = _metrics._correlation(sums.T, drops.T)
    attrs = {"n_runs": n_runs, "subset_size": subset_size, "baseline": str(baseline),
             "seed": seed, "of": "target logit"}
    return metric_dataset("faithfulness_correlation", score, target_t, saliency, attrs)


# ------------------------------------------------------------------------- ROAD
def noisy_linear_imputation(x: np.ndarray, indices: np.ndarray, noise: float,
                            rng: np.random.RandomState) -> np.ndarray:
    """Replace the pixels ``indices`` (flat, over H·W) of one image (C, H, W) by noisy
    linear imputation (Rong et al. 2022, as Quantus): each removed pixel equals the
    weighted mean of its 8 neighbours (1/6 edge, 1/12 diagonal), solved as one sparse
    system for all of them, plus ``noise`` × N(0, 1) (``rng.randn(C, k)``).

    >>> img = np.arange(9.0).reshape(1, 3, 3)
    >>> float(noisy_linear_imputation(img, np.array([4]), 0.0, np.random.RandomState(0))[0, 1, 1])
    4.0
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = x.shape
    flat = x.reshape(c, h * w)
    out = flat.copy()
    k = len(indices)
    if k == 0:
        return out.reshape(x.shape)
    removed = np.zeros(h * w, bool)
    removed[indices] = True
    variable = np.full(h * w, -1)
    variable[indices] = np.arange(k)
    rows, cols = np.divmod(indices, w)
    b = np.zeros((k, c))
    diagonal = np.ones(k)
    entries: list[tuple[np.ndarray, np.ndarray, float]] = []
    for (dy, dx), weight in IMPUTATION_WEIGHTS:
        r, q = rows + dy, cols + dx
        valid = (r >= 0) & (q >= 0) & (r < h) & (q < w)
        diagonal[~valid] -= weight
        ids = np.flatnonzero(valid)
        neighbour = r[valid] * w + q[valid]
        kept = ~removed[neighbour]
        b[ids[kept]] -= weight * flat[:, neighbour[kept]].T
        entries.append((ids[~kept], variable[neighbour[~kept]], weight))
    i = np.concatenate([e[0] for e in entries] + [np.arange(k)])
    j = np.concatenate([e[1] for e in entries] + [np.arange(k)])
    v = np.concatenate([np.full(len(e[0]), e[2]) for e in entries] + [-diagonal])
    system = coo_matrix((v, (i, j)), shape=(k, k)).tocsc()
    solved = np.transpose(spsolve(system, b))
    out[:, indices] = solved + noise * rng.randn(*solved.shape)
    return out.reshape(x.shape)


def _descending(a: np.ndarray) -> np.ndarray:
    """Indices of a flat map from the highest value down, ties in raster order."""
    return np.argsort(-a, kind="stable")


def road(
    explainer: Explainer | nn.Module, saliency: Saliency, target: Any = None, seed: int = 0,
    *, percentages: Sequence[float] = ROAD_PERCENTAGES, noise: float = 0.01,
    batch_size: int = 64, images: Any = None, preprocess: Callable | None = None,
) -> xr.Dataset:
    """ROAD, RemOve And Debias (Rong et al. 2022; Quantus ``ROAD``), most relevant first.

    For each percentage p, the ⌊H·W·p/100⌋ most relevant pixels (all channels; ties in
    raster order) are replaced by :func:`noisy_linear_imputation` (``noise`` × N(0, 1),
    each image drawing from its own ``RandomState(seed)``, percentage after percentage); the
    curve is 1 while the model still predicts the target, else 0. ``road`` = the mean of
    the curve over the percentages (the area under Quantus' accuracy curve): lower is
    better (removing what the map calls relevant should change the decision soon).

    Returns an ``xr.Dataset``: ``curve`` (image, percentage) and ``road`` (image).

    >>> road(ex, maps).road                                           # doctest: +SKIP
    """
    ex, maps, x, target_t = _setup(explainer, saliency, target, images, preprocess)
    n, (h, w) = len(x), maps.shape[-2:]
    orders = [_descending(m.ravel()) for m in maps]
    rngs = [np.random.RandomState(seed) for _ in range(n)]  # per image: batch-independent
    imputed = np.empty((len(percentages), *x.shape))
    for j, p in enumerate(percentages):
        for i in range(n):
            imputed[j, i] = noisy_linear_imputation(x[i], orders[i][:int(h * w * p / 100)],
                                                    noise, rngs[i])
    logits = _logits(ex, imputed.reshape(-1, *x.shape[1:]), batch_size)
    predicted = logits.argmax(axis=1).reshape(len(percentages), n)
    curve = (predicted == target_t.cpu().numpy()[None]).T.astype(np.float64)
    attrs = {"noise": noise, "seed": seed, "order": "MoRF", "curve_of": "target predicted"}
    return metric_dataset("road", curve.mean(axis=1), target_t, saliency, attrs, curve,
                   "percentage", np.asarray(percentages, dtype=np.float64),
                   higher_is_better=False)


# ------------------------------------------------------------------------- IROF
def superpixels(image: np.ndarray) -> np.ndarray:
    """SLIC segments (H, W), labels from 0, of one image (C, H, W): scikit-image's
    ``slic`` with its defaults on the channels-last image (Quantus' IROF)."""
    from skimage.segmentation import slic

    return slic(np.moveaxis(image, 0, -1).astype(np.float64), start_label=0)


def irof(
    explainer: Explainer | nn.Module, saliency: Saliency, target: Any = None,
    *, baseline: Any = "mean", batch_size: int = 64, images: Any = None,
    preprocess: Callable | None = None,
) -> xr.Dataset:
    """Iterative removal of features (Rieger & Hansen 2020; Quantus ``IROF``).

    The image is cut into SLIC superpixels (:func:`superpixels`), ordered by their mean
    relevance (highest first, ties in label order); one after the other (cumulatively)
    each is set to ``baseline`` ("mean": the mean of the image as perturbed so far, all
    channels, as Quantus for one image). Curve: p_c(x⁽ᵏ⁾) / p_c(x), softmax probabilities
    of the target; ``irof`` = K − its trapezoidal area (unit steps), K segments; higher
    is better. The curve has NaN after an image's last segment.

    Returns an ``xr.Dataset``: ``curve`` (image, segment) and ``irof`` (image).

    >>> irof(ex, maps).irof                                           # doctest: +SKIP
    """
    ex, maps, x, target_t = _setup(explainer, saliency, target, images, preprocess)
    n = len(x)
    target_np = target_t.cpu().numpy()
    probabilities = torch.softmax(torch.as_tensor(_logits(ex, x, batch_size)), 1).numpy()
    original = probabilities[np.arange(n), target_np]
    curves, scores = [], np.empty(n)
    for i in range(n):
        segments = superpixels(x[i])
        count = int(segments.max()) + 1
        relevance = np.bincount(segments.ravel(), maps[i].ravel(), count) / np.maximum(
            np.bincount(segments.ravel(), minlength=count), 1)
        current = x[i].copy()
        steps = np.empty((count, *x.shape[1:]))
        for k, s in enumerate(_descending(relevance)):
            current = np.where(segments == s, _baseline(current, baseline), current)
            steps[k] = current
        logits = torch.as_tensor(_logits(ex, steps, batch_size))
        curve = torch.softmax(logits, 1).numpy()[:, target_np[i]] / original[i]
        scores[i] = count - np.trapezoid(curve, dx=1)
        curves.append(curve)
    width = max(len(c) for c in curves)
    curve = np.full((n, width), np.nan)
    for i, c in enumerate(curves):
        curve[i, :len(c)] = c
    attrs = {"baseline": str(baseline), "segmentation": "slic", "curve_of":
             "softmax probability / original"}
    return metric_dataset("irof", scores, target_t, saliency, attrs, curve, "segment")


# ------------------------------------------------------------------- infidelity
def infidelity(
    explainer: Explainer | nn.Module, saliency: Saliency, target: Any = None, seed: int = 0,
    *, perturbation: str = "patches", patch_size: int = 4, baseline: Any = "black",
    n_samples: int = 10, sigma: float = 0.2, batch_size: int = 64, images: Any = None,
    preprocess: Callable | None = None,
) -> xr.Dataset:
    """Infidelity (Yeh et al. 2019): mean over perturbations x̃ of
    ((f_c(x) − f_c(x̃)) − Σ a·(x − x̃))², the map repeated over the channels; ≥ 0, lower
    is better (0: the map predicts every logit change exactly).

    ``perturbation="patches"`` (Quantus' default ``Infidelity``): ``patch_size``² patches
    set to ``baseline`` ("black": the image minimum) one after the other in raster order,
    cumulatively, one perturbation per patch (deterministic: ``seed`` is not used; Quantus
    repeats the same ones ``n_perturb_samples`` times). ``"noise"`` (Yeh et al.'s
    Gaussian): ``n_samples`` perturbations x̃ = x − I, I ~ N(0, ``sigma``²), drawn from
    ``RandomState(seed)``.

    Returns an ``xr.Dataset`` with ``infidelity`` (image).

    >>> infidelity(ex, maps).infidelity                               # doctest: +SKIP
    """
    ex, maps, x, target_t = _setup(explainer, saliency, target, images, preprocess)
    n, (h, w) = len(x), maps.shape[-2:]
    target_np = target_t.cpu().numpy()
    original = _logits(ex, x, batch_size)[np.arange(n), target_np]
    scores = np.empty(n)
    for i in range(n):
        rng = np.random.RandomState(seed)  # per image: a stack = one image at a time
        if perturbation == "patches":
            value, current = _baseline(x[i], baseline), x[i].copy()
            perturbed = []
            for top in range(0, h, patch_size):
                for left in range(0, w, patch_size):
                    current = current.copy()
                    current[:, top:top + patch_size, left:left + patch_size] = value
                    perturbed.append(current)
            perturbed = np.stack(perturbed)
        elif perturbation == "noise":
            perturbed = x[i] - rng.normal(0.0, sigma, size=(n_samples, *x.shape[1:]))
        else:
            raise ValueError(f"perturbation={perturbation!r}: use 'patches' or 'noise'")
        drops = original[i] - _logits(ex, perturbed, batch_size)[:, target_np[i]]
        explained = np.einsum("hw,kchw->k", maps[i], x[i][None] - perturbed)
        scores[i] = np.mean((drops - explained) ** 2)
    attrs = {"perturbation": perturbation, "of": "target logit", "seed": seed,
             **({"patch_size": patch_size, "baseline": str(baseline)}
                if perturbation == "patches" else {"n_samples": n_samples, "sigma": sigma})}
    return metric_dataset("infidelity", scores, target_t, saliency, attrs, higher_is_better=False)


# in the one registry (xw.evaluate, the widgets' sort): these take the explainer and the maps
for _function, _higher in ((faithfulness_correlation, True), (road, False), (irof, True),
                           (infidelity, False)):
    _metrics.register(_function.__name__, _function, _higher, "explainer")
