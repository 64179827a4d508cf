"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) through zennit.

zennit (LGPL, imported, never copied) provides the rules and the composite machinery;
this module decides which rule goes on which layer, merges BatchNorms, makes
torchvision's residual sums explicit, starts the backward pass from the target logit
and checks the result (:func:`lrp`):

* everything happens on a :func:`shadow_copy` of the module tree (shared tensors, own
  dictionaries), so the user's model, its parameter objects, hooks and flags are
  never written, under zennit 0.5.1 and 1.0.0 alike, in any thread, also on failure;
* BatchNorms are merged only into the layer whose output they normalise in the
  forward pass (:func:`trace`), and only if the canonized logits equal the plain ones;
  otherwise they stay layers of their own (LRP-ε) and a warning names them;
* operations the rules cannot see (functional residual adds, pooling, gates...) are
  reported by module name (:func:`unseen_operations`), and the relative conservation
  error is recorded in the result's attrs.

>>> import torch, xaiwidgets as xw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
...                             torch.nn.Linear(4, 2))
>>> xw.explain(model, torch.rand(1, 3, 16, 16), "lrp", composite="epsilon").dims
('image', 'y', 'x')

Slider cost: the Explainer keeps one :class:`Canonized` copy per images, with its
forward pass (:func:`canonized`). Any change of composite, ``epsilon``, ``gamma``,
``alpha``/``beta`` or target is then one backward pass on the kept graph, no forward;
each rule replaces its layer's ordinary backward (:class:`_Cut`), and LRP-ε/LRP-0 read
the layer's kept output instead of re-running it. The graph goes with the cache (new
images, weights changed in place, ``clear_cache``). Video clips (N, C, T, H, W) work
the same way: zennit's rules cover Conv3d, BatchNorm3d and 3-D average pooling, and
:class:`VideoBlockCanonizer` makes the video ResNets' residual sums visible.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.video import resnet as _video_resnet
from zennit.canonizers import AttributeCanonizer, Canonizer
from zennit.core import BasicHook, Composite, ParamMod, Stabilizer
from zennit.layer import Sum
from zennit.rules import Epsilon, Flat, Gamma, NoMod, Norm, Pass, ZBox, ZPlus
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, ConvolutionStandard
from zennit.types import Linear as AnyLinear

from ..core.channels import channel_mask
from ..core.ops import LogitHead
from ..core.registry import Method, Param, register
from .attention import refuse_attention

#: torchvision's video ResNet blocks (r3d_18, mc3_18, r2plus1d_18)
_VIDEO_BLOCKS = (_video_resnet.BasicBlock, _video_resnet.Bottleneck)

#: denominator stabiliser of every rule except LRP-ε (zennit's default)
STABILIZER = 1e-6
#: LRP-0 needs *some* stabiliser: z_j = 0 would give 0/0 where R_j = 0
ZERO_STABILIZER = 1e-12
#: relative conservation error above which a warning fires, where the rules must
#: conserve (see :func:`lrp`): float32 LRP-0 without biases conserves to ~1e-5 and the
#: stabilisers (1e-6, ε ≤ 1e-3) absorb well under 1 %; what the rules cannot see
#: (a functional residual add doubles relevance, a functional 2x2 mean divides it by 4)
#: is off by far more
CONSERVATION_TOLERANCE = 0.05
#: the smallest LRP-ε stabiliser the ``epsilon`` parameter accepts
EPSILON_LOW = 1e-9

#: composite -> (first layer rule or None, convolution rule, dense layer rule)
COMPOSITES: dict[str, tuple[str | None, str, str]] = {
    "epsilon_plus_flat": ("flat", "zplus", "epsilon"),
    "epsilon_plus": (None, "zplus", "epsilon"),
    "epsilon_gamma_box": ("zbox", "gamma", "epsilon"),
    "alpha_beta": (None, "alpha_beta", "epsilon"),
    "epsilon": (None, "epsilon", "epsilon"),
    "zero": (None, "zero", "zero"),
}


class AlphaBeta(BasicHook):
    """LRP-αβ: R_i = Σ_j (α (a_i w_ij)⁺ / z_j⁺ − β (a_i w_ij)⁻ / z_j⁻) R_j.

    zennit's own ``AlphaBeta`` insists on α − β = 1; the definition (docs/methods.md)
    allows any α ≥ 1, β ≥ 0
    (conservation then fails on purpose, e.g. α2β1 on the worked example sums to 8).
    Positive bias goes to z⁺, negative bias to z⁻.

    >>> rule = AlphaBeta(alpha=3.0, beta=1.0)
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0,
                 stabilizer: float = STABILIZER) -> None:
        stabilize = Stabilizer.ensure(stabilizer)
        positive = lambda t: t.clamp(min=0)
        negative = lambda t: t.clamp(max=0)

        def weights(keep, with_bias: bool) -> ParamMod:
            # the bias is clamped like the weights: b⁺ joins z⁺, b⁻ joins z⁻, once each
            return ParamMod(lambda param, name: keep(param),
                            zero_params=None if with_bias else ["bias"], require_params=False)

        # four products: a⁺w⁺ and a⁻w⁻ make z⁺, a⁺w⁻ and a⁻w⁺ make z⁻
        super().__init__(
            input_modifiers=[positive, negative, positive, negative],
            param_modifiers=[weights(positive, True), weights(negative, False),
                             weights(negative, True), weights(positive, False)],
            output_modifiers=[lambda z: z] * 4,
            gradient_mapper=lambda grad, z: [grad / stabilize(z[0] + z[1])] * 2
            + [grad / stabilize(z[2] + z[3])] * 2,
            reducer=lambda a, g: alpha * (a[0] * g[0] + a[1] * g[1])
            - beta * (a[2] * g[2] + a[3] * g[3]),
        )
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def copy(self) -> AlphaBeta:
        return AlphaBeta(self.alpha, self.beta, self.stabilizer)


class _ShiftedDenominator:
    """Mixin for zennit rules whose only modification is the division of the output
    gradient by ``z + ε·sign(z)`` (sign 0 → +1): it remembers ε, a float, so the kept
    engine can evaluate that stabiliser with a kept sign in one fused op
    (:meth:`_Slot.relevance`); the numbers are zennit's, bit for bit."""

    epsilon: float

    def copy(self) -> Any:
        copy = super().copy()  # zennit's copy keeps the closures, not our attributes
        copy.epsilon = self.epsilon
        return copy


class EpsilonRule(_ShiftedDenominator, Epsilon):
    """zennit's LRP-ε (``epsilon`` a float) that remembers ε.

    >>> EpsilonRule(0.25).copy().epsilon
    0.25
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon=float(epsilon))
        self.epsilon = float(epsilon)


class NormRule(_ShiftedDenominator, Norm):
    """zennit's ``Norm`` (relevance split in proportion to the summands or pooled
    values; ``stabilizer`` a float) that remembers its stabiliser.

    >>> NormRule(1e-6).copy().epsilon
    1e-06
    """

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        super().__init__(stabilizer=float(stabilizer))
        self.epsilon = float(stabilizer)


class ZPlusRule(ZPlus):
    """zennit's LRP-z⁺ that remembers its stabiliser (a float), for the kept engine's
    path on non-negative inputs (:func:`_nonnegative_layer`).

    >>> ZPlusRule(1e-6).copy().stabilizer
    1e-06
    """

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        super().__init__(stabilizer=float(stabilizer))
        self.stabilizer = float(stabilizer)

    def copy(self) -> ZPlusRule:
        return ZPlusRule(self.stabilizer)


class GammaRule(Gamma):
    """zennit's generalised LRP-γ that remembers γ and its stabiliser (floats), so the
    kept engine can use its linearity in γ (:func:`_nonnegative_layer`).

    >>> GammaRule(0.5).copy().gamma
    0.5
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = STABILIZER) -> None:
        super().__init__(gamma=float(gamma), stabilizer=float(stabilizer))
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def copy(self) -> GammaRule:
        return GammaRule(self.gamma, self.stabilizer)


