"""Slider latency: time from a parameter change to the new result, on one Explainer.

Each slider moves one parameter through a few values on the same Explainer (batch 1,
as in the widget); the first value warms the cache up and is not timed. A forward
pre-hook counts the model calls made by the timed changes: FEM/MLFEM parameter changes
must re-use the cached activations (0 calls).

>>> SLIDERS[0].label
'fem: K'
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import xaiwidgets as xw

from .timing import time_once


@dataclass(frozen=True)
class Slider:
    """``method`` with ``base`` parameters; ``param`` takes each of ``values`` in turn.

    ``method`` is an explain method, ``"fem_stack"`` (``Explainer.fem_stack``) or
    ``"fuse"`` (``xw.fuse`` on a FEM stack computed once).
    """

    label: str
    method: str
    param: str
    values: tuple
    base: dict[str, Any] = field(default_factory=dict)


SLIDERS = (
    Slider("fem: K", "fem", "K", (1.0, 1.5, 2.0, 0.5)),
    Slider("mlfem: K", "mlfem", "K", (1.0, 1.5, 2.0, 0.5)),
    Slider("mlfem: operator", "mlfem", "operator", ("max", "add", "top", "fem")),
    Slider("mlfem: alpha", "mlfem", "alpha", (0.5, 0.7, 0.3, 0.9), {"operator": "add"}),
    Slider("mlfem: normalize", "mlfem", "normalize", ("end", "interleaved"),
           {"operator": "add"}),
    Slider("fem_stack: K", "fem_stack", "K", (1.0, 1.5, 2.0, 0.5)),
    Slider("fuse: operator", "fuse", "operator", ("max", "add", "top", "fem")),
    Slider("lrp: epsilon", "lrp", "epsilon", (1e-6, 1e-3, 0.1, 1.0), {"composite": "epsilon"}),
    Slider("lrp: gamma", "lrp", "gamma", (0.25, 0.5, 1.0, 0.1),
           {"composite": "epsilon_gamma_box"}),
    Slider("lrp: alpha/beta", "lrp", "alpha", (2.0, 1.0, 3.0), {"composite": "alpha_beta"}),
    Slider("method: gradient → gradcam", "switch", "method", ("gradient", "gradcam")),
)


class CallCounter:
    """Counts forward calls of ``model`` while active (a pre-hook, removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, 0

    def __enter__(self) -> CallCounter:
        self.handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()


def slider_call(ex: xw.Explainer, slider: Slider, target: int) -> Callable[[Any], Any] | None:
    """A function value -> result for this slider, or ``None`` when not available."""
    if slider.method == "switch":
        return lambda method: ex.explain(method, target=target)
    if slider.method == "fem_stack":
        if not hasattr(ex, "fem_stack"):
            return None
        return lambda value: ex.fem_stack(**{slider.param: value})
    if slider.method == "fuse":
        if not (hasattr(ex, "fem_stack") and hasattr(xw, "fuse")):
            return None
        stack = ex.fem_stack()
        return lambda value: xw.fuse(stack, **{slider.param: value})
    if slider.method not in xw.methods():
        return None
    declared = {p.name for p in xw.get_method(slider.method).params}
    if slider.param not in declared:
        return None

    def call(value: Any) -> Any:
        params = {**slider.base, slider.param: value}
        if slider.method == "lrp" and slider.param == "alpha":
            params["beta"] = value - 1.0  # α − β = 1 keeps conservation
        return ex.explain(slider.method, target=target, **params)

    return call


def run_sliders(model: nn.Module, x: torch.Tensor, target: int, repeats: int,
                sliders: tuple[Slider, ...] = SLIDERS) -> list[dict[str, Any]]:
    """Median latency (ms) of each slider's changes and the model calls they made."""
    ex = xw.Explainer(model, x[:1], progress=False)
    rows = []
    for slider in sliders:
        row: dict[str, Any] = {"slider": slider.label, "values": list(slider.values),
                               "median_ms": None, "model_calls": None}
        try:
            call = slider_call(ex, slider, target)
            if call is None:
                row["note"] = "n/a (method or parameter not available)"
                rows.append(row)
                continue
            call(slider.values[0])  # warm: fills the cache, not timed
            times, counter = [], CallCounter(model)
            with counter:
                for _ in range(repeats):
                    for value in slider.values[1:] + slider.values[:1]:
                        times.append(time_once(lambda f=call, v=value: f(v), ex.device))
            row.update(median_ms=1e3 * statistics.median(times), model_calls=counter.calls,
                       changes=len(times))
        except Exception as err:  # a failing slider is reported, the others still run
            row["note"] = f"error: {type(err).__name__}: {err}".splitlines()[0][:200]
        rows.append(row)
    return rows
