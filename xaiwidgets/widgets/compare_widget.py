"""CompareWidget: several methods side by side, scored against a reference when given."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import numpy as np
import torch
import xarray as xr

from ..core.registry import get_method, methods
from ..evaluation import metrics as _metrics
from .base import VIEW, ExplorerBase
from .controls import LAYOUT, STYLE, set_visible
from .figures import MapGrid

DEFAULT_METHODS = ("gradient", "gradcam", "fem")
DEFAULT_METRICS = ("pcc", "sim")


def reference_maps(reference: Any, n: int, size: tuple[int, int]
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(GFDM, fixation counts), each (N, H, W) or ``None``, from what the user gave.

    ``reference``: an ``xr.Dataset`` with ``gfdm`` and/or ``fixations`` (as made by
    ``xw.datasets.shapes``), or an array-like of density maps (N, H, W) / (H, W).
    """
    if reference is None:
        return None, None
    if isinstance(reference, xr.Dataset):
        gfdm = reference["gfdm"].values if "gfdm" in reference else None
        fixations = reference["fixations"].values if "fixations" in reference else None
    else:
        gfdm = np.asarray(reference.detach().cpu() if hasattr(reference, "detach")
                          else reference, dtype=np.float64)
        fixations = None
    out = []
    for name, maps in (("gfdm", gfdm), ("fixations", fixations)):
        if maps is not None:
            maps = np.asarray(maps, dtype=np.float64)
            maps = np.broadcast_to(maps, (n, *maps.shape[-2:])) if maps.ndim == 2 else maps
            if maps.shape != (n, *size):
                raise ValueError(f"reference {name} has shape {maps.shape}; expected "
                                 f"{(n, *size)} (one map per image, at the input size)")
        out.append(maps)
    return out[0], out[1]


class CompareWidget(ExplorerBase):
    """Explanations of several methods for the same image and class, side by side.

    With a ``reference`` (a GFDM: the ``xw.datasets.shapes`` Dataset, or density
    maps (N,H,W)), the reference is shown too and each map is scored with
    ``metrics`` (from :mod:`xaiwidgets.metrics`; fixation metrics such as NSS need
    the Dataset's ``fixations``). ``w.result``: the maps, dims ("method","image","y","x");
    ``w.results``: one DataArray per method (full attrs); ``w.scores``: dims ("method","metric")::

        ds = xw.datasets.shapes(n=4)
        w = CompareWidget(model, ds.image.values, ["gradcam", "fem"], reference=ds)
        w.scores.sel(metric="pcc")
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 methods: Sequence[str] | None = None, reference: Any = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None,
                 params: dict[str, dict[str, Any]] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS) -> None:
        super().__init__(model, images, preprocess, classes)
        self.methods = list(methods) if methods is not None else _default_methods()
        for name in self.methods:
            get_method(name)  # unknown names fail here, with suggestions
        self.method_params = {k: dict(v) for k, v in (params or {}).items()}
        self.metric_names = [_metrics.get(name).name for name in metrics]
        ex = self.explainer()
        self.gfdm, self.fixations = reference_maps(reference, len(self.images), ex.size)
        self._add_controls({
            "image": self._image_control(),
            "target": self._target_control(),
            "layer": W.Dropdown(options=ex.layers(), value=ex.default_layer(),
                                description="layer", style=STYLE, layout=W.Layout(**LAYOUT)),
            **self._view_controls(),
        })
        set_visible(self.controls["layer"], any(get_method(m).uses_layer for m in self.methods))
        self.results: dict[str, xr.DataArray] = {}
        self.scores: xr.DataArray | None = None
        has_reference = self.gfdm is not None or self.fixations is not None
        titles = self.methods + (["reference"] if has_reference else [])
        self.grid = MapGrid(len(titles), titles=titles, panel_px=260)
        self.figure = self.grid.figure
        self._shown_image: int | None = None
        side = W.VBox([self._box(["image", "target", "layer", *sorted(VIEW)]),
                       self._export_controls(), self.progress])
        self.children = [side, self.figure, self.status]
        self.refresh()

    def _stale(self, changed: set[str]) -> list[str]:
        """Methods whose map depends on what changed (the others keep theirs)."""
        if "image" in changed:
            return list(self.methods)
        stale = []
        for name in self.methods:
            m = get_method(name)
            if (name not in self.results or ("target" in changed and not m.class_agnostic)
                    or ("layer" in changed and m.uses_layer)):
                stale.append(name)
        return stale

    def _update(self, changed: set[str]) -> str | None:
        if "image" in changed:
            self._sync_targets()
            self.results.clear()
        stale = self._stale(changed) if changed - VIEW else []
        for name in stale:
            self._computing(name)
            m = get_method(name)
            result = self.explainer().explain(
                name, target=None if m.class_agnostic else self.controls["target"].value,
                layer=self.controls["layer"].value if m.uses_layer else None,
                **self.method_params.get(name, {}))
            self.results[name] = result.assign_coords(image=[self.index])
        if stale:
            maps = [self.results[name].drop_vars(["target", "class_name"], errors="ignore")
                    .rename("explanation") for name in self.methods]
            self.result = xr.concat(maps, dim="method", combine_attrs="drop",
                                    coords="minimal", compat="override"
                                    ).assign_coords(method=self.methods)
            self.scores = self._score()
        self._draw()
        return ", ".join(stale) or None

    def _score(self) -> xr.DataArray | None:
        """Each metric of each method's map against the reference (NaN when it lacks data)."""
        if self.gfdm is None and self.fixations is None:
            return None
        table = np.full((len(self.methods), len(self.metric_names)), np.nan)
        for j, metric in enumerate(self.metric_names):
            spec = _metrics.get(metric)
            ref = self.gfdm if spec.needs == "map" else self.fixations
            if ref is None:
                continue
            for i, name in enumerate(self.methods):
                table[i, j] = float(spec(self.results[name].xai.map2d(), ref[self.index]))
        return xr.DataArray(table, dims=("method", "metric"),
                            coords={"method": self.methods, "metric": self.metric_names},
                            name="score")

    def _title(self, name: str) -> str:
        if self.scores is None:
            return name
        row = self.scores.sel({"method": name})  # sel(method=) is a keyword of sel
        parts = [f"{metric.upper()} {float(row.sel(metric=metric)):.2f}"
                 for metric in self.metric_names if np.isfinite(row.sel(metric=metric))]
        return f"{name}<br><span style='font-size:11px'>{' · '.join(parts)}</span>"

    def _draw(self) -> None:
        image = None if self._shown_image == self.index else self.images[self.index]
        with self.figure.batch_update():
            self.grid.restyle(self.controls["colormap"].value, self.controls["opacity"].value)
            for i, name in enumerate(self.methods):
                da = self.results[name]
                self.grid.show(i, da.xai.map2d(), image=image, title=self._title(name),
                               signed=da.xai.signed)
            if len(self.methods) < self.grid.n:
                reference = self.gfdm if self.gfdm is not None else self.fixations
                self.grid.show(len(self.methods), reference[self.index], image=image,
                               title="reference (GFDM)" if self.gfdm is not None
                               else "reference (fixations)")
        self._shown_image = self.index

    def _export_panels(self):
        image = self.images[self.index]
        return [(self.results[name], image) for name in self.methods]


def _default_methods() -> list[str]:
    known = methods()
    chosen = [m for m in DEFAULT_METHODS if m in known]
    return chosen or known[:3]
