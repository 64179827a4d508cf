"""Layer discovery: which named modules make sense as ``layer=...`` and the defaults.

Rules (documented for users, used by :meth:`Explainer.layers`):

* candidate layers are convolutions, and the *block outputs*: residual blocks
  (torchvision ``BasicBlock``/``Bottleneck``, timm-style blocks, anything whose
  class name ends in ``Block``/``Block2d``/``Bottleneck``/``MBConv``/``InvertedResidual``;
  transformer blocks count once their tokens read as a feature map, see
  :mod:`xaiwidgets.core.tokens`),
  Inception modules, dense-net transitions, SqueezeNet ``Fire`` modules and, for
  plain conv stacks, the activation (ReLU-like) module that follows each convolution;
* layers are chosen by the *shapes* of one forward pass (:func:`output_shapes`):
  the default layer for CAM/FEM is the last convolution, activation or block (layers
  inside a block count through the block's output) whose output still has spatial
  extent (at least 2×2 for the given input), i.e. the last convolutional feature map
  before global pooling, whatever the modules are
  called (a 1×1 conv after the pooling, as in timm's MobileNetV3, is never chosen);
* the FEM stack of MLFEM uses the outermost block outputs that run in the forward
  pass (an Inception auxiliary head does not), else every conv block's output (the
  activation after each conv).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .ops import close_matches
from .scoped import Scope

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.PReLU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
#: modules whose output is an affine map of their input: before any activation, signed,
#: and often changed in place by the activation after them (``ReLU(inplace=True)``)
AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
          nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


#: class-name endings of block modules (torchvision, timm): residual, MBConv, dense, ...
_BLOCK_SUFFIXES = ("Block", "Block3D", "Block2d", "Bottleneck", "MBConv", "InvertedResidual",
                   "Transition", "Fire")
#: class-name starts of Inception modules (InceptionA..E, torchvision's GoogLeNet
#: ``Inception``); whole models (``Inception3``, ``InceptionV3``) are never named
_BLOCK_PREFIXES = ("Inception",)
_NOT_BLOCKS = ("InceptionAux", "Inception3", "InceptionV3", "InceptionV4")


def ends_with_activation(model: nn.Module, order: list[str], layer: str) -> bool:
    """Whether ``layer``'s output is an activation module's (the layer itself, or the
    last of its submodules to finish in ``order``, the modules in finishing order).

    >>> m = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.GELU()), nn.Conv2d(1, 1, 1))
    >>> order = ["0.0", "0.1", "0", "1"]
    >>> ends_with_activation(m, order, "0"), ends_with_activation(m, order, "1")
    (True, False)
    """
    inside = [name for name in order if name.startswith(layer + ".")] if layer in order else []
    return isinstance(resolve_layer(model, inside[-1] if inside else layer), _ACTIVATIONS)


def is_residual_block(module: nn.Module) -> bool:
    """True for block modules whose output is a stage of the network (by class name,
    which covers torchvision and timm): residual, MBConv, Inception, dense, Fire.

    >>> is_residual_block(nn.Conv2d(1, 1, 1))
    False
    """
    name = type(module).__name__
    if name in _NOT_BLOCKS:
        return False
    return name.endswith(_BLOCK_SUFFIXES) or name.startswith(_BLOCK_PREFIXES)


def _ordered_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (its ``_orig_mod``), else ``model``.

    Explanations hook layers and change ReLU rules, which compiled graphs would
    bypass; the wrapper shares its weights with ``_orig_mod``, so explaining the
    original module explains the same function, and layer names carry no
    ``_orig_mod.`` prefix.

    >>> unwrap(nn.Linear(1, 1))
    Linear(in_features=1, out_features=1, bias=True)
    """
    inner = getattr(model, "_orig_mod", None)
    return unwrap(inner) if isinstance(inner, nn.Module) else model


