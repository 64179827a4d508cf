"""Token grids and attention rollout, each against an independent computation.

* layouts: hand-worked shapes (ViT tokens with class/distillation/register tokens,
  channels-last stages, hierarchical grids), ambiguous layers raise an error naming the
  layer and ``grid=``, which resolves them;
* the default layer of a class-token model is the last block's first norm, because the
  last block's output patch tokens never reach a class-token head (their gradient is
  exactly zero: checked);
* rollout equals Abnar & Zuidema's recursion on the attention weights an unfused copy of
  the model computes (``fused_attn=False``), for every head fusion and a discard ratio,
  and torch's ``nn.MultiheadAttention`` weights (``need_weights=True``);
* reading grids runs no model call after the construction probe; LRP and DeepLIFT refuse
  attention models with the reason; nothing in the model changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import xaiwidgets as xw
from tests.helpers import assert_model_unchanged, model_snapshot
from xaiwidgets.core.tokens import Grid, TokenGridError, layout_of, prefix_tokens

timm = pytest.importorskip("timm")


def vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                   num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False,
                             **{**options, **kwargs}).eval()


def images(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("shape, size, prefix, expected", [
    ((1, 197, 768), (224, 224), 1, Grid("tokens", 1, 14, 14)),       # ViT-B/16
    ((1, 198, 192), (224, 224), 2, Grid("tokens", 2, 14, 14)),       # DeiT distilled
    ((1, 261, 384), (224, 224), 5, Grid("tokens", 5, 16, 16)),       # DINOv2 reg4, /14
    ((1, 3136, 64), (224, 224), 0, Grid("tokens", 0, 56, 56)),       # PVT stage 1
    ((1, 33, 48), (64, 32), 1, Grid("tokens", 1, 8, 4)),             # non-square input
    ((1, 7, 7, 768), (224, 224), 0, Grid("channels_last", 0, 7, 7)),  # Swin stage 4
    ((1, 512, 7, 7), (224, 224), 0, Grid("map")),                    # a CNN
])
def test_layouts_of_hand_worked_shapes(shape, size, prefix, expected):
    assert layout_of(nn.Identity(), "layer", shape, size, prefix=prefix) == expected


def test_a_grid_given_for_every_layer_skips_layers_it_does_not_fit():
    assert layout_of(nn.Identity(), "a", (1, 50, 8), (28, 28), grid=(7, 7)) == Grid(
        "tokens", 1, 7, 7)
    assert layout_of(nn.Identity(), "b", (1, 196, 8), (28, 28), grid=(7, 7)) is None
    assert layout_of(nn.Identity(), "b", (1, 196, 8), (28, 28), grid={"b": (14, 14)}) == Grid(
        "tokens", 0, 14, 14)


def test_to_map_keeps_the_patch_tokens_in_row_major_order():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # 1 + 2x3
    fmap = Grid("tokens", 1, 2, 3).to_map(tokens)
    assert fmap.shape == (2, 3, 2, 3)
    assert torch.equal(fmap[1, 2, 1, 0], tokens[1, 1 + 1 * 3 + 0, 2])
    nhwc = torch.rand(2, 4, 5, 6)
    assert torch.equal(Grid("channels_last").to_map(nhwc)[:, 2, 3, 4], nhwc[:, 3, 4, 2])


def test_prefix_tokens_from_the_model():
    assert prefix_tokens(vit()) == 1
    assert prefix_tokens(vit(reg_tokens=4)) == 5
    tv = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                               hidden_dim=16, mlp_dim=16, num_classes=5)
    assert prefix_tokens(tv) == 1  # its class_token parameter
    assert prefix_tokens(nn.Conv2d(3, 3, 1)) == 0


class SquareTokens(nn.Module):
    """Channels-last (N, 4, 4, 4) stage output: C equals h and w, so the shape alone
    reads both ways, and the block holds both a convolution and a layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 8, stride=8)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), Permute(), nn.LayerNorm(4))
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(1, 2)))


class Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_an_ambiguous_layer_names_itself_and_grid_and_grid_resolves_it():
    model, x = SquareTokens().eval(), images()
    ex = xw.Explainer(model, x, progress=False)
    with pytest.raises(TokenGridError, match=r"'block'.*grid=.*'channels_last'") as error:
        ex.explain("gradcam", layer="block")
    assert "channels-last" in str(error.value)
    with pytest.raises(ValueError, match="'channels_last' or 'channels_first'"):
        xw.Explainer(model, x, progress=False, grid={"block": "nhwc"}).layers()
    fixed = xw.Explainer(model, x, progress=False, grid={"block": "channels_last"})
    assert fixed.context.layer_grid("block") == Grid("channels_last", 0, 4, 4)
    act, grad = fixed.context.layer_gradient("block", torch.tensor([1, 1]))
    assert act.shape == (2, 4, 4, 4)
    with torch.no_grad():
        direct = model.block(model.stem(x)).permute(0, 3, 1, 2)
    torch.testing.assert_close(act, direct)


