"""FEM, the FEM stack and MLFEM: hand-worked maps, a textbook re-implementation,
degenerate activations, and proof that parameter changes never re-run the model."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core.ops import minmax
from xaiwidgets.families.fem import fem_map
from xaiwidgets.net import FusionNet

from .conftest import make_tiny_resnet

# docs/methods.md worked examples (K = 1, no upsampling)
F_2x2 = [[[0, 0], [0, 4]], [[2, 2], [2, 2]]]
A_3x3 = [[[0, 0, 0], [0, 4, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 2], [3, 1, 2]]]
MAP_3x3_DDOF0 = [[0, 0, 0], [0, 0.5, 1], [1, 0, 1]]
MAP_3x3_DDOF1 = [[0, 0, 0], [0, 0.5, 0], [1, 0, 0]]


def as_batch(channels) -> torch.Tensor:
    return torch.tensor([channels], dtype=torch.float32)


def reference_fem(activation: np.ndarray, K: float) -> np.ndarray:
    """Textbook FEM, one image and one channel at a time (float64, np.std ddof=0)."""
    out = np.zeros((activation.shape[0],) + activation.shape[2:])
    for i, image in enumerate(activation.astype(np.float64)):
        for channel in image:
            mean, std = channel.mean(), channel.std()
            out[i] += mean * (channel >= mean + K * std)
    return out


def test_worked_example_2x2():
    raw = fem_map(as_batch(F_2x2), K=1.0)
    assert torch.equal(raw, torch.tensor([[[2.0, 2.0], [2.0, 3.0]]]))
    assert torch.equal(minmax(raw), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))


def test_worked_example_3x3_uses_population_std():
    result = minmax(fem_map(as_batch(A_3x3), K=1.0))[0]
    assert torch.allclose(result, torch.tensor(MAP_3x3_DDOF0), atol=1e-6)
    assert not torch.allclose(result, torch.tensor(MAP_3x3_DDOF1), atol=1e-3)


@pytest.mark.parametrize("K", [0.0, 0.5, 1.0, 2.0])
def test_matches_textbook_implementation(K):
    gen = torch.Generator().manual_seed(int(K * 10))
    # post-ReLU-like: many exact zeros, a few dead channels, one constant channel
    activation = torch.relu(torch.randn(3, 16, 9, 7, generator=gen))
    activation[:, 3] = 0.0
    activation[:, 5] = 0.3
    expected = reference_fem(activation.numpy(), K)
    assert np.allclose(fem_map(activation, K).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_zero_variance_and_all_zero_activations():
    constant = torch.full((1, 1, 7, 7), 0.1)
    # a channel equal to its mean everywhere fires everywhere: R = μ = 0.1 exactly
    assert torch.allclose(fem_map(constant), torch.full((1, 7, 7), 0.1))
    # also where a float32 mean of the equal values rounds (0.1 and 7.7 over 56², and
    # 7.7 rounds down: its mean would be above every value and the channel never fire)
    for value in (0.1, 7.7, 0.3):
        big = torch.full((1, 1, 56, 56), value)
        assert big.flatten(2).mean(-1).item() != big[0, 0, 0, 0].item()
        assert torch.equal(fem_map(big), big[:, 0] * 1.0)
    zeros = fem_map(torch.zeros(2, 5, 4, 4))
    assert torch.equal(zeros, torch.zeros(2, 4, 4))
    assert torch.equal(minmax(zeros), torch.zeros(2, 4, 4))  # never NaN


def test_rejects_non_spatial_activation():
    with pytest.raises(ValueError, match="feature map"):
        fem_map(torch.rand(2, 10))


def selector_model(pool: int = 1) -> nn.Module:
    """A 1×1 conv copies input channels 0 and 1 to the 'relu' layer: we set its activation."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = 1.0
    parts = [("select", conv), ("relu", nn.ReLU())]
    if pool > 1:
        parts.append(("pool", nn.MaxPool2d(pool)))
    parts += [("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(2, 2))]
    return nn.Sequential(OrderedDict(parts)).eval()


def image_with_channels(channels) -> torch.Tensor:
    a = torch.tensor(channels, dtype=torch.float32)
    return torch.cat([a, torch.zeros_like(a[:1])])[None]


def test_end_to_end_on_a_controlled_layer():
    ex = xw.Explainer(selector_model(), image_with_channels(A_3x3))
    result = ex.explain("fem", layer="relu")
    assert np.allclose(result.values[0], MAP_3x3_DDOF0, atol=1e-6)
    assert result.attrs["K"] == 1.0 and result.attrs["class_agnostic"] == 1
    # class-agnostic: another target gives the same map
    assert np.array_equal(ex.explain("fem", layer="relu", target=1).values, result.values)


def test_end_to_end_upsampling_is_bilinear_half_pixel():
    # the 2×2 example after a 2×2 max-pool: R normalised is [[0,0],[0,1]]; upsampled
    # ×2 with align_corners=False the 1 spreads as the outer product of [0,.25,.75,1]
    big = np.kron(np.array(F_2x2, dtype=np.float32), np.ones((2, 2), np.float32))
    ex = xw.Explainer(selector_model(pool=2), image_with_channels(big.tolist()))
    profile = np.array([0.0, 0.25, 0.75, 1.0])
    result = ex.explain("fem", layer="pool")
    assert np.allclose(result.values[0], np.outer(profile, profile), atol=1e-6)


def test_dead_layer_gives_zeros_not_nan():
    ex = xw.Explainer(selector_model(), -torch.rand(1, 3, 8, 8))  # ReLU kills everything
    result = ex.explain("fem", layer="relu")
    assert np.array_equal(result.values, np.zeros((1, 8, 8), np.float32))
    stack = ex.fem_stack(layers=["relu"])
    assert not np.isnan(stack.values).any()


def test_default_layer_and_batch(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    result = ex.explain("fem", K=0.5)
    assert result.attrs["layer"] == ex.default_layer()
    # the batched computation equals one image at a time
    for i in range(len(images)):
        single = xw.Explainer(tiny_resnet, images[i:i + 1]).explain("fem", K=0.5)
        assert np.allclose(single.values[0], result.values[i], atol=1e-6)


def test_fem_stack_layers_and_consistency(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    stack = ex.fem_stack(K=1.5)
    assert stack.dims == ("image", "layer", "y", "x")
    assert list(stack.layer.values) == ex.block_layers()
    assert stack.attrs["K"] == 1.5 and stack.attrs["layers"] == ",".join(ex.block_layers())
    assert stack.shape == (2, len(ex.block_layers()), 32, 32)
    assert float(stack.min()) >= 0.0 and float(stack.max()) <= 1.0
    for name in ex.block_layers():
        single = ex.explain("fem", layer=name, K=1.5)
        assert np.allclose(stack.sel(layer=name).values, single.values, atol=1e-6)
    subset = ex.fem_stack(layers=ex.block_layers()[-1:], K=1.5)
    assert subset.sizes["layer"] == 1
    with pytest.raises(ValueError, match="unknown layer"):
        ex.fem_stack(layers=["nope"])


def test_block_rule_resnet50_and_plain_cnn(tiny_cnn):
    resnet = torchvision.models.resnet50()
    blocks = xw.Explainer(resnet, torch.rand(1, 3, 32, 32)).block_layers()
    assert len(blocks) == 16 and blocks[0] == "layer1.0" and blocks[-1] == "layer4.2"
    # plain conv stack: the activation after each convolution
    relus = [n for n, m in tiny_cnn.named_modules() if isinstance(m, nn.ReLU)]
    assert xw.Explainer(tiny_cnn, torch.rand(1, 3, 32, 32)).block_layers() == relus


@contextlib.contextmanager
def count_forward_calls(model: nn.Module):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_parameter_changes_do_not_rerun_the_model(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    with count_forward_calls(tiny_resnet) as calls:
        first = ex.explain("mlfem")
        stack = ex.fem_stack()
        ex.explain("fem")  # its layer is one of the blocks: cached too
        warm = len(calls)
        assert warm >= 1
        results = [ex.explain("mlfem", K=K, operator=op, alpha=alpha, normalize=norm)
                   for K in (0.5, 2.0) for op in ("max", "add", "top", "fem")
                   for alpha in (0.2, 0.8) for norm in ("end", "interleaved")]
        results.append(ex.explain("mlfem", operator="net",
                                  net=FusionNet(len(ex.block_layers()))))
        for K in (0.0, 0.7, 3.0):
            ex.fem_stack(K=K)
            ex.explain("fem", K=K)
        xw.fuse(stack, "top", alpha=0.9)
        assert len(calls) == warm
    assert first.attrs["layers"] == ",".join(ex.block_layers())
    # and a cached result is that of a fresh explainer
    fresh_top = xw.Explainer(tiny_resnet, images).explain("mlfem", K=2.0, operator="top",
                                                           alpha=0.2, normalize="end")
    cached_top = ex.explain("mlfem", K=2.0, operator="top", alpha=0.2, normalize="end")
    assert np.array_equal(fresh_top.values, cached_top.values)


def test_one_shot_fem_runs_the_model_once_on_the_whole_batch(images):
    """A fresh Explainer + FEM (one-shot use: xw.explain, each chunk of xw.evaluate) on
    a model already probed at this input size runs exactly one pass, the method's own;
    a model never seen adds only the construction probe, on one image (#22)."""
    model = make_tiny_resnet()
    batches: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    try:
        first = xw.Explainer(model, images).explain("fem")  # the hook is new: probed
        assert batches == [1, len(images)]
        batches.clear()
        again = xw.Explainer(model, images).explain("fem")
        assert batches == [len(images)]
    finally:
        handle.remove()
    np.testing.assert_array_equal(again.values, first.values)


def test_mlfem_matches_fuse_of_stack_and_records_attrs(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    stack = ex.fem_stack(K=0.8)
    for operator in ("max", "add", "top", "fem"):
        result = ex.explain("mlfem", K=0.8, operator=operator, alpha=0.3,
                            normalize="interleaved")
        fused = xw.fuse(stack, operator, alpha=0.3, normalize="interleaved")
        assert np.allclose(result.values, fused.values, atol=1e-6)
        assert result.attrs["operator"] == operator and result.attrs["alpha"] == 0.3
        assert result.attrs["normalize"] == "interleaved" and result.attrs["K"] == 0.8
        assert result.attrs["layers"] == stack.attrs["layers"]
    # operator "fem" ends with the deepest layer's FEM map
    deepest = ex.explain("fem", layer=ex.block_layers()[-1], K=0.8)
    assert np.allclose(ex.explain("mlfem", K=0.8, operator="fem").values, deepest.values,
                       atol=1e-6)


def test_mlfem_layers_argument_and_errors(tiny_resnet, images):
    ex = xw.Explainer(tiny_resnet, images)
    names = ex.block_layers()
    as_string = ex.explain("mlfem", layers=",".join(names))
    assert np.array_equal(as_string.values, ex.explain("mlfem", layers=names).values)
    assert ex.explain("mlfem", layers=names[:1]).attrs["layers"] == names[0]
    with pytest.raises(ValueError, match="unknown layer"):
        ex.explain("mlfem", layers=["not_a_layer"])
    with pytest.raises(ValueError, match="pass net="):
        ex.explain("mlfem", operator="net")  # no NET ships for this model
    with pytest.raises(ValueError, match="fuses"):
        ex.explain("mlfem", operator="net", net=FusionNet(len(names) + 1))
    with pytest.raises(ValueError):
        ex.explain("mlfem", operator="median")


def test_one_fem_stack_cache_shared_by_fem_stack_fuse_and_mlfem(tiny_resnet, images,
                                                                 monkeypatch):
    from xaiwidgets.families import fem as fem_family

    built = []
    original = fem_family.stack_maps
    monkeypatch.setattr(fem_family, "stack_maps",
                        lambda *a, **k: built.append(a[2]) or original(*a, **k))
    ex = xw.Explainer(tiny_resnet, images)
    stack = ex.fem_stack(K=1.5)
    fused = [xw.fuse(ex.fem_stack(K=1.5), op) for op in ("max", "add", "top")]
    mlfem = ex.explain("mlfem", K=1.5, operator="add")
    assert built == [1.5]  # the stack was built once; every later call re-used it
    np.testing.assert_allclose(mlfem.values, fused[1].values, atol=1e-6)
    stack.values[:] = -1  # a user editing the returned array cannot corrupt the cache
    assert float(ex.fem_stack(K=1.5).min()) >= 0
    ex.fem_stack(K=2.0)
    assert built == [1.5, 2.0]  # a K change re-thresholds the cached activations


# ------------------------------------------------- only after the activation (#22)
def test_layers_before_their_activation_are_refused_naming_the_nearest_after(images):
    from xaiwidgets.families.fem import post_activation

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    ex = xw.Explainer(plain, images, progress=False)
    assert [post_activation(ex.context, n) for n in ("0", "1", "2", "3", "4")] == \
        ["2", "2", None, "4", None]
    with pytest.raises(ValueError, match=r"'0' is a convolution.*layer='2'"):
        ex.explain("fem", layer="0")
    with pytest.raises(ValueError, match=r"layer='4'"):
        ex.fem_stack(layers=["2", "3"])
    assert ex.explain("fem", layer="2").attrs["layer"] == "2"
    # a residual block: its ReLU runs twice, the block's output is the one after it
    resnet = xw.Explainer(make_tiny_resnet(), images, progress=False)
    assert post_activation(resnet.context, "2.conv2") == "2"


def test_fem_before_the_activation_anticorrelates_with_gaze_on_video():
    # why FEM refuses pre-activation layers: on the shipped video model, FEM of the
    # signed stem convolution anti-correlates with the simulated gaze, FEM after its
    # ReLU correlates (24 clips: -0.33 and +0.26, docs/methods.md)
    from xaiwidgets.core.ops import upsample
    from xaiwidgets.evaluation.metrics import pcc

    model, preprocess, _ = xw.models.load("shapes-video")
    clips = xw.datasets.moving_shapes(4, seed=1)
    ex = xw.Explainer(model, torch.as_tensor(clips.image.values), preprocess=preprocess,
                      progress=False)
    gaze = clips.gfdm.values

    def mean_pcc(maps: np.ndarray) -> float:
        return float(np.mean([pcc(maps[i, t], gaze[i, t]) for i in range(len(gaze))
                              for t in range(gaze.shape[1])]))

    signed = upsample(fem_map(ex.activations(["stem.0"])["stem.0"]), ex.context.size)
    assert mean_pcc(signed.numpy()) < -0.2
    assert mean_pcc(ex.explain("fem", layer="stem.2").values) > 0.1
    with pytest.raises(ValueError, match="layer='stem.2'"):
        ex.explain("fem", layer="stem.0")


class FunctionalReluNet(nn.Module):
    """A hand-written net whose ReLUs are functions: no module marks the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu(self.conv1(x))
        x = torch.nn.functional.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def test_signed_features_warn_where_structure_cannot_tell(images):
    import warnings

    from xaiwidgets.families.fem import FEMWarning, negative_share

    # the share is the negative part of the absolute mass (hand-worked)
    assert negative_share(torch.tensor([-1.0, 3.0, 0.0])) == 0.25
    assert negative_share(torch.zeros(3)) == 0.0
    torch.manual_seed(0)
    ex = xw.Explainer(FunctionalReluNet().eval(), images, progress=False)
    conv = ex.activations(["conv2"])["conv2"]
    assert negative_share(conv) > 0.25  # the convolution's output, before F.relu
    with pytest.warns(FEMWarning, match=r"layer 'conv2' is negative"):
        signed = ex.explain("fem", layer="conv2")
    np.testing.assert_allclose(  # the map is still FEM of what the layer gives
        signed.values, minmax(upsample_to(fem_map(conv), ex)).numpy(), atol=1e-6)
    with pytest.warns(FEMWarning):
        ex.fem_stack(layers=["conv1", "conv2"])
    with pytest.warns(FEMWarning):
        ex.channels("conv2", "fem")
    # after a ReLU module, and at an activation module's output, FEM stays silent
    resnet = xw.Explainer(make_tiny_resnet(), images, progress=False)
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    ex_gelu = xw.Explainer(gelu, images * 1e-3, progress=False)  # GELU ~ x/2: signed
    assert negative_share(ex_gelu.activations(["1"])["1"]) > 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error", FEMWarning)
        resnet.explain("fem")
        resnet.fem_stack()
        ex_gelu.explain("fem", layer="1")


def upsample_to(raw: torch.Tensor, ex) -> torch.Tensor:
    from xaiwidgets.core.ops import upsample

    return upsample(raw, ex.context.size)


class SignedBlock(nn.Module):
    """A residual block without a final activation (ConvNeXt-style): signed output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.GELU()
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act(self.conv(x)))


def test_default_layer_moves_inside_a_signed_block_to_its_activation(images):
    import warnings

    from xaiwidgets.families.fem import FEMWarning, inner_activation, negative_share

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SignedBlock(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    ex = xw.Explainer(model, images, progress=False)
    assert ex.default_layer() == "1" and inner_activation(ex.context, "1") == "1.act"
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FEMWarning)
            result = ex.explain("fem")
        assert len(calls) == 1  # the block and its activation came from one pass
    finally:
        handle.remove()
    assert negative_share(ex.activations(["1"])["1"]) > 0.25
    assert result.attrs["layer"] == "1.act"
    expected = minmax(upsample_to(fem_map(ex.activations(["1.act"])["1.act"]), ex))
    np.testing.assert_allclose(result.values, expected.numpy(), atol=1e-6)
    # a block that ends with its activation keeps its output (ResNet's blocks)
    resnet = xw.Explainer(make_tiny_resnet(), images, progress=False)
    assert inner_activation(resnet.context, resnet.default_layer()) is None
    assert resnet.explain("fem").attrs["layer"] == resnet.default_layer()
