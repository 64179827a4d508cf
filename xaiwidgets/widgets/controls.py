"""ipywidgets controls built from the method registry's :class:`~xaiwidgets.core.registry.Param`.

A parameter declared once in a method (default, range, log scale, choices, doc)
becomes its slider or dropdown here, so a new method gets controls for free:

* ``float`` → ``FloatSlider`` (``FloatLogSlider`` when ``log=True``; a text box when unbounded),
* ``int`` → ``IntSlider`` (a text box when unbounded),
* ``choice`` (and ``any`` with ``choices``) → ``Dropdown``,
* ``any`` without choices (tensors...) → no control: the method's default is used.

>>> from xaiwidgets.core.registry import Param
>>> make_control(Param("K", 1.0, low=0.0, high=5.0)).__class__.__name__
'FloatSlider'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import ipywidgets as W

from ..core.registry import Method, Param, get_method

#: largest int range still shown as a slider (beyond it a text box is easier to use)
MAX_INT_SLIDER_SPAN = 4096
STYLE = {"description_width": "110px"}
LAYOUT = {"width": "380px"}


def control_spec(p: Param) -> tuple[type[W.ValueWidget], dict[str, Any]] | None:
    """The widget class and its range settings for ``p``; ``None`` when it gets no control.

    >>> control_spec(Param("n", 25, kind="int", low=1, high=200))
    (<class 'ipywidgets.widgets.widget_int.IntSlider'>, {'min': 1, 'max': 200, 'step': 1})
    """
    if p.kind == "choice" or (p.kind == "any" and p.choices):
        return W.Dropdown, {"options": [(str(c), c) for c in p.choices]}
    if p.kind == "float":
        if p.log:
            low = p.low if p.low is not None and p.low > 0 else abs(p.default or 1.0) * 1e-4
            high = p.high if p.high is not None else max(abs(p.default or 1.0), low) * 1e4
            return W.FloatLogSlider, {"base": 10, "min": math.log10(low),
                                      "max": math.log10(high), "step": p.step or 0.1}
        if p.low is not None and p.high is not None:
            step = p.step or _nice_step((p.high - p.low) / 100)
            return W.FloatSlider, {"min": p.low, "max": p.high, "step": step,
                                   "readout_format": _format(step)}
        if p.low is not None or p.high is not None:
            return W.BoundedFloatText, _bounds(p, float)
        return W.FloatText, {}
    if p.kind == "int":
        if p.low is not None and p.high is not None and p.high - p.low <= MAX_INT_SLIDER_SPAN:
            return W.IntSlider, {"min": int(p.low), "max": int(p.high), "step": int(p.step or 1)}
        if p.low is not None or p.high is not None:
            return W.BoundedIntText, _bounds(p, int)
        return W.IntText, {}
    return None


def _bounds(p: Param, cast: type) -> dict[str, Any]:
    big = 2**31 - 1
    return {"min": cast(p.low) if p.low is not None else -big,
            "max": cast(p.high) if p.high is not None else big}


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, close to ``raw`` (slider steps users can read)."""
    if raw <= 0:
        return 0.01
    power = 10 ** math.floor(math.log10(raw))
    return min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))


