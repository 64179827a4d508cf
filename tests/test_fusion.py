"""MLFEM fusion: docs/methods.md's worked example, operator identities, the order of
normalisation, the closed-form add weights, and the NET operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import xaiwidgets as xw
from xaiwidgets import fusion
from xaiwidgets import net as net_runtime
from xaiwidgets.core.ops import upsample
from xaiwidgets.fusion import fold, fuse_maps
from xaiwidgets.models import train_net
from xaiwidgets.models.train_net import fit
from xaiwidgets.net import FusionNet, apply_net, load_net, save_net

A = torch.tensor([[0.0, 1.0], [0.5, 0.2]])
B = torch.tensor([[1.0, 0.0], [0.2, 0.6]])
EXPECTED = {  # docs/methods.md, alpha = 0.5
    "max": [[1.0, 1.0], [0.5, 0.6]],
    "add": [[0.5, 0.5], [0.35, 0.4]],
    "top": [[0.5, 0.5], [0.25, 0.4]],
    "fem": [[1.0, 0.0], [0.2, 0.6]],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_worked_example(name):
    result = fusion.OPERATORS[name](A, B, 0.5)
    assert torch.allclose(result, torch.tensor(EXPECTED[name]))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fuse_two_maps_normalises_at_the_end(name):
    stack = torch.stack([A, B])[None]  # (1, L=2, 2, 2)
    expected = np.array(EXPECTED[name])
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert np.allclose(fuse_maps(stack, name).numpy()[0], expected, atol=1e-6)


def random_stack(n=2, layers=4, size=6, seed=0) -> torch.Tensor:
    return torch.rand(n, layers, size, size, generator=torch.Generator().manual_seed(seed))


def test_operator_properties():
    maps = random_stack()
    same = maps[:, :1].expand(-1, 4, -1, -1)
    assert torch.equal(fold(same, "max"), maps[:, 0])  # max of identical maps
    assert torch.allclose(fold(same, "add", 0.3), maps[:, 0])  # weights sum to 1
    assert torch.equal(fold(maps, "add", 1.0), maps[:, 0])  # α = 1 keeps the first map
    assert torch.equal(fold(maps, "add", 0.0), maps[:, -1])  # α = 0 keeps the last one
    assert torch.equal(fold(maps, "fem"), maps[:, -1])
    assert torch.equal(fold(maps, "max"), maps.amax(dim=1))
    # top keeps b strictly above its per-image mean and zeroes the rest
    b = maps[:, 1]
    kept = fusion.top(torch.zeros_like(b), b, alpha=0.0)
    above = b > b.mean(dim=(-2, -1), keepdim=True)
    assert torch.equal(kept[above], b[above]) and torch.all(kept[~above] == 0)
    assert 0 < int(above.sum()) < above.numel()


def test_add_weights_closed_form():
    L, alpha = 5, 0.3
    one_hot = torch.eye(L).reshape(L, L, 1, 1).permute(1, 0, 2, 3).reshape(1, L, L, 1)
    # pixel l is 1 in layer l only, so the fused pixel l is layer l's weight
    weights = fold(one_hot, "add", alpha)[0, :, 0].double().numpy()
    expected = [alpha**4, alpha**3 * 0.7, alpha**2 * 0.7, alpha * 0.7, 0.7]
    assert np.allclose(weights, expected)
    assert np.isclose(weights.sum(), 1.0)
    assert np.allclose(fusion.add_weights(L, alpha), expected)
    # the paper's sentence Σ α(1−α)^(l−1) S_l would give other weights
    assert not np.allclose(weights, [alpha * (1 - alpha) ** (k - 1) for k in range(1, L + 1)])


def test_interleaved_differs_from_end():
    # 1×3 maps, add with α = 0.5, worked by hand:
    # end: 0.25·S1 + 0.25·S2 + 0.5·S3 = [0.5, 0.25, 0.5] → [1, 0, 1]
    # interleaved: add(S1, S2) = [0, .5, .5] → [0, 1, 1]; add(·, S3) = [.5, .5, .75] → [0, 0, 1]
    stack = torch.tensor([[[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.5]]]])
    assert torch.allclose(fuse_maps(stack, "add", 0.5, "end"), torch.tensor([[[1.0, 0, 1]]]))
    assert torch.allclose(fuse_maps(stack, "add", 0.5, "interleaved"),
                          torch.tensor([[[0.0, 0, 1]]]))


def test_fuse_dataarray_and_errors():
    maps = random_stack(layers=3)
    stack = xr.DataArray(maps.numpy(), dims=("image", "layer", "y", "x"),
                         coords={"layer": ["a", "b", "c"]}, attrs={"K": 1.5, "layers": "a,b,c"})
    fused = xw.fuse(stack, operator="top", alpha=0.7, normalize="interleaved")
    assert fused.dims == ("image", "y", "x") and fused.dtype == np.float32
    assert fused.attrs["K"] == 1.5 and fused.attrs["layers"] == "a,b,c"
    assert fused.attrs["operator"] == "top" and fused.attrs["alpha"] == 0.7
    assert np.allclose(fused.values, fuse_maps(maps, "top", 0.7, "interleaved").numpy())
    # dims order does not matter for a labelled stack; a plain tensor works too
    assert np.allclose(xw.fuse(stack.transpose("layer", "x", "image", "y")).values,
                       xw.fuse(maps).values)
    with pytest.raises(ValueError, match="unknown operator"):
        xw.fuse(stack, operator="median")
    with pytest.raises(ValueError, match="normalize"):
        xw.fuse(stack, normalize="never")
    with pytest.raises(ValueError, match="pass net="):
        xw.fuse(stack, operator="net")  # no model recorded: no shipped NET applies
    with pytest.raises(ValueError, match="dims"):
        xw.fuse(stack.rename(layer="channel"))


def test_net_architecture():
    L = 3
    net = FusionNet(L)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 6, (3, 3)), (6, 12, (3, 3)), (12, 24, (3, 3)), (24, 1, (1, 1))]
    x = random_stack(layers=L, size=32)
    assert net.features(x).shape == (2, 24, 8, 8)  # spatial /4, depth ×8
    out = net(x)
    assert out.shape == (2, 32, 32) and bool(((out > 0) & (out < 1)).all())
    assert torch.equal(fuse_maps(x, "net", net=net), apply_net(net, x))
    with pytest.raises(ValueError, match="3 maps"):
        net(random_stack(layers=4))


def test_net_save_load_roundtrip(tmp_path):
    net = FusionNet(2)
    save_net(net, tmp_path / "net.pt", layers=["a", "b"], K=1.0)
    loaded = load_net(tmp_path / "net.pt")
    x = random_stack(layers=2, size=16)
    assert torch.equal(apply_net(loaded, x), apply_net(net, x))
    assert loaded.meta["layers"] == ["a", "b"]


def mean_pcc(maps: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of numpy's Pearson correlation (the independent reference)."""
    return float(np.mean([np.corrcoef(m.ravel(), t.ravel())[0, 1]
                          for m, t in zip(maps.numpy(), targets.numpy(), strict=True)]))


