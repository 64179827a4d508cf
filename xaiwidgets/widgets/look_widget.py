"""LookWidget: the student is the gaze. Click where your eyes go; then compare with the methods.

Each click on the shown image is one fixation at pixel ``(y, x)``. The student's
fixation density map is :func:`xaiwidgets.gfdm` of the clicks with the datasets' σ
convention (image side / 16 unless ``sigma=`` is given). Only after the student has
looked does **Reveal** show the methods' maps (and the simulated observer's GFDM
when ``gaze=`` is given) beside the student's, scored with the saliency metrics:
PCC and SIM against the student's GFDM, NSS against the clicks. A "timed" mode
shows the image for :data:`TIMED_S` seconds after **Start** and counts only the
clicks made meanwhile. ``save(path)`` writes the clicks to netCDF;
:meth:`LookWidget.merge` pools a class's files; :meth:`LookWidget.class_view`
compares the class's GFDM with the methods and each student with the rest of the class.

>>> import numpy as np
>>> g = LookWidget(np.zeros((1, 3, 32, 32), np.float32))
>>> g.click(0, 10, 20); g.click(0, 10, 20)
True
True
>>> int(g.fixations.sel(image=0, y=10, x=20)), g.sigma
(2, 2.0)
"""

from __future__ import annotations

import hashlib
import html
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr

from ..core.inputs import as_image_batch
from ..evaluation import metrics
from ..evaluation.gfdm import default_sigma, gfdm
from .base import netcdf_engine
from .controls import LAYOUT, STYLE, set_visible
from .export import Exportable
from .figures import LiveFigureWidget, MapGrid, image_uri
from .lifecycle import Closable

#: seconds the image is shown in "timed" mode
TIMED_S = 3.0
#: side of the look figure (px) and of each panel of the reveal
LOOK_PX = 420
PANEL_PX = 230
#: the methods whose maps are revealed against the student's, when the caller names none
DEFAULT_METHODS = ("gradcam", "fem", "gradient")
#: the scores of :attr:`LookWidget.scores`
SCORES = ("pcc", "sim", "nss")
#: the name of the simulated observer's "method"
OBSERVER = "observer"
#: a fully transparent colour scale: the click-catching layer over the image
CLEAR = [[0.0, "rgba(0,0,0,0)"], [1.0, "rgba(0,0,0,0)"]]
#: the score tables' attributes
TABLE = "style='border-collapse:collapse;font-size:13px' cellpadding='3'"


def images_fingerprint(images: torch.Tensor) -> str:
    """A short hash of the images (float32 bytes): files of one class share it.

    >>> images_fingerprint(torch.zeros(1, 3, 2, 2))
    'b71e4cc8ebd7363c'
    """
    data = np.ascontiguousarray(images.detach().cpu().numpy().astype(np.float32))
    return hashlib.sha256(data.tobytes() + str(data.shape).encode()).hexdigest()[:16]



def _scores_against(maps: dict[str, np.ndarray], density: np.ndarray,
                    counts: np.ndarray) -> dict[str, np.ndarray]:
    """pcc, sim of each map against ``density`` and nss against the click ``counts``,
    each (image, method); NaN for images without clicks.

    >>> maps = {"a": np.eye(4)[None], "b": np.ones((1, 4, 4))}
    >>> counts = np.eye(4, dtype=int)[None]
    >>> out = _scores_against(maps, np.eye(4)[None], counts)
    >>> round(float(out["pcc"][0, 0]), 6), float(out["pcc"][0, 1])
    (1.0, 0.0)
    """
    n = len(counts)
    out = {k: np.full((n, len(maps)), np.nan) for k in SCORES}
    clicked = counts.reshape(n, -1).sum(axis=1) > 0
    if clicked.any():
        for j, saliency in enumerate(maps.values()):
            saliency = saliency[clicked]
            out["pcc"][clicked, j] = metrics.pcc(saliency, density[clicked])
            out["sim"][clicked, j] = metrics.sim(saliency, density[clicked])
            out["nss"][clicked, j] = metrics.nss(saliency, counts[clicked])
    return out

