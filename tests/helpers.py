"""Helpers shared by several test modules (never imported from a test module):
the engine's model contract (:func:`model_snapshot`, :func:`assert_model_unchanged`),
the lighter snapshots of the safety and widget tests, encoded pictures, the model zoo,
models with a known answer, and comparisons at the display's precision.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from PIL import Image
from torch import nn

from xaiwidgets.widgets.figures import DIGITS, display_values


def assert_display_close(shown: np.ndarray, values: np.ndarray, rtol: float = 1e-4,
                         digits: int = DIGITS) -> None:
    """``shown`` (a figure's values, rounded to ``digits`` significant digits of the
    largest magnitude) equals ``values`` rounded the same way, at the display's own
    precision: values within ``rtol`` (and 1e-5 of the largest) of each other may round
    to neighbouring display steps, so one step more is allowed."""
    scale = float(np.nanmax(np.abs(values))) if np.size(values) else 0.0
    step = 10.0 ** (math.floor(math.log10(scale)) - (digits - 1)) if scale > 0 else 0.0
    np.testing.assert_allclose(shown, display_values(values, digits), rtol=rtol,
                               atol=1e-5 * scale + step * (1 + 1e-6))


# ------------------------------------------------------------------ the contract
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_FLAGS = ("training", "inplace", "eps", "momentum")


def torch_functions() -> dict[str, int]:
    """Identity of everything in torch, torch.nn.functional and torch.Tensor's classes."""
    namespaces = [("torch.", vars(torch)), ("F.", vars(F))]
    namespaces += [(f"{cls.__name__}.", vars(cls)) for cls in torch.Tensor.__mro__]
    return {prefix + name: id(value) for prefix, space in namespaces
            for name, value in space.items()}


def global_hooks() -> list[int]:
    from torch.nn.modules import module

    return [len(getattr(module, name)) for name in dir(module)
            if name.startswith("_global_") and name.endswith("hooks")]


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a call could change on ``model`` or in torch (compared exactly)."""
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "buffers": [(name, id(b)) for name, b in model.named_buffers()],
        "modules": [(name, type(m), id(m)) for name, m in modules],
        "flags": [(name, key, getattr(m, key)) for name, m in modules for key in _FLAGS
                  if key in vars(m)],
        "attributes": [(name, sorted(vars(m))) for name, m in modules],
        "hooks": [(name, key, [(k, id(v)) for k, v in getattr(m, key, {}).items()])
                  for name, m in modules for key in _HOOK_DICTS],
        "torch": torch_functions(),
        "global_hooks": global_hooks(),
        "grads": [name for name, p in model.named_parameters() if p.grad is not None],
    }


def assert_model_unchanged(model: nn.Module, before: dict[str, Any], what: str = "") -> None:
    after = model_snapshot(model)
    for key in before:
        if key == "state":
            continue
        if key == "torch":
            changed = sorted(k for k in before[key] if after[key].get(k) != before[key][k])
            assert not changed, f"{what}: torch functions replaced: {changed[:5]}"
            continue
        assert after[key] == before[key], f"{what}: {key} changed"
    assert after["state"].keys() == before["state"].keys(), f"{what}: state_dict keys changed"
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{what}: {k} changed"


# ------------------------------------------------------------------ lighter snapshots
# the safety tests' model snapshot (state, flags, module types, hook count)
def hook_count(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            total += len(getattr(m, name, {}))
    return total


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [getattr(m, "inplace", None) for m in model.modules()],
        [type(m) for m in model.modules()],
        hook_count(model),
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    state, training, inplace, types, hooks = before
    assert after[4] == hooks, "a hook was left on the model"
    assert after[1] == training, "train/eval flags changed"
    assert after[2] == inplace, "inplace flags changed"
    assert after[3] == types, "modules were replaced"
    assert state.keys() == after[0].keys()
    for key in state:
        assert torch.equal(state[key], after[0][key]), f"{key} changed"
    assert all(p.grad is None for p in model.parameters()), "gradients accumulated on params"


# the widgets' model snapshot (state, training flag, hooks per module)
def state(model: torch.nn.Module) -> tuple:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.training,
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for m in model.modules()])


def assert_untouched(model: torch.nn.Module, before: tuple) -> None:
    params, training, hooks = before
    now = model.state_dict()
    assert now.keys() == params.keys()
    for k, v in params.items():
        assert torch.equal(now[k], v), k
    assert model.training == training
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()] == hooks


# ------------------------------------------------------------------ encoded pictures
def encode(picture: Image.Image, fmt: str = "png", **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def phone_photo(height: int = 3000, width: int = 4000, amplitude: int = 32) -> bytes:
    """A noisy landscape JPEG at quality 95 without chroma subsampling: about 12 MB at
    4000x3000, as a phone takes them (noise keeps it from compressing)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, amplitude, (height, width, 3), dtype=np.uint8)
    pixels += np.linspace(0, 255 - amplitude, width, dtype=np.uint8)[None, :, None]
    return encode(Image.fromarray(pixels), "jpeg", quality=95, subsampling=0)