class UnknownTokens(nn.Module):
    """17 tokens on 32² inputs and no class-token parameter: 1 + 4x4 or 17 patches?"""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 5)
        self.num_prefix_tokens = 1  # say it has one, then check 17 = 1 + 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2))
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        tokens = self.block(tokens + self.attn(tokens, tokens, tokens)[0])
        return self.head(tokens[:, 0])


def test_a_token_model_that_does_not_fit_its_input_size_says_how_to_give_the_grid():
    model = UnknownTokens().eval()
    ex = xw.Explainer(model, images(32), progress=False)
    assert ex.context.layer_grid("block") == Grid("tokens", 1, 4, 4)
    model.num_prefix_tokens = 3  # a wrong count: 14 tokens fit no 32x32 grid, 17 neither
    ex = xw.Explainer(model, images(32), progress=False)
    with pytest.raises(TokenGridError, match=r"'block'.*grid="):
        ex.explain("fem", layer="block")
    fixed = xw.Explainer(model, images(32), progress=False, grid=(4, 4))
    assert fixed.explain("fem", layer="block").shape == (2, 32, 32)


# ------------------------------------------------------------------ default layers
def test_class_token_default_is_the_last_blocks_first_norm_because_its_output_is_unread():
    model, x = vit(), images()
    ex = xw.Explainer(model, x, progress=False)
    assert ex.default_layer() == "blocks.2.norm1"
    assert ex.block_layers() == ["blocks.0", "blocks.1", "blocks.2"]
    assert "blocks.2.norm1" in ex.layers()
    # the last block's output patch tokens never reach the class-token head: zero gradient
    _, grad = ex.context.layer_gradient("blocks.2", torch.tensor([1, 1]))
    assert torch.count_nonzero(grad) == 0
    assert ex.explain("gradcam", layer="blocks.2").attrs["informative"].tolist() == [0, 0]
    _, grad = ex.context.layer_gradient("blocks.2.norm1", torch.tensor([1, 1]))
    assert torch.count_nonzero(grad) > 0
    stack = ex.fem_stack()
    assert stack.sizes["layer"] == 3 and stack.sizes["y"] == 32


def test_global_pool_models_default_to_the_last_block():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5,
                             img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1)).eval()
    ex = xw.Explainer(swin, images(64), progress=False)
    assert ex.default_layer() == "layers.3.blocks.0"
    assert ex.context.layer_grid("layers.3.blocks.0") == Grid("channels_last", 0, 2, 2)


def test_reading_grids_runs_no_model_call_after_the_probe():
    model = vit()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        ex = xw.Explainer(model, images(), progress=False)
        probe = len(calls)
        ex.layers(), ex.block_layers(), ex.default_layer(), ex.context.grids()
        assert len(calls) == probe == 1
        ex.explain("gradcam")
        assert len(calls) == 2  # Grad-CAM's own pass, nothing else
    finally:
        handle.remove()


# ------------------------------------------------------------------ rollout
def unfused_rollout(model: nn.Module, x: torch.Tensor, fusion: str, discard: float,
                    prefix: int) -> torch.Tensor:
    """Abnar & Zuidema on the attention weights an unfused copy computes (N, L-prefix):
    the class token's row, or without one the mean row."""
    copy_ = copy.deepcopy(model)
    weights: list[torch.Tensor] = []
    for block in copy_.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: weights.append(out))
    with torch.no_grad():
        copy_(x)
    rollout = None
    for attention in weights:
        fused = {"mean": attention.mean(1), "max": attention.amax(1),
                 "min": attention.amin(1)}[fusion]
        if discard:
            for image in range(len(fused)):
                patch = fused[image, prefix:, prefix:]
                flat = patch.flatten()
                drop = int(flat.numel() * discard)
                flat[flat.argsort()[:drop]] = 0
                fused[image, prefix:, prefix:] = flat.view_as(patch)
        fused = fused + torch.eye(fused.shape[-1])
        fused = fused / fused.sum(-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    rows = rollout[:, 0] if prefix else rollout.mean(dim=1)
    return rows[:, prefix:]


def _normalised(rows: torch.Tensor, side: int, size: int) -> torch.Tensor:
    maps = nn.functional.interpolate(rows.reshape(-1, 1, side, side), size=(size, size),
                                     mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    return (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low)


@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.0), ("min", 0.0),
                                             ("mean", 0.6)])
