"""Class activation maps: Grad-CAM and Guided Grad-CAM."""

from __future__ import annotations

import torch

from ..core.ops import map_dims, minmax, upsample
from ..core.registry import Method, register
from ..core.scoped import relu_backward
from .gradient import require_relus


def gradcam_map(ctx, target: torch.Tensor, layer: str) -> torch.Tensor:
    """ReLU(Σ_k α_k A_k) with α_k the spatial mean of ∂f_c/∂A_k; (N, h, w), unnormalised.

    On clips (3D CNNs) α_k is the mean over the whole (t, y, x) volume: (N, t, h, w).
    """
    return cam_map(*ctx.layer_gradient(layer, target), layer)


def cam_map(activation: torch.Tensor, grad: torch.Tensor, layer: str) -> torch.Tensor:
    """Grad-CAM of a layer's activation and the target's gradient there, both (N,C,h,w)
    (or (N,C,t,h,w) for a 3D CNN: the weights then average over (t, h, w))."""
    if activation.ndim not in (4, 5):
        raise ValueError(
            f"layer {layer!r} outputs shape {tuple(activation.shape)}; Grad-CAM needs a "
            "convolutional feature map (N,C,h,w) or (N,C,t,h,w): pick a layer from "
            "Explainer.layers()"
        )
    weights = grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))


def layer_terms(ctx, layer: str, target: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s activation A and the Grad-CAM weights α (A's shape, spatial dims 1)
    for ``target`` (``None``: the predicted classes), kept in the context's cache per
    (layer, targets): a channel click on a Grad-CAM map runs no model pass."""
    def terms(target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        activation, grad = ctx.layer_gradient(layer, target)
        if activation.ndim not in (4, 5):
            cam_map(activation, grad, layer)  # raises: not a feature map
        return activation, grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)

    if target is None and ctx.cached_logits() is None:
        found = terms(None)  # this pass gives the predicted classes: kept under them
        target = ctx.logits().argmax(dim=1)
        return ctx.memo(layer_terms, (layer, tuple(target.tolist())), lambda: found, limit=4)
    if target is None:
        target = ctx.logits().argmax(dim=1)
    return ctx.memo(layer_terms, (layer, tuple(target.tolist())), lambda: terms(target),
                    limit=4)


def conditional_cam(ctx, target: torch.Tensor | None, layer: str,
                    channels: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_{k ∈ channels} α_k A_k): the Grad-CAM map of those channels only, (N, h, w)."""
    activation, weights = layer_terms(ctx, layer, target)
    index = channels.to(activation.device)
    return torch.relu((weights[:, index] * activation[:, index]).sum(dim=1))


@register
class GradCAM(Method):
    """Grad-CAM (Selvaraju et al.): gradient-weighted activations of a conv layer."""

    name = "gradcam"
    family = "cam"
    default_reduce = "map"
    uses_layer = True
    targets = "from_own_pass"
    normalize_output = True

    def attribute(self, ctx, target, layer, **params) -> torch.Tensor:
        return gradcam_map(ctx, target, layer)

    def channel_terms(self, ctx, target, layer, **params) -> torch.Tensor:
        """α_k·Σ A_k per channel, (N, C): the terms whose ReLU'd sum is the map's total."""
        activation, weights = layer_terms(ctx, layer, target)
        return weights.flatten(1) * activation.flatten(2).sum(dim=2)

    def conditional(self, ctx, target, layer, channels, **params) -> torch.Tensor:
        return conditional_cam(ctx, target, layer, channels)


@register
class GuidedGradCAM(Method):
    """Guided backprop (max |·| over RGB) times the upsampled, normalised Grad-CAM map."""

    name = "guided_gradcam"
    family = "cam"
    default_reduce = "map"
    uses_layer = True
    targets = "from_own_pass"
    normalize_output = True

    def check(self, ctx, layer, params) -> None:
        """Guided backprop's precondition (``families/gradient.py``: ReLUs needed)."""
        require_relus(ctx, self.name)

    def attribute(self, ctx, target, layer, **params) -> torch.Tensor:
        return self.guided(ctx, target, layer)

    def conditional(self, ctx, target, layer, channels, **params) -> torch.Tensor:
        """Guided backprop times the conditional Grad-CAM map of ``channels``."""
        return self.guided(ctx, target, layer, channels)

    def guided(self, ctx, target, layer, channels: torch.Tensor | None = None) -> torch.Tensor:
        """Guided backprop (max |·| over RGB) times the normalised Grad-CAM map (of
        ``channels`` only, when given)."""
        x = ctx.inputs.detach().requires_grad_(True)
        with relu_backward("guided") as guided:
            logits, acts = ctx.forward(x, layers=[layer], grad=True)
            score = logits.gather(1, ctx.pass_target(logits, target)[:, None]).sum()
            # one forward serves both backward passes: ordinary ReLU gradients down to
            # the layer (Grad-CAM), then guided ones on to the input
            guided.active = False
            (layer_grad,) = torch.autograd.grad(score, acts[layer], retain_graph=True)
            guided.active = True
            (input_grad,) = torch.autograd.grad(score, x)
        grid = ctx.layer_grid(layer)  # token / channels-last outputs as (N, C, h, w)
        activation, layer_grad = grid.to_map(acts[layer].detach()), grid.to_map(layer_grad)
        if channels is not None:
            index = channels.to(activation.device)
            activation, layer_grad = activation[:, index], layer_grad[:, index]
        cam = upsample(cam_map(activation, layer_grad, layer), ctx.size)
        cam = minmax(cam, dims=map_dims(ctx.size))
        return input_grad.abs().amax(dim=1) * cam
