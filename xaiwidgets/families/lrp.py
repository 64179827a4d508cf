"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) through zennit.

zennit (LGPL, imported, never copied) provides the rules, the composite machinery and
the canonizers; this module decides which rule goes on which layer, merges BatchNorms,
makes residual sums explicit, starts the backward pass from the target logit and
guarantees that nothing stays on the user's model.

>>> import torch, xaiwidgets as xw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
...                             torch.nn.Linear(4, 2))
>>> xw.explain(model, torch.rand(1, 3, 16, 16), "lrp", composite="epsilon").dims
('image', 'y', 'x')

Slider cost: changing ``epsilon`` (or any LRP parameter) re-runs one forward and one
modified backward pass; the canonizers (BatchNorm merge, explicit residual sums) are
re-applied and reverted around every call. That costs microseconds to milliseconds and
is deliberately not cached: a cached canonization would have to stay on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
from zennit.core import BasicHook, Composite, ParamMod, Stabilizer
from zennit.rules import Epsilon, Flat, Gamma, ZBox, ZPlus
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm, Convolution
from zennit.types import Linear as AnyLinear

from ..core.registry import Method, Param, register
from ..core.scoped import model_guard

#: denominator stabiliser of every rule except LRP-ε (zennit's default)
STABILIZER = 1e-6
#: LRP-0 needs *some* stabiliser: z_j = 0 would give 0/0 where R_j = 0
ZERO_STABILIZER = 1e-12

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


def rule(kind: str, *, epsilon: float = 1e-6, gamma: float = 0.25, alpha: float = 2.0,
         beta: float = 1.0, low: Any = None, high: Any = None) -> BasicHook:
    """One LRP rule as a zennit hook: ``zero``, ``epsilon``, ``gamma``, ``zplus``
    (= α1β0), ``alpha_beta``, ``flat`` or ``zbox`` (needs ``low``/``high`` input bounds).

    >>> rule("epsilon", epsilon=0.1)  # doctest: +ELLIPSIS
    <zennit.rules.Epsilon object at ...>
    """
    if kind == "zero":
        return Epsilon(epsilon=ZERO_STABILIZER)
    if kind == "epsilon":
        return Epsilon(epsilon=epsilon)
    if kind == "gamma":
        return Gamma(gamma=gamma, stabilizer=STABILIZER)
    if kind == "zplus":
        return ZPlus(stabilizer=STABILIZER)
    if kind == "alpha_beta":
        return AlphaBeta(alpha=alpha, beta=beta, stabilizer=STABILIZER)
    if kind == "flat":
        return Flat(stabilizer=STABILIZER)
    if kind == "zbox":
        if low is None or high is None:
            raise ValueError("the z^B (zbox) rule needs the input bounds low and high")
        return ZBox(low=low, high=high, stabilizer=STABILIZER)
    raise ValueError(f"unknown LRP rule {kind!r}")


class MergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's merge of each BatchNorm into the conv/linear layer before it, made exact.

    zennit empties the BatchNorm (mean 0, variance 1, weight 1, bias 0) but leaves its
    ``eps``, so the "identity" still divides by sqrt(1 + eps); relevance passes it
    unchanged, and LRP-0 drifts from gradient × input. Here ``eps`` is 0 while merged.
    """

    def register(self, linears: Any, batch_norm: nn.Module) -> None:
        super().register(linears, batch_norm)  # merges with the true eps first
        self.saved_eps = batch_norm.eps
        batch_norm.eps = 0.0

    def remove(self) -> None:
        super().remove()
        self.batch_norm.eps = self.saved_eps


def _mergeable(norm: nn.Module) -> bool:
    """zennit can fold a BatchNorm only when it has affine weights and running statistics."""
    return all(getattr(norm, key, None) is not None
               for key in ("weight", "bias", "running_mean", "running_var"))


def canonizers_for(model: nn.Module) -> list[Canonizer]:
    """Canonizers for ``model``: BatchNorm merged into the preceding conv/linear layer
    and, for torchvision ResNet blocks, the residual addition as a ``Sum`` module.

    If any BatchNorm cannot be merged (no affine weights or no running statistics), none
    is merged (zennit's merge would fail half-way through the model); unmerged
    BatchNorms pass relevance through unchanged. Other residual additions (custom blocks) are not
    visible to hooks; relevance crosses them as a gradient, so it is not conserved.
    """
    modules = list(model.modules())
    norms = [m for m in modules if isinstance(m, BatchNorm)]
    merge = bool(norms) and all(_mergeable(m) for m in norms)
    residual = any(isinstance(m, (BasicBlock, Bottleneck)) for m in modules)
    canonizers: list[Canonizer] = [MergeBatchNorm()] if merge else []
    if residual:
        # what zennit's ResNetCanonizer does, with the exact merge
        canonizers += [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
    return canonizers


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
) -> Composite:
    """The zennit composite called ``name`` (see :data:`COMPOSITES`) with these parameters.

    Activations pass relevance through, residual sums and average pools split it in
    proportion to their inputs (zennit's ``Norm``), max-pools route it to the maximum.

    >>> make_composite("alpha_beta", alpha=1.0, beta=0.0)  # doctest: +ELLIPSIS
    <zennit.composites.SpecialFirstLayerMapComposite object at ...>
    """
    if name not in COMPOSITES:
        raise ValueError(f"unknown composite {name!r}; choose one of {list(COMPOSITES)}")
    first, conv, dense = COMPOSITES[name]
    kwargs = dict(epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta, low=low, high=high)
    # LRP-0 also splits sums and average pools with (almost) no stabiliser
    layer_map = layer_map_base(ZERO_STABILIZER if name == "zero" else STABILIZER) + [
        (Convolution, rule(conv, **kwargs)),
        (nn.Linear, rule(dense, **kwargs)),
    ]
    first_map = [(AnyLinear, rule(first, **kwargs))] if first else []
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map,
                                         canonizers=canonizers or [])


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


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              composite: Composite) -> torch.Tensor:
    """LRP relevance of ``x`` (same shape) for one target class per row.

    The backward pass starts from the target logit (0 at the other classes), so with
    LRP-0 and no biases the relevance of each image sums to its target logit.

    >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    >>> relevance(net, torch.ones(1, 2), torch.tensor([0]), make_composite("zero")).shape
    torch.Size([1, 2])
    """
    x = x.detach().requires_grad_(True)
    with model_guard(model), attached(model, composite), torch.enable_grad():
        logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("the model must return logits of shape (N, classes)")
        seed = torch.zeros_like(logits)
        seed.scatter_(1, target[:, None], logits.detach().gather(1, target[:, None]))
        (rel,) = torch.autograd.grad(logits, x, grad_outputs=seed)
    return rel.detach()


def input_bounds(ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest possible model inputs, for the z^B rule.

    With a ``preprocess``: the preprocessed black and white images (elementwise min and
    max of the two, in case preprocessing flips signs). Without: each image's own
    minimum and maximum, shape (N, 1, 1, 1).
    """
    if ctx.preprocess is not None:
        black = ctx.preprocess(torch.zeros_like(ctx.images[:1]))
        white = ctx.preprocess(torch.ones_like(ctx.images[:1]))
        return torch.minimum(black, white), torch.maximum(black, white)
    flat = ctx.inputs.detach().flatten(1)
    shape = (-1, 1, 1, 1)
    return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)


@register
class LRP(Method):
    """Layer-wise relevance propagation with a named composite of rules (docs/methods.md, LRP).

    Composites: ``epsilon_plus_flat`` (default: flat first layer, α1β0 on conv, ε on
    dense), ``epsilon_plus``, ``epsilon_gamma_box`` (z^B first, γ conv, ε dense),
    ``alpha_beta`` (α/β on conv, ε on dense), ``epsilon``, ``zero`` (LRP-0).
    α and β default to 2 and 1; give one and the other follows α = β + 1.
    """

    name = "lrp"
    family = "lrp"
    default_reduce = "sum"
    signed = True
    params = (
        Param("composite", "epsilon_plus_flat", kind="choice", choices=tuple(COMPOSITES),
              doc="which rule on which layer"),
        Param("epsilon", 1e-6, low=1e-9, high=10.0, log=True,
              doc="LRP-ε stabiliser: larger = fewer, smoother relevances"),
        Param("gamma", 0.25, low=0.0, high=10.0, step=0.05,
              doc="LRP-γ: extra weight on positive contributions (epsilon_gamma_box)"),
        Param("alpha", None, low=1.0, high=10.0, step=0.5, optional=True,
              doc="LRP-αβ weight of positive parts (default 2, or beta + 1)"),
        Param("beta", None, low=0.0, high=9.0, step=0.5, optional=True,
              doc="LRP-αβ weight of negative parts (default 1, or alpha - 1)"),
    )

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        alpha, beta = params["alpha"], params["beta"]
        if alpha is None and beta is None:
            alpha, beta = 2.0, 1.0
        elif alpha is None:
            alpha = beta + 1.0
        elif beta is None:
            beta = alpha - 1.0  # alpha >= 1 is checked by its Param
        return {**params, "alpha": float(alpha), "beta": float(beta)}

    def attribute(self, ctx, target, layer, composite, epsilon, gamma, alpha,
                  beta) -> torch.Tensor:
        low, high = input_bounds(ctx) if composite == "epsilon_gamma_box" else (None, None)
        built = make_composite(composite, epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta,
                               low=low, high=high, canonizers=canonizers_for(ctx.model))
        return relevance(ctx.model, ctx.inputs, target, built)
