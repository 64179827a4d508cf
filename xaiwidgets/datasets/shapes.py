"""Synthetic shapes with simulated gaze: a labelled, fixation-annotated toy benchmark.

Each image shows one large *target* object (its class is the label: circle, square,
triangle or star) and ``clutter`` smaller distractors of the other classes, in random
colours, scales, rotations and positions, on a textured background (smooth noise or
stripes). The target is drawn last, so its mask is the whole shape.

Observer model (simulated gaze)
-------------------------------
``observers`` observers each make ``fixations_per_observer`` independent fixations
(so ``observers * fixations_per_observer`` per image). Each fixation lands

* with probability ``p_target`` at a pixel drawn uniformly from the target's mask,
* with probability ``p_distractor`` uniformly on the visible distractors (on the
  target when there are none),
* otherwise at a centre-bias point: a Gaussian at the image centre with standard
  deviation ``centre_sigma * size``, rounded and clipped to the image.

So at least ``p_target`` (0.7 by default) of the fixations fall inside the mask, a bit
more in practice since centre-bias fixations may land on the target too. The GFDM is
:func:`xaiwidgets.gfdm` of the fixation counts with ``sigma`` (default size / 16).

>>> import xaiwidgets as xw
>>> ds = xw.datasets.shapes(n=4, size=64, seed=0)
>>> ds.image.shape, ds.attrs["classes"]
((4, 3, 64, 64), ['circle', 'square', 'triangle', 'star'])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from ..evaluation.gfdm import default_sigma, gfdm

CLASSES = ("circle", "square", "triangle", "star")
#: number of polygon tips per class (0: circle) and inner/outer radius ratio for stars
_TIPS = np.array([0, 4, 3, 5])
_STAR_INNER = 0.45
#: circumradius / equal-area radius, so that every class covers the same area for a
#: given size and area is no cue to the class: sqrt(pi / area of the unit shape)
_AREA_RADIUS = np.sqrt(
    np.pi
    / np.array(
        [
            np.pi,
            2.0,
            3 * np.sqrt(3) / 4,
            5 * _STAR_INNER * np.sin(np.pi / 5),
        ]
    )
)
#: equal-area radius ranges as fractions of the image side
TARGET_SIZE = (0.13, 0.2)
DISTRACTOR_SIZE = (0.05, 0.085)
_CHUNK = 256  # images drawn at once: bounds memory at about 100 MB per chunk at 128 px


def _local_masks(
    dy: np.ndarray, dx: np.ndarray, radius: np.ndarray, angle: np.ndarray, label: np.ndarray
) -> np.ndarray:
    """Boolean masks of m objects at offsets (dy, dx) (m, h, w) from their centres.

    Polygons and stars are one formula: fold the polar angle into the half-sector
    between a tip (radius R) and the next inner vertex (radius rho), then test which
    side of the tip-to-vertex edge the point lies on. A regular k-gon is a k-tip star
    with rho = R cos(pi / k).
    """
    r = np.hypot(dy, dx)
    tips = _TIPS[label]
    outer = radius.astype(np.float32)[:, None, None]
    k = np.maximum(tips, 3).astype(np.float32)[:, None, None]
    sector = 2 * np.pi / k
    phi = np.arctan2(dy, dx) - angle.astype(np.float32)[:, None, None]
    psi = np.abs(np.mod(phi + sector / 2, sector) - sector / 2)
    inner_ratio = np.where(tips == 5, _STAR_INNER, np.cos(np.pi / np.maximum(tips, 3)))
    inner = outer * inner_ratio.astype(np.float32)[:, None, None]
    ax, ay = inner * np.cos(sector / 2) - outer, inner * np.sin(sector / 2)
    polygon = ax * (r * np.sin(psi)) - ay * (r * np.cos(psi) - outer) >= 0
    return np.where((tips == 0)[:, None, None], r <= outer, polygon)


def _shape_masks(
    size: int,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: np.ndarray,
    angle: np.ndarray,
    label: np.ndarray,
) -> np.ndarray:
    """Boolean masks (m, size, size) of m objects given centre, circumradius, rotation
    and class. The geometry is evaluated only in a square window around each object
    (one window size for all, from the largest radius), then pasted into a canvas."""
    m = len(cy)
    half = int(np.ceil(radius.max())) + 1
    window = np.arange(2 * half + 1)
    top = np.floor(cy).astype(np.int64) - half
    left = np.floor(cx).astype(np.int64) - half
    dy = (top[:, None] + window - cy[:, None]).astype(np.float32)[:, :, None]
    dx = (left[:, None] + window - cx[:, None]).astype(np.float32)[:, None, :]
    dy, dx = np.broadcast_arrays(dy, dx)
    local = _local_masks(dy, dx, radius, angle, label)
    # a canvas padded by the window side, so windows reaching past the border still fit
    pad = 2 * half + 1
    canvas = np.zeros((m, size + 2 * pad, size + 2 * pad), bool)
    rows = (top[:, None] + pad + window)[:, :, None]
    cols = (left[:, None] + pad + window)[:, None, :]
    canvas[np.arange(m)[:, None, None], rows, cols] = local
    return canvas[:, pad : pad + size, pad : pad + size]


def _place(
    rng: np.random.Generator, size: int, target: dict, radii: np.ndarray, tries: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Distractor centres (n, c): the first of ``tries`` candidates clear of the target
    and of earlier distractors, else the candidate with the most clearance."""
    n, clutter = radii.shape
    cy = np.zeros((n, clutter), np.float32)
    cx = np.zeros((n, clutter), np.float32)
    for j in range(clutter):
        rad = radii[:, j : j + 1]
        low, high = rad, size - 1 - rad
        py = low + rng.random((n, tries)) * (high - low)
        px = low + rng.random((n, tries)) * (high - low)
        centres = [(target["cy"][:, None], target["cx"][:, None], target["radius"][:, None])]
        centres += [(cy[:, i : i + 1], cx[:, i : i + 1], radii[:, i : i + 1]) for i in range(j)]
        clearance = np.min([np.hypot(py - y, px - x) - r - rad - 2 for y, x, r in centres], axis=0)
        ok = clearance >= 0
        pick = np.where(ok.any(axis=1), ok.argmax(axis=1), clearance.argmax(axis=1))
        cy[:, j] = py[np.arange(n), pick]
        cx[:, j] = px[np.arange(n), pick]
    return cy, cx


