"""Models by name: small shipped CNNs for the shapes data (offline) and torchvision's zoo.

>>> import torch, xaiwidgets as xw
>>> model, preprocess, classes = xw.models.load("shapes-vgg")
>>> images = xw.datasets.shapes(n=2, seed=1).image.values
>>> model(preprocess(torch.from_numpy(images))).shape, classes[0]
(torch.Size([2, 4]), 'circle')

``load`` returns a :class:`LoadedModel` named tuple ``(model, preprocess, classes)``:
the model in eval mode, a callable mapping display images in [0, 1] ``(N,3,H,W)`` to
the model's input (normalisation only, no resizing, so explanations stay at display
resolution), and the class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn

from ..core.ops import close_matches
from .architectures import ARCHITECTURES, build

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: models whose weights ship with the package (see models/README.md)
SHIPPED = ("shapes-vgg", "shapes-resnet", "shapes-vgg-shuffled", "shapes-video", "digits",
           "shapes-vit")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize:
    """Per-channel ``(x - mean) / std`` on (N,3,H,W) images or (N,3,T,H,W) clips, on
    the inputs' device.

    >>> Normalize((0.5,) * 3, (0.25,) * 3)(torch.ones(1, 3, 2, 2)).unique()
    tensor([2.])
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (images.ndim - 2)
        mean = torch.as_tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.std, dtype=images.dtype, device=images.device)
        return (images - mean.view(shape)) / std.view(shape)

    def __repr__(self) -> str:
        mean = ", ".join(f"{m:.3f}" for m in self.mean)
        std = ", ".join(f"{s:.3f}" for s in self.std)
        return f"Normalize(mean=({mean}), std=({std}))"


class LoadedModel(NamedTuple):
    """What :func:`load` returns: unpack as ``model, preprocess, classes = load(...)``.

    >>> model, preprocess, classes = load("shapes-vgg")
    >>> classes
    ['circle', 'square', 'triangle', 'star']
    """

    model: nn.Module
    preprocess: Normalize
    classes: list[str]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (no network) and are not cached.

    Catch it to go on offline::

        try:
            model, preprocess, classes = xw.models.load("resnet50")
        except xw.models.WeightsUnavailableError:
            model, preprocess, classes = xw.models.load("resnet50", weights=None)
    """


def available() -> list[str]:
    """Names of the shipped models whose weights are in the package (they load offline).

    >>> "shapes-vgg" in available()
    True
    """
    return [name for name in SHIPPED if (WEIGHTS_DIR / f"{name}.pt").exists()]


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A weights file as {"state_dict": ..., other metadata}; a bare state_dict is wrapped.
    Half-precision tensors (how the shipped weights are stored) come back as float32."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        checkpoint = {"state_dict": checkpoint}
    checkpoint["state_dict"] = {
        key: value.float() if value.is_floating_point() else value
        for key, value in checkpoint["state_dict"].items()
    }
    return checkpoint


def _load_shapes(name: str, weights: Any) -> LoadedModel:
    path = WEIGHTS_DIR / f"{name}.pt" if weights == "default" else weights
    if path is None:
        # random init: the shipped checkpoint still tells the normalisation and classes
        default = WEIGHTS_DIR / f"{name}.pt"
        checkpoint = _read_checkpoint(default) if default.exists() else {}
        model = build(name)
    else:
        checkpoint = _read_checkpoint(path)
        model = build(checkpoint.get("architecture", name))
        model.load_state_dict(checkpoint["state_dict"])
        if weights == "default":
            # the tag survives copies (sanity checks), so MLFEM still finds its trained NET
            model.xaiwidgets_name = name
    from ..datasets.shapes import CLASSES

    preprocess = Normalize(checkpoint.get("mean", (0.5,) * 3), checkpoint.get("std", (0.25,) * 3))
    return LoadedModel(model, preprocess, list(checkpoint.get("classes", CLASSES)))


def _download_hint(name: str) -> str:
    return (
        f"could not download the pretrained weights of {name!r} (no network?) and they are "
        f"not in the torch hub cache ({torch.hub.get_dir()}). Offline alternatives: "
        f"xw.models.load({name!r}, weights=None) for a randomly initialised model, "
        f"xw.models.load({name!r}, weights='path/to/state_dict.pt') for local weights, or a "
        f"shipped model trained on xw.datasets.shapes: 'shapes-vgg', 'shapes-resnet'."
    )


def _load_torchvision(name: str, weights: Any) -> LoadedModel:
    try:
        known = torchvision.models.get_model_weights(name)
    except ValueError:
        known = None
    enum = None
    if weights == "default":
        enum = known.DEFAULT if known is not None else None
    elif isinstance(weights, str) and known is not None and weights in known.__members__:
        enum = known[weights]
    elif not isinstance(weights, (str, Path)) and weights is not None:
        enum = weights  # a torchvision WeightsEnum member
    if enum is not None:
        try:
            model = torchvision.models.get_model(name, weights=enum)
        except (OSError, HTTPException) as error:  # URLError, timeouts, refused connections
            raise WeightsUnavailableError(_download_hint(name)) from error
    else:
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            model.load_state_dict(_read_checkpoint(weights)["state_dict"])
    # torchvision classifiers have 1000 ImageNet outputs unless weights say otherwise
    meta = (enum or known.DEFAULT).meta if known is not None else {}
    categories = list(meta.get("categories", [str(i) for i in range(1000)]))
    return LoadedModel(model, Normalize(IMAGENET_MEAN, IMAGENET_STD), categories)


def load(name: str, weights: Any = "default", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by name, in eval mode on ``device``, with its preprocess and class names.

    Parameters
    ----------
    name
        A shipped model (``available()``: ``"shapes-vgg"``, ``"shapes-resnet"``,
        ``"shapes-vgg-shuffled"``, trained on :func:`xaiwidgets.datasets.shapes` at
        128 px; ``"shapes-vit"``, a small Vision Transformer on the same data;
        ``"digits"``, grayscale 32×32 handwritten digits) or any
        ``torchvision.models`` classifier (``"resnet50"``, ``"vgg16"``, ...).
    weights
        ``"default"``: the shipped weights, or torchvision's default pretrained weights
        (downloaded once into the torch hub cache; without network and cache a
        :class:`WeightsUnavailableError` names the offline alternatives); ``None``:
        random initialisation; a path to a state_dict (or a checkpoint written by
        ``python -m xaiwidgets.models.train``); for torchvision, also a weights name
        such as ``"IMAGENET1K_V2"``.
    device
        Where to put the model.

    Returns
    -------
    LoadedModel
        ``(model, preprocess, classes)``; ``preprocess`` is ImageNet normalisation for
        torchvision models and the training normalisation for shipped ones.

    >>> model, preprocess, classes = load("shapes-resnet")
    >>> type(model).__name__, model.training
    ('ShapesResNet', False)
    """
    if name == "digits":  # grayscale 1×32×32 (models/digits.py)
        from . import digits

        loaded = digits.load(weights)
    elif name in SHIPPED or name.removesuffix("-shuffled") in ARCHITECTURES:
        loaded = _load_shapes(name, weights)
    elif name in torchvision.models.list_models(module=torchvision.models):
        loaded = _load_torchvision(name, weights)
    else:
        options = list(SHIPPED) + torchvision.models.list_models(module=torchvision.models)
        raise ValueError(
            f"unknown model {name!r}; did you mean {close_matches(name, options)}? "
            f"Shipped: {list(SHIPPED)}; any torchvision.models classifier works too."
        )
    loaded.model.to(device).eval()
    return loaded


