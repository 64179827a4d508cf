"""MLFEM fusion of a labelled FEM stack: :func:`fuse` (``xw.fuse``).

The operators (``max``, ``add``, ``top``, ``fem``, ``net``) and the registered ``mlfem``
method live with the FEM family, in :mod:`xaiwidgets.families.mlfem`; their names are
re-exported here (``from xaiwidgets.fusion import fuse_maps`` keeps working).

>>> import torch
>>> stack = torch.tensor([[[[0.0, 1.0, 0.5]], [[1.0, 0.0, 0.5]]]])  # (image, layer, y, x)
>>> fused = fuse(stack, "max")                       # max: [1, 1, 0.5], then min-max
>>> fused.dims, fused.values.tolist()
(('image', 'y', 'x'), [[[1.0, 1.0, 0.0]]])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from .families.mlfem import (  # noqa: F401  (re-exported: the operators' old home)
    MLFEM,
    NORMALIZATIONS,
    OPERATOR_NAMES,
    OPERATORS,
    Operator,
    add,
    add_weights,
    fem,
    fold,
    fuse_maps,
    maximum,
    top,
)
from .net import resolve_net


def fuse(stack: Any, operator: str = "max", alpha: float = 0.5, normalize: str = "end",
         net: nn.Module | None = None) -> xr.DataArray:
    """Fuse a FEM stack (``Explainer.fem_stack``) into one map per image.

    ``stack``: DataArray with dims ("image", "layer", "y", "x") (or a tensor/array of
    that shape), layers shallowest first. Returns dims ("image", "y", "x") with the
    stack's attrs plus ``operator``, ``alpha``, ``normalize``. For ``operator="net"``
    without ``net=``, the NET shipped for the stack's model is used (shapes-resnet).

    >>> stack = ex.fem_stack()                      # doctest: +SKIP
    >>> xw.fuse(stack, "top", alpha=0.7).dims       # doctest: +SKIP
    ('image', 'y', 'x')
    """
    if operator not in OPERATOR_NAMES:
        raise ValueError(f"unknown operator {operator!r}; choose one of {list(OPERATOR_NAMES)}")
    attrs = dict(stack.attrs) if isinstance(stack, xr.DataArray) else {}
    volume: tuple[str, ...] = ("y", "x")
    if isinstance(stack, xr.DataArray):
        volume = ("t", "y", "x") if "t" in stack.dims else ("y", "x")
        if set(stack.dims) != {"image", "layer", *volume}:
            raise ValueError(
                f"stack must have dims (image, layer, y, x) or (image, layer, t, y, x); "
                f"got {stack.dims}"
            )
        stack = stack.transpose("image", "layer", *volume)
        maps = torch.as_tensor(np.asarray(stack.values), dtype=torch.float32)
        layers = [str(name) for name in stack["layer"].values] if "layer" in stack.coords \
            else None
    else:
        maps = torch.as_tensor(stack).float()
        layers = None
        volume = ("t", "y", "x") if maps.ndim == 5 else ("y", "x")
    if operator == "net" and net is None and len(volume) == 2:
        net = resolve_net(None, str(attrs.get("model", "")), layers)
    fused = fuse_maps(maps, operator, alpha, normalize, net).detach().cpu().numpy()
    attrs.update(method="mlfem", operator=operator, alpha=float(alpha), normalize=normalize)
    return xr.DataArray(
        fused.astype(np.float32), dims=("image", *volume),
        coords={"image": np.arange(fused.shape[0]),
                **{dim: np.arange(n) for dim, n in zip(volume, fused.shape[1:], strict=True)}},
        attrs=attrs, name="mlfem",
    )
