"""AOPC, deletion and insertion on models whose score is a known function of the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import xaiwidgets as xw
from xaiwidgets.evaluation.perturbation import aopc, blur, deletion, insertion, petsiuk


class WeightedSum(nn.Module):
    """Logit 0 = scale · (Σ_pixels w·x over all channels − offset); logit 1 = 0."""

    def __init__(self, weights: torch.Tensor, scale: float = 1.0, offset: float = 0.0):
        super().__init__()
        self.register_buffer("weights", weights)
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * ((x * self.weights).sum(dim=(1, 2, 3)) - self.offset)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_aopc_matches_a_loop_over_patches():
    x = torch.rand(2, 3, 8, 8, generator=generator(0))
    model = WeightedSum(torch.rand(8, 8, generator=generator(1)))
    saliency = torch.rand(2, 8, 8, generator=generator(2))
    result = aopc(model, saliency, target=0, patch=4, images=x)
    for i in range(2):
        f = model.weights
        sums = saliency[i].reshape(2, 4, 2, 4).sum(dim=(1, 3)).flatten()
        order = torch.argsort(sums, descending=True).tolist()
        mean = x[i].mean(dim=(1, 2), keepdim=True)
        xk, scores = x[i].clone(), [float((x[i] * f).sum())]
        for p in order:
            r, c = divmod(p, 2)
            xk[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = mean[:, :, :1].expand(3, 4, 4)
            scores.append(float((xk * f).sum()))
        np.testing.assert_allclose(result.curve[i], scores, rtol=1e-5)
        expected = np.mean(scores[0] - np.array(scores))
        assert result.aopc[i].item() == pytest.approx(expected, rel=1e-5)
    assert result.curve.dims == ("image", "step") and list(result.step.values) == [0, 1, 2, 3, 4]


def test_deletion_matches_a_loop_over_pixels():
    x = torch.rand(1, 3, 6, 6, generator=generator(0))
    model = WeightedSum(torch.randn(6, 6, generator=generator(1)))
    saliency = torch.rand(6, 6, generator=generator(2))
    result = deletion(model, saliency, target=0, step=0.25, images=x)
    order = torch.argsort(saliency.flatten(), descending=True)
    expected = []
    for n in (0, 9, 18, 27, 36):
        xk = x[0].clone().reshape(3, -1)
        xk[:, order[:n]] = 0.0
        expected.append(float(torch.sigmoid((xk.reshape(3, 6, 6) * model.weights).sum())))
    np.testing.assert_allclose(result.curve[0], expected, rtol=1e-5)
    np.testing.assert_allclose(result.fraction, [0, 0.25, 0.5, 0.75, 1])
    assert result.auc[0].item() == pytest.approx(np.trapezoid(expected, dx=0.25), rel=1e-5)


def region_task(n: int = 3, size: int = 16):
    """Images bright in the top-left quarter; the model scores that quarter's brightness."""
    weights = torch.zeros(size, size)
    half = size // 2
    weights[:half, :half] = 1.0 / (3 * half * half)
    model = WeightedSum(weights, scale=10.0, offset=0.5)
    x = 0.2 * torch.rand(n, 3, size, size, generator=generator(0))
    x[:, :, :half, :half] += 0.7
    correct = torch.zeros(n, size, size)
    correct[:, :half, :half] = 1.0
    correct += 0.01 * torch.rand(n, size, size, generator=generator(1))
    maps = {
        "correct": correct,
        "random": torch.rand(n, size, size, generator=generator(2)),
        "inverted": 1.0 - correct,
    }
    return model, x, maps


def test_a_correct_map_beats_random_and_inverted_maps():
    model, x, maps = region_task()
    ex = xw.Explainer(model, x, progress=False)
    score = {name: aopc(ex, m, target=0, patch=4, replace="noise").aopc.mean().item()
             for name, m in maps.items()}
    assert score["correct"] > score["random"] > score["inverted"]
    dele = {name: deletion(ex, m, target=0).auc.mean().item() for name, m in maps.items()}
    assert dele["correct"] < dele["random"] < dele["inverted"]
    ins = {name: insertion(ex, m, target=0, blur_sigma=3.0).auc.mean().item()
           for name, m in maps.items()}
    assert ins["correct"] > ins["random"] > ins["inverted"]