def _colours(rng: np.random.Generator, n: int, avoid: list[np.ndarray]) -> np.ndarray:
    """(n, 3) saturated colours at least 0.4 (RGB distance) from every colour in ``avoid``
    (the background's), so objects always stand out; falls back to the farthest try."""
    tries = rng.random((n, 16, 3)).astype(np.float32)
    distance = np.min([np.linalg.norm(tries - a[:, None], axis=-1) for a in avoid], axis=0)
    ok = distance >= 0.4
    pick = np.where(ok.any(axis=1), ok.argmax(axis=1), distance.argmax(axis=1))
    return tries[np.arange(n), pick]


def _background(rng: np.random.Generator, out: np.ndarray) -> list[np.ndarray]:
    """Fill ``out`` (n, 3, H, W) with textured backgrounds: two muted colours mixed by
    smooth value noise (half the images) or by sinusoidal stripes of random angle,
    frequency and phase. Returns the two colours (n, 3) each."""
    n, _, size, _ = out.shape
    low = rng.uniform(0.15, 0.85, (n, 3)).astype(np.float32)
    high = np.clip(low + rng.uniform(-0.3, 0.3, (n, 3)), 0, 1).astype(np.float32)
    grid = torch.from_numpy(rng.random((n, 1, 6, 6), dtype=np.float32))
    pattern = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    pattern = pattern.clamp_(0, 1).numpy()
    stripes = np.flatnonzero(rng.random(n) < 0.5)
    coords = np.arange(size, dtype=np.float32)
    theta = rng.uniform(0, np.pi, (len(stripes), 1, 1, 1)).astype(np.float32)
    freq = rng.uniform(3, 10, theta.shape).astype(np.float32) * np.float32(2 * np.pi / size)
    phase = rng.uniform(0, 2 * np.pi, theta.shape).astype(np.float32)
    along = coords[:, None] * np.sin(theta) + coords * np.cos(theta)
    pattern[stripes] = 0.5 + 0.5 * np.sin(freq * along + phase)
    np.multiply((high - low)[:, :, None, None], pattern, out=out)
    out += low[:, :, None, None]
    return [low, high]