class ModelChoice(NamedTuple):
    """What :func:`load_or_fallback` returns: the model loaded, its name, and a note to show.

    A notebook shows the note and goes on with whatever could be loaded::

        choice = xw.models.load_or_fallback("resnet50")
        print(choice.note)
        model, preprocess, classes = choice.loaded
    """

    loaded: LoadedModel
    #: the model actually loaded: the one asked for, or the fallback
    name: str
    #: one sentence for the reader: which weights these are, and why
    note: str
    #: ``True`` when the pretrained weights could not be had
    offline: bool


def load_or_fallback(name: str = "resnet50", fallback: str | None = None,
                     device: str | torch.device = "cpu") -> ModelChoice:
    """Load ``name`` with its pretrained weights, or, when they cannot be downloaded, a
    fallback: the shipped model ``fallback``, or (``fallback=None``) the same
    architecture with random weights. The ``note`` says which, for notebooks and apps.

    >>> choice = load_or_fallback("shapes-vgg")
    >>> choice.name, choice.offline
    ('shapes-vgg', False)
    >>> model, preprocess, classes = choice.loaded
    """
    try:
        loaded = load(name, device=device)
    except WeightsUnavailableError:
        target = fallback or name
        loaded = load(target, weights="default" if fallback else None, device=device)
        what = (f"the shipped model {fallback!r} (trained on xw.datasets.shapes)" if fallback
                else f"{name} with RANDOM weights: the maps show the machinery, not a real "
                     "explanation")
        note = f"Offline: the pretrained weights of {name!r} could not be downloaded; using {what}."
        return ModelChoice(loaded, target, note, offline=True)
    if name in SHIPPED:
        data = "scikit-learn's digits" if name == "digits" else "xw.datasets.shapes"
        note = f"{name}: shipped with xaiwidgets, trained on {data}."
    else:
        note = f"{name} with pretrained weights ({len(loaded.classes)} ImageNet classes)."
    return ModelChoice(loaded, name, note, offline=False)


__all__ = ["LoadedModel", "ModelChoice", "Normalize", "WeightsUnavailableError", "available",
           "load", "load_or_fallback"]
