"""Canonizing a model for LRP, always on a copy: the shadow copy of the module tree,
BatchNorm merges found by tracing one forward pass, zennit's residual-block
canonizers (and ours for torchvision's video ResNets), and the check that a merge
keeps the logits.

zennit versions differ here: 1.0's canonizers set attributes with
``object.__setattr__`` and its BatchNorm merge zeroes ``eps`` itself, 0.5.1's does
not. So the merge is our own (:func:`merge_batchnorm`, the same under both) and
everything happens on a :func:`shadow_copy`, never on the user's model.

>>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
>>> trace(shadow_copy(net), torch.rand(1, 3, 8, 8)).pairs
[('0', '1')]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.video import resnet as _video_resnet
from zennit.canonizers import AttributeCanonizer, Canonizer
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm

from ...core.ops import LogitHead
from ...core.scoped import Scope

#: torchvision's video ResNet blocks (r3d_18, mc3_18, r2plus1d_18)
VIDEO_BLOCKS = (_video_resnet.BasicBlock, _video_resnet.Bottleneck)


def shadow_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer tensor.

    Each module is copied shallowly with its own ``_parameters``, ``_buffers``,
    ``_modules`` and hook dictionaries, so canonizers and rule hooks can replace
    entries, patch ``forward`` or flip flags on the copy while the user's model, its
    parameter objects and its hooks stay exactly as they are (also under zennit 1.0,
    whose canonizers set attributes with ``object.__setattr__``, and in other threads).
    Costs no tensor memory; modules used twice stay shared.

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> copy_ = shadow_copy(net)
    >>> copy_[0] is net[0], copy_[0].weight is net[0].weight
    (False, True)
    """
    memo: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = copy.copy(module)
        memo[id(module)] = new
        state = vars(new)
        for key, value in list(state.items()):
            if isinstance(value, (dict, set)):
                state[key] = copy.copy(value)
        for key, child in module._modules.items():
            new._modules[key] = None if child is None else copy_module(child)
        new.training = False  # eval mode and no in-place ops, on the copy only
        if getattr(new, "inplace", None) is True:
            new.inplace = False
        return new

    return copy_module(model)


LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Trace:
    """What one plain forward pass of the (shadow) model showed, by module name.

    ``pairs``: (linear layer, BatchNorm) where the BatchNorm normalises exactly that
    layer's output and nothing else reads it; ``first``: the first conv/linear layer
    applied; ``logits``: the model's output.
    """

    pairs: list[tuple[str, str]]
    first: str | None
    logits: torch.Tensor


def trace(model: nn.Module, x: torch.Tensor, head: LogitHead | None = None) -> Trace:
    """Run ``model`` once (no autograd) and pair each BatchNorm with the layer it follows.

    Pairs come from tensor identity in the forward pass, not from declaration order:
    a BatchNorm is paired with a conv/linear layer only when its input *is* that
    layer's output, both run once, and no other module reads that output. Run it on a
    :func:`shadow_copy`: the hooks go on the modules passed in. ``head`` turns the
    model's output into logits (output selection, binary models).
    """
    calls: list[tuple[nn.Module, tuple, Any]] = []
    leaves = [m for m in model.modules() if not m._modules]

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        calls.append((module, args, output))

    with Scope() as scope, torch.no_grad():
        for module in leaves:
            scope.handle(module.register_forward_hook(record))
        logits = model(x) if head is None else head(model(x))
    count: dict[int, int] = {}
    readers: dict[int, int] = {}  # id(tensor) -> number of module calls reading it
    owner: dict[int, nn.Module] = {}  # id(output tensor) -> the conv/linear layer
    first = None
    for module, args, output in calls:
        count[id(module)] = count.get(id(module), 0) + 1
        for arg in args:
            if isinstance(arg, torch.Tensor):
                readers[id(arg)] = readers.get(id(arg), 0) + 1
        if isinstance(module, LINEAR_TYPES) and isinstance(output, torch.Tensor):
            owner[id(output)] = module
            first = first or module
    names = {id(m): name for name, m in model.named_modules()}
    pairs = []
    for module, args, _ in calls:
        if not isinstance(module, BatchNorm) or not args or not isinstance(args[0], torch.Tensor):
            continue
        layer = owner.get(id(args[0]))
        if (layer is not None and count[id(layer)] == 1 and count[id(module)] == 1
                and readers[id(args[0])] == 1 and _mergeable(layer, module, args[0])):
            pairs.append((names[id(layer)], names[id(module)]))
    return Trace(pairs, None if first is None else names[id(first)], logits)


