"""ConceptExplorer: which channels of a layer carry a decision, and what each one sees.

The explorer shows one image of a dataset with the chosen measure's map, a bar chart
of the layer's top channels for the measure and the class, and for the channel picked
(a click on its bar, or :meth:`ConceptExplorer.select_channel`) its conditional map on
the image (only that channel contributes: CRP for LRP), its top reference patches from
the whole dataset (:func:`xaiwidgets.concepts.references`; a click on a patch's button
opens that image) and its class usage (:func:`xaiwidgets.concepts.class_usage`). A box
dragged on the map (or :meth:`ConceptExplorer.select_region`) ranks the channels by
their contribution inside it. The ``mode`` control switches to NMF concepts
(:func:`xaiwidgets.concepts.factorize`): colour-coded concept maps with their patches::

    model, preprocess, classes = xw.models.load("shapes-vgg")
    c = xw.ConceptExplorer(model, xw.datasets.shapes(n=64), preprocess=preprocess)
    c.channels                         # the top channels of the image's decision
    c.select_channel(int(c.channels.channel[0]))
    c.references                       # that channel's reference patches (dataset indices)
    c.select_region(8, 8, 32, 32)      # the channels that matter inside the box
    c.controls["measure"].value = "gradcam"

Everything slow runs through the widget base's worker (``busy``, ``wait()``,
``cancel()``, ``error``): a newer click supersedes a running computation. The dataset
passes (reference patches, class usage) show their progress (images done) and stop at
their next chunk on Cancel or a newer click; with ``store=`` the chunks finished so far
are kept there and the next pass resumes after them.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import matplotlib
import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr

from .. import rendering
from ..concepts import class_usage, factorize, references
from ..concepts.patches import patch_boxes
from ..concepts.regions import box_contributions
from ..core.channels import channel_count
from ..core.inputs import as_image_batch
from ..core.ops import did_you_mean, minmax, upsample
from ..core.registry import ACTIVATION, get_method
from ..datasets.adapters import ImageSource, image_source
from ..explainer import Explainer
from .base import VIEW, ExplorerBase, Publish, top5_html
from .controls import LAYOUT, STYLE, set_visible
from .dataset_explorer import thumbnail_png
from .figures import FIT_PX, LiveFigureWidget, MapGrid, image_uri
from .lifecycle import replace_children

#: the measures of a channel's contribution (``ex.channels(method=...)``), in menu order
MEASURES = ("lrp", "gradcam", "fem", ACTIVATION)
CHANNELS, CONCEPTS = "channels", "concepts (NMF)"
#: what a change of each control recomputes: everything shown for the image
FRESH = frozenset({"image", "layer", "measure", "target"})
#: side of the image and map panels (px)
MAP_PX = 300
#: side of a reference patch thumbnail (px)
PATCH_PX = 72
#: most selection points per side of the invisible grid that catches a dragged box
SELECT_GRID = 64
#: colours of the NMF concepts (matplotlib's tab10)
CONCEPT_COLORS = tuple(tuple(int(round(255 * c)) for c in rgb)
                       for rgb in matplotlib.colormaps["tab10"].colors)


def _first_measure(ex: Explainer, layer: str) -> str:
    """The first of :data:`MEASURES` the model and layer allow (LRP is refused on
    self-attention, FEM on layers before their activation); the activation otherwise."""
    for name in MEASURES[:-1]:
        try:
            method = get_method(name)
            method.check(ex.context, layer, method.bind(ex.context, method.resolve_params({})))
        except ValueError:
            continue
        return name
    return ACTIVATION


class ConceptExplorer(ExplorerBase):
    """What a layer sees: channel contributions, conditional maps, reference patches.

    Parameters
    ----------
    model, preprocess, classes
        As for :class:`~xaiwidgets.Explainer` (``classes`` default: the dataset's).
    dataset
        An ``xr.Dataset`` with ``image`` (+ optional ``label``), a torch
        ``Dataset``/``DataLoader`` of ``(image, label)``, or
        ``xw.datasets.from_folder(path)``: its first ``browse`` images are in the picker,
        the whole of it gives the reference patches and the class usage. Video clips
        (an ``xr.Dataset`` whose ``image`` is (image, channel, t, y, x)) get the channels
        and conditional maps (reference patches and class usage are for still images).
    layer
        The layer shown first (default: the model's default layer).
    background
        Compute in a background thread (``None``: inside a running kernel only).
    top, by, store, batch_size
        Reference patches per channel, ranked ``by="activation"`` or ``"relevance"``
        (for the class picked), an optional zarr ``store`` that keeps them (and the
        chunks of a cancelled pass, to resume from) and the images per chunk of the
        dataset passes (:func:`xaiwidgets.concepts.references`).
    browse, bars
        Dataset images in the picker at first; channels in the bar chart.

    Controls: ``image``, ``target``, ``layer``, ``measure`` (``lrp``, ``gradcam``,
    ``fem``, ``activation``), ``mode`` (channels or NMF concepts), ``concepts`` (their
    number), ``opacity``, ``colormap``. Results: ``channels`` (dims ``("rank",)``, coord
    ``channel``), ``channel`` (the one picked), ``result`` (its conditional map),
    ``overall`` (the measure's map), ``references``, ``usage``, ``region``,
    ``factors`` (NMF)::

        c = ConceptExplorer(model, dataset, preprocess=preprocess)
        c.select_channel(3)      # = a click on channel 3's bar
        c.open_reference(0)      # = a click on its first reference patch
    """

    def __init__(self, model: torch.nn.Module, dataset: Any, layer: str | None = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, background: bool | None = None, *,
                 top: int = 8, by: str = "activation", store: Any = None, browse: int = 8,
                 bars: int = 10, batch_size: int = 64) -> None:
        if by not in ("activation", "relevance"):
            raise ValueError(f"by={by!r}: reference patches are ranked by 'activation' or "
                             "'relevance'")
        if min(top, browse, bars, batch_size) < 1:
            raise ValueError(f"top={top}, browse={browse}, bars={bars} and "
                             f"batch_size={batch_size} must be >= 1")
        self.dataset = dataset
        #: the dataset read in pieces (``None`` for clips: no reference patches)
        self.source: ImageSource | None
        self.source, first = _open_dataset(dataset, classes, browse)
        if classes is None and self.source is not None and self.source.classes:
            classes = self.source.classes
        super().__init__(model, first, preprocess, classes, background)
        self.top, self.by, self.store, self.bars = int(top), by, store, int(bars)
        self.batch_size = int(batch_size)
        #: the dataset index of each image in the picker (``None``: added from code)
        self.dataset_index: list[int | None] = list(range(len(first)))
        ex = self.explainer()
        layers = ex.layers()
        layer = ex.default_layer() if layer is None else layer
        if layer not in layers:
            if layer not in ex.context.shapes():
                raise ValueError(did_you_mean("layer", layer, layers)
                                 + "; ex.layers() lists the layers with channels")
            channel_count(ex.context, layer)  # any module with channels (a ViT's mlp.act)
            layers = [*layers, layer]
        image = self._image_control()
        image.options = [(f"#{i}", i) for i in range(len(first))]
        measure = _first_measure(ex, layer)
        self._add_controls({
            "image": image,
            "target": self._target_control(),
            "layer": W.Dropdown(options=layers, value=layer, description="layer", style=STYLE,
                                layout=W.Layout(**LAYOUT)),
            "measure": W.Dropdown(options=list(MEASURES), value=measure, description="measure",
                                  style=STYLE, layout=W.Layout(**LAYOUT),
                                  tooltip="a channel's contribution: LRP relevance (CRP), "
                                          "Grad-CAM term, share of the FEM map, or its "
                                          "maximum activation"),
            "mode": W.Dropdown(options=[CHANNELS, CONCEPTS], value=CHANNELS,
                               description="show", style=STYLE, layout=W.Layout(**LAYOUT),
                               tooltip="single channels, or NMF concepts of the layer"),
            "concepts": W.IntSlider(value=5, min=2, max=len(CONCEPT_COLORS),
                                    description="concepts", style=STYLE,
                                    continuous_update=False, layout=W.Layout(**LAYOUT)),
            **self._frame_controls(),
            **self._view_controls(),
        })
        # results (set by publish only)
        #: every channel's contribution for the current image, layer, measure and class
        self.contributions: xr.DataArray | None = None
        #: the channels shown (dims ``("rank",)``, coord ``channel``), best first
        self.channels: xr.DataArray | None = None
        #: the channel picked (its conditional map is ``result``)
        self.channel: int | None = None
        #: the measure's map of the current image (all channels)
        self.overall: xr.DataArray | None = None
        #: the picked channel's reference patches (dims ``("rank",)``) and the whole table
        self.references: xr.Dataset | None = None
        #: the picked channel's mean relevance per class (``None`` without labels)
        self.usage: xr.DataArray | None = None
        #: the box (y0, x0, y1, x1) the channels were last ranked in (``None``: the image)
        self.region: tuple[int, int, int, int] | None = None
        #: the NMF factorisation shown in concept mode (``maps``, ``basis``)
        self.factors: Any = None
        self._asked_channel: int | None = None
        self._asked_region: tuple[int, int, int, int] | None = None
        self._refs: dict[tuple, xr.Dataset] = {}
        self._usage: dict[str, xr.DataArray | str] = {}
        self._factors: dict[tuple, Any] = {}
        self._opening: int | None = None
        self._build()
        self.refresh()

    # ----------------------------------------------------------------- layout
    def _build(self) -> None:
        self.grid = MapGrid(2, titles=["map", "channel"], panel_px=MAP_PX)
        self.figure = self.grid.figure
        self.figure.layout.width = FIT_PX
        self.figure.layout.dragmode = "select"
        # no hover events: each is a message to the kernel, and a busy kernel's widget
        # messages are coalesced in the browser (a hover after a drag would replace it)
        self.figure.layout.hovermode = False
        self._add_box_catcher()
        self.bar_figure = LiveFigureWidget(go.Bar(
            x=[], y=[], marker={"color": []},
            hovertemplate="%{x}<br>%{y:.4g}<extra>click: this channel</extra>"))
        self.bar_figure.update_layout(
            width=FIT_PX, height=240, margin={"l": 50, "r": 10, "t": 36, "b": 40},
            title={"text": "top channels (click a bar)", "font": {"size": 13}},
            xaxis={"type": "category"}, plot_bgcolor="white", dragmode=False)
        self.bar_figure.data[0].on_click(self._on_bar)
        self.patches = W.HBox(layout=W.Layout(flex_flow="row wrap", max_width=f"{FIT_PX}px"))
        self.patches_title = W.HTML()
        self.usage_html = W.HTML(layout=W.Layout(width="380px"))
        self.top5.value = top5_html(self.controls["target"].options)
        picks = self._row([self._image_picker(), self._row([self.controls["target"], self.top5])])
        side = self._side([*self._frame_row(), self._box(["layer", "measure", "mode",
                                                          "concepts"]),
                           self._box(sorted(VIEW)), self.usage_html, self.busy_box])
        set_visible(self.controls["concepts"], False)
        below = W.VBox([self.bar_figure, self.patches_title, self.patches])
        self.children = [picks, self._row([side, self.figure]), below, self.status]

    def _add_box_catcher(self) -> None:
        """An invisible grid of points over the map panel: plotly selects points, not
        pixels, so a box dragged there reports its range through them."""
        size = self.images.shape[-2:]
        # fixed ranges: the points' markers would pad the panel's autorange
        self.figure.update_xaxes(autorange=False, range=[-0.5, int(size[1]) - 0.5],
                                 row=1, col=1)
        self.figure.update_yaxes(autorange=False, range=[int(size[0]) - 0.5, -0.5],
                                 row=1, col=1)
        ys, xs = (np.unique(np.linspace(0, s - 1, min(s, SELECT_GRID)).round()) for s in size)
        grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
        hidden = {"marker": {"opacity": 0}}
        self.figure.add_trace(go.Scatter(
            x=grid_x.ravel().tolist(), y=grid_y.ravel().tolist(), mode="markers",
            name="box", hoverinfo="skip", showlegend=False, xaxis="x", yaxis="y",
            marker={"size": 4, "opacity": 0}, selected=hidden, unselected=hidden))
        self.figure.data[-1].on_selection(self._on_box)

    # ---------------------------------------------------------------- actions
    def select_channel(self, channel: int) -> None:
        """Show channel ``channel`` of the layer: its conditional map on the image, its
        reference patches and its class usage (what a click on its bar does)."""
        self._asked_channel = self._check_channel(channel)
        self._request({"channel"})

    def select_region(self, y0: int, x0: int, y1: int, x1: int) -> None:
        """Rank the channels by their contribution inside the box ``[y0, y1) × [x0, x1)``
        (input pixels, end exclusive; what dragging a box on the map does).

        The contribution inside the box is channel k's conditional map summed over the
        box for ``lrp`` (the relevance that reaches the box through k); the channel's
        whole contribution times the share of its conditional map inside the box for
        ``gradcam`` and ``fem``; the maximum of its activation (upsampled to the input,
        not normalised) inside the box for ``activation``. ``c.channels`` then holds that ranking.
        """
        self._asked_region = self._check_box(y0, x0, y1, x1)
        self._request({"region"})

    def open_reference(self, rank: int) -> int:
        """Open the image of the picked channel's reference patch ``rank`` (what a click
        on the patch's button does); returns its dataset index."""
        if self.references is None:
            raise RuntimeError("no channel picked yet: select_channel(k) first"
                               + (" (c.wait() waits for it)" if self.busy else ""))
        if not 0 <= int(rank) < self.references.sizes["rank"]:
            raise IndexError(f"rank {rank} out of range 0..{self.references.sizes['rank'] - 1}")
        index = int(self.references.image.values[int(rank)])
        self.open_image(index)
        return index

    def open_image(self, index: int) -> None:
        """Show image ``index`` of the dataset (added to the picker when not there)."""
        index = int(index)
        n = len(self.source) if self.source is not None else len(self.images)
        if not 0 <= index < n:
            raise IndexError(f"image {index} out of range 0..{n - 1}")
        if index in self.dataset_index:
            self.controls["image"].value = self.dataset_index.index(index)
            return
        self._opening = index
        try:
            self.add_image(self.source.images([index])[0], label=f"#{index}")
        finally:
            self._opening = None

    def close(self) -> None:
        """Stop the worker and close the widget (also one whose construction failed)."""
        if "worker" in vars(self):
            super().close()

    def _check_new_image(self) -> None:
        self.dataset_index.append(self._opening)

    def _check_channel(self, channel: Any) -> int:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise TypeError(f"channel must be an int (a channel index of the layer), got "
                            f"{type(channel).__name__}")
        count = channel_count(self.explainer().context, self.controls["layer"].value)
        if not 0 <= int(channel) < count:
            raise IndexError(f"channel {channel} out of range: layer "
                             f"{self.controls['layer'].value!r} has channels 0..{count - 1}")
        return int(channel)

    def _check_box(self, y0: int, x0: int, y1: int, x1: int) -> tuple[int, int, int, int]:
        height, width = (int(s) for s in self.images.shape[-2:])
        box = tuple(int(v) for v in (y0, x0, y1, x1))
        if not (0 <= box[0] < box[2] <= height and 0 <= box[1] < box[3] <= width):
            raise ValueError(f"box (y0, x0, y1, x1) = {box} is not inside the {height}×{width} "
                             "image with y0 < y1 and x0 < x1 (end exclusive)")
        return box

    # ------------------------------------------------------- browser events
    def _on_bar(self, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds and self.channels is not None:
            channel = int(self.channels.channel.values[points.point_inds[0]])
            self._guarded(lambda: self.select_channel(channel))

    def _on_box(self, trace: Any, points: Any, selector: Any) -> None:
        xs, ys = getattr(selector, "xrange", None), getattr(selector, "yrange", None)
        if xs is None or ys is None:  # a lasso: the points it caught
            if not points.xs:
                return
            xs, ys = (min(points.xs), max(points.xs)), (min(points.ys), max(points.ys))
        height, width = (int(s) for s in self.images.shape[-2:])
        # the pixels whose centres lie in the box (pixel k spans k - 0.5 .. k + 0.5)
        y0, y1 = max(0, int(np.ceil(min(ys)))), min(height, int(np.floor(max(ys))) + 1)
        x0, x1 = max(0, int(np.ceil(min(xs)))), min(width, int(np.floor(max(xs))) + 1)
        if y0 < y1 and x0 < x1:
            self._guarded(lambda: self.select_region(y0, x0, y1, x1))

    # ------------------------------------------------------------ update loop
    def _prepare(self, changed: set[str]) -> None:
        super()._prepare(changed)
        if "mode" in changed:
            set_visible(self.controls["concepts"], self.controls["mode"].value == CONCEPTS)
        if "measure" in changed:  # FEM and activations ignore the class
            self.controls["target"].disabled = ignores_target(self.controls["measure"].value)

    def _needs_compute(self, changed: set[str]) -> bool:
        if changed & {"mode", "concepts"} and self.controls["mode"].value == CHANNELS:
            return bool(changed - VIEW - {"frame", "mode", "concepts"}) or self.result is None
        return super()._needs_compute(changed)

    def _redraw(self, changed: set[str]) -> None:
        if changed & VIEW:
            self.grid.restyle(*self._view_values(changed))
        if changed & {"frame", "mode", "concepts"} or (
                "opacity" in changed and self.controls["mode"].value == CONCEPTS):
            self._draw()

    def _compute(self, changed: set[str]) -> Publish:
        index = self.index
        ex = self.explainer(index)
        layer, measure = self.controls["layer"].value, self.controls["measure"].value
        fresh = bool(changed & FRESH) or self.contributions is None
        options = self._target_options(ex) if "image" in changed else None
        target = options[0][1] if options else self.controls["target"].value
        if ignores_target(measure):
            target = None
        new: dict[str, Any] = {}
        if fresh:
            self._computing(f"{measure} of every channel of {layer}")
            contributions = ex.channels(layer, method=measure, target=target).isel(image=0)
            new["contributions"] = contributions
            new["overall"] = self._map(ex, measure, layer, target)
            new["channels"] = ranked(contributions, self.bars)
            new["region"] = None
            channel = int(new["channels"].channel.values[0])
        else:
            contributions = self.contributions
            channel = self.channel
        if "channel" in changed and self._asked_channel is not None:
            channel = self._asked_channel
            if channel >= contributions.sizes["channel"]:  # picked before a layer change
                channel = int(contributions.channel.values[contributions.argmax()])
        if "region" in changed and self._asked_region is not None:
            box = self._asked_region
            scores = self._region_scores(ex, measure, layer, target, contributions, box)
            new["channels"] = ranked(scores, self.bars).assign_attrs(region=list(box))
            new["region"] = box
            if "channel" not in changed:
                channel = int(new["channels"].channel.values[0])
        if fresh or channel != self.channel or "region" in changed:
            self._computing(f"channel {channel}'s map")
            new["result"] = self._map(ex, measure, layer, target, [channel])
            new["references"], new["usage"] = self._channel_extras(layer, target, channel)
        new["channel"] = channel
        if self.controls["mode"].value == CONCEPTS:
            new["factors"] = self._factorize(layer)

        def publish() -> str:
            if options is not None:
                self._show_targets(options)
            for name, value in new.items():
                setattr(self, name, value)
            self._draw()
            return (f"{measure} · {layer} · channel {channel}"
                    + (f" · box {list(self.region)}" if self.region else ""))
        return publish

    # ------------------------------------------------------------ the engine
    def _map(self, ex: Explainer, measure: str, layer: str, target: int | None,
             channels: Sequence[int] | None = None) -> xr.DataArray:
        """The measure's map of the image: all channels, or only ``channels`` (conditional)."""
        if measure == ACTIVATION:  # the channels' own activations
            return activation_map(ex, layer, channels)
        method = get_method(measure)
        kwargs: dict[str, Any] = {"layer": layer}
        if channels is not None:
            kwargs["channels"] = list(channels)
        if not method.uses_layer and channels is None:
            kwargs.pop("layer")  # the unconditional LRP map does not depend on the layer
        if method.class_agnostic:
            target = None
        return ex.explain(measure, target=target, **kwargs)

    def _region_scores(self, ex: Explainer, measure: str, layer: str, target: int | None,
                       contributions: xr.DataArray, box: tuple[int, int, int, int]
                       ) -> xr.DataArray:
        """Every channel's contribution inside ``box`` (see :meth:`select_region`), all
        channels batched (:func:`xaiwidgets.concepts.regions.box_contributions`)."""
        self._computing(f"{contributions.sizes['channel']} channels in the box")
        scores = box_contributions(ex, layer, box, measure, target=target,
                                   progress=self._report_progress)
        return scores.assign_attrs({**contributions.attrs, "region": list(box)})

    def _channel_extras(self, layer: str, target: int | None, channel: int
                        ) -> tuple[xr.Dataset | None, xr.DataArray | str | None]:
        """The channel's reference patches and class usage (whole-dataset passes, each
        computed once per layer and kept)."""
        if self.source is None:
            return None, "reference patches and class usage need still images"
        by_target = target if self.by == "relevance" else None
        key = (layer, self.by, by_target)
        if key not in self._refs:
            what = f"reference patches of {layer} over {len(self.source)} images"
            self._computing(what)
            self._refs[key] = references(
                self.model, self.dataset, layer, top=self.top, by=self.by, target=by_target,
                preprocess=self.preprocess, store=self.store, batch_size=self.batch_size,
                progress=self._pass_progress(what))
        refs = self._refs[key].sel(channel=channel)
        if layer not in self._usage:
            what = f"class usage of {layer}"
            self._computing(what)
            try:
                self._usage[layer] = class_usage(self.model, self.dataset, layer,
                                                 preprocess=self.preprocess,
                                                 batch_size=self.batch_size,
                                                 progress=self._pass_progress(what))
            except ValueError as err:  # e.g. a dataset without labels: said in the panel
                self._usage[layer] = str(err)
        usage = self._usage[layer]
        return refs, usage if isinstance(usage, str) else usage.sel(channel=channel)

    def _pass_progress(self, what: str) -> Callable[[int, int], None]:
        """A dataset pass's ``progress(done, total)``: the bar and the image count in the
        status line; raises at a stale job's next chunk (Cancel, a newer click)."""
        def report(done: int, total: int) -> None:
            self._computing(what, f"{done}/{total} images")
            self._report_progress(done, total)
        return report

    def _factorize(self, layer: str) -> Any:
        n = int(self.controls["concepts"].value)
        key = (layer, n, len(self.images))
        if key not in self._factors:
            self._computing(f"{n} NMF concepts of {layer}")
            ex = Explainer(self.model, self.images, preprocess=self.preprocess,
                           classes=self.classes, progress=self._report_progress)
            self._factors[key] = factorize(ex, layer=layer, n=n, seed=0)
        return self._factors[key]

    # ---------------------------------------------------------------- drawing
    def _draw(self) -> None:
        if self.result is None:
            return
        index = self.index
        picture = self._picture(index)
        concept_mode = self.controls["mode"].value == CONCEPTS and self.factors is not None
        with self.figure.batch_update():
            self.grid.restyle(self.controls["colormap"].value, self.controls["opacity"].value)
            overall = self.frame_of(self.overall)
            self.grid.show(0, overall.xai.map2d(), image=picture, signed=overall.xai.signed,
                           limits=self._limits(self.overall),
                           title=f"{self.overall.attrs.get('method', 'activation')} · "
                                 f"{self.controls['target'].label or ''}"
                                 if not ignores_target(self.controls["measure"].value)
                                 else f"{self.controls['measure'].value} · all channels")
            if concept_mode:
                self._draw_concept_map(index)
            else:
                conditional = self.frame_of(self.result)
                self.grid.show(1, conditional.xai.map2d(), image=picture,
                               signed=conditional.xai.signed, limits=self._limits(self.result),
                               title=f"channel {self.channel} only")
            self._draw_region()
        if concept_mode:
            self._draw_concept_bars(index)
            self._draw_concept_patches()
        else:
            self._draw_bars()
            self._draw_references()
            self._draw_usage()

    def _draw_region(self) -> None:
        if self.region is None:
            self.figure.layout.shapes = []
            self.figure.layout.selections = []
            return
        y0, x0, y1, x1 = self.region
        self.figure.layout.shapes = [{
            "type": "rect", "xref": "x", "yref": "y", "x0": x0 - 0.5, "x1": x1 - 0.5,
            "y0": y0 - 0.5, "y1": y1 - 0.5, "line": {"color": "#00e5ff", "width": 2}}]

    def _draw_bars(self) -> None:
        channels = self.channels
        labels = [f"ch {k}" for k in channels.channel.values]
        colors = ["#e45756" if k == self.channel else "#4c78a8" for k in channels.channel.values]
        where = (f" in box {list(self.region)}" if self.region else "")
        with self.bar_figure.batch_update():
            bar = self.bar_figure.data[0]
            bar.x, bar.y = labels, channels.values.astype(float).tolist()
            bar.marker.color = colors
            self.bar_figure.layout.title.text = (
                f"top channels of {channels.attrs.get('layer', '')} by "
                f"{self.controls['measure'].value}{where} (click a bar)")

    def _draw_references(self) -> None:
        refs = self.references
        if refs is None:
            self.patches_title.value = ""
            replace_children(self.patches, [])
            return
        self.patches_title.value = (f"<b>channel {self.channel}</b>: its top {refs.sizes['rank']}"
                                    f" patches in the dataset (by {self.by}; a button opens the "
                                    "image)")
        tiles = []
        for rank in range(refs.sizes["rank"]):
            row = refs.isel(rank=rank)
            index = int(row.image)
            if index < 0:  # fewer images than patches asked for
                continue
            box = tuple(int(row[v]) for v in ("y0", "x0", "y1", "x1"))
            tiles.append(self._patch_tile(index, box, f"#{index}",
                                          lambda _, r=rank: self._guarded(
                                              lambda: self.open_reference(r)),
                                          f"{float(row.value):.3g}"))
        replace_children(self.patches, tiles)

    def _patch_tile(self, index: int, box: tuple[int, int, int, int], label: str,
                    click: Callable[[Any], None], tooltip: str, border: str = "#ddd",
                    picked: bool = False) -> W.VBox:
        """A cropped thumbnail over a button; ``index`` is a dataset index, or a position
        in the picker when ``picked``."""
        image = (self.images[index] if picked or self.source is None
                 else self.source.images([index])[0])
        picture = W.Image(value=thumbnail_png(crop_thumbnail(image, box)), format="png",
                          layout=W.Layout(width=f"{PATCH_PX}px", height=f"{PATCH_PX}px"))
        button = W.Button(description=label, tooltip=f"open image {index} ({tooltip})",
                          layout=W.Layout(width=f"{PATCH_PX}px", height="24px"))
        button.on_click(click)
        return W.VBox([picture, button], layout=W.Layout(margin="0 4px 4px 0",
                                                         border=f"2px solid {border}"))

    def _draw_usage(self) -> None:
        usage = self.usage
        if usage is None:
            self.usage_html.value = ""
        elif isinstance(usage, str):
            self.usage_html.value = (f"<i style='color:#555'>class usage: "
                                     f"{html.escape(usage)}</i>")
        else:
            names = [str(c) for c in (usage.class_name.values if "class_name" in usage.coords
                                      else self.classes or usage["class"].values)]
            self.usage_html.value = (f"<b>channel {self.channel}</b> per class (mean relevance "
                                     "over the dataset)" + usage_html(usage.values, names))

    # -------------------------------------------------------------- concepts
    def _draw_concept_map(self, index: int) -> None:
        maps = np.asarray(self.factors.maps.isel(image=index).values, dtype=np.float64)
        composite = concept_overlay(maps, self.image_frame(index),
                                    opacity=0.4 + 0.6 * self.controls["opacity"].value)
        self.grid.image(1).source = image_uri(composite.transpose(2, 0, 1) / 255.0)
        self.grid.heatmap(1).z = None
        self.grid.set_title(1, f"{len(maps)} NMF concepts (colour: the strongest)")

    def _draw_concept_bars(self, index: int) -> None:
        maps = self.factors.maps.isel(image=index)
        strength = maps.sum(("y", "x")).values.astype(float)
        with self.bar_figure.batch_update():
            bar = self.bar_figure.data[0]
            bar.x = [f"concept {j}" for j in range(len(strength))]
            bar.y = strength.tolist()
            bar.marker.color = [_css(CONCEPT_COLORS[j]) for j in range(len(strength))]
            self.bar_figure.layout.title.text = (f"NMF concepts of {self.factors.attrs['layer']}"
                                                 " in this image (summed maps)")

    def _draw_concept_patches(self, per_concept: int = 3) -> None:
        """Each concept's strongest images in the picker, cropped as the references are
        (the box of its map above half the maximum, at the layer's resolution)."""
        small = torch.as_tensor(self.factors.maps_layer.values)  # (image, concept, v, u)
        peaks = small.flatten(2).amax(dim=2)                     # (image, concept)
        self.patches_title.value = ("<b>NMF concepts</b>: each one's strongest patches among "
                                    "the images in the picker (a button opens the image)")
        tiles = []
        for j in range(small.shape[1]):
            best = torch.sort(-peaks[:, j], stable=True).indices[:per_concept].tolist()
            boxes = patch_boxes(small[best, j], self.images.shape[-2:]).tolist()
            for position, box in zip(best, boxes, strict=True):
                tiles.append(self._patch_tile(
                    position, tuple(box), f"c{j} {self.controls['image'].options[position][0]}",
                    lambda _, p=position: setattr(self.controls["image"], "value", p),
                    f"concept {j}", border=_css(CONCEPT_COLORS[j]), picked=True))
        replace_children(self.patches, tiles)

    def _export_sweep(self) -> list[str]:
        """A handout steps through the images and the measures."""
        return ["image", "measure"]

    def _export_figures(self) -> list[Any]:
        return [self.figure, self.bar_figure]

    def _export_html_parts(self) -> list[str]:
        return [self.usage_html.value]

    def _export_panels(self) -> list[tuple[xr.DataArray, Any]]:
        return [(self.overall, self.image_frame()), (self.result, self.image_frame())]


# ---------------------------------------------------------------- helpers
def _open_dataset(dataset: Any, classes: Sequence[str] | None, browse: int
                  ) -> tuple[ImageSource | None, torch.Tensor]:
    """The dataset as an :class:`ImageSource` and its first ``browse`` images; clips
    (an ``xr.Dataset`` or tensor (N, C, T, H, W)) have no source."""
    image = dataset["image"] if isinstance(dataset, xr.Dataset) and "image" in dataset else None
    if image is not None and image.ndim == 5 or torch.is_tensor(dataset) or \
            isinstance(dataset, (np.ndarray, xr.DataArray)):
        clips = as_image_batch(image if image is not None else dataset)
        return None, clips[:browse]
    source = image_source(dataset, classes)
    if len(source) == 0:
        raise ValueError("the dataset has no images")
    return source, source.images(np.arange(min(browse, len(source))))


def ranked(scores: xr.DataArray, top: int) -> xr.DataArray:
    """The ``top`` largest of ``scores`` (dims ``("channel",)``), best first: dims
    ``("rank",)`` with coord ``channel``; ties keep channel order.

    >>> ranked(xr.DataArray([1.0, 3.0, 2.0], dims="channel"), 2).channel.values.tolist()
    [1, 2]
    """
    order = np.argsort(-np.asarray(scores.values, dtype=np.float64), kind="stable")[:top]
    channels = (scores.channel.values if "channel" in scores.coords
                else np.arange(scores.sizes["channel"]))[order]
    return xr.DataArray(np.asarray(scores.values)[order], dims=("rank",),
                        coords={"rank": np.arange(len(order)), "channel": ("rank", channels)},
                        name="contribution", attrs=dict(scores.attrs))


def ignores_target(measure: str) -> bool:
    """Whether a channel measure ignores the class: the activation maximum, or a method
    that declares ``targets = "ignored"`` (FEM).

    >>> ignores_target("fem"), ignores_target("lrp"), ignores_target("activation")
    (True, False, True)
    """
    return measure == ACTIVATION or get_method(measure).class_agnostic


def activation_map(ex: Explainer, layer: str, channels: Sequence[int] | None = None
                   ) -> xr.DataArray:
    """The layer's activation summed over ``channels`` (default: all), upsampled to the
    input and min-max normalised: dims ``("image","y","x")`` (clips: with ``t``)."""
    acts = ex.activations([layer])[layer]
    if acts.ndim != len(ex.size) + 2:
        raise ValueError(f"layer {layer!r} gives {tuple(acts.shape)}: no channel maps; "
                         "pick a convolutional layer (ex.layers())")
    picked = acts if channels is None else acts[:, list(channels)]
    values = minmax(upsample(picked.sum(dim=1).float(), ex.size),
                    tuple(range(-len(ex.size), 0)))
    dims = ("image", "t", "y", "x") if len(ex.size) == 3 else ("image", "y", "x")
    return xr.DataArray(values.cpu().numpy().astype(np.float32), dims=dims,
                        attrs={"method": "activation", "layer": layer, "signed": 0,
                               "channels": list(channels) if channels is not None else []})


def crop_thumbnail(image: Any, box: tuple[int, int, int, int], px: int = PATCH_PX
                   ) -> np.ndarray:
    """The patch ``box`` (y0, x0, y1, x1) of ``image`` (C,H,W) as RGB uint8 (px, px, 3),
    enlarged by pixel repetition (patches stay sharp)."""
    y0, x0, y1, x1 = box
    rgb = np.round(rendering.display_image(image) * 255).astype(np.uint8)[y0:y1, x0:x1]
    rows = np.minimum(np.arange(px) * rgb.shape[0] // px, rgb.shape[0] - 1)
    cols = np.minimum(np.arange(px) * rgb.shape[1] // px, rgb.shape[1] - 1)
    return rgb[rows][:, cols]


def concept_overlay(maps: np.ndarray, image: Any, opacity: float = 0.65) -> np.ndarray:
    """NMF concept maps (n, H, W) over ``image``: each pixel takes the colour of its
    strongest concept, as opaque as the square root of its strength relative to the
    maximum (weak concepts stay visible). RGB uint8 (H, W, 3)."""
    rgb = rendering.display_image(image) * 255.0
    strongest = maps.argmax(axis=0)
    strength = maps.max(axis=0)
    strength = strength / strength.max() if strength.max() > 0 else strength
    colours = np.asarray(CONCEPT_COLORS, dtype=np.float64)[strongest % len(CONCEPT_COLORS)]
    alpha = (opacity * np.sqrt(strength))[..., None]
    return np.round(rgb * (1 - alpha) + colours * alpha).astype(np.uint8)


def usage_html(values: np.ndarray, names: Sequence[str], top: int = 6) -> str:
    """Signed horizontal bars (HTML) of the ``top`` largest ``values``, named.

    >>> "width:100.0%" in usage_html(np.array([2.0, -1.0]), ["a", "b"])
    True
    """
    values = np.asarray(values, dtype=np.float64)
    scale = float(np.abs(values).max()) or 1.0
    rows = []
    for k in np.argsort(-values, kind="stable")[:top]:
        colour = "#4c78a8" if values[k] >= 0 else "#e45756"
        rows.append(
            "<div style='display:flex;align-items:center;font-size:12px;line-height:18px'>"
            f"<span style='width:110px;overflow:hidden;text-overflow:ellipsis;"
            f"white-space:nowrap' title='{html.escape(names[k])}'>{html.escape(names[k])}</span>"
            "<span style='flex:1;background:#eee;height:12px;margin:0 4px'>"
            f"<span style='display:block;height:12px;background:{colour};"
            f"width:{100 * abs(values[k]) / scale:.1f}%'></span></span>"
            f"<span style='width:64px;text-align:right'>{values[k]:.3g}</span></div>")
    return "<div title='mean relevance per class'>" + "".join(rows) + "</div>"


def _css(rgb: tuple[int, int, int]) -> str:
    return "rgb({},{},{})".format(*rgb)
