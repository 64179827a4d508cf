"""MLFEM (multi-layer FEM): the registered ``mlfem`` method and its fusion operators,
which combine a stack of per-layer maps into one map.

Recursive fusion (shallowest → deepest): S ← S_1, then S ← op(S, S_l) for
l = 2..L, min-max normalised at the end (``"end"``) or after every step
(``"interleaved"``). Elementwise operators, ``a`` being the map fused so far:

* ``max``: max(a, b)
* ``add``: α·a + (1 − α)·b — unrolled, layer l gets weight α^(L−l)(1 − α)
  (l > 1) and the first layer α^(L−1) (see :func:`add_weights`)
* ``top``: add(a, b′) with b′ = b where b > mean(b) (per image), else 0
* ``fem``: b, i.e. the deepest layer's map
* ``net``: a small trained CNN taking all L maps at once
  (:class:`xaiwidgets.net.FusionNet`); ``normalize`` does not apply, its
  output is the sigmoid's, in [0, 1], trained to match gaze density maps.

The DataArray form, :func:`xaiwidgets.fuse`, labels the fused maps
(:mod:`xaiwidgets.fusion`).

>>> import torch
>>> a = torch.tensor([[0., 1.], [0.5, 0.2]]); b = torch.tensor([[1., 0.], [0.2, 0.6]])
>>> top(a, b, alpha=0.5)
tensor([[0.5000, 0.5000],
        [0.2500, 0.4000]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.ops import minmax
from ..core.registry import Method, Param, register
from ..net import apply_net, identify_model, resolve_net
from .fem import K_PARAM, fem_maps, resolve_layers

Operator = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def maximum(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """max(a, b) elementwise (``alpha`` unused: every operator takes the same arguments)."""
    return torch.maximum(a, b)


def add(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """α·a + (1 − α)·b: ``alpha`` weighs the map fused so far against the new one."""
    return alpha * a + (1 - alpha) * b


def top(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """add(a, b′) with b′ = b above its per-image mean, 0 elsewhere (the top of b)."""
    b_top = torch.where(b > b.mean(dim=(-2, -1), keepdim=True), b, torch.zeros_like(b))
    return add(a, b_top, alpha)


def fem(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """b: the recursion ends with the deepest layer's map (= add with α = 0)."""
    return b


OPERATORS: dict[str, Operator] = {"max": maximum, "add": add, "top": top, "fem": fem}
OPERATOR_NAMES = (*OPERATORS, "net")
NORMALIZATIONS = ("end", "interleaved")


def add_weights(n_layers: int, alpha: float) -> np.ndarray:
    """Closed-form weight of each layer (shallowest first) in the recursive ``add``.

    w_L = 1 − α, w_l = α^(L−l)(1 − α) for 1 < l < L, w_1 = α^(L−1); they sum to 1.

    >>> add_weights(3, 0.5)
    array([0.25, 0.25, 0.5 ])
    """
    exponents = np.arange(n_layers - 1, -1, -1, dtype=float)
    weights = alpha**exponents * (1 - alpha)
    weights[0] = alpha ** (n_layers - 1)
    return weights


def fold(maps: torch.Tensor, operator: str = "max", alpha: float = 0.5,
         interleaved: bool = False) -> torch.Tensor:
    """Recursive fusion of (..., L, H, W) maps along L, before the final normalisation.

    With ``interleaved`` the running map is min-max normalised after every step.
    """
    op = _operator(operator)
    fused = maps[..., 0, :, :]
    for index in range(1, maps.shape[-3]):
        fused = op(fused, maps[..., index, :, :], alpha)
        if interleaved:
            fused = minmax(fused)
    return fused


def fuse_maps(maps: torch.Tensor, operator: str = "max", alpha: float = 0.5,
              normalize: str = "end", net: nn.Module | None = None) -> torch.Tensor:
    """Fuse a (N, L, H, W) stack into (N, H, W) maps in [0, 1]; the tensor form of :func:`fuse`.

    ``net`` is required for ``operator="net"`` (a FusionNet taking L channels). A clip
    stack (N, L, T, H, W) fuses into (N, T, H, W): every operator is elementwise, and
    ``top``'s mean and the normalisations run over the whole (t, y, x) volume.

    >>> fuse_maps(torch.rand(1, 3, 4, 8, 8), "top").shape
    torch.Size([1, 4, 8, 8])
    """
    if maps.ndim == 5:
        if operator == "net":
            raise ValueError(
                "operator='net' does not support video clips: the fusion network is "
                "trained on 2-D image stacks and no video gaze data exists to train one; "
                "use max, add, top or fem"
            )
        # (T, H, W) seen as one (T·H, W) map: per-volume mean and min-max for free
        n, n_layers, *volume = maps.shape
        flat = maps.reshape(n, n_layers, volume[0] * volume[1], volume[2])
        return fuse_maps(flat, operator, alpha, normalize).reshape(n, *volume)
    if maps.ndim != 4:
        raise ValueError(
            f"maps must have shape (N, L, H, W) or (N, L, T, H, W); got {tuple(maps.shape)}"
        )
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not valid; choose one of {NORMALIZATIONS}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if operator == "net":
        if net is None:
            raise ValueError("operator='net' needs a trained fusion network: pass net=...")
        return apply_net(net, maps)
    return minmax(fold(maps, operator, float(alpha), interleaved=normalize == "interleaved"))


def _operator(name: str) -> Operator:
    if name not in OPERATORS:
        hint = " ('net' needs fuse_maps(..., net=...))" if name == "net" else ""
        raise ValueError(f"unknown operator {name!r}{hint}; choose one of {list(OPERATORS)}")
    return OPERATORS[name]


@register
class MLFEM(Method):
    """Multi-layer FEM: the FEM stack of ``layers`` (default: every block output)
    fused recursively, shallowest to deepest, by ``operator`` (see :func:`xw.fuse`)."""

    name = "mlfem"
    family = "fem"
    default_reduce = "map"
    targets = "ignored"
    forward_only = True
    params = (
        Param("layers", None, kind="any", optional=True,
              doc="layer names, shallowest first (default: every block output)"),
        K_PARAM,
        Param("operator", "max", kind="choice", choices=OPERATOR_NAMES,
              doc="fusion operator: max, add(α), top(α), fem (deepest map), net (trained CNN)"),
        Param("alpha", 0.5, low=0.0, high=1.0, step=0.05,
              doc="add/top: weight of the fused map so far (1 − α for the new layer)"),
        Param("normalize", "end", kind="choice", choices=NORMALIZATIONS,
              doc="min-max normalise once at the end, or after every fusion step"),
        Param("net", None, kind="any", optional=True,
              doc="trained FusionNet for operator='net' (default: the shipped one, if any)"),
    )

    def bind(self, ctx, params: dict[str, Any]) -> dict[str, Any]:
        # record the actual layer names (comma-joined in attrs), not "none"
        return {**params, "layers": resolve_layers(ctx, params["layers"])}

    def attribute(self, ctx, target, layer, layers, K, operator, alpha, normalize,
                  net) -> torch.Tensor:
        maps = fem_maps(ctx, layers, K)
        if operator == "net" and not ctx.is_clip:
            shipped_for = identify_model(ctx.model) if net is None else ""
            net = resolve_net(net, shipped_for, layers, ctx.device)
        return fuse_maps(maps, operator, alpha, normalize, net)
