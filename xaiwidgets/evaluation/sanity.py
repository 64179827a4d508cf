"""Sanity checks for saliency maps (Adebayo et al., 2018; Hedström et al., 2023).

An explanation that explains the *model* must change when the model's weights are
randomised. :func:`model_randomization` re-initialises layers of a **copy** of
the model (the user's model is never touched), from the top layer down:

* ``"cascading"``: cumulatively (the logits layer, then also the one below, ...);
* ``"independent"``: one layer at a time, the others keeping their trained weights;

and compares every explanation with the original one by Spearman rank correlation
(with and without absolute values), SSIM and the correlation of HOG features.
A method that passes shows low similarity. ``variant="smooth"`` (sMPRT:
:func:`smooth_model_randomization`, denoised maps, bottom-up) and ``variant="efficient"``
(eMPRT: :func:`efficient_model_randomization`, the change of the map's entropy once every
layer is random) are Hedström et al.'s (2023) revisions, as Quantus 0.6 computes them.
:func:`data_randomization` compares the explanations of two models, e.g. one trained on
shuffled labels.

>>> ds = model_randomization(model, images, "gradient")            # doctest: +SKIP
>>> ds.spearman.sel(mode="cascading").mean("image")                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..core.layers import resolve_layer
from ..core.ops import attr_value
from ..core.scoped import model_guard
from ..explainer import Explainer
from . import metrics

MODES = ("cascading", "independent")
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")


# --------------------------------------------------------------- similarity
def hog_correlation(a: Any, b: Any) -> np.ndarray:
    """Pearson correlation of the HOG features of two stacks of maps (N, H, W).

    Maps are min-max normalised first; skimage's default HOG (9 orientations,
    8×8-pixel cells, 3×3-cell blocks), with smaller cells for maps under 24 pixels.
    """
    from skimage.feature import hog

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n, h, w = a.shape
    cell = max(1, min(8, min(h, w) // 3))
    kwargs = {"orientations": 9, "pixels_per_cell": (cell, cell), "cells_per_block": (3, 3)}
    features = [
        np.stack([hog(m, **kwargs) for m in metrics._minmax(x.reshape(n, -1)).reshape(x.shape)])
        for x in (a, b)
    ]
    return metrics._correlation(*features)


def similarity(original: Any, other: Any) -> xr.Dataset:
    """Spearman (plain and of |·|), SSIM and HOG correlation of two stacks of maps.

    Both are (image, y, x) arrays, tensors or DataArrays; returns an ``xr.Dataset``
    with one variable per measure over ``image`` (1 = identical maps).

    >>> similarity(ex.explain("gradient"), other.explain("gradient")).spearman  # doctest: +SKIP
    """
    a, b = metrics._as_array(original), metrics._as_array(other)
    if a.ndim == 2:
        a, b = a[None], b[None]
    values = {
        "spearman": metrics.spearman(a, b),
        "spearman_abs": metrics.spearman(a, b, abs=True),
        "ssim": metrics.ssim(a, b),
        "hog": hog_correlation(a, b),
    }
    return xr.Dataset({k: ("image", np.asarray(v)) for k, v in values.items()},
                      coords={"image": np.arange(len(a))})


# -------------------------------------------------------------- the checks
def weight_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the convolution and linear layers in the order the forward pass runs them."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    names = {m: n for n, m in model.named_modules() if isinstance(m, kinds)}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
               for m in names]
    try:
        with model_guard(model), torch.no_grad():  # eval: BatchNorm statistics untouched
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))  # a module called twice counts once


def randomize_(module: nn.Module, generator_seed: int) -> None:
    """Re-initialise ``module``'s parameters in place (their own ``reset_parameters``).

    Submodules without ``reset_parameters`` get normal noise with the std of the
    trained weights; a BatchNorm's reset also forgets its running statistics.
    Seeded without disturbing the global random state.
    """
    devices = [p.device for p in module.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=list(dict.fromkeys(devices))), torch.no_grad():
        torch.manual_seed(generator_seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            else:
                for p in sub.parameters(recurse=False):
                    p.normal_(0.0, float(p.std()) if p.numel() > 1 else 1.0)


def model_randomization(
    model: nn.Module,
    images: Any,
    method: str = "gradient",
    *,
    preprocess: Callable | None = None,
    target: Any = None,
    layers: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    keep_maps: bool = False,
    progress: bool = True,
    variant: str | None = None,
    **options: Any,
) -> xr.Dataset:
    """Model-parameter randomisation test (Adebayo et al.) on a copy of ``model``.

    ``variant="cascading"`` or ``"independent"`` runs that one mode;
    ``variant="smooth"`` is :func:`smooth_model_randomization` (sMPRT) and
    ``variant="efficient"`` :func:`efficient_model_randomization` (eMPRT), Hedström et al.
    2023, with ``options`` passed on (``n_samples``, ``noise``, ``n_bins``).

    Parameters
    ----------
    model, images, preprocess
        As for :class:`~xaiwidgets.Explainer`.
    method, params
        The registered method and its parameters (``layer`` may be among them).
    target
        Class(es) explained; default the *original* model's predicted class, kept
        fixed while the weights change.
    layers
        Modules to randomise (any names, blocks included), default every convolution
        and linear layer; processed from the top (last in the forward pass) down.
    modes
        ``"cascading"`` and/or ``"independent"``.
    seed
        Seeds the re-initialisation (layer ``i`` uses ``seed + i``).
    keep_maps
        Also return the maps: ``original`` (image, y, x) and ``saliency``
        (mode, layer, image, y, x).

    Returns
    -------
    xr.Dataset
        Variables ``spearman``, ``spearman_abs``, ``ssim``, ``hog`` with dims
        ("mode", "layer", "image"); ``layer`` lists the randomised layer top-down
        (cascading: it and every layer above it are random).

    >>> ds = model_randomization(model, images, "gradcam", modes=["cascading"])  # doctest: +SKIP
    """
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: choose among {list(VARIANTS)}")
        common = {"preprocess": preprocess, "target": target, "layers": layers,
                  "params": params, "seed": seed, **options}
        if variant == "smooth":
            return smooth_model_randomization(model, images, method, progress=progress,
                                              **common)
        if variant == "efficient":
            return efficient_model_randomization(model, images, method, **common)
        modes = (variant,)
    if options:
        raise TypeError(f"unexpected options {sorted(options)} (only for variant='smooth' "
                        "or 'efficient')")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes={list(modes)!r}: choose among {list(MODES)}")
    params = dict(params or {})
    work = copy.deepcopy(model)  # the user's model is never modified
    ex = Explainer(work, images, preprocess=preprocess, progress=False)
    if layers is None:
        layers = weight_layers(work, ex.inputs[:1])
    modules = {name: resolve_layer(work, name) for name in layers}
    top_down = list(modules)[::-1]
    target_t = ex.resolve_target(target)
    original = ex.explain(method, target=target_t.tolist(), **params)
    trained = {k: v.detach().clone() for k, v in work.state_dict().items()}

    steps = [(mode, i, name) for mode in modes for i, name in enumerate(top_down)]
    results: dict[str, np.ndarray] = {
        k: np.full((len(modes), len(top_down), ex.n_images), np.nan) for k in SIMILARITIES
    }
    maps = np.zeros((len(modes), len(top_down), *original.shape), np.float32) if keep_maps else None
    for mode, i, name in _progress(steps, progress, f"randomising ({method})"):
        if mode == "independent" or i == 0:
            work.load_state_dict(trained)  # back to the trained weights
        randomize_(modules[name], seed + i)
        result = ex.explain(method, target=target_t.tolist(), **params)
        sims = similarity(original, result)
        m = list(modes).index(mode)
        for k in SIMILARITIES:
            results[k][m, i] = sims[k].values
        if maps is not None:
            maps[m, i] = result.values
    work.load_state_dict(trained)

    data = {k: (("mode", "layer", "image"), v) for k, v in results.items()}
    if maps is not None:
        data["saliency"] = (("mode", "layer", "image", "y", "x"), maps)
        data["original"] = (("image", "y", "x"), original.values)
    attrs = _attrs(model, method, params, seed)
    attrs["order"] = "top-down"
    return xr.Dataset(
        data,
        coords={"mode": list(modes), "layer": top_down, "image": np.arange(ex.n_images),
                "target": ("image", target_t.cpu().numpy())},
        attrs=attrs,
    )


VARIANTS = (*MODES, "smooth", "efficient")


def _smooth_maps(model: nn.Module, inputs: torch.Tensor, method: str, target: torch.Tensor,
                 params: dict[str, Any], n_samples: int, noise: float,
                 rngs: list[np.random.RandomState]) -> np.ndarray:
    """sMPRT's denoised maps (N, H, W): the mean of ``method``'s maps over ``n_samples``
    inputs x + ε, ε ~ N(0, (noise · (max x − min x))²) per image (the last sample without
    noise, as Quantus), each image drawing from its own generator; then |a| / max|a|."""
    x = inputs.detach().cpu().numpy().astype(np.float64)
    span = x.reshape(len(x), -1).max(1) - x.reshape(len(x), -1).min(1)
    total = None
    for k in range(n_samples):
        if k == n_samples - 1:
            eps = np.zeros_like(x)
        else:
            eps = np.stack([rng.randn(*x.shape[1:]) for rng in rngs])
            eps *= noise * span.reshape(-1, *[1] * (x.ndim - 1))
        noisy = torch.as_tensor(x + eps, dtype=inputs.dtype, device=inputs.device)
        ex = Explainer(model, noisy, preprocess=None, progress=False)
        maps = ex.explain(method, target=target.tolist(), **params).values.astype(np.float64)
        total = maps / n_samples if total is None else total + maps / n_samples
    top = np.abs(total).reshape(len(total), -1).max(1).reshape(-1, 1, 1)
    return np.abs(np.divide(total, top, out=total.copy(), where=top > 0))


def smooth_model_randomization(
    model: nn.Module, images: Any, method: str = "gradient", *,
    preprocess: Callable | None = None, target: Any = None,
    layers: Sequence[str] | None = None, params: dict[str, Any] | None = None, seed: int = 0,
    n_samples: int = 50, noise: float = 0.1, progress: bool = True,
) -> xr.Dataset:
    """Smooth MPRT, sMPRT (Hedström et al. 2023; Quantus ``SmoothMPRT``).

    The maps are denoised (:func:`_smooth_maps`: ``n_samples`` noisy inputs, noise
    ``noise`` × the image's range) before each comparison, and the layers are randomised
    **bottom-up**, cumulatively (each re-initialised with seed ``seed + 1``, as Quantus).
    ``smprt`` (layer, image) is the Spearman correlation of the original and randomised
    denoised |maps|; layer ``"original"`` compares two denoised maps of the trained model
    (the noise floor). Lower is better after randomisation. Perturbs the model inputs;
    each image draws from its own ``np.random.RandomState(seed)`` in Quantus' order.
    (Quantus 0.6 explains the noisy inputs with ``quantus.explain``, whatever
    ``explain_func`` it was given; here ``method`` explains them all.)

    >>> smooth_model_randomization(model, x, "gradient", n_samples=10).smprt  # doctest: +SKIP
    """
    params = dict(params or {})
    work = copy.deepcopy(model)
    ex = Explainer(work, images, preprocess=preprocess, progress=False)
    inputs = ex.inputs
    names = list(layers) if layers is not None else weight_layers(work, inputs[:1])
    target_t = ex.resolve_target(target)
    rngs = [np.random.RandomState(seed) for _ in range(ex.n_images)]
    original = _smooth_maps(work, inputs, method, target_t, params, n_samples, noise, rngs)
    labels = ["original", *names]
    scores = np.empty((len(labels), ex.n_images))
    for i, name in enumerate(_progress(labels, progress, f"sMPRT ({method})")):
        if name != "original":
            randomize_(resolve_layer(work, name), seed + 1)
        maps = _smooth_maps(work, inputs, method, target_t, params, n_samples, noise, rngs)
        scores[i] = metrics.spearman(original, maps)
    attrs = _attrs(model, method, params, seed)
    attrs.update(order="bottom-up", variant="smooth", n_samples=n_samples, noise=noise)
    return xr.Dataset({"smprt": (("layer", "image"), scores)},
                      coords={"layer": labels, "image": np.arange(ex.n_images),
                              "target": ("image", target_t.cpu().numpy())}, attrs=attrs)


def discrete_entropy(maps: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """Entropy (nats) of the histogram of each map's values (``n_bins`` equal bins over its
    range), Quantus' ``discrete_entropy``.

    >>> round(float(discrete_entropy(np.array([[[0.0, 1.0]]]))[0]), 6)  # two bins, 1/2 each
    0.693147
    """
    from scipy.stats import entropy

    return np.array([entropy(np.histogram(m, bins=n_bins)[0]) for m in np.asarray(maps)])


def efficient_model_randomization(
    model: nn.Module, images: Any, method: str = "gradient", *,
    preprocess: Callable | None = None, target: Any = None,
    layers: Sequence[str] | None = None, params: dict[str, Any] | None = None, seed: int = 0,
    n_bins: int = 100,
) -> xr.Dataset:
    """Efficient MPRT, eMPRT (Hedström et al. 2023; Quantus ``EfficientMPRT``).

    Randomise every layer (bottom-up, cumulatively, each with seed ``seed + 1`` as
    Quantus) and compare the explanation's complexity, the :func:`discrete_entropy` of its
    values (``n_bins`` bins), before and after: ``emprt`` = (H_random − H_original) /
    H_original per image. Higher is better (an explanation of a random model should look
    like noise). Also returns ``complexity_original`` and ``complexity_random``.

    >>> efficient_model_randomization(model, x, "gradient").emprt      # doctest: +SKIP
    """
    params = dict(params or {})
    work = copy.deepcopy(model)
    ex = Explainer(work, images, preprocess=preprocess, progress=False)
    names = list(layers) if layers is not None else weight_layers(work, ex.inputs[:1])
    target_t = ex.resolve_target(target)
    before = discrete_entropy(ex.explain(method, target=target_t.tolist(), **params).values,
                              n_bins)
    for name in names:
        randomize_(resolve_layer(work, name), seed + 1)
    after = discrete_entropy(
        Explainer(work, ex.inputs, preprocess=None, progress=False).explain(
            method, target=target_t.tolist(), **params).values, n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (after - before) / before
    attrs = _attrs(model, method, params, seed)
    attrs.update(order="bottom-up", variant="efficient", n_bins=n_bins)
    return xr.Dataset({"emprt": ("image", score), "complexity_original": ("image", before),
                       "complexity_random": ("image", after)},
                      coords={"image": np.arange(ex.n_images),
                              "target": ("image", target_t.cpu().numpy())}, attrs=attrs)


def randomized_copy(model: nn.Module, example: torch.Tensor, down_to: str, *,
                    layers: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with cascading randomisation from the logits down to ``down_to``.

    The layers (default :func:`weight_layers`, in forward order) are re-initialised
    top-down with the seeds of :func:`model_randomization` (layer ``i`` from the top:
    ``seed + i``), so the copy equals that test's cascading model at ``down_to``.
    ``example`` is one model input (for the forward order). The user's model is untouched.

    >>> random_top = randomized_copy(model, x[:1], down_to="fc")            # doctest: +SKIP
    """
    work = copy.deepcopy(model)
    order = weight_layers(work, example) if layers is None else list(layers)
    top_down = order[::-1]
    if down_to not in top_down:
        raise ValueError(f"down_to={down_to!r} is not a randomisable layer; top-down they "
                         f"are {top_down}")
    for i, name in enumerate(top_down[:top_down.index(down_to) + 1]):
        randomize_(resolve_layer(work, name), seed + i)
    return work


