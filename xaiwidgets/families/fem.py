"""Feature Explanation Method (FEM) and the per-layer FEM stack that MLFEM fuses.

FEM (Ahmed Asif et al.) needs a forward pass only: for a layer's activation F
with channels k, μ_k and σ_k are the spatial mean and population std of F_k,
B_k = [F_k ≥ μ_k + K·σ_k] and the map is R = Σ_k μ_k·B_k. MLFEM (Bourroux et al.)
computes one FEM map per block, normalises each at input size (the *FEM stack*)
and fuses them (MLFEM itself lives in :mod:`xaiwidgets.fusion`).

Which layers the stack uses (``Explainer.block_layers()``): the output of every
residual block when the model has residual blocks (the 16 bottlenecks of a
ResNet50, after their final ReLU), else the activation after every convolution
(VGG-style plain nets).

Everything here works on the Explainer's cached activations, so changing ``K``,
the operator, ``alpha`` or ``normalize`` never runs the model again.

>>> import torch
>>> F = torch.tensor([[[[0., 0.], [0., 4.]], [[2., 2.], [2., 2.]]]])
>>> fem_map(F, K=1.0)
tensor([[[2., 2.],
         [2., 3.]]])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr

from ..core import layers as _layers
from ..core.ops import map_dims, minmax, model_tag, upsample
from ..core.registry import Method, Param, register

if TYPE_CHECKING:  # pragma: no cover
    from ..core.context import Context

K_PARAM = Param("K", 1.0, low=0.0, high=10.0, step=0.1,
                doc="threshold: a feature fires where it exceeds its mean + K·std")


def fem_map(activation: torch.Tensor, K: float = 1.0) -> torch.Tensor:
    """FEM of one activation: (N, D, h, w) → (N, h, w), not upsampled nor normalised.

    R(u,v) = Σ_k μ_k·[F_k(u,v) ≥ μ_k + K·σ_k], σ the population std (ddof = 0). A
    channel with zero variance fires everywhere (F = μ), an all-zero channel adds 0.
    A 3D CNN's activation (N, D, t, h, w) gives (N, t, h, w): μ_k and σ_k are then
    taken over the whole (t, h, w) feature volume.

    >>> fem_map(torch.zeros(1, 3, 4, 4)).abs().sum().item()
    0.0
    """
    if activation.ndim not in (4, 5):
        raise ValueError(
            f"FEM needs a convolutional feature map (N,C,h,w) or (N,C,t,h,w); got shape "
            f"{tuple(activation.shape)}: pick a layer from Explainer.layers()"
        )
    n, volume = activation.shape[0], activation.shape[2:]
    dtype = torch.promote_types(activation.dtype, torch.float32)
    flat = activation.flatten(2).to(dtype)
    mean = flat.mean(dim=-1, keepdim=True)
    # a constant channel gets μ exactly equal to its value (a float sum of equal values
    # may round) and so σ = 0: it fires everywhere, as the definition says. amin/amax
    # are two fast passes; a float64 mean cost 20x a float32 one (ResNet-50's layer1)
    low = flat.amin(dim=-1, keepdim=True)
    mean = torch.where(low == flat.amax(dim=-1, keepdim=True), low, mean)
    deviation = flat - mean
    std = deviation.square_().mean(dim=-1, keepdim=True).sqrt_()
    threshold = mean + K * std
    # F ≥ t  ⇔  F > the float just below t, and for floats a > b ⇔ a − b > 0, so
    # sign(relu(F − below)) is the exact binary mask, built in place (this is the
    # hot loop of a K change; a bool mask plus a float copy is several times slower)
    below = torch.nextafter(threshold, threshold.new_tensor(-float("inf")))
    fired = torch.sub(flat, below, out=deviation).relu_().sign_()  # the buffer re-used
    return torch.bmm(mean.transpose(1, 2), fired).reshape(n, *volume)


def fem_channel_shares(activation: torch.Tensor, K: float = 1.0) -> torch.Tensor:
    """Each channel's share of the FEM map's total, μ_k·Σ B_k / Σ_j μ_j·Σ B_j: (N, C)
    (all 0 for an image whose map is all zero). Each channel is its own one-channel
    :func:`fem_map` (μ_k, σ_k and B_k depend on channel k alone).

    >>> F = torch.tensor([[[[0., 0.], [0., 4.]], [[2., 2.], [2., 2.]]]])
    >>> [round(v, 4) for v in fem_channel_shares(F)[0].tolist()]  # 1·1 and 2·4 of 9
    [0.1111, 0.8889]
    """
    n, channels = activation.shape[:2]
    single = activation.reshape(n * channels, 1, *activation.shape[2:])
    terms = fem_map(single, K).flatten(1).sum(dim=1).reshape(n, channels)
    total = terms.sum(dim=1, keepdim=True)
    return torch.where(total != 0, terms / total.where(total != 0, 1), 0)


def post_activation(ctx: Context, layer: str) -> str | None:
    """The nearest layer after the activation, when ``layer``'s output comes before it
    (the last module to finish inside it is a convolution or a normalisation: signed
    values); ``None`` when ``layer`` is an activation or a block output, or when no
    activation follows it. The nearest is the first activation module (called once)
    after ``layer`` in execution order, or the block it ends.

    FEM is defined on non-negative features: with a signed channel, μ_k < 0 subtracts
    where the channel fires, and on the shipped shapes-video model FEM on convolution
    outputs anti-correlates with the gaze (docs/methods.md, FEM on video).
    """
    order = list(ctx.shapes())
    if layer not in order:
        return None
    at = order.index(layer)
    inside = [name for name in order[:at] if name.startswith(layer + ".")]
    last = _layers.resolve_layer(ctx.model, inside[-1] if inside else layer)
    if not isinstance(last, _layers.AFFINE):
        return None
    blocks = set(ctx.block_layers())
    calls = ctx._calls
    for position in range(at + 1, len(order)):
        name = order[position]
        if name in blocks:
            return name
        module = _layers.resolve_layer(ctx.model, name)
        if isinstance(module, _layers._ACTIVATIONS) and calls.get(name, 1) == 1:
            # the activation that ends a block is named by the block (ex.layers())
            after = order[position + 1] if position + 1 < len(order) else None
            if after in blocks and ctx.shapes()[after] == ctx.shapes()[name]:
                return after
            return name
    return None


class FEMWarning(UserWarning):
    """FEM ran on a layer whose features are signed (not the output of an activation)."""


#: FEM warns when more than this share of a layer's absolute activation is negative
SIGNED_SHARE = 0.25


def negative_share(activation: torch.Tensor) -> float:
    """The share of ``activation``'s absolute mass below zero (0 after a ReLU).

    >>> negative_share(torch.tensor([-1.0, 3.0]))
    0.25
    """
    magnitude = activation.abs().sum(dtype=torch.float64)
    if not magnitude > 0:
        return 0.0
    return float(activation.clamp(max=0).sum(dtype=torch.float64).neg() / magnitude)


def features(ctx: Context, layer: str) -> torch.Tensor:
    """``layer``'s cached activation, with a :class:`FEMWarning` when it is signed.

    :func:`check_post_activation` refuses layers that a known activation module follows;
    this catches what module structure cannot show: a convolution followed by a
    functional ``relu``, a residual stream (ConvNeXt stages, transformer blocks), a
    linear bottleneck. Layers that end with an activation module (GELU and SiLU dip
    below zero) are not checked. The share is computed once per layer and images.
    """
    activation = ctx.activations([layer])[layer]
    share = signed_share(ctx, layer)
    if share > SIGNED_SHARE:
        warnings.warn(
            f"FEM assumes non-negative features (after a ReLU), but {share:.0%} of the "
            f"activation mass of layer {layer!r} is negative (a residual stream, a linear "
            "bottleneck or an activation applied as a function): channels with a negative "
            "mean subtract where they fire, so the map can invert. Prefer a layer after "
            "an activation (Explainer.layers()), or read this map with care.",
            FEMWarning, stacklevel=3)
    return activation


def signed_share(ctx: Context, layer: str) -> float:
    """:func:`negative_share` of ``layer``'s activation, 0 for a layer that ends with an
    activation module; computed once per layer and images (``Context.memo``)."""
    def build() -> float:
        if _layers.ends_with_activation(ctx.model, list(ctx.shapes()), layer):
            return 0.0
        return negative_share(ctx.activations([layer])[layer])

    return ctx.memo(signed_share, layer, build)


def inner_activation(ctx: Context, layer: str) -> str | None:
    """The last activation module that runs inside ``layer`` (once per pass, with a
    feature-map grid of ``layer``'s resolution), when ``layer`` does not end with it;
    else ``None``. FEM's default moves there when ``layer``'s output is signed.
    """
    order = list(ctx.shapes())
    if layer not in order:
        return None
    inside = [name for name in order[:order.index(layer)] if name.startswith(layer + ".")]
    if not inside or _layers.ends_with_activation(ctx.model, order, layer):
        return None
    shapes = ctx.map_shapes()
    grid = shapes.get(layer, ())[-2:]
    candidates = [name for name in inside
                  if isinstance(_layers.resolve_layer(ctx.model, name), _layers._ACTIVATIONS)
                  and ctx._calls.get(name, 1) == 1 and name in shapes
                  and len(shapes[name]) == len(shapes[layer]) and shapes[name][-2:] == grid]
    return candidates[-1] if candidates else None


def check_post_activation(ctx: Context, layer: str) -> None:
    """Refuse a ``layer`` before its activation, naming :func:`post_activation`'s."""
    nearest = post_activation(ctx, layer)
    if nearest is not None:
        raise ValueError(
            f"FEM is defined on activations after the non-linearity; {layer!r} is a "
            "convolution's (or normalisation's) output before its activation, whose "
            "signed values make channels with a negative mean subtract where they fire "
            f"(the map then anti-correlates with the features). Use layer={nearest!r}, "
            "the nearest layer after the activation")


def resolve_layers(ctx: Context, layers: str | Sequence[str] | None) -> list[str]:
    """Layer names for a FEM stack: ``None`` = ``ctx.block_layers()``; a comma-joined
    string or a sequence of names, each checked against the model."""
    if layers is None:
        names = ctx.block_layers()
        if not names:
            raise ValueError("the model has no block outputs (residual blocks or activation "
                             "modules after convolutions); pass layers=[...] explicitly")
        return names
    if isinstance(layers, str):
        names = [name.strip() for name in layers.split(",") if name.strip()]
    else:
        names = list(layers)
    if not names:
        raise ValueError("layers is empty: pass layer names from Explainer.layers()")
    for name in names:
        _layers.resolve_layer(ctx.model, name)  # unknown names fail before any forward pass
    for name in names:
        check_post_activation(ctx, name)
    return names


def fem_maps(ctx: Context, layers: Sequence[str], K: float = 1.0) -> torch.Tensor:
    """Per-layer FEM maps upsampled to the input size and normalised: (N, L, H, W)
    ((N, L, T, H, W) for clips, each map normalised over its whole volume).

    Uses ``ctx.activations`` (cached), so only the first call runs the model, and the
    maps themselves are cached per (layers, K) on the context.
    """
    # an operator/alpha/normalize change then only re-fuses; a few K values are kept
    return ctx.memo(fem_maps, (tuple(layers), float(K)),
                    lambda: stack_maps(ctx.activations(list(layers)), layers, K, ctx.size),
                    limit=4)


def stack_maps(acts: dict[str, torch.Tensor], layers: Sequence[str], K: float,
               size: Sequence[int]) -> torch.Tensor:
    """FEM maps of the activations ``acts[layer]``, upsampled to ``size``, normalised."""
    raw = [fem_map(acts[name], K) for name in layers]
    first = raw[0]
    maps = first.new_empty((first.shape[0], len(raw), *size))
    # layers of one resolution are upsampled in one call (ResNet50: 4 calls, not 16)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, r in enumerate(raw):
        by_size.setdefault(tuple(r.shape[1:]), []).append(index)
    for indices in by_size.values():
        maps[:, indices] = upsample(torch.stack([raw[i] for i in indices], dim=1), size)
    return minmax(maps, dims=map_dims(size))


def fem_stack(ctx: Context, layers: str | Sequence[str] | None = None,
              K: float = 1.0) -> xr.DataArray:
    """Every layer's FEM map at input size, min-max normalised, as a DataArray.

    Dims ``("image", "layer", "y", "x")``, shallowest layer first (clips:
    ``("image", "layer", "t", "y", "x")``); coords ``layer`` (names),
    ``layer_height``/``layer_width`` (each feature map's resolution; clips also
    ``layer_frames``);
    attrs ``method``, ``K``, ``layers`` (comma-joined) and ``model``.

    >>> stack = ex.fem_stack(K=1.5)            # doctest: +SKIP
    >>> xw.fuse(stack, operator="add", alpha=0.7)  # doctest: +SKIP
    """
    K = K_PARAM.validate(K)
    names = resolve_layers(ctx, layers)
    acts = ctx.activations(names)
    for name in names:
        features(ctx, name)  # warns on signed layers
    # the one FEM-stack cache (shared with mlfem): a repeated K costs no recomputation;
    # the DataArray gets its own copy so that editing it cannot corrupt the cache
    maps = fem_maps(ctx, names, K)
    volume = ("t", "y", "x")[-len(ctx.size):]
    coords = {
        "image": np.arange(ctx.n_images),
        "layer": names,
        **{dim: np.arange(n) for dim, n in zip(volume, maps.shape[2:], strict=True)},
        "layer_height": ("layer", [int(acts[n].shape[-2]) for n in names]),
        "layer_width": ("layer", [int(acts[n].shape[-1]) for n in names]),
    }
    if len(volume) == 3:
        coords["layer_frames"] = ("layer", [int(acts[n].shape[-3]) for n in names])
    return xr.DataArray(
        maps.to(torch.float32).cpu().numpy().copy(),
        dims=("image", "layer", *volume),
        coords=coords,
        attrs={"method": "fem_stack", "K": K, "layers": ",".join(names),
               "model": model_tag(ctx.model)},
        name="fem_stack",
    )


@register
class FEM(Method):
    """FEM on one layer (default: the last convolutional block). Class-agnostic,
    forward pass only; a ``K`` change re-uses the cached activation."""

    name = "fem"
    family = "fem"
    default_reduce = "map"
    uses_layer = True
    targets = "ignored"
    forward_only = True
    normalize_output = True
    params = (K_PARAM,)

    def check(self, ctx, layer, params) -> None:
        check_post_activation(ctx, layer)

    def default_layer(self, ctx: Context) -> str | None:
        """The deepest feature map (``ctx.default_layer()``), after its activation; for a
        block whose output is signed (a residual stream: ConvNeXt, Swin; DenseNet's
        concatenated convolutions) its last activation module (:func:`inner_activation`).
        """
        layer = ctx.default_layer()
        after = post_activation(ctx, layer)
        if after is not None:
            return after
        inner = inner_activation(ctx, layer)
        if inner is None:
            return layer
        ctx.activations([layer, inner])  # one pass for both
        return inner if signed_share(ctx, layer) > SIGNED_SHARE else layer

    def attribute(self, ctx, target, layer, K) -> torch.Tensor:
        return fem_map(features(ctx, layer), K)

    def channel_terms(self, ctx, target, layer, K) -> torch.Tensor:
        """Each channel's share of the FEM map (see :func:`fem_channel_shares`)."""
        return fem_channel_shares(features(ctx, layer), K)

    def conditional(self, ctx, target, layer, channels, K) -> torch.Tensor:
        """Σ_{k ∈ channels} μ_k·B_k: the FEM of those channels alone."""
        activation = features(ctx, layer)
        return fem_map(activation[:, channels.to(activation.device)], K)

    def stack(self, ctx: Context, layers: str | Sequence[str] | None = None,
              K: float = 1.0) -> xr.DataArray:
        """The FEM stack of ``layers`` (see :func:`fem_stack`); ``Explainer.fem_stack``."""
        return fem_stack(ctx, layers, K)
