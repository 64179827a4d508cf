"""Standalone HTML handouts of a widget: its sliders step through precomputed states.

``w.export_html(path)`` sweeps a few of the widget's controls (each widget names
them: the image and its method's parameter for the :class:`ExplainerWidget`, the
image and layer for the :class:`FEMStackWidget`, ...), computes every combination
(a tqdm progress bar counts them), records the widget's plotly figures (and HTML
parts, e.g. a gallery) in each state, and writes one page:

* plotly.js inlined once, no ``<script src=...>``, no kernel, no network: the page
  opens from a file, an e-mail or a course platform;
* one control per swept control (a range slider for sliders, a select for lists);
  a change swaps in the precomputed figures with ``Plotly.react``; the opacity
  slider (when the widget has one) restyles in the page, without states;
* heatmaps quantised to 255 levels between their min and max (uint8, base64;
  the colour range ``zmin``/``zmax`` is kept exact, so colours do not move; hover
  values are within 1/254 of the range); identical traces, layouts and HTML parts
  are stored once.

A widget with nothing computed yet is computed first: the sweep sets each state's
controls and waits for the result, then puts the controls back as they were. A state
that fails raises (naming the state) and no file is written.

>>> w.export_html("handout.html")                                      # doctest: +SKIP
PosixPath('handout.html')
>>> w.export_html("k.html", sweep={"K": [0.5, 1.0, 2.0]})              # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np

#: values per swept slider when the widget's own step would give more
STEPS = 7
#: most states one page holds (the product of the swept controls' value counts)
MAX_STATES = 400
#: arrays with more cells than this are quantised (small ones stay exact JSON)
QUANTISE_CELLS = 64
#: the quantised value that stands for NaN (a gap in the map)
MISSING = 255


# ----------------------------------------------------------------- the hooks
class Exportable:
    """What a widget needs for its handout (``export_html`` below); the defaults
    fit a widget with ``controls`` (name -> ipywidgets control), a plotly ``figure``, ``wait()``,
    ``error`` and (optionally) ``hold()``. Override the ``_export_*`` hooks where a
    widget differs."""

    def export_html(self, path: str | Path, sweep: Sequence[str] | Mapping[str, Sequence]
                    | None = None, steps: int = STEPS, title: str | None = None,
                    progress: bool = True) -> Path:
        """A standalone page (no kernel, no network) whose controls step through
        precomputed states of this widget; returns its path.

        ``sweep``: the controls to sweep (default: the widget's choice), as names or
        ``{name: [values]}``; ``steps``: values per slider. See
        :mod:`xaiwidgets.widgets.export`.

        >>> w.export_html("handout.html", sweep=["image"])              # doctest: +SKIP
        """
        return export_html(self, path, sweep=sweep, steps=steps, title=title,
                           progress=progress)

    def _export_sweep(self) -> list[str]:
        """Names of the controls swept by default (here: the image, if any)."""
        return [n for n in ("image",) if n in getattr(self, "controls", {})]

    def _export_figures(self) -> list[Any]:
        """The plotly figures recorded in each state."""
        figure = getattr(self, "figure", None)
        return [figure] if figure is not None else []

    def _export_html_parts(self) -> list[str]:
        """HTML fragments recorded in each state (besides the figures); default none."""
        return []

    def _export_apply(self, values: Mapping[str, Any]) -> None:
        """Put ``values`` on the controls, wait for the result; raise if it failed."""
        before = getattr(self, "error", None)
        hold = getattr(self, "hold", None)
        with hold() if hold is not None else _nothing():
            for name, value in values.items():
                if self.controls[name].value != value:
                    self.controls[name].value = value
        wait = getattr(self, "wait", None)
        if wait is not None:
            wait()
        error = getattr(self, "error", None)
        if error and error != before:
            raise RuntimeError(f"export: the state {dict(values)} failed: {error}")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---------------------------------------------------------------- the sweep
def control_values(control: W.ValueWidget, steps: int = STEPS) -> list[tuple[str, Any]]:
    """(label, value) pairs a handout offers for ``control``: every option of a list,
    up to ``steps`` evenly spaced values of a slider (snapped to its step).

    >>> control_values(W.IntSlider(min=0, max=4), steps=3)
    [('0', 0), ('2', 2), ('4', 4)]
    >>> control_values(W.Dropdown(options=[("a", 1), ("b", 2)]))
    [('a', 1), ('b', 2)]
    """
    if isinstance(control, (W.Dropdown, W.SelectionSlider, W.ToggleButtons, W.RadioButtons,
                            W.Select)):
        return [(str(label), value) for label, value in
                zip(control._options_labels, control._options_values, strict=True)]
    if isinstance(control, (W.IntSlider, W.FloatSlider, W.BoundedIntText,
                            W.BoundedFloatText)):
        low, high = control.min, control.max
        step = getattr(control, "step", None) or 0
        values = np.linspace(low, high, max(2, int(steps)))
        if step:
            values = low + np.round((values - low) / step) * step
        if isinstance(control, (W.IntSlider, W.BoundedIntText)):
            out = [int(v) for v in values]
        else:
            digits = max(0, -int(np.floor(np.log10(step)))) if step else 6
            out = [round(float(v), digits) for v in values]
        out = list(dict.fromkeys(v for v in out if low <= v <= high))
        if control.value not in out:  # the value shown now is one of the states
            out = sorted([*out, control.value])
        return [(_label(v), v) for v in out]
    if isinstance(control, W.Checkbox):
        return [("off", False), ("on", True)]
    raise TypeError(f"cannot sweep a {type(control).__name__}; name its values: "
                    f"sweep={{name: [values]}}")


def _label(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plan(widget: Exportable, sweep: Sequence[str] | Mapping[str, Sequence] | None,
          steps: int) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    """[(name, kind, [(label, value), ...])] of the swept controls."""
    controls = getattr(widget, "controls", {})
    if sweep is None:
        sweep = widget._export_sweep()
    given = dict(sweep) if isinstance(sweep, Mapping) else {name: None for name in sweep}
    plan = []
    for name, values in given.items():
        if name not in controls:
            raise ValueError(f"sweep: the widget has no control {name!r}; it has "
                             f"{sorted(controls)}")
        control = controls[name]
        if values is None:
            pairs = control_values(control, steps)
        else:
            pairs = [(_label(v), v) for v in values]
            if not pairs:
                raise ValueError(f"sweep: no values given for {name!r}")
        is_slider = isinstance(control, (W.IntSlider, W.FloatSlider, W.SelectionSlider))
        plan.append((name, "range" if is_slider else "select", pairs))
    count = int(np.prod([len(p) for _, _, p in plan])) if plan else 1
    if count > MAX_STATES:
        sizes = " × ".join(f"{len(p)} {n}" for n, _, p in plan)
        raise ValueError(f"the handout would hold {count} states ({sizes}), more than "
                         f"{MAX_STATES}: sweep fewer controls or values, e.g. "
                         f"sweep={{{plan[0][0]!r}: [...]}} or steps=3")
    return plan


# --------------------------------------------------------------- recording
class _Pool:
    """Stores each distinct JSON part once; states refer to parts by index."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, part: Any) -> int:
        text = json.dumps(part, separators=(",", ":"), default=_json_default)
        if text not in self._index:
            self._index[text] = len(self.parts)
            self.parts.append(text)
        return self._index[text]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a handout")


def quantise(values: Any) -> dict[str, Any]:
    """A 2-D array as 8-bit levels between its finite min and max (:data:`MISSING`: NaN).

    >>> q = quantise(np.array([[0.0, 1.0], [np.nan, 0.5]]))
    >>> q["lo"], q["hi"], list(base64.b64decode(q["__q"]))
    (0.0, 1.0, [0, 254, 255, 127])
    """
    array = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(array)
    lo = float(array[finite].min()) if finite.any() else 0.0
    hi = float(array[finite].max()) if finite.any() else 0.0
    span = hi - lo if hi > lo else 1.0
    levels = np.full(array.shape, MISSING, dtype=np.uint8)
    levels[finite] = np.round((array[finite] - lo) / span * 254).astype(np.uint8)
    return {"__q": base64.b64encode(levels.tobytes()).decode(), "shape": list(array.shape),
            "lo": lo, "hi": hi}


def _array(value: Any) -> np.ndarray:
    """An array from plotly's JSON: a list, or a typed array ``{dtype, bdata, shape}``."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if isinstance(shape, str):
            shape = [int(s) for s in shape.split(",")]
        return flat.reshape(shape) if shape else flat
    return np.asarray(value)


def _freeze_trace(trace: dict[str, Any]) -> dict[str, Any]:
    """A trace's JSON with its large 2-D ``z`` quantised."""
    out = dict(trace)
    z = out.get("z")
    if z is not None:
        array = _array(z)
        if array.ndim == 2 and array.size > QUANTISE_CELLS and np.issubdtype(array.dtype,
                                                                            np.number):
            out["z"] = quantise(array)
    return out


def _record(widget: Exportable, pool: _Pool) -> dict[str, Any]:
    figures = []
    for figure in widget._export_figures():
        spec = figure.to_plotly_json()
        traces = [pool.add(_freeze_trace(t)) for t in spec.get("data", [])]
        figures.append([traces, pool.add(spec.get("layout", {}))])
    return {"figs": figures, "html": [pool.add(part) for part in widget._export_html_parts()]}


def export_html(widget: Exportable, path: str | Path,
                sweep: Sequence[str] | Mapping[str, Sequence] | None = None,
                steps: int = STEPS, title: str | None = None, progress: bool = True) -> Path:
    """Write ``widget``'s handout to ``path`` (see the module docstring); return the path."""
    from tqdm.auto import tqdm

    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{path}: a handout is an .html file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist: create the folder first")
    plan = _plan(widget, sweep, steps)
    controls = getattr(widget, "controls", {})
    original = {name: controls[name].value for name, _, _ in plan}
    pool = _Pool()
    states: dict[str, Any] = {}
    combos = list(itertools.product(*[range(len(pairs)) for _, _, pairs in plan]))
    try:
        for combo in tqdm(combos, desc=f"handout of {type(widget).__name__}",
                          disable=not progress, leave=False):
            values = {name: plan[k][2][i][1] for k, (name, _, _) in enumerate(plan)
                      for i in (combo[k],)}
            widget._export_apply(values)
            states["-".join(map(str, combo))] = _record(widget, pool)
    finally:
        if plan:
            widget._export_apply(original)
    start = [next((i for i, (_, v) in enumerate(pairs) if v == original[name]), 0)
             for name, _, pairs in plan]
    opacity = controls.get("opacity")
    data = {
        "controls": [{"name": name, "kind": kind, "labels": [label for label, _ in pairs]}
                     for name, kind, pairs in plan],
        "start": start,
        "opacity": None if opacity is None else float(opacity.value),
        "states": states,
    }
    title = title or f"xaiwidgets · {type(widget).__name__}"
    path.write_text(_page(title, data, pool, len(next(iter(states.values()))["figs"]),
                          len(next(iter(states.values()))["html"])), encoding="utf-8")
    return path


# -------------------------------------------------------------------- page
def _script_safe(text: str) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--``): both
    replacements are JSON escapes of the same characters.

    >>> _script_safe('"</script><!--"')
    '"<\\\\/script><\\\\u0021--"'
    """
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def _page(title: str, data: dict[str, Any], pool: _Pool, n_figures: int, n_html: int) -> str:
    from plotly.offline import get_plotlyjs

    payload = json.dumps(data, separators=(",", ":"), default=_json_default)
    parts = "[" + ",".join(pool.parts) + "]"
    figures = "".join(f"<div class='xw-fig' id='xw-fig-{k}'></div>" for k in range(n_figures))
    fragments = "".join(f"<div class='xw-html' id='xw-html-{k}'></div>" for k in range(n_html))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        f"<h2>{html.escape(title)}</h2>"
        "<p class='xw-note'>A handout made by xaiwidgets: every state was computed in advance; "
        "no kernel, no network. Maps are stored with 255 levels.</p>"
        f"<div id='xw-controls'></div>{figures}{fragments}"
        f"<script type='application/json' id='xw-data'>{_script_safe(payload)}</script>"
        f"<script type='application/json' id='xw-parts'>{_script_safe(parts)}</script>"
        f"<script>{_JS}</script></body></html>\n")


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h2{font-size:18px;margin:0 0 4px}.xw-note{color:#666;font-size:12px;margin:0 0 10px}
#xw-controls{display:flex;flex-wrap:wrap;gap:6px 18px;margin-bottom:8px}
.xw-control{display:flex;align-items:center;gap:6px;font-size:13px}
.xw-control input[type=range]{width:220px}.xw-readout{min-width:3em;font-weight:600}
.xw-html img{max-width:100%}
"""