def data_randomization(
    model: nn.Module,
    shuffled_model: nn.Module,
    images: Any,
    method: str = "gradient",
    *,
    preprocess: Callable | None = None,
    target: Any = None,
    params: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Data randomisation test: explanations of ``model`` vs ``shuffled_model``.

    ``shuffled_model`` is the same architecture trained on shuffled labels (any
    second model works). With ``target=None`` each model explains its own predicted
    class; an explicit target is used for both. Returns the :func:`similarity`
    variables over ``image`` (low similarity = the method depends on what was learnt).

    >>> data_randomization(model, shuffled, images, "gradcam").spearman.mean()  # doctest: +SKIP
    """
    params = dict(params or {})
    a = Explainer(model, images, preprocess=preprocess, progress=False)
    b = Explainer(shuffled_model, images, preprocess=preprocess, progress=False)
    maps_a = a.explain(method, target=target, **params)
    maps_b = b.explain(method, target=target, **params)
    ds = similarity(maps_a, maps_b)
    ds = ds.assign_coords(target=("image", maps_a.target.values),
                          target_shuffled=("image", maps_b.target.values))
    ds.attrs = _attrs(model, method, params, 0)
    ds.attrs["shuffled_model"] = type(shuffled_model).__name__
    return ds


def _attrs(model: nn.Module, method: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """netCDF-safe provenance (str/number only)."""
    return {
        "method": method,
        "params": json.dumps({k: attr_value(v) for k, v in params.items()}, default=str),
        "model": type(model).__name__,
        "seed": seed,
        "similarities": ",".join(SIMILARITIES),
    }


def _progress(items: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
