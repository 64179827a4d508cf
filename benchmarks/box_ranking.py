"""The ConceptExplorer's box query: every channel's contribution inside a dragged box.

Compares the batched computation (:func:`xaiwidgets.concepts.regions.box_contributions`:
LRP with ``rows`` channels per backward pass on a kept forward of the repeated image,
Grad-CAM and FEM in closed form for all channels at once) with the per-channel loop it
replaced (one ``ex.explain(method, channels=[k])`` per channel, summed over the box),
on one image, in the same run, interleaved (``benchmarks.timing``)::

    python -m benchmarks.box_ranking --clock cpu
    python -m benchmarks.box_ranking --model shapes-resnet --rows 4,8,16 --clock cpu

Both sides start from an Explainer whose channel ranking is already drawn (what the
widget holds when a box is dragged): the LRP relevance at the layer is kept.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import xaiwidgets as xw
from xaiwidgets.concepts.regions import box_contributions

from .timing import interleaved, median, use_clock


def loop(ex: xw.Explainer, layer: str, box: tuple[int, int, int, int], method: str,
         target: int | None) -> np.ndarray:
    """The per-channel loop (the ConceptExplorer before the batched query)."""
    y0, x0, y1, x1 = box
    terms = ex.channels(layer, method, target=target).values[0]
    scores = []
    for k in range(len(terms)):
        m = ex.explain(method, target=target, layer=layer, channels=[k]).values[0]
        m = m.astype(np.float64)
        inside = m[..., y0:y1, x0:x1].sum()
        scores.append(inside if method == "lrp" else
                      0.0 if m.sum() == 0 else terms[k] * inside / m.sum())
    return np.asarray(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-vgg")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--layer", default=None, help="default: the model's default layer")
    p.add_argument("--methods", default="lrp,gradcam,fem")
    p.add_argument("--rows", default="8", help="LRP channels per backward, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    use_clock(args.clock)
    torch.set_num_threads(1)
    model, preprocess, _ = xw.models.load(args.model)
    image = xw.datasets.shapes(n=1, size=args.size, seed=0).image.values
    ex = xw.Explainer(model, image, preprocess=preprocess, progress=False)
    layer = args.layer or ex.default_layer()
    size = args.size
    box = (size // 8, size // 4, size // 2, 3 * size // 4)
    channels = ex.context.shapes()[layer][1]
    print(f"{args.model} {size}px, layer {layer} ({channels} channels), box {box}, "
          f"1 thread, {args.clock}-clock seconds (median of {args.repeats})\n")
    print("| method | loop (s) | batched (s) | loop / batched | max |Δ| / max |loop| |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        target = 3 if method in ("lrp", "gradcam") else None
        ex.channels(layer, method, target=target)  # what the widget has drawn already
        variants = {"loop": lambda m=method, t=target: loop(ex, layer, box, m, t)}
        for rows in ([int(r) for r in args.rows.split(",")] if method == "lrp" else [8]):
            variants[f"batched rows={rows}"] = (
                lambda m=method, t=target, r=rows:
                box_contributions(ex, layer, box, m, target=t, rows=r).values)
        samples = interleaved(variants, torch.device("cpu"), repeats=args.repeats)
        reference = loop(ex, layer, box, method, target)
        for name, fn in variants.items():
            if name == "loop":
                continue
            error = np.abs(fn() - reference).max() / max(np.abs(reference).max(), 1e-30)
            label = name if method == "lrp" else "batched"
            print(f"| {method} ({label}) | {median(samples['loop']):.3f} | "
                  f"{median(samples[name]):.3f} | "
                  f"{median(samples['loop']) / median(samples[name]):.2f}× | {error:.1e} |")


if __name__ == "__main__":
    main()
