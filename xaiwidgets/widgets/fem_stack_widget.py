"""FEMStackWidget: the per-layer FEM maps of MLFEM, browsable, and their live fusion."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import torch

from ..core.registry import get_method
from .base import VIEW, ExplorerBase
from .controls import LAYOUT, STYLE, ParamControls, set_visible
from .figures import MapGrid

#: MLFEM parameters this widget exposes (read from the registry's mlfem declaration)
FUSION_PARAMS = ("K", "operator", "alpha", "normalize")
#: operators whose result depends on alpha
USES_ALPHA = ("add", "top")


class FEMStackWidget(ExplorerBase):
    """The FEM cube ``Explainer.fem_stack(layers, K)`` of one image, layer by layer, and the
    fused MLFEM map ``xw.fuse(stack, operator, alpha, normalize)`` beside it.

    Controls: ``image``, ``layer`` (a slider over the stack), ``K``, ``operator``,
    ``alpha`` (shown for add/top), ``normalize``, ``opacity``, ``colormap``.
    ``w.figure``: the chosen layer's map and the fused map; ``w.grid_figure``: every
    layer as small multiples. ``w.stack`` is the cube (dims image, layer, y, x),
    ``w.result`` the fused map. Changing K recomputes only the per-layer maps from
    cached activations; operator/alpha/normalize only re-fuse; the model never runs again::

        w = FEMStackWidget(model, images, preprocess=preprocess)
        w.controls["operator"].value = "add"
        w.controls["layer"].value = w.layers[0]
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, layers: Sequence[str] | None = None,
                 net: torch.nn.Module | None = None) -> None:
        super().__init__(model, images, preprocess, classes)
        self.layers = list(layers) if layers is not None else self.explainer().block_layers()
        if not self.layers:
            raise ValueError("the model has no block layers for a FEM stack; pass layers=[...]")
        self.net = net
        self.params = ParamControls(["mlfem"], only=FUSION_PARAMS)
        self.params.select("mlfem")
        self._add_controls({
            "image": self._image_control(),
            "layer": W.SelectionSlider(options=self.layers, value=self.layers[-1],
                                       description="layer", continuous_update=True,
                                       style=STYLE, layout=W.Layout(**LAYOUT)),
            **self.params.controls,
            **self._view_controls(),
        })
        self.stack = None
        self.grid = MapGrid(2, titles=["layer", "fused"])
        self.figure = self.grid.figure
        self.layers_grid = MapGrid(len(self.layers), cols=min(len(self.layers), 4),
                                   titles=self.layers, panel_px=170, resolution=64)
        self.grid_figure = self.layers_grid.figure
        self._shown_image: int | None = None
        side = W.VBox([self._box(["image", "layer", *self.params.controls]),
                       self._box(sorted(VIEW)), self._upload_control(),
                       self._export_controls(), self.progress])
        self.children = [W.HBox([side, self.figure]), self.grid_figure, self.status]
        self.refresh()

    def fusion_params(self) -> dict[str, Any]:
        """Current operator, alpha and normalize."""
        values = self.params.values("mlfem")
        return {k: values[k] for k in ("operator", "alpha", "normalize") if k in values}

    def _update(self, changed: set[str]) -> str | None:
        from ..fusion import fuse

        done = []
        if self.stack is None or changed & {"image", "K"}:
            self._computing("FEM stack")
            K = self.params.values("mlfem").get("K", get_method("mlfem").param("K").default)
            stack = self.explainer().fem_stack(layers=self.layers, K=K)
            self.stack = stack.assign_coords(image=[self.index])
            done.append("FEM stack")
        if done or changed & {"operator", "alpha", "normalize"}:
            params = self.fusion_params()
            set_visible(self.controls["alpha"], params.get("operator") in USES_ALPHA)
            self.result = fuse(self.stack, net=self.net, **params)
            done.append(f"fusion ({params.get('operator')})")
        # the small multiples show the stack: a fusion change leaves them as they are
        self._draw(redraw_layers="FEM stack" in done or bool(changed & VIEW))
        return " + ".join(done) or None

    def _draw(self, redraw_layers: bool) -> None:
        colormap, opacity = self.controls["colormap"].value, self.controls["opacity"].value
        new_image = self._shown_image != self.index
        image = self.images[self.index] if new_image else None
        position = self.layers.index(self.controls["layer"].value)
        chosen = self.stack.isel(image=0, layer=position)
        with self.figure.batch_update():
            self.grid.restyle(colormap, opacity)
            self.grid.show(0, chosen.values, image=image,
                           title=f"{self.layers[position]} ({position + 1}/{len(self.layers)})")
            self.grid.show(1, self.result.xai.map2d(), image=image,
                           title=f"fused: {self.fusion_params().get('operator', '')}")
        if redraw_layers:
            with self.grid_figure.batch_update():
                self.layers_grid.restyle(colormap, opacity)
                for i in range(len(self.layers)):
                    self.layers_grid.show(i, self.stack.isel(image=0, layer=i).values,
                                          image=image)
        self._shown_image = self.index

    def _export_panels(self):
        chosen = self.stack.isel(layer=self.layers.index(self.controls["layer"].value))
        image = self.images[self.index]
        return [(chosen, image), (self.result, image)]
