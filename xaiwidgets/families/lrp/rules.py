"""LRP rules: zennit's hooks (LGPL, imported, never copied) that remember their
parameters as floats, so the kept engine (:mod:`.fast_terms`) can reuse their terms,
our LRP-αβ for any α ≥ 1, β ≥ 0, and :func:`rule`, one rule by name.

Each is tested against its textbook formula (docs/methods.md's worked example) and
against zennit's own rules in ``tests/test_methods_lrp.py``.

>>> rule("gamma", gamma=0.5).gamma
0.5
"""

from __future__ import annotations

from typing import Any

from zennit.core import BasicHook, ParamMod, Stabilizer
from zennit.rules import Epsilon, Flat, Gamma, Norm, ZBox, ZPlus

#: denominator stabiliser of every rule except LRP-ε (zennit's default)
STABILIZER = 1e-6
#: LRP-0 needs *some* stabiliser: z_j = 0 would give 0/0 where R_j = 0
ZERO_STABILIZER = 1e-12
#: the smallest LRP-ε stabiliser the ``epsilon`` parameter accepts
EPSILON_LOW = 1e-9


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
    (``engine._Slot.relevance``); the numbers are zennit's, bit for bit."""

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
    path on non-negative inputs (``fast_terms.nonnegative_layer``).

    >>> ZPlusRule(1e-6).copy().stabilizer
    1e-06
    """

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        super().__init__(stabilizer=float(stabilizer))
        self.stabilizer = float(stabilizer)

    def copy(self) -> ZPlusRule:
        return ZPlusRule(self.stabilizer)


class FlatRule(Flat):
    """zennit's LRP-flat that remembers its stabiliser (a float), for the kept engine's
    path (``fast_terms.flat_layer``).

    >>> FlatRule(1e-6).copy().stabilizer
    1e-06
    """

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        super().__init__(stabilizer=float(stabilizer))
        self.stabilizer = float(stabilizer)

    def copy(self) -> FlatRule:
        return FlatRule(self.stabilizer)


class GammaRule(Gamma):
    """zennit's generalised LRP-γ that remembers γ and its stabiliser (floats), so the
    kept engine can use its linearity in γ (``fast_terms.nonnegative_layer``).

    >>> GammaRule(0.5).copy().gamma
    0.5
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = STABILIZER) -> None:
        super().__init__(gamma=float(gamma), stabilizer=float(stabilizer))
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def copy(self) -> GammaRule:
        return GammaRule(self.gamma, self.stabilizer)


def rule(kind: str, *, epsilon: float = 1e-6, gamma: float = 0.25, alpha: float = 2.0,
         beta: float = 1.0, low: Any = None, high: Any = None) -> BasicHook:
    """One LRP rule as a zennit hook: ``zero``, ``epsilon``, ``gamma``, ``zplus``
    (= α1β0), ``alpha_beta``, ``flat`` or ``zbox`` (needs ``low``/``high`` input bounds).

    >>> rule("epsilon", epsilon=0.1)  # doctest: +ELLIPSIS
    <xaiwidgets.families.lrp.rules.EpsilonRule object at ...>
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
        return FlatRule(STABILIZER)
    if kind == "zbox":
        if low is None or high is None:
            raise ValueError("the z^B (zbox) rule needs the input bounds low and high")
        return ZBox(low=low, high=high, stabilizer=STABILIZER)
    raise ValueError(f"unknown LRP rule {kind!r}")
