"""Gradient family: gradient, guided backprop, DeconvNet, Integrated Gradients, SmoothGrad.

Guided backprop, DeconvNet (and Guided Grad-CAM) change the backward rule of ReLUs
only: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and the in-place forms.
Their precondition (:func:`require_relus`, checked before computing):

* a model whose forward pass calls no ReLU is refused (``ValueError`` naming the
  activations it does call: SiLU, GELU, LeakyReLU, Hardswish, ...): the result would be
  exactly the plain gradient;
* other activations next to ReLUs (a sigmoid gate, a Hardswish) keep their ordinary
  gradient (as in Captum); a :class:`ReluRuleWarning` names them;
* ReLUs written another way (``clamp(min=0)``, ``F.threshold(x, 0, 0)``,
  ``torch.maximum(x, 0)``) are not given the rule; a :class:`ReluRuleWarning` names them.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ..core.ops import image_generators, image_span, per_image_randn
from ..core.registry import Method, Param, register
from ..core.scoped import (
    OTHER_ACTIVATIONS,
    RELU_FUNCTIONS,
    activation_modules,
    relu_backward,
)


class ReluRuleWarning(UserWarning):
    """A ReLU backward rule (guided, DeconvNet) does not reach some non-linearities."""


def nonlinearities(ctx) -> Counter[str]:
    """The non-linearities the model calls (counted in the context's construction pass)."""
    return ctx.nonlinearities()


def require_relus(ctx, method: str) -> None:
    """Refuse a model without ReLUs, warn about what the ReLU rule does not reach.

    >>> import torch, xaiwidgets as xw
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.SiLU(),
    ...                           torch.nn.Flatten(), torch.nn.LazyLinear(2))
    >>> xw.explain(net, torch.rand(1, 3, 8, 8), "guided_backprop")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: guided_backprop changes the backward rule of ReLUs, and this model calls none...
    """
    found = nonlinearities(ctx)
    relus = [name for name in found if name in RELU_FUNCTIONS.values()]
    others = [name for name in found if name in OTHER_ACTIVATIONS.values()]
    written = [name for name in found if name not in relus and name not in others]
    listed = lambda names: ", ".join(f"{n} (x{found[n]})" for n in names)  # noqa: E731
    modules = activation_modules(ctx.model)
    in_modules = f" (modules: {', '.join(modules)})" if modules else ""
    if not relus:
        uses = listed(others + written) or "no activation torch can see"
        raise ValueError(
            f"{method} changes the backward rule of ReLUs, and this model calls none: it "
            f"uses {uses}{in_modules}. The result would equal the plain gradient; use "
            "'gradient', 'integrated_gradients' or 'deeplift' instead"
        )
    if others:
        warnings.warn(
            f"{method}: {listed(others)}{in_modules} keep their ordinary gradient; only "
            f"the ReLUs ({listed(relus)}) get the {method} rule", ReluRuleWarning,
            stacklevel=4)
    if written:
        warnings.warn(
            f"{method}: {listed(written)} compute ReLUs but are not ReLU calls, so they "
            "keep their ordinary gradient; write them as torch.relu / nn.ReLU to give "
            f"them the {method} rule", ReluRuleWarning, stacklevel=4)

BATCH_SIZE = Param("batch_size", 32, kind="int", low=1, doc="samples per model call (memory)")


@register
class Gradient(Method):
    """Plain gradient of the target logit with respect to the input (Simonyan et al.)."""

    name = "gradient"
    family = "gradient"
    targets = "from_own_pass"
    relu_rule: str | None = None

    def check(self, ctx, layer: str | None, params: dict[str, Any]) -> None:
        if self.relu_rule is not None:
            require_relus(ctx, self.name)

    def attribute(self, ctx, target, layer, **params: Any) -> torch.Tensor:
        if self.relu_rule is None:
            return ctx.input_gradient(ctx.inputs, target)
        with relu_backward(self.relu_rule):
            return ctx.input_gradient(ctx.inputs, target)


@register
class GuidedBackprop(Gradient):
    """Backward through ReLUs passes only positive gradients at positive inputs."""

    name = "guided_backprop"
    relu_rule = "guided"


@register
class DeconvNet(Gradient):
    """Backward through ReLUs passes only positive gradients (forward sign ignored)."""

    name = "deconvnet"
    relu_rule = "deconvnet"


def baseline_tensor(ctx, baseline: Any) -> torch.Tensor:
    """Baseline in model-input space: a float, a tensor, or ``"black"`` (the
    preprocessed all-zero image)."""
    x = ctx.inputs
    if isinstance(baseline, str):
        if baseline != "black":
            raise ValueError(f"baseline={baseline!r}: use a number, a tensor or 'black'")
        black = torch.zeros_like(ctx.images)
        return ctx.preprocess(black) if ctx.preprocess is not None else black
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(device=x.device, dtype=x.dtype)
        try:
            return torch.broadcast_to(b, x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"baseline of shape {tuple(b.shape)} does not broadcast to the inputs "
                f"{tuple(x.shape)}"
            ) from err
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    raise TypeError(f"baseline must be a number, a tensor or 'black', got {baseline!r}")


def spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order: every prefix samples the whole range evenly,
    so a partial Riemann sum is already a fair estimate (progressive maps).

    >>> spread_order(5)
    [0, 4, 2, 1, 3]
    """
    bits = max(1, (n - 1).bit_length())
    return [r for r in (int(f"{i:0{bits}b}"[::-1], 2) for i in range(2**bits)) if r < n]


def partial_estimate(ctx, estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``estimate`` when someone shows first estimates (``ctx.wants_partial``), else ``None``:
    then no snapshot of the running sum is taken after each chunk.

    >>> import torch, xaiwidgets as xw
    >>> ctx = xw.Explainer(torch.nn.Flatten(), torch.rand(1, 3, 2, 2)).context
    >>> partial_estimate(ctx, lambda part, count: part / count) is None
    True
    """
    return estimate if ctx.wants_partial else None


BASELINE = Param("baseline", 0.0, kind="any", doc="reference input: number, tensor or 'black'")


@register
class IntegratedGradients(Method):
    """(x − x')·mean_k ∇f(x' + k/m (x − x')), k = 1..m (right Riemann sum, docs/methods.md)."""

    name = "integrated_gradients"
    family = "gradient"
    targets = "resolved"
    progress_unit = "steps"
    default_reduce = "sum"
    signed = True
    quick_params = {"steps": 4}
    params = (
        Param("steps", 32, kind="int", low=1, high=4096, doc="integration steps m"),
        BASELINE,
        BATCH_SIZE,
    )

    def attribute(self, ctx, target, layer, steps, baseline, batch_size) -> torch.Tensor:
        x = ctx.inputs
        base = baseline_tensor(ctx, baseline)
        delta = x - base
        # path points are built chunk by chunk: memory does not grow with steps; they
        # come in spread order, so the sum after any chunk gives a first estimate.
        # Each point is one product and one in-place add (base + α·δ, same values)
        order = spread_order(steps)
        summed = ctx.summed_input_gradient(
            lambda k: torch.mul(delta, (order[k] + 1) / steps).add_(base), steps, target,
            batch_size=batch_size,
            estimate=partial_estimate(ctx, lambda part, count: delta * part / count))
        # the running sum is ours: scale it in place (delta * summed / steps)
        return summed.mul_(delta).div_(steps)


@register
class SmoothGrad(Method):
    """Mean gradient over noisy copies x + N(0, (σ·(max−min))²) (Smilkov et al.)."""

    name = "smoothgrad"
    family = "gradient"
    targets = "resolved"
    progress_unit = "samples"
    quick_params = {"n": 3}
    params = (
        Param("n", 25, kind="int", low=1, high=10000, doc="noise samples"),
        Param("sigma", 0.15, low=0.0, high=2.0, step=0.01,
              doc="noise std as a fraction of x.max() - x.min()"),
        Param("seed", 0, kind="int", low=0, doc="random seed of the noise"),
        BATCH_SIZE,
    )

    def attribute(self, ctx, target, layer, n, sigma, seed, batch_size) -> torch.Tensor:
        x = ctx.inputs
        span = image_span(x)
        # one generator per image, seeded by (seed, the image's content): the same
        # image gets the same noise alone or in any batch (docs/methods.md)
        generators = image_generators(x, seed)

        def noisy(_k: int) -> torch.Tensor:
            # one noise draw per sample, in sample order: seeded, independent of
            # batch_size, and never more than a chunk of noise in memory
            return x + per_image_randn(generators, x) * (sigma * span)

        summed = ctx.summed_input_gradient(
            noisy, n, target, batch_size=batch_size,
            estimate=partial_estimate(ctx, lambda part, count: part / count))
        return summed.div_(n)