class LRPWarning(UserWarning):
    """An LRP map that is not what its rules promise (see :func:`lrp`)."""


def rule(kind: str, *, epsilon: float = 1e-6, gamma: float = 0.25, alpha: float = 2.0,
         beta: float = 1.0, low: Any = None, high: Any = None) -> BasicHook:
    """One LRP rule as a zennit hook: ``zero``, ``epsilon``, ``gamma``, ``zplus``
    (= α1β0), ``alpha_beta``, ``flat`` or ``zbox`` (needs ``low``/``high`` input bounds).

    >>> rule("epsilon", epsilon=0.1)  # doctest: +ELLIPSIS
    <xaiwidgets.families.lrp.EpsilonRule object at ...>
    """
    if kind == "zero":
        return EpsilonRule(ZERO_STABILIZER)
    if kind == "epsilon":
        return EpsilonRule(epsilon)
    if kind == "gamma":
        return GammaRule(gamma, STABILIZER)
    if kind == "zplus":
        return ZPlusRule(STABILIZER)
    if kind == "alpha_beta":
        return AlphaBeta(alpha=alpha, beta=beta, stabilizer=STABILIZER)
    if kind == "flat":
        return Flat(stabilizer=STABILIZER)
    if kind == "zbox":
        if low is None or high is None:
            raise ValueError("the z^B (zbox) rule needs the input bounds low and high")
        return ZBox(low=low, high=high, stabilizer=STABILIZER)
    raise ValueError(f"unknown LRP rule {kind!r}")


# ------------------------------------------------------------------ shadow copy
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


