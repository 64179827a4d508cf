"""NMF concepts of a layer (Collins et al. 2018, Deep Feature Factorization).

The non-negative activations A (N, C, h, w) of the Explainer's images, as rows
(N·h·w, C), are factorised as W·H with ``n`` concepts by scikit-learn's NMF (seeded).
The basis H (n, C) is fitted on a seeded sample of at most ``sample`` rows (all rows
when there are fewer) and every row is then transformed with H fixed, so a large
batch costs one fit on the sample plus one non-negative least-squares pass.

>>> import xaiwidgets as xw
>>> model, preprocess, classes = xw.models.load("shapes-vgg")
>>> ex = xw.Explainer(model, xw.datasets.shapes(n=2, seed=0).image.values, preprocess=preprocess)
>>> fac = xw.concepts.factorize(ex, n=3)
>>> fac.maps.dims, fac.basis.dims
(('image', 'concept', 'y', 'x'), ('concept', 'channel'))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr

from ..core.channels import channel_count
from ..core.layers import ends_with_activation
from ..core.ops import upsample
from ..families.fem import negative_share


def factorize(ex: Any, layer: str | None = None, n: int = 8, seed: int = 0,
              sample: int = 20000) -> xr.Dataset:
    """``n`` NMF concepts of ``layer``'s activations (default: the last feature map).

    Returns an ``xr.Dataset``: ``maps`` ("image", "concept", "y", "x") W upsampled to
    the input size (bilinear; not normalised, so concepts compare), ``maps_layer``
    (W at the layer's resolution, dims "image", "concept", "v", "u") and ``basis``
    ("concept", "channel") H; all non-negative. A layer with negative activations (a
    convolution before its ReLU) is refused: pick the activation after it. An activation
    that dips below zero (GELU, SiLU) is factorised on its positive part; ``attrs``
    ``clamped_share`` is the share of its absolute mass that was negative.
    """
    from sklearn.decomposition import NMF

    layer = layer if layer is not None else ex.default_layer()
    channels = channel_count(ex.context, layer)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= channels:
        raise ValueError(f"n={n!r} concepts: pass a whole number from 1 to the layer's "
                         f"{channels} channels")
    activation = ex.activations([layer])[layer].detach().float().cpu()
    if activation.ndim != 4:
        raise ValueError(f"factorize needs a feature map (N, C, h, w); layer {layer!r} gives "
                         f"{tuple(activation.shape)}")
    clamped = 0.0
    if float(activation.min()) < 0:
        if not ends_with_activation(ex.model, list(ex.context.shapes()), layer):
            raise ValueError(f"layer {layer!r} has negative activations (min "
                             f"{float(activation.min()):.3g}); NMF needs non-negative ones: "
                             "pick the ReLU (or other activation, or the block output) "
                             "after it from Explainer.layers()")
        # GELU, SiLU, ELU dip below zero: NMF factorises their positive part
        clamped = negative_share(activation)
        activation = activation.clamp(min=0)
    images, _, h, w = activation.shape
    rows = activation.permute(0, 2, 3, 1).reshape(-1, channels).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    fit_rows = rows if len(rows) <= sample else rows[np.sort(rng.choice(len(rows), sample,
                                                                         replace=False))]
    nmf = NMF(n_components=int(n), init="nndsvda", random_state=seed, max_iter=400)
    nmf.fit(fit_rows)
    weights = nmf.transform(rows).reshape(images, h, w, int(n)).transpose(0, 3, 1, 2)
    small = torch.as_tensor(weights, dtype=torch.float32)
    maps = upsample(small, ex.size)
    return xr.Dataset(
        {"maps": (("image", "concept", "y", "x"), maps.numpy()),
         "maps_layer": (("image", "concept", "v", "u"), small.numpy()),
         "basis": (("concept", "channel"), nmf.components_.astype(np.float32))},
        coords={"image": np.arange(images), "concept": np.arange(int(n)),
                "channel": np.arange(channels)},
        attrs={"layer": layer, "n": int(n), "seed": int(seed), "fit_rows": len(fit_rows),
               "reconstruction_err": float(nmf.reconstruction_err_),
               "clamped_share": clamped})