def _format(step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f".{min(decimals, 6)}f"


def make_control(p: Param, value: Any = None) -> W.ValueWidget | None:
    """A fresh control for ``p`` (value: ``value`` or the default); ``None`` when it gets none
    (``any`` parameters without choices, or no value to start from)."""
    spec = control_spec(p)
    value = p.default if value is None else value
    if spec is None or value is None:
        return None
    cls, settings = spec
    if "continuous_update" in cls.class_trait_names():
        # recompute when the slider is released, not on every pixel of the drag
        settings = {**settings, "continuous_update": False}
    control = cls(description=p.name, tooltip=p.doc or None, style=STYLE,
                  layout=W.Layout(**LAYOUT), **settings)
    control.value = value
    return control


def configure(control: W.ValueWidget, p: Param, value: Any) -> None:
    """Re-range ``control`` for ``p`` (a same-named parameter of another method) and set ``value``.

    The range is widened first so no intermediate state clamps or rejects ``value``.
    """
    _, settings = control_spec(p)
    control.tooltip = p.doc or None
    if "options" in settings:
        if list(control.options) != settings["options"]:
            control.options = settings["options"]
        control.value = value
        return
    if "min" in settings:
        control.min = min(control.min, settings["min"])
        control.max = max(control.max, settings["max"])
    control.value = value
    for key, setting in settings.items():
        setattr(control, key, setting)


def compatible(control: W.ValueWidget, p: Param) -> bool:
    """True when ``control`` can show ``p`` after :func:`configure` (same widget class)."""
    spec = control_spec(p)
    return spec is not None and type(control) is spec[0]


def same_param(a: Param | None, b: Param) -> bool:
    """Same declaration (``any`` params compare by identity: defaults may be tensors)."""
    return a is b or (a is not None and b.kind != "any" and a == b)


def set_visible(control: W.Widget, visible: bool) -> None:
    """Show or hide a control (hidden ones take no space)."""
    control.layout.display = None if visible else "none"


def is_visible(control: W.Widget) -> bool:
    return control.layout.display != "none"


def effective_defaults(m: Method, context: Any = None) -> dict[str, Any]:
    """Each parameter's default after the method's cross-parameter rules.

    An optional parameter declared with default ``None`` ("derive me from the
    others", e.g. LRP's β = α − 1) gets the value the method would actually use;
    with the images' ``context``, so do defaults that scale with the image
    (occlusion's window and stride, LIME's n_segments: ``Method.bind``).
    """
    try:
        params = m.resolve_params({})
        return params if context is None else m.bind(context, params)
    except Exception:  # a method whose defaults need an explainer: use the declarations
        return {p.name: p.default for p in m.params}


class ParamControls:
    """One control per parameter name across several methods; only the current method's show.

    Same-named parameters share a control (``K`` of fem and mlfem); when the chosen
    method's declaration differs (``alpha`` of LRP vs MLFEM: other range and default)
    the control is re-ranged and gets that method's remembered value or default.
    A name whose declarations need different widget kinds gets a second control
    keyed ``"method.name"``.

    Optional parameters whose default is ``None`` are derived by the method from the
    others (LRP: α − β = 1). Of those, only the one the user set last is passed; the
    method derives the rest and :meth:`show_used` puts the derived values on their
    controls, so the controls always show what was used and never form a bad combination.

    >>> pc = ParamControls(["fem", "mlfem"])
    >>> pc.select("mlfem"); pc.values("mlfem")["operator"]
    'max'
    """

    def __init__(self, methods: Iterable[str | Method], only: Sequence[str] | None = None,
                 context: Any = None) -> None:
        self.controls: dict[str, W.ValueWidget] = {}
        #: method -> {parameter name -> control key}
        self.keys: dict[str, dict[str, str]] = {}
        self._params: dict[tuple[str, str], Param] = {}
        self._defaults: dict[tuple[str, str], Any] = {}
        self._shown: dict[str, Param] = {}        # control key -> Param it is configured for
        self._memory: dict[tuple[str, str], Any] = {}
        self._derived_set: dict[str, str] = {}     # method -> optional param the user set last
        self.current: str | None = None
        for method in methods:
            m = get_method(method) if isinstance(method, str) else method
            defaults = effective_defaults(m, context)
            self.keys[m.name] = {}
            for p in m.params:
                if only is not None and p.name not in only:
                    continue
                key = p.name
                if key in self.controls and not compatible(self.controls[key], p):
                    key = f"{m.name}.{p.name}"
                if key not in self.controls:
                    control = make_control(p, defaults.get(p.name))
                    if control is None:
                        continue
                    self.controls[key] = control
                    self._shown[key] = p
                    set_visible(control, False)
                self.keys[m.name][p.name] = key
                self._params[(m.name, p.name)] = p
                self._defaults[(m.name, p.name)] = defaults.get(p.name, p.default)

    def _derived(self, method: str, name: str) -> bool:
        p = self._params[(method, name)]
        return p.optional and p.default is None

    def select(self, method: str, keep: Iterable[str] = ()) -> None:
        """Show ``method``'s controls (ranged and valued for it) and hide the others.

        Each control gets the value remembered for ``method``, else keeps its value
        when it already shows the same declaration, else the method's default; the
        keys in ``keep`` (just set by the user) keep their values. Callers silence their
        observers around this: the values set here are not user edits.
        """
        keep = set(keep)
        if self.current is not None:
            for key in self.keys[self.current].values():
                self._memory[(self.current, key)] = self.controls[key].value
        mine = self.keys.get(method, {})
        for name, key in mine.items():
            p = self._params[(method, name)]
            control = self.controls[key]
            same = same_param(self._shown[key], p)
            if key in keep or ((method, key) not in self._memory and same):
                value = control.value
            elif (method, key) in self._memory:
                value = self._memory[(method, key)]
            else:
                value = self._defaults[(method, name)]
            if same:
                control.value = value
            else:
                configure(control, p, value)
                self._shown[key] = p
        for key, control in self.controls.items():
            set_visible(control, key in mine.values())
        self.current = method

    def drop_choice(self, key: str, choice: Any) -> None:
        """Remove ``choice`` from the dropdown ``key`` (if both exist), e.g. an operator
        refused on video clips; a control showing it moves to the first other option.

        >>> pc = ParamControls(["mlfem"]); pc.drop_choice("operator", "net")
        >>> "net" in [v for _, v in pc.controls["operator"].options]
        False
        """
        control = self.controls.get(key)
        if control is None or not hasattr(control, "options"):
            return
        options = [(label, value) for label, value in control.options if value != choice]
        if len(options) != len(control.options):
            control.options = options  # ipywidgets picks the first option if needed

    def forget(self, keys: Iterable[str]) -> None:
        """Drop remembered values of ``keys`` (set from code while hidden: the new value wins)."""
        keys = set(keys)
        self._memory = {k: v for k, v in self._memory.items() if k[1] not in keys}

    def note_changes(self, method: str, changed: Iterable[str]) -> None:
        """Record which derived (optional) parameter the user just set, if any."""
        for name, key in self.keys.get(method, {}).items():
            if key in changed and self._derived(method, name):
                self._derived_set[method] = name

    def values(self, method: str) -> dict[str, Any]:
        """``{parameter: value}`` to pass to ``method`` (parameters without controls omitted)."""
        out = {}
        for name, key in self.keys.get(method, {}).items():
            if self._derived(method, name) and self._derived_set.get(method) != name:
                continue  # let the method derive it from the others
            out[name] = self.controls[key].value
        return out

    def show_used(self, method: str, used: dict[str, Any]) -> None:
        """Put the values a method actually used (its result's attrs) on its derived controls."""
        for name, key in self.keys.get(method, {}).items():
            if self._derived(method, name) and name in used:
                self.controls[key].value = used[name]
