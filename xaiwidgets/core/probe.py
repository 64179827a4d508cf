"""What the construction pass learns about a model, remembered per model.

Every :class:`~xaiwidgets.core.context.Context` needs the layers' output shapes, how
often each module runs, the non-linearities the model calls and the number of classes.
They come from one pass on one image (:meth:`Context.shapes`) and depend only on the
model's structure and the inputs' shape, never on pixel values or weight values. A
new Explainer on a model already probed with inputs of the same shape (each chunk of
``xw.evaluate``, a widget given new images, a one-shot ``xw.explain``) re-uses them and
runs no pass at construction.

The key holds everything the facts depend on: each module's name, identity, type,
settings (``extra_repr``) and hooks, each parameter and buffer's shape and dtype, and
the inputs' shape, dtype and device. Replacing a module, changing its settings,
resizing a tensor or adding a hook changes it, and the model is probed again. Entries
live as long as the model (a weak reference); at most :data:`KEEP` input shapes are
kept per model. A model whose layer shapes depend on pixel values (data-dependent
control flow) should be forgotten (:func:`forget`) before images of another kind.

>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
>>> key = probe_key(net, torch.zeros(1, 3, 5, 5), None)
>>> remember(net, key, Probe({"0": (1, 2, 3, 3)}, Counter(), Counter(), 18, False))
>>> recall(net, key).classes
18
>>> recall(net, probe_key(net, torch.zeros(1, 3, 6, 6), None)) is None  # another size
True
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: input shapes remembered per model (the oldest is dropped first)
KEEP = 8

_LOCK = threading.Lock()
_PROBES: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, Probe]] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class Probe:
    """The facts one pass on one image gives (see :meth:`Context.shapes`)."""

    #: output shape of every module, in the order they finish
    shapes: dict[str, tuple[int, ...]]
    #: how many times each module ran
    calls: Counter[str]
    #: the non-linearities called, by name and count
    nonlinearities: Counter[str]
    #: number of classes (2 for a single-logit binary model)
    classes: int
    #: whether the model returns a single logit
    binary: bool


def probe_key(model: nn.Module, inputs: torch.Tensor, output: Any) -> tuple | None:
    """What the probe's facts depend on, or ``None`` when they cannot be keyed safely: a
    callable ``output`` selector (its identity says nothing about what it picks) or
    lazy modules not initialised yet."""
    if output is not None and not isinstance(output, (int, str)):
        return None
    state = model.state_dict(keep_vars=True)
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in state.values()):
        return None  # lazy modules: their shapes exist only after the first pass
    # a weak reference, not id(): a replaced module's id may be re-used by the new one
    modules = tuple((name, weakref.ref(module), type(module), module.extra_repr(),
                     tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
                    for name, module in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype)
                    for name, t in state.items())
    return (modules, tensors, tuple(inputs.shape[1:]), inputs.dtype, str(inputs.device),
            output)


def _copied(probe: Probe) -> Probe:
    """A copy of ``probe`` that shares nothing mutable with it: its dicts are copied,
    their keys (names) and values (shape tuples, counts) are immutable already (a
    deepcopy walks ~4000 objects of a ResNet50's shapes on every construction)."""
    return Probe(dict(probe.shapes), Counter(probe.calls), Counter(probe.nonlinearities),
                 probe.classes, probe.binary)


def recall(model: nn.Module, key: tuple | None) -> Probe | None:
    """The facts remembered for ``model`` under ``key`` (a copy), or ``None``."""
    if key is None:
        return None
    with _LOCK:
        known = _PROBES.get(model, {}).get(key)
    return None if known is None else _copied(known)


def remember(model: nn.Module, key: tuple | None, probe: Probe) -> None:
    """Keep ``probe`` for ``model`` under ``key`` (nothing when ``key`` is ``None``)."""
    if key is None:
        return
    with _LOCK:
        entries = _PROBES.setdefault(model, OrderedDict())
        entries[key] = _copied(probe)
        entries.move_to_end(key)
        while len(entries) > KEEP:
            entries.popitem(last=False)


def forget(model: nn.Module) -> None:
    """Drop what was remembered for ``model`` (the next Explainer probes it again)."""
    with _LOCK:
        _PROBES.pop(model, None)
