"""Attention rollout (Abnar & Zuidema 2020) for vision transformers with global self-attention.

Per block, ``A`` = the softmax attention with its heads fused (mean, max or min);
``discard_ratio`` sets the lowest fraction of the patch-to-patch attentions to zero
(entries of the class, distillation and register tokens are never dropped);
``Â = (A + I) / row sums`` and ``R = Â_L ⋯ Â_1``. The map is the class token's row of
``R`` over the patch tokens (models without a class token: the mean row), reshaped to
the patch grid (:mod:`~xaiwidgets.core.tokens`), upsampled and normalised.

The attention is read without changing the model: forward hooks on each attention's
``q_norm``/``k_norm`` (timm: the queries and keys right before its fused
``scaled_dot_product_attention`` kernel) or on ``nn.MultiheadAttention``'s inputs
recompute ``softmax(q kᵀ · scale)`` in the one forward pass, so timm's ``fused_attn``
stays on. Refused, with the reason: windowed attention (Swin, MaxViT), spatial-
reduction attention (PVT), attention with learned biases (LeViT), attention over
unfolded patches (MobileViT), masks, and models without attention. EVA-02's rotary
embeddings are applied to the hooked queries and keys with timm's own function.

>>> import timm, torch, xaiwidgets as xw  # doctest: +SKIP
>>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)  # doctest: +SKIP
>>> xw.explain(vit, torch.rand(1, 3, 32, 32), "attention_rollout").dims  # doctest: +SKIP
('image', 'y', 'x')
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import Method, Param, register
from ..core.scoped import Scope, model_guard
from ..core.tokens import Grid, layout_of, prefix_tokens

#: what each kind of attention that rollout cannot read does instead
_REFUSED = {
    "window_size": "attends within local windows (Swin, MaxViT): no token attends to the "
                   "whole image, so there is no token-to-token matrix to roll out",
    "sr_ratio": "uses spatial-reduction attention (PVT): its keys are pooled tokens, so the "
                "attention is not a square token-to-token matrix",
    "sr": "uses spatial-reduction attention (PVT): its keys are pooled tokens, so the "
          "attention is not a square token-to-token matrix",
    "partition_size": "attends within window or grid partitions (MaxViT): no token "
                      "attends to the whole image, so there is no token-to-token matrix",
    "rel_pos": "adds relative-position biases inside its kernel (CoAtNet), which the "
               "queries and keys alone do not give",
    "attention_biases": "adds learned attention biases inside its kernel (LeViT), which "
                        "the queries and keys alone do not give",
}


class RolloutRefused(ValueError):
    """Attention rollout does not apply to this model (the message says why)."""


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.MultiheadAttention) or (
        "Attention" in name and not name.endswith(("Block", "Stage", "Layer")))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost self-attention modules of ``model``, in definition order.

    >>> attention_modules(nn.Sequential(nn.Linear(2, 2)))
    []
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and _is_attention(module) and not any(
                name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return found


def _readable(module: nn.Module) -> str | None:
    """Why rollout cannot read ``module``'s attention, or ``None`` when it can."""
    if isinstance(module, nn.MultiheadAttention):
        return None if module._qkv_same_embed_dim else "has separate key/value sizes"
    for attribute, reason in _REFUSED.items():
        if getattr(module, attribute, None) is not None:
            return reason
    if all(isinstance(getattr(module, part, None), nn.Module) for part in ("q_norm", "k_norm")) \
            and hasattr(module, "scale") and hasattr(module, "num_heads"):
        return None
    return ("computes its attention in a way the hooks cannot read (supported: timm's "
            "Attention with q_norm/k_norm, torch's nn.MultiheadAttention)")


