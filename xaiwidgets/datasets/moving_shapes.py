"""Moving shapes with simulated gaze: clips whose class is set by the target's motion.

Each clip (``frames`` frames of ``size`` x ``size`` RGB) shows one large *target*
shape and ``clutter`` smaller distractors over a static textured background, drawn
with the still-image generator's code (:mod:`xaiwidgets.datasets.shapes`). The
target's shape, colour, size, rotation and start position are random and the same
for every class; the **class is the target's direction of motion**: ``right``,
``left``, ``up`` or ``down``, at a constant random speed. Each distractor drifts
with its own random velocity (uniform direction, same speed range).

The scene wraps around like a torus (a shape leaving on one side re-enters on the
other) and every object starts at a uniform position on it, independently of the
others, so in *every* frame the target's position is uniform over the image whatever
the class, and nothing else in a frame depends on the class: a single frame cannot
tell the classes apart, only the motion between frames can. Objects may overlap; the
target is drawn on top. Frame 0 does not depend on the label at all (``labels=`` lets you draw the
same scene with another motion). Pixel noise is drawn afresh for every frame.

Observer model (simulated gaze)
-------------------------------
``observers`` observers each give one gaze sample per frame. Each observer is in one
of ``1 + clutter`` states per frame, "on the target" or "on distractor j", a Markov
chain over frames:

* frame 0: on the target with probability ``1 - p_saccade``, else on a random
  distractor;
* then, per frame, an observer on the target makes a saccade to a random distractor
  with probability ``p_saccade``; one on a distractor makes a saccade back to the
  target with probability ``p_return``. In the long run a fraction
  ``p_return / (p_saccade + p_return)`` of samples (5/6 by default) is on the target.
  Without distractors the observer always pursues the target.
* Smooth pursuit: while on an object, the gaze is the object's centre plus an
  offset drawn at the saccade that landed there (Gaussian, standard deviation
  ``pursuit_spread`` times the object's equal-area radius, kept while the pursuit
  lasts) plus a per-frame jitter (Gaussian, ``jitter`` pixels). The gaze wraps around
  with the scene.
* Lapses: each sample is instead, with probability ``p_centre``, a centre-bias point
  (Gaussian at the image centre, standard deviation ``centre_sigma * size``, clipped).

Fixations are per-frame count maps; the GFDM is :func:`xaiwidgets.gfdm` of each frame's
counts with the images' sigma convention (default ``size / 16``).

>>> import xaiwidgets as xw
>>> ds = xw.datasets.moving_shapes(n=2, frames=8, size=64, seed=0)
>>> ds.image.dims, ds.gfdm.dims, ds.attrs["classes"]
(('image', 'channel', 't', 'y', 'x'), ('image', 't', 'y', 'x'), ['right', 'left', 'up', 'down'])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..evaluation.gfdm import default_sigma, gfdm
from .shapes import (
    _AREA_RADIUS,
    DISTRACTOR_SIZE,
    TARGET_SIZE,
    _background,
    _buffers,
    _chunks,
    _colours,
    _dataset,
    _shape_masks,
)
from .shapes import (
    CLASSES as SHAPE_CLASSES,
)

#: motion classes and their unit (dy, dx) directions (y grows downwards)
MOTIONS = ("right", "left", "up", "down")
_DIRECTIONS = np.array([[0.0, 1.0], [0.0, -1.0], [-1.0, 0.0], [1.0, 0.0]])
_CHUNK = 64  # clips drawn at once


def _torus_masks(
    size: int,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: np.ndarray,
    angle: np.ndarray,
    shape: np.ndarray,
) -> np.ndarray:
    """Masks (m, size, size) of shapes on a torus: drawn on a 3x3 tiling of the image
    with :func:`~xaiwidgets.datasets.shapes._shape_masks`, then folded back, so a shape
    crossing a border shows its part on the opposite side."""
    m = len(cy)
    tiled = _shape_masks(3 * size, cy + size, cx + size, radius, angle, shape)
    return tiled.reshape(m, 3, size, 3, size).any(axis=(1, 3))


def _scene(
    rng: np.random.Generator, n: int, size: int, clutter: int, speed: tuple
) -> dict[str, np.ndarray]:
    """Random scene parameters of n clips; every draw is made whatever the labels, so
    a given seed gives the same scene (frame 0 included) for any motion."""
    label = rng.integers(0, len(MOTIONS), n)
    shape = rng.integers(0, len(SHAPE_CLASSES), n)
    area_radius = rng.uniform(*TARGET_SIZE, n) * size
    radius = area_radius * _AREA_RADIUS[shape]
    # positions uniform on the torus and independent of each other (no clearance rule,
    # which would tie the distractors' layout to where the target was at frame 0)
    start = rng.random((n, 1 + clutter, 2)) * size
    angle = rng.uniform(0, 2 * np.pi, n)
    target_speed = rng.uniform(*speed, n) * size
    d_shape = rng.integers(0, len(SHAPE_CLASSES), (n, clutter))
    d_area_radius = rng.uniform(*DISTRACTOR_SIZE, (n, clutter)) * size
    d_radius = d_area_radius * _AREA_RADIUS[d_shape]
    d_angle = rng.uniform(0, 2 * np.pi, (n, clutter))
    heading = rng.uniform(0, 2 * np.pi, (n, clutter))
    d_speed = rng.uniform(*speed, (n, clutter)) * size
    d_velocity = d_speed[..., None] * np.stack([np.sin(heading), np.cos(heading)], -1)
    return {
        "label": label,
        # objects along axis 1: the target first, then the distractors
        "shape": np.concatenate([shape[:, None], d_shape], 1),
        "area_radius": np.concatenate([area_radius[:, None], d_area_radius], 1),
        "radius": np.concatenate([radius[:, None], d_radius], 1),
        "angle": np.concatenate([angle[:, None], d_angle], 1),
        "start": start,
        "target_speed": target_speed,
        "d_velocity": d_velocity,
    }


def _trajectories(scene: dict[str, np.ndarray], frames: int, size: int) -> np.ndarray:
    """Object centres (n, objects, frames, 2) as (y, x), wrapped into [0, size)."""
    velocity = _DIRECTIONS[scene["label"]] * scene["target_speed"][:, None]
    velocity = np.concatenate([velocity[:, None], scene["d_velocity"]], 1)
    t = np.arange(frames)[None, None, :, None]
    return np.mod(scene["start"][:, :, None] + velocity[:, :, None] * t, size)


def _draw(
    rng: np.random.Generator, out: np.ndarray, scene: dict, centres: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the clips into ``out`` (n, 3, T, H, W) in place; return the target masks and
    the visible-distractor masks (n, T, H, W)."""
    n, _, frames, size, _ = out.shape
    objects = centres.shape[1]
    background = _background(rng, out[:, :, 0])
    out[:, :, 1:] = out[:, :, :1]
    colours = [_colours(rng, n, background) for _ in range(objects)]
    target = np.empty((n, frames, size, size), bool)
    distractors = np.zeros((n, frames, size, size), bool)
    # distractors first, the target last (on top), so its mask is the whole shape
    for j in [*range(1, objects), 0]:
        for t in range(frames):
            mask = _torus_masks(
                size,
                centres[:, j, t, 0],
                centres[:, j, t, 1],
                scene["radius"][:, j],
                scene["angle"][:, j],
                scene["shape"][:, j],
            )
            np.copyto(out[:, :, t], colours[j][:, :, None, None], where=mask[:, None])
            if j:
                distractors[:, t] |= mask
            else:
                target[:, t] = mask
    out += np.float32(noise) * rng.standard_normal(out.shape, dtype=np.float32)
    np.clip(out, 0, 1, out=out)
    return target, distractors & ~target


