"""The engine's contract over a zoo of vision transformers and hybrids (timm, torchvision):
every registered method gives a finite map at input resolution that is not flat, or
refuses with a reason; the model, its hooks and torch are exactly as before after every
call; Grad-CAM at the default layer equals an independent token-grid computation (hooks
and a reshape written here from each architecture's known layout).

Random weights, the smallest members in narrow configurations and small inputs keep it
fast. Set ``XAIWIDGETS_ZOO_TABLE=path.json`` to write the table model x method -> ok /
refused (reason), and the default layer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import xaiwidgets as xw
from tests.helpers import assert_model_unchanged, model_snapshot, write_zoo_table

timm = pytest.importorskip("timm")


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _eva() -> nn.Module:
    from timm.models.eva import Eva

    return Eva(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5,
               use_rot_pos_emb=False)


def _torchvision_vit() -> nn.Module:
    model = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                  hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts it at zero
    return model


_SWIN = dict(window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
_VIT = dict(embed_dim=48, depth=2, num_heads=2)

#: model -> (constructor, input size, how its default layer's output is laid out:
#: "tokens" (N, L, D) with the model's prefix tokens first, "nhwc" or "nchw")
ZOO: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "vit_tiny (2 blocks)": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                  depth=2), 32, "tokens"),
    "deit_tiny_distilled (2 blocks)": (_timm("deit_tiny_distilled_patch16_224", img_size=32,
                                             patch_size=8, depth=2), 32, "tokens"),
    "dinov2 with 4 registers (narrow)": (_timm("vit_small_patch14_reg4_dinov2", img_size=56,
                                               **_VIT), 56, "tokens"),
    "eva (narrow, no rope)": (_eva, 32, "tokens"),
    "eva02_tiny (rope, 2 blocks)": (_timm("eva02_tiny_patch14_224", img_size=56, depth=2),
                                    56, "tokens"),
    "swin (tiny's blocks, narrow)": (_timm("swin_tiny_patch4_window7_224", img_size=64,
                                           **_SWIN), 64, "nhwc"),
    "maxvit_nano_rw": (_timm("maxvit_nano_rw_256", img_size=64), 64, "nchw"),
    "coatnet_nano_rw": (_timm("coatnet_nano_rw_224", img_size=64), 64, "nchw"),
    "pvt_v2_b0": (_timm("pvt_v2_b0"), 64, "tokens"),
    "levit_128s": (_timm("levit_128s", img_size=64), 64, "tokens"),
    "mobilevit_xxs": (_timm("mobilevit_xxs"), 64, "nchw"),
    "convnext_atto (NHWC inside)": (_timm("convnext_atto"), 32, "nchw"),
    "torchvision vit (narrow)": (_torchvision_vit, 32, "tokens"),
    "torchvision swin (narrow)": (lambda: tvm.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=[2, 2], num_classes=5), 64, "nhwc"),
}

#: methods that only re-run the forward pass on perturbed or interpolated inputs: what
#: they could change on a model, gradient and occlusion already exercise; they run on
#: two of the models here (all with XAIWIDGETS_ZOO_FULL=1)
SAMPLING = {"integrated_gradients", "smoothgrad", "lime", "meaningful_perturbation"}
SMALL = {"vit_tiny (2 blocks)", "swin (tiny's blocks, narrow)"}
#: methods whose map is clamped (a ReLU of a signed sum; MP's mask in [0, 1]): on random
#: weights a target's map may be all zero (flat) for an image, another target's is not.
#: Grad-CAM must vary for every image under one of the targets, MP for one image (its
#: mask stays at its start where the random model's probabilities do not move)
CLAMPED = {"gradcam", "guided_gradcam", "meaningful_perturbation"}
TABLE: dict[str, dict[str, str]] = {}


def zoo_methods(name: str) -> list[str]:
    if name in SMALL or os.environ.get("XAIWIDGETS_ZOO_FULL") == "1":
        return xw.methods()
    return [m for m in xw.methods() if m not in SAMPLING]


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, size, _ = ZOO[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def independent_gradcam(model: nn.Module, x: torch.Tensor, layer: str, layout: str,
                        target: int) -> torch.Tensor:
    """Grad-CAM (N, h, w) from a forward hook on ``layer`` and a reshape written from the
    architecture's known layout (no xaiwidgets code)."""
    module = model.get_submodule(layer)
    kept: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        score = model(x)[:, target].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, kept[-1])
    act = kept[-1].detach()
    if layout == "tokens":
        prefix = getattr(model, "num_prefix_tokens", None)
        if prefix is None:  # torchvision: one class token; PVT, LeViT: none
            prefix = 1 if hasattr(model, "class_token") else 0
        side = int(round((act.shape[1] - prefix) ** 0.5))
        act, grad = (t[:, prefix:].reshape(len(t), side, side, -1).permute(0, 3, 1, 2)
                     for t in (act, grad))
    elif layout == "nhwc":
        act, grad = act.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * act).sum(dim=1))


