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
    # a click on a channel's bar (CRP, #23: ≤ 0.5× a fresh gradient), default layer
    Slider("lrp: channel (CRP)", "lrp", "channels", ([0], [1], [2], [3])),
    Slider("method: gradient → gradcam", "switch", "method", ("gradient", "gradcam")),
)

#: the yardstick of the LRP sliders (issue #14: a parameter change ≤ 0.7× this): a
#: gradient from a new Explainer on the same image, construction included
REFERENCE = "reference: gradient, fresh Explainer"


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
    declared = {p.name for p in xw.get_method(slider.method).params} | {"channels"}
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
    rows.append(_fresh_gradient(model, x[:1], target, repeats))
    reference = rows[-1]["median_ms"]
    for row in rows:
        if row["median_ms"] is not None:
            row["vs_fresh_gradient"] = row["median_ms"] / reference
    return rows


def _fresh_gradient(model: nn.Module, x: torch.Tensor, target: int,
                    repeats: int) -> dict[str, Any]:
    """The :data:`REFERENCE` row: a fresh Explainer's gradient, timed like a slider."""
    def call() -> Any:
        return xw.Explainer(model, x, progress=False).explain("gradient", target=target)

    times, counter = [], CallCounter(model)
    with counter:
        # warm, not counted: the construction probe is remembered per model and hooks
        # (the counter's included), as in a widget given new images
        call()
        counter.calls = 0
        for _ in range(repeats * 4):
            times.append(time_once(call, x.device))
    return {"slider": REFERENCE, "values": ["gradient"],
            "median_ms": 1e3 * statistics.median(times), "model_calls": counter.calls,
            "changes": len(times)}


# ------------------------------------------------------------- widget latency
#: (widget, control, value) changes timed in order; ``"method"`` changes set the method
#: first, so the next rows change that method's parameters. ``None`` widget kwargs: default.
WIDGET_CHANGES: dict[str, tuple[tuple[str, Any], ...]] = {
    "ExplainerWidget": (
        ("opacity", 0.4), ("colormap", "viridis"), ("colormap", "auto"),
        ("target", 1), ("layer", -2), ("layer", -1),
        ("method", "fem"), ("K", 2.0), ("method", "mlfem"), ("K", 1.5),
        ("operator", "add"), ("alpha", 0.3), ("normalize", "interleaved"),
        ("method", "gradient"), ("method", "lrp"), ("epsilon", 0.1),
        ("method", "integrated_gradients"), ("method", "smoothgrad"),
        ("image", 1), ("method", "gradcam"),
    ),
    "FEMStackWidget": (
        ("opacity", 0.4), ("colormap", "viridis"), ("layer", 0), ("layer", -1),
        ("K", 2.0), ("operator", "add"), ("alpha", 0.3), ("normalize", "interleaved"),
        ("image", 1),
    ),
    "CompareWidget": (
        ("opacity", 0.4), ("colormap", "viridis"), ("target", 1), ("layer", -2),
        ("image", 1),
    ),
}


def _resolve(w: Any, control: str, value: Any) -> Any:
    """Indexes into options for pickers (``target`` 1: the second most probable class)."""
    options = getattr(w.controls[control], "options", None)
    if control in ("target", "layer") and isinstance(value, int) and options is not None:
        option = list(options)[value]
        return option[1] if isinstance(option, tuple) else option
    return value


def time_widget_changes(w: Any, changes: tuple[tuple[str, Any], ...],
                        timeout: float = 900.0) -> list[dict[str, Any]]:
    """For each change: ms until the change returns to the caller, until the first
    estimate is drawn (IG/SmoothGrad...) and until the final result is drawn."""
    import time

    first: list[float] = []
    if hasattr(w, "_show"):
        original = w._show

        def show(da: Any, estimate: bool = False) -> None:
            original(da, estimate=estimate)
            if estimate and not first:
                first.append(time.perf_counter())
        w._show = show
    rows = []
    for control, value in changes:
        value = _resolve(w, control, value)
        first.clear()
        start = time.perf_counter()
        w.controls[control].value = value
        returned = time.perf_counter()
        w.wait(timeout)
        drawn = time.perf_counter()
        rows.append({
            "widget": type(w).__name__, "control": control, "value": str(value),
            "method": getattr(w, "method", ""),
            "return_ms": 1e3 * (returned - start), "drawn_ms": 1e3 * (drawn - start),
            "first_estimate_ms": 1e3 * (first[0] - start) if first else None,
            "error": w.error,
        })
    return rows


def run_widget_latency(model: nn.Module, images: torch.Tensor,
                       preprocess: Callable | None = None) -> list[dict[str, Any]]:
    """Every control of every widget, in the background mode of a notebook."""
    rows = []
    for name, changes in WIDGET_CHANGES.items():
        cls = getattr(xw, name)
        w = cls(model, images, preprocess=preprocess, background=True)
        w.wait()
        rows += time_widget_changes(w, changes)
        w.close()
    return rows


def widget_markdown(rows: list[dict[str, Any]]) -> str:
    """The latency table (Markdown)."""
    def ms(v: float | None) -> str:
        return "–" if v is None else (f"{v:.0f}" if v >= 10 else f"{v:.1f}")
    lines = ["| widget | control → value | method | returns (ms) | first estimate (ms) "
             "| drawn (ms) |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = f" (error: {r['error']})" if r["error"] else ""
        lines.append(f"| {r['widget']} | {r['control']} → {r['value']} | {r['method']} | "
                     f"{ms(r['return_ms'])} | {ms(r['first_estimate_ms'])} | "
                     f"{ms(r['drawn_ms'])}{note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.slider [--model resnet50] [--size 224] [--out FILE.json]``:
    the widget latency table (random weights, CPU, two images)."""
    import argparse
    import json

    import torchvision

    p = argparse.ArgumentParser(prog="python -m benchmarks.slider", description=main.__doc__)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    images = torch.rand(2, 3, args.size, args.size)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rows = run_widget_latency(model, images, preprocess=lambda x: (x - mean) / std)
    table = widget_markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "size": args.size,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