def test_curve_endpoints_and_display_space():
    model, x, maps = region_task(n=2)
    preprocess = lambda im: (im - 0.5) / 0.25  # noqa: E731 - a normalisation, as torchvision's
    ex = xw.Explainer(model, x, preprocess=preprocess, progress=False)
    full = torch.softmax(model(preprocess(x)), dim=1)[:, 0].numpy()
    black = torch.softmax(model(preprocess(torch.zeros_like(x))), dim=1)[:, 0].numpy()
    d = deletion(ex, maps["correct"], target=0, step=0.1)
    np.testing.assert_allclose(d.curve.isel(fraction=0), full, rtol=1e-5)
    np.testing.assert_allclose(d.curve.isel(fraction=-1), black, rtol=1e-5)  # baseline 0 = black
    i = insertion(ex, maps["correct"], target=0, step=0.1)
    np.testing.assert_allclose(i.curve.isel(fraction=-1), full, rtol=1e-5)
    assert d.attrs["metric"] == "deletion" and i.attrs["metric"] == "insertion"
    assert len(_fraction := d.fraction.values) == 11 and _fraction[-1] == 1


def test_with_explanations_from_the_registry(tiny_cnn, images, tmp_path):
    ex = xw.Explainer(tiny_cnn, images, progress=False)
    maps = ex.explain("gradient", target=[1, 2])
    result = aopc(ex, maps, patch=8, batch_size=7)
    np.testing.assert_array_equal(result.target, [1, 2])  # the class the map explains
    assert result.attrs["method"] == "gradient"
    assert np.isfinite(result.aopc).all() and result.curve.shape == (2, 17)
    d = deletion(ex, maps, step=0.05, batch_size=5)
    assert d.curve.shape == (2, 21) and ((d.curve >= 0) & (d.curve <= 1)).all()
    d.to_netcdf(tmp_path / "deletion.nc", engine="h5netcdf")
    xr.testing.assert_identical(xr.open_dataset(tmp_path / "deletion.nc", engine="h5netcdf"), d)


def test_errors():
    model, x, maps = region_task(n=2)
    with pytest.raises(ValueError, match="shape"):
        deletion(model, maps["correct"][:1], images=x)
    with pytest.raises(TypeError, match="images="):
        deletion(model, maps["correct"])
    with pytest.raises(ValueError, match="step"):
        deletion(model, maps["correct"], images=x, step=0)
    with pytest.raises(ValueError, match="replacement"):
        aopc(model, maps["correct"], images=x, replace="zeros")
    with pytest.raises(ValueError, match="direction='erase'"):
        petsiuk(model, maps["correct"], images=x, direction="erase")


def test_insertion_matches_a_loop_and_mirrors_deletion():
    """Insertion (one function with deletion, :func:`petsiuk`) reveals pixels in the order
    deletion hides them, so it reads the same images as deletion with image and baseline
    swapped; checked against an explicit loop over the reveal order."""
    x = torch.rand(1, 3, 6, 6, generator=generator(0))
    model = WeightedSum(torch.randn(6, 6, generator=generator(1)))
    saliency = torch.rand(6, 6, generator=generator(2))
    order = torch.argsort(saliency.flatten(), descending=True)
    start = blur(x, 3, 1.0)[0].reshape(3, -1)
    expected = []
    for n in (0, 9, 18, 27, 36):
        xk = start.clone()
        xk[:, order[:n]] = x[0].reshape(3, -1)[:, order[:n]]
        expected.append(float(torch.sigmoid((xk.reshape(3, 6, 6) * model.weights).sum())))
    result = insertion(model, saliency, target=0, step=0.25, images=x, blur_kernel=3,
                       blur_sigma=1.0)
    np.testing.assert_allclose(result.curve[0], expected, rtol=1e-5)
    assert (result.attrs["baseline"], result.attrs["blur_kernel"]) == ("blur", 3)
    black = petsiuk(model, saliency, target=0, step=0.25, images=x, direction="insertion",
                    baseline=0.0)
    removed = deletion(model, saliency, target=0, step=0.25, images=x, baseline=0.0)
    # from black, all pixels back = the image; deletion ends at black
    assert black.curve[0, 0].item() == pytest.approx(removed.curve[0, -1].item(), rel=1e-6)
    assert black.curve[0, -1].item() == pytest.approx(removed.curve[0, 0].item(), rel=1e-6)
    assert black.attrs["metric"] == "insertion" and "blur_kernel" not in black.attrs


def test_shipped_model_gradcam_beats_a_random_map_at_deletion():
    model, preprocess, _ = xw.models.load("shapes-resnet")
    images = torch.from_numpy(xw.datasets.shapes(n=4, size=128, seed=7).image.values)
    ex = xw.Explainer(model, images, preprocess=preprocess, progress=False)
    random = torch.rand(4, 128, 128, generator=generator(0))
    cam = deletion(ex, ex.explain("gradcam"), step=0.05).auc.mean()
    assert cam < deletion(ex, random, step=0.05).auc.mean() - 0.1
