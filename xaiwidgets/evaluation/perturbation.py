"""Perturbation metrics: does removing what a map calls relevant change the prediction?

* :func:`aopc` (Samek et al.): replace patches most-relevant-first (MoRF) and average
  the drop of the target logit, AOPC = 1/(L+1) Σ_k (f_c(x) − f_c(x⁽ᵏ⁾)); higher is better.
* :func:`deletion` / :func:`insertion` (Petsiuk et al.): softmax probability of the
  target while pixels are removed (set to a baseline) / inserted (into a blurred
  image) in order of relevance; area under the curve; lower deletion, higher
  insertion is better. Both are :func:`petsiuk`, one function with a ``direction``.

All take an :class:`~xaiwidgets.Explainer` (or a model with ``images=``), the
saliency maps ``(image, y, x)`` (a DataArray from ``explain``, a tensor or an
array) and return an ``xr.Dataset`` with the curve and the score per image.
Perturbed images are built in display space ([0, 1], then ``preprocess``) when
the explainer has a ``preprocess``, else in model-input space; model calls are
batched (``batch_size`` images per forward pass, no autograd).

>>> ex = xw.Explainer(model, images, preprocess=preprocess)         # doctest: +SKIP
>>> maps = ex.explain("gradcam")                                     # doctest: +SKIP
>>> deletion(ex, maps).auc.mean().item()                             # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from ..explainer import Explainer

Saliency = Any  # xr.DataArray | torch.Tensor | np.ndarray, (image, y, x) or (y, x)


# ------------------------------------------------------------------ plumbing
def _explainer(model_or_explainer: Explainer | nn.Module, images: Any,
               preprocess: Callable | None) -> Explainer:
    if isinstance(model_or_explainer, Explainer):
        if images is not None:
            raise TypeError("pass images= only with a model; an Explainer has its images")
        return model_or_explainer
    if images is None:
        raise TypeError("with a model, pass images=...; or pass an xw.Explainer")
    return Explainer(model_or_explainer, images, preprocess=preprocess, progress=False)


def _maps(ex: Explainer, saliency: Saliency) -> torch.Tensor:
    """Saliency as a float tensor (N, H, W) on the explainer's device."""
    values = saliency.values if isinstance(saliency, xr.DataArray) else saliency
    maps = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor)
                           else values.detach())
    if maps.ndim == 2:
        maps = maps.unsqueeze(0)
    if maps.ndim != 3 or len(maps) != ex.n_images:
        raise ValueError(
            f"saliency must have shape (image, y, x) with {ex.n_images} images; got "
            f"{tuple(maps.shape)} (reduce pixel-space attributions to one map per image)"
        )
    return maps.to(device=ex.device, dtype=torch.float32)


def _space(ex: Explainer, size: tuple[int, int]) -> tuple[torch.Tensor, Callable]:
    """The images to perturb and the map from them to the model input.

    Display images when a ``preprocess`` exists and keeps the size (so "black",
    "mean" and noise mean what they say), else the model inputs themselves.
    """
    if ex.preprocess is not None and tuple(ex.images.shape[-2:]) == size:
        return ex.images, ex.preprocess
    if tuple(ex.inputs.shape[-2:]) == size:
        return ex.inputs, lambda x: x
    raise ValueError(
        f"saliency maps are {size[0]}x{size[1]} but the images are "
        f"{tuple(ex.images.shape[-2:])} and the model inputs {tuple(ex.inputs.shape[-2:])}"
    )