_JS = """
(function () {
  const D = JSON.parse(document.getElementById('xw-data').textContent);
  const P = JSON.parse(document.getElementById('xw-parts').textContent);
  const index = D.start.slice();
  let opacity = D.opacity;
  function bytes(s) { const b = atob(s), a = new Uint8Array(b.length);
    for (let i = 0; i < b.length; i++) a[i] = b.charCodeAt(i); return a; }
  function thaw(v) {
    if (Array.isArray(v)) return v.map(thaw);
    if (v && typeof v === 'object') {
      if ('__q' in v) {
        const a = bytes(v.__q), h = v.shape[0], w = v.shape[1], s = (v.hi - v.lo) / 254;
        const z = [];
        for (let r = 0; r < h; r++) { const row = new Array(w);
          for (let c = 0; c < w; c++) { const q = a[r * w + c];
            row[c] = q === 255 ? null : v.lo + q * s; }
          z.push(row); }
        return z;
      }
      const o = {}; for (const k in v) o[k] = thaw(v[k]); return o;
    }
    return v;
  }
  function traces(refs) {
    const data = refs.map(i => thaw(P[i]));
    if (opacity !== null) data.forEach(t => { if (t.type === 'heatmap') t.opacity = opacity; });
    return data;
  }
  function render() {
    const key = index.join('-');
    const state = D.states[key];
    state.figs.forEach((f, k) => Plotly.react('xw-fig-' + k, traces(f[0]), thaw(P[f[1]]),
                                              {displaylogo: false, responsive: false}));
    state.html.forEach((h, k) => { document.getElementById('xw-html-' + k).innerHTML = P[h]; });
    document.body.dataset.state = key;
  }
  const box = document.getElementById('xw-controls');
  D.controls.forEach((c, k) => {
    const label = document.createElement('label'); label.className = 'xw-control';
    label.appendChild(document.createTextNode(c.name));
    const readout = document.createElement('span'); readout.className = 'xw-readout';
    let input;
    if (c.kind === 'range') {
      input = document.createElement('input'); input.type = 'range';
      input.min = 0; input.max = c.labels.length - 1; input.step = 1;
      input.value = index[k]; readout.textContent = c.labels[index[k]];
    } else {
      input = document.createElement('select');
      c.labels.forEach((l, i) => { const o = document.createElement('option');
        o.value = i; o.textContent = l; input.appendChild(o); });
      input.value = index[k];
    }
    input.name = c.name; input.dataset.control = c.name;
    input.addEventListener('input', () => {
      index[k] = Number(input.value); readout.textContent = c.labels[index[k]]; render(); });
    label.appendChild(input); if (c.kind === 'range') label.appendChild(readout);
    box.appendChild(label);
  });
  if (opacity !== null) {
    const label = document.createElement('label'); label.className = 'xw-control';
    label.appendChild(document.createTextNode('opacity'));
    const input = document.createElement('input'); input.type = 'range';
    input.min = 0; input.max = 1; input.step = 0.05; input.value = opacity;
    input.dataset.control = 'opacity';
    input.addEventListener('input', () => {
      opacity = Number(input.value);
      document.querySelectorAll('.xw-fig').forEach(gd => {
        const which = gd.data.map((t, i) => t.type === 'heatmap' ? i : -1).filter(i => i >= 0);
        if (which.length) Plotly.restyle(gd, {opacity: opacity}, which);
      });
    });
    label.appendChild(input); box.appendChild(label);
  }
  render();
})();
"""
