"""The kept LRP engine, the only one: a canonized copy of the model with one forward
pass kept (:class:`Canonized`), ready for any composite, parameters and targets by one
backward pass each.

Every rule-bearing module of the copy hands its output on through :class:`_Cut`,
whose backward is the module's rule (:class:`_Slot`, chosen before each backward
pass), so the kept forward graph serves any rule. ``keep=False`` gives a one-shot
copy that frees its graph after one backward pass.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.core import BasicHook
from zennit.layer import Sum
from zennit.rules import NoMod, Pass
from zennit.types import AvgPool, BatchNorm
from zennit.types import Linear as AnyLinear

from ...core.ops import LogitHead, select_logits
from .canonize import (
    VIDEO_BLOCKS,
    Trace,
    block_canonizers,
    logits_close,
    merge_batchnorm,
    merges_keep_logits,
    shadow_copy,
    trace,
)
from .composites import RuleComposite, make_composite
from .fast_terms import (
    Call,
    flat_layer,
    is_convolution,
    layer_rule,
    nonnegative_layer,
    summands_times,
)
from .rules import AlphaBeta, EpsilonRule, FlatRule, GammaRule, NormRule, ZPlusRule
from .unseen import unseen_operations


@dataclass
class Explanation:
    """Result of :func:`~xaiwidgets.families.lrp.lrp`: relevance and what was done to get it."""

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
    #: activations whose output is not 0 at 0 (Sigmoid: 0.5), which act as biases, in
    #: a model that would otherwise conserve relevance (else empty)
    offset_activations: list[str] = field(default_factory=list)


#: activations with f(0) ≠ 0: like a bias, they put out a value that no input caused
OFFSET_ACTIVATIONS = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)


def offset_activations(model: nn.Module) -> list[str]:
    """Names of ``model``'s activation modules whose output at 0 is not 0.

    >>> offset_activations(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sigmoid(), nn.ReLU()))
    ['1']
    """
    return [name for name, m in model.named_modules() if isinstance(m, OFFSET_ACTIVATIONS)]


class _Cut(torch.autograd.Function):
    """Hands a module's output on with the rule as its only backward: the module's
    ordinary backward (which zennit's hooks run and then discard) never runs."""

    @staticmethod
    def forward(ctx: Any, slot: _Slot, call: Call, x: torch.Tensor,
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
        #: a linear or convolution layer (checked once: zennit's type checks are slow)
        self.layer = isinstance(module, nn.Linear) or is_convolution(module)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else None
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad
                and isinstance(output, torch.Tensor)):
            return None
        call = Call(args, kwargs, x, output, own=self.own)
        return _Cut.apply(self, call, x, [output.detach()])

    def relevance(self, call: Call, grad: torch.Tensor) -> torch.Tensor:
        """Relevance of the module's input from its output's (zennit's rule code)."""
        rule = self.rule
        if type(rule) is Pass:  # activations, merged BatchNorms: relevance passes as is
            return grad
        epsilon = _shift(rule)
        if epsilon is not None and call.own is not None and call.z._version == call.version:
            # LRP-ε and Norm: grad / (z + ε·sign z) on the kept output z, then the
            # module's own backward (one transposed layer instead of a forward and two),
            # times the input: zennit's gradient mapper and reducer, with fewer ops
            mapped = call.divide(grad, epsilon)
            if isinstance(self.module, Sum):
                return summands_times(call, mapped, self.module.dim)
            (gradient,) = torch.autograd.grad(call.own, call.x, mapped, retain_graph=True)
            x = call.args[0]
            if gradient._base is None and gradient.shape == x.shape and gradient.is_contiguous():
                return gradient.mul_(x)  # a fresh tensor of the backward: no new buffer
            return x * gradient
        if (self.layer and isinstance(rule, BasicHook)
                and type(rule).backward is BasicHook.backward):
            if type(rule) in (ZPlusRule, AlphaBeta, GammaRule):
                relevance = nonnegative_layer(rule, self.module, call, grad)
                if relevance is not None:
                    return relevance
            elif type(rule) is FlatRule:
                relevance = flat_layer(rule, self.module, call, grad)
                if relevance is not None:
                    return relevance
            return layer_rule(rule, self.module, call, grad)
        rule.stored_tensors["input"] = call.args
        rule.stored_tensors["kwargs"] = call.kwargs
        try:
            return rule.backward(self.module, (call.args[0],), (grad,))[0]
        finally:
            rule.stored_tensors.clear()


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
        #: the composite and rule parameters the slots hold (:meth:`configure`)
        self._configured: tuple[tuple, RuleComposite] | None = None

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
                # the head's layer gets a rule only where it ran (a single-logit model)
                binary = select_logits(raw, head.output).shape[1] == 1
                kept = cls(shadow, slots, plain, merged, unmerged, unseen, leaf, logits, keep,
                           head if binary else None)
                kept.outputs = outputs
                return kept
            shadow = None  # start again from a fresh copy: nothing to undo
            if not merges or merges_keep_logits(model, x, merges, plain, head):
                blocks = [name for name, m in model.named_modules()
                          if isinstance(m, (BasicBlock, Bottleneck, *VIDEO_BLOCKS))]
                raise RuntimeError(
                    "LRP's residual-block canonizer changes this model's output (max "
                    f"|Δlogit| {float((logits.detach() - plain.logits).abs().max()):.3g}) in the "
                    f"blocks {blocks[:5]}; their forward differs from torchvision's: use a "
                    "gradient method for this model, or rewrite the sum as a zennit Sum "
                    "module")
            bad = [pair for pair in merges
                   if not merges_keep_logits(model, x, [pair], plain, head)]
            bad = bad or merges  # each merge alone is fine, all together are not
            unmerged += [norm for _, norm in bad]
            merges = [pair for pair in merges if pair not in bad]
        raise RuntimeError("LRP: the canonized logits differ from the plain ones after "
                           "leaving every BatchNorm unmerged")

    def configure(self, composite: str, rules: dict[str, Any]) -> RuleComposite:
        """Give every slot its rule for ``composite`` with these parameters (nothing to
        do when they are the last call's: a channel click keeps the rules)."""
        key = (composite, _rules_key(rules))
        if self._configured is not None and self._configured[0] == key:
            return self._configured[1]
        self._configured = None  # a failure below leaves no stale configuration
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
        self._configured = (key, chosen)
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
        conserving = _conserving(self.shadow, composite, rules, self.unmerged)
        # sigmoid(0) = 0.5 acts as a bias: named as the cause where nothing else absorbs
        offsets = offset_activations(self.shadow) if conserving else []
        return Explanation(rel.detach(), error, chosen.summary(), self.unseen, self.unmerged,
                           conserving and not offsets,
                           0.0 if composite == "zero" else float(rules.get("epsilon", 1e-6)),
                           target_logit, offsets)

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
            module.register_forward_hook(keeper(name))  # on the copy, as in _attach
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
        # the copy's own hook dictionary (shadow_copy): it lives as long as the copy and
        # never reaches the user's model, so there is nothing for a Scope to undo
        module.register_forward_hook(slot.hook, with_kwargs=True)
        slots[id(module)] = slot
    return slots


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
