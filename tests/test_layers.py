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
    "densenet121": (7, "features.denseblock4"),  # dense blocks and transitions
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


# every torchvision family and timm CNN: 2–40 FEM layers, and a default layer found by
# shape (the last feature map of at least 2×2 before global pooling), at a small size
TORCHVISION = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet",
               "inception_v3", "mnasnet0_5", "mobilenet_v3_small", "regnet_y_400mf",
               "resnet18", "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11"]
TIMM = ["ghostnet_100", "inception_v3", "mobilenetv3_small_100", "vgg11_bn"]


def tv_model(name: str) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name in (
        "googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


def timm_model(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False).eval()


def check_layers_by_shape(model: nn.Module, size: int) -> xw.Explainer:
    ex = xw.Explainer(model, torch.rand(1, 3, size, size))
    shapes = ex.context.shapes()
    blocks = ex.block_layers()
    assert 2 <= len(blocks) <= 40, blocks
    assert all(len(shapes[b]) == 4 for b in blocks)  # every FEM layer ran: a feature map
    default = ex.default_layer()
    assert shapes[default][-2] >= 2 and shapes[default][-1] >= 2, (default, shapes[default])
    # nothing later in the pass (a conv, activation or block) still has ≥ 2×2 output
    modules = dict(model.named_modules())
    order = list(shapes)
    later = [n for n in order[order.index(default) + 1:]
             if isinstance(modules[n], (nn.Conv2d, nn.ReLU, nn.SiLU, nn.Hardswish))
             and not any(n.startswith(b + ".") for b in blocks) or n in blocks]
    assert all(shapes[n][-2:] < (2, 2) or len(shapes[n]) != 4 for n in later), later
    assert default in ex.layers()
    return ex


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_families_layers_by_shape(name):
    check_layers_by_shape(tv_model(name), 96 if "inception" in name else 64)


@pytest.mark.parametrize("name", TIMM)
def test_timm_cnns_layers_by_shape(name):
    model = timm_model(name)
    ex = check_layers_by_shape(model, 96 if "inception" in name else 64)
    # the post-pooling 1×1 head (conv_head/act2, pre_logits) is never the default
    assert not ex.default_layer().startswith(("conv_head", "act2", "pre_logits"))
    if name == "mobilenetv3_small_100":  # its FEM map was flat at the old default
        fem = ex.explain("fem")
        assert fem.attrs["informative"].all() and float(fem.std()) > 0


def test_inception_stacks_are_inception_modules():
    counts, defaults = {}, {}
    for name in ("googlenet", "inception_v3"):
        model = tv_model(name)
        ex = xw.Explainer(model, torch.rand(1, 3, 96, 96))
        kinds = {type(dict(model.named_modules())[b]).__name__ for b in ex.block_layers()}
        assert all(k.startswith("Inception") for k in kinds), kinds
        counts[name] = len(ex.block_layers())
        defaults[name] = ex.default_layer()
    assert counts == {"googlenet": 9, "inception_v3": 11}  # 3a..5b; Mixed_5b..7c
    # at 96 px Mixed_7a's output is 1×1: the last module output of 4×4, not a conv in it
    assert defaults == {"googlenet": "inception5b", "inception_v3": "Mixed_6e"}


def test_default_layer_follows_the_input_size():
    # at 32×32 ResNet-18's last stage is 1×1: the default moves up to the last 2×2 map
    model = torchvision.models.resnet18(weights=None).eval()
    assert xw.Explainer(model, torch.rand(1, 3, 64, 64)).default_layer() == "layer4.1"
    small = xw.Explainer(model, torch.rand(1, 3, 32, 32))
    assert small.default_layer() == "layer3.1"
    assert small.context.shapes()["layer3.1"][-2:] == (2, 2)


def test_tiny_inputs_without_a_2x2_map_get_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    ex = xw.Explainer(model, torch.rand(1, 3, 3, 3))
    with pytest.raises(ValueError, match="at least 2×2.*layer="):
        ex.explain("gradcam")


def test_s3d_default_is_the_last_inception_block_not_a_branch_conv():
    # S3D's SepInceptionBlock3D concatenates four branches: the block output is the
    # feature map (a branch's last conv sees a quarter of the channels). Built only:
    # a pass needs ≥ 16×224² (its average pool is 2×7×7), too slow for the suite
    model = torchvision.models.video.s3d(weights=None)
    blocks = layers.block_outputs(model)
    assert blocks == [f"features.{i}" for i in (5, 6, 8, 9, 10, 11, 12, 14, 15)]
    assert layers.default_layer(model) == "features.15"
    candidates = layers.candidate_layers(model)
    assert "features.15" in candidates and "features.15.branch3.1.2" not in candidates
    assert "features.15.branch0.0" in candidates  # its 3-D convolutions are offered too