def _sample_in_masks(rng: np.random.Generator, masks: np.ndarray, k: int) -> np.ndarray:
    """(n, k) flat pixel indices drawn uniformly from each (non-empty) mask (n, H*W):
    one searchsorted over the cumulative count of all masks at once."""
    n, pixels = masks.shape
    cumulative = np.cumsum(masks.reshape(-1), dtype=np.int64)
    counts = masks.sum(axis=1)
    before = np.concatenate([[0], cumulative[pixels - 1 :: pixels][:-1]])
    rank = before[:, None] + rng.integers(0, counts[:, None], (n, k)) + 1
    flat = np.searchsorted(cumulative, rank, side="left")
    return flat - np.arange(n)[:, None] * pixels


def _fixations(
    rng: np.random.Generator,
    target: np.ndarray,
    distractors: np.ndarray,
    k: int,
    p_target: float,
    p_distractor: float,
    centre_sigma: float,
) -> np.ndarray:
    """Fixation counts (n, H, W) of the observer model in the module docstring."""
    n, height, width = target.shape
    target_flat = target.reshape(n, -1)
    has_distractor = distractors.reshape(n, -1).any(axis=1, keepdims=True)
    distractor_flat = np.where(has_distractor, distractors.reshape(n, -1), target_flat)
    on_target = _sample_in_masks(rng, target_flat, k)
    on_distractor = _sample_in_masks(rng, distractor_flat, k)
    centre = rng.normal(0, centre_sigma, (n, k, 2)) * (height, width) + (
        (height - 1) / 2,
        (width - 1) / 2,
    )
    cy = np.clip(np.rint(centre[..., 0]), 0, height - 1).astype(np.int64)
    cx = np.clip(np.rint(centre[..., 1]), 0, width - 1).astype(np.int64)
    source = rng.random((n, k))
    flat = np.where(
        source < p_target,
        on_target,
        np.where(source < p_target + p_distractor, on_distractor, cy * width + cx),
    )
    image_index = np.arange(n)[:, None] * (height * width)
    counts = np.bincount((image_index + flat).ravel(), minlength=n * height * width)
    return counts.reshape(n, height, width).astype(np.int32)


