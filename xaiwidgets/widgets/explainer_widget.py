"""ExplainerWidget: one image, one method, every parameter live."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import numpy as np
import torch
import xarray as xr

from ..core import registry
from ..core.registry import get_method
from .base import VIEW, ExplorerBase, Publish, top5_html
from .controls import LAYOUT, STYLE, ParamControls, set_visible
from .figures import FIT_PX, MapGrid
from .live_scores import LiveScores, Randomizer

#: the method shown first when the caller names none (fast, and a readable map)
DEFAULT_METHOD = "gradcam"
#: side of the image and map panels (px)
MAP_PX = 360


class ExplainerWidget(ExplorerBase):
    """Pick an image, a class, a method and its parameters; see the heatmap over the image.

    Controls (``w.controls``): ``image``, ``target`` (classes, most probable first),
    ``method``, ``layer`` (shown for layer methods), one control per parameter of
    every method (only the current method's are shown), ``opacity`` and ``colormap``.
    ``w.figure`` is the plotly ``FigureWidget``; ``w.result`` the current map
    (dims ``("image","y","x")``, attrs = every parameter). Setting a control's
    ``value`` from code updates both at once, exactly as a click would.
    ``method`` is shown first (default Grad-CAM); ``methods`` limits the dropdown
    (default: every registered method). The figure shows the image and, beside it,
    the map over the image (panel ``w.map_panel``); the top-5 predictions sit beside
    the class picker. In the background (``background=True``, the default in a
    kernel) IG, SmoothGrad, occlusion and meaningful perturbation draw first
    estimates while they run; ``w.wait()`` waits for the final map.

    Video clips (N,C,T,H,W), e.g. ``xw.datasets.moving_shapes(...)`` (the Dataset or
    its ``image``): the dropdown offers only the methods that explain clips, the
    figure shows the ``frame`` control's frame of the clip and of the map (dims
    ``("image","t","y","x")``), and ``w.play`` plays the clip in the browser; a frame
    change redraws without recomputing. ``gaze`` is then one (T,H,W) volume per clip
    (a Dataset gives its ``gfdm``)::

        w = ExplainerWidget(model, images, preprocess=preprocess, classes=classes)
        w.controls["method"].value = "fem"
        w.controls["K"].value = 2.0        # re-uses the cached activations
        w.result.attrs["K"]                # 2.0
        w.save_png("fem.png"); w.save_netcdf("fem.nc")
        model, preprocess, classes = xw.models.load("shapes-video")
        v = ExplainerWidget(model, xw.datasets.moving_shapes(2), preprocess=preprocess)
        v.controls["frame"].value = 5      # frame 5 of the clip and map: no model call
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, method: str | None = None,
                 methods: Sequence[str] | None = None, background: bool | None = None,
                 gaze: Any = None) -> None:
        super().__init__(model, images, preprocess, classes, background)
        #: optional gaze maps (N, H, W), or (N, T, H, W) for clips, scored against the map
        #: (PCC, SIM) in ``w.live``
        if isinstance(gaze, xr.Dataset):
            gaze = gaze["gfdm"]
        self.gaze = None if gaze is None else np.asarray(gaze, dtype=np.float64)
        names = list(methods) if methods is not None else registry.methods()
        names = self._usable_on_clips(names, asked=[method] if method else [])
        method = method or (DEFAULT_METHOD if DEFAULT_METHOD in names else names[0])
        ex = self.explainer()
        self.randomizer = Randomizer(model, ex.inputs[:1])  # the sanity toggle
        self.live = LiveScores(enabled=self.background)  # the drawn map: faithfulness, gaze
        self.params = ParamControls(names, context=ex.context)  # size-scaled defaults
        self._add_controls({
            "image": self._image_control(),
            **self._frame_controls(),
            "target": self._target_control(),
            "method": W.Dropdown(options=names, value=method, description="method",
                                 style=STYLE, layout=W.Layout(**LAYOUT)),
            "layer": W.Dropdown(options=ex.layers(), value=ex.default_layer(),
                                description="layer", style=STYLE, layout=W.Layout(**LAYOUT)),
            **self.params.controls,
            "randomize": self.randomizer.control,
            **self._view_controls(),
        })
        #: panel 0: the image; panel ``map_panel``: the map over it
        self.map_panel = 1
        self.grid = MapGrid(2, titles=["image", " "], panel_px=MAP_PX)
        self.grid.heatmap(self.map_panel).showscale = True
        self.figure = self.grid.figure
        # fits a notebook's output area at a 900 px window (720 px in JupyterLab)
        self.figure.layout.width = FIT_PX
        self._shown_image: int | None = None
        self.top5.value = top5_html(self.controls["target"].options)
        self._params_box = W.VBox(list(self.params.controls.values()))
        if self.is_clip:  # fusion by a trained NET is refused on clips
            self.params.drop_choice("operator", "net")
        side = self._side([*self._frame_row(), self._box(["method", "layer"]), self._params_box,
                           self._box(["randomize"]), self.live,
                           self._box(sorted(VIEW)), self._upload_control(),
                           self._export_controls(), self.busy_box])
        # the top-5 chart stays beside the class picker (both wrap below on narrow screens)
        picks = self._row([self._image_picker(), self._row([self.controls["target"], self.top5])])
        self.children = [picks, self._row([side, self.figure]), self.status]
        self.refresh()

    @property
    def method(self) -> str:
        """The method shown (the ``method`` control's value)."""
        return self.controls["method"].value

    def _relevant(self) -> set[str]:
        """Controls the current map depends on (hidden ones and view controls do not count)."""
        m = get_method(self.method)
        names = {"image", "method", "randomize", *self.params.keys[m.name].values()}
        if m.uses_layer:
            names.add("layer")
        if not m.class_agnostic:
            names.add("target")
        return names

    def _prepare(self, changed: set[str]) -> None:
        super()._prepare(changed)
        if "randomize" in changed:  # explainers of the randomised copy (or the original)
            self.model = self.randomizer.model()
            with self._explainers_lock:
                self._explainers.clear()
        if "method" in changed:
            self._select_method(keep=changed)
        self.params.forget(changed - self._relevant())
        self.params.note_changes(self.method, changed)

    def _needs_compute(self, changed: set[str]) -> bool:
        return bool(changed & self._relevant()) or self.result is None

    def _select_method(self, keep: set[str]) -> None:
        m = get_method(self.method)
        with self._silenced():
            self.params.select(m.name, keep=keep)
        # the method's controls first, in its declaration order (the others are hidden)
        mine = list(self.params.keys[m.name].values())
        self._params_box.children = [self.params.controls[k] for k in mine] + [
            c for k, c in self.params.controls.items() if k not in mine]
        set_visible(self.controls["layer"], m.uses_layer)
        # FEM ignores the class: the picker stays visible (predictions) but inactive
        self.controls["target"].disabled = m.class_agnostic

    def _compute(self, changed: set[str]) -> Publish:
        m = get_method(self.method)
        index = self.index
        ex = self.explainer(index)
        self._computing(m.name)
        options = self._target_options(ex) if "image" in changed else None
        target = None if m.class_agnostic else (
            options[0][1] if options else self.controls["target"].value)
        layer = self._layer_for(m, ex)
        params = self._engine_params(self.params.values(m.name))

        def first_estimate(raw: torch.Tensor) -> None:
            da = ex.pack(raw, m, ex.resolve_target(target), layer, "default", params)
            self._show(da.assign_coords(image=[index]), estimate=True)

        with ex.context.partial_results(
                self._progressive(m.name, m.progress_unit, first_estimate)):
            result = ex.explain(m.name, target=target, layer=layer, **params)
        result = result.assign_coords(image=[index])

        def publish() -> str:
            if options is not None:
                self._show_targets(options)
            self.result = result
            with self._silenced():
                self.params.show_used(m.name, result.attrs)
            if m.uses_layer:
                self._show_layer(layer)
            self._draw()
            return m.name
        return publish

    def _after_draw(self, token) -> None:
        index = int(self.result.image.values[0])
        gaze = self.gaze[index] if self.gaze is not None and index < len(self.gaze) else None
        self.live.run(self.worker, token, self.explainer(index), self.result, gaze)

    def _draw(self) -> None:
        if self.result is not None:
            self._show(self.result)

    def _redraw(self, changed: set[str]) -> None:
        if changed & VIEW:
            self.grid.restyle(*self._view_values(changed))
        if "frame" in changed:  # the stored map at the new frame: no recomputation
            self._draw()

    def _show(self, da: xr.DataArray, estimate: bool = False) -> None:
        """Draw ``da`` (of the current image) beside the image; ``estimate``: a first one.
        Clips: the frame shown, coloured on the range of the whole clip."""
        index = int(da.image.values[0])
        title = self._title(da) + (" · first estimate" if estimate else "")
        with self.figure.batch_update():
            self.grid.restyle(self.controls["colormap"].value, self.controls["opacity"].value)
            image = None
            if self._shown_image != index or self.is_clip:
                image = self._picture(index)
                self.grid.image(0).source = image
                name = self.controls["image"].label or f"image {index}"
                if self.is_clip:
                    name += f" · frame {self.frame} of 0–{self.images.shape[2] - 1}"
                self.grid.set_title(0, name)
            self.grid.show(self.map_panel, self.frame_of(da).xai.map2d(), image=image,
                           title=title, signed=da.xai.signed, limits=self._limits(da))
        self._shown_image = index

    def _export_sweep(self) -> list[str]:
        """Handouts sweep the image and the method's first parameter slider."""
        sliders = [key for name, key in self.params.keys[self.method].items()
                   if name not in ("seed", "batch_size")
                   and isinstance(self.controls[key], (W.IntSlider, W.FloatSlider))]
        return ["image", *sliders[:1]]

    def _title(self, da) -> str:
        layer = f" · {da.attrs['layer']}" if da.attrs.get("layer") else ""
        if da.attrs.get("class_agnostic"):
            return f"{da.attrs['method']}{layer} (class-agnostic)"
        label = self.controls["target"].label or ""
        return f"{da.attrs['method']}{layer} · {label}"