def output_shapes(model: nn.Module, run: Callable[[], Any],
                  calls: Counter[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Output shape of every named module during ``run()``, in the order they finish.

    A module called several times keeps the shape and position of its last call;
    modules that do not run are absent; non-tensor outputs are skipped. ``calls``,
    if given, receives how many times each of those modules ran.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> output_shapes(net, lambda: net(torch.zeros(1, 1, 5, 5)))
    {'0': (1, 2, 3, 3), '1': (1, 2, 3, 3)}
    """
    shapes: dict[str, tuple[int, ...]] = {}
    owner = threading.get_ident()

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            # another thread's pass on the same model must not reorder or add shapes
            if isinstance(output, torch.Tensor) and threading.get_ident() == owner:
                shapes.pop(name, None)
                shapes[name] = tuple(output.shape)
                if calls is not None:
                    calls[name] += 1
        return hook

    with Scope() as scope:
        for n, m in _ordered_named_modules(model):
            scope.handle(m.register_forward_hook(make_hook(n)))
        run()
    return shapes


def _spatial(shape: tuple[int, ...], least: int = 2) -> bool:
    # (N, C, h, w), or (N, C, t, h, w) for a 3D CNN on video clips
    return len(shape) in (4, 5) and shape[-2] >= least and shape[-1] >= least


def block_outputs(model: nn.Module, shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Names of the modules whose outputs are 'blocks', shallowest first.

    Block modules (see :func:`is_residual_block`) when the model has any (nested
    blocks are skipped: only the outermost counts), else the activation after each
    convolution (plain nets). With ``shapes`` (:func:`output_shapes`), only modules
    that ran and returned a feature map (N, C, h, w) count.
    """
    named = _ordered_named_modules(model)
    if shapes is not None:
        named = [(n, m) for n, m in named if len(shapes.get(n, ())) in (4, 5)]
    blocks: list[str] = []
    for name, module in named:
        if is_residual_block(module) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if blocks:
        return blocks
    activations = conv_activations(model)
    if shapes is not None:
        activations = [n for n in activations if len(shapes.get(n, ())) in (4, 5)]
    return activations


def conv_activations(model: nn.Module) -> list[str]:
    """For plain conv stacks: the first activation module after each convolution."""
    named = _ordered_named_modules(model)
    out: list[str] = []
    pending = False
    for name, module in named:
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            pending = True
        elif pending and isinstance(module, _ACTIVATIONS):
            out.append(name)
            pending = False
    return out


def candidate_layers(model: nn.Module,
                     shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Every layer usable as ``layer=`` in forward (definition) order:
    convolutions and block outputs (and the default layer)."""
    blocks = set(block_outputs(model, shapes))
    try:
        blocks.add(default_layer(model, shapes))
    except ValueError:  # no usable default on these inputs: the others still are
        pass
    named = _ordered_named_modules(model)
    # a block's output comes after everything inside it: sort by its last descendant
    last_position = {}
    for position, (name, _) in enumerate(named):
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            last_position[".".join(parts[:depth])] = position
    chosen = [name for name, module in named
              if isinstance(module, (nn.Conv2d, nn.Conv3d)) or name in blocks]
    return sorted(chosen, key=lambda name: (last_position[name], -name.count(".")))


def default_layer(model: nn.Module, shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """The last convolutional feature map (Grad-CAM and FEM default).

    With ``shapes`` (:func:`output_shapes` of a pass on the actual input size): the
    last convolution, activation or block, in execution order, whose output is at
    least 2×2. Without: by names, the last block output, unless a convolution follows
    it (the 1×1 head convolution of MobileNet/EfficientNet): then the activation
    after that convolution.
    """
    if shapes is not None:
        return _default_by_shape(model, shapes)
    named = _ordered_named_modules(model)
    position = {name: i for i, (name, _) in enumerate(named)}
    blocks = block_outputs(model)
    activations = conv_activations(model)
    if blocks and activations and position[activations[-1]] > position[blocks[-1]]:
        # a head conv after the last block; its activation is the deepest feature map
        last_block_end = max(i for i, (n, _) in enumerate(named)
                             if n == blocks[-1] or n.startswith(blocks[-1] + "."))
        if position[activations[-1]] > last_block_end:
            return activations[-1]
    if blocks:
        return blocks[-1]
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            "the model has no convolutional layer; layer-based methods (gradcam, fem...) "
            "need a CNN. Pass layer=<module name> explicitly if your model is unusual."
        )
    return convs[-1]


def _default_by_shape(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str:
    modules = dict(_ordered_named_modules(model))
    blocks = set(block_outputs(model, shapes))
    # layers inside a block are represented by the block's output (a conv half-way
    # through an Inception module is no feature map of the network)
    chosen = [name for name, shape in shapes.items() if _spatial(shape) and (
        name in blocks or isinstance(modules.get(name), (nn.Conv2d, nn.Conv3d, *_ACTIVATIONS))
        and not any(name.startswith(b + ".") for b in blocks))]
    if chosen:
        return chosen[-1]
    if not any(isinstance(m, nn.Conv2d) for m in modules.values()):
        return default_layer(model)  # raises: no convolutional layer
    smallest = min((s[-2:] for s in shapes.values() if len(s) == 4), default=None)
    raise ValueError(
        "no convolutional layer keeps a spatial output of at least 2×2 on these inputs "
        f"(the deepest feature maps are {smallest}); pass larger images, or a layer "
        "explicitly with layer=<name> (Explainer.layers() lists them)"
    )


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The module called ``layer``; an unknown name gets a list of close matches."""
    if isinstance(layer, str) and layer.startswith("_orig_mod.") and model is unwrap(model):
        layer = layer[len("_orig_mod."):]  # a torch.compile name of the unwrapped model
    if isinstance(layer, str) and layer:
        # a walk down the dotted path: MLFEM resolves 16 names on every slider change,
        # and listing all named modules each time cost milliseconds
        try:
            return model.get_submodule(layer)
        except AttributeError:
            pass
    modules = dict(model.named_modules())
    options = candidate_layers(model)
    close = close_matches(str(layer), options) or close_matches(str(layer), list(modules))
    raise ValueError(
        f"unknown layer {layer!r}. Close matches: {close or 'none'}. "
        f"Explainer.layers() lists the usable layers (e.g. {options[-3:]})."
    )
