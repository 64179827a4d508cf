"""LIME for images (Ribeiro et al. 2016): a weighted linear surrogate over superpixels.

1. SLIC superpixels of the display image (scikit-image), by default one per
   :data:`SEGMENT_PIXELS` pixels (:func:`default_segments`);
2. ``n_samples`` random on/off masks over the superpixels (the first one all on),
   drawn per image from a generator seeded by ``seed`` and the image's content (an
   image gets the same masks alone or in any batch);
   "off" superpixels take the image's mean colour (in model-input space);
3. the target logit of every masked image (batched model calls);
4. weights exp(−d²/kernel_width²), d = cosine distance of a mask to the all-on mask;
5. weighted ridge regression (closed form, λ = 1 as LIME's default, with intercept);
6. the map paints each superpixel with its coefficient (signed: + supports the class).

>>> import torch, xaiwidgets as xw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
...                             torch.nn.Linear(4, 2))
>>> xw.explain(model, torch.rand(1, 3, 32, 32), "lime", n_samples=20).dims
('image', 'y', 'x')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from skimage.segmentation import slic

from ..core.ops import image_seeds
from ..core.registry import Method, Param, register

#: ridge penalty (LIME's default Ridge(alpha=1))
RIDGE = 1.0
#: SLIC compactness tried in turn (scikit-image's default 10 first, for [0, 1] images):
#: on textured images SLIC's colour term fragments the superpixels and the connectivity
#: step then merges them into a handful, so a squarer, more compact setting is retried
COMPACTNESS = (10.0, 100.0, 1000.0)
#: default superpixel area (px): 50 superpixels on a 224² image
SEGMENT_PIXELS = 1000
#: bounds of the default superpixel count (small images still get a usable map; large
#: ones do not need many more samples than ``n_samples``)
SEGMENTS_RANGE = (16, 200)


def default_segments(size: tuple[int, ...]) -> int:
    """The default ``n_segments`` for an (H, W) image: one superpixel per
    :data:`SEGMENT_PIXELS` pixels, rounded, kept within :data:`SEGMENTS_RANGE`.

    >>> default_segments((224, 224)), default_segments((32, 32)), default_segments((512, 512))
    (50, 16, 200)
    """
    low, high = SEGMENTS_RANGE
    return min(high, max(low, round(size[-2] * size[-1] / SEGMENT_PIXELS)))


def superpixels(image: torch.Tensor, n_segments: int) -> np.ndarray:
    """SLIC labels 0..S-1 of one (3, H, W) image; any value range (scaled to [0, 1]).

    When SLIC returns fewer than a quarter of the superpixels asked for, it is run
    again with a higher compactness (see :data:`COMPACTNESS`).

    >>> superpixels(torch.rand(3, 16, 16), 4).shape
    (16, 16)
    """
    pixels = image.detach().float().cpu().permute(1, 2, 0).numpy()
    low, high = pixels.min(), pixels.max()
    pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    for compactness in COMPACTNESS:
        labels = slic(pixels, n_segments=n_segments, compactness=compactness, start_label=0,
                      channel_axis=-1)
        # relabel to consecutive integers (SLIC may skip labels)
        labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
        if labels.max() + 1 >= n_segments / 4:
            break
    return labels


def kernel_weights(masks: np.ndarray, kernel_width: float) -> np.ndarray:
    """exp(−d²/width²) with d the cosine distance of each mask row to the all-on mask.

    >>> kernel_weights(np.array([[1, 1], [1, 0], [0, 0]]), 0.25).round(3)
    array([1.   , 0.253, 0.   ])
    """
    on = masks.sum(axis=1)
    # cos(mask, ones) = on / (sqrt(on) sqrt(S)); the all-off mask is at distance 1
    cosine = np.sqrt(on / masks.shape[1])
    distance = 1.0 - cosine
    return np.exp(-(distance**2) / kernel_width**2)


def weighted_ridge(x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                   penalty: float = RIDGE) -> np.ndarray:
    """Coefficients of min Σ w (y − b − x·β)² + penalty·|β|² (intercept b not penalised).

    >>> x = np.array([[0.0], [1.0], [2.0]]); weighted_ridge(x, 3 * x[:, 0] + 1, np.ones(3), 0.0)
    array([3.])
    """
    w = weights / weights.sum()
    xc = x - w @ x
    yc = y - w @ y
    gram = xc.T @ (weights[:, None] * xc) + penalty * np.eye(x.shape[1])
    return np.linalg.solve(gram, xc.T @ (weights * yc))


@register
class Lime(Method):
    """LIME: ridge coefficients of superpixels switched on and off (docs/methods.md)."""

    name = "lime"
    clip_refusal = (
        "its SLIC superpixels segment 2-D images; "
        "there is no supervoxel segmentation of clips"
    )
    family = "perturbation"
    targets = "resolved"  # the score drop of the given or predicted class
    progress_unit = "samples"
    default_reduce = "map"
    signed = True
    quick_params = {"n_samples": 16, "n_segments": 8}
    params = (
        Param("n_samples", 500, kind="int", low=2, high=100_000, doc="random masks"),
        Param("n_segments", None, kind="int", low=2, high=10_000,
              doc="SLIC superpixels asked for (SLIC may return a few more or less); "
                  "default: one per 1000 px of the image, within [16, 200] (50 at 224², "
                  "16 at 32² and 28²)"),
        Param("kernel_width", 0.25, low=0.01, high=10.0, step=0.01,
              doc="width of the exp(-d²/width²) proximity kernel"),
        Param("seed", 0, kind="int", low=0,
              doc="random seed of the masks (combined with each image's content)"),
        Param("batch_size", 64, kind="int", low=1, doc="masked images per model call"),
    )

    def bind(self, ctx, params: dict[str, Any]) -> dict[str, Any]:
        # SLIC cuts the display image: its size sets the default (recorded in attrs)
        size = (ctx.images if ctx.preprocess is not None else ctx.inputs).shape[-2:]
        return {**params, "n_segments": params["n_segments"] or default_segments(size)}

    def attribute(self, ctx, target, layer, n_samples, n_segments, kernel_width, seed,
                  batch_size) -> torch.Tensor:
        x = ctx.inputs
        display = ctx.images if ctx.preprocess is not None else ctx.inputs
        seeds = image_seeds(x, seed)
        segments, masks = [], []
        for i in range(ctx.n_images):
            rng = np.random.default_rng(seeds[i])
            labels = superpixels(display[i], n_segments)
            labels = torch.as_tensor(labels, device=x.device)[None, None].float()
            # preprocessing may resize: carry the superpixels to the model's input size
            labels = torch.nn.functional.interpolate(labels, size=ctx.size, mode="nearest")
            segments.append(labels[0, 0].long())
            count = int(segments[-1].max()) + 1
            z = rng.integers(0, 2, size=(n_samples, count))
            z[0] = 1  # the image itself
            masks.append(z)
        jobs = [(i, start) for i in range(ctx.n_images)
                for start in range(0, n_samples, batch_size)]
        scores = [np.empty(n_samples) for _ in range(ctx.n_images)]

        def fit(m: int) -> torch.Tensor:
            """The maps of a ridge fit on the first ``m`` samples of every image."""
            maps = []
            for i in range(ctx.n_images):
                z = masks[i][:m].astype(np.float64)
                coef = weighted_ridge(z, scores[i][:m], kernel_weights(z, kernel_width))
                coef = torch.as_tensor(coef, device=x.device, dtype=x.dtype)
                maps.append(coef[segments[i]])
            return torch.stack(maps)

        for i, start in ctx.progress_bar(jobs, len(jobs), "lime"):
            z = torch.as_tensor(masks[i][start:start + batch_size], device=x.device,
                                dtype=x.dtype)
            keep = z[:, segments[i]][:, None]  # (batch, 1, H, W)
            fill = x[i].mean(dim=(1, 2), keepdim=True)
            batch = x[i] * keep + fill * (1 - keep)
            scores[i][start:start + len(z)] = ctx.scores(batch, target[i], batch_size=len(z)) \
                .double().cpu().numpy()
            done = start + len(z)
            if ctx.n_images == 1 and done < n_samples:  # a fit of the samples so far
                ctx.report_partial(done, n_samples, lambda m=done: fit(m))
        return fit(n_samples)