def _gaze(
    rng: np.random.Generator,
    centres: np.ndarray,
    area_radius: np.ndarray,
    size: int,
    observers: int,
    p_saccade: float,
    p_return: float,
    pursuit_spread: float,
    jitter: float,
    p_centre: float,
    centre_sigma: float,
) -> np.ndarray:
    """Fixation counts (n, T, H, W) of the observer model in the module docstring."""
    n, objects, frames, _ = centres.shape
    clutter = objects - 1
    shape = (n, observers)
    state = np.zeros((n, observers, frames), np.int64)  # 0: target, j: distractor j
    leave, back = rng.random((2, n, observers, frames))
    pick = rng.integers(1, max(clutter, 1) + 1, (n, observers, frames))
    offset = rng.standard_normal((n, observers, frames, 2))
    for t in range(frames):
        before = state[:, :, t - 1] if t else np.zeros(shape, np.int64)
        if clutter:
            # frame 0 starts from "on the target", so it follows the same rule
            on_target = before == 0
            saccade_out = on_target & (leave[:, :, t] < p_saccade)
            saccade_back = ~on_target & (back[:, :, t] < p_return)
            state[:, :, t] = np.where(saccade_out, pick[:, :, t], np.where(saccade_back, 0, before))
        if t:  # the pursuit offset is kept until the next saccade
            same = state[:, :, t] == state[:, :, t - 1]
            offset[:, :, t] = np.where(same[..., None], offset[:, :, t - 1], offset[:, :, t])
    images = np.arange(n)[:, None, None]
    times = np.arange(frames)[None, None, :]
    spread = pursuit_spread * area_radius[images, state][..., None]
    point = centres[images, state, times] + spread * offset
    point += jitter * rng.standard_normal(point.shape)
    centre = rng.normal((size - 1) / 2, centre_sigma * size, point.shape)
    lapse = rng.random((n, observers, frames)) < p_centre
    yx = np.where(
        lapse[..., None],
        np.clip(np.rint(centre), 0, size - 1),
        np.mod(np.rint(point), size),
    ).astype(np.int64)
    flat = ((images * frames + times) * size + yx[..., 0]) * size + yx[..., 1]
    counts = np.bincount(flat.ravel(), minlength=n * frames * size * size)
    return counts.reshape(n, frames, size, size).astype(np.int32)