# ------------------------------------------------------------------ tracing
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

    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            logits = model(x) if head is None else head(model(x))
    finally:
        for handle in handles:
            handle.remove()
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
        if isinstance(module, _VIDEO_BLOCKS):
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
    residual additions are reported by :func:`unseen_operations`."""
    found = []
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        found += [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
    if any(isinstance(m, _VIDEO_BLOCKS) for m in model.modules()):
        found.append(VideoBlockCanonizer())
    return found


# ------------------------------------------------------------------ composites
class RuleComposite(Composite):
    """Which rule on which module: by layer type, with a given first layer and the
    merged (now identity) BatchNorms left without rule.

    ``applied`` records, after registration, ``{layer type: {rule names}}``.
    """

    def __init__(self, name: str, rules: dict[str, Any], *, first: nn.Module | None = None,
                 merged: frozenset[int] = frozenset(),
                 canonizers: list[Canonizer] | None = None) -> None:
        first_kind, conv, dense = COMPOSITES[name]
        stabilizer = ZERO_STABILIZER if name == "zero" else STABILIZER
        self.kinds = {"first": first_kind, "conv": conv, "dense": dense,
                      "batchnorm": "zero" if name == "zero" else "epsilon"}
        self.rules = rules
        self.base = [(Activation, "pass", Pass()), (Sum, "norm", NormRule(stabilizer)),
                     (AvgPool, "norm", NormRule(stabilizer))]
        self.first, self.merged = first, merged
        self.applied: dict[str, set[str]] = {}
        #: ids of the modules that got a rule (or were merged) in the last registration
        self.ruled: set[int] = set()
        super().__init__(module_map=self.module_map, canonizers=canonizers or [])

    def module_map(self, ctx: dict, name: str, module: nn.Module) -> BasicHook | None:
        kind, hook = self.choose(ctx, module)
        if kind is not None:
            self.applied.setdefault(type(module).__name__, set()).add(kind)
            self.ruled.add(id(module))
        return hook

    def choose(self, ctx: dict, module: nn.Module) -> tuple[str | None, Any]:
        if id(module) in self.merged:
            return "merged", None
        for types, kind, hook in self.base:
            if isinstance(module, types):
                return kind, hook
        if isinstance(module, BatchNorm):
            kind = self.kinds["batchnorm"]
            return kind, rule(kind, **self.rules)
        if not isinstance(module, AnyLinear):
            return None, None
        # the first layer: the one the trace saw first, else the first in module order
        is_first = (module is self.first if self.first is not None
                    else not ctx.get("first_layer_visited", False))
        ctx["first_layer_visited"] = True
        if is_first and self.kinds["first"] is not None:
            kind = self.kinds["first"]
            return f"{kind} (first layer)", rule(kind, **self.rules)
        kind = self.kinds["conv"] if isinstance(module, Convolution) else self.kinds["dense"]
        return kind, rule(kind, **self.rules)

    def summary(self) -> str:
        """``'Conv2d: zplus, flat (first layer); Linear: epsilon; ReLU: pass'``."""
        return "; ".join(f"{layer}: {', '.join(sorted(kinds))}"
                         for layer, kinds in sorted(self.applied.items()))


def make_composite(
    name: str,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    alpha: float = 2.0,
    beta: float = 1.0,
    low: Any = None,
    high: Any = None,
    canonizers: list[Canonizer] | None = None,
    first: nn.Module | None = None,
    merged: frozenset[int] = frozenset(),
) -> RuleComposite:
    """The composite called ``name`` (see :data:`COMPOSITES`) with these parameters.

    Activations pass relevance through, residual sums and average pools split it in
    proportion to their inputs (zennit's ``Norm``), max-pools route it to the maximum.
    A BatchNorm that could not be merged is a layer of its own with LRP-ε (LRP-0 in
    the ``zero`` composite), exact for its affine map.

    >>> make_composite("alpha_beta", alpha=1.0, beta=0.0)  # doctest: +ELLIPSIS
    <xaiwidgets.families.lrp.RuleComposite object at ...>
    """
    if name not in COMPOSITES:
        raise ValueError(f"unknown composite {name!r}; choose one of {list(COMPOSITES)}")
    rules = dict(epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta, low=low, high=high)
    return RuleComposite(name, rules, first=first, merged=merged, canonizers=canonizers)


# ------------------------------------------------------------ unseen operations
#: torch functions (by name) that carry relevance wrongly when called outside a module
#: that has a rule: relevance then crosses them as a plain gradient
UNSEEN = {
    "residual add (relevance is copied to both summands, not split)":
        {"add", "add_", "__add__", "__radd__", "__iadd__",
         "sub", "sub_", "__sub__", "__rsub__", "__isub__"},
    "product of two activations (a gate; relevance goes to both factors)":
        {"mul", "mul_", "__mul__", "__rmul__", "__imul__",
         "div", "div_", "__truediv__", "__itruediv__"},
    "functional average pooling or mean (relevance is divided by the pool size)":
        {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean", "sum"},
    "functional linear map (no LRP rule)":
        {"linear", "conv1d", "conv2d", "conv3d", "matmul", "__matmul__", "mm", "bmm",
         "einsum"},
    "functional normalisation (no LRP rule)":
        {"batch_norm", "layer_norm", "group_norm", "instance_norm", "normalize"},
    "functional non-ReLU activation (relevance is scaled by its derivative)":
        {"silu", "gelu", "sigmoid", "tanh", "softmax", "log_softmax", "hardswish",
         "hardsigmoid", "mish", "elu", "softplus"},
}
_KIND = {fn: kind for kind, names in UNSEEN.items() for fn in names}
_TWO_OPERANDS = {next(iter(UNSEEN)), list(UNSEEN)[1]}


def _flows(value: Any) -> bool:
    """``value`` is a tensor that carries relevance (depends on the input)."""
    return (isinstance(value, torch.Tensor) and value.requires_grad
            and not isinstance(value, nn.Parameter))


class _UnseenMode(TorchFunctionMode):
    """Records torch calls outside rule-bearing modules that would misroute relevance.

    A torch function mode is per thread and active only inside its ``with`` block:
    nothing in ``torch`` is replaced.
    """

    def __init__(self, stack: list[tuple[str, bool]]) -> None:
        super().__init__()
        self.stack, self.found = stack, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KIND.get(getattr(func, "__name__", ""))
        if kind is not None and not (self.stack and self.stack[-1][1]):
            operands = [a for a in (*args, *kwargs.values()) if _flows(a)]
            if len(operands) >= (2 if kind in _TWO_OPERANDS else 1):
                where = self.stack[-1][0] if self.stack else ""
                self.found.setdefault(where, set()).add(kind)
        return func(*args, **kwargs)


@contextlib.contextmanager
def unseen_operations(model: nn.Module, ruled: set[int]) -> Iterator[dict[str, set[str]]]:
    """Inside the block, record ``{module name: {problems}}`` for every operation of a
    forward pass that LRP's rules do not see (see :data:`UNSEEN`).

    ``ruled``: ids of the modules whose output a rule computes (operations inside them
    are the rule's business). The module name is the innermost module whose
    ``forward`` made the call ("" for the model's own forward).
    """
    names = {id(m): name for name, m in model.named_modules()}
    stack: list[tuple[str, bool]] = []
    handles = []

    def enter(module: nn.Module, _args: tuple) -> None:
        stack.append((names.get(id(module), ""), id(module) in ruled))

    def leave(_module: nn.Module, _args: tuple, _output: Any) -> None:
        stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    mode = _UnseenMode(stack)
    try:
        with mode:
            yield mode.found
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ relevance
@contextlib.contextmanager
def attached(model: nn.Module, composite: Composite) -> Iterator[nn.Module]:
    """Canonize ``model`` and register the composite's hooks; revert both on exit.

    Unlike ``composite.context(model)``, the ``finally`` also runs when registration
    itself fails half-way, so what was applied before the failure is reverted too.
    """
    try:
        composite.register(model)
        yield model
    finally:
        composite.remove()


def _backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              composite: Composite, detect: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, set[str]]]:
    """Relevance, logits and (``detect``) unseen operations of one modified pass."""
    x = x.detach().requires_grad_(True)
    found: dict[str, set[str]] = {}
    with attached(model, composite), torch.enable_grad():
        ruled = getattr(composite, "ruled", None)
        with (unseen_operations(model, ruled) if detect and ruled is not None
              else contextlib.nullcontext(found)) as found:
            logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("the model must return logits of shape (N, classes)")
        seed = torch.zeros_like(logits)
        seed.scatter_(1, target[:, None], logits.detach().gather(1, target[:, None]))
        (rel,) = torch.autograd.grad(logits, x, grad_outputs=seed)
    return rel.detach(), logits.detach(), found


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              composite: Composite) -> torch.Tensor:
    """LRP relevance of ``x`` (same shape) for one target class per row, with a given
    composite, computed on a :func:`shadow_copy` (the model is never touched).

    The backward pass starts from the target logit (0 at the other classes), so with
    LRP-0 and no biases the relevance of each image sums to its target logit.

    >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    >>> relevance(net, torch.ones(1, 2), torch.tensor([0]), make_composite("zero")).shape
    torch.Size([1, 2])
    """
    return _backward(shadow_copy(model), x, target, composite)[0]


def logits_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within ``1e-4 · max|logit| + 1e-5`` (float32 reordering of a merge)."""
    return a.shape == b.shape and bool(
        ((a - b).abs() <= 1e-4 * b.abs().max() + 1e-5).all())


@dataclass
class Explanation:
    """Result of :func:`lrp`: relevance and what was done to get it."""

    relevance: torch.Tensor
    #: |Σ R − f_target(x)| / |f_target(x)| per image
    conservation_error: torch.Tensor
    #: rule per layer type, e.g. ``"BatchNorm2d: merged...; Conv2d: zplus"``
    rules: str
    #: ``{module name: {problems}}`` the rules cannot see
    unseen: dict[str, set[str]] = field(default_factory=dict)
    #: BatchNorms kept as layers because merging them changed the logits
    unmerged: list[str] = field(default_factory=list)
    #: whether this configuration must conserve relevance exactly (no bias, ε small)
    conserving: bool = False
    #: ε of the dense layers' rule (0 for LRP-0) and the target logits, to tell an ε
    #: that absorbs the relevance (large against the activations) from a lost one
    epsilon: float = 0.0
    target_logit: torch.Tensor | None = None


# ------------------------------------------------------------------ kept engine
class _Call:
    """What one call of a rule-bearing module left for its rule: the inputs, the
    output (and its version, to notice in-place changes) and, for layers, the
    module's own autograd graph from its input to its output (LRP-ε reads it)."""

    __slots__ = ("args", "kwargs", "x", "z", "version", "own", "terms", "sign", "signs_made",
                 "_nonnegative")

    def __init__(self, args: tuple, kwargs: dict, x: torch.Tensor, output: torch.Tensor,
                 own: bool) -> None:
        self.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self.kwargs = kwargs
        self.x = x if own else None
        self.z = output.detach()
        self.version = output._version
        self.own = output if own else None
        #: the layer evaluations of the last rule that keeps any (:func:`_layer_rule`,
        #: :func:`_nonnegative_layer`); ``None`` after its first backward (see
        #: :meth:`keep_terms`)
        self.terms: dict[tuple, Any] = {}
        #: zennit's sign of ``z`` (0 → +1), kept from the second backward on
        self.sign: torch.Tensor | None = None
        self.signs_made = 0
        self._nonnegative: bool | None = None

    def keep_terms(self, key: tuple, terms: Any) -> None:
        """Offer a rule's layer evaluations that no parameter changes: kept from the
        second offer under the same ``key`` on (a slider moving on a kept forward; a
        one-shot call keeps nothing extra), one rule's at a time."""
        self.terms = {key: terms if key in self.terms else None}

    def nonnegative(self) -> bool:
        """Whether the module's input has no negative value (checked once)."""
        if self._nonnegative is None:
            self._nonnegative = not bool((self.args[0] < 0).any())
        return self._nonnegative

    def shifted(self, epsilon: float) -> torch.Tensor:
        """zennit's stabilised denominator ``z + ε·sign(z)`` (sign 0 → +1), bit for bit
        (see :func:`_stabilised`), as a new tensor."""
        sign = self.sign
        if sign is None:
            sign = _zennit_sign(self.z)
            self.signs_made += 1
            if self.signs_made > 1:  # a slider moving on a kept forward: keep it
                self.sign = sign
        return torch.addcmul(self.z, sign, sign.new_tensor(epsilon))


class _Cut(torch.autograd.Function):
    """Hands a module's output on with the rule as its only backward: the module's
    ordinary backward (which zennit's hooks run and then discard) never runs."""

    @staticmethod
    def forward(ctx: Any, slot: _Slot, call: _Call, x: torch.Tensor,
                out: list[torch.Tensor]) -> torch.Tensor:
        # ``out`` comes in a list: a tensor input returned as-is would be a view that
        # the model may not change in place (DenseNet's functional in-place ReLU)
        ctx.slot, ctx.call = slot, call
        return out[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return None, None, ctx.slot.relevance(ctx.call, grad), None


def _shift(hook: Any) -> float | None:
    """ε of a rule whose only modification is the denominator ``z + ε·sign(z)``: our
    LRP-ε / LRP-0 (:class:`EpsilonRule`) and ``Norm`` (:class:`NormRule`), which
    evaluate the module unmodified (identity input and output modifiers, ``NoMod``
    parameters), so their modified forward is the module's own output and need not be
    redone; ``None`` for any other rule."""
    if type(hook) not in (EpsilonRule, NormRule):
        return None
    params = hook.param_modifiers[0]
    if not isinstance(params, NoMod) or params.zero_params:
        return None
    return hook.epsilon


class _Slot:
    """The rule of one module of a :class:`Canonized` copy, chosen before each backward
    pass (:meth:`Canonized.configure`), so the kept forward graph serves any rule."""

    def __init__(self, module: nn.Module, own: bool) -> None:
        #: ``own``: keep the module's own graph from input to output (layers, sums,
        #: average pools), which the LRP-ε and Norm rules pull the relevance back through
        self.module, self.own = module, own
        self.rule: Any = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else None
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad
                and isinstance(output, torch.Tensor)):
            return None
        call = _Call(args, kwargs, x, output, own=self.own)
        return _Cut.apply(self, call, x, [output.detach()])

    def relevance(self, call: _Call, grad: torch.Tensor) -> torch.Tensor:
        """Relevance of the module's input from its output's (zennit's rule code)."""
        rule = self.rule
        if type(rule) is Pass:  # activations, merged BatchNorms: relevance passes as is
            return grad
        epsilon = _shift(rule)
        if epsilon is not None and call.own is not None and call.z._version == call.version:
            # LRP-ε and Norm: grad / (z + ε·sign z) on the kept output z, then the
            # module's own backward (one transposed layer instead of a forward and two),
            # times the input: zennit's gradient mapper and reducer, with fewer ops
            shifted = call.shifted(epsilon)
            mapped = torch.div(grad, shifted, out=shifted)  # its own buffer: no new one
            if isinstance(self.module, Sum):
                return _summands_times(call, mapped, self.module.dim)
            (gradient,) = torch.autograd.grad(call.own, call.x, mapped, retain_graph=True)
            x = call.args[0]
            if gradient._base is None and gradient.shape == x.shape and gradient.is_contiguous():
                return gradient.mul_(x)  # a fresh tensor of the backward: no new buffer
            return x * gradient
        if (isinstance(rule, BasicHook) and type(rule).backward is BasicHook.backward
                and isinstance(self.module, (nn.Linear, ConvolutionStandard))):
            if type(rule) in (ZPlusRule, AlphaBeta, GammaRule):
                relevance = _nonnegative_layer(rule, self.module, call, grad)
                if relevance is not None:
                    return relevance
            return _layer_rule(rule, self.module, call, grad)
        rule.stored_tensors["input"] = call.args
        rule.stored_tensors["kwargs"] = call.kwargs
        try:
            return rule.backward(self.module, (call.args[0],), (grad,))[0]
        finally:
            rule.stored_tensors.clear()


def _summands_times(call: _Call, mapped: torch.Tensor, dim: int) -> torch.Tensor:
    """The Norm rule's relevance of a zennit ``Sum``: its stacked summands times
    ``mapped`` (a sum's gradient is ``mapped`` for every summand), laid out
    summand-major, so each summand's relevance is a contiguous slice for the stack's
    backward. The kept summands are re-laid summand-major once (same values; the
    stacked original is dropped), so later products read them contiguously too.

    >>> call = _Call((torch.ones(2, 3, 2),), {}, torch.ones(2, 3, 2), torch.ones(2, 3), own=False)
    >>> _summands_times(call, torch.arange(6.).reshape(2, 3), -1)[..., 1]
    tensor([[0., 1., 2.],
            [3., 4., 5.]])
    """
    moved = call.args[0].movedim(dim, 0)
    if not moved.is_contiguous():
        moved = moved.contiguous()
        call.args = (moved.movedim(0, dim), *call.args[1:])
        call.x = None  # only the graph input of the module's own backward, unused for sums
    out = torch.empty(moved.shape, dtype=mapped.dtype, device=mapped.device)
    torch.mul(moved, mapped, out=out)
    return out.movedim(0, dim)


def _nonnegative_layer(rule: BasicHook, module: nn.Module, call: _Call,
                       grad: torch.Tensor) -> torch.Tensor | None:
    """zennit's z⁺ (:class:`ZPlusRule`), our α/β (:class:`AlphaBeta`) and zennit's
    generalised γ (:class:`GammaRule`) on a layer whose input x is non-negative (after
    a ReLU); ``None`` where that does not apply (the caller then runs the rule's own
    terms).

    With x ≥ 0 every x⁻ term of these rules is zero and what is left are two parts
    that no rule parameter changes: P = layer(x; w⁺, b⁺) and N = layer(x; w⁻, b⁻),
    kept (stabilised for z⁺ and α/β) from the rule's second backward on a kept
    forward, like :func:`_layer_rule`'s fixed terms. Then, with m = grad:

    * z⁺: R = x · w⁺ᵀ(m / s(P)); α/β: R = α·x·w⁺ᵀ(m / s(P)) − β·x·w⁻ᵀ(m / s(N)),
      with zennit's stabiliser s; the same operations as the rules' own terms;
    * γ, by linearity: the terms' outputs are z + γP (on z > 0) and z + γN (on
      z < 0), R = x · ((w + γw⁺)ᵀ(m / s(z + γP)) + (w + γw⁻)ᵀ(m / s(z + γN))): same
      numbers as zennit's rule up to float round-off (z + γP is summed in another
      order than layer(x; w + γw⁺)).

    A parameter change then runs no forward convolution: each term is one transposed
    layer. Tested against the rules' own terms.
    """
    x, z = call.args[0], call.z
    epsilon = rule.stabilizer
    if (not isinstance(epsilon, float) or epsilon < 0 or getattr(rule, "gamma", 0.0) < 0
            or z._version != call.version or call.kwargs
            or (isinstance(module, ConvolutionStandard)
                and (module.padding_mode != "zeros" or isinstance(module.padding, str)))
            or not call.nonnegative()):
        return None
    gamma_rule = type(rule) is GammaRule
    key = (_nonnegative_layer, gamma_rule, epsilon)
    kept = call.terms.get(key)
    if kept is None:
        positive, negative, weights = _signed_parts(module, x)
        if gamma_rule:  # z ± ε where z > 0 (z < 0), +∞ elsewhere: there m / (… + γP) is 0
            positive = ((z + epsilon).masked_fill_(~(z > 0), torch.inf), positive)
            negative = ((z - epsilon).masked_fill_(~(z < 0), torch.inf), negative)
        else:
            positive, negative = _stabilised(positive, epsilon), _stabilised(negative, epsilon)
        kept = (positive, negative, weights)
        call.keep_terms(key, kept)
    positive, negative, (w_plus, w_minus) = kept
    if not gamma_rule:
        up = _layer_input_gradient(module, x, w_plus, grad / positive)
        if type(rule) is ZPlusRule:
            return up.mul_(x)
        down = _layer_input_gradient(module, x, w_minus, grad / negative)
        return up.mul_(x).mul_(rule.alpha).sub_(down.mul_(x).mul_(rule.beta))
    weight, relevance = module.weight.detach(), None
    for (shifted, added), w_part in ((positive, w_plus), (negative, w_minus)):
        # where z > 0, z + γP ≥ z > 0 and zennit's stabiliser adds +ε (−ε on z < 0);
        # elsewhere the denominator is +∞ and the mapped gradient 0
        mapped = grad / torch.add(shifted, added, alpha=rule.gamma)
        modified = torch.add(weight, w_part, alpha=rule.gamma)
        pulled = _layer_input_gradient(module, x, modified, mapped)
        relevance = pulled if relevance is None else relevance.add_(pulled)
    return relevance.mul_(x)


def _signed_parts(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                               tuple[torch.Tensor, torch.Tensor]]:
    """``layer(x; w⁺, b⁺)``, ``layer(x; w⁻, b⁻)`` (without autograd) and ``(w⁺, w⁻)``."""
    weight, bias = module.weight.detach(), module.bias
    bias = bias.detach() if bias is not None else None
    sides = ({"min": 0}, {"max": 0})
    weights = tuple(weight.clamp(**side) for side in sides)
    with torch.no_grad():
        positive, negative = (
            _layer_with(module, x, part, bias.clamp(**side) if bias is not None else None)
            for part, side in zip(weights, sides, strict=True))
    return positive, negative, weights


def _zennit_sign(z: torch.Tensor) -> torch.Tensor:
    """The sign zennit's stabiliser uses: ``sign(z)`` with +1 for 0 (its own formula).

    >>> _zennit_sign(torch.tensor([-2.0, 0.0, 3.0]))
    tensor([-1.,  1.,  1.])
    """
    return (z == 0).to(z).add_(z.sign())


def _stabilised(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """zennit's stabiliser ``z + ε·sign(z)``, in place on ``z``; ``ε·sign`` is exact, so
    one fused ``addcmul`` rounds as zennit's two operations do."""
    return z.addcmul_(_zennit_sign(z), z.new_tensor(epsilon))


#: the functional convolution and its input gradient per number of spatial dimensions
_CONVOLUTIONS = {1: (F.conv1d, torch.nn.grad.conv1d_input),
                 2: (F.conv2d, torch.nn.grad.conv2d_input),
                 3: (F.conv3d, torch.nn.grad.conv3d_input)}


def _layer_with(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The linear or convolution layer ``module`` on ``x`` with other weights and bias
    (convolutions with numeric zero padding, see :func:`_nonnegative_layer`)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    convolution, _ = _CONVOLUTIONS[x.ndim - 2]
    return convolution(x, weight, bias, module.stride, module.padding, module.dilation,
                       module.groups)


def _layer_input_gradient(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    """Gradient of the layer with ``weight`` at ``x`` for output gradient ``grad``: one
    transposed layer (``grad @ weight``, or a transposed convolution), no forward."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    _, input_gradient = _CONVOLUTIONS[x.ndim - 2]
    return input_gradient(x.shape, weight, grad, module.stride, module.padding,
                          module.dilation, module.groups)


def _layer_rule(rule: BasicHook, module: nn.Module, call: _Call,
                grad: torch.Tensor) -> torch.Tensor:
    """zennit's ``BasicHook.backward`` for a linear or convolution layer, without the
    work whose result is known (same numbers):

    * a modified input that is all zeros (x⁻ after a ReLU in z⁺, α/β, γ) gives the
      modified layer's bias as output and nothing to the relevance: no evaluation,
      no backward;
    * the unmodified term (identity input and output, ``NoMod`` parameters; γ's
      fifth term, read for the sign of z) is the layer's kept output ``z``;
    * a term whose mapped gradient is all zeros (γ's fifth) gets no backward;
    * z⁺ and α/β terms, which no parameter changes (:data:`_FIXED_TERMS`), are kept
      from the rule's second backward on a kept forward (a slider moving; a one-shot
      call keeps nothing extra) and reused by every later one.
    """
    key = _fixed_terms_key(rule)
    if key is not None and call.terms.get(key) is not None:
        inputs, outputs, state = (list(part) for part in call.terms[key])
    else:
        inputs, outputs, state = _evaluate_terms(rule, module, call, fixed=key is not None)
        if key is not None:
            call.keep_terms(key, (list(inputs), list(outputs), list(state)))
    grad_outputs = rule.gradient_mapper(grad, outputs)
    if isinstance(grad_outputs, torch.Tensor):
        grad_outputs = [grad_outputs]
    gradients = [torch.zeros_like(call.args[0])] * len(inputs)
    pick = []
    for i, kind in enumerate(state):
        if kind == "zero" or not bool(grad_outputs[i].any()):
            continue  # nothing flows back through this term
        if kind == "plain":  # its gradient is needed after all: evaluate it with a graph
            inputs[i] = inputs[i].detach().requires_grad_()
            outputs[i] = _modified_output(module, rule.param_modifiers[i],
                                          rule.output_modifiers[i], inputs[i])
        pick.append(i)
    # kept terms keep their graph for the next backward on this kept forward
    found = torch.autograd.grad([outputs[i] for i in pick], [inputs[i] for i in pick],
                                grad_outputs=[grad_outputs[i] for i in pick],
                                retain_graph=key is not None) if pick else ()
    for i, gradient in zip(pick, found, strict=True):
        gradients[i] = gradient
    return rule.reducer([t.detach() for t in inputs], gradients)


#: rules whose modified layers no rule parameter changes (ε, α, β and the stabiliser act
#: in the gradient mapper or the reducer), so their evaluations are kept per call: a
#: parameter change on a kept forward then costs only the backward of each term
_FIXED_TERMS = (ZPlusRule, AlphaBeta)


def _fixed_terms_key(rule: BasicHook) -> tuple | None:
    """What the modified layers of ``rule`` depend on, or ``None`` (not kept)."""
    if type(rule) not in _FIXED_TERMS:
        return None
    zeroed = tuple(tuple(getattr(mod, "zero_params", None) or ()) for mod in rule.param_modifiers)
    return (type(rule), zeroed)


def _evaluate_terms(rule: BasicHook, module: nn.Module, call: _Call,
                    fixed: bool = False) -> tuple[list, list, list[str]]:
    """Each term's modified input and modified layer output, and how it was made:
    ``"zero"`` (all-zero input: the bias), ``"plain"`` (the kept output, no graph) or
    ``"graph"`` (evaluated with autograd).

    Zero terms are broadcast views (no memory). ``fixed`` rules (:data:`_FIXED_TERMS`,
    whose evaluations are kept) use clamps that work out of place: their input is not
    copied, each input modifier runs once, and a modified input equal to the input
    (x⁺ of a non-negative x) is the input itself, so what is kept is the outputs.
    """
    x = call.args[0] if fixed else call.args[0].clone()  # zennit's modifiers may work in place
    kept = call.z._version == call.version
    made: dict[int, torch.Tensor] = {}
    inputs, outputs, state = [], [], []
    for in_mod, param_mod, out_mod in zip(rule.input_modifiers, rule.param_modifiers,
                                          rule.output_modifiers, strict=True):
        modified_input = made.get(id(in_mod)) if fixed else None
        if modified_input is None:
            modified_input = in_mod(x)
            if fixed and modified_input is not x and torch.equal(modified_input, x):
                modified_input = x
            made[id(in_mod)] = modified_input
        if not bool(modified_input.any()):
            with ParamMod.ensure(param_mod)(module) as modified:
                bias = modified.bias
                # the layer of a zero input: its bias, broadcast
                if bias is None:
                    output = call.z.new_zeros(()).expand_as(call.z)
                else:
                    shape = (-1,) if isinstance(module, nn.Linear) else (
                        -1, *([1] * (call.z.ndim - 2)))
                    output = bias.detach().reshape(shape).expand_as(call.z)
            inputs.append(x.new_zeros(()).expand_as(x))
            outputs.append(out_mod(output))
            state.append("zero")
        elif (kept and modified_input is x and type(param_mod) is NoMod
              and not param_mod.zero_params and out_mod(call.z) is call.z):
            inputs.append(modified_input)
            outputs.append(call.z)
            state.append("plain")
        else:
            inputs.append(modified_input.detach().requires_grad_())
            outputs.append(_modified_output(module, param_mod, out_mod, inputs[-1]))
            state.append("graph")
    return inputs, outputs, state


def _modified_output(module: nn.Module, param_mod: Any, out_mod: Any,
                     modified_input: torch.Tensor) -> torch.Tensor:
    """The layer with modified parameters on ``modified_input``, with autograd."""
    with ParamMod.ensure(param_mod)(module) as modified, torch.enable_grad():
        return out_mod(modified.forward(modified_input))


class Canonized:
    """A canonized :func:`shadow_copy` of a model with one forward pass kept, ready to
    give LRP maps for any composite, parameters and targets by one backward pass.

    Built once per model, weights and images (:meth:`build`); the
    Explainer keeps one per images in its cache (dropped when the weights change or
    on ``clear_cache``), so a slider move (ε, γ, α/β, composite, target) costs one
    backward pass on the kept graph and no forward. Rules are zennit's; each rule-
    bearing module gets a :class:`_Slot` whose rule is set before each backward. One
    thread at a time uses it (:attr:`lock`). The user's model is never touched.

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    >>> kept = Canonized.build(net, torch.ones(1, 2), keep=True)
    >>> a = kept.explain(torch.tensor([0]), "epsilon", {"epsilon": 0.1})
    >>> b = kept.explain(torch.tensor([0]), "epsilon", {"epsilon": 1.0})  # no forward
    >>> bool((a.relevance != b.relevance).any())
    True
    """

    def __init__(self, shadow: nn.Module, slots: dict[int, _Slot], plain: Trace,
                 merged: frozenset[int], unmerged: list[str], unseen: dict[str, set[str]],
                 x: torch.Tensor, logits: torch.Tensor, keep: bool,
                 head: LogitHead | None = None) -> None:
        self.shadow, self.slots, self.plain = shadow, slots, plain
        self.merged, self.unmerged, self.unseen = merged, unmerged, unseen
        self.x, self.logits, self.keep = x, logits, keep
        modules = dict(shadow.named_modules())
        self.first = modules.get(plain.first) if plain.first is not None else None
        self.order = [m for _, m in shadow.named_modules()]
        if head is not None:  # the binary head's layer gets the dense layers' rule
            self.order += [m for m in head.modules() if id(m) in slots]
        self.lock = threading.Lock()
        #: the kept forward's output of every named module (``keep=True``), for CRP
        self.outputs: dict[str, torch.Tensor] = {}
        #: the last relevance at a layer (:meth:`layer_relevance`) and what gave it
        self._at_layer: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, keep: bool = False,
              output: Any = None) -> Canonized:
        """Trace, merge BatchNorms, canonize, attach slots and run the forward pass.

        The canonized logits must equal the plain ones (:func:`logits_close`);
        otherwise the merges that change them are found and left out (those BatchNorms
        become layers with LRP-ε) on a fresh copy; if the logits still differ, a
        ``RuntimeError`` names the canonized blocks. ``keep``: keep the forward graph
        for later backward passes (else :meth:`explain` frees it). ``output``: which
        part of the model's output holds the logits (:class:`~xaiwidgets.core.ops.LogitHead`,
        the Explainer's ``output=``; a single logit ``z`` becomes ``[-z, z]``).
        """
        head = LogitHead(output).to(x.device, x.dtype)
        head_slots = _attach(head, frozenset())  # inert in passes without autograd
        shadow: nn.Module | None = shadow_copy(model)
        plain = trace(shadow, x, head)
        if not bool(torch.isfinite(plain.logits).all()):
            raise ValueError(
                "LRP: the model's logits are NaN or infinite (largest finite "
                f"{torch.finfo(x.dtype).max:.3g}): its activations overflow "
                f"{str(x.dtype).replace('torch.', '')}, as randomly initialised deep "
                "networks' can. Explain a model with trained weights, or compute in "
                "float64 (model.double(): the images follow)")
        merges, unmerged = list(plain.pairs), []
        for _ in range(3):
            shadow = shadow or shadow_copy(model)
            modules = dict(shadow.named_modules())
            for layer, norm in merges:
                merge_batchnorm(modules[layer], modules[norm])
            merged = frozenset(id(modules[norm]) for _, norm in merges)
            for canonizer in block_canonizers(shadow):
                canonizer.apply(shadow)
            slots = {**_attach(shadow, merged), **head_slots}
            outputs = _record_outputs(shadow) if keep else {}
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad(), unseen_operations(shadow, set(slots) | merged) as unseen:
                raw = shadow(leaf)
            with torch.enable_grad():
                logits = head(raw)
            if logits_close(logits.detach(), plain.logits):
                kept = cls(shadow, slots, plain, merged, unmerged, unseen, leaf, logits, keep,
                           head)
                kept.outputs = outputs
                return kept
            shadow = None  # start again from a fresh copy: nothing to undo
            if not merges or _merges_keep_logits(model, x, merges, plain, head):
                blocks = [name for name, m in model.named_modules()
                          if isinstance(m, (BasicBlock, Bottleneck, *_VIDEO_BLOCKS))]
                raise RuntimeError(
                    "LRP's residual-block canonizer changes this model's output (max "
                    f"|Δlogit| {float((logits.detach() - plain.logits).abs().max()):.3g}) in the "
                    f"blocks {blocks[:5]}; their forward differs from torchvision's: use a "
                    "gradient method for this model, or rewrite the sum as a zennit Sum "
                    "module")
            bad = [pair for pair in merges
                   if not _merges_keep_logits(model, x, [pair], plain, head)]
            bad = bad or merges  # each merge alone is fine, all together are not
            unmerged += [norm for _, norm in bad]
            merges = [pair for pair in merges if pair not in bad]
        raise RuntimeError("LRP: the canonized logits differ from the plain ones after "
                           "leaving every BatchNorm unmerged")

    def configure(self, composite: str, rules: dict[str, Any]) -> RuleComposite:
        """Give every slot its rule for ``composite`` with these parameters."""
        chosen = make_composite(composite, **rules, first=self.first, merged=self.merged)
        ctx: dict = {}
        for module in self.order:
            kind, hook = chosen.choose(ctx, module)
            if kind is None:
                continue
            chosen.applied.setdefault(type(module).__name__, set()).add(kind)
            slot = self.slots.get(id(module))
            if slot is not None and hook is not None:  # merged BatchNorms keep Pass
                slot.rule = hook.copy()
        return chosen

    def explain(self, target: torch.Tensor, composite: str,
                rules: dict[str, Any]) -> Explanation:
        """LRP of the kept images for ``target`` (one class per image): one backward pass."""
        with self.lock:
            if self.logits is None:
                raise RuntimeError("this Canonized copy was built with keep=False and "
                                   "already used; build another")
            chosen = self.configure(composite, rules)
            logits = self.logits.detach()
            seed = torch.zeros_like(logits)
            seed.scatter_(1, target[:, None], logits.gather(1, target[:, None]))
            try:
                with torch.enable_grad():
                    (rel,) = torch.autograd.grad(self.logits, self.x, grad_outputs=seed,
                                                 retain_graph=self.keep)
            finally:
                if not self.keep:
                    self.logits = None
        target_logit = logits.gather(1, target[:, None])[:, 0]
        error = (rel.flatten(1).sum(1) - target_logit).abs() / target_logit.abs()
        return Explanation(rel.detach(), error, chosen.summary(), self.unseen, self.unmerged,
                           _conserving(self.shadow, composite, rules, self.unmerged),
                           0.0 if composite == "zero" else float(rules.get("epsilon", 1e-6)),
                           target_logit)

    # ------------------------------------------------- concept relevance (CRP)
    def output(self, layer: str) -> torch.Tensor:
        """The kept forward's output of ``layer`` (a module name of the model; a
        convolution whose BatchNorm is merged gives the normalised output)."""
        out = self.outputs.get(layer)
        if out is None:
            raise ValueError(
                f"layer {layer!r} has no output in LRP's kept forward pass (it did not run, "
                "or this copy keeps no forward); pick a layer from Explainer.layers()")
        return out

    def layer_relevance(self, target: torch.Tensor, composite: str, rules: dict[str, Any],
                        layer: str) -> torch.Tensor:
        """The relevance reaching ``layer``'s output (its shape): one backward pass from
        the target logit down to the layer, kept for the next call with these settings
        (so a channel change in :meth:`conditional` is one backward from the layer down)."""
        with self.lock:
            return self._relevance_at(target, composite, rules, layer)

    def _relevance_at(self, target: torch.Tensor, composite: str, rules: dict[str, Any],
                      layer: str) -> torch.Tensor:
        key = (layer, composite, _rules_key(rules), tuple(target.tolist()))
        if self._at_layer is not None and self._at_layer[0] == key:
            return self._at_layer[1]
        if not self.keep:
            raise RuntimeError("concept relevance needs a Canonized copy built with keep=True")
        self.configure(composite, rules)
        logits = self.logits.detach()
        seed = torch.zeros_like(logits)
        seed.scatter_(1, target[:, None], logits.gather(1, target[:, None]))
        with torch.enable_grad():
            (upper,) = torch.autograd.grad(self.logits, self.output(layer), grad_outputs=seed,
                                           retain_graph=True)
        self._at_layer = (key, upper)
        return upper

    def conditional(self, target: torch.Tensor, composite: str, rules: dict[str, Any],
                    layer: str, mask: torch.Tensor) -> tuple[torch.Tensor, str]:
        """CRP (Achtibat et al. 2023): the relevance at ``layer`` times ``mask`` (0/1 per
        channel, broadcastable), propagated down to the input with the same rules.

        Linear in the masked relevance: the maps of a partition of the channels add up
        to the relevance that crosses the layer (the whole map when every path from the
        input to the output goes through it). Returns the relevance and the rules used.
        """
        with self.lock:
            upper = self._relevance_at(target, composite, rules, layer)
            chosen = self.configure(composite, rules)
            with torch.enable_grad():
                (rel,) = torch.autograd.grad(self.output(layer), self.x,
                                             grad_outputs=upper * mask, retain_graph=True)
        return rel.detach(), chosen.summary()


def _rules_key(rules: dict[str, Any]) -> tuple:
    """Rule parameters as a hashable key (tensors, e.g. z^B's bounds, by their values)."""
    return tuple(sorted(
        (name, (tuple(v.shape), v.detach().cpu().numpy().tobytes()))
        if isinstance(v, torch.Tensor) else (name, v) for name, v in rules.items()))


class _Outputs(dict):
    """A dict that can be weakly referenced (see :func:`_record_outputs`)."""


def _record_outputs(shadow: nn.Module) -> dict[str, torch.Tensor]:
    """Forward hooks on a canonized copy that keep each named module's output (the last
    call's), after its rule's hook: the tensors of the kept graph CRP starts from.

    The hooks reach the dict through a weak reference: a strong one would close a
    cycle through the autograd graph (output -> _Cut's slot -> module -> hook ->
    dict -> output) that Python's collector cannot see, and keep every graph alive."""
    outputs = _Outputs()
    store = weakref.ref(outputs)

    def keeper(name: str):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            kept = store()
            if kept is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                kept[name] = output
        return hook

    for name, module in shadow.named_modules():
        if name:
            module.register_forward_hook(keeper(name))
    return outputs


def _attach(shadow: nn.Module, merged: frozenset[int]) -> dict[int, _Slot]:
    """A :class:`_Slot` (forward hook on the copy) on every module that any composite
    gives a rule: activations, sums, average pools, unmerged BatchNorms, layers; and
    on merged BatchNorms (identities now), whose relevance passes unchanged."""
    probe = make_composite("epsilon", merged=merged)
    slots: dict[int, _Slot] = {}
    for module in shadow.modules():
        if id(module) in slots:
            continue
        kind, _ = probe.choose({}, module)
        if kind is None:
            continue
        slot = _Slot(module, own=isinstance(module, (AnyLinear, BatchNorm, Sum, AvgPool)))
        if id(module) in merged:  # now the identity: relevance passes, no BN backward
            slot.own, slot.rule = False, Pass()
        module.register_forward_hook(slot.hook, with_kwargs=True)
        slots[id(module)] = slot
    return slots


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite: str,
        **rules: Any) -> Explanation:
    """LRP of ``x`` for ``target`` with the named composite, checked and side-effect free.

    1. A :func:`shadow_copy` of the model is traced (:func:`trace`); each BatchNorm is
       merged into the conv/linear layer whose output it normalises (on the copy).
    2. Rules go on the copy; one modified forward/backward pass gives the relevance,
       and operations the rules cannot see are recorded (:func:`unseen_operations`).
    3. The canonized logits must equal the plain ones (see :meth:`Canonized.build`).

    The user's model is only read: nothing is registered, merged or flagged on it.
    :class:`Canonized` keeps the copy and its forward pass for later calls.

    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> lrp(net, torch.rand(1, 3, 8, 8), torch.tensor([1]), "epsilon").rules
    'AdaptiveAvgPool2d: norm; BatchNorm2d: merged; Conv2d: epsilon; ReLU: pass'
    """
    result = Canonized.build(model, x).explain(target, composite, rules)
    _warn(result)
    return result


def _merges_keep_logits(model: nn.Module, x: torch.Tensor, pairs: list[tuple[str, str]],
                        plain: Trace, head: LogitHead) -> bool:
    """Whether these (layer, BatchNorm) merges alone (no other canonizer) keep the logits."""
    shadow = shadow_copy(model)
    modules = dict(shadow.named_modules())
    for layer, norm in pairs:
        merge_batchnorm(modules[layer], modules[norm])
    with torch.no_grad():
        return logits_close(head(shadow(x)), plain.logits)


def _conserving(shadow: nn.Module, composite: str, rules: dict[str, Any],
                unmerged: list[str]) -> bool:
    """Whether the rules must conserve relevance here: no bias absorbs any (no bias
    in a rule-bearing layer, no BatchNorm as a layer), ε ≤ 1e-3, and no α/β rule."""
    if unmerged or any(isinstance(m, BatchNorm) and m.eps != 0 for m in shadow.modules()):
        return False
    if any(isinstance(m, AnyLinear) and m.bias is not None and bool(m.bias.any())
           for m in shadow.modules()):
        return False
    if composite == "alpha_beta":
        return False  # a neuron without negative parts passes on α times its relevance
    return composite == "zero" or rules.get("epsilon", 1e-6) <= 1e-3


def describe_unseen(unseen: dict[str, set[str]], most: int = 4) -> str:
    """``"residual add (...) in 'block1', 'block2'; ..."`` ("" when nothing was found).

    >>> describe_unseen({"b1": {"residual add"}, "": {"residual add", "mean"}})
    "mean in (the model's forward); residual add in (the model's forward), 'b1'"
    """
    where: dict[str, list[str]] = {}
    for name, kinds in sorted(unseen.items()):
        for kind in kinds:
            where.setdefault(kind, []).append(repr(name) if name else "(the model's forward)")
    parts = []
    for kind, names in sorted(where.items()):
        more = f" and {len(names) - most} more" if len(names) > most else ""
        parts.append(f"{kind} in {', '.join(names[:most])}{more}")
    return "; ".join(parts)


def _warn(result: Explanation) -> None:
    if result.unseen:
        warnings.warn(
            "LRP's rules cannot see these operations of the model's forward, so relevance "
            "crosses them as a plain gradient and the map is not conservative: "
            f"{describe_unseen(result.unseen)}. Make them modules (a zennit.layer.Sum for "
            "sums, nn.AdaptiveAvgPool2d for pooling) or prefer a gradient method.",
            LRPWarning, stacklevel=4)
    if result.unmerged:
        warnings.warn(
            f"LRP: merging the BatchNorms {result.unmerged} into the layer before them "
            "changed the model's logits; they are kept as layers of their own (LRP-ε)",
            LRPWarning, stacklevel=4)
    worst = float(result.conservation_error.max())
    scale = (float(result.target_logit.abs().min()) if result.target_logit is not None
             else float("inf"))
    if result.conserving and worst > CONSERVATION_TOLERANCE and result.epsilon > 0.01 * scale:
        # ε of the top (dense) layer compared with its output z, the target logit
        trained = ("a model with trained weights (randomly initialised networks can have "
                   "vanishing activations)")
        fix = (f"a smaller epsilon (below {scale * 1e-3:.1g}, ≪ |z|) or {trained}"
               if scale * 1e-3 >= EPSILON_LOW else
               f"{trained}; epsilon cannot go below {EPSILON_LOW:g}, too large here")
        warnings.warn(
            f"LRP: relevance misses the target logit by {worst:.1%} because ε = "
            f"{result.epsilon:.3g} is large against this model's activations: the target "
            f"logit is only {scale:.3g} (|z| < 100 ε), so the stabiliser absorbs the "
            f"relevance, as LRP-ε does, and the map says little. Fix: {fix}",
            LRPWarning, stacklevel=4)
    elif result.conserving and worst > CONSERVATION_TOLERANCE:
        warnings.warn(
            f"LRP: relevance misses the target logit by {worst:.1%} although this model "
            "and composite conserve it (no bias, small ε): an operation outside the "
            "rules' view changes it", LRPWarning, stacklevel=4)
def input_bounds(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest possible model inputs, for the z^B rule.

    With a ``preprocess``: the preprocessed black and white images (elementwise min and
    max of the two, in case preprocessing flips signs). Without: each image's own
    minimum and maximum, shape (N, 1, 1, 1), or (N, 1, 1, 1, 1) for clips.
    """
    if ctx.preprocess is not None:
        black = ctx.preprocess(torch.zeros_like(ctx.images[:1]))
        white = ctx.preprocess(torch.ones_like(ctx.images[:1]))
        return torch.minimum(black, white), torch.maximum(black, white)
    flat = ctx.inputs.detach().flatten(1)
    shape = (-1,) + (1,) * (ctx.inputs.ndim - 1)
    return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)


@register
class LRP(Method):
    """Layer-wise relevance propagation with a named composite of rules (docs/methods.md, LRP).

    Composites: ``epsilon_plus_flat`` (default: flat first layer, α1β0 on conv, ε on
    dense), ``epsilon_plus``, ``epsilon_gamma_box`` (z^B first, γ conv, ε dense),
    ``alpha_beta`` (α/β on conv, ε on dense), ``epsilon``, ``zero`` (LRP-0).
    α and β default to 2 and 1; give one and the other follows α = β + 1.
    Activations pass relevance, sums and average pools split it in proportion,
    BatchNorms are merged into their layer (or, where that would change the logits,
    are layers with LRP-ε).

    Result attrs: ``conservation_error`` (per image, |Σ R − f_t(x)| / |f_t(x)|; biases
    and ε absorb some, so it is a warning only where the configuration must conserve:
    no bias, no BatchNorm as a layer, ε ≤ 1e-3, no α/β rule; threshold
    :data:`CONSERVATION_TOLERANCE`), ``lrp_rules`` (rule per layer type) and
    ``lrp_unseen`` (operations outside the rules' view, also raised as an
    :class:`LRPWarning`).
    """

    name = "lrp"
    target_from_pass = True  # the trace pass gives the predictions
    family = "lrp"
    default_reduce = "sum"
    signed = True
    params = (
        Param("composite", "epsilon_plus_flat", kind="choice", choices=tuple(COMPOSITES),
              doc="which rule on which layer"),
        Param("epsilon", 1e-6, low=EPSILON_LOW, high=10.0, log=True,
              doc="LRP-ε stabiliser: larger = fewer, smoother relevances"),
        Param("gamma", 0.25, low=0.0, high=10.0, step=0.05,
              doc="LRP-γ: extra weight on positive contributions (epsilon_gamma_box)"),
        Param("alpha", None, low=1.0, high=10.0, step=0.5, optional=True,
              doc="LRP-αβ weight of positive parts (default 2, or beta + 1)"),
        Param("beta", None, low=0.0, high=9.0, step=0.5, optional=True,
              doc="LRP-αβ weight of negative parts (default 1, or alpha - 1)"),
    )

    def check(self, ctx, layer, params) -> None:
        """Refused on self-attention models (``families/attention.py`` says why)."""
        refuse_attention(ctx.model, self.name)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        alpha, beta = params["alpha"], params["beta"]
        if alpha is None and beta is None:
            alpha, beta = 2.0, 1.0
        elif alpha is None:
            alpha = beta + 1.0
        elif beta is None:
            beta = alpha - 1.0  # alpha >= 1 is checked by its Param
        return {**params, "alpha": float(alpha), "beta": float(beta)}

    def prepare(self, ctx, target, composite, epsilon, gamma, alpha, beta
                ) -> tuple[Canonized, torch.Tensor, dict[str, Any]]:
        """The kept canonized copy, the targets (checked, or predicted by its pass)
        and the rules' parameters."""
        low, high = input_bounds(ctx) if composite == "epsilon_gamma_box" else (None, None)
        kept = canonized(ctx)
        ctx.keep_logits(kept.plain.logits)
        target = ctx.pass_target(kept.plain.logits, target)
        return kept, target, dict(epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta,
                                  low=low, high=high)

    def channel_terms(self, ctx, target, layer, composite, **rules) -> torch.Tensor:
        """R_k: the relevance reaching each channel of ``layer``, (N, C) (CRP)."""
        kept, target, rules = self.prepare(ctx, target, composite, **rules)
        upper = kept.layer_relevance(target, composite, rules, layer)
        if upper.ndim < 3:
            raise ValueError(f"layer {layer!r} outputs shape {tuple(upper.shape)}: no channels")
        return upper.flatten(2).sum(dim=2)

    def conditional(self, ctx, target, layer, channels, composite, **rules) -> torch.Tensor:
        """CRP: the relevance at ``layer`` kept on ``channels`` only, propagated down
        with the same rules (:meth:`Canonized.conditional`); one backward pass from the
        layer down once the relevance at the layer is known."""
        kept, target, rules = self.prepare(ctx, target, composite, **rules)
        out = kept.output(layer)
        mask = channel_mask(channels, out.shape[1], out)
        relevance, used = kept.conditional(target, composite, rules, layer, mask)
        ctx.record("lrp_rules", used)
        return relevance

    def attribute(self, ctx, target, layer, composite, epsilon, gamma, alpha,
                  beta) -> torch.Tensor:
        kept, target, rules = self.prepare(ctx, target, composite, epsilon, gamma, alpha, beta)
        result = kept.explain(target, composite, rules)
        _warn(result)
        ctx.record("conservation_error", result.conservation_error.tolist())
        ctx.record("lrp_rules", result.rules)
        ctx.record("lrp_unseen", describe_unseen(result.unseen))
        return result.relevance


def canonized(ctx: Any) -> Canonized:
    """The context's :class:`Canonized` copy of its model on its inputs, built on first
    use and kept in its cache (so dropped with it: new weights, ``clear_cache``).

    At most one kept forward graph per context: its images are fixed, any composite,
    parameter or target is one backward pass on it.
    """
    cache = ctx.valid_cache()
    kept = cache.get("lrp")
    if kept is None:
        # two threads asking at once build one copy (dict.setdefault is atomic)
        with cache.setdefault("lrp_building", threading.Lock()):
            kept = cache.get("lrp")
            if kept is None:
                kept = cache["lrp"] = Canonized.build(ctx.model, ctx.inputs, keep=True,
                                                      output=ctx.output)
    return kept