def test_net_learns_a_fusion_the_hand_operators_cannot():
    # the target is the per-pixel *minimum* of two smooth layers: no recursive
    # max/add/top/fem of the two maps reproduces it, a trained NET approaches it
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(64, 2, 4, 4, generator=gen)
    maps = xw.explainer.minmax(upsample(coarse, (16, 16)))
    targets = maps.amin(dim=1)
    train, val = slice(0, 48), slice(48, None)
    untrained, _ = fit(maps[train], targets[train], epochs=0, seed=0)
    net, history = fit(maps[train], targets[train], val=(maps[val], targets[val]), epochs=20,
                       lr=1e-2, batch_size=16, seed=0)
    before = torch.nn.functional.mse_loss(apply_net(untrained, maps[val]), targets[val])
    assert min(history["val_mse"]) < 0.5 * float(before)
    net_pcc = mean_pcc(apply_net(net, maps[val]), targets[val])
    hand = {op: mean_pcc(fuse_maps(maps[val], op), targets[val]) for op in fusion.OPERATORS}
    assert net_pcc > max(hand.values()), (net_pcc, hand)
    # seeded: the same seed gives the same weights
    again, _ = fit(maps[train], targets[train], epochs=1, lr=1e-2, batch_size=16, seed=0)
    first, _ = fit(maps[train], targets[train], epochs=1, lr=1e-2, batch_size=16, seed=0)
    assert all(torch.equal(p, q)
               for p, q in zip(again.parameters(), first.parameters(), strict=True))