def test_rollout_equals_the_recursion_on_unfused_attention(fusion, discard):
    model, x = vit(reg_tokens=2), images()
    assert all(block.attn.fused_attn for block in model.blocks)  # fused kernels stay on
    before = model_snapshot(model)
    ours = xw.explain(model, x, "attention_rollout", head_fusion=fusion,
                      discard_ratio=discard)
    assert_model_unchanged(model, before, "rollout")
    assert ours.attrs["head_fusion"] == fusion and ours.attrs["discard_ratio"] == discard
    theirs = _normalised(unfused_rollout(model, x, fusion, discard, prefix=3), 4, 32)
    torch.testing.assert_close(torch.from_numpy(ours.values), theirs, atol=1e-4, rtol=1e-4)


def test_rollout_without_a_class_token_reads_the_mean_row():
    model, x = vit(class_token=False, global_pool="avg"), images()
    assert prefix_tokens(model) == 0
    ex = xw.Explainer(model, x, progress=False)
    assert ex.default_layer() == "blocks.2"  # a pooled head reads every output token
    ours = ex.explain("attention_rollout", discard_ratio=0.3)
    theirs = _normalised(unfused_rollout(model, x, "mean", 0.3, prefix=0), 4, 32)
    torch.testing.assert_close(torch.from_numpy(ours.values), theirs, atol=1e-4, rtol=1e-4)


def test_rollout_applies_eva02_rotary_embeddings_like_the_model():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=5,
                              img_size=56, depth=2).eval()
    x = images(56)
    ours = xw.explain(model, x, "attention_rollout", discard_ratio=0.2)
    theirs = _normalised(unfused_rollout(model, x, "mean", 0.2, prefix=1), 4, 56)
    torch.testing.assert_close(torch.from_numpy(ours.values), theirs, atol=1e-4, rtol=1e-4)


def test_rollout_reads_torch_multihead_attention():
    torch.manual_seed(0)
    model = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                  hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    x = images()
    ours = xw.explain(model, x, "attention_rollout")
    weights = []
    with torch.no_grad():
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + model.encoder.pos_embedding
        for layer in model.encoder.layers:
            normed = layer.ln_1(tokens)
            out, attention = layer.self_attention(normed, normed, normed, need_weights=True,
                                                  average_attn_weights=True)
            weights.append(attention)
            tokens = tokens + out
            tokens = tokens + layer.mlp(layer.ln_2(tokens))
    rollout = None
    for attention in weights:
        fused = attention + torch.eye(attention.shape[-1])
        fused = fused / fused.sum(-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    theirs = _normalised(rollout[:, 0, 1:], 4, 32)
    torch.testing.assert_close(torch.from_numpy(ours.values), theirs, atol=1e-4, rtol=1e-4)


def test_rollout_costs_one_pass_and_fills_the_prediction_cache():
    model = vit()
    ex = xw.Explainer(model, images(), progress=False)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = ex.explain("attention_rollout")
        ex.predict()
    finally:
        handle.remove()
    assert len(calls) == 1
    assert result.attrs["target"].tolist() == ex.logits().argmax(1).tolist()


@pytest.mark.parametrize("name, kwargs, reason", [
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=24,
                                          depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
     "local windows"),
    ("pvt_v2_b0", {}, "spatial-reduction"),
    ("levit_128s", dict(img_size=64), "attention biases"),
    ("mobilevit_xxs", {}, "unfolded patches"),
    ("resnet18", {}, "no attention module"),
])
def test_rollout_refuses_with_the_reason(name, kwargs, reason):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = images(kwargs.get("img_size", 64), n=1)
    ex = xw.Explainer(model, x, progress=False)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=reason):
        ex.explain("attention_rollout")
    assert_model_unchanged(model, before, f"rollout on {name}")


@pytest.mark.parametrize("method", ["lrp", "deeplift"])
def test_propagation_rules_refuse_attention_models_instead_of_nan(method):
    model = vit()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="self-attention.*AttnLRP"):
        xw.explain(model, images(), method)
    assert_model_unchanged(model, before, method)


def test_rollout_in_threads_equals_serial():
    from concurrent.futures import ThreadPoolExecutor

    model, x = vit(), images()
    serial = xw.explain(model, x, "attention_rollout", head_fusion="max").values
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: xw.explain(model, x, "attention_rollout",
                                                     head_fusion="max").values, range(4)))
    for result in results:
        assert (result == serial).all()


@pytest.mark.parametrize("build", [
    lambda: vit(),
    lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                  hidden_dim=16, mlp_dim=16, num_classes=5),
])
def test_an_input_size_the_patch_embedding_rejects_says_how_to_fix_it(build):
    model = build().eval()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"built for 32×32 inputs and rejects 48×48.*img_size"):
        xw.Explainer(model, images(48))
    assert_model_unchanged(model, before, "a rejected size")
