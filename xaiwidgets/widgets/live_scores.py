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
import xarray as xr

from ..evaluation import metrics, perturbation
from ..explainer import Explainer
from .figures import LiveFigureWidget

#: fraction of the pixels removed / inserted per step of the curves
STEP = 0.05
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

    >>> scores, curves = score_map(ex, ex.explain("gradcam"))       # doctest: +SKIP
    >>> sorted(scores)                                              # doctest: +SKIP
    ['deletion', 'insertion']
    """
    if explainer.n_images != 1:
        raise ValueError(f"score_map scores one image; the explainer has {explainer.n_images}")
    scores: dict[str, float] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if gaze is not None:
        reference = np.asarray(gaze, dtype=np.float64)
        if reference.shape != saliency.shape[-2:]:
            raise ValueError(f"the gaze map is {reference.shape}, the map "
                             f"{tuple(saliency.shape[-2:])}: give one (y, x) map per image")
        for name in ("pcc", "sim"):
            values = np.asarray(saliency.values, dtype=np.float64).reshape(reference.shape)
            scores[name] = float(np.asarray(metrics.METRICS[name](values, reference)))
    for name, curve_of in (("deletion", perturbation.deletion),
                           ("insertion", perturbation.insertion)):
        if check is not None:
            check()
        result = curve_of(explainer, saliency, step=step, batch_size=batch_size)
        scores[name] = float(result.auc.values[0])
        curves[name] = (result.fraction.values, result.curve.values[0])
    return scores, curves


class LiveScores(W.VBox):
    """The panel: a line of scores and a small plot of the deletion/insertion curves.

    ``update(explainer, saliency, gaze=None)`` computes and shows them (call it after
    the map is drawn); ``scores`` and ``curves`` hold the last values; ``clear()``
    marks them stale while a new map is computed.
    """

    def __init__(self, step: float = STEP) -> None:
        super().__init__()
        self.step = step
        self.scores: dict[str, float] = {}
        self.curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.table = W.HTML(layout=W.Layout(min_height="1.6em"))
        self.figure = LiveFigureWidget(
            [go.Scatter(x=[], y=[], name=name, mode="lines", line={"color": color})
             for name, color in (("deletion", "#b00020"), ("insertion", "#1f77b4"))])
        self.figure.update_layout(
            width=300, height=200, margin={"l": 40, "r": 10, "t": 10, "b": 35},
            xaxis={"title": "fraction of pixels", "range": [0, 1]},
            yaxis={"title": "probability", "range": [0, 1.02]},
            legend={"orientation": "h", "y": 1.15, "x": 0}, showlegend=True)
        self.children = [self.table, self.figure]
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

    def show(self, scores: dict[str, float], curves: dict[str, tuple[np.ndarray, np.ndarray]],
             ) -> None:
        """Draw given scores and curves."""
        self.scores, self.curves = dict(scores), dict(curves)
        cells = []
        for name, value in scores.items():
            higher, doc = SCORES[name]
            arrow = "↑" if higher else "↓"
            cells.append(f"<span title='{html.escape(doc)} ({arrow} better)'>"
                         f"<b>{name}</b> {value:.3f} {arrow}</span>")
        self.table.value = " · ".join(cells)
        with self.figure.batch_update():
            for trace in self.figure.data:
                x, y = curves.get(trace.name, ([], []))
                trace.x, trace.y = list(map(float, x)), list(map(float, y))

    def show_error(self, err: BaseException) -> None:
        self.clear(f"scores unavailable: {type(err).__name__}: {err}")

