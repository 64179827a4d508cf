"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) through zennit.

zennit (LGPL, imported, never copied) provides the rules and the composite machinery;
this package decides which rule goes on which layer, merges BatchNorms, makes
torchvision's residual sums explicit, starts the backward pass from the target logit
and checks the result. One concept per module, imported in this order:

* :mod:`.rules` – the rules (zennit's hooks remembering their parameters, our α/β);
* :mod:`.composites` – which rule on which layer, by composite name;
* :mod:`.canonize` – the shadow copy (shared tensors, own dictionaries: the user's
  model, its parameter objects, hooks and flags are never written, under zennit 0.5.1
  and 1.0.0 alike, in any thread, also on failure), BatchNorm merges found by tracing
  (only into the layer whose output they normalise, and only if the logits stay the
  same; otherwise they stay layers of their own with LRP-ε and a warning names them),
  residual-block canonizers;
* :mod:`.unseen` – operations the rules cannot see (functional residual adds,
  pooling, gates...), by module name;
* :mod:`.fast_terms` – the kept parts that make a parameter change cheap;
* :mod:`.engine` – the kept engine (:class:`Canonized`), the only one;
* :mod:`.checks` – the warnings on a result (conservation error, unseen operations);
* here – the registered :class:`LRP` method, :func:`lrp` for one call, input bounds.

>>> import torch, xaiwidgets as xw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
...                             torch.nn.Linear(4, 2))
>>> xw.explain(model, torch.rand(1, 3, 16, 16), "lrp", composite="epsilon").dims
('image', 'y', 'x')

Slider cost: the Explainer keeps one :class:`Canonized` copy per images, with its
forward pass (:func:`canonized`). Any change of composite, ``epsilon``, ``gamma``,
``alpha``/``beta`` or target is then one backward pass on the kept graph, no forward;
each rule replaces its layer's ordinary backward, and LRP-ε/LRP-0 read the layer's
kept output instead of re-running it. The graph goes with the cache (new images,
weights changed in place, ``clear_cache``). Video clips (N, C, T, H, W) work the same
way: zennit's rules cover Conv3d, BatchNorm3d and 3-D average pooling, and
:class:`VideoBlockCanonizer` makes the video ResNets' residual sums visible.

The tests' oracle, a slow one-shot computation with zennit's own hooks, lives in
``tests/lrp_reference.py``, not here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.channels import channel_mask
from ...core.registry import Method, Param, register
from ..attention import refuse_attention
from .canonize import (
    LINEAR_TYPES,
    Trace,
    VideoBlockCanonizer,
    block_canonizers,
    logits_close,
    merge_batchnorm,
    shadow_copy,
    trace,
)
from .checks import CONSERVATION_TOLERANCE, LRPWarning, warn_about
from .composites import COMPOSITES, RuleComposite, make_composite
from .engine import Canonized, Explanation
from .rules import (
    EPSILON_LOW,
    STABILIZER,
    ZERO_STABILIZER,
    AlphaBeta,
    EpsilonRule,
    GammaRule,
    NormRule,
    ZPlusRule,
    rule,
)
from .unseen import UNSEEN, describe_unseen, unseen_operations

__all__ = [
    "COMPOSITES", "CONSERVATION_TOLERANCE", "EPSILON_LOW", "LINEAR_TYPES", "LRP", "STABILIZER",
    "UNSEEN", "ZERO_STABILIZER", "AlphaBeta", "Canonized", "EpsilonRule", "Explanation",
    "GammaRule", "LRPWarning", "NormRule", "RuleComposite", "Trace", "VideoBlockCanonizer",
    "ZPlusRule", "block_canonizers", "canonized", "describe_unseen", "input_bounds",
    "logits_close", "lrp", "make_composite", "merge_batchnorm", "rule", "shadow_copy", "trace",
    "unseen_operations",
]


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
    targets = "from_own_pass"  # the trace pass gives the predictions
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
        """Refused on self-attention models (``families/attention.py`` says why); a
        channel ``layer`` (CRP) must be laid out channels first."""
        refuse_attention(ctx.model, self.name)
        if layer is not None and ctx.layer_grid(layer).layout != "map":
            raise ValueError(
                f"LRP's channel relevance (CRP) reads layer {layer!r} as (N, C, h, w), but "
                f"its output is laid out as {ctx.layer_grid(layer).layout} (a channels-last "
                "or token layer); pick a layer whose output is channels first, such as a "
                "block output from Explainer.layers(), or the gradcam or activation measure")

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
        warn_about(result)
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
    # two threads asking at once build one copy (Context.memo)
    return ctx.memo(canonized, None, lambda: Canonized.build(ctx.model, ctx.inputs, keep=True,
                                                              output=ctx.output))


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite: str,
        **rules: Any) -> Explanation:
    """LRP of ``x`` for ``target`` with the named composite, checked and side-effect free.

    1. A :func:`shadow_copy` of the model is traced (:func:`trace`); each BatchNorm is
       merged into the conv/linear layer whose output it normalises (on the copy).
    2. Rules go on the copy (the kept engine, :class:`Canonized`, with ``keep=False``):
       one forward and one backward pass give the relevance, and operations the rules
       cannot see are recorded (:func:`unseen_operations`).
    3. The canonized logits must equal the plain ones (see :meth:`Canonized.build`).

    The user's model is only read: nothing is registered, merged or flagged on it.
    :class:`Canonized` keeps the copy and its forward pass for later calls.

    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> lrp(net, torch.rand(1, 3, 8, 8), torch.tensor([1]), "epsilon").rules
    'AdaptiveAvgPool2d: norm; BatchNorm2d: merged; Conv2d: epsilon; ReLU: pass'
    """
    result = Canonized.build(model, x).explain(target, composite, rules)
    warn_about(result)
    return result