# ------------------------------------------------------------------ NET on shapes data
@pytest.fixture(scope="module")
def shapes_resnet():
    return xw.models.load("shapes-resnet")


def shapes_stack(loaded, n: int, seed: int, pool: int = 1):
    """FEM stacks and [0, 1] GFDMs of fresh shapes images, optionally average-pooled."""
    ds = xw.datasets.shapes(n=n, size=128, seed=seed)
    maps, targets, layers = train_net.fem_dataset(
        loaded.model, torch.as_tensor(ds.image.values), ds.gfdm.values, loaded.preprocess)
    if pool > 1:
        maps = torch.nn.functional.avg_pool2d(maps, pool)
        targets = torch.nn.functional.avg_pool2d(targets[:, None], pool)[:, 0]
    return maps, targets, layers


def test_net_training_on_shapes_beats_hand_operators(shapes_resnet):
    # a small seeded run: 64 training images, stacks pooled to 32×32 to keep it quick
    maps, targets, _ = shapes_stack(shapes_resnet, 64, seed=101, pool=4)
    val_maps, val_targets, _ = shapes_stack(shapes_resnet, 32, seed=102, pool=4)
    untrained, _ = fit(maps, targets, epochs=0, seed=0)
    net, history = fit(maps, targets, val=(val_maps, val_targets), epochs=15, lr=1e-2,
                       batch_size=16, seed=0)
    before = float(torch.nn.functional.mse_loss(apply_net(untrained, val_maps), val_targets))
    assert min(history["val_mse"]) < 0.5 * before
    net_pcc = mean_pcc(apply_net(net, val_maps), val_targets)
    hand = {op: mean_pcc(fuse_maps(val_maps, op), val_targets) for op in fusion.OPERATORS}
    assert net_pcc > max(hand.values()), (net_pcc, hand)


def test_shipped_net_is_the_default_for_shapes_resnet(shapes_resnet):
    path = net_runtime.WEIGHTS_DIR / net_runtime.SHIPPED["shapes-resnet"]
    assert path.stat().st_size < 1_000_000
    model, preprocess, _ = shapes_resnet
    ds = xw.datasets.shapes(n=24, size=128, seed=103)  # images NET never saw
    ex = xw.Explainer(model, torch.as_tensor(ds.image.values), preprocess=preprocess)
    assert net_runtime.identify_model(model) == "shapes-resnet"
    result = ex.explain("mlfem", operator="net")
    stack = ex.fem_stack()
    expected = apply_net(load_net(path), torch.as_tensor(stack.values))
    assert np.allclose(result.values, expected.numpy(), atol=1e-5)
    assert np.allclose(xw.fuse(stack, "net").values, result.values, atol=1e-5)
    targets = torch.as_tensor(ds.gfdm.values, dtype=torch.float32)
    net_pcc = mean_pcc(torch.as_tensor(result.values), targets)
    hand = {op: mean_pcc(fuse_maps(torch.as_tensor(stack.values), op), targets)
            for op in fusion.OPERATORS}
    assert net_pcc > max(hand.values()), (net_pcc, hand)
    # another model (here: other weights) gets no default NET
    other, _, _ = xw.models.load("shapes-resnet", weights=None)
    assert net_runtime.identify_model(other) == ""


def test_training_command_writes_a_loadable_net(tmp_path, shapes_resnet):
    out = tmp_path / "net.pt"
    train_net.main(["train", "--n-train", "8", "--n-val", "4", "--size", "64",
                       "--epochs", "1", "--out", str(out)])
    net = load_net(out)
    assert net.meta["layers"] == xw.Explainer(shapes_resnet.model,
                                              torch.rand(1, 3, 64, 64)).block_layers()
    assert net.meta["model_fingerprint"] == net_runtime.model_fingerprint(shapes_resnet.model)
    assert net(torch.rand(1, net.n_layers, 64, 64)).shape == (1, 64, 64)
