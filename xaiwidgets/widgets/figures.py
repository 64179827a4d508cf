"""Plotly figures of heatmaps over images, built once and updated in place.

:class:`MapGrid` is the one figure type of every widget: a grid of panels, each an
image trace with a heatmap trace over it. Colours come from
:mod:`xaiwidgets.rendering`, so the figure and a PNG export look the same.

>>> import numpy as np
>>> grid = MapGrid(2, titles=["a", "b"])
>>> grid.show(0, np.random.rand(8, 8), image=np.random.rand(3, 8, 8))
>>> grid.restyle(colormap="viridis", opacity=0.5)
>>> grid.figure.data[1].opacity
0.5
"""

from __future__ import annotations

import base64
import contextlib
import copy
import math
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import matplotlib
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from traitlets import observe

from .. import rendering

#: widest figure (px) that fits a notebook's output area at a 900 px window (720 px in
#: JupyterLab 4 with the side bar closed; Notebook 7 is wider)
FIT_PX = 700

#: significant digits (relative to the map's largest |value|) sent to the browser:
#: the JSON shrinks ~3x and no colour changes
DIGITS = 5


@lru_cache(maxsize=32)
def colorscale(name: str, signed: bool = False, steps: int = 17) -> tuple[tuple[float, str], ...]:
    """A matplotlib colormap as a plotly colorscale, with the transparency of
    :func:`xaiwidgets.rendering.coverage` (so PNG export and figure agree).

    >>> colorscale("gray", steps=2)
    ((0.0, 'rgba(0,0,0,1)'), (1.0, 'rgba(255,255,255,1)'))
    """
    cmap = matplotlib.colormaps[name]
    stops = np.linspace(0.0, 1.0, steps)
    rgb = np.round(np.asarray(cmap(stops))[:, :3] * 255).astype(int)
    alpha = rendering.coverage(stops, signed)
    return tuple((float(s), "rgba({},{},{},{:.3g})".format(*c, a))
                 for s, c, a in zip(stops, rgb, alpha, strict=True))