def check_rollout(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules rollout reads, or :class:`RolloutRefused` with the reason."""
    found = attention_modules(model)
    if not found:
        raise RolloutRefused(
            "attention_rollout needs a vision transformer with self-attention; this model "
            "has no attention module. Use gradcam, fem or a gradient method instead")
    for name, module in found:
        reason = _readable(module)
        if reason is not None:
            raise RolloutRefused(
                f"attention_rollout is refused: {name!r} ({type(module).__name__}) {reason}. "
                "Use gradcam or fem on a block instead (Explainer.layers() lists them)")
    return found


def _mha_query_key(module: nn.MultiheadAttention, args: tuple, kwargs: dict
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (N, heads, L, head_dim) of an ``nn.MultiheadAttention`` call."""
    query = kwargs.get("query", args[0] if args else None)
    key = kwargs.get("key", args[1] if len(args) > 1 else query)
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    weight, bias = module.in_proj_weight, module.in_proj_bias
    size = module.embed_dim
    q = F.linear(query, weight[:size], None if bias is None else bias[:size])
    k = F.linear(key, weight[size:2 * size], None if bias is None else bias[size:2 * size])
    heads = module.num_heads
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    return split(q), split(k)


class _Recorder:
    """Forward hooks that fold each attention into the rollout as the pass goes."""

    def __init__(self, fuse: str, discard: float, batch: int) -> None:
        self.fuse, self.discard, self.batch = fuse, discard, batch
        self.rollout: torch.Tensor | None = None
        self.grids: list[int] = []  # token count of every attention met
        self.query: torch.Tensor | None = None
        self.rope: torch.Tensor | None = None  # the rotary embedding of the current call
        self.refusal: str | None = None
        self.prefix = 0
        self.owner = threading.get_ident()

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        if q.shape[0] != self.batch:
            self.refusal = self.refusal or (
                f"{name!r} attends within {q.shape[0]} sequences for {self.batch} images "
                "(attention over unfolded patches, as in MobileViT): no token attends to "
                "the whole image")
            return
        if q.shape[-2] != k.shape[-2]:
            self.refusal = self.refusal or (
                f"{name!r} attends from {q.shape[-2]} queries to {k.shape[-2]} keys: the "
                "attention is not a square token-to-token matrix")
            return
        logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # scaled before: smaller
        attention = logits.softmax(dim=-1)
        fused = getattr(attention, self.fuse)(dim=1)
        fused = fused.values if not isinstance(fused, torch.Tensor) else fused
        if self.discard > 0:
            fused = _discard(fused, self.discard, self.prefix)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        if self.rollout is not None and self.rollout.shape != fused.shape:
            self.refusal = self.refusal or (
                f"{name!r} attends over {fused.shape[-1]} tokens, earlier blocks over "
                f"{self.rollout.shape[-1]} (a hierarchical model): rollout multiplies "
                "attentions over one token set")
            return
        self.rollout = fused if self.rollout is None else fused @ self.rollout
        self.grids.append(fused.shape[-1])

    def hooks(self, name: str, module: nn.Module) -> list[Any]:
        if isinstance(module, nn.MultiheadAttention):
            def on_call(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if threading.get_ident() == self.owner:
                    q, k = _mha_query_key(mod, args, kwargs)
                    self.attend(name, q, k, q.shape[-1] ** -0.5)
            return [module.register_forward_pre_hook(on_call, with_kwargs=True)]

        rotary = isinstance(getattr(module, "num_prefix_tokens", None), int)  # timm's EVA

        def on_attention(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if threading.get_ident() != self.owner:
                return
            self.rope = kwargs.get("rope") if rotary else None
            extra = {k: v for k, v in kwargs.items() if v is not None
                     and k != "is_causal" and not (rotary and k == "rope")}
            extra.update({str(i): a for i, a in enumerate(args[1:]) if a is not None})
            if extra:
                self.refusal = self.refusal or (
                    f"{name!r} is called with {sorted(extra)} (a mask or rotary embeddings "
                    "it applies its own way): its attention is not softmax(q kᵀ · scale) "
                    "of the hooked q, k")

        def on_query(_mod: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if threading.get_ident() == self.owner:
                self.query = output

        def on_key(_mod: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if threading.get_ident() == self.owner and self.query is not None:
                q, k = self.query, output
                if self.rope is not None:  # EVA-02: rotate the patch tokens, as it does
                    q, k = (_rotate(t, self.rope, module) for t in (q, k))
                self.attend(name, q, k, float(module.scale))
                self.query = None

        return [module.register_forward_pre_hook(on_attention, with_kwargs=True),
                module.q_norm.register_forward_hook(on_query),
                module.k_norm.register_forward_hook(on_key)]


def _rotate(t: torch.Tensor, rope: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """timm EVA's rotary embedding of queries or keys ``t`` (N, heads, L, d): the patch
    tokens rotated by ``rope`` with timm's own function, the prefix tokens kept."""
    from timm.layers import apply_rot_embed_cat

    lead = module.num_prefix_tokens
    half = getattr(module, "rotate_half", False)
    return torch.cat([t[:, :, :lead], apply_rot_embed_cat(t[:, :, lead:], rope, half=half)],
                     dim=2)


def _discard(fused: torch.Tensor, ratio: float, prefix: int) -> torch.Tensor:
    """``fused`` (N, L, L) with the lowest ``ratio`` of its patch-to-patch entries set
    to 0, per image; rows and columns of the ``prefix`` tokens are kept."""
    patches = fused[:, prefix:, prefix:].flatten(1)
    drop = int(patches.shape[1] * ratio)
    if drop == 0:
        return fused
    lowest = patches.topk(drop, dim=1, largest=False).indices
    kept = patches.scatter(1, lowest, 0.0).view_as(fused[:, prefix:, prefix:])
    fused = fused.clone()
    fused[:, prefix:, prefix:] = kept
    return fused


def rollout_map(ctx: Any, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """The rollout map (N, h, w) of the context's images, from one forward pass."""
    found = check_rollout(ctx.model)
    recorder = _Recorder(head_fusion, discard_ratio, ctx.n_images)
    recorder.prefix = prefix_tokens(ctx.model)
    with model_guard(ctx.model), Scope() as scope, torch.no_grad():
        for name, module in found:
            for handle in recorder.hooks(name, module):
                scope.handle(handle)
        logits, _ = ctx.forward()
    ctx.keep_logits(logits)
    if recorder.refusal is not None:
        raise RolloutRefused(f"attention_rollout is refused: {recorder.refusal}")
    rollout = recorder.rollout
    grid = None if rollout is None or rollout.shape[0] != ctx.n_images else layout_of(
        ctx.model, found[-1][0], (1, rollout.shape[-1], 1), ctx.size[-2:],
        recorder.prefix, ctx.grid)
    if grid is None or grid.layout != "tokens" or grid.prefix != recorder.prefix:
        raise RolloutRefused(
            f"attention_rollout is refused: {found[-1][0]!r} does not attend over the "
            "images' patch tokens (attention over unfolded patches, as in MobileViT?); "
            "use gradcam or fem on a block instead")
    return _read_map(rollout, grid)


def _read_map(rollout: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The class token's row of ``rollout`` over the patches (no class token: the mean
    row), as (N, h, w)."""
    rows = rollout[:, 0] if grid.prefix else rollout.mean(dim=1)
    return rows[:, grid.prefix:].unflatten(1, (grid.height, grid.width))


@register
class AttentionRollout(Method):
    """Attention rollout (Abnar & Zuidema 2020): the class token's attention, propagated
    through every block with the residual connection (``(A + I)/rows``)."""

    name = "attention_rollout"
    family = "attention"
    default_reduce = "map"
    targets = "ignored"  # the class token's attention, whatever the target
    normalize_output = True
    clip_refusal = "it reads the attention of image transformers"
    requires = "self-attention"
    params = (
        Param("head_fusion", "mean", kind="choice", choices=("mean", "max", "min"),
              doc="how the heads' attentions are combined per block"),
        Param("discard_ratio", 0.0, low=0.0, high=0.99, step=0.05,
              doc="fraction of the lowest patch-to-patch attentions set to 0 per block"),
    )

    def check(self, ctx, layer, params) -> None:
        """Refuse models without readable global self-attention (the reason is named)."""
        check_rollout(ctx.model)

    def attribute(self, ctx, target, layer, head_fusion, discard_ratio) -> torch.Tensor:
        return rollout_map(ctx, head_fusion, discard_ratio)


def refuse_attention(model: nn.Module, method: str) -> None:
    """Refuse ``method`` (a propagation rule: LRP, DeepLIFT) on a model with self-attention.

    Their rules cover layers, activations and sums; the softmax and the products
    ``q·kᵀ`` and ``A·v`` of attention have none here (AttnLRP, Achtibat et al. 2024, is
    future work), so the relevance would not be conserved (measured on ViT-Tiny: a
    NaN LRP conservation error, a 180 % DeepLIFT delta error).

    >>> refuse_attention(nn.Sequential(nn.Linear(2, 2)), "lrp")  # no attention: nothing
    """
    found = attention_modules(model)
    if found:
        name, module = found[0]
        raise ValueError(
            f"{method} is refused on models with self-attention ({name!r}: "
            f"{type(module).__name__}, {len(found)} in all): its rules do not cover the "
            "softmax and the q·kᵀ, A·v products, so relevance would not be conserved "
            "(AttnLRP rules are future work). Use gradient, integrated_gradients, occlusion, "
            "gradcam, fem or attention_rollout instead")
