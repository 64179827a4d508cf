"""Top-k reference patches of a layer's channels, kept while streaming a dataset.

A chunk of images gives, for every channel, its best images (:func:`chunk_candidates`:
the value, the image's dataset index and the patch); :func:`merge` keeps the best
``top`` of the candidates seen so far. Ties go to the lower dataset index, so the
result is the brute-force top-k of the whole dataset whatever the chunking.

>>> import torch
>>> maps = torch.zeros(1, 1, 4, 4); maps[0, 0, 1, 2] = 1.0
>>> patch_boxes(maps[:, 0], (32, 32)).tolist()   # cell (1, 2) of a stride-8 map
[[8, 16, 16, 24]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: the per-(channel, rank) variables of a references Dataset, besides ``value``
FIELDS = ("image", "y0", "x0", "y1", "x1")


def patch_boxes(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The box of each map's cells at or above half its maximum, in input pixels.

    ``maps`` (K, h, w) at the layer's resolution, ``size`` the input's (H, W). A cell
    (u, v) covers input pixels [u·H/h, (u+1)·H/h) (rounded outwards), so every box is
    at least the layer's stride. Returns (K, 4) ``y0, x0, y1, x1`` (end exclusive);
    a map with no positive value gives the whole image.
    """
    k, h, w = maps.shape
    height, width = int(size[0]), int(size[1])
    peak = maps.flatten(1).amax(dim=1)
    above = (maps >= 0.5 * peak[:, None, None]) & (peak[:, None, None] > 0)
    rows, cols = above.any(dim=2), above.any(dim=1)
    ys, xs = torch.arange(h), torch.arange(w)
    u0 = torch.where(rows, ys, h).amin(dim=1)
    u1 = torch.where(rows, ys, -1).amax(dim=1)
    v0 = torch.where(cols, xs, w).amin(dim=1)
    v1 = torch.where(cols, xs, -1).amax(dim=1)
    empty = peak <= 0
    u0, v0 = u0.masked_fill(empty, 0), v0.masked_fill(empty, 0)
    u1, v1 = u1.masked_fill(empty, h - 1), v1.masked_fill(empty, w - 1)
    y0 = torch.div(u0 * height, h, rounding_mode="floor")
    x0 = torch.div(v0 * width, w, rounding_mode="floor")
    y1 = torch.div((u1 + 1) * height + h - 1, h, rounding_mode="floor").clamp(max=height)
    x1 = torch.div((v1 + 1) * width + w - 1, w, rounding_mode="floor").clamp(max=width)
    return torch.stack([y0, x0, y1, x1], dim=1)


def chunk_candidates(values: torch.Tensor, maps: torch.Tensor, indices: np.ndarray,
                     top: int, size: Sequence[int]) -> dict[str, np.ndarray]:
    """Each channel's best ``top`` images of a chunk, with their patches.

    ``values`` (N, C) per image and channel; ``maps`` (N, C, h, w) the channel maps the
    patch is read from; ``indices`` the images' dataset indices (increasing). Returns
    arrays (C, k), k = min(top, N): ``value`` and :data:`FIELDS`.
    """
    n, channels = values.shape
    k = min(int(top), n)
    # stable sort of -value: equal values keep the dataset order (lower index first)
    order = torch.sort(-values.T.double(), dim=1, stable=True).indices[:, :k]  # (C, k)
    chosen = torch.arange(channels)[:, None].expand(channels, k)
    picked = maps[order.reshape(-1), chosen.reshape(-1)]  # (C·k, h, w)
    boxes = patch_boxes(picked.float(), size).reshape(channels, k, 4).numpy()
    out = {"value": values.T.gather(1, order).double().numpy(),
           "image": np.asarray(indices, dtype=np.int64)[order.numpy()]}
    for j, name in enumerate(FIELDS[1:]):
        out[name] = boxes[..., j].astype(np.int64)
    return out


def merge(kept: dict[str, np.ndarray] | None, new: dict[str, np.ndarray],
          top: int) -> dict[str, np.ndarray]:
    """The best ``top`` per channel of two candidate sets (value descending, then
    dataset index ascending).

    >>> a = {"value": np.array([[3.0, 1.0]]), "image": np.array([[0, 1]])}
    >>> b = {"value": np.array([[2.0, 1.0]]), "image": np.array([[2, 3]])}
    >>> merge(a, b, 3)["image"].tolist()
    [[0, 2, 1]]
    """
    if kept is None:
        return {name: array[:, :top] for name, array in new.items()}
    both = {name: np.concatenate([kept[name], new[name]], axis=1) for name in new}
    order = np.lexsort((both["image"], -both["value"]), axis=1)[:, :top]
    return {name: np.take_along_axis(array, order, axis=1) for name, array in both.items()}
