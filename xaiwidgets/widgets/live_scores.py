"""Live scores beside a map: is it faithful to the model, does it agree with people's gaze?

:class:`LiveScores` is a small panel the widgets put beside their heatmap. After a
map is drawn it computes

* the **deletion** and **insertion** AUC of the map (Petsiuk et al.; the softmax
  probability of the explained class while the most relevant pixels are removed /
  revealed, 5 % of the pixels per step), drawn as two small curves;
* **PCC** and **SIM** against a gaze map, when one is given.

:func:`score_map` is the computation without the panel::

    ex = xw.Explainer(model, images[:1], preprocess=preprocess)
    scores, curves = score_map(ex, ex.explain("gradcam"), gaze=ds.gfdm.values[0])
    scores["deletion"], scores["pcc"]
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr

from ..evaluation import metrics, perturbation, sanity
from ..explainer import Explainer
from .controls import LAYOUT, STYLE, set_visible
from .figures import LiveFigureWidget

#: fraction of the pixels removed / inserted per step of the curves
STEP = 0.05
#: the curves' plot: its height without legend, the bottom margin for the tick labels and
#: the axis title, and one row of the legend below them (one map's two curves), in px
PLOT_PX, AXIS_PX, LEGEND_ROW_PX = 190, 40, 18
#: one colour per scored map (deletion solid, insertion dotted)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
#: score name -> (higher is better, what it says)
SCORES = {
    "deletion": (False, "AUC of the probability while the most relevant pixels are removed"),
    "insertion": (True, "AUC of the probability while the most relevant pixels are revealed"),
    "pcc": (True, "Pearson correlation with the gaze map"),
    "sim": (True, "histogram intersection with the gaze map"),
}


def score_map(explainer: Explainer, saliency: xr.DataArray, gaze: Any = None, *,
              step: float = STEP, batch_size: int = 64,
              check: Callable[[], None] | None = None,
              ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Deletion/insertion AUC of one map (and PCC/SIM against ``gaze`` when given).

    ``saliency`` is the explainer's map of its first image (dims ``image, y, x``);
    ``gaze`` a density map (y, x) such as ``ds.gfdm[i]``. ``check`` is called between
    the parts (a background job's cancellation point). Returns the scores and the
    curves ``{"deletion": (fractions, probabilities), "insertion": ...}``.
    A clip's map (``image, t, y, x``) gets PCC/SIM against a gaze volume (t, y, x),
    per frame then averaged; deletion/insertion are for still images only (no curves).

    >>> scores, curves = score_map(ex, ex.explain("gradcam"))       # doctest: +SKIP
    >>> sorted(scores)                                              # doctest: +SKIP
    ['deletion', 'insertion']
    """
    if explainer.n_images != 1:
        raise ValueError(f"score_map scores one image; the explainer has {explainer.n_images}")
    scores: dict[str, float] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    clip = "t" in saliency.dims
    if gaze is not None:
        reference = np.asarray(gaze, dtype=np.float64)
        one = saliency.isel(image=0) if "image" in saliency.dims else saliency
        if reference.shape != one.shape:
            raise ValueError(f"the gaze map is {reference.shape}, the map "
                             f"{tuple(one.shape)}: give one (y, x) map per image"
                             + (" ((t, y, x) volume per clip)" if clip else ""))
        for name in ("pcc", "sim"):  # clips: per frame, then the mean over t
            value = metrics.METRICS[name](one, xr.DataArray(reference, dims=one.dims))
            scores[name] = float(np.asarray(value))
    if clip:
        return scores, curves
    for name, curve_of in (("deletion", perturbation.deletion),
                           ("insertion", perturbation.insertion)):
        if check is not None:
            check()
        result = curve_of(explainer, saliency, step=step, batch_size=batch_size)
        scores[name] = float(result.auc.values[0])
        curves[name] = (result.fraction.values, result.curve.values[0])
    return scores, curves


