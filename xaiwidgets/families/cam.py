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


@register
class GradCAM(Method):
    """Grad-CAM (Selvaraju et al.): gradient-weighted activations of a conv layer."""

    name = "gradcam"
    family = "cam"
    default_reduce = "map"
    uses_layer = True
    target_from_pass = True
    normalize_output = True

    def attribute(self, ctx, target, layer, **params) -> torch.Tensor:
        return gradcam_map(ctx, target, layer)


@register
class GuidedGradCAM(Method):
    """Guided backprop (max |·| over RGB) times the upsampled, normalised Grad-CAM map."""

    name = "guided_gradcam"
    family = "cam"
    default_reduce = "map"
    uses_layer = True
    target_from_pass = True
    normalize_output = True

    def check(self, ctx, layer, params) -> None:
        """Guided backprop's precondition (``families/gradient.py``: ReLUs needed)."""
        require_relus(ctx, self.name)

    def attribute(self, ctx, target, layer, **params) -> torch.Tensor:
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
        cam = upsample(cam_map(activation, layer_grad, layer), ctx.size)
        cam = minmax(cam, dims=map_dims(ctx.size))
        return input_grad.abs().amax(dim=1) * cam
