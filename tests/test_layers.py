"""Layer discovery and default layers on torchvision architectures (random init)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core import layers

CASES = {
    # name: (number of block outputs, default layer)
    "resnet50": (16, "layer4.2"),
    "resnet18": (8, "layer4.1"),
    "vgg16": (13, "features.29"),
    "densenet121": (4, "features.denseblock4"),
    "mobilenet_v2": (17, "features.18.2"),
    "efficientnet_b0": (16, "features.8.2"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_and_default_layer(name):
    model = getattr(torchvision.models, name)(weights=None)
    blocks, default = CASES[name]
    assert len(layers.block_outputs(model)) == blocks
    assert layers.default_layer(model) == default
    candidates = layers.candidate_layers(model)
    assert default in candidates
    # forward order: a block comes after the convolutions inside it
    modules = dict(model.named_modules())
    assert all(name in modules for name in candidates)
    order = {n: i for i, n in enumerate(candidates)}
    for n in candidates:
        inner = [c for c in candidates if c.startswith(n + ".")]
        assert all(order[c] < order[n] for c in inner)


def test_forward_order_matches_execution_on_resnet18():
    model = torchvision.models.resnet18(weights=None).eval()
    seen = []
    names = layers.candidate_layers(model)
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.append(n))
               for n in names]
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    # downsample convs run after the block's own convs but before the block ends
    assert [n for n in seen if n in {b for b in layers.block_outputs(model)}] == \
        layers.block_outputs(model)
    assert seen.index("layer4.1") == len(seen) - 1


def test_plain_sequential_uses_conv_activations(tiny_cnn, images):
    ex = xw.Explainer(tiny_cnn, images)
    assert ex.block_layers() == ["2", "5"]
    assert ex.default_layer() == "5"
    assert ex.layers() == ["0", "2", "4", "5"]


def test_model_without_convolutions_gets_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    ex = xw.Explainer(model, torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="no convolutional layer"):
        ex.explain("gradcam")
