"""What every widget shares: images and their explainers, controls, one update loop.

State lives in the controls (``w.controls[name].value``); every change goes
through :meth:`ExplorerBase._apply`, which calls the subclass's ``_update(changed)``
synchronously (so code and tests see the new ``w.result`` at once), shows errors
inline and keeps the widget usable. Changes made while computing, or inside
``with w.hold():``, are gathered into one update.
"""

from __future__ import annotations

import contextlib
import html
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import torch
import xarray as xr

from .. import rendering
from ..explainer import Explainer, as_image_batch
from .controls import LAYOUT, STYLE, set_visible

#: controls that only restyle the figure (never recompute an explanation)
VIEW = frozenset({"opacity", "colormap"})
#: explainers (with their cached activations) kept for the most recently shown images
KEEP_EXPLAINERS = 8


class ExplorerBase(W.VBox):
    """Base of the widgets: holds the images, one cached :class:`Explainer` per image,
    the controls and the status line. Subclasses build their controls and figures and
    implement ``_update(changed: set[str])``.
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.classes = list(classes) if classes is not None else None
        self.images = as_image_batch(images)
        self._explainers: OrderedDict[int, Explainer] = OrderedDict()
        self.controls: dict[str, W.ValueWidget] = {}
        self.result: xr.DataArray | None = None
        #: the last error shown inline ("Type: message"), ``None`` after a successful update
        self.error: str | None = None
        #: seconds taken by the last recomputation (not counting restyles)
        self.last_compute_s: float = 0.0
        self._quiet = 0
        self._held = 0
        self._pending: set[str] = set()
        self.status = W.HTML(layout=W.Layout(min_height="1.6em"))
        self.progress = W.FloatProgress(min=0.0, max=1.0, description="computing",
                                        style=STYLE, layout=W.Layout(**LAYOUT))
        set_visible(self.progress, False)
        self.explainer()  # fail now, not at the first click, on a bad model/images pair

    # ------------------------------------------------------------- explainers
    @property
    def index(self) -> int:
        """The current image's index."""
        return int(self.controls["image"].value) if "image" in self.controls else 0

    def explainer(self, index: int | None = None) -> Explainer:
        """The cached :class:`Explainer` of one image (default: the current one)."""
        index = self.index if index is None else int(index)
        if index not in self._explainers:
            self._explainers[index] = Explainer(
                self.model, self.images[index:index + 1], preprocess=self.preprocess,
                classes=self.classes, progress=self._report_progress)
            while len(self._explainers) > KEEP_EXPLAINERS:  # bound the cached activations
                self._explainers.popitem(last=False)
        self._explainers.move_to_end(index)
        return self._explainers[index]

    def add_image(self, image: Any, label: str = "uploaded") -> int:
        """Append an image (3,H,W) in [0, 1], the size of the others; select it, return its index.

        Uploaded pictures go through :func:`xaiwidgets.rendering.read_image` first (resized).
        """
        image = as_image_batch(torch.as_tensor(np.asarray(image, dtype=np.float32)))
        if image.shape[-2:] != self.images.shape[-2:]:
            raise ValueError(f"the image is {tuple(image.shape[-2:])}, the others "
                             f"{tuple(self.images.shape[-2:])}: resize it first")
        image = image.to(self.images.device, self.images.dtype)
        self.images = torch.cat([self.images, image])
        index = len(self.images) - 1
        control = self.controls["image"]
        control.options = [*control.options, (f"{index}: {label}", index)]
        control.value = index
        return index

    # ---------------------------------------------------------------- controls
    def _add_controls(self, controls: dict[str, W.ValueWidget]) -> None:
        for name, control in controls.items():
            self.controls[name] = control
            control.observe(lambda change, name=name: self._on_value(name), names="value")

    def _image_control(self) -> W.Dropdown:
        options = [(f"image {i}", i) for i in range(len(self.images))]
        return W.Dropdown(options=options, value=0, description="image", style=STYLE,
                          layout=W.Layout(**LAYOUT))

    def _target_control(self) -> W.Dropdown:
        return W.Dropdown(options=self._target_options(), description="class", style=STYLE,
                          layout=W.Layout(**LAYOUT),
                          tooltip="class to explain: predictions, most probable first")

    def _target_options(self) -> list[tuple[str, int]]:
        """Every class, most probable first, labelled with its probability."""
        ex = self.explainer()
        probs = ex.predict(top=ex.num_classes)
        labels = probs.label.values[0]
        names = probs.class_name.values[0] if "class_name" in probs.coords else labels
        return [(f"{name} ({p:.1%})" if str(name) != str(k) else f"class {k} ({p:.1%})", int(k))
                for name, k, p in zip(names, labels, probs.values[0], strict=True)]

    def _sync_targets(self) -> None:
        """New image: new predictions; select its top class."""
        options = self._target_options()
        with self._silenced():
            self.controls["target"].options = options
            self.controls["target"].value = options[0][1]

    def _view_controls(self) -> dict[str, W.ValueWidget]:
        return {
            "opacity": W.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05,
                                     description="opacity", style=STYLE,
                                     layout=W.Layout(**LAYOUT)),
            "colormap": W.Dropdown(options=list(rendering.COLORMAPS), value="auto",
                                   description="colormap", style=STYLE,
                                   layout=W.Layout(**LAYOUT),
                                   tooltip="auto: inferno, or RdBu_r centred at 0 for signed maps"),
        }

    def _upload_control(self) -> W.FileUpload:
        upload = W.FileUpload(accept="image/*", multiple=False, description="your image")
        upload.observe(self._on_upload, names="value")
        return upload

    def _on_upload(self, change: dict) -> None:
        for item in change["new"]:
            try:
                image = rendering.read_image(bytes(item["content"]), self.explainer().size)
                self.add_image(image, label=item.get("name", "uploaded"))
            except Exception as err:  # a bad file must not break the widget
                self._show_error(err)

    def _export_controls(self) -> W.HBox:
        name = W.Text(value="explanation", description="save as", style=STYLE,
                      layout=W.Layout(width="260px"))
        png = W.Button(description="PNG", icon="download", layout=W.Layout(width="90px"))
        nc = W.Button(description="netCDF", icon="download", layout=W.Layout(width="90px"))
        png.on_click(lambda _: self._guarded(lambda: self.save_png(f"{name.value}.png")))
        nc.on_click(lambda _: self._guarded(lambda: self.save_netcdf(f"{name.value}.nc")))
        return W.HBox([name, png, nc])

    def _box(self, names: Sequence[str]) -> W.VBox:
        return W.VBox([self.controls[n] for n in names if n in self.controls])

    # ------------------------------------------------------------ update loop
    @contextlib.contextmanager
    def _silenced(self) -> Iterator[None]:
        """Changes made by the widget itself (re-ranging, new options) are not user edits."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    @contextlib.contextmanager
    def hold(self) -> Iterator[ExplorerBase]:
        """Gather several control changes into one update::

            with w.hold():
                w.controls["method"].value = "lrp"
                w.controls["composite"].value = "epsilon"
        """
        self._held += 1
        try:
            yield self
        finally:
            self._held -= 1
            if not self._held and self._pending:
                changed, self._pending = self._pending, set()
                self._apply(changed)

    def _on_value(self, name: str) -> None:
        if self._quiet:
            return
        if self._held:
            self._pending.add(name)
            return
        self._apply({name})

    def _apply(self, changed: set[str]) -> None:
        self._held += 1  # edits made while updating join the next round
        try:
            while changed:
                self._guarded(lambda todo=changed: self._timed_update(todo))
                changed, self._pending = self._pending, set()
        finally:
            self._held -= 1

    def _timed_update(self, changed: set[str]) -> None:
        start = time.perf_counter()
        recomputed = self._update(changed)
        if recomputed:  # a restyle keeps the last message (errors included)
            self.error = None
            self.last_compute_s = time.perf_counter() - start
            self.status.value = (f"<span style='color:#555'>{html.escape(recomputed)} in "
                                 f"{self.last_compute_s:.2f} s</span>")

    def refresh(self) -> None:
        """Recompute everything from the controls' current values (as for a new image)."""
        self._apply({"image", "method"} & set(self.controls))

    def _update(self, changed: set[str]) -> str | None:  # pragma: no cover - abstract
        """Recompute what ``changed`` affects and redraw; return a short description of
        what was recomputed (shown in the status line) or ``None`` for a restyle."""
        raise NotImplementedError

    def _guarded(self, action: Callable[[], Any]) -> None:
        """Run ``action``; an exception is shown in the status line, not raised."""
        try:
            action()
        except Exception as err:
            self._show_error(err)
        finally:
            set_visible(self.progress, False)

    def _show_error(self, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {err}"
        self.status.value = (f"<b style='color:#b00020'>{type(err).__name__}:</b> "
                             f"<span style='color:#b00020'>{html.escape(str(err))}</span>")

    def _report_progress(self, done: int, total: int) -> None:
        set_visible(self.progress, True)
        self.progress.value = done / max(total, 1)

    def _computing(self, what: str) -> None:
        self.status.value = f"<span style='color:#555'>computing {html.escape(what)}…</span>"

    # ------------------------------------------------------------------ export
    def _export_panels(self) -> list[tuple[xr.DataArray, Any]]:
        """The (map, image) pairs a PNG export shows, left to right."""
        return [(self.result, self.images[self.index])]

    def save_png(self, path: str | Path) -> Path:
        """The current map(s) over the image, as shown (colormap, opacity), to a PNG file."""
        if self.result is None:
            raise RuntimeError("nothing to save yet: the explanation has not been computed")
        colormap, opacity = self.controls["colormap"].value, self.controls["opacity"].value
        tiles = [da.xai.overlay(image, colormap=colormap, opacity=opacity)
                 for da, image in self._export_panels()]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
        row = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
        path = Path(path)
        path.write_bytes(rendering.png_bytes(row))
        self.status.value = f"saved {html.escape(str(path))}"
        return path

    def save_netcdf(self, path: str | Path) -> Path:
        """``w.result`` (values and every parameter in attrs) to a netCDF file."""
        if self.result is None:
            raise RuntimeError("nothing to save yet: the explanation has not been computed")
        path = Path(path)
        self.result.to_netcdf(path, engine=netcdf_engine())
        self.status.value = f"saved {html.escape(str(path))}"
        return path


def netcdf_engine() -> str:
    """h5netcdf when installed (netCDF4 format), else scipy (netCDF3, always there)."""
    try:
        import h5netcdf  # noqa: F401
    except ImportError:
        return "scipy"
    return "h5netcdf"
