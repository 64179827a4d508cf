"""Layer discovery: which named modules make sense as ``layer=...`` and the defaults.

Rules (documented for users, used by :meth:`Explainer.layers`):

* candidate layers are convolutions, and the *block outputs*: residual blocks
  (torchvision ``BasicBlock``/``Bottleneck``, timm-style blocks, anything whose
  class name ends in ``Block``/``Bottleneck``) and, for plain conv stacks, the
  activation (ReLU-like) or pooling module that follows each convolution;
* the default layer for CAM/FEM is the last block output (the last convolutional
  block, as in Grad-CAM);
* the FEM stack of MLFEM uses every residual block output when the model has
  residual blocks, else every conv block's output (the activation after each conv),
  else every candidate layer that is not a bare convolution.
"""

from __future__ import annotations

from torch import nn

from .ops import close_matches

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.PReLU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def is_residual_block(module: nn.Module) -> bool:
    """True for ResNet-style blocks (by class name, which covers torchvision and timm)."""
    name = type(module).__name__
    return name.endswith(("Block", "Bottleneck", "MBConv")) or name == "InvertedResidual"


def _ordered_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n]


def block_outputs(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are 'blocks', shallowest first.

    Residual blocks when the model has any (nested blocks are skipped: only the
    outermost counts), else the activation after each convolution (plain nets).
    """
    named = _ordered_named_modules(model)
    blocks: list[str] = []
    for name, module in named:
        if is_residual_block(module) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if blocks:
        return blocks
    return conv_activations(model)


def conv_activations(model: nn.Module) -> list[str]:
    """For plain conv stacks: the first activation module after each convolution."""
    named = _ordered_named_modules(model)
    out: list[str] = []
    pending = False
    for name, module in named:
        if isinstance(module, nn.Conv2d):
            pending = True
        elif pending and isinstance(module, _ACTIVATIONS):
            out.append(name)
            pending = False
    return out


def candidate_layers(model: nn.Module) -> list[str]:
    """Every layer usable as ``layer=`` in forward (definition) order:
    convolutions and block outputs."""
    blocks = set(block_outputs(model)) | {default_layer(model)}
    named = _ordered_named_modules(model)
    # a block's output comes after everything inside it: sort by its last descendant
    last_position = {}
    for position, (name, _) in enumerate(named):
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            last_position[".".join(parts[:depth])] = position
    chosen = [name for name, module in named if isinstance(module, nn.Conv2d) or name in blocks]
    return sorted(chosen, key=lambda name: (last_position[name], -name.count(".")))


def default_layer(model: nn.Module) -> str:
    """The last convolutional block's output (Grad-CAM and FEM default).

    That is the last block output, unless a convolution follows it (the 1×1 head
    convolution of MobileNet/EfficientNet): then the activation after that convolution.
    """
    named = _ordered_named_modules(model)
    position = {name: i for i, (name, _) in enumerate(named)}
    blocks = block_outputs(model)
    activations = conv_activations(model)
    if blocks and activations and position[activations[-1]] > position[blocks[-1]]:
        # a head conv after the last block; its activation is the deepest feature map
        last_block_end = max(i for i, (n, _) in enumerate(named)
                             if n == blocks[-1] or n.startswith(blocks[-1] + "."))
        if position[activations[-1]] > last_block_end:
            return activations[-1]
    if blocks:
        return blocks[-1]
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            "the model has no convolutional layer; layer-based methods (gradcam, fem...) "
            "need a CNN. Pass layer=<module name> explicitly if your model is unusual."
        )
    return convs[-1]


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The module called ``layer``; an unknown name gets a list of close matches."""
    if isinstance(layer, str) and layer:
        # a walk down the dotted path: MLFEM resolves 16 names on every slider change,
        # and listing all named modules each time cost milliseconds
        try:
            return model.get_submodule(layer)
        except AttributeError:
            pass
    modules = dict(model.named_modules())
    options = candidate_layers(model)
    close = close_matches(str(layer), options) or close_matches(str(layer), list(modules))
    raise ValueError(
        f"unknown layer {layer!r}. Close matches: {close or 'none'}. "
        f"Explainer.layers() lists the usable layers (e.g. {options[-3:]})."
    )
