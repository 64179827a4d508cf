"""What every widget shares: images and their explainers, controls, one update loop.

State lives in the controls (``w.controls[name].value``). A change goes through
three steps:

1. ``_prepare(changed)`` – in the caller's thread, at once: show/hide controls;
2. ``_compute(changed)`` – the slow part (engine calls), in a background
   :class:`~xaiwidgets.widgets.worker.Worker` when ``background=True`` (the default
   inside a running kernel), else before the change returns (scripts, tests);
   it returns a ``publish()`` that stores the results and draws them;
3. ``publish()`` – run only if no newer change came meanwhile (a stale result
   is never drawn; the stale computation already stopped at its next chunk).

Changes that only restyle (``opacity``, ``colormap``) never start a computation:
they redraw at once. So does the ``frame`` of a video clip (N, C, T, H, W): clips get
a ``frame`` slider linked in the browser to an ``ipywidgets.Play`` (``w.play``), and a
frame change puts that frame of the stored maps and of the clip into the existing
traces (no model call, no recomputation). Errors show inline (``w.error``) and the
widget keeps working. ``with w.hold():`` gathers several changes into one update;
``w.wait()`` blocks until the latest requested result is drawn; ``w.cancel()`` (the
Cancel button) stops the running computation.
"""

from __future__ import annotations

import base64
import contextlib
import html
import tempfile
import threading
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
from ..core.inputs import as_image_batch
from ..core.registry import get_method, methods
from ..datasets.photos import read_image
from ..explainer import Explainer
from .controls import LAYOUT, STYLE, set_visible
from .export import Exportable
from .figures import image_uri
from .lifecycle import Closable
from .worker import Superseded, Token, Worker, in_kernel

#: controls that only restyle the figure (never recompute an explanation)
VIEW = frozenset({"opacity", "colormap"})
#: controls that only redraw from the stored results: the view and a clip's frame
REDRAW = VIEW | {"frame"}
#: milliseconds per frame while Play runs (in the browser)
PLAY_INTERVAL_MS = 500
#: explainers (with their cached activations) kept for the most recently shown images
KEEP_EXPLAINERS = 8
#: in the background, samples per model call are capped so a newer change stops the
#: running computation quickly and first estimates come early
BACKGROUND_BATCH = 8
#: side of the image picker's thumbnails (px)
THUMB_PX = 56
#: width of the controls column (px): every control fits, nothing is clipped
SIDE_PX = 400

Publish = Callable[[], "str | None"]


