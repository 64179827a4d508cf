"""The shipped Vision Transformer ``shapes-vit``: accurate on fresh shapes, offline,
deterministic, timm's ViT to round-off, and a seeded training script."""

from __future__ import annotations

import copy
import functools
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.models import WEIGHTS_DIR
from xaiwidgets.models.architectures import HYBRID_STEM, build
from xaiwidgets.models.train import TEST_SEED, TRAIN_SEED
from xaiwidgets.models.train_vit import train
from xaiwidgets.models.vit import Attention, HybridEmbed, ShapesViT


@pytest.fixture(scope="module")
def fresh_shapes():
    """Images never seen in training (training used seeds >= TRAIN_SEED)."""
    assert 123 < min(TRAIN_SEED, TEST_SEED)
    return xw.datasets.shapes(n=100, seed=123)


@pytest.fixture(scope="module")
def loaded():
    return xw.models.load("shapes-vit")


def test_shapes_vit_ships_and_is_small(loaded) -> None:
    assert "shapes-vit" in xw.models.available()
    assert (WEIGHTS_DIR / "shapes-vit.pt").stat().st_size < 2e6
    assert isinstance(loaded.model, ShapesViT) and not loaded.model.training
    checkpoint = torch.load(WEIGHTS_DIR / "shapes-vit.pt", weights_only=True)
    assert checkpoint["test_accuracy"] >= 0.95 and checkpoint["architecture"] == "shapes-vit"


def test_loads_without_network(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    model, _, classes = xw.models.load("shapes-vit")
    assert isinstance(model, ShapesViT) and len(classes) == 4


def test_accuracy_on_fresh_shapes(loaded, fresh_shapes) -> None:
    model, preprocess, classes = loaded
    assert classes == fresh_shapes.attrs["classes"]
    with torch.no_grad():
        logits = model(preprocess(torch.from_numpy(fresh_shapes.image.values)))
    accuracy = (logits.argmax(1).numpy() == fresh_shapes.label.values).mean()
    assert accuracy >= 0.95, f"shapes-vit: {accuracy:.3f}"


def test_prediction_is_deterministic(loaded, fresh_shapes) -> None:
    again = xw.models.load("shapes-vit")
    x = loaded.preprocess(torch.from_numpy(fresh_shapes.image.values[:8]))
    with torch.no_grad():
        first, second = loaded.model(x), again.model(x)
        assert torch.equal(first, second) and torch.equal(first, loaded.model(x))


def timm_twin(model: ShapesViT) -> nn.Module:
    """timm's ViT (fused attention) of ``model``'s configuration, with its weights."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_hybrid import HybridEmbed as TimmHybridEmbed

    config = dict(img_size=128, embed_dim=96, depth=4, num_heads=3, num_classes=4)
    if isinstance(model.patch_embed, HybridEmbed):
        backbone = copy.deepcopy(model.patch_embed.backbone)
        twin = VisionTransformer(patch_size=1, embed_layer=functools.partial(
            TimmHybridEmbed, backbone=backbone), **config)
    else:
        twin = VisionTransformer(patch_size=16, **config)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def test_same_numbers_as_timm_vision_transformer(loaded, fresh_shapes) -> None:
    """An independent implementation: timm's (hybrid) ViT with our weights."""
    x = loaded.preprocess(torch.from_numpy(fresh_shapes.image.values[:8]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), timm_twin(loaded.model)(x),
                                   atol=1e-4, rtol=1e-4)
        plain = ShapesViT().eval()  # the plain patch embedding too
        torch.testing.assert_close(plain(x), timm_twin(plain)(x), atol=1e-5, rtol=1e-4)


def test_layout_is_the_standard_vit(loaded) -> None:
    model = loaded.model
    embed = model.patch_embed
    assert isinstance(embed, HybridEmbed) and embed.proj.kernel_size == (1, 1)
    assert [name for name, _ in embed.backbone.named_children()] == list(HYBRID_STEM)
    assert sum(type(m).__name__ == "BasicBlock" for m in embed.backbone.modules()) == 6
    assert model.grid_size((128, 128)) == (8, 8)
    assert model.cls_token.shape == (1, 1, 96) and model.pos_embed.shape == (1, 65, 96)
    assert len(model.blocks) == 4
    for block in model.blocks:
        assert isinstance(block.attn, Attention) and isinstance(block.attn.qkv, nn.Linear)
        assert block.attn.num_heads == 3 and block.attn.scale == pytest.approx(32**-0.5)
        assert isinstance(block.mlp.act, nn.GELU)
    assert isinstance(model.norm, nn.LayerNorm) and model.head.out_features == 4


def test_attention_against_softmax_by_hand() -> None:
    torch.manual_seed(0)
    attention = Attention(dim=6, num_heads=2).eval()
    x = torch.randn(2, 5, 6)
    q, k, v = attention.qkv(x).split(6, dim=-1)
    heads = [torch.softmax(q[..., h * 3:(h + 1) * 3] @ k[..., h * 3:(h + 1) * 3].mT / 3**0.5,
                           dim=-1) @ v[..., h * 3:(h + 1) * 3] for h in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(attention(x), attention.proj(torch.cat(heads, dim=-1)))


@pytest.mark.parametrize("model", [ShapesViT(), build("shapes-vit")], ids=["plain", "hybrid"])
def test_wrong_input_size_names_the_fix(model) -> None:
    model.eval()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.rand(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"resize the images to \(128, 128\)"):
        model(torch.rand(1, 3, 64, 64))


def test_training_script_is_seeded_and_loads(tmp_path) -> None:
    kwargs = dict(n_train=16, n_test=8, epochs=1, batch_size=8, threads=1)
    first = train(out=tmp_path / "a.pt", **kwargs)
    second = train(out=tmp_path / "b.pt", **kwargs)
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(value, second["state_dict"][key], rtol=0, atol=0)
    # the patch embedding started as shapes-resnet's first stages (one step moved it a bit)
    resnet = xw.models.load("shapes-resnet").model.state_dict()
    start = first["state_dict"]["patch_embed.backbone.layer3.1.bn2.weight"].float()
    torch.testing.assert_close(start, resnet["layer3.1.bn2.weight"], atol=0.05, rtol=0.05)
    model, _, classes = xw.models.load("shapes-vit", weights=tmp_path / "a.pt")
    assert isinstance(model, ShapesViT) and classes == ["circle", "square", "triangle", "star"]