class LiveScores(W.VBox):
    """The panel: a line of scores per map and a small plot of the deletion/insertion curves.

    ``update(explainer, saliency, gaze=None)`` computes and shows them; widgets call
    :meth:`run` from their background job once the map is drawn. ``scores`` and
    ``curves`` hold the last values (per label when several maps are scored);
    ``clear()`` marks them stale while a new map is computed. ``maps``: how many maps are
    scored together (the plot leaves room for their legend).
    """

    def __init__(self, step: float = STEP, enabled: bool = True, maps: int = 1) -> None:
        super().__init__()
        self.step = step
        #: :meth:`run` scores only when enabled (widgets: in the background, where the
        #: scores never delay the map; set it to True to score synchronously too)
        self.enabled = enabled
        self.scores: dict[str, Any] = {}
        self.curves: dict[str, Any] = {}
        self.table = W.HTML(layout=W.Layout(min_height="1.6em"))
        self.figure = LiveFigureWidget()
        # room for the legend of ``maps`` maps (two curves each) below the axis title, set
        # once: a size changed later is lost when a page first draws the plot in a hidden tab
        legend_px = LEGEND_ROW_PX * max(1, int(maps))
        self.figure.update_layout(
            width=300, height=PLOT_PX + legend_px,
            margin={"l": 40, "r": 10, "t": 10, "b": AXIS_PX + legend_px},
            xaxis={"title": "fraction of pixels", "range": [0, 1]},
            yaxis={"title": "probability", "range": [0, 1.02]},
            # below the axis title, two entries (a map's deletion and insertion) a row
            legend={"font": {"size": 9}, "orientation": "h", "yref": "container", "y": 0,
                    "yanchor": "bottom", "x": 0, "entrywidthmode": "fraction",
                    "entrywidth": 0.5},
            showlegend=True)
        #: the curves' plot in a box (plotly's ``layout`` is not a widget layout: hide the box)
        self.figure_box = W.Box([self.figure])
        self.children = [self.table, self.figure_box]
        self.clear()

    def clear(self, message: str = "scores: computing…") -> None:
        self.scores, self.curves = {}, {}
        self.table.value = f"<span style='color:#777'>{html.escape(message)}</span>"

    def update(self, explainer: Explainer, saliency: xr.DataArray, gaze: Any = None,
               check: Callable[[], None] | None = None) -> dict[str, float]:
        """Compute and show the scores of ``saliency`` (one image); returns them."""
        scores, curves = score_map(explainer, saliency, gaze, step=self.step, check=check)
        if check is not None:
            check()
        self.show(scores, curves)
        return scores

    def run(self, worker: Any, token: Any, explainer: Explainer,
            maps: xr.DataArray | dict[str, xr.DataArray], gaze: Any = None) -> None:
        """In a widget's job, after its map is drawn: score ``maps`` (one, or one per
        label) and show them. A newer request stops it between curves; an error is
        shown in the panel, never as the widget's error."""
        from .worker import Superseded

        if not self.enabled:
            with worker.publishing(token):
                self.clear("live scores are computed in the background (in a kernel); "
                           "set w.live.enabled = True to score here too")
            return
        # its own explainer: the scores' model calls must not drive the widget's progress bar
        explainer = Explainer(explainer.model, explainer.images,
                              preprocess=explainer.preprocess, progress=False)
        many = isinstance(maps, dict)
        maps = dict(maps) if many else {"": maps}
        with worker.publishing(token):
            self.clear()
        try:
            results = {label: score_map(explainer, da, gaze, step=self.step,
                                        check=token.check) for label, da in maps.items()}
        except Superseded:
            raise
        except Exception as err:
            with worker.publishing(token):
                self.show_error(err)
            return
        with worker.publishing(token):
            if many:
                self.show_many(results)
            else:
                self.show(*results[""])

    def show(self, scores: dict[str, float], curves: dict[str, tuple[np.ndarray, np.ndarray]],
             ) -> None:
        """Draw the scores and curves of one map."""
        self.show_many({"": (scores, curves)})
        self.scores, self.curves = dict(scores), dict(curves)

    def show_many(self, results: dict[str, tuple[dict[str, float], dict[str, Any]]]) -> None:
        """Draw ``{label: (scores, curves)}``: a line per label, two curves per label."""
        self.scores = {label: dict(r[0]) for label, r in results.items()}
        self.curves = {label: dict(r[1]) for label, r in results.items()}
        lines, traces = [], []
        for k, (label, (scores, curves)) in enumerate(results.items()):
            cells = [] if "deletion" in scores else [
                "<span style='color:#777'>deletion/insertion: still images only</span>"]
            for name, value in scores.items():
                higher, doc = SCORES[name]
                arrow = "↑" if higher else "↓"
                cells.append(f"<span title='{html.escape(doc)} ({arrow} better)'>"
                             f"<b>{name}</b> {value:.3f} {arrow}</span>")
            prefix = f"<i>{html.escape(label)}</i>: " if label else ""
            lines.append(prefix + " · ".join(cells))
            color = COLORS[k % len(COLORS)]
            for name, dash in (("deletion", "solid"), ("insertion", "dot")):
                x, y = curves.get(name, ([], []))
                traces.append(go.Scatter(
                    x=[float(v) for v in x], y=[float(v) for v in y], mode="lines",
                    name=f"{label} {name}".strip(), line={"color": color, "dash": dash}))
        self.table.value = "<br>".join(lines)
        # clips have no curves (deletion/insertion: still images only): no empty plot
        set_visible(self.figure_box, any(len(c) for r in results.values() for c in r[1].values()))
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_traces(traces)

    def show_error(self, err: BaseException) -> None:
        self.clear(f"scores unavailable: {type(err).__name__}: {err}")


NONE = "none"


class Randomizer:
    """The sanity toggle: a ``randomize`` dropdown and the randomised model copies.

    Options: ``"none"`` (the user's model) or a layer: cascading randomisation
    (Adebayo et al.) of a copy of the model from the logits down to that layer
    (:func:`xaiwidgets.evaluation.sanity.randomized_copy`). Copies are made once per
    layer; the user's model is never modified.

    >>> r = Randomizer(model, example)                                  # doctest: +SKIP
    >>> r.control.value = r.layers[1]; r.model() is not model           # doctest: +SKIP
    True
    """

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, seed: int = 0) -> None:
        self.original, self.example, self.seed = model, example, seed
        #: the randomisable layers, top (logits) first
        self.layers = sanity.weight_layers(model, example)[::-1]
        options = [(NONE, NONE)] + [(f"logits → {name}", name) for name in self.layers]
        self.control = W.Dropdown(
            options=options, value=NONE, description="randomize", style=STYLE,
            layout=W.Layout(**LAYOUT),
            tooltip="sanity check: re-initialise a copy of the model from the logits down "
                    "to this layer; a map that explains the model must change")
        self._copies: dict[str, torch.nn.Module] = {}

    def model(self, value: str | None = None) -> torch.nn.Module:
        """The model for ``value`` (default: the control's): the original or a random copy."""
        value = self.control.value if value is None else value
        if value == NONE:
            return self.original
        if value not in self._copies:
            self._copies[value] = sanity.randomized_copy(self.original, self.example, value,
                                                         seed=self.seed)
        return self._copies[value]