class BackgroundUpdates(Closable):
    """The update-loop pieces every widget shares (mixed in before ``W.VBox``): silencing
    the widget's own control changes (per thread), showing errors inline, and the
    busy / wait / cancel / close of its background :class:`Worker`.

    The widget sets ``worker``, ``status`` (``W.HTML``) and ``error`` in its
    ``__init__``; :meth:`_hide_busy` hides its progress display.

    >>> class Quiet(BackgroundUpdates, W.VBox): pass
    >>> q = Quiet(); q.status, q.error = W.HTML(), None
    >>> q._guarded(lambda: 1 / 0); q.error
    'ZeroDivisionError: division by zero'
    """

    #: the status line after a cancel (the drawn result stays)
    CANCELLED = "cancelled: the map shown is the last one computed"
    worker: Worker
    status: W.HTML
    error: str | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls = threading.local()  # per thread: silenced / held / pending changes

    def _state(self) -> threading.local:
        tls = self._tls
        if not hasattr(tls, "quiet"):
            tls.quiet, tls.held, tls.pending = 0, 0, set()
        return tls

    @contextlib.contextmanager
    def _silenced(self) -> Iterator[None]:
        """Changes made by the widget itself (re-ranging, new options) are not user edits.

        Per thread: a user's click while the worker re-ranges a control still counts.
        """
        state = self._state()
        state.quiet += 1
        try:
            yield
        finally:
            state.quiet -= 1

    @property
    def busy(self) -> bool:
        """True while a computation runs or waits to run."""
        return self.worker.busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the latest requested result is drawn.

        Returns False when ``timeout`` seconds passed first.
        """
        return self.worker.wait(timeout)

    def cancel(self) -> bool:
        """Stop the running computation at its next chunk (what is drawn stays).

        The cancelled change is kept: the next change computes it too. Returns True
        when something was running.
        """
        with self.worker.lock:
            active = self.worker.cancel()
            if active:
                self._hide_busy()
                self.status.value = f"<span style='color:#555'>{html.escape(self.CANCELLED)}</span>"
            return active

    def _hide_busy(self) -> None:
        """Hide the progress display (subclasses: their own widgets)."""

    def close(self) -> None:
        """Stop the worker, then close the widget and every ipywidget it made and free
        its caches (:class:`~xaiwidgets.widgets.lifecycle.Closable`)."""
        if "worker" in vars(self):
            self.worker.close()
        super().close()

    def _guarded(self, action: Callable[[], Any]) -> None:
        """Run ``action``; an exception is shown in the status line, not raised
        (:class:`Superseded` is: the worker ends the stale job with it)."""
        try:
            action()
        except Superseded:
            raise
        except Exception as err:
            self._show_error(err)

    def _show_error(self, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {err}"
        self.status.value = (f"<b style='color:#b00020'>{type(err).__name__}:</b> "
                             f"<span style='color:#b00020'>{html.escape(str(err))}</span>")


class ExplorerBase(BackgroundUpdates, Exportable, W.VBox):
    """Base of the widgets: holds the images, one cached :class:`Explainer` per image,
    the controls, the status line, the background worker and the exports (PNG,
    netCDF, and :meth:`~xaiwidgets.widgets.export.Exportable.export_html`
    handouts). Subclasses build their controls and figures and implement
    ``_compute(changed) -> publish``.

    ``background``: ``None`` (default) computes in a background thread inside a
    running Jupyter kernel and synchronously in plain Python.
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, background: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.classes = list(classes) if classes is not None else None
        if isinstance(images, xr.Dataset):  # e.g. xw.datasets.moving_shapes(...)
            if "image" not in images.variables:
                raise ValueError("the Dataset has no 'image' variable; pass "
                                 "ds['your_variable'] (N,C,H,W) or (N,C,T,H,W) instead")
            images = images["image"]
        self.images = as_image_batch(images)
        #: True when the images are video clips (N, C, T, H, W)
        self.is_clip = self.images.ndim == 5
        #: the Play control of a clip's ``frame`` slider (``None`` for still images)
        self.play: W.Play | None = None
        self._frame_uris: dict[tuple[int, int], str] = {}  # (image, frame) -> PNG URI
        self.background = in_kernel() if background is None else bool(background)
        self.worker = Worker(self.background, name=f"xaiwidgets-{type(self).__name__}")
        self._explainers: OrderedDict[int, Explainer] = OrderedDict()
        self._explainers_lock = threading.RLock()
        self.controls: dict[str, W.ValueWidget] = {}
        #: the last complete result drawn (first estimates are drawn but not stored here)
        self.result: xr.DataArray | None = None
        #: the last error shown inline ("Type: message"), ``None`` after a successful update
        self.error: str | None = None
        #: seconds taken by the last recomputation (not counting restyles)
        self.last_compute_s: float = 0.0
        self._todo: set[str] = set()   # changes not yet drawn (guarded by worker.lock)
        #: True until the user picks a layer: each method then uses its own default
        #: layer (FEM's is after the activation), and the ``layer`` control shows it
        self.layer_is_default = True
        self.status = W.HTML(layout=W.Layout(min_height="1.6em"))
        self.progress = W.FloatProgress(min=0.0, max=1.0, description="computing",
                                        style=STYLE, layout=W.Layout(width="290px"))
        self.cancel_button = W.Button(description="Cancel", icon="stop",
                                      tooltip="stop the running computation",
                                      layout=W.Layout(width="90px"))
        self.cancel_button.on_click(lambda _: self.cancel())
        self.busy_box = W.HBox([self.progress, self.cancel_button])
        set_visible(self.busy_box, False)
        set_visible(self.progress, False)
        self.top5 = W.HTML(layout=W.Layout(width="300px", margin="0 0 0 8px"))
        # many uploads wrap into rows inside the column (then scroll), never widen it
        self.thumbnails = W.HBox(layout=W.Layout(
            flex_flow="row wrap", width=f"{SIDE_PX}px", max_width="100%",
            max_height=f"{2 * (THUMB_PX + 32)}px", overflow="hidden auto"))
        self.download_link = W.HTML()
        self._javascript = W.Output(layout=W.Layout(height="0px", overflow="hidden"))
        self.explainer()  # fail now, not at the first click, on a bad model/images pair

    # ------------------------------------------------------------- explainers
    @property
    def index(self) -> int:
        """The current image's index."""
        return int(self.controls["image"].value) if "image" in self.controls else 0

    def release(self) -> None:
        """Drop the cached Explainers (activations, kept graphs) and frame images."""
        with self._explainers_lock:
            self._explainers.clear()
        self._frame_uris.clear()

    def explainer(self, index: int | None = None) -> Explainer:
        """The cached :class:`Explainer` of one image (default: the current one)."""
        index = self.index if index is None else int(index)
        with self._explainers_lock:
            if index not in self._explainers:
                self._explainers[index] = self._new_explainer(self.images[index:index + 1])
                while len(self._explainers) > KEEP_EXPLAINERS:  # bound the cached activations
                    self._explainers.popitem(last=False)
            self._explainers.move_to_end(index)
            return self._explainers[index]

    def _new_explainer(self, image: torch.Tensor) -> Explainer:
        return Explainer(self.model, image, preprocess=self.preprocess, classes=self.classes,
                         progress=self._report_progress)

    def add_image(self, image: Any, label: str = "uploaded") -> int:
        """Append an image (3,H,W) in [0, 1], the size of the others; select it, return its index.

        Everything is checked first: a wrong size, range or dtype raises and leaves
        the widget as it was. Uploads go through :func:`xaiwidgets.datasets.read_image`.
        """
        try:
            array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        except Exception as err:
            raise TypeError(f"the image must be an array (3,H,W) of floats in [0, 1]; "
                            f"got {type(image).__name__}") from err
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"the image has dtype {array.dtype}; pass floats in [0, 1], "
                            "e.g. image.astype('float32') / 255 for uint8 pictures")
        tensor = torch.as_tensor(array, dtype=torch.float32)
        if self.is_clip:  # one clip (C,T,H,W)
            if tensor.ndim != 4:
                raise ValueError(f"this widget shows video clips: add one clip (C,T,H,W) at a "
                                 f"time; got shape {tuple(tensor.shape)}")
            tensor = tensor[None]
        batch = as_image_batch(tensor, name="the clip" if self.is_clip else "the image")
        if len(batch) != 1:
            raise ValueError(f"add one image (3,H,W) at a time; got {len(batch)}")
        if batch.shape[1] != self.images.shape[1]:
            raise ValueError(f"the image has {batch.shape[1]} channels, the others "
                             f"{self.images.shape[1]}: convert it first")
        if batch.shape[2:] != self.images.shape[2:]:
            raise ValueError(f"the image is {tuple(batch.shape[2:])}, the others "
                             f"{tuple(self.images.shape[2:])}: resize it first "
                             "(xaiwidgets.datasets.read_image does)")
        batch = batch.to(self.images.device, self.images.dtype)
        explainer = self._new_explainer(batch)  # checks the range and the model pairing
        self._check_new_image()
        with self.worker.lock:
            self.images = torch.cat([self.images, batch])
            index = len(self.images) - 1
            with self._explainers_lock:
                self._explainers[index] = explainer
            control = self.controls["image"]
            with self._silenced():
                control.options = [*control.options, (f"{index}: {label}", index)]
            self._sync_thumbnails()
        control.value = index
        return index

    def _check_new_image(self) -> None:
        """Subclasses refuse added images here (before any state changes)."""

    # ---------------------------------------------------------------- controls
    def _add_controls(self, controls: dict[str, W.ValueWidget]) -> None:
        for name, control in controls.items():
            self.controls[name] = control
            control.observe(lambda change, name=name: self._on_value(name), names="value")

    def _image_control(self) -> W.Dropdown:
        options = [(f"image {i}", i) for i in range(len(self.images))]
        return W.Dropdown(options=options, value=0, description="image", style=STYLE,
                          layout=W.Layout(**LAYOUT))

    def _image_picker(self) -> W.VBox:
        """The image dropdown above a strip of clickable thumbnails."""
        self._sync_thumbnails()
        return W.VBox([self.controls["image"], self.thumbnails])

    def _sync_thumbnails(self) -> None:
        """One thumbnail per image (new ones added); the current one highlighted."""
        tiles = list(self.thumbnails.children)
        for i in range(len(tiles), len(self.images)):
            still = self.images[i:i + 1, :, 0] if self.is_clip else self.images[i:i + 1]
            small = torch.nn.functional.interpolate(still.float(),
                                                    size=(THUMB_PX, THUMB_PX), mode="area")[0]
            rgb = np.round(rendering.display_image(small) * 255).astype(np.uint8)
            picture = W.Image(value=rendering.png_bytes(rgb), format="png",
                              layout=W.Layout(width=f"{THUMB_PX}px", height=f"{THUMB_PX}px"))
            button = W.Button(description=str(i), tooltip=f"show image {i}",
                              layout=W.Layout(width=f"{THUMB_PX}px", height="24px"))
            button.on_click(lambda _, i=i: setattr(self.controls["image"], "value", i))
            tiles.append(W.VBox([picture, button], layout=W.Layout(margin="0 4px 0 0")))
        if len(tiles) != len(self.thumbnails.children):
            self.thumbnails.children = tiles
        current = self.index if "image" in self.controls else 0
        for i, tile in enumerate(tiles):
            tile.children[1].button_style = "info" if i == current else ""

    def _target_control(self) -> W.Dropdown:
        return W.Dropdown(options=self._target_options(self.explainer()), description="class",
                          style=STYLE, layout=W.Layout(**LAYOUT),
                          tooltip="class to explain: predictions, most probable first")

    def _target_options(self, ex: Explainer) -> list[tuple[str, int]]:
        """Every class, most probable first, labelled with its probability."""
        probs = ex.predict(top=ex.num_classes)
        labels = probs.label.values[0]
        names = probs.class_name.values[0] if "class_name" in probs.coords else labels
        return [(f"{name} ({p:.1%})" if str(name) != str(k) else f"class {k} ({p:.1%})", int(k))
                for name, k, p in zip(names, labels, probs.values[0], strict=True)]

    def _show_targets(self, options: list[tuple[str, int]]) -> None:
        """New image: its predictions in the class picker (top class selected) and the chart."""
        with self._silenced():
            self.controls["target"].options = options
            self.controls["target"].value = options[0][1]
        self.top5.value = top5_html(options)

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
        """Upload a picture (hidden for clips: ``add_image`` takes a clip from code)."""
        upload = W.FileUpload(accept="image/*", multiple=False, description="your image")
        upload.observe(self._on_upload, names="value")
        set_visible(upload, not self.is_clip)
        #: the upload button (an app with one upload for several widgets hides it)
        self.upload = upload
        return upload

    # ------------------------------------------------------------------ clips
    def _frame_controls(self) -> dict[str, W.ValueWidget]:
        """Clips: the ``frame`` slider (and ``self.play``, linked to it in the browser by
        ``jslink``: playing needs no kernel round trip to advance); stills: none."""
        if not self.is_clip:
            return {}
        last = int(self.images.shape[2]) - 1
        slider = W.IntSlider(value=0, min=0, max=last, step=1, description="frame",
                             continuous_update=True, style={"description_width": "45px"},
                             layout=W.Layout(width="250px"))
        self.play = W.Play(value=0, min=0, max=last, step=1, interval=PLAY_INTERVAL_MS,
                           repeat=True, tooltip="play the clip",
                           layout=W.Layout(width="136px", flex="0 0 auto"))
        self._frame_link = W.jslink((self.play, "value"), (slider, "value"))
        return {"frame": slider}

    def _frame_row(self) -> list[W.Widget]:
        """The Play button beside the frame slider, for the controls column (stills: [])."""
        return [W.HBox([self.play, self.controls["frame"]])] if self.play is not None else []

    @property
    def frame(self) -> int:
        """The frame shown (0 for still images)."""
        return int(self.controls["frame"].value) if "frame" in self.controls else 0

    def frame_of(self, da: xr.DataArray) -> xr.DataArray:
        """``da`` at the frame shown when it has a ``t`` dim (unchanged otherwise).

        >>> w.frame_of(w.result).dims                                   # doctest: +SKIP
        ('image', 'y', 'x')
        """
        return da.isel(t=min(self.frame, da.sizes["t"] - 1)) if "t" in da.dims else da

    def image_frame(self, index: int | None = None) -> torch.Tensor:
        """Image ``index`` (default: the current one), at the frame shown for clips: (C,H,W)."""
        image = self.images[self.index if index is None else int(index)]
        return image[:, self.frame] if self.is_clip else image

    def _picture(self, index: int) -> str:
        """Image ``index`` (at the frame shown) as a PNG data URI, cached per frame."""
        key = (int(index), self.frame)
        if key not in self._frame_uris:
            if len(self._frame_uris) >= 4 * self.images.shape[2 if self.is_clip else 0]:
                self._frame_uris.clear()  # a few clips' frames at most
            self._frame_uris[key] = image_uri(self.image_frame(index))
        return self._frame_uris[key]

    @staticmethod
    def _limits(da: xr.DataArray, signed: bool | None = None) -> tuple[float, float] | None:
        """Colour limits of a clip's whole volume (frames compare: a faint frame looks faint),
        ``None`` for a still map (its own limits)."""
        if "t" not in da.dims:
            return None
        return rendering.color_limits(da.values, da.xai.signed if signed is None else signed)

    def _usable_on_clips(self, names: Sequence[str], asked: Sequence[str] = ()) -> list[str]:
        """``names`` without the methods that refuse clips (stills: all). A refused method
        in ``asked`` (named by the user) raises the engine's reason instead."""
        if not self.is_clip:
            return list(names)
        def usable(candidates: Sequence[str]) -> list[str]:
            return [n for n in candidates if not get_method(n).clip_refusal]

        for name in asked:
            reason = get_method(name).clip_refusal
            if reason:
                raise ValueError(f"method {name!r} does not support video clips (N,C,T,H,W): "
                                 f"{reason}; on clips choose among {usable(methods())}")
        if not usable(names):
            raise ValueError(f"none of the methods {list(names)} supports video clips; "
                             f"on clips choose among {usable(methods())}")
        return usable(names)

    def _on_upload(self, change: dict) -> None:
        owner = change.get("owner")
        if change["new"] and owner is not None:  # emptied first: the same file again is
            owner.value = ()                      # a change (read again)
        for item in change["new"]:
            name = item.get("name", "uploaded")
            try:
                image = read_image(bytes(item["content"]), self.explainer().size, name=name)
                self.add_image(image, label=name)
            except Exception as err:  # a bad file must not break the widget
                self._show_error(err)

    def _export_controls(self) -> W.VBox:
        self.save_name = W.Text(value="explanation", description="save as",
                                style={"description_width": "60px"},
                                layout=W.Layout(width="200px"))
        png = W.Button(description="PNG", icon="download", layout=W.Layout(width="80px"),
                       tooltip="download the picture as shown")
        nc = W.Button(description="netCDF", icon="download", layout=W.Layout(width="90px"),
                      tooltip="download the map with every parameter (xarray)")
        png.on_click(lambda _: self._guarded(lambda: self.download("png")))
        nc.on_click(lambda _: self._guarded(lambda: self.download("netcdf")))
        return W.VBox([W.HBox([self.save_name, png, nc]), self.download_link, self._javascript])

    def _side(self, children: Sequence[W.Widget]) -> W.VBox:
        """The controls column: fixed width, never squeezed by the figure beside it."""
        return W.VBox(list(children), layout=W.Layout(width=f"{SIDE_PX}px",
                                                      min_width=f"{SIDE_PX}px",
                                                      flex="0 0 auto"))

    @staticmethod
    def _row(children: Sequence[W.Widget]) -> W.HBox:
        """A row that wraps on narrow screens instead of clipping."""
        return W.HBox(list(children), layout=W.Layout(flex_flow="row wrap",
                                                      align_items="flex-start"))

    def _box(self, names: Sequence[str]) -> W.VBox:
        return W.VBox([self.controls[n] for n in names if n in self.controls])

    # ------------------------------------------------------------ update loop
    @contextlib.contextmanager
    def hold(self) -> Iterator[ExplorerBase]:
        """Gather several control changes into one update::

            with w.hold():
                w.controls["method"].value = "lrp"
                w.controls["composite"].value = "epsilon"
        """
        state = self._state()
        state.held += 1
        try:
            yield self
        finally:
            state.held -= 1
            self._flush(state)

    def _flush(self, state: threading.local) -> None:
        """Once no hold is left (``state.held`` 0), request the changes gathered meanwhile."""
        if not state.held and state.pending:
            changed, state.pending = state.pending, set()
            self._request(changed)

    def _on_value(self, name: str) -> None:
        state = self._state()
        if state.quiet:
            return
        if state.held:
            state.pending.add(name)
            return
        self._request({name})

    def _request(self, changed: set[str]) -> None:
        """Prepare at once; redraw a restyle at once; hand computations to the worker."""
        state = self._state()
        with self.worker.lock:
            try:
                self._prepare(changed)
            except Exception as err:
                self._show_error(err)
                return
            if not self._needs_compute(changed):
                if self.result is not None:  # else the pending computation draws it
                    self._guarded(lambda: self._redraw(changed))
                return
            self._todo |= changed
        state.held += 1  # synchronous jobs: edits made while computing join the next round
        try:
            self.worker.submit(self._job)
        finally:
            state.held -= 1
        self._flush(state)

    def _job(self, token: Token) -> None:
        """One computation of everything changed since the last drawn result."""
        with self.worker.lock:
            changed = set(self._todo)
        if not changed:
            return
        start = time.perf_counter()
        set_visible(self.busy_box, self.background)
        try:
            publish = self._compute(changed)
            with self.worker.publishing(token):
                recomputed = publish()
                self._todo -= changed
                self._succeeded(recomputed, time.perf_counter() - start)
            self._after_draw(token)
        except Superseded:
            raise
        except Exception as err:
            with self.worker.publishing(token):
                self._todo -= changed
                self._show_error(err)
        finally:
            with self.worker.lock:
                if not token.stale:
                    set_visible(self.busy_box, False)
                    set_visible(self.progress, False)

    def _succeeded(self, recomputed: str | None, seconds: float) -> None:
        if recomputed:  # a restyle keeps the last message (errors included)
            self.error = None
            self.last_compute_s = seconds
            self.status.value = (f"<span style='color:#555'>{html.escape(recomputed)} in "
                                 f"{seconds:.2f} s</span>")

    def _after_draw(self, token: Token) -> None:
        """Slow extras computed once the result is drawn (live scores); default none."""

    def refresh(self) -> None:
        """Recompute everything from the controls' current values (as for a new image)."""
        self._request({"image", "method"} & set(self.controls))

    def _prepare(self, changed: set[str]) -> None:
        """Instant, in the caller's thread: show/hide controls for the change."""
        if "image" in changed:
            self._sync_thumbnails()
        if "layer" in changed:
            self.layer_is_default = False

    def _layer_for(self, method: Any, ex: Explainer) -> str | None:
        """The ``layer`` argument for ``method``: ``None`` for a method without a layer,
        the method's own default while the user has not picked one (it may run the
        model: call it from ``_compute``), else the ``layer`` control's value."""
        if not method.uses_layer:
            return None
        if self.layer_is_default:
            return method.default_layer(ex.context) or self.controls["layer"].value
        return self.controls["layer"].value

    def _show_layer(self, layer: str | None) -> None:
        """Show ``layer`` (a result's) in the ``layer`` control without recomputing,
        adding it to the choices when the method's default is not among them."""
        control = self.controls.get("layer")
        if control is None or layer is None or control.value == layer:
            return
        with self._silenced():
            if layer not in control.options:
                control.options = [*control.options, layer]
            control.value = layer

    def _needs_compute(self, changed: set[str]) -> bool:
        """False when ``changed`` only restyles what is drawn (or moves a clip's frame)."""
        return bool(changed - REDRAW) or self.result is None

    def _redraw(self, changed: set[str]) -> None:
        """Redraw from the stored results (restyles)."""
        self._draw()

    def _view_values(self, changed: set[str]) -> tuple[str | None, float | None]:
        """(colormap, opacity) for ``MapGrid.restyle``: ``None`` for what did not change
        (an opacity drag then leaves the colours alone: milliseconds)."""
        return (self.controls["colormap"].value if "colormap" in changed else None,
                self.controls["opacity"].value if "opacity" in changed else None)

    def _compute(self, changed: set[str]) -> Publish:  # pragma: no cover - abstract
        """Compute what ``changed`` affects (no displayed state touched) and return a
        ``publish()`` that stores and draws it and returns a short description of what
        was recomputed (the status line) or ``None`` for a restyle."""
        raise NotImplementedError

    def _draw(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -------------------------------------------------------- busy and cancel
    def _hide_busy(self) -> None:
        set_visible(self.busy_box, False)

    def _report_progress(self, done: int, total: int) -> None:
        """The engine's per-chunk callback: the cancellation point of a stale job."""
        self.worker.check()
        set_visible(self.progress, True)
        self.progress.value = done / max(total, 1)

    def _computing(self, what: str, detail: str = "") -> None:
        self.worker.check()
        text = f"computing {what}" + (f": {detail}" if detail else "") + "…"
        self.status.value = f"<span style='color:#555'>{html.escape(text)}</span>"

    def _progressive(self, what: str, unit: str,
                     draw: Callable[[torch.Tensor], None]) -> Callable | None:
        """A partial-result callback for ``Context.partial_results``, or ``None`` when
        synchronous. ``draw(raw)`` shows a first estimate; at most one per ``interval``."""
        if not self.background:
            return None
        last = [0.0]

        def partial(done: int, total: int, estimate: Callable[[], torch.Tensor]) -> None:
            token = self.worker.token
            self._computing(what, f"{done}/{total} {unit}")
            if token is None or time.perf_counter() - last[0] < PARTIAL_INTERVAL_S:
                return
            raw = estimate()
            with self.worker.publishing(token):
                draw(raw)
            last[0] = time.perf_counter()
        return partial

    def _engine_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """In the background, smaller chunks: quicker to stop, earlier first estimates."""
        if self.background and isinstance(params.get("batch_size"), int):
            return {**params, "batch_size": min(params["batch_size"], BACKGROUND_BATCH)}
        return params

    # ------------------------------------------------------------------ export
    def _export_panels(self) -> list[tuple[xr.DataArray, Any]]:
        """The (map, image) pairs a PNG export shows, left to right (clips: the whole map
        and the frame shown)."""
        return [(self.result, self.image_frame())]

    def _require_result(self) -> None:
        if self.result is None:
            raise RuntimeError("nothing to save yet: the explanation has not been computed"
                               + (" (w.wait() waits for it)" if self.busy else ""))

    def png_bytes(self) -> bytes:
        """The current map(s) over the image (clips: the frame shown), as shown
        (colormap, opacity), as PNG bytes."""
        self._require_result()
        colormap, opacity = self.controls["colormap"].value, self.controls["opacity"].value
        tiles = [rendering.overlay(self.frame_of(da).xai.map2d(), image, colormap, opacity,
                                   da.xai.signed, self._limits(da))
                 for da, image in self._export_panels()]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
        row = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
        return rendering.png_bytes(row)

    def netcdf_bytes(self) -> bytes:
        """``w.result`` (values and every parameter in attrs) as a netCDF file's bytes."""
        self._require_result()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "result.nc"
            self.result.to_netcdf(path, engine=netcdf_engine())
            return path.read_bytes()

    def save_png(self, path: str | Path) -> Path:
        """The current map(s) over the image, as shown (colormap, opacity), to a PNG file."""
        path = Path(path)
        path.write_bytes(self.png_bytes())
        self.status.value = f"saved {html.escape(str(path))}"
        return path

    def save_netcdf(self, path: str | Path) -> Path:
        """``w.result`` (values and every parameter in attrs) to a netCDF file."""
        path = Path(path)
        path.write_bytes(self.netcdf_bytes())
        self.status.value = f"saved {html.escape(str(path))}"
        return path

    def download(self, kind: str = "png") -> str:
        """Hand the PNG (``"png"``) or netCDF (``"netcdf"``) to the browser as a download.

        Works without a front-end extension (JupyterLab, Notebook 7, Voilà, Binder): the
        file travels as a ``data:`` link, clicked for the user, and shown to click again.
        Returns the file name.
        """
        if kind not in ("png", "netcdf"):
            raise ValueError(f"kind={kind!r}: choose 'png' or 'netcdf'")
        stem = getattr(getattr(self, "save_name", None), "value", "") or "explanation"
        name = Path(stem).stem + (".png" if kind == "png" else ".nc")
        data = self.png_bytes() if kind == "png" else self.netcdf_bytes()
        mime = "image/png" if kind == "png" else "application/x-netcdf"
        url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        self.download_link.value = (
            f"<a download='{html.escape(name)}' href='{url}'>⬇ {html.escape(name)}</a> "
            f"<span style='color:#555'>({len(data) / 1024:.0f} kB)</span>")
        if in_kernel():  # start the download; the link stays for browsers that block it
            from IPython.display import Javascript

            self._javascript.outputs = ()
            self._javascript.append_display_data(Javascript(
                "const a = document.createElement('a');"
                f"a.href = {url!r}; a.download = {name!r};"
                "document.body.appendChild(a); a.click(); a.remove();"))
            # once run, the script goes: a notebook reopened with saved widget state
            # must not download again
            clear = threading.Timer(3.0, lambda: setattr(self._javascript, "outputs", ()))
            clear.daemon = True
            clear.start()
        self.status.value = f"download: {html.escape(name)}"
        return name


#: first estimates are drawn at most this often (seconds)
PARTIAL_INTERVAL_S = 0.25


def top5_html(options: Sequence[tuple[str, int]], top: int = 5) -> str:
    """A small bar chart (HTML) of the first ``top`` class options ``("name (p%)", k)``.

    >>> "width:50.0%" in top5_html([("cat (50.0%)", 3)])
    True
    """
    rows = []
    for label, _ in list(options)[:top]:
        name, _, pct = label.rpartition(" (")
        value = float(pct.rstrip("%)") or 0.0)
        rows.append(
            "<div style='display:flex;align-items:center;font-size:12px;line-height:18px'>"
            f"<span style='width:130px;overflow:hidden;text-overflow:ellipsis;"
            f"white-space:nowrap' title='{html.escape(name)}'>{html.escape(name)}</span>"
            "<span style='flex:1;background:#eee;height:12px;margin:0 4px'>"
            f"<span style='display:block;height:12px;background:#4c78a8;"
            f"width:{value:.1f}%'></span></span>"
            f"<span style='width:44px;text-align:right'>{value:.1f}%</span></div>")
    return "<div title='top-5 predictions'>" + "".join(rows) + "</div>"


def netcdf_engine() -> str:
    """h5netcdf when installed (netCDF4 format), else scipy (netCDF3, always there)."""
    try:
        import h5netcdf  # noqa: F401
    except ImportError:
        return "scipy"
    return "h5netcdf"
