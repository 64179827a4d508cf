"""ExplainerWidget: one image, one method, every parameter live."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import torch

from ..core import registry
from ..core.registry import get_method
from .base import VIEW, ExplorerBase
from .controls import LAYOUT, STYLE, ParamControls, set_visible
from .figures import MapGrid

#: the method shown first when the caller names none (fast, and a readable map)
DEFAULT_METHOD = "gradcam"


class ExplainerWidget(ExplorerBase):
    """Pick an image, a class, a method and its parameters; see the heatmap over the image.

    Controls (``w.controls``): ``image``, ``target`` (classes, most probable first),
    ``method``, ``layer`` (shown for layer methods), one control per parameter of
    every method (only the current method's are shown), ``opacity`` and ``colormap``.
    ``w.figure`` is the plotly ``FigureWidget``; ``w.result`` the current map
    (dims ``("image","y","x")``, attrs = every parameter). Setting a control's
    ``value`` from code updates both at once, exactly as a click would.
    ``method`` is shown first (default Grad-CAM); ``methods`` limits the dropdown
    (default: every registered method)::

        w = ExplainerWidget(model, images, preprocess=preprocess, classes=classes)
        w.controls["method"].value = "fem"
        w.controls["K"].value = 2.0        # re-uses the cached activations
        w.result.attrs["K"]                # 2.0
        w.save_png("fem.png"); w.save_netcdf("fem.nc")
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, method: str | None = None,
                 methods: Sequence[str] | None = None) -> None:
        super().__init__(model, images, preprocess, classes)
        names = list(methods) if methods is not None else registry.methods()
        method = method or (DEFAULT_METHOD if DEFAULT_METHOD in names else names[0])
        ex = self.explainer()
        self.params = ParamControls(names)
        self._add_controls({
            "image": self._image_control(),
            "target": self._target_control(),
            "method": W.Dropdown(options=names, value=method, description="method",
                                 style=STYLE, layout=W.Layout(**LAYOUT)),
            "layer": W.Dropdown(options=ex.layers(), value=ex.default_layer(),
                                description="layer", style=STYLE, layout=W.Layout(**LAYOUT)),
            **self.params.controls,
            **self._view_controls(),
        })
        self.grid = MapGrid(1)
        self.figure = self.grid.figure
        self._shown_image: int | None = None
        picks = self._box(["image", "target", "method", "layer"])
        self._params_box = W.VBox(list(self.params.controls.values()))
        side = W.VBox([picks, self._params_box, self._box(sorted(VIEW)), self._upload_control(),
                       self._export_controls(), self.progress])
        self.children = [W.HBox([side, self.figure]), self.status]
        self.refresh()

    @property
    def method(self) -> str:
        return self.controls["method"].value

    def _relevant(self) -> set[str]:
        """Controls the current map depends on (hidden ones and view controls do not count)."""
        m = get_method(self.method)
        names = {"image", "method", *self.params.keys[m.name].values()}
        if m.uses_layer:
            names.add("layer")
        if not m.class_agnostic:
            names.add("target")
        return names

    def _update(self, changed: set[str]) -> str | None:
        if "image" in changed:
            self._sync_targets()
        if "method" in changed:
            self._select_method(keep=changed)
        self.params.forget(changed - self._relevant())
        recomputed = None
        if changed & self._relevant() or self.result is None:
            self.params.note_changes(self.method, changed)
            recomputed = self._compute()
        self._draw()
        return recomputed

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

    def _compute(self) -> str:
        m = get_method(self.method)
        self._computing(m.name)
        layer = self.controls["layer"].value if m.uses_layer else None
        target = None if m.class_agnostic else self.controls["target"].value
        result = self.explainer().explain(m.name, target=target, layer=layer,
                                          **self.params.values(m.name))
        self.result = result.assign_coords(image=[self.index])
        with self._silenced():
            self.params.show_used(m.name, result.attrs)
        return m.name

    def _draw(self) -> None:
        if self.result is None:
            return
        da = self.result
        with self.figure.batch_update():
            self.grid.restyle(self.controls["colormap"].value, self.controls["opacity"].value)
            image = None if self._shown_image == self.index else self.images[self.index]
            self.grid.show(0, da.xai.map2d(), image=image, title=self._title(da),
                           signed=da.xai.signed)
        self._shown_image = self.index

    def _title(self, da) -> str:
        layer = f" · {da.attrs['layer']}" if da.attrs.get("layer") else ""
        if da.attrs.get("class_agnostic"):
            return f"{da.attrs['method']}{layer} (class-agnostic)"
        label = self.controls["target"].label or ""
        return f"{da.attrs['method']}{layer} · {label}"
