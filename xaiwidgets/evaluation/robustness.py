"""Robustness and randomisation metrics of a *method* (Quantus 0.6 definitions): they
explain again, on perturbed inputs or for another class.

* :func:`max_sensitivity` / :func:`avg_sensitivity` (Yeh et al. 2019): the largest /
  mean relative change ‖a(x̃) − a(x)‖ / ‖a(x)‖ (Frobenius) over ``n_samples`` inputs
  x̃ = x + U(−r, r) noise (r = 0.2, on the model inputs); ≥ 0, lower is better. The two
  draw the same perturbations for a seed, so max ≥ avg.
* :func:`random_logit` (Sixt et al. 2020): similarity (SSIM) of the map for the target
  with the map for a random other class; lower is better (a map that does not depend on
  the class explains nothing about it).

Each image draws from its own ``np.random.RandomState(seed)`` in Quantus' order, so
``np.random.seed(seed)`` before a Quantus call on that image gives the same
perturbations, and a stack gives the numbers of one image at a time. Each
returns an ``xr.Dataset`` with a per-image variable named after the metric.

>>> max_sensitivity(ex, "gradient", n_samples=8).max_sensitivity      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..explainer import Explainer
from . import metrics as _metrics
from .perturbation import _explainer
from .results import metric_dataset

#: Quantus' default number of perturbed inputs is 200: an explanation each; 20 here
#: (pass ``n_samples=200`` for Quantus' setting)
SENSITIVITY_SAMPLES = 20


def _explain(ex: Explainer, inputs: torch.Tensor | None, method: str, target: torch.Tensor,
             params: Mapping[str, Any]) -> np.ndarray:
    """Maps (N, H, W) of ``method`` on ``inputs`` (model inputs; None: the explainer's own)."""
    if inputs is not None:
        ex = Explainer(ex.model, inputs, preprocess=None, progress=False,
                       output=ex.output, grid=ex.grid)
    maps = ex.explain(method, target=target.tolist(), **dict(params))
    if maps.dims != ("image", "y", "x"):
        raise ValueError(f"{method} gave maps of dims {maps.dims}; robustness metrics need one "
                         "map per image (do not pass reduce=None)")
    return maps.values.astype(np.float64)


def sensitivity(
    explainer: Explainer | nn.Module, method: str, target: Any = None, seed: int = 0, *,
    n_samples: int = SENSITIVITY_SAMPLES, radius: float = 0.2, params: Mapping | None = None,
    nan_when_prediction_changes: bool = False, images: Any = None,
    preprocess: Callable | None = None,
) -> np.ndarray:
    """Relative changes (N, n_samples) of ``method``'s maps under uniform input noise.

    Sample s adds ``uniform(-radius, radius)`` noise to every model input feature (each
    image from its own ``RandomState(seed)``, one draw per sample: Quantus' order for one
    image) and explains the same target again. With ``nan_when_prediction_changes``
    a sample whose predicted class changed gives NaN (Quantus' option, off by default).

    >>> sensitivity(ex, "gradient", n_samples=4).shape                 # doctest: +SKIP
    (2, 4)
    """
    ex = _explainer(explainer, images, preprocess)
    params = dict(params or {})
    target_t = ex.resolve_target(target)
    original = _explain(ex, None, method, target_t, params)
    norms = np.linalg.norm(original.reshape(len(original), -1), axis=1)
    predicted = ex.logits().argmax(dim=1)
    x = ex.inputs
    rngs = [np.random.RandomState(seed) for _ in range(len(x))]  # per image
    out = np.empty((len(original), n_samples))
    for s in range(n_samples):
        noise = np.concatenate([rng.uniform(-radius, radius, size=(1, x[0].numel()))
                                for rng in rngs]).reshape(x.shape)
        noisy = x + torch.as_tensor(noise, dtype=x.dtype, device=x.device)
        maps = _explain(ex, noisy, method, target_t, params)
        diff = np.linalg.norm((original - maps).reshape(len(maps), -1), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, s] = diff / norms
        if nan_when_prediction_changes:
            with torch.no_grad():
                changed = (ex.context.forward(noisy)[0].argmax(dim=1) != predicted).cpu().numpy()
            out[changed, s] = np.nan
    return out


def _sensitivity_result(name: str, reduce: Callable, explainer: Any, method: str,
                        target: Any, seed: int, options: dict[str, Any]) -> Any:
    values = sensitivity(explainer, method, target, seed, **options)
    ex = _explainer(explainer, options.get("images"), options.get("preprocess"))
    attrs = {"method": method, "seed": seed, "n_samples": values.shape[1],
             "radius": options.get("radius", 0.2)}
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
            score = reduce(values, axis=1)
    ds = metric_dataset(name, score, ex.resolve_target(target), None, attrs,
                        higher_is_better=False)
    ds.attrs["method"] = method
    return ds


def max_sensitivity(explainer: Explainer | nn.Module, method: str, target: Any = None,
                    seed: int = 0, **options: Any) -> Any:
    """Max-sensitivity (Yeh et al. 2019; Quantus ``MaxSensitivity``): the largest relative
    change of the map over the perturbations of ``sensitivity`` (``options`` as
    there: ``n_samples``, ``radius``, ``params``, ...); ≥ 0, lower is better.

    Returns an ``xr.Dataset`` with ``max_sensitivity`` (image).

    >>> max_sensitivity(ex, "gradcam", n_samples=8).max_sensitivity   # doctest: +SKIP
    """
    return _sensitivity_result("max_sensitivity", np.nanmax, explainer, method, target, seed,
                               options)


def avg_sensitivity(explainer: Explainer | nn.Module, method: str, target: Any = None,
                    seed: int = 0, **options: Any) -> Any:
    """Avg-sensitivity (Yeh et al. 2019; Quantus ``AvgSensitivity``): the mean relative
    change of the map over the perturbations of ``sensitivity``; ≥ 0, lower is better.

    Returns an ``xr.Dataset`` with ``avg_sensitivity`` (image).

    >>> avg_sensitivity(ex, "gradcam", n_samples=8).avg_sensitivity   # doctest: +SKIP
    """
    return _sensitivity_result("avg_sensitivity", np.nanmean, explainer, method, target, seed,
                               options)


def flat_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Quantus' ``ssim``: scikit-image's SSIM of the two maps *flattened* to 1-D (window
    7), ``data_range`` = the range of both maps together.

    >>> flat_ssim(np.arange(16.0), np.arange(16.0))
    1.0
    """
    from skimage.metrics import structural_similarity

    a, b = np.ravel(a), np.ravel(b)
    both = np.concatenate([a, b])
    return float(structural_similarity(a, b, data_range=float(abs(both.max() - both.min()))))


def _by_max(a: np.ndarray) -> np.ndarray:
    """``a`` / max|a| (Quantus' ``normalise_by_max``; an all-zero map stays zero)."""
    top = float(np.abs(a).max())
    return a / top if top > 0 else a


def random_logit(
    explainer: Explainer | nn.Module, method: str, target: Any = None, seed: int = 0, *,
    params: Mapping | None = None, images: Any = None, preprocess: Callable | None = None,
) -> Any:
    """Random logit test (Sixt et al. 2020; Quantus ``RandomLogit``): ``flat_ssim`` of
    the map for the target and the map for a random other class, each divided by its
    largest absolute value (Quantus' ``normalise=True``, which divides by the largest
    value of the whole batch: here each map is its own), the class drawn as Quantus does
    (``RandomState(seed).randint(0, K − 1)`` per image indexes the classes other than
    the target). Lower is better. Needs at least two classes.

    Returns an ``xr.Dataset``: ``random_logit`` (image) and ``other_class`` (image).

    >>> random_logit(ex, "gradcam").random_logit                       # doctest: +SKIP
    """
    ex = _explainer(explainer, images, preprocess)
    params = dict(params or {})
    target_t = ex.resolve_target(target)
    classes = int(ex.logits().shape[1])
    if classes < 2:
        raise ValueError("random_logit needs a model with at least two classes")
    picks = [int(np.random.RandomState(seed).randint(0, classes - 1, 1)[0])
             for _ in range(len(target_t))]  # per image, as Quantus on one image
    others = [[c for c in range(classes) if c != t][k]
              for t, k in zip(target_t.tolist(), picks, strict=True)]
    original = _explain(ex, None, method, target_t, params)
    other = _explain(ex, None, method, torch.as_tensor(others), params)
    score = np.array([flat_ssim(_by_max(a), _by_max(b))
                      for a, b in zip(original, other, strict=True)])
    ds = metric_dataset("random_logit", score, target_t, None,
                 {"method": method, "seed": seed, "similarity": "ssim (flattened)"},
                 higher_is_better=False)
    ds.attrs["method"] = method
    return ds.assign_coords(other_class=("image", np.asarray(others)))


# in the one registry (xw.evaluate, the widgets' sort): these take the explainer and the method
for _function in (max_sensitivity, avg_sensitivity, random_logit):
    _metrics.register(_function.__name__, _function, False, "method")