def _mergeable(layer: nn.Module, norm: nn.Module, between: torch.Tensor) -> bool:
    """The BatchNorm uses running statistics and normalises the layer's output channels."""
    if norm.running_mean is None or norm.running_var is None:
        return False  # no running statistics: batch statistics even in eval mode
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if isinstance(layer, nn.Linear) and between.ndim != 2:
        return False  # BatchNorm1d normalises dim 1, the linear layer's features are last
    return channels == norm.num_features


def merge_batchnorm(layer: nn.Module, norm: nn.Module) -> None:
    """Fold ``norm`` into ``layer`` (both modules of a :func:`shadow_copy`).

    ``layer`` gets new weight and bias tensors ``w · s`` and ``(b − μ) · s + β`` with
    ``s = γ / sqrt(σ² + eps)``; ``norm`` becomes the exact identity (mean 0, variance 1,
    weight 1, bias 0 and eps 0). Only the copy's parameter dictionaries change.
    """
    with torch.no_grad():
        mean, var = norm.running_mean, norm.running_var
        scale = torch.rsqrt(var + norm.eps)
        shift = -mean * scale
        if norm.weight is not None:
            scale = scale * norm.weight
            shift = shift * norm.weight + norm.bias
        weight = layer.weight * scale.reshape(-1, *([1] * (layer.weight.ndim - 1)))
        bias = shift if layer.bias is None else layer.bias * scale + shift
    layer._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    layer._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    if norm.weight is not None:
        norm._parameters["weight"] = nn.Parameter(torch.ones_like(norm.weight), False)
        norm._parameters["bias"] = nn.Parameter(torch.zeros_like(norm.bias), False)
    norm._buffers["running_mean"] = torch.zeros_like(mean)
    norm._buffers["running_var"] = torch.ones_like(var)
    norm.eps = 0.0


class VideoBlockCanonizer(AttributeCanonizer):
    """Makes the residual sum of torchvision's video ResNet blocks (r3d_18, mc3_18,
    r2plus1d_18: ``conv1``, ``conv2`` [, ``conv3``] sequences, ``out += residual``) an
    explicit zennit ``Sum``, like zennit's canonizers do for the image ResNets.

    >>> from torchvision.models.video import r3d_18
    >>> copy_ = shadow_copy(r3d_18())
    >>> len(VideoBlockCanonizer().apply(copy_))
    8
    """

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, VIDEO_BLOCKS):
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if hasattr(self, "conv3"):
            out = self.conv3(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.canonizer_sum(torch.stack([residual, out], dim=-1)))

    def copy(self) -> VideoBlockCanonizer:
        return VideoBlockCanonizer()


def block_canonizers(model: nn.Module) -> list[Canonizer]:
    """zennit's canonizers that make torchvision ResNet residual sums explicit ``Sum``
    modules (the Norm rule then splits relevance in proportion), if the model has such
    blocks, and :class:`VideoBlockCanonizer` for the video ResNets' blocks. Other
    residual additions are reported by ``unseen.unseen_operations``."""
    found = []
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        found += [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
    if any(isinstance(m, VIDEO_BLOCKS) for m in model.modules()):
        found.append(VideoBlockCanonizer())
    return found


def logits_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within ``1e-4 · max|logit| + 1e-5`` (float32 reordering of a merge)."""
    return a.shape == b.shape and bool(
        ((a - b).abs() <= 1e-4 * b.abs().max() + 1e-5).all())


def merges_keep_logits(model: nn.Module, x: torch.Tensor, pairs: list[tuple[str, str]],
                        plain: Trace, head: LogitHead) -> bool:
    """Whether these (layer, BatchNorm) merges alone (no other canonizer) keep the logits."""
    shadow = shadow_copy(model)
    modules = dict(shadow.named_modules())
    for layer, norm in pairs:
        merge_batchnorm(modules[layer], modules[norm])
    with torch.no_grad():
        return logits_close(head(shadow(x)), plain.logits)