def _upsampled(cam: torch.Tensor, size: int) -> torch.Tensor:
    cam = nn.functional.interpolate(cam[:, None], size=(size, size), mode="bilinear",
                                    align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp(min=1e-30), torch.zeros_like(cam))


@pytest.mark.parametrize("name", list(ZOO))
def test_every_method_on_the_transformer_zoo(name):
    model, x = build(name)
    size = x.shape[-1]
    ex = xw.Explainer(model, x, progress=False)
    ex.logits()
    before = model_snapshot(model)
    row = TABLE.setdefault(name, {"default_layer": ex.default_layer()})
    for method in zoo_methods(name):
        targets = range(5) if method in CLAMPED else [3]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                maps = [ex.explain(method, target=t, **xw.get_method(method).quick_params)
                        for t in targets]
            except (ValueError, TypeError) as error:  # a documented refusal
                assert len(str(error)) > 40, f"{method} on {name}: unclear refusal {error!r}"
                assert "nan" not in str(error).lower().split(), error
                row[method] = f"refused: {str(error)[:200]}"
                assert_model_unchanged(model, before, f"{method} on {name}")
                continue
        for result in maps:
            assert result.shape == (2, size, size), f"{method} on {name}: {result.shape}"
            assert torch.isfinite(torch.from_numpy(result.values)).all(), \
                f"{method} on {name}: non-finite map"
        # not flat: every image's map varies (for clamped maps, under at least one target)
        values = torch.stack([torch.from_numpy(r.values).flatten(1).double() for r in maps])
        span = values.amax(dim=2) - values.amin(dim=2)
        varies = (span > 1e-5 * values.abs().amax(dim=2)).any(dim=0)
        assert varies.any() if method == "meaningful_perturbation" else varies.all(), \
            f"{method} on {name}: flat map"
        for result in maps:
            for key in ("conservation_error", "delta_error"):
                if key in result.attrs:
                    assert torch.isfinite(torch.as_tensor(result.attrs[key])).all()
        row[method] = "ok"
        assert_model_unchanged(model, before, f"{method} on {name}")
    write_zoo_table(TABLE)


@pytest.mark.parametrize("name", list(ZOO))
def test_gradcam_reads_the_token_grid(name):
    """Grad-CAM at the default layer equals hooks + the architecture's own reshape: the
    raw (N, h, w) maps, and the normalised maps where they are not near-constant (min-max
    normalisation stretches float rounding there)."""
    from xaiwidgets.families.cam import gradcam_map

    model, x = build(name)
    layout = ZOO[name][2]
    ex = xw.Explainer(model, x, progress=False)
    layer = ex.default_layer()
    for target in (0, 3):
        theirs = independent_gradcam(model, x, layer, layout, target)
        raw = gradcam_map(ex.context, torch.tensor([target] * len(x)), layer)
        torch.testing.assert_close(raw, theirs, atol=1e-4 * float(theirs.abs().max()),
                                   rtol=1e-3)
        ours = torch.from_numpy(ex.explain("gradcam", target=target).values)
        span = theirs.flatten(1).amax(1) - theirs.flatten(1).amin(1)
        wide = span > 1e-3 * theirs.flatten(1).abs().amax(1)
        # min-max normalisation divides the raw maps' float32 disagreement (asserted just
        # above, thread-count dependent) by the span: carry it over instead of a constant
        raw_error = (raw - theirs).flatten(1).abs().amax(1)
        carried = (2 * raw_error / span.clamp(min=1e-30))[wide].max() if wide.any() else 0.0
        torch.testing.assert_close(ours[wide], _upsampled(theirs, x.shape[-1])[wide],
                                   atol=2e-5 + float(carried), rtol=1e-4)
