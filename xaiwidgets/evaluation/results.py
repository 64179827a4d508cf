"""The result of an explainer-based metric: an ``xr.Dataset`` over ``image``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import xarray as xr

Saliency = Any  # xr.DataArray | torch.Tensor | np.ndarray, (image, y, x) or (y, x)


def metric_dataset(name: str, score: np.ndarray, target: torch.Tensor, saliency: Saliency,
            attrs: dict[str, Any], curve: np.ndarray | None = None, step_dim: str = "step",
            steps: Any = None, higher_is_better: bool = True) -> xr.Dataset:
    """The per-image score ``name`` (and ``curve`` over ``step_dim``) of an explainer-based
    metric, with the target and netCDF-safe attrs (``params`` as JSON).

    >>> import torch
    >>> metric_dataset("road", np.array([0.5]), torch.tensor([1]), None, {"seed": 0}).road.item()
    0.5
    """
    method = saliency.attrs.get("method", "") if isinstance(saliency, xr.DataArray) else ""
    data: dict[str, Any] = {name: ("image", score)}
    coords: dict[str, Any] = {"image": np.arange(len(score)),
                              "target": ("image", target.cpu().numpy())}
    if curve is not None:
        data["curve"] = (("image", step_dim), curve)
        coords[step_dim] = np.arange(curve.shape[1]) if steps is None else np.asarray(steps)
    return xr.Dataset(data, coords=coords, attrs={
        "metric": name, "method": str(method), "higher_is_better": int(higher_is_better),
        **attrs, "params": json.dumps(attrs)})
