"""The engine's contract over a zoo: every registered method on the 15 torchvision
families, a set of timm CNNs and hand-written models leaves the model, its hooks and
torch itself exactly as before, whether the call succeeds, refuses or fails.

Random weights, small inputs and the methods' quick parameters keep it within CI's
time. Set ``XAIWIDGETS_ZOO_TABLE=path.json`` to write the table model x method ->
ok / refused (reason) and LRP's rule per layer type.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

import xaiwidgets as xw

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

TABLE: dict[str, dict[str, str]] = {}

#: methods that only run the model forward on perturbed or interpolated inputs, through
#: the same guarded pass as ``gradient``: what they could change on a model, gradient and
#: occlusion already exercise. CI runs them on the small models; XAIWIDGETS_ZOO_FULL=1 runs
#: every method on every model (about 20 min on 2 cores).
SAMPLING = {"integrated_gradients", "smoothgrad", "lime", "meaningful_perturbation"}
SMALL = {"resnet18", "vgg11_bn", "densenet (121's blocks, narrow)", "mobilenet_v3_small",
         "timm/resnet18", "hand/functional_relu", "hand/residual_add",
         "hand/silu_gelu_tanh", "hand/batchnorm_out_of_order"}


def zoo_methods(name: str) -> list[str]:
    """Every registered method on the small models (or with XAIWIDGETS_ZOO_FULL=1), the
    structural ones (all but :data:`SAMPLING`) on the others."""
    if name in SMALL or os.environ.get("XAIWIDGETS_ZOO_FULL") == "1":
        return xw.methods()
    return [m for m in xw.methods() if m not in SAMPLING]


def _write_table() -> None:
    path = os.environ.get("XAIWIDGETS_ZOO_TABLE")
    if path:
        with open(path, "w") as f:
            json.dump(TABLE, f, indent=1, sort_keys=True)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_method_leaves_the_zoo_untouched(name):
    build, size = ZOO[name]
    torch.manual_seed(0)
    model = randomise_batchnorms(build().eval())
    for m in model.modules():  # like a user's model: in-place activations where allowed
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish)):
            m.inplace = True
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    ex = xw.Explainer(model, x)
    ex.logits()
    before = model_snapshot(model)
    row = TABLE.setdefault(name, {})
    # .ci/run's second pass (zennit 1.0) sets XAIWIDGETS_ZOO_METHODS=lrp
    chosen = os.environ.get("XAIWIDGETS_ZOO_METHODS")
    for method in chosen.split(",") if chosen else zoo_methods(name):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = ex.explain(method, target=3, **xw.get_method(method).quick_params)
            except (ValueError, TypeError) as error:  # a documented refusal
                assert len(str(error)) > 20, f"{method} on {name}: unclear refusal {error!r}"
                row[method] = f"refused: {str(error)[:160]}"
            else:
                assert result.shape == (1, size, size)
                assert torch.isfinite(torch.from_numpy(result.values)).all(), \
                    f"{method} on {name}: non-finite map"
                row[method] = "ok"
                if method == "lrp":
                    row["lrp_rules"] = result.attrs["lrp_rules"]
                    row["lrp_unseen"] = result.attrs["lrp_unseen"]
                    row["lrp_conservation_error"] = float(result.attrs["conservation_error"][0])
        notes = sorted({str(w.message)[:120] for w in caught
                        if issubclass(w.category, UserWarning)})
        if notes:
            row[method] += f" (warns: {len(notes)})"
        row[method] += f" [{time.perf_counter() - start:.2f}s]"
        assert_model_unchanged(model, before, f"{method} on {name}")
    _write_table()


@pytest.mark.parametrize("name", ["resnet18", "densenet (121's blocks, narrow)",
                                  "hand/batchnorm_out_of_order"])
def test_lrp_failures_inside_canonizers_and_rules_leave_the_zoo_untouched(name, monkeypatch):
    from zennit import rules
    from zennit.torchvision import ResNetBasicBlockCanonizer

    from xaiwidgets.families import lrp

    build, size = ZOO[name]
    torch.manual_seed(0)
    model = randomise_batchnorms(build().eval())
    x = torch.rand(1, 3, size, size)
    before = model_snapshot(model)
    calls = {"merge": 0}
    real_merge = lrp.merge_batchnorm

    def failing_merge(layer, norm):
        calls["merge"] += 1
        if calls["merge"] == 2:  # one merge done, the second fails
            raise RuntimeError("injected merge failure")
        real_merge(layer, norm)

    def failing_rule(self, module, grad_input, grad_output):
        raise RuntimeError("injected rule failure")

    def failing_block(self, module, name_):
        raise RuntimeError("injected canonizer failure")

    for target, attribute, replacement, message in [
        (lrp, "merge_batchnorm", failing_merge, "merge"),
        (rules.ZPlus, "backward", failing_rule, "rule"),
        (rules.Pass, "backward", failing_rule, "rule"),
        (ResNetBasicBlockCanonizer, "register", failing_block, "canonizer"),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, replacement)
            try:
                xw.explain(model, x, "lrp", target=1)
            except RuntimeError as error:
                assert f"injected {message} failure" in str(error)
        assert_model_unchanged(model, before, f"lrp with a failing {message}")
    # and the model still works, with the same maps as a fresh copy would give
    fresh = randomise_batchnorms(build().eval())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(xw.explain(model, x, "lrp", target=1).values,
                               xw.explain(fresh, x, "lrp", target=1).values)
