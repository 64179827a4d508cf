"""DatasetExplorer: a whole dataset's explanations, filtered by outcome and class.

Opening it runs only the predictions (one pass over the dataset, batched, without
autograd: about the time of a plain forward over it); maps and scores are computed
for the page shown (and cached per method and image; in a kernel after the opening
returns). With ``store="explorer.zarr"`` the predictions and every score computed
are written there as they come, and a later explorer on the same model, dataset and
preprocessing reads them back without running the model (see
:mod:`xaiwidgets.concepts.store`). The confusion matrix drives the gallery: a click
on a cell shows the images of that (true, predicted) pair; ``select(i)`` opens one
image in an embedded :class:`~xaiwidgets.ExplainerWidget`::

    x = xw.DatasetExplorer(model, xw.datasets.shapes(n=1000), preprocess=preprocess)
    x.controls["outcome"].value = "wrong"          # errors first
    x.controls["sort"].value = "confidence ↓"      # most confident mistakes first
    x.shown                                        # dataset indices on this page
    x.filter_pair("circle", "star")                # = a click on that confusion cell
    x.select(x.shown[0])                           # x.explainer shows it in full
    x.results.pcc                                  # the scores computed so far

The score is ``metric``: a gaze metric (``pcc``, ``sim``, ... against ``gfdm`` or
``fixations``) when the dataset has gaze data, else a perturbation metric:
``"deletion"`` or ``"insertion"`` AUC (Petsiuk et al.) with a 5 % step. The
default (``metric=None``) is ``"pcc"`` when the dataset has a ``gfdm`` and
``"deletion"`` otherwise.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr

from .. import rendering
from ..concepts.store import (
    Store,
    architecture,
    chunk_images,
    chunks,
    dataset_fingerprint,
    describe,
    variables_hash,
    weights_hash,
)
from ..core.registry import get_method
from ..core.registry import methods as registered_methods
from ..core.scoped import model_guard
from ..datasets.adapters import ImageSource, image_source
from ..evaluation import metrics as _metrics
from ..evaluation import perturbation
from ..evaluation.evaluate import dataset_needs, references, score_maps
from ..explainer import Explainer
from .base import BackgroundUpdates
from .controls import LAYOUT, STYLE, set_visible
from .export import Exportable
from .figures import LiveFigureWidget
from .lifecycle import replace_children
from .worker import Superseded, Token, Worker, in_kernel

#: perturbation metrics the explorer offers (AUC of the curve; no gaze data needed)
PERTURBATION = {"deletion": (perturbation.deletion, False),
                "insertion": (perturbation.insertion, True)}
#: fraction of the pixels removed/inserted per step of the perturbation curves
PERTURBATION_STEP = 0.05
#: the method shown first when it is offered
DEFAULT_METHOD = "gradcam"
#: explanation maps kept for redrawing thumbnails (scores are all kept)
KEEP_MAPS = 512
#: images per stored chunk of predictions (an interrupted opening resumes after the
#: last finished one)
STORE_CHUNK = 1024
#: images of a torch dataset read for its fingerprint (its first and last ones)
FINGERPRINT_SAMPLE = 64
#: seconds between writes of newly computed scores to the store (and at each job's end)
FLUSH_S = 10.0
ALL = "all"
OUTCOMES = ("all", "correct", "wrong")
ORDER = "dataset order"
DESCENDING, ASCENDING = "↓", "↑"


def resolve_metric(metric: str | None, gaze: Sequence[str]) -> str:
    """The explorer's score for a dataset with the gaze variables ``gaze``.

    ``None`` → ``"pcc"`` when a ``gfdm`` exists, else ``"deletion"``. A gaze metric
    without its gaze data is an error naming what works instead.

    >>> resolve_metric(None, ()), resolve_metric(None, ("gfdm",)), resolve_metric("sim", ("gfdm",))
    ('deletion', 'pcc', 'sim')
    """
    if metric is None:
        return "pcc" if "gfdm" in gaze else "deletion"
    if metric in PERTURBATION:
        return metric
    known = [*_metrics.available(), *PERTURBATION]
    if metric not in _metrics.METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {known}")
    missing = [v for v in dataset_needs(metric) if v not in gaze]
    if missing:
        raise ValueError(
            f"metric {metric!r} compares maps with "
            f"{'the target mask' if missing[0] == 'mask' else 'gaze data'} (`{missing[0]}`), "
            "which this dataset "
            f"lacks (it has {list(gaze) or 'none'}); use metric='deletion' or 'insertion' "
            "(perturbation AUC), a metric that needs no data (e.g. 'sparseness', 'road'), "
            "or add a `gfdm`/`fixations`/`mask` variable (xw.gfdm makes a density map "
            "from fixations)")
    return metric


def higher_is_better(metric: str) -> bool:
    """Whether a larger score means a better map (``deletion``: lower is better)."""
    if metric in PERTURBATION:
        return PERTURBATION[metric][1]
    return bool(_metrics.METRICS[metric].higher_is_better)


class DatasetExplorer(BackgroundUpdates, Exportable, W.VBox):
    """Browse a dataset's explanations: filter by outcome and class, sort, page, open one.

    Parameters
    ----------
    model, preprocess
        As for :class:`~xaiwidgets.Explainer` (``preprocess`` maps [0, 1] images to the
        model input).
    dataset
        An ``xr.Dataset`` with ``image`` (+ optional ``label``, ``gfdm``, ``fixations``),
        a torch ``Dataset``/``DataLoader`` of ``(image, label)``, or
        ``xw.datasets.from_folder(path)``.
    classes
        Class names in the model's output order (default: the dataset's).
    methods
        Methods offered (default: every registered method); Grad-CAM shown first.
    metric
        The score of each map (see the module docstring); ``None`` picks one.
    background
        Compute in a background thread (``None``: inside a running kernel only). In
        plain Python every change computes before returning.
    page_size, batch_size, params
        Thumbnails per page; images per prediction batch; ``{method: {param: value}}``.
    store
        A folder (``"explorer.zarr"``) for the predictions and the scores: written as
        they come (predictions in chunks of :data:`STORE_CHUNK` images, so an
        interrupted opening resumes; scores every :data:`FLUSH_S` seconds and after
        each page), read back by a later explorer with the same model weights, dataset
        and ``preprocess`` (its fingerprint, as for ``xw.concepts.references``): it opens
        without running the model and shows the scores computed before (per method,
        metric and ``params``). Other weights, images or ``preprocess``: recomputed with
        a warning; another model architecture, or a store of another kind: an error
        (pass another path, or ``overwrite=True`` to replace it).

    Attributes: ``controls`` (``method``, ``outcome``, ``class``, ``sort``, ``page``),
    ``shown``, ``results``, ``confusion``, ``explainer`` (after :meth:`select`),
    ``busy``, ``error``, ``message``, ``open_s`` (seconds the opening took), ``store``
    (the :class:`~xaiwidgets.concepts.store.Store`, or ``None``); :meth:`wait`,
    :meth:`cancel`, :meth:`filter_pair`::

        x = xw.DatasetExplorer(model, xw.datasets.shapes(n=32), preprocess=preprocess,
                               store="explorer.zarr")
        x.controls["outcome"].value = "wrong"     # the mistakes first
        x.select(x.shown[0])                       # open one in x.explainer
        # later, in another session: no model call, the scores computed above are back
        x = xw.DatasetExplorer(model, xw.datasets.shapes(n=32), preprocess=preprocess,
                               store="explorer.zarr")
    """

    def __init__(self, model: torch.nn.Module, dataset: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                 metric: str | None = None, background: bool | None = None, *,
                 page_size: int = 12, batch_size: int = 64,
                 params: Mapping[str, Mapping[str, Any]] | None = None,
                 store: str | os.PathLike | None = None, overwrite: bool = False) -> None:
        super().__init__()
        start = time.perf_counter()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if page_size < 1 or batch_size < 1:
            raise ValueError(f"page_size={page_size} and batch_size={batch_size} must be >= 1")
        self.model, self.preprocess = model, preprocess
        self.source: ImageSource = image_source(dataset, classes)
        if len(self.source) == 0:
            raise ValueError("the dataset has no images")
        self.metric = resolve_metric(metric, (*self.source.gaze, *(
            ["mask"] if self.source.data is not None and "mask" in self.source.data else [])))
        self.methods = list(methods) if methods is not None else registered_methods()
        for name in self.methods:
            get_method(name)  # unknown names fail now, with a did-you-mean
        self.params = {k: dict(v) for k, v in (params or {}).items()}
        self.page_size, self.batch_size = int(page_size), int(batch_size)
        self.background = in_kernel() if background is None else bool(background)
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.store: Store | None = (None if store is None
                                    else self._open_store(store, overwrite))
        self.num_classes: int | None = None
        self._predict()
        self.confusion = self._confusion()
        self._scores: dict[tuple[str, int], float] = {}
        self._maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._signed: dict[str, bool] = {}  # per method: drawn with a diverging colormap
        #: scores computed since the last write to the store, per method
        self._unsaved: dict[str, dict[int, float]] = {}
        #: (method, image) pairs whose map the store holds (the pages drawn)
        self._maps_saved: set[tuple[str, int]] = set()
        self._saved_at = time.perf_counter()
        self._store_lock = threading.Lock()
        self._restore()
        self._pair: tuple[int, int] | None = None
        self._order = np.arange(len(self.source))
        self.shown: list[int] = []
        #: the embedded ExplainerWidget of the image opened with :meth:`select`
        self.explainer: Any = None
        #: the last error ("Type: message"), ``None`` after a successful update
        self.error: str | None = None
        #: the gallery's message when nothing is shown (an empty filter result)
        self.message = ""
        #: runs the page computations (newest request supersedes, at its next chunk)
        self.worker = Worker(background=self.background, name="xaiwidgets-explorer")
        self._lock = self.worker.lock
        self._build()
        self.open_s = time.perf_counter() - start
        self._update()

    # ------------------------------------------------------------- predictions
    def _open_store(self, path: str | os.PathLike, overwrite: bool) -> Store:
        """The store at ``path`` for this model, dataset and preprocessing."""
        fingerprint = {
            "kind": "dataset-explorer", "model": architecture(self.model),
            "weights": weights_hash(self.model),
            "dataset": dataset_fingerprint(self.source, FINGERPRINT_SAMPLE),
            "settings": {"preprocess": describe(self.preprocess), "chunk": STORE_CHUNK}}
        return Store(path, fingerprint, strict=("kind", "model"), overwrite=overwrite)

    def _predict(self) -> None:
        """Predicted class and its probability for every image: read from the store, or
        one pass over the dataset (chunks of :data:`STORE_CHUNK` images, batches of
        ``batch_size``, no autograd), each finished chunk written to the store."""
        saved = self.store.result() if self.store is not None else None
        if saved is None:
            parts = chunks(self.source, STORE_CHUNK)
            done = self.store.done_chunks() if self.store is not None else []
            found = {i: self.store.chunk(i) for i in done}
            for i, indices in enumerate(parts):
                if i not in found:
                    found[i] = self._predict_chunk(indices)
                    if self.store is not None:
                        self.store.put_chunk(i, found[i])
            saved = xr.concat([found[i] for i in range(len(parts))], dim="image")
            if self.store is not None:
                self.store.put_result(saved)
        if self.num_classes is None:
            self._set_classes(int(saved.attrs["num_classes"]))
        self.predicted = saved["predicted"].values.astype(np.int64)
        self.confidence = saved["confidence"].values.astype(np.float64)

    def _predict_chunk(self, indices: np.ndarray) -> xr.Dataset:
        """The predictions for the images ``indices`` (consecutive), in batches."""
        predicted, confidence = [], []
        with model_guard(self.model, keep_inplace=True), torch.inference_mode():  # no hooks
            for start in range(0, len(indices), self.batch_size):
                x = chunk_images(self.source, indices[start:start + self.batch_size])
                x = x.to(self.device)
                logits = self.model(self.preprocess(x) if self.preprocess else x)
                if logits.ndim != 2:
                    raise ValueError(f"the model's output is {tuple(logits.shape)}; the "
                                     "explorer needs class scores (images, classes)")
                if self.num_classes is None:  # checked before anything is stored
                    self._set_classes(int(logits.shape[1]))
                p, k = torch.softmax(logits.float(), dim=1).max(dim=1)
                predicted.append(k.cpu().numpy())
                confidence.append(p.cpu().numpy())
        return xr.Dataset({"predicted": ("image", np.concatenate(predicted).astype(np.int64)),
                           "confidence": ("image", np.concatenate(confidence))},
                          attrs={"num_classes": self.num_classes})

    def _set_classes(self, num_classes: int) -> None:
        """The class names for a model with ``num_classes`` outputs; labels checked."""
        self.num_classes = num_classes
        self.classes = self._class_names()
        self.source.check_labels(len(self.classes))

    def _class_names(self) -> list[str]:
        names = self.source.classes
        if not names:
            return [str(k) for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a model with {self.num_classes} "
                             "outputs; pass classes= in the model's output order")
        return names

    @property
    def labels(self) -> np.ndarray | None:
        """The true class of every image (``None`` when the dataset has no labels)."""
        return self.source.labels

    def _confusion(self) -> xr.DataArray | None:
        if self.labels is None:
            return None
        counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predicted), 1)
        return xr.DataArray(counts, dims=("true", "predicted"),
                            coords={"true": self.classes, "predicted": self.classes},
                            name="count", attrs={"long_name": "images per (true, predicted)"})

    # ------------------------------------------------------------ stored scores
    def _score_log(self, method: str) -> str:
        """The store's log of ``method``'s scores: named after what they depend on (the
        metric, the method's params, the gaze data or mask the metric compares with,
        hashed once by :meth:`_restore`)."""
        key = json.dumps({"metric": self.metric, "params": self.params.get(method, {}),
                          "step": PERTURBATION_STEP if self.metric in PERTURBATION else None,
                          "data": self._metric_data}, sort_keys=True, default=repr)
        return f"scores-{method}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def _map_log(self, method: str) -> str:
        """The store's log of ``method``'s maps (of the pages drawn): named after the
        method's params."""
        key = json.dumps(self.params.get(method, {}), sort_keys=True, default=repr)
        return f"maps-{method}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def _restore(self) -> None:
        """The scores and the drawn pages' maps an earlier explorer wrote to the store
        (for these settings): a re-opened page needs no model call."""
        if self.store is None:
            return
        needs = () if self.metric in PERTURBATION else dataset_needs(self.metric)
        self._metric_data = variables_hash(self.source.data, needs) if needs else None
        for method in self.methods:
            for record in self.store.records(self._score_log(method), dim="image"):
                self._scores.update(((method, int(i)), float(v)) for i, v in zip(
                    record["image"].values, record["score"].values, strict=True))
            for record in self.store.records(self._map_log(method), dim="image"):
                self._signed[method] = bool(record.attrs.get("signed", 0))
                images = record["image"].values.astype(np.int64)
                self._maps_saved.update((method, int(i)) for i in images)
                for k in range(max(0, len(images) - KEEP_MAPS), len(images)):
                    self._maps[(method, int(images[k]))] = \
                        record["map"].values[k].astype(np.float32)
        while len(self._maps) > KEEP_MAPS:
            self._maps.popitem(last=False)

    def _save_maps(self, method: str, shown: Sequence[int]) -> None:
        """Write the maps of the page drawn that the store lacks (float16: for drawing)."""
        if self.store is None:
            return
        with self._lock:
            new = [i for i in shown if (method, i) not in self._maps_saved
                   and (method, i) in self._maps]
            maps = [self._maps[(method, i)] for i in new]
            signed = int(self._signed.get(method, False))
        if not new:
            return
        record = xr.Dataset({"map": (("image", "y", "x"), np.stack(maps).astype(np.float16))},
                            coords={"image": np.asarray(new, dtype=np.int64)},
                            attrs={"signed": signed})
        with self._store_lock:
            try:
                self.store.append(self._map_log(method), record)
            except Exception as err:  # noqa: BLE001 - the widget keeps working
                warnings.warn(f"could not write {method} maps to the store "
                              f"{str(self.store.path)!r}: {err}", stacklevel=2)
                return
        with self._lock:
            self._maps_saved.update((method, i) for i in new)

    def _save_scores(self, force: bool = False) -> None:
        """Write the scores computed since the last write (every :data:`FLUSH_S` s, or
        now with ``force``). A failed write is a warning: the scores stay shown."""
        if self.store is None:
            return
        with self._store_lock:
            if not force and time.perf_counter() - self._saved_at < FLUSH_S:
                return
            with self._lock:
                unsaved, self._unsaved = self._unsaved, {}
            self._saved_at = time.perf_counter()
            for method, scores in unsaved.items():
                record = xr.Dataset({"score": ("image", np.fromiter(scores.values(), float))},
                                    coords={"image": np.fromiter(scores, np.int64)})
                try:
                    self.store.append(self._score_log(method), record)
                except Exception as err:  # noqa: BLE001 - the widget keeps working
                    warnings.warn(f"could not write {method} scores to the store "
                                  f"{str(self.store.path)!r}: {err}", stacklevel=2)

    # ----------------------------------------------------------------- layout
    def _build(self) -> None:
        method = DEFAULT_METHOD if DEFAULT_METHOD in self.methods else self.methods[0]
        sort = [ORDER, f"confidence {DESCENDING}", f"confidence {ASCENDING}",
                f"{self.metric} {DESCENDING}", f"{self.metric} {ASCENDING}"]
        def dropdown(name, options, value, tooltip=""):
            return W.Dropdown(options=options, value=value, description=name, style=STYLE,
                              layout=W.Layout(**LAYOUT), tooltip=tooltip)
        self.controls: dict[str, W.ValueWidget] = {
            "method": dropdown("method", self.methods, method),
            "outcome": dropdown("outcome", list(OUTCOMES), ALL,
                                "correct or wrong predictions (needs labels)"),
            "class": dropdown("class", [ALL, *self.classes], ALL,
                              "the true class (the predicted one without labels)"),
            "sort": dropdown("sort", sort, ORDER,
                             f"↓: highest first, ↑: lowest first; {self.metric} is "
                             f"{'higher' if higher_is_better(self.metric) else 'lower'}-is-better"),
            "page": W.IntSlider(value=1, min=1, max=1, description="page", style=STYLE,
                                layout=W.Layout(**LAYOUT)),
        }
        self.controls["outcome"].disabled = self.labels is None
        for name, control in self.controls.items():
            control.observe(lambda change, name=name: self._on_value(name), names="value")
        self.status = W.HTML(layout=W.Layout(min_height="1.6em"))
        self.progress = W.FloatProgress(min=0.0, max=1.0, description="computing",
                                        style=STYLE, layout=W.Layout(**LAYOUT))
        set_visible(self.progress, False)
        self.pair_label = W.HTML()
        clear = W.Button(description="clear pair", icon="times", layout=W.Layout(width="120px"))
        clear.on_click(lambda _: self.filter_pair(None))
        self._pair_box = W.HBox([self.pair_label, clear])
        set_visible(self._pair_box, False)
        self.empty = W.HTML()
        self._tiles = [_Tile(self) for _ in range(self.page_size)]
        self.gallery = W.GridBox([t.box for t in self._tiles], layout=W.Layout(
            grid_template_columns="repeat(auto-fill, 236px)", grid_gap="6px", width="100%"))
        self.confusion_figure = self._confusion_widget()
        self._detail = W.VBox()
        side = [*(self.controls[n] for n in ("method", "outcome", "class", "sort", "page")),
                self._pair_box, self.progress, self.status]
        top = [W.VBox(side)] + ([self.confusion_figure] if self.confusion_figure else [])
        self.children = [W.HBox(top), self.empty, self.gallery, self._detail]

    def _confusion_widget(self) -> LiveFigureWidget | None:
        if self.confusion is None:
            return None
        # plain lists: plotly.js has no int64 typed arrays (a numpy int64 z draws nothing)
        counts = self.confusion.values.tolist()
        fig = LiveFigureWidget(go.Heatmap(
            z=counts, x=self.classes, y=self.classes, colorscale="Blues", showscale=False,
            text=[[str(c) for c in row] for row in counts], texttemplate="%{text}",
            hovertemplate=(
                "true %{y}<br>predicted %{x}<br>%{z} images<extra>click to show</extra>")))
        fig.update_layout(width=380, height=380, margin={"l": 70, "r": 10, "t": 40, "b": 60},
                          title={"text": "confusion (click a cell)", "font": {"size": 13}},
                          xaxis={"title": "predicted", "side": "bottom"},
                          yaxis={"title": "true", "autorange": "reversed"})
        fig.data[0].on_click(self._on_cell)
        return fig

    def _on_cell(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs and points.ys:
            self.filter_pair(points.ys[0], points.xs[0])

    # ---------------------------------------------------------------- filters
    def _class_index(self, name: str | int) -> int:
        if isinstance(name, (int, np.integer)) and 0 <= int(name) < self.num_classes:
            return int(name)
        if str(name) in self.classes:
            return self.classes.index(str(name))
        raise ValueError(f"unknown class {name!r}; classes are {self.classes}")

    def filter_pair(self, true: str | int | None, predicted: str | int | None = None) -> None:
        """Show only the images of class ``true`` predicted as ``predicted`` (as a click on
        that confusion cell does); ``filter_pair(None)`` clears it, and the class filter
        the click set, so every image shows again."""
        if true is None:
            self._pair = None
            with self._silenced():
                self.controls["class"].value = ALL
                self.controls["page"].value = 1
        else:
            if self.labels is None:
                raise ValueError("the dataset has no labels: there is no confusion matrix")
            pair = (self._class_index(true), self._class_index(predicted))
            self._pair = pair
            with self._silenced():
                self.controls["outcome"].value = ALL
                self.controls["class"].value = self.classes[pair[0]]
                self.controls["page"].value = 1
        self._guarded(self._update)

    def _candidates(self) -> np.ndarray:
        """The dataset indices passing the filters, in the chosen order."""
        keep = np.ones(len(self.source), dtype=bool)
        outcome, chosen = self.controls["outcome"].value, self.controls["class"].value
        labels = self.labels
        if outcome != ALL and labels is not None:
            keep &= (self.predicted == labels) == (outcome == "correct")
        if chosen != ALL:
            keep &= (labels if labels is not None else self.predicted) == self._class_index(chosen)
        if self._pair is not None:
            keep &= (labels == self._pair[0]) & (self.predicted == self._pair[1])
        return np.flatnonzero(keep)

    def _sorted(self, indices: np.ndarray) -> np.ndarray:
        sort = self.controls["sort"].value
        if sort == ORDER:
            return indices
        key, direction = sort.rsplit(" ", 1)
        if key == "confidence":
            values = self.confidence[indices]
        else:
            values = np.array([self._scores.get((self.method, int(i)), np.nan) for i in indices])
        # stable: ties keep dataset order; NaN scores (failed maps) go last either way
        signed = -values if direction == DESCENDING else values
        return indices[np.argsort(np.where(np.isnan(signed), np.inf, signed), kind="stable")]

    @property
    def method(self) -> str:
        """The method shown (the ``method`` control's value)."""
        return self.controls["method"].value

    # ------------------------------------------------------------ update loop
    #: the status line after a cancel
    CANCELLED = "cancelled: the page shows the scores computed so far"

    def _on_value(self, name: str) -> None:
        if self._state().quiet:  # the explorer's own change (per thread)
            return
        if name in ("outcome", "class"):
            self._pair = None  # the user's own filter replaces a confusion click
        if name != "page":
            with self._silenced():
                self.controls["page"].value = 1
        self._guarded(self._update)

    def _update(self) -> None:
        """Filter, sort and page; compute what the page needs (now or in the background)."""
        self.error = None
        candidates = self._candidates()
        by_metric = self.controls["sort"].value.startswith(f"{self.metric} ")
        method = self.method
        # sorting by the score needs every candidate's score; else only the page's
        needed = candidates if by_metric else self._page_of(self._sorted(candidates))
        missing = [int(i) for i in needed if (method, int(i)) not in self._scores]
        self.worker.submit(lambda token: self._job(token, method, missing, candidates))

    def _page_of(self, order: np.ndarray) -> np.ndarray:
        """The current page of ``order``; the page slider re-ranged to its length."""
        pages = max(1, -(-len(order) // self.page_size))
        with self._silenced():
            self.controls["page"].max = pages
            self.controls["page"].value = min(self.controls["page"].value, pages)
        return self._page_slice(order)

    def _page_slice(self, order: np.ndarray) -> np.ndarray:
        """The current page of ``order`` (the controls untouched)."""
        page = min(self.controls["page"].value, max(1, -(-len(order) // self.page_size)))
        return order[(page - 1) * self.page_size: page * self.page_size]

    def _job(self, token: Token, method: str, missing: list[int],
             candidates: np.ndarray) -> None:
        """Compute the ``missing`` scores chunk by chunk (a newer request stops it between
        chunks), then the page's maps that are not kept (scores read from the store),
        then show the page. Errors are shown inline."""
        try:
            start = time.perf_counter()
            if missing:
                self._announce(token, candidates)
            try:
                self._run(token, method, missing, score=True)
            finally:  # also when superseded or cancelled: what was computed is kept
                self._save_scores(force=True)
            unseen = [int(i) for i in self._page_slice(self._sorted(candidates))
                      if (method, int(i)) not in self._maps]
            if unseen and not missing:
                self._announce(token, candidates)
            self._run(token, method, unseen, score=False)
            with self.worker.publishing(token):
                set_visible(self.progress, False)
                self._order = self._sorted(candidates)
                self._draw(self._page_of(self._order))
                shown = list(self.shown)
                self.last_page_s = time.perf_counter() - start
                if missing or unseen:
                    what = f" + {self.metric}" if missing else " maps"
                    self.status.value = (f"<span style='color:#555'>{html.escape(method)}"
                                         f"{what} on {len(missing) or len(unseen)} images "
                                         f"in {self.last_page_s:.2f} s</span>")
            self._save_maps(method, shown)
        except Superseded:
            raise
        except Exception as err:
            with self.worker.publishing(token):  # a stale job's error is never shown
                self._hide_busy()
                self._show_error(err)

    def _announce(self, token: Token, candidates: np.ndarray) -> None:
        """In the background: the page's thumbnails (maps still blank) and the progress
        bar, before the computation."""
        if self.background:
            with self.worker.publishing(token):
                self._draw(self._page_of(self._sorted(candidates)))
                set_visible(self.progress, True)

    def _run(self, token: Token, method: str, indices: list[int], score: bool) -> None:
        """:meth:`_compute` on ``indices``, a page at a time (a newer request stops it
        between pages); new scores go to the store every :data:`FLUSH_S` seconds."""
        what = f"{html.escape(method)} and {self.metric}" if score else \
            f"{html.escape(method)} maps"
        for done in range(0, len(indices), self.page_size):
            chunk = indices[done:done + self.page_size]
            self.status.value = (f"<span style='color:#555'>computing {what}: "
                                 f"{done}/{len(indices)} images…</span>")
            if score:
                self._compute(method, chunk)
            else:
                self._compute(method, chunk, score=False)
            self.progress.value = (done + len(chunk)) / len(indices)
            token.check()
            if score:
                self._save_scores()

    def _compute(self, method: str, indices: list[int], score: bool = True) -> None:
        """Maps (and with ``score`` their scores) of ``method`` on the images ``indices``
        (one explainer)."""
        ex = Explainer(self.model, self.source.images(indices).to(self.device),
                       preprocess=self.preprocess, classes=self.classes,
                       progress=lambda done, total: self.worker.check())
        target = self.predicted[indices].tolist()
        maps = ex.explain(method, target=target, **self.params.get(method, {}))
        if maps.dims != ("image", "y", "x"):
            raise ValueError(f"{method} gave maps of dims {maps.dims}; the explorer needs one "
                             "map per image")
        if not score:
            scores = None
        elif self.metric in PERTURBATION:
            scores = PERTURBATION[self.metric][0](
                ex, maps, target, step=PERTURBATION_STEP, batch_size=self.batch_size).auc.values
        else:
            # any registered metric: gaze, mask, complexity, faithfulness, robustness
            scores = score_maps(self.metric, maps,
                                references(self.source.data, indices, [self.metric]),
                                explainer=ex, method=method, target=target,
                                params=self.params.get(method, {}))
        with self._lock:
            self._signed[method] = bool(int(maps.attrs.get("signed", 0)))
            for k, i in enumerate(indices):
                if scores is not None:
                    value = float(np.asarray(scores)[k])
                    self._scores[(method, i)] = value
                    self._unsaved.setdefault(method, {})[i] = value
                self._maps[(method, i)] = maps.values[k]
                self._maps.move_to_end((method, i))
            while len(self._maps) > KEEP_MAPS:
                self._maps.popitem(last=False)

    # ------------------------------------------------------------ background
    def _hide_busy(self) -> None:
        set_visible(self.progress, False)

    # ---------------------------------------------------------------- drawing
    def _draw(self, page: np.ndarray) -> None:
        self.shown = [int(i) for i in page]
        images = self.source.images(self.shown) if self.shown else None
        for k, tile in enumerate(self._tiles):
            if k < len(self.shown):
                tile.show(self.shown[k], images[k])
            else:
                tile.hide()
        total = int(self.controls["page"].max)
        if not self.shown:
            filters = [f"{n}={self.controls[n].value}" for n in ("outcome", "class")
                       if self.controls[n].value != ALL]
            if self._pair is not None:
                filters = [f"true={self.classes[self._pair[0]]}, "
                           f"predicted={self.classes[self._pair[1]]}"]
            self.message = (f"No image matches {', '.join(filters) or 'the filters'}: "
                            "change the filters to see images.")
        else:
            self.message = ""
        self.empty.value = (f"<i style='color:#555'>{html.escape(self.message)}</i>"
                            if self.message else "")
        set_visible(self.gallery, bool(self.shown))
        if self._pair is not None:
            true, pred = (self.classes[k] for k in self._pair)
            self.pair_label.value = (f"showing true <b>{html.escape(true)}</b> predicted as "
                                     f"<b>{html.escape(pred)}</b>")
        set_visible(self._pair_box, self._pair is not None)
        self.controls["page"].description = f"page (of {total})"

    def caption(self, index: int) -> str:
        """The thumbnail's text: index, true and predicted class, confidence, score."""
        pred = self.classes[self.predicted[index]]
        parts = [f"#{index}"]
        if self.labels is not None:
            parts.append(f"true {self.classes[self.labels[index]]}")
        parts.append(f"pred {pred} ({self.confidence[index]:.0%})")
        score = self._scores.get((self.method, index))
        parts.append(f"{self.metric} {'…' if score is None else f'{score:.3f}'}")
        return " · ".join(parts)

    def thumbnail(self, index: int, image: Any = None) -> np.ndarray:
        """The image beside its map over the image, as RGB uint8 (H, 2W + 4, 3)."""
        image = self.source.images([index])[0] if image is None else image
        picture = np.round(rendering.display_image(image) * 255).astype(np.uint8)
        values = self._maps.get((self.method, index))
        shown = (rendering.overlay(values, image, signed=self._signed.get(self.method, False))
                 if values is not None else np.full_like(picture, 235))
        gap = np.full((picture.shape[0], 4, 3), 255, dtype=np.uint8)
        return np.concatenate([picture, gap, shown], axis=1)

    # ---------------------------------------------------------------- results
    @property
    def results(self) -> xr.Dataset:
        """The scores computed so far, in ``xw.evaluate``'s layout: dims (image, method),
        one variable named after the metric (NaN where not computed), image coords
        ``label``, ``predicted``, ``probability``, ``correct``, ``target``."""
        with self._lock:
            keys = list(self._scores)
        images = np.array(sorted({i for _, i in keys}), dtype=np.int64)
        methods = [m for m in self.methods if any(k[0] == m for k in keys)]
        values = np.full((len(images), len(methods)), np.nan)
        row = {int(i): r for r, i in enumerate(images)}
        for (m, i), score in list(self._scores.items()):
            if m in methods:
                values[row[i], methods.index(m)] = score
        predicted = self.predicted[images]
        coords: dict[str, Any] = {
            "image": images, "method": methods, "method_name": ("method", methods),
            "predicted": ("image", predicted),
            "probability": ("image", self.confidence[images]),
            "target": ("image", predicted),
        }
        if self.labels is not None:
            coords["label"] = ("image", self.labels[images])
            coords["correct"] = ("image", predicted == self.labels[images])
        attrs = {"higher_is_better": int(higher_is_better(self.metric)),
                 "needs": "model" if self.metric in PERTURBATION else
                 _metrics.METRICS[self.metric].needs}
        return xr.Dataset({self.metric: (("image", "method"), values, attrs)}, coords=coords,
                          attrs={"metric": self.metric, "target": "predicted",
                                 "classes": list(self.classes)})

    # ------------------------------------------------------------------ handout
    def _export_sweep(self) -> list[str]:
        """Handouts sweep the method and the page (under the filters set now)."""
        return ["method", "page"]

    def _export_figures(self) -> list:
        return [self.confusion_figure] if self.confusion_figure is not None else []

    def _export_html_parts(self) -> list[str]:
        """The page as shown: each thumbnail (image | map) with its caption."""
        import base64

        tiles = []
        for tile in self._tiles:
            if tile.index is None:
                continue
            uri = "data:image/png;base64," + base64.b64encode(tile.image.value).decode()
            tiles.append(f"<figure style='margin:0;width:228px'><img src='{uri}' alt='image "
                         f"{tile.index}' style='width:228px'><figcaption>{tile.caption.value}"
                         "</figcaption></figure>")
        empty = f"<p><i>{html.escape(self.message)}</i></p>" if self.message else ""
        return [empty + "<div style='display:flex;flex-wrap:wrap;gap:6px'>"
                + "".join(tiles) + "</div>"]

    # ------------------------------------------------------------------ detail
    def release(self) -> None:
        """Drop the thumbnails' cached maps (the scores stay: they are the results)."""
        self._maps.clear()

    def select(self, index: int) -> Any:
        """Open image ``index`` in the embedded :class:`~xaiwidgets.ExplainerWidget`
        (``x.explainer``), showing the current method."""
        from .explainer_widget import ExplainerWidget

        index = int(index)
        if not 0 <= index < len(self.source):
            raise IndexError(f"image {index} out of range 0..{len(self.source) - 1}")
        self.explainer = ExplainerWidget(
            self.model, self.source.images([index]), preprocess=self.preprocess,
            classes=self.classes, method=self.method, methods=self.methods,
            background=self.background,
            gaze=self.source.data["gfdm"].values[[index]] if "gfdm" in self.source.gaze
            else None)
        # the explainer holds this one image: its picker and title say the dataset's index
        name = f"image {index}"
        with self.explainer.worker.lock, self.explainer._silenced():
            self.explainer.controls["image"].options = [(name, 0)]
            self.explainer.grid.set_title(0, name)
        head = W.HTML(f"<b>{name}</b>: {html.escape(self.caption(index))}")
        # the image shown before: its widgets and caches go
        replace_children(self._detail, [head, self.explainer])
        self.selected = index
        return self.explainer


def thumbnail_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 picture, fast (PIL, light compression): a page
    of thumbnails is encoded at every page turn."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


class _Tile:
    """One thumbnail of the gallery: the picture and its map, a caption, an open button."""

    def __init__(self, explorer: DatasetExplorer) -> None:
        self.explorer = explorer
        self.index: int | None = None
        self.image = W.Image(format="png", layout=W.Layout(width="228px"))
        self.caption = W.HTML(layout=W.Layout(width="228px"))
        self.button = W.Button(description="open", icon="search",
                               layout=W.Layout(width="80px"))
        self.button.on_click(lambda _: self.explorer._guarded(
            lambda: self.explorer.select(self.index)))
        self.box = W.VBox([self.image, self.caption, self.button],
                          layout=W.Layout(border="1px solid #ddd", padding="2px"))

    def show(self, index: int, image: Any) -> None:
        ex = self.explorer
        self.index = index
        self.image.value = thumbnail_png(ex.thumbnail(index, image))
        wrong = ex.labels is not None and ex.labels[index] != ex.predicted[index]
        color = "#b00020" if wrong else "#222"
        self.caption.value = (f"<span style='font-size:11px;color:{color}'>"
                              f"{html.escape(ex.caption(index))}</span>")
        set_visible(self.box, True)

    def hide(self) -> None:
        self.index = None
        set_visible(self.box, False)
