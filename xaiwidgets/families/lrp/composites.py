"""LRP composites: which rule goes on which layer, by composite name.

Pure: :meth:`RuleComposite.choose` looks at one module at a time and registers
nothing; the kept engine (:mod:`.engine`) asks it for every module of its copy.

>>> make_composite("epsilon_plus").kinds["conv"]
'zplus'
"""

from __future__ import annotations

from typing import Any

from torch import nn
from zennit.canonizers import Canonizer
from zennit.core import BasicHook, Composite
from zennit.layer import Sum
from zennit.rules import Pass
from zennit.types import Activation, AvgPool, BatchNorm, Convolution
from zennit.types import Linear as AnyLinear

from .rules import STABILIZER, ZERO_STABILIZER, NormRule, rule

#: composite -> (first layer rule or None, convolution rule, dense layer rule)
COMPOSITES: dict[str, tuple[str | None, str, str]] = {
    "epsilon_plus_flat": ("flat", "zplus", "epsilon"),
    "epsilon_plus": (None, "zplus", "epsilon"),
    "epsilon_gamma_box": ("zbox", "gamma", "epsilon"),
    "alpha_beta": (None, "alpha_beta", "epsilon"),
    "epsilon": (None, "epsilon", "epsilon"),
    "zero": (None, "zero", "zero"),
}


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
    <xaiwidgets.families.lrp.composites.RuleComposite object at ...>
    """
    if name not in COMPOSITES:
        raise ValueError(f"unknown composite {name!r}; choose one of {list(COMPOSITES)}")
    rules = dict(epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta, low=low, high=high)
    return RuleComposite(name, rules, first=first, merged=merged, canonizers=canonizers)