def _label_indices(labels: Sequence | None, n: int) -> np.ndarray | None:
    """``labels`` as class indices (n,), from indices or names; None stays None."""
    if labels is None:
        return None
    values = [MOTIONS.index(v) if isinstance(v, str) and v in MOTIONS else v for v in labels]
    index = np.asarray(values)
    if index.shape != (n,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} class indices (0-{len(MOTIONS) - 1}) or names from "
            f"{list(MOTIONS)}; got {list(labels)[:8]}"
        )
    if index.min() < 0 or index.max() >= len(MOTIONS):
        raise ValueError(f"labels must be in 0..{len(MOTIONS) - 1} ({list(MOTIONS)})")
    return index


def moving_shapes(
    n: int = 64,
    frames: int = 8,
    size: int = 64,
    clutter: int = 2,
    seed: int = 0,
    *,
    labels: Sequence[int | str] | None = None,
    speed: tuple[float, float] = (0.025, 0.05),
    observers: int = 8,
    p_saccade: float = 0.1,
    p_return: float = 0.5,
    pursuit_spread: float = 0.3,
    jitter: float = 0.5,
    p_centre: float = 0.05,
    centre_sigma: float = 0.2,
    sigma: float | None = None,
    noise: float = 0.02,
) -> xr.Dataset:
    """Clips of moving shapes labelled by the target's motion, with masks and simulated gaze.

    Parameters
    ----------
    n, frames, size
        Number of clips, frames per clip and the frames' side in pixels.
    clutter
        Number of smaller distractors per clip, each with its own random motion.
    seed
        Everything (scene, motion, noise, gaze) is a function of ``seed``. The shipped
        ``shapes-video`` model was trained on seeds >= 10_000.
    labels
        Optional motion class per clip (indices or names of ``MOTIONS``) instead of
        random ones; the scene (frame 0 included) is the same for any labels.
    speed
        Range of speeds (fraction of ``size`` per frame) of the target and distractors.
    observers, p_saccade, p_return, pursuit_spread, jitter, p_centre, centre_sigma
        The observer model of the module docstring (``jitter`` in pixels,
        ``centre_sigma`` as a fraction of ``size``).
    sigma
        GFDM Gaussian sigma in pixels; default ``size / 16`` as for the still images.
    noise
        Standard deviation of the pixel noise added to every frame.

    Returns
    -------
    xarray.Dataset
        ``image`` (image, channel, t, y, x) float32 in [0, 1]; ``label`` (image) int64;
        ``mask`` (image, t, y, x) bool, the target; ``distractors`` (image, t, y, x) bool,
        the visible distractor pixels; ``fixations`` (image, t, y, x) int32 counts (one
        per observer and frame); ``gfdm`` (image, t, y, x) float32, max 1 per frame.
        ``attrs``: ``classes`` (the motions), ``shapes`` (the shape names) and every
        argument above (netCDF-safe).

    >>> ds = moving_shapes(n=2, frames=4, size=32, seed=1)
    >>> ds.image.shape, int(ds.fixations.sum()), float(ds.gfdm.max())
    ((2, 3, 4, 32, 32), 64, 1.0)
    """
    if n < 1 or frames < 2 or size < 16 or clutter < 0 or observers < 1:
        raise ValueError("need n >= 1, frames >= 2, size >= 16, clutter >= 0, observers >= 1")
    probabilities = {"p_saccade": p_saccade, "p_return": p_return, "p_centre": p_centre}
    for name, value in probabilities.items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    if not 0 < speed[0] <= speed[1]:
        raise ValueError(f"speed must be a range (low, high) with 0 < low <= high, got {speed}")
    chosen = _label_indices(labels, n)
    sigma = default_sigma(size) if sigma is None else float(sigma)
    rng = np.random.default_rng(seed)
    data = _buffers(n, (frames, size, size))
    for part in _chunks(n, _CHUNK):
        scene = _scene(rng, part.stop - part.start, size, clutter, speed)
        if chosen is not None:
            scene["label"] = chosen[part]
        centres = _trajectories(scene, frames, size)
        data["label"][part] = scene["label"]
        data["mask"][part], data["distractors"][part] = _draw(
            rng, data["image"][part], scene, centres, noise
        )
        data["fixations"][part] = _gaze(
            rng,
            centres,
            scene["area_radius"],
            size,
            observers,
            p_saccade,
            p_return,
            pursuit_spread,
            jitter,
            p_centre,
            centre_sigma,
        )
    data["gfdm"] = gfdm(data["fixations"], sigma=sigma)
    return _dataset(
        data,
        ("t", "y", "x"),
        {
            "classes": list(MOTIONS),
            "shapes": list(SHAPE_CLASSES),
            "seed": int(seed),
            "frames": int(frames),
            "size": int(size),
            "clutter": int(clutter),
            "speed": [float(s) for s in speed],
            "sigma": float(sigma),
            "observers": int(observers),
            "p_saccade": float(p_saccade),
            "p_return": float(p_return),
            "pursuit_spread": float(pursuit_spread),
            "jitter": float(jitter),
            "p_centre": float(p_centre),
            "centre_sigma": float(centre_sigma),
            "noise": float(noise),
            "observer_model": "per frame, Markov chain target <-> distractors (p_saccade, "
            "p_return); smooth pursuit of the object's centre + offset (pursuit_spread x "
            "radius) + jitter; lapses to a centre-bias Gaussian (p_centre, centre_sigma)",
        },
    )