def display_values(values: np.ndarray, digits: int = DIGITS) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits of their largest magnitude.

    >>> display_values(np.array([1.23456789e-7, 2e-9]), digits=3)
    array([1.23e-07, 2.00e-09])
    """
    scale = float(np.nanmax(np.abs(values))) if np.size(values) else 0.0
    if not np.isfinite(scale) or scale == 0.0:
        return values
    return np.round(values, digits - 1 - math.floor(math.log10(scale)))


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` × ``factor`` blocks (edges padded by repetition).

    >>> block_mean(np.arange(16.0).reshape(4, 4), 2)
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    if factor <= 1:
        return values
    h, w = values.shape
    padded = np.pad(values, ((0, -h % factor), (0, -w % factor)), mode="edge")
    return padded.reshape(padded.shape[0] // factor, factor, -1, factor).mean(axis=(1, 3))


def image_uri(image: Any) -> str:
    """An image (3,H,W)/(H,W,3) as a PNG data URI for a plotly ``Image`` trace."""
    rgb = np.round(rendering.display_image(image) * 255).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(rendering.png_bytes(rgb)).decode()


class LiveFigureWidget(go.FigureWidget):
    """A plotly ``FigureWidget`` that shows the figure as it is now, in any page.

    plotly sends in-place edits (``restyle``, ``update``) as one-off messages and keeps
    the traces of construction time in its synced ``_widget_data``. Two ways a page can
    miss edits, both fixed here:

    * a page whose widget manager asks for the state *after* the edits (Voilà runs the
      notebook before the browser connects; a reloaded JupyterLab tab) drew those
      first, empty traces: a request for the whole state serializes the current traces
      and layout instead;
    * an edit that arrives while the page is still loading plotly's JavaScript (an
      anywidget module: its model applies edits only once loaded; Voilà connects while
      a background computation publishes) is dropped, and the plot is drawn from the
      older state. So the front end counts its views (ipywidgets' ``_view_count``), and
      a new view gets the whole figure (traces replaced, layout set) once it is drawn
      (plotly's first layout report) - then plotly's JavaScript is surely running.

    :meth:`batch_update` and :meth:`resync` hold one lock, so a re-sync from the
    kernel's thread never interleaves with a worker thread's edit.

    >>> fig = LiveFigureWidget(go.Heatmap())
    >>> fig.data[0].z = [[1, 2]]
    >>> fig.get_state()["_widget_data"][0]["z"]
    [[1, 2]]
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._edit_lock = threading.RLock()
        #: a view appeared: re-sync when it reports its first drawing
        self._resync_due = False
        super().__init__(*args, **kwargs)
        self._view_count = 0  # ask the front end to count its views

    def get_state(self, key: Any = None, drop_defaults: bool = False) -> dict[str, Any]:
        state = super().get_state(key=key, drop_defaults=drop_defaults)
        # a new view or a late page asks for everything: the figure as it is now (not while
        # plotly's constructor opens the comm, before the traces exist)
        if key is None and hasattr(self, "_layout_obj"):
            with self._edit_lock:
                for name, value in (("_widget_data", self._data),
                                    ("_widget_layout", self._layout_obj._props)):
                    to_json = self.trait_metadata(name, "to_json", self._trait_to_json)
                    state[name] = to_json(copy.deepcopy(value), self)
        return state

    @contextlib.contextmanager
    def batch_update(self) -> Iterator[None]:
        """plotly's ``batch_update`` (one message for all edits), under the edit lock."""
        with self._edit_lock, super().batch_update():
            yield

    def resync(self) -> None:
        """Send the whole current figure to every view: its traces replaced by the
        current ones, its layout set to the current one."""
        with self._edit_lock:
            if self._data:
                self._send_deleteTraces_msg(list(range(len(self._data))))
                self._send_addTraces_msg(copy.deepcopy(self._data))
            self._send_relayout_msg(copy.deepcopy(self._layout))

    @observe("_view_count")
    def _on_view_count(self, change: dict[str, Any]) -> None:
        old, new = change["old"], change["new"]
        if isinstance(old, int) and isinstance(new, int) and new > old:
            self._resync_due = True
            # applied at once when plotly's JavaScript already runs in the page (its
            # drawing was reported first); else the drawing's report brings it again
            self.resync()

    @observe("_js2py_layoutDelta")
    def _on_view_drawn(self, change: dict[str, Any]) -> None:
        if self._resync_due and change["new"]:
            self._resync_due = False
            self.resync()


def fit_title(title: str, chars: int) -> str:
    """``title`` shortened to ``chars`` characters with an ellipsis in the middle
    (a layer name keeps its start and its end, which tell layers apart).

    >>> fit_title("features.27", 20), fit_title("blocks.10.mlp.act_layer_norm", 16)
    ('features.27', 'blocks.…yer_norm')
    """
    if len(title) <= chars:
        return title
    head = (chars - 1) // 2
    return title[:head] + "…" + title[len(title) - (chars - 1 - head):]


class MapGrid:
    """A grid of panels, each a heatmap over an image, in one ``go.FigureWidget``.

    Traces are made once; :meth:`show` and :meth:`restyle` change them in place
    inside ``batch_update`` (one message to the browser per call).

    Parameters
    ----------
    n
        Number of panels.
    cols
        Panels per row (default: all in one row up to 4, then a square-ish grid).
    titles
        Panel titles.
    panel_px
        Height of one panel in pixels.
    colorbar
        Show a colour bar (only meaningful with one panel: panels have their own ranges).
    resolution
        Most heatmap cells per side sent to the browser (default ``panel_px``: no more
        than the screen shows); larger maps are block-averaged for display only.
    short_titles
        Shorten titles that would overlap the next panel's (an ellipsis in the middle;
        the whole title shows on hover), in a smaller font on small panels: for
        small multiples titled by layer names.
    """

    def __init__(self, n: int, cols: int | None = None, titles: Sequence[str] | None = None,
                 panel_px: int = 320, colorbar: bool | None = None,
                 resolution: int | None = None, short_titles: bool = False) -> None:
        if n < 1:
            raise ValueError("a MapGrid needs at least one panel")
        self.short_titles = bool(short_titles)
        self.n = n
        self.resolution = resolution or panel_px
        self.cols = cols or (n if n <= 4 else math.ceil(math.sqrt(n)))
        self.rows = math.ceil(n / self.cols)
        colorbar = n == 1 if colorbar is None else colorbar
        self.panel_px = panel_px
        # a blank title would get no annotation, and set_title needs one per panel
        full = [t or " " for t in titles] if titles is not None else [" "] * n
        titles = [fit_title(t, self._title_chars()) for t in full]
        base = make_subplots(rows=self.rows, cols=self.cols, subplot_titles=titles,
                             horizontal_spacing=0.02 + 0.06 / self.cols,
                             vertical_spacing=0.08 / self.rows + 0.02)
        for i in range(n):
            row, col = divmod(i, self.cols)
            base.add_trace(go.Image(hoverinfo="skip", name="image"), row=row + 1, col=col + 1)
            base.add_trace(
                go.Heatmap(showscale=colorbar and i == 0, name="map", hoverongaps=False,
                           colorbar=dict(thickness=14, xpad=4),  # room for the maps
                           hovertemplate="x=%{x} y=%{y}<br>%{z:.4g}<extra></extra>"),
                row=row + 1, col=col + 1,
            )
        base.update_xaxes(showticklabels=False, showgrid=False, zeroline=False,
                          constrain="domain")
        # images grow downwards: reverse y, and keep pixels square in every panel
        base.update_yaxes(showticklabels=False, showgrid=False, zeroline=False,
                          autorange="reversed", constrain="domain")
        for i in range(n):
            suffix = "" if i == 0 else str(i + 1)
            base.layout[f"yaxis{suffix}"].scaleanchor = f"x{suffix}"
        width = None if self.cols > 1 else int(panel_px * 1.25)
        base.update_layout(
            height=int(panel_px * self.rows + 40), width=width,
            margin=dict(l=10, r=10, t=40, b=24), plot_bgcolor="white",
        )
        # small panels: smaller titles, and the whole title on hover when it was shortened
        for annotation, title in zip(base.layout.annotations, full, strict=False):
            if self.short_titles:
                annotation.font.size = self._title_px()
                annotation.hovertext = title if annotation.text != title else None
        self.figure = LiveFigureWidget(base)
        self._maps: list[np.ndarray | None] = [None] * n
        self._signed = [False] * n
        self._limits: list[tuple[float, float] | None] = [None] * n
        self.colormap: str = "auto"
        self._scales: dict[int, tuple] = {}  # colorscale last given to each panel
        self.opacity: float = 0.6

    def heatmap(self, i: int) -> go.Heatmap:
        """The heatmap trace of panel ``i``."""
        return self.figure.data[2 * i + 1]

    def image(self, i: int) -> go.Image:
        """The image trace of panel ``i``."""
        return self.figure.data[2 * i]

    def set_title(self, i: int, title: str) -> None:
        """Change panel ``i``'s title (a subplot-title annotation)."""
        annotations = self.figure.layout.annotations
        if i < len(annotations):
            short = fit_title(title, self._title_chars())
            annotations[i].text = short
            if self.short_titles:
                annotations[i].hovertext = title if short != title else None

    def _title_px(self) -> int:
        """Font size of the panel titles: 16 px (plotly's) on large panels, 12 on small."""
        return 16 if self.panel_px >= 250 else 12

    def _title_chars(self) -> int:
        """Characters of a title that fit above one panel (about 0.6 em per character;
        no limit without ``short_titles``)."""
        if not self.short_titles:
            return 10**9
        width = self.panel_px * (1.25 if self.cols == 1 else 1.0)
        return max(8, int(width / (0.6 * self._title_px())))

    def show(self, i: int, values: Any, image: Any = None, title: str | None = None,
             signed: bool = False, limits: tuple[float, float] | None = None) -> None:
        """Put a 2-D map (and optionally a new image, or its PNG data URI) into panel ``i``.

        ``limits``: the colour range (default: the map's own; a clip's frames share
        the range of the whole clip)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"panel {i} takes a 2-D map, got shape {values.shape}")
        self._maps[i], self._signed[i] = values, bool(signed)
        self._limits[i] = limits
        factor = math.ceil(max(values.shape) / self.resolution)
        heat = self.heatmap(i)
        with self.figure.batch_update():
            if image is not None:
                self.image(i).source = image if isinstance(image, str) else image_uri(image)
            heat.z = display_values(block_mean(values, factor))
            # cell k covers pixels k·f .. k·f + f − 1: its centre sits at k·f + (f − 1)/2
            heat.x0 = heat.y0 = (factor - 1) / 2
            heat.dx = heat.dy = factor
            self._style_panel(i)
            if title is not None:
                self.set_title(i, title)

    def restyle(self, colormap: str | None = None, opacity: float | None = None) -> None:
        """Change colormap and/or opacity of every panel; the maps are not touched."""
        if colormap is not None:
            rendering.resolve_colormap(colormap, False)  # fail early on a bad name
            self.colormap = colormap
        if opacity is not None:
            self.opacity = float(opacity)
        with self.figure.batch_update():
            for i in range(self.n):
                self._style_panel(i, recolor=colormap is not None)

    def _style_panel(self, i: int, recolor: bool = True) -> None:
        heat = self.heatmap(i)
        if heat.opacity != self.opacity:
            heat.opacity = self.opacity
        values = self._maps[i]
        if values is None or not recolor:
            return
        signed = self._signed[i]
        low, high = self._limits[i] or rendering.color_limits(values, signed)
        scale = colorscale(rendering.resolve_colormap(self.colormap, signed), signed)
        # plotly validates every colour of a colorscale it is given: skip unchanged ones
        # (an opacity drag then costs milliseconds, not ~5 ms per panel)
        if self._scales.get(i) != scale:
            heat.colorscale = self._scales[i] = scale
        heat.zmin, heat.zmax = low, high
        heat.zmid = 0.0 if signed else None