class LookWidget(Closable, Exportable, W.VBox):
    """Look at an image, click where your eyes go, then reveal what the methods saw.

    Parameters
    ----------
    images
        (N,3,H,W) in [0, 1] (array, tensor, or a dataset with ``image``).
    classes
        Class names of the model's outputs (shown with the prediction).
    model, preprocess
        The classifier whose maps are revealed (``None``: no method maps; the
        observer alone when ``gaze`` is given).
    methods
        Registered methods revealed (default parameters, the predicted class).
    gaze
        The simulated observer: GFDM maps (N,H,W) or a dataset with ``gfdm``.
    sigma
        The GFDM σ in pixels; default the datasets' convention (side / 16).

    Attributes: :attr:`fixations`, :attr:`gfdm`, :attr:`scores`, ``controls``
    (``image``, ``mode``), ``figure`` (the image to click), ``reveal_figure``::

        g = xw.LookWidget(ds.image.values, model=model, preprocess=preprocess, gaze=ds)
        g.click(0, 40, 52)            # what a click on image 0 at pixel (40, 52) does
        g.reveal(); g.scores.pcc      # the methods against the student
        g.save("ada.nc"); xw.LookWidget.merge(["ada.nc", "bob.nc"])
    """

    def __init__(self, images: Any, classes: Sequence[str] | None = None,
                 model: torch.nn.Module | None = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 methods: Sequence[str] = DEFAULT_METHODS, gaze: Any = None,
                 sigma: float | None = None, duration: float = TIMED_S) -> None:
        super().__init__()
        if isinstance(images, xr.Dataset):
            if "image" not in images:
                raise ValueError("the Dataset has no 'image' variable; pass ds['image']")
            images = images["image"]
        self.images = as_image_batch(images)
        if self.images.ndim != 4:
            raise ValueError("LookWidget shows still images (N,C,H,W); got video clips "
                             f"{tuple(self.images.shape)}")
        n, _, height, width = self.images.shape
        self.shape = (int(height), int(width))
        self.sigma = float(default_sigma(self.shape) if sigma is None else sigma)
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.classes = list(classes) if classes is not None else None
        self.model, self.preprocess = model, preprocess
        self.methods = list(methods) if model is not None else []
        if model is not None:
            from ..core.registry import get_method

            for name in self.methods:
                get_method(name)  # unknown names fail now, with suggestions
        self.gaze = _gaze_maps(gaze, n, self.shape)
        self.duration = float(duration)
        self.fingerprint = images_fingerprint(self.images)
        self._counts = np.zeros((n, *self.shape), dtype=np.int32)
        self._clicks: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        self._maps: dict[str, np.ndarray] = {}
        self._predicted: np.ndarray | None = None
        self._revealed: set[int] = set()
        self._window: tuple[int, float] | None = None  # timed mode: (image, end time)
        self._looked: set[int] = set()                # timed looks finished
        self._timer: threading.Timer | None = None
        #: the last message shown (notes such as an ignored click), "" when none
        self.note = ""
        #: the last error ("Type: message"); the widget keeps working
        self.error: str | None = None
        self._build()

    # ------------------------------------------------------------------ state
    @property
    def index(self) -> int:
        """The image shown."""
        return int(self.controls["image"].value)

    @property
    def fixations(self) -> xr.DataArray:
        """Click counts per pixel, dims ("image", "y", "x")."""
        return xr.DataArray(self._counts.copy(), dims=("image", "y", "x"),
                            coords={"image": np.arange(len(self._counts))}, name="fixations",
                            attrs={"sigma": self.sigma, "images": self.fingerprint})

    @property
    def gfdm(self) -> xr.DataArray:
        """The student's GFDM: :func:`xaiwidgets.gfdm` of the clicks (zeros without clicks)."""
        return xr.DataArray(gfdm(self._counts, sigma=self.sigma), dims=("image", "y", "x"),
                            coords={"image": np.arange(len(self._counts))}, name="gfdm",
                            attrs={"sigma": self.sigma})

    def click(self, i: int, y: float, x: float) -> bool:
        """One fixation of image ``i`` at pixel ``(y, x)`` (rounded to the nearest pixel).

        Returns False (with a note) when timed mode does not count it: before
        **Start** or after the time is up. A pixel outside the image raises.
        """
        i = self._check_index(i)
        row, col = int(round(float(y))), int(round(float(x)))
        height, width = self.shape
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"click (y={y}, x={x}) is outside image {i} "
                             f"({height}×{width} pixels: 0 ≤ y < {height}, 0 ≤ x < {width})")
        if self.timed:
            window = self._window
            if window is None or window[0] != i or time.monotonic() > window[1]:
                self._say("timed mode: press Start, then click while the image is shown "
                          f"({self.duration:g} s); this click was not counted")
                return False
        self._counts[i, row, col] += 1
        self._clicks[i].append((row, col))
        self._say("")
        if i == self.index:
            self._draw_look()
            if i in self._revealed:
                self._draw_reveal()
        return True

    def clear(self, i: int | None = None) -> None:
        """Forget the clicks on image ``i`` (default: the one shown)."""
        i = self.index if i is None else self._check_index(i)
        self._counts[i] = 0
        self._clicks[i] = []
        self._revealed.discard(i)
        self._looked.discard(i)
        if i == self.index:
            self._draw_look()
            self._draw_reveal()

    @property
    def timed(self) -> bool:
        """True in "timed" mode (the image shows for ``duration`` s after Start)."""
        return self.controls["mode"].value == "timed"

    def start(self, i: int | None = None) -> None:
        """Timed mode: show image ``i`` for ``duration`` seconds and count the clicks meanwhile."""
        i = self.index if i is None else self._check_index(i)
        if i != self.index:
            self.controls["image"].value = i
        self._window = (i, time.monotonic() + self.duration)
        self._looked.discard(i)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.duration, self._time_up, args=(i,))
        self._timer.daemon = True
        self._timer.start()
        self._say(f"look! {self.duration:g} s: click where your eyes go")
        self._draw_look()

    def _time_up(self, i: int) -> None:
        if self._window is not None and self._window[0] == i:
            self._window = None
            self._looked.add(i)
            self._say(f"time's up: {len(self._clicks[i])} click(s) counted on image {i}")
            if i == self.index:
                self._draw_look()

    def has_looked(self, i: int | None = None) -> bool:
        """True once image ``i`` has clicks (timed mode: and its look is over)."""
        i = self.index if i is None else self._check_index(i)
        if not self._clicks[i]:
            return False
        return not self.timed or i in self._looked

    # ---------------------------------------------------------------- methods
    def method_maps(self) -> dict[str, np.ndarray]:
        """Each method's map (N,H,W) of the predicted class (computed once), and the
        observer's GFDM when ``gaze`` was given."""
        if self.methods and not self._maps:
            from ..explainer import Explainer

            ex = Explainer(self.model, self.images, preprocess=self.preprocess,
                           classes=self.classes, progress=False)
            self._predicted = ex.resolve_target(None).cpu().numpy()
            for name in self.methods:
                result = ex.explain(name)
                self._maps[name] = np.asarray(result.values, dtype=np.float64)
        maps = dict(self._maps)
        if self.gaze is not None:
            maps[OBSERVER] = self.gaze
        return maps

    @property
    def scores(self) -> xr.Dataset:
        """pcc, sim (each map against the student's GFDM) and nss (against the clicks),
        dims ("image", "method"); NaN for an image without clicks."""
        maps = self.method_maps()
        names = list(maps)
        counts = self._counts
        n = len(counts)
        out = _scores_against(maps, self.gfdm.values, counts)
        return xr.Dataset({k: (("image", "method"), v) for k, v in out.items()},
                          coords={"image": np.arange(n), "method": names,
                                  "clicks": ("image", counts.reshape(n, -1).sum(axis=1))},
                          attrs={"sigma": self.sigma,
                                 "note": "pcc, sim: against the student's GFDM; nss: "
                                         "against the clicks; NaN: no clicks on that image"})

    def reveal(self, i: int | None = None) -> xr.Dataset:
        """Show the methods' maps and scores for image ``i`` (default: the one shown);
        returns its scores. Without clicks the scores are NaN and a note says so."""
        i = self.index if i is None else self._check_index(i)
        if i != self.index:
            self.controls["image"].value = i
        self._revealed.add(i)
        self._draw_reveal()
        return self.scores.sel(image=i)

    # ----------------------------------------------------------- save / merge
    def dataset(self, student: str = "") -> xr.Dataset:
        """The clicks (``fixations``) and the student's ``gfdm``, with σ and the images'
        fingerprint in attrs (what :meth:`save` writes)."""
        return xr.Dataset(
            {"fixations": self.fixations, "gfdm": self.gfdm},
            attrs={"sigma": self.sigma, "images": self.fingerprint, "student": student,
                   "height": self.shape[0], "width": self.shape[1]})

    def save(self, path: str | Path, student: str | None = None) -> Path:
        """Write the clicks to a netCDF file (``student``: default the file's stem)."""
        path = Path(path)
        self.dataset(student if student is not None else path.stem).to_netcdf(
            path, engine=netcdf_engine())
        self._say(f"saved {path}")
        return path

    def netcdf_bytes(self, student: str = "") -> bytes:
        """What :meth:`save` writes, as bytes (for a download from the browser)."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "clicks.nc"
            self.dataset(student).to_netcdf(path, engine=netcdf_engine())
            return path.read_bytes()

    def download(self) -> str:
        """Offer the clicks as a netCDF download link (named after the ``name`` box);
        works in JupyterLab, Notebook 7 and Voilà without an extension. Returns the name."""
        import base64

        student = self.student.value.strip() or "student"
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in student) + ".nc"
        data = self.netcdf_bytes(student)
        url = "data:application/x-netcdf;base64," + base64.b64encode(data).decode()
        self.download_link.value = (f"<a download='{html.escape(name)}' href='{url}'>⬇ "
                                    f"{html.escape(name)}</a> (give it to your teacher)")
        return name

    @staticmethod
    def merge(paths: Sequence[str | Path]) -> xr.Dataset:
        """Pool a class's saved files: ``fixations`` (the counts added), its ``gfdm``
        (same σ), and ``student_fixations`` ("student", "image", "y", "x").

        Files made on other images (or with another σ) raise, naming the two files.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("merge: give at least one file saved by LookWidget.save")
        parts = []
        for path in paths:
            with xr.open_dataset(path, engine=netcdf_engine()) as ds:
                if "fixations" not in ds or "images" not in ds.attrs:
                    raise ValueError(f"{path} is not a LookWidget file (no fixations / "
                                     "images fingerprint): save it with g.save(path)")
                parts.append(ds.load())
        first, first_path = parts[0], paths[0]
        for ds, path in zip(parts[1:], paths[1:], strict=True):
            if (ds.attrs["images"] != first.attrs["images"]
                    or ds.fixations.shape != first.fixations.shape):
                raise ValueError(
                    f"{first_path.name} and {path.name} were made on different images "
                    f"(fingerprint {first.attrs['images']} with {first.sizes['image']} images "
                    f"of {first.sizes['y']}×{first.sizes['x']} vs {ds.attrs['images']} with "
                    f"{ds.sizes['image']} of {ds.sizes['y']}×{ds.sizes['x']}): merge only "
                    "files from the same images")
            if float(ds.attrs["sigma"]) != float(first.attrs["sigma"]):
                raise ValueError(f"{first_path.name} (sigma {first.attrs['sigma']}) and "
                                 f"{path.name} (sigma {ds.attrs['sigma']}) used different "
                                 "GFDM sigmas: give every student the same sigma=")
        names = [str(ds.attrs.get("student") or p.stem) for ds, p in zip(parts, paths,
                                                                          strict=True)]
        names = _unique(names)
        each = np.stack([ds.fixations.values.astype(np.int32) for ds in parts])
        total = each.sum(axis=0)
        sigma = float(first.attrs["sigma"])
        dims = ("image", "y", "x")
        return xr.Dataset(
            {"fixations": (dims, total), "gfdm": (dims, gfdm(total, sigma=sigma)),
             "student_fixations": (("student", *dims), each)},
            coords={"image": first.image.values, "student": names},
            attrs={"sigma": sigma, "images": first.attrs["images"], "students": len(parts)})

    def class_scores(self, merged: xr.Dataset) -> xr.Dataset:
        """The class against the methods and each student against the rest of the class.

        ``pcc``, ``sim`` (each map against the class GFDM), ``nss`` (against the class's
        clicks), dims ("image", "method"); ``agreement_pcc`` and ``agreement_sim``
        ("student", "image"): a student's GFDM against the GFDM of the *other* students
        (leave-one-out, so a student is not compared with themselves); NaN where
        either has no clicks.
        """
        self._check_class(merged)
        counts = merged.fixations.values
        class_map = merged.gfdm.values
        maps = self.method_maps()
        n, names = len(counts), list(maps)
        out = _scores_against(maps, class_map, counts)
        each = merged.student_fixations.values
        agreement = {k: np.full(each.shape[:2], np.nan) for k in ("pcc", "sim")}
        sigma = float(merged.attrs["sigma"])
        for s in range(len(each)):
            mine, others = each[s], counts - each[s]
            both = (mine.reshape(n, -1).sum(1) > 0) & (others.reshape(n, -1).sum(1) > 0)
            if both.any():
                a, b = gfdm(mine[both], sigma=sigma), gfdm(others[both], sigma=sigma)
                agreement["pcc"][s, both] = metrics.pcc(a, b)
                agreement["sim"][s, both] = metrics.sim(a, b)
        data = {k: (("image", "method"), v) for k, v in out.items()}
        data.update({f"agreement_{k}": (("student", "image"), v) for k, v in agreement.items()})
        return xr.Dataset(data, coords={"image": merged.image.values, "method": names,
                                        "student": merged.student.values},
                          attrs={"sigma": sigma, "students": int(len(each))})

    def class_view(self, merged: xr.Dataset | Sequence[str | Path],
                   image: int | None = None) -> W.VBox:
        """The class GFDM beside the methods' maps (scored) for one image, and a table of
        each student's agreement with the rest of the class. ``merged``: what
        :meth:`merge` returns, or the files."""
        if not isinstance(merged, xr.Dataset):
            merged = self.merge(merged)
        scores = self.class_scores(merged)
        i = self.index if image is None else self._check_index(image)
        maps = self.method_maps()
        grid = MapGrid(1 + len(maps), cols=min(4, 1 + len(maps)), panel_px=PANEL_PX,
                       titles=[f"class ({int(merged.sizes['student'])} students)", *maps])
        uri = image_uri(self.images[i])
        grid.show(0, merged.gfdm.values[i], image=uri)
        for k, (name, values) in enumerate(maps.items(), start=1):
            row = scores.sel({"image": i, "method": name})
            grid.show(k, values[i], image=uri, title=_scored(name, row))
        grid.figure.layout.width = min(4, 1 + len(maps)) * PANEL_PX + 20
        rows = "".join(
            f"<tr><td>{html.escape(str(name))}</td>"
            f"<td>{_fmt(scores.agreement_pcc.values[s, i])}</td>"
            f"<td>{_fmt(scores.agreement_sim.values[s, i])}</td></tr>"
            for s, name in enumerate(scores.student.values))
        table = W.HTML(
            "<b>each student against the rest of the class</b> (image "
            f"{i})<table {TABLE}><tr><th>student</th>"
            f"<th>PCC</th><th>SIM</th></tr>{rows}</table>")
        return W.VBox([grid.figure, table])

    # -------------------------------------------------------------------- UI
    def _build(self) -> None:
        n = len(self.images)
        self.controls: dict[str, W.ValueWidget] = {
            "image": W.Dropdown(options=[(f"image {i}", i) for i in range(n)], value=0,
                                description="image", style=STYLE, layout=W.Layout(**LAYOUT)),
            "mode": W.ToggleButtons(options=[("free", "free"), (f"timed {self.duration:g} s",
                                                                 "timed")],
                                    value="free", description="mode", style=STYLE,
                                    tooltip="timed: the image shows for a few seconds"),
        }
        self.controls["mode"].style.button_width = "110px"
        self.controls["image"].observe(lambda _: self._guarded(self._on_image), names="value")
        self.controls["mode"].observe(lambda _: self._guarded(self._on_mode), names="value")
        self.start_button = W.Button(description="Start", icon="eye",
                                     tooltip="show the image and count your clicks",
                                     layout=W.Layout(width="100px"))
        self.start_button.on_click(lambda _: self._guarded(self.start))
        self.clear_button = W.Button(description="Clear", icon="eraser",
                                     tooltip="forget my clicks on this image",
                                     layout=W.Layout(width="100px"))
        self.clear_button.on_click(lambda _: self._guarded(self.clear))
        self.reveal_button = W.Button(description="Reveal", icon="unlock",
                                      button_style="success",
                                      tooltip="show what the methods saw (after you looked)",
                                      layout=W.Layout(width="100px"))
        self.reveal_button.on_click(lambda _: self._guarded(self.reveal))
        self.student = W.Text(value="", placeholder="your name", description="name",
                              style=STYLE, layout=W.Layout(**LAYOUT))
        save = W.Button(description="my clicks (.nc)", icon="download",
                        tooltip="download your clicks for the class view",
                        layout=W.Layout(width="150px"))
        save.on_click(lambda _: self._guarded(self.download))
        self.download_link = W.HTML()
        self.count_label = W.HTML()
        self.message = W.HTML(layout=W.Layout(min_height="1.4em"))
        height, width = self.shape
        self.figure = LiveFigureWidget()
        self.figure.add_trace(go.Image(source=self._picture(0), hoverinfo="skip",
                                       name="image"))
        self.figure.add_trace(go.Heatmap(z=np.zeros(self.shape).tolist(), colorscale=CLEAR,
                                         showscale=False, hoverinfo="none", name="clicks",
                                         zmin=0, zmax=1))
        self.figure.add_trace(go.Scatter(x=[], y=[], mode="markers", hoverinfo="skip",
                                         name="your clicks",
                                         marker=dict(size=11, color="rgba(255,255,255,0.9)",
                                                     line=dict(color="#d62728", width=2.5))))
        side = LOOK_PX / max(height, width)
        self.figure.update_layout(
            width=int(width * side) + 20, height=int(height * side) + 50,
            margin=dict(l=10, r=10, t=40, b=10), showlegend=False, plot_bgcolor="white",
            title=dict(text=" ", font=dict(size=14)), dragmode=False,
            xaxis=dict(visible=False, range=[-0.5, width - 0.5], constrain="domain"),
            yaxis=dict(visible=False, range=[height - 0.5, -0.5], scaleanchor="x"))
        self.figure._config = {"displayModeBar": False}  # no toolbar over the title
        self.figure.data[1].on_click(self._on_plot_click)
        panels = ["you (GFDM)", *self.methods, *([OBSERVER] if self.gaze is not None else [])]
        self.reveal_grid = MapGrid(len(panels), cols=min(4, len(panels)), titles=panels,
                                   panel_px=PANEL_PX)
        self.reveal_figure = self.reveal_grid.figure
        self.reveal_figure.layout.width = min(4, len(panels)) * PANEL_PX + 20
        self.reveal_table = W.HTML()
        self.reveal_box = W.VBox([self.reveal_figure, self.reveal_table])
        set_visible(self.reveal_box, False)
        side_box = W.VBox([self.controls["image"], self.controls["mode"],
                           W.HBox([self.start_button, self.clear_button, self.reveal_button]),
                           self.count_label, self.message, self.student,
                           W.HBox([save, self.download_link])],
                          layout=W.Layout(width="400px", min_width="400px"))
        self.children = [W.HBox([side_box, self.figure],
                                layout=W.Layout(flex_flow="row wrap")), self.reveal_box]
        self._on_mode()

    def _picture(self, i: int) -> str:
        return image_uri(self.images[i])

    def _blank(self) -> str:
        return image_uri(np.full((3, *self.shape), 0.5, dtype=np.float32))

    def _on_plot_click(self, trace: Any, points: Any, state: Any) -> None:
        if not (points.xs and points.ys):
            return
        try:
            self.click(self.index, points.ys[0], points.xs[0])
        except ValueError as err:  # outside the image: ignored, with a note
            self._say(f"ignored: {err}")

    def _on_image(self) -> None:
        self._window = None
        self._draw_look()
        self._draw_reveal()

    def _on_mode(self) -> None:
        set_visible(self.start_button, self.timed)
        self._window = None
        self._draw_look()
        self._draw_reveal()

    def _draw_look(self) -> None:
        i = self.index
        showing = not self.timed or (self._window is not None and self._window[0] == i)
        clicks = self._clicks[i]
        with self.figure.batch_update():
            self.figure.data[0].source = self._picture(i) if showing else self._blank()
            self.figure.data[2].x = [c for _, c in clicks]
            self.figure.data[2].y = [r for r, _ in clicks]
            title = (f"image {i}: click where your eyes go" if showing
                     else f"image {i}: press Start to look ({self.duration:g} s)")
            self.figure.layout.title.text = title
        self.count_label.value = (f"<b>{len(clicks)}</b> click(s) on image {i} · "
                                  f"σ = {self.sigma:g} px")
        self.reveal_button.disabled = not self.has_looked(i)

    def _draw_reveal(self) -> None:
        i = self.index
        shown = i in self._revealed
        set_visible(self.reveal_box, shown)
        if not shown:
            return
        maps = self.method_maps()
        scores = self.scores.sel(image=i)
        uri = self._picture(i)
        with self.reveal_figure.batch_update():
            self.reveal_grid.show(0, self.gfdm.values[i], image=uri,
                                  title=f"you ({len(self._clicks[i])} clicks)")
            for k, (name, values) in enumerate(maps.items(), start=1):
                self.reveal_grid.show(k, values[i], image=uri,
                                      title=_scored(name, scores.sel({"method": name})))
        prediction = ""
        if self._predicted is not None:
            k = int(self._predicted[i])
            name = self.classes[k] if self.classes and k < len(self.classes) else f"class {k}"
            prediction = f"the model predicts <b>{html.escape(str(name))}</b>; "
        if not self._clicks[i]:
            self.reveal_table.value = ("<i>no clicks on this image yet: the scores are NaN. "
                                       "Click where you look first.</i>")
            return
        rows = "".join(
            f"<tr><td>{html.escape(str(name))}</td>"
            + "".join(f"<td>{_fmt(scores[k].sel({'method': name}))}</td>" for k in SCORES)
            + "</tr>" for name in maps)
        self.reveal_table.value = (
            f"{prediction}PCC and SIM: how much a map looks like your GFDM (1 = the same); "
            "NSS: how high the map is where you clicked (0 = chance)."
            f"<table {TABLE}><tr><th>map</th>"
            "<th>PCC</th><th>SIM</th><th>NSS</th></tr>" + rows + "</table>")

    def _say(self, text: str) -> None:
        self.note = text
        self.message.value = f"<span style='color:#555'>{html.escape(text)}</span>"

    def _guarded(self, action: Callable[[], Any]) -> None:
        try:
            action()
            self.error = None
        except Exception as err:  # shown inline: the widget keeps working
            self.error = f"{type(err).__name__}: {err}"
            self.message.value = (f"<b style='color:#b00020'>{type(err).__name__}:</b> "
                                  f"<span style='color:#b00020'>{html.escape(str(err))}</span>")

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self.images):
            raise IndexError(f"image {i} out of range 0..{len(self.images) - 1}")
        return i

    def _check_class(self, merged: xr.Dataset) -> None:
        if merged.attrs.get("images") != self.fingerprint:
            raise ValueError(f"the class files were made on other images (fingerprint "
                             f"{merged.attrs.get('images')}, this widget's {self.fingerprint})")

    def close(self) -> None:
        """Stop the timed-mode timer and close the widget."""
        if self._timer is not None:
            self._timer.cancel()
        super().close()

    # ---------------------------------------------------------------- handout
    def export_html(self, path: str | Path, **kwargs: Any) -> Path:
        """A handout of every image revealed (see
        :meth:`~xaiwidgets.widgets.export.Exportable.export_html`); what the student has
        revealed in the widget stays as it was.

        >>> g.export_html("look.html")                                 # doctest: +SKIP
        """
        revealed = set(self._revealed)
        try:
            return super().export_html(path, **kwargs)
        finally:
            self._revealed = revealed
            self._draw_reveal()

    def _export_figures(self) -> list[Any]:
        return [self.figure, self.reveal_figure]

    def _export_html_parts(self) -> list[str]:
        return [self.reveal_table.value]

    def _export_apply(self, values: dict[str, Any]) -> None:
        """A handout shows every image revealed (the student's clicks and the maps)."""
        if "image" in values:
            self.controls["image"].value = values["image"]
        self._revealed.add(self.index)
        self._draw_reveal()


# ------------------------------------------------------------------ helpers
def _gaze_maps(gaze: Any, n: int, shape: tuple[int, int]) -> np.ndarray | None:
    if gaze is None:
        return None
    if isinstance(gaze, xr.Dataset):
        if "gfdm" not in gaze:
            raise ValueError("gaze: the Dataset has no 'gfdm' variable (the simulated "
                             "observer's maps)")
        gaze = gaze["gfdm"]
    maps = np.asarray(gaze.detach().cpu() if hasattr(gaze, "detach") else gaze,
                      dtype=np.float64)
    if maps.shape != (n, *shape):
        raise ValueError(f"gaze has shape {maps.shape}; expected {(n, *shape)} (one GFDM "
                         "per image, at the image size)")
    return maps


def _fmt(value: Any) -> str:
    value = float(value)
    return f"{value:.2f}" if np.isfinite(value) else "–"


def _scored(name: str, row: xr.Dataset) -> str:
    parts = [f"{k.upper()} {_fmt(row[k])}" for k in ("pcc", "nss")]
    return f"{name} <span style='font-size:11px'>{' · '.join(parts)}</span>"


def _unique(names: list[str]) -> list[str]:
    """Names made unique by a suffix (two files of "ada" give "ada", "ada (2)")."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out