def _draw(
    rng: np.random.Generator, out: np.ndarray, clutter: int, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw n images into ``out`` (n, 3, H, W) (in place: no full-size temporaries);
    return labels (n,), target masks and visible-distractor masks (n, H, W)."""
    n, _, size, _ = out.shape
    label = rng.integers(0, len(CLASSES), n)
    target = {"radius": rng.uniform(*TARGET_SIZE, n) * size * _AREA_RADIUS[label]}
    for axis in ("cy", "cx"):
        target[axis] = target["radius"] + rng.random(n) * (size - 1 - 2 * target["radius"])
    target["angle"] = rng.uniform(0, 2 * np.pi, n)
    # distractors take the other classes: a random non-zero offset from the label
    d_label = (label[:, None] + rng.integers(1, len(CLASSES), (n, clutter))) % len(CLASSES)
    d_radius = rng.uniform(*DISTRACTOR_SIZE, (n, clutter)) * size * _AREA_RADIUS[d_label]
    d_cy, d_cx = _place(rng, size, target, d_radius)
    d_angle = rng.uniform(0, 2 * np.pi, (n, clutter))
    background = _background(rng, out)
    distractors = np.zeros((n, size, size), bool)
    for j in range(clutter):
        mask = _shape_masks(
            size, d_cy[:, j], d_cx[:, j], d_radius[:, j], d_angle[:, j], d_label[:, j]
        )
        colour = _colours(rng, n, background)[:, :, None, None]
        np.copyto(out, colour, where=mask[:, None])
        distractors |= mask
    mask = _shape_masks(size, target["cy"], target["cx"], target["radius"], target["angle"], label)
    np.copyto(out, _colours(rng, n, background)[:, :, None, None], where=mask[:, None])
    out += np.float32(noise) * rng.standard_normal(out.shape, dtype=np.float32)
    np.clip(out, 0, 1, out=out)
    return label, mask, distractors & ~mask


def _buffers(n: int, pixels: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Empty arrays the generators draw into, ``pixels`` the shape of one image's map:
    (size, size), or (frames, size, size) for clips."""
    return {
        "image": np.empty((n, 3, *pixels), np.float32),
        "label": np.empty(n, np.int64),
        "mask": np.empty((n, *pixels), bool),
        "distractors": np.empty((n, *pixels), bool),
        "fixations": np.empty((n, *pixels), np.int32),
    }


def _chunks(n: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most ``chunk`` items covering ``range(n)``.

    >>> _chunks(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _dataset(data: dict[str, np.ndarray], dims: tuple[str, ...], attrs: dict) -> xr.Dataset:
    """The generators' Dataset: ``image`` (image, channel, *dims), ``label`` (image) and
    the maps (image, *dims); coordinates ``channel`` (r, g, b) and ``dims`` (0, 1, ...).
    No ``image`` coordinate: the name belongs to the image variable (xarray forbids both).
    """
    pixel = ("image", *dims)
    maps = ("mask", "distractors", "fixations", "gfdm")
    return xr.Dataset(
        {
            "image": (("image", "channel", *dims), data["image"]),
            "label": (("image",), data["label"]),
            **{name: (pixel, data[name]) for name in maps},
        },
        coords={
            "channel": ["r", "g", "b"],
            **{d: np.arange(k) for d, k in zip(dims, data["mask"].shape[1:], strict=True)},
        },
        attrs=attrs,
    )


def shapes(
    n: int = 256,
    size: int = 128,
    clutter: int = 2,
    seed: int = 0,
    *,
    observers: int = 5,
    fixations_per_observer: int = 8,
    p_target: float = 0.7,
    p_distractor: float = 0.15,
    centre_sigma: float = 0.2,
    sigma: float | None = None,
    noise: float = 0.02,
) -> xr.Dataset:
    """Synthetic shape images with labels, target masks, simulated fixations and GFDMs.

    Parameters
    ----------
    n, size
        Number of images and their side in pixels (square images).
    clutter
        Number of smaller distractor objects of the other classes per image.
    seed
        Everything (drawing and gaze) is a function of ``seed``: same seed, same data.
        The shipped models were trained on seeds >= 10_000 (see ``models/README.md``).
    observers, fixations_per_observer, p_target, p_distractor, centre_sigma
        The observer model of the module docstring (``centre_sigma`` as a fraction of
        ``size``); ``1 - p_target - p_distractor`` of fixations follow the centre bias.
    sigma
        GFDM Gaussian sigma in pixels; default ``size / 16``.
    noise
        Standard deviation of the pixel noise added to every image.

    Returns
    -------
    xarray.Dataset
        ``image`` (image, channel, y, x) float32 in [0, 1]; ``label`` (image) int64;
        ``mask`` (image, y, x) bool, the target; ``distractors`` (image, y, x) bool, the
        visible distractor pixels; ``fixations`` (image, y, x) int32 counts; ``gfdm``
        (image, y, x) float32, max 1. ``attrs``: ``classes`` and every argument above
        (netCDF-safe: str and numbers only). xarray lists ``image`` among the coordinates,
        not ``data_vars``, because it shares its name with the ``image`` dimension;
        ``ds.image`` and ``ds["image"]`` work as usual.

    >>> ds = shapes(n=2, size=32, seed=1)
    >>> int(ds.fixations.sum()), float(ds.gfdm.max())
    (80, 1.0)
    """
    if n < 1 or size < 16 or clutter < 0 or observers < 1 or fixations_per_observer < 1:
        raise ValueError("need n >= 1, size >= 16, clutter >= 0 and at least one fixation")
    if not (0 <= p_target and 0 <= p_distractor and p_target + p_distractor <= 1):
        raise ValueError("p_target and p_distractor must be probabilities summing to <= 1")
    sigma = default_sigma(size) if sigma is None else float(sigma)
    rng = np.random.default_rng(seed)
    k = observers * fixations_per_observer
    data = _buffers(n, (size, size))
    data["gfdm"] = np.empty((n, size, size), np.float32)
    for part in _chunks(n, _CHUNK):
        drawn = _draw(rng, data["image"][part], clutter, noise)
        data["label"][part], data["mask"][part], data["distractors"][part] = drawn
        data["fixations"][part] = _fixations(
            rng, drawn[1], drawn[2], k, p_target, p_distractor, centre_sigma
        )
        data["gfdm"][part] = gfdm(data["fixations"][part], sigma=sigma)
    return _dataset(
        data,
        ("y", "x"),
        {
            "classes": list(CLASSES),
            "seed": int(seed),
            "size": int(size),
            "clutter": int(clutter),
            "sigma": float(sigma),
            "observers": int(observers),
            "fixations_per_observer": int(fixations_per_observer),
            "p_target": float(p_target),
            "p_distractor": float(p_distractor),
            "centre_sigma": float(centre_sigma),
            "noise": float(noise),
            "observer_model": "uniform on target mask (p_target), on distractors "
            "(p_distractor), else centre-bias Gaussian (centre_sigma * size)",
        },
    )
