"""FEMStackWidget: the per-layer FEM maps of MLFEM, browsable, and their live fusion."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import torch

from ..core.registry import get_method
from .base import REDRAW, VIEW, ExplorerBase, Publish
from .controls import STYLE, ParamControls, set_visible
from .figures import FIT_PX, MapGrid

#: the registered method whose fusion this widget shows (MLFEM by definition)
FUSION_METHOD = "mlfem"
#: MLFEM parameters this widget exposes (read from the registry's mlfem declaration)
FUSION_PARAMS = ("K", "operator", "alpha", "normalize")
#: operators whose result depends on alpha
USES_ALPHA = ("add", "top")
#: side of the two main panels (px)
MAP_PX = 360


class FEMStackWidget(ExplorerBase):
    """The FEM cube ``Explainer.fem_stack(layers, K)`` of one image, layer by layer, and the
    fused MLFEM map ``xw.fuse(stack, operator, alpha, normalize)`` beside it.

    Controls: ``image``, ``layer`` (a slider over the stack), ``K``, ``operator``,
    ``alpha`` (shown for add/top), ``normalize``, ``opacity``, ``colormap``.
    ``w.figure``: the chosen layer's map and the fused map; ``w.grid_figure``: every
    layer as small multiples. ``w.stack`` is the cube (dims image, layer, y, x),
    ``w.result`` the fused map. Changing K recomputes only the per-layer maps from
    cached activations; operator/alpha/normalize only re-fuse; the model never runs again.
    Video clips (N,C,T,H,W): every panel shows the ``frame`` control's frame (stack dims
    image, layer, t, y, x; ``w.play`` plays the clip in the browser), a frame change
    only redraws, and the ``net`` operator (refused on clips) is not offered::

        w = FEMStackWidget(model, images, preprocess=preprocess)
        w.controls["operator"].value = "add"
        w.controls["layer"].value = w.layers[0]
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, layers: Sequence[str] | None = None,
                 net: torch.nn.Module | None = None, background: bool | None = None) -> None:
        super().__init__(model, images, preprocess, classes, background)
        self.layers = list(layers) if layers is not None else self.explainer().block_layers()
        if not self.layers:
            raise ValueError("the model has no block layers for a FEM stack; pass layers=[...]")
        self.net = net
        self.params = ParamControls([FUSION_METHOD], only=FUSION_PARAMS)
        self.params.select(FUSION_METHOD)
        self._add_controls({
            "image": self._image_control(),
            **self._frame_controls(),
            # the layer's name is shown below the slider: a readout would be clipped
            "layer": W.SelectionSlider(options=self.layers, value=self.layers[-1],
                                       description="layer", continuous_update=True,
                                       readout=False, style=STYLE,
                                       layout=W.Layout(width="370px")),  # handle unclipped
            **self.params.controls,
            **self._view_controls(),
        })
        if self.is_clip:  # fusion by a trained NET is refused on clips
            self.params.drop_choice("operator", "net")
        self.layer_label = W.HTML(layout=W.Layout(margin="0 0 0 115px"))
        self.stack = None
        self.grid = MapGrid(2, titles=["layer", "fused"], panel_px=MAP_PX)
        self.figure = self.grid.figure
        self.figure.layout.width = FIT_PX  # fits a notebook at a 900 px window
        self.layers_grid = MapGrid(len(self.layers), cols=min(len(self.layers), 4),
                                   titles=self.layers, panel_px=170, resolution=64,
                                   short_titles=True)
        self.grid_figure = self.layers_grid.figure
        self.grid_figure.layout.width = min(len(self.layers), 4) * 170 + 20
        self._shown_image: int | None = None
        side = self._side([*self._frame_row(), self.controls["layer"], self.layer_label,
                           self._box(list(self.params.controls)), self._box(sorted(VIEW)),
                           self._upload_control(), self._export_controls(), self.busy_box])
        self.children = [self._image_picker(), self._row([side, self.figure]),
                         self.grid_figure, self.status]
        self._prepare(set())
        self.refresh()

    def fusion_params(self) -> dict[str, Any]:
        """Current operator, alpha and normalize."""
        values = self.params.values(FUSION_METHOD)
        return {k: values[k] for k in ("operator", "alpha", "normalize") if k in values}

    def _prepare(self, changed: set[str]) -> None:
        super()._prepare(changed)
        set_visible(self.controls["alpha"], self.fusion_params().get("operator") in USES_ALPHA)
        position = self.layers.index(self.controls["layer"].value)
        self.layer_label.value = (f"<b>{self.layers[position]}</b> "
                                  f"({position + 1}/{len(self.layers)})")

    def _needs_compute(self, changed: set[str]) -> bool:
        return bool(changed - REDRAW - {"layer"}) or self.result is None

    def _compute(self, changed: set[str]) -> Publish:
        from ..fusion import fuse

        index = self.index
        done = []
        stack = self.stack
        if stack is None or changed & {"image", "K"}:
            self._computing("FEM stack")
            K = self.params.values(FUSION_METHOD).get(
                "K", get_method(FUSION_METHOD).param("K").default)
            stack = self.explainer(index).fem_stack(layers=self.layers, K=K)
            stack = stack.assign_coords(image=[index])
            done.append("FEM stack")
        result = self.result
        if done or changed & {"operator", "alpha", "normalize"}:
            self._computing("fusion")
            params = self.fusion_params()
            result = fuse(stack, net=self.net, **params)
            done.append(f"fusion ({params.get('operator')})")

        def publish() -> str | None:
            self.stack, self.result = stack, result
            # the small multiples show the stack: a fusion change leaves them as they are
            self._draw(redraw_layers="FEM stack" in done)
            return " + ".join(done) or None
        return publish

    def _redraw(self, changed: set[str]) -> None:
        """Restyles touch no map; a layer change redraws only the layer panel; a frame
        change puts the stored stack and fused map at that frame (no recomputation)."""
        if changed & VIEW:
            self.grid.restyle(*self._view_values(changed))
            self.layers_grid.restyle(*self._view_values(changed))
        if "frame" in changed:
            self._draw(redraw_layers=True)
        elif "layer" in changed:
            self._show_layer()

    def _layer_map(self, position: int):
        """Layer ``position`` of the stack (dims y, x; or t, y, x for clips)."""
        return self.stack.isel(image=0, layer=position)

    def _show_layer(self, image: Any = None) -> None:
        """The chosen layer's map in the first panel (clips: at the frame shown)."""
        position = self.layers.index(self.controls["layer"].value)
        da = self._layer_map(position)
        self.grid.show(0, self.frame_of(da).values, image=image, limits=self._limits(da),
                       title=f"{self.layers[position]} ({position + 1}/{len(self.layers)})")

    def _draw(self, redraw_layers: bool = True) -> None:
        colormap, opacity = self.controls["colormap"].value, self.controls["opacity"].value
        index = int(self.stack.image.values[0])
        new_image = self._shown_image != index or self.is_clip
        image = self._picture(index) if new_image else None
        with self.figure.batch_update():
            self.grid.restyle(colormap, opacity)
            self._show_layer(image)
            self.grid.show(1, self.frame_of(self.result).xai.map2d(), image=image,
                           limits=self._limits(self.result),
                           title=f"fused: {self.fusion_params().get('operator', '')}")
        if redraw_layers or new_image:
            with self.grid_figure.batch_update():
                self.layers_grid.restyle(colormap, opacity)
                for i in range(len(self.layers)):
                    da = self._layer_map(i)
                    self.layers_grid.show(i, self.frame_of(da).values, image=image,
                                          limits=self._limits(da))
        self._shown_image = index

    def _export_sweep(self) -> list[str]:
        """Handouts sweep the image and the layer slider (both figures are recorded)."""
        return ["image", "layer"]

    def _export_figures(self) -> list:
        return [self.figure, self.grid_figure]

    def _export_panels(self):
        chosen = self.stack.isel(layer=self.layers.index(self.controls["layer"].value))
        image = self.image_frame()
        return [(chosen, image), (self.result, image)]
