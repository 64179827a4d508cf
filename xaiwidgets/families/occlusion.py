"""Occlusion (Zeiler & Fergus): score drop when a sliding window is blanked out."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ..core.registry import Method, Param, register

#: the default window spans about 1/WINDOW_FRACTION of the image's shorter side
WINDOW_FRACTION = 7


def default_window(size: tuple[int, ...]) -> int:
    """The default window side for inputs of spatial ``size`` ((H, W) or (T, H, W)):
    the shorter of H and W over :data:`WINDOW_FRACTION`, rounded, at least 1 px.

    >>> default_window((224, 224)), default_window((32, 32)), default_window((28, 28))
    (32, 5, 4)
    """
    return max(1, round(min(size[-2:]) / WINDOW_FRACTION))


def default_stride(window: int) -> int:
    """The default stride: half the window (at least 1 px), so windows overlap by half.

    >>> default_stride(32), default_stride(1)
    (16, 1)
    """
    return max(1, window // 2)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window positions covering the whole side (the last one flush with the border)."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@register
class Occlusion(Method):
    """Slide a ``window``² patch of ``value`` with ``stride``; each pixel gets the mean
    score drop f_c(x) − f_c(x_occluded) of the windows covering it. Batched.

    By default the window scales with the image (:func:`default_window`: about a
    seventh of the shorter side) and the stride is half the window; explicit values win.

    On video clips (N, C, T, H, W) the window is a ``window``³ cube (its time side
    clipped to the clip's length) sliding with ``stride`` along t, y and x.
    """

    name = "occlusion"
    family = "perturbation"
    targets = "resolved"  # the score drop of the given or predicted class
    progress_unit = "windows"
    default_reduce = "map"
    signed = True
    #: a quick run (tests, previews) on the small images they use: few, disjoint windows
    quick_params = {"window": 8, "stride": 8}
    params = (
        Param("window", None, kind="int", low=1, high=1024,
              doc="side of the square patch (px); default: the image's shorter side / 7, "
                  "rounded (32 px at 224², 5 px at 32², 4 px at 28²)"),
        Param("stride", None, kind="int", low=1, high=1024,
              doc="step between patches (px); default: half the window"),
        Param("value", 0.0, doc="fill value in model-input space (0 = mean grey)"),
        Param("batch_size", 64, kind="int", low=1, doc="occluded images per model call"),
    )

    def bind(self, ctx, params: dict[str, Any]) -> dict[str, Any]:
        # defaults that scale with the image; the values used are recorded in attrs
        window = params["window"] or default_window(ctx.size)
        stride = params["stride"] or default_stride(window)
        return {**params, "window": window, "stride": stride}

    def attribute(self, ctx, target, layer, window, stride, value, batch_size) -> torch.Tensor:
        x = ctx.inputs
        n, volume = x.shape[0], tuple(x.shape[2:])  # (H, W), or (T, H, W) for clips
        # each box: one slice per spatial(-temporal) dim
        boxes = [tuple(slice(a, a + window) for a in starts) for starts in itertools.product(
            *(window_starts(side, window, stride) for side in volume))]
        base = ctx.scores(x, target)
        total = torch.zeros((n, *volume), device=x.device, dtype=x.dtype)
        count = torch.zeros(volume, device=x.device, dtype=x.dtype)
        expand = (slice(None),) + (None,) * len(volume)
        per_call = max(1, batch_size // n)
        chunks = range(0, len(boxes), per_call)
        for start in ctx.progress_bar(chunks, len(chunks), "occlusion"):
            chunk = boxes[start:start + per_call]
            batch = x.repeat(len(chunk), *[1] * (x.ndim - 1))
            for i, box in enumerate(chunk):
                batch[(slice(i * n, (i + 1) * n), slice(None), *box)] = value
            drops = base.repeat(len(chunk)) - ctx.scores(batch, target.repeat(len(chunk)),
                                                        batch_size=len(batch))
            for i, box in enumerate(chunk):
                total[(slice(None), *box)] += drops[i * n:(i + 1) * n][expand]
                count[box] += 1
            if start + per_call < len(boxes):  # windows so far: a first estimate
                ctx.report_partial(start + len(chunk), len(boxes),
                                   lambda: total / count.clamp(min=1))
        return total / count