def _target(ex: Explainer, saliency: Saliency, target: Any) -> torch.Tensor:
    """The given target; else the class the map explains (its ``target`` coord); else
    the predicted class."""
    if target is None and isinstance(saliency, xr.DataArray) and "target" in saliency.coords:
        target = saliency.coords["target"].values
        target = [int(t) for t in np.broadcast_to(target, (ex.n_images,))]
    return ex.resolve_target(target)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Per-image rank of every element, 0 = most relevant (ties: first in raster order)."""
    flat = scores.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return rank.view_as(scores)


def _curve(ex: Explainer, source: torch.Tensor, replacement: torch.Tensor,
           rank: torch.Tensor, counts: np.ndarray, target: torch.Tensor,
           to_model: Callable, batch_size: int, softmax: bool) -> np.ndarray:
    """Scores of every (image, step): pixels with rank < counts[step] come from
    ``replacement``, the others from ``source``. Returns (N, steps)."""
    n, k = len(source), len(counts)
    counts_t = torch.as_tensor(counts, device=source.device)
    out = torch.empty(n * k, device=source.device)
    starts = range(0, n * k, batch_size)
    for start in ex.context.progress_bar(starts, total=len(starts), desc="perturbation"):
        index = torch.arange(start, min(start + batch_size, n * k), device=source.device)
        img, step = index // k, index % k
        mask = (rank[img] < counts_t[step, None, None]).unsqueeze(1)
        x = torch.where(mask, replacement[img], source[img])
        out[index] = ex.scores(to_model(x), target[img], batch_size=len(x), softmax=softmax)
    return out.view(n, k).cpu().numpy().astype(np.float64)


def _replacement(x: torch.Tensor, how: Any, seed: int, blur_kernel: int = 11,
                 blur_sigma: float = 5.0) -> torch.Tensor:
    """What removed pixels become: a number, "mean" (per image and channel), "noise"
    (uniform over each image's value range, seeded) or "blur" (:func:`blur`)."""
    if isinstance(how, (int, float)) and not isinstance(how, bool):
        return torch.full_like(x, float(how))
    if how == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    if how == "noise":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        return low + (high - low) * torch.rand(x.shape, generator=gen, device=x.device)
    if how == "blur":
        return blur(x, blur_kernel, blur_sigma)
    raise ValueError(f"replacement {how!r}: use a number, 'mean', 'noise' or 'blur'")


def blur(x: torch.Tensor, kernel: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) images; defaults as Petsiuk et al.'s insertion (11 px, σ 5)."""
    from torchvision.transforms.functional import gaussian_blur

    kernel = min(kernel, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs room
    return gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _fractions(step: float) -> np.ndarray:
    if not 0 < step <= 1:
        raise ValueError(f"step={step} must be a fraction of the pixels in (0, 1], e.g. 0.02")
    fractions = np.round(np.arange(0, 1 + step / 2, step), 10)
    return fractions if fractions[-1] == 1 else np.append(fractions, 1.0)


def _dataset(metric: str, curve: np.ndarray, score: np.ndarray, score_name: str,
             step_dim: str, steps: np.ndarray, target: torch.Tensor, saliency: Saliency,
             attrs: dict[str, Any]) -> xr.Dataset:
    """The curve and score per image; attrs netCDF-safe (str/number) and as JSON."""
    method = saliency.attrs.get("method", "") if isinstance(saliency, xr.DataArray) else ""
    coords = {"image": np.arange(len(curve)), step_dim: steps,
              "target": ("image", target.cpu().numpy())}
    return xr.Dataset(
        {"curve": (("image", step_dim), curve), score_name: ("image", score)},
        coords=coords,
        attrs={"metric": metric, "method": str(method), **attrs,
               "params": json.dumps(attrs)},
    )


# ------------------------------------------------------------------- metrics
def aopc(
    explainer: Explainer | nn.Module,
    saliency: Saliency,
    target: Any = None,
    *,
    patch: int = 8,
    steps: int | None = 100,
    replace: Any = "mean",
    seed: int = 0,
    softmax: bool = False,
    batch_size: int = 64,
    images: Any = None,
    preprocess: Callable | None = None,
) -> xr.Dataset:
    """Area over the MoRF perturbation curve (Samek et al. 2017).

    Patches of ``patch``×``patch`` pixels are ordered by their total relevance; the
    ``k`` most relevant (k = 0..L, L = ``steps`` or all patches) are replaced by
    ``replace`` ("mean" per channel, "noise" uniform, "blur" or a number) and
    AOPC = 1/(L+1) Σ_k (f_c(x) − f_c(x⁽ᵏ⁾)), f_c the target logit (probability with
    ``softmax=True``). Higher is better.

    Returns an ``xr.Dataset``: ``curve`` (image, step) = f_c(x⁽ᵏ⁾), ``aopc`` (image).

    >>> aopc(ex, ex.explain("gradcam"), patch=8).aopc.values       # doctest: +SKIP
    """
    ex = _explainer(explainer, images, preprocess)
    maps = _maps(ex, saliency)
    x, to_model = _space(ex, tuple(maps.shape[-2:]))
    h, w = maps.shape[-2:]
    padded = F.pad(maps, (0, -w % patch, 0, -h % patch))
    totals = padded.unflatten(1, (-1, patch)).unflatten(3, (-1, patch)).sum(dim=(2, 4))
    patch_rank = _rank(totals)
    rank = patch_rank.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :h, :w]
    n_patches = totals[0].numel()
    last = n_patches if steps is None else min(int(steps), n_patches)
    counts = np.arange(last + 1)
    target_t = _target(ex, saliency, target)
    curve = _curve(ex, x, _replacement(x, replace, seed), rank, counts, target_t, to_model,
                   batch_size, softmax)
    score = (curve[:, :1] - curve).mean(axis=1)
    attrs = {"patch": patch, "steps": int(last), "replace": str(replace), "seed": seed,
             "softmax": int(softmax), "order": "MoRF"}
    return _dataset("aopc", curve, score, "aopc", "step", counts, target_t, saliency, attrs)


#: the directions of :func:`petsiuk` and each one's default baseline
DIRECTIONS = {"deletion": 0.0, "insertion": "blur"}


def petsiuk(
    explainer: Explainer | nn.Module,
    saliency: Saliency,
    target: Any = None,
    *,
    direction: str = "deletion",
    step: float = 0.02,
    baseline: Any = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    seed: int = 0,
    batch_size: int = 64,
    images: Any = None,
    preprocess: Callable | None = None,
) -> xr.Dataset:
    """Deletion or insertion curve (Petsiuk et al. 2018), by ``direction``.

    At each fraction 0, ``step``, …, 1 of the pixels (by saliency, highest first) the
    pixels switch between the image and a ``baseline`` image: ``"deletion"`` goes from
    the image to the baseline (the most relevant pixels removed first), ``"insertion"``
    from the baseline to the image (the most relevant pixels revealed first). The
    baseline is a number (0 is black in display space), ``"mean"``, ``"noise"`` (seeded
    by ``seed``) or ``"blur"`` (Gaussian, ``blur_kernel`` px, σ = ``blur_sigma``); by
    default 0 for deletion and ``"blur"`` for insertion. The curve is the softmax
    probability of the target, ``auc`` its trapezoidal area over the fraction axis:
    lower is better for deletion, higher for insertion.

    Returns an ``xr.Dataset``: ``curve`` (image, fraction), ``auc`` (image).

    >>> petsiuk(ex, maps, direction="insertion", baseline=0.0).auc     # doctest: +SKIP
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use one of {list(DIRECTIONS)}")
    ex = _explainer(explainer, images, preprocess)
    maps = _maps(ex, saliency)
    x, to_model = _space(ex, tuple(maps.shape[-2:]))
    baseline = DIRECTIONS[direction] if baseline is None else baseline
    removed = _replacement(x, baseline, seed, blur_kernel, blur_sigma)
    source, replacement = (x, removed) if direction == "deletion" else (removed, x)
    fractions = _fractions(step)
    counts = np.round(fractions * maps[0].numel()).astype(np.int64)
    target_t = _target(ex, saliency, target)
    curve = _curve(ex, source, replacement, _rank(maps), counts, target_t, to_model,
                   batch_size, softmax=True)
    auc = np.trapezoid(curve, fractions, axis=1)
    attrs = {"step": step, "curve_of": "softmax probability", "baseline": str(baseline)}
    if baseline == "blur":
        attrs.update(blur_kernel=blur_kernel, blur_sigma=blur_sigma)
    return _dataset(direction, curve, auc, "auc", "fraction", fractions, target_t, saliency,
                    attrs)


def deletion(explainer: Explainer | nn.Module, saliency: Saliency, target: Any = None, *,
             baseline: Any = 0.0, **options: Any) -> xr.Dataset:
    """Deletion curve (Petsiuk et al. 2018): remove the most relevant pixels first, setting
    them to ``baseline``; lower ``auc`` is better. :func:`petsiuk` with
    ``direction="deletion"``; ``options`` as there (``step``, ``seed``, ``batch_size``,
    ``images``, ``preprocess``, ...).

    Returns an ``xr.Dataset``: ``curve`` (image, fraction), ``auc`` (image).

    >>> deletion(ex, maps, step=0.02).auc                              # doctest: +SKIP
    """
    return petsiuk(explainer, saliency, target, direction="deletion", baseline=baseline,
                   **options)


def insertion(explainer: Explainer | nn.Module, saliency: Saliency, target: Any = None, *,
              blur_kernel: int = 11, blur_sigma: float = 5.0, **options: Any) -> xr.Dataset:
    """Insertion curve (Petsiuk et al. 2018): from a Gaussian-blurred image (``blur_kernel``
    px, σ = ``blur_sigma``) put back the most relevant pixels first; higher ``auc`` is
    better. :func:`petsiuk` with ``direction="insertion"``; ``options`` as there
    (``step``, ``batch_size``, ``images``, ``preprocess``, or another ``baseline``).

    Returns an ``xr.Dataset``: ``curve`` (image, fraction), ``auc`` (image).

    >>> insertion(ex, maps).auc                                        # doctest: +SKIP
    """
    return petsiuk(explainer, saliency, target, direction="insertion",
                   blur_kernel=blur_kernel, blur_sigma=blur_sigma, **options)