def halves(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): red left half, blue right half."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2, 0] = 255
    rgb[:, width // 2:, 2] = 255
    return rgb


# ------------------------------------------------------------------ hand-written models
class FunctionalNet(nn.Module):
    """ReLUs, pooling and the flatten as functions, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class HandResidual(nn.Module):
    """A residual block written by hand (``out + identity``), BatchNorms declared out
    of the order they are applied in."""

    def __init__(self) -> None:
        super().__init__()
        self.bn2, self.bn1 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + x
        return self.head(F.relu(out).mean((2, 3)))


def other_activations() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


class OutOfOrder(nn.Module):
    """BatchNorms declared before (and in another order than) the layers they follow,
    and a pre-activation BatchNorm (BatchNorm -> ReLU -> conv, like DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_b, self.norm_a, self.pre = nn.BatchNorm2d(16), nn.BatchNorm2d(8), \
            nn.BatchNorm2d(8)
        self.conv_a, self.conv_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm_a(self.conv_a(x)))
        x = self.conv_b(self.relu(self.pre(x)))
        return self.fc(self.pool(self.relu(self.norm_b(x))).flatten(1))


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine weights (a merge then matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


# ------------------------------------------------------------------ the zoo
def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(tvm, name)(num_classes=10, **kwargs)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


#: model -> (constructor, input size): the smallest member of each torchvision family
#: (narrow configurations of the family's own classes where the constructor allows)
ZOO: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "alexnet": (_tv("alexnet"), 64),
    "vgg11_bn": (_tv("vgg11_bn"), 32),
    "resnet18": (_tv("resnet18"), 32),
    "squeezenet1_1": (_tv("squeezenet1_1"), 48),
    "densenet (121's blocks, narrow)": (lambda: tvm.DenseNet(
        growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10), 32),
    "inception_v3": (_tv("inception_v3", aux_logits=False, init_weights=False), 75),
    "googlenet": (_tv("googlenet", aux_logits=False, init_weights=False), 32),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 32),
    "mobilenet_v2 (width 0.35)": (_tv("mobilenet_v2", width_mult=0.35), 32),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 32),
    "resnext (32x4d, one block per stage)": (lambda: tvm.ResNet(
        tvm.resnet.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4,
        num_classes=10), 32),
    "mnasnet0_5": (_tv("mnasnet0_5"), 32),
    "efficientnet_b0": (_tv("efficientnet_b0"), 32),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 32),
    "convnext (tiny's blocks, narrow)": (lambda: tvm.ConvNeXt(
        [tvm.convnext.CNBlockConfig(16, 32, 1), tvm.convnext.CNBlockConfig(32, 64, 1),
         tvm.convnext.CNBlockConfig(64, None, 1)], num_classes=10), 32),
    "timm/resnet18": (_timm("resnet18"), 32),
    "timm/mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), 32),
    "timm/ghostnet_100": (_timm("ghostnet_100"), 32),
    "timm/convnext_atto": (_timm("convnext_atto"), 32),
    "timm/regnetx_002": (_timm("regnetx_002"), 32),
    "hand/functional_relu": (FunctionalNet, 16),
    "hand/residual_add": (HandResidual, 16),
    "hand/silu_gelu_tanh": (other_activations, 16),
    "hand/batchnorm_out_of_order": (OutOfOrder, 16),
}


# ------------------------------------------------------------------ known answers
class TopLeftTexture(nn.Module):
    """Logit 0 = scale·(texture energy of the top-left quadrant − offset); logit 1 = −logit 0.

    Texture energy = mean absolute deviation from the quadrant's mean colour, so both
    greying a superpixel (LIME) and blurring (meaningful perturbation) remove evidence,
    but only inside the top-left quadrant.
    """

    def __init__(self, scale: float = 10.0, offset: float = 0.12) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q = x[:, :, : h // 2, : w // 2]
        energy = (q - q.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
        s = self.scale * (energy - self.offset)
        return torch.stack([s, -s], dim=1)


def noise_images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def write_zoo_table(table: dict[str, dict[str, str]]) -> None:
    """Write a zoo's table model x method -> outcome to ``$XAIWIDGETS_ZOO_TABLE`` (when
    set), merged into what is there, so the CNN and the transformer zoos share one file."""
    path = os.environ.get("XAIWIDGETS_ZOO_TABLE")
    if not path:
        return
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
    merged.update(table)
    with open(path, "w") as f:
        json.dump(merged, f, indent=1, sort_keys=True)
