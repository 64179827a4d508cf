"""Which channels of a layer matter inside a box of the input (the ConceptExplorer's
dragged box): every channel's contribution there, in one batched computation.

For ``lrp`` the contribution of channel k inside the box B is the sum over B of its
conditional map (CRP: the relevance that reaches B through k). CRP maps are not
separable in closed form, so the image is repeated ``rows`` times as one batch, its
forward kept, and each backward carries ``rows`` channels at once (row i masked to one
channel): ``ceil(C / rows)`` backward passes instead of C. For ``gradcam`` and ``fem``
the conditional map of one channel has a closed form (ReLU(α_k·A_k), μ_k·B_k), so all
channels' maps come at once; the contribution inside B is the channel's whole
contribution times the share of its normalised map inside B. For ``activation`` it is
the channel's largest upsampled activation inside B. Each equals what
``ex.explain(method, channels=[k])`` gives channel by channel (tests compare them).

>>> import xaiwidgets as xw
>>> model, preprocess, classes = xw.models.load("shapes-vgg")
>>> ex = xw.Explainer(model, xw.datasets.shapes(n=1, seed=0).image.values,
...                   preprocess=preprocess, progress=False)
>>> box_contributions(ex, "features.27", (0, 0, 64, 64), "gradcam").dims
('channel',)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..core.channels import channel_count
from ..core.context import Context
from ..core.ops import map_dims, minmax, upsample
from ..core.registry import ACTIVATION, get_method
from ..core.scoped import model_guard
from ..explainer import Explainer
from ..families.cam import layer_terms
from ..families.fem import fem_map

#: the measures a box ranks by (those of ``Explainer.channels``)
MEASURES = ("lrp", "gradcam", "fem", ACTIVATION)
#: channels per batched LRP backward: on a CPU 8 was fastest (shapes-vgg/resnet, 128 px);
#: larger batches suit a GPU
ROWS = 8
#: bytes the repeated image's kept LRP forward may take; it grows by about 2.5× the sum of
#: the layers' outputs per image and row (measured: ResNet50 at 224 px, 2.2 GB for 8 rows)
MEMORY = 2**30


def box_contributions(ex: Explainer, layer: str, box: Sequence[int], method: str = "lrp",
                      target: Any = None, *, image: int = 0, rows: int = ROWS,
                      progress: Callable[[int, int], None] | None = None,
                      **params: Any) -> xr.DataArray:
    """Every channel's contribution inside ``box`` = (y0, x0, y1, x1) (input pixels, end
    exclusive) for image ``image`` of ``ex``: dims ("channel",).

    ``method``: ``"lrp"`` (its conditional map summed over the box), ``"gradcam"`` and
    ``"fem"`` (the channel's contribution, ``ex.channels``, times the share of its
    conditional map inside the box; 0 for an empty map) or ``"activation"`` (the
    maximum of its activation, upsampled to the input, inside the box). ``params``:
    the method's (``composite=``, ``K=``). ``rows``: channels per LRP backward pass
    (fewer when the repeated image's kept forward would exceed :data:`MEMORY`).
    ``progress(done, total)`` (channels) is called after each pass; if it raises, the
    computation stops there. The model is left as it was.
    """
    if method not in MEASURES:
        raise ValueError(f"method={method!r} has no box measure; choose one of {MEASURES}")
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise ValueError(f"rows={rows!r} must be a whole number >= 1")
    ctx = ex.context
    count = channel_count(ctx, layer)
    y0, x0, y1, x1 = (int(v) for v in box)
    height, width = ex.size[-2:]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"box (y0, x0, y1, x1) = {tuple(box)} is not inside the "
                         f"{height}×{width} input with y0 < y1 and x0 < x1 (end exclusive)")
    if method == ACTIVATION:
        acts = upsample(ex.activations([layer])[layer][image:image + 1].float(), ex.size)
        scores = acts[0, ..., y0:y1, x0:x1].flatten(1).amax(dim=1).double().cpu().numpy()
    elif method == "lrp":
        scores = _lrp_scores(ex, layer, (y0, x0, y1, x1), target, image,
                             min(_fitting_rows(ex, int(rows)), count), progress, params)
    else:
        scores = _closed_form_scores(ex, layer, (y0, x0, y1, x1), method, target, image,
                                     params)
    if progress is not None and method != "lrp":  # LRP reports after each backward
        progress(count, count)
    return xr.DataArray(scores, dims=("channel",), coords={"channel": np.arange(count)},
                        name="box_contribution",
                        attrs={"method": method, "layer": layer, "region": [y0, x0, y1, x1]})


def _fitting_rows(ex: Explainer, rows: int) -> int:
    """``rows``, or fewer so that a kept LRP forward of that many images fits :data:`MEMORY`."""
    outputs = sum(int(np.prod(shape[1:])) for shape in ex.context.shapes().values())
    per_row = 2.5 * outputs * ex.context.images.element_size()
    return max(1, min(rows, int(MEMORY // max(per_row, 1.0))))


def _box_sums(maps: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    """Per map (K, ..., H, W), float64: the sum inside ``box`` and the whole sum."""
    y0, x0, y1, x1 = box
    values = maps.detach().float().cpu().numpy().astype(np.float64)
    axes = tuple(range(1, values.ndim))
    return values[..., y0:y1, x0:x1].sum(axis=axes), values.sum(axis=axes)


def _lrp_scores(ex: Explainer, layer: str, box: tuple[int, int, int, int], target: Any,
                image: int, rows: int, progress: Callable[[int, int], None] | None,
                params: dict[str, Any]) -> np.ndarray:
    """CRP maps of every channel, ``rows`` channels per backward on a kept forward of the
    image repeated ``rows`` times; each map's sum over ``box``."""
    lrp = get_method("lrp")
    ctx = ex.context
    resolved = lrp.bind(ctx, lrp.resolve_params(params))
    lrp.check(ctx, layer, resolved)
    chosen = ctx.resolve_target(target)[image].repeat(rows)
    repeated = ctx.images[image:image + 1].repeat(rows, *([1] * (ctx.images.ndim - 1)))
    batch = Context(ex.model, repeated, ex.preprocess, False, ctx.output, ctx.grid)
    count = channel_count(ctx, layer)
    scores = np.zeros(count)
    with model_guard(ex.model, exclusive=True):
        kept, chosen, rules = lrp.prepare(batch, chosen, **resolved)
        out = kept.output(layer)
        for start in range(0, count, rows):
            picked = torch.arange(start, min(start + rows, count))
            # row i keeps channel start + i; rows past the last channel keep none
            mask = torch.zeros(rows, count, *([1] * (out.ndim - 2)), dtype=out.dtype,
                               device=out.device)
            mask[torch.arange(len(picked)), picked.to(out.device)] = 1
            relevance, _ = kept.conditional(chosen, resolved["composite"], rules, layer, mask)
            # the map ex.explain gives: relevance summed over the colour channels
            scores[picked.numpy()] = _box_sums(relevance[:len(picked)].sum(dim=1), box)[0]
            if progress is not None:
                progress(int(picked[-1]) + 1, count)
    return scores


def _closed_form_scores(ex: Explainer, layer: str, box: tuple[int, int, int, int],
                        method: str, target: Any, image: int,
                        params: dict[str, Any]) -> np.ndarray:
    """Grad-CAM / FEM: every channel's conditional map at once (channels as a batch),
    upsampled and normalised as ``ex.explain`` does; contribution × share in ``box``."""
    m = get_method(method)
    ctx = ex.context
    resolved = m.bind(ctx, m.resolve_params(params))
    m.check(ctx, layer, resolved)
    contributions = ex.channels(layer, method, target=target, **params).values[image]
    if method == "gradcam":  # the map of {k}: ReLU(α_k·A_k)
        with model_guard(ex.model, exclusive=m.changes_model):
            activation, weights = layer_terms(ctx, layer, ctx.resolve_target(target))
        raw = torch.relu(weights[image] * activation[image])
    else:  # fem, the map of {k}: μ_k·[A_k ≥ μ_k + K·σ_k]
        activation = ex.activations([layer])[layer][image]
        raw = fem_map(activation[:, None], resolved["K"])
    maps = minmax(upsample(raw.float(), ex.size), dims=map_dims(ex.size))
    inside, total = _box_sums(maps, box)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total == 0, 0.0, inside / total)
    return contributions.astype(np.float64) * share
