"""Class activation maps: Grad-CAM and Guided Grad-CAM."""

from __future__ import annotations

import torch

from ..explainer import minmax, upsample
from ..hooks import relu_backward
from ..registry import Method, register


def gradcam_map(ex, target: torch.Tensor, layer: str) -> torch.Tensor:
    """ReLU(Σ_k α_k A_k) with α_k the spatial mean of ∂f_c/∂A_k; (N, h, w), unnormalised."""
    activation, grad = ex.layer_gradient(layer, target)
    if activation.ndim != 4:
        raise ValueError(
            f"layer {layer!r} outputs shape {tuple(activation.shape)}; Grad-CAM needs a "
            "convolutional feature map (N,C,h,w): pick a layer from Explainer.layers()"
        )
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))


@register
class GradCAM(Method):
    """Grad-CAM (Selvaraju et al.): gradient-weighted activations of a conv layer."""

    name = "gradcam"
    family = "cam"
    default_reduce = "map"
    uses_layer = True
    normalize_output = True

    def attribute(self, ex, target, layer, **params) -> torch.Tensor:
        return gradcam_map(ex, target, layer)


@register
class GuidedGradCAM(Method):
    """Guided backprop (max |·| over RGB) times the upsampled, normalised Grad-CAM map."""

    name = "guided_gradcam"
    family = "cam"
    default_reduce = "map"
    uses_layer = True
    normalize_output = True

    def attribute(self, ex, target, layer, **params) -> torch.Tensor:
        cam = minmax(upsample(gradcam_map(ex, target, layer), ex.size))
        with relu_backward("guided"):
            guided = ex.input_gradient(ex.inputs, target)
        return guided.abs().amax(dim=1) * cam
