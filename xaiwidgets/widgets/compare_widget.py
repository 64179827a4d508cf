"""CompareWidget: several methods side by side, scored against a reference when given."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import numpy as np
import torch
import xarray as xr

from .. import rendering
from ..core.registry import get_method, methods
from ..evaluation import metrics as _metrics
from .base import REDRAW, VIEW, ExplorerBase, Publish, top5_html
from .controls import LAYOUT, STYLE, set_visible
from .figures import FIT_PX, MapGrid
from .live_scores import LiveScores

DEFAULT_METHODS = ("gradient", "gradcam", "fem")
DEFAULT_METRICS = ("pcc", "sim")
#: side of each panel (px); panels go two per row beyond two
MAP_PX = 360


def reference_maps(reference: Any, n: int, size: tuple[int, int]
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(GFDM, fixation counts), each (N, *size) or ``None``, from what the user gave.

    ``reference``: an ``xr.Dataset`` with ``gfdm`` and/or ``fixations`` (as made by
    ``xw.datasets.shapes`` or ``moving_shapes``), or an array-like of density maps
    (N, *size) / size, where ``size`` is (H, W), or (T, H, W) for video clips.

    >>> reference_maps(np.ones((4, 4)), 2, (4, 4))[0].shape
    (2, 4, 4)
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
            maps = np.broadcast_to(maps, (n, *maps.shape)) if maps.ndim == len(size) else maps
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
    ``w.results``: one DataArray per method (full attrs); ``w.scores``: dims ("method","metric").
    Images added later (``add_image``, upload) have no reference: their scores are NaN
    and the panels say "no reference". Video clips (N,C,T,H,W): every panel shows the
    ``frame`` control's frame (``w.play`` plays the clip in the browser; a frame change
    only redraws), and the scores compare the whole (t, y, x) volumes with the
    reference's (per frame, then averaged); methods that refuse clips are refused here::

        ds = xw.datasets.shapes(n=4)
        w = CompareWidget(model, ds.image.values, ["gradcam", "fem"], reference=ds)
        w.scores.sel(metric="pcc")
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 methods: Sequence[str] | None = None, reference: Any = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None,
                 params: dict[str, dict[str, Any]] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS,
                 background: bool | None = None) -> None:
        super().__init__(model, images, preprocess, classes, background)
        self.methods = list(methods) if methods is not None else _default_methods()
        for name in self.methods:
            get_method(name)  # unknown names fail here, with suggestions
        self._usable_on_clips(self.methods, asked=self.methods)  # clips: refusals fail here
        self.method_params = {k: dict(v) for k, v in (params or {}).items()}
        self.metric_names = [_metrics.get(name).name for name in metrics]
        ex = self.explainer()
        self.gfdm, self.fixations = reference_maps(reference, len(self.images), ex.size)
        self._add_controls({
            "image": self._image_control(),
            **self._frame_controls(),
            "target": self._target_control(),
            "layer": W.Dropdown(options=ex.layers(), value=ex.default_layer(),
                                description="layer", style=STYLE, layout=W.Layout(**LAYOUT)),
            **self._view_controls(),
        })
        set_visible(self.controls["layer"], any(get_method(m).uses_layer for m in self.methods))
        self.results: dict[str, xr.DataArray] = {}
        self.scores: xr.DataArray | None = None
        titles = self.methods + (["reference"] if self.has_reference else [])
        cols = len(titles) if len(titles) <= 2 else 2
        self.grid = MapGrid(len(titles), cols=cols, titles=titles, panel_px=MAP_PX)
        self.figure = self.grid.figure
        self.figure.layout.width = cols * (FIT_PX // 2)  # fits a notebook at a 900 px window
        self._shown_image: int | None = None
        self.top5.value = top5_html(self.controls["target"].options)
        self.live = LiveScores(enabled=self.background,  # every map: deletion/insertion
                               maps=len(self.methods))
        side = self._side([*self._frame_row(), self._box(["target"]), self.top5,
                           self._box(["layer", *sorted(VIEW)]), self.live,
                           self._upload_control(), self._export_controls(), self.busy_box])
        self.children = [self._image_picker(), self._row([side, self.figure]), self.status]
        self.refresh()

    @property
    def has_reference(self) -> bool:
        """True when a reference (GFDM or fixations) was given."""
        return self.gfdm is not None or self.fixations is not None

    def reference_of(self, index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(GFDM, fixations) of image ``index``; ``None`` where there is none (added images)."""
        def row(maps: np.ndarray | None) -> np.ndarray | None:
            return maps[index] if maps is not None and index < len(maps) else None
        return row(self.gfdm), row(self.fixations)

    def _stale(self, changed: set[str], results: dict[str, xr.DataArray]) -> list[str]:
        """Methods whose map depends on what changed (the others keep theirs)."""
        stale = []
        for name in self.methods:
            m = get_method(name)
            if (name not in results or ("target" in changed and not m.class_agnostic)
                    or ("layer" in changed and m.uses_layer)):
                stale.append(name)
        return stale

    def _compute(self, changed: set[str]) -> Publish:
        index = self.index
        ex = self.explainer(index)
        options = self._target_options(ex) if "image" in changed else None
        target = options[0][1] if options else self.controls["target"].value
        results = {} if "image" in changed else dict(self.results)
        stale = self._stale(changed, results) if changed - REDRAW else []
        for name in stale:
            self._computing(name)
            m = get_method(name)
            result = ex.explain(
                name, target=None if m.class_agnostic else target,
                layer=self._layer_for(m, ex),
                **self._engine_params(self.method_params.get(name, {})))
            results[name] = result.assign_coords(image=[index])
        combined, scores = self.result, self.scores
        if stale:
            maps = [results[name].drop_vars(["target", "class_name"], errors="ignore")
                    .rename("explanation") for name in self.methods]
            combined = xr.concat(maps, dim="method", combine_attrs="drop",
                                 coords="minimal", compat="override"
                                 ).assign_coords(method=self.methods)
            scores = self._score(results, index)

        def publish() -> str | None:
            if options is not None:
                self._show_targets(options)
            self.results, self.result, self.scores = results, combined, scores
            self._draw()
            return ", ".join(stale) or None
        return publish

    def _after_draw(self, token) -> None:
        index = int(self.result.image.values[0])
        self.live.run(self.worker, token, self.explainer(index), dict(self.results))

    def _score(self, results: dict[str, xr.DataArray], index: int) -> xr.DataArray | None:
        """Each metric of each method's map against the reference (NaN when it lacks data);
        a clip's volume is scored per frame, then averaged over the frames."""
        if not self.has_reference:
            return None
        gfdm, fixations = self.reference_of(index)
        table = np.full((len(self.methods), len(self.metric_names)), np.nan)
        for j, metric in enumerate(self.metric_names):
            spec = _metrics.get(metric)
            ref = gfdm if spec.needs == "map" else fixations
            if ref is None:
                continue
            for i, name in enumerate(self.methods):
                saliency = results[name].isel(image=0)  # (y, x), or (t, y, x) for clips
                table[i, j] = float(spec(saliency, xr.DataArray(ref, dims=saliency.dims)))
        return xr.DataArray(table, dims=("method", "metric"),
                            coords={"method": self.methods, "metric": self.metric_names},
                            name="score")

    def _title(self, name: str) -> str:
        if self.scores is None:
            return name
        row = self.scores.sel({"method": name})  # sel(method=) is a keyword of sel
        parts = [f"{metric.upper()} {float(row.sel(metric=metric)):.2f}"
                 for metric in self.metric_names if np.isfinite(row.sel(metric=metric))]
        note = " · ".join(parts) or "no reference"
        return f"{name}<br><span style='font-size:11px'>{note}</span>"

    def _redraw(self, changed: set[str]) -> None:
        if changed & VIEW:
            self.grid.restyle(*self._view_values(changed))
        if "frame" in changed:  # the stored maps at the new frame: no recomputation
            self._draw()

    def _draw(self) -> None:
        index = int(self.result.image.values[0])
        image = self._picture(index) if self._shown_image != index or self.is_clip else None
        with self.figure.batch_update():
            self.grid.restyle(self.controls["colormap"].value, self.controls["opacity"].value)
            for i, name in enumerate(self.methods):
                da = self.results[name]
                self.grid.show(i, self.frame_of(da).xai.map2d(), image=image,
                               title=self._title(name), signed=da.xai.signed,
                               limits=self._limits(da))
            if self.has_reference:
                gfdm, fixations = self.reference_of(index)
                reference = gfdm if gfdm is not None else fixations
                title = ("reference (GFDM)" if gfdm is not None else "reference (fixations)"
                         if fixations is not None else "no reference for this image")
                limits = None
                if reference is None:
                    reference = np.zeros(self.images.shape[-2:])
                elif self.is_clip:  # its frame, coloured on the whole volume's range
                    limits = rendering.color_limits(reference, False)
                    reference = reference[self.frame]
                self.grid.show(len(self.methods), reference, image=image, title=title,
                               limits=limits)
        self._shown_image = index

    def _export_panels(self):
        image = self.image_frame()
        return [(self.results[name], image) for name in self.methods]


def _default_methods() -> list[str]:
    known = methods()
    chosen = [m for m in DEFAULT_METHODS if m in known]
    return chosen or known[:3]
