"""The engine's contract for every registered method: no hooks left, model untouched,
clear errors for bad input. Driven by the registry, so new methods are covered."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import xaiwidgets as xw

from .conftest import TinyBlock, cnn_methods, quick
from .helpers import assert_unchanged, hook_count, snapshot


class Bomb(nn.Module):
    """Identity until armed; then raises in forward (a failure deep inside a call)."""

    armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return x


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        TinyBlock(6), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), Bomb(), nn.Linear(32, 3),
    )


def explain_armed(ex: xw.Explainer, model: nn.Sequential, method: str) -> None:
    """Run ``method`` with the model's :class:`Bomb` armed: it must fail with "boom"."""
    if xw.get_method(method).class_agnostic:
        # FEM/MLFEM compute before resolving the target; with cached logits their
        # pass would stop after its layers, before the bomb
        ex.clear_cache()
    model[9].armed = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ex.explain(method, target=1, **quick(method))
    finally:
        model[9].armed = False


@pytest.mark.parametrize("method", cnn_methods())
def test_method_leaves_model_untouched_on_success(method, tmp_path):
    model = make_model().train()  # explained in eval mode, train mode restored
    before = snapshot(model)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ex = xw.Explainer(model, x, classes=["a", "b", "c"])
    result = ex.explain(method, target=[0, 2], **quick(method))
    assert result.dims == ("image", "y", "x")
    assert result.dtype == np.float32 and result.shape == (2, 16, 16)
    assert np.isfinite(result.values).all()
    assert result.attrs["method"] == method
    assert list(result.attrs["target"]) == [0, 2]
    assert list(result.coords["class_name"].values) == ["a", "c"]
    for p in xw.get_method(method).params:
        assert p.name in result.attrs, f"parameter {p.name} missing from attrs"
    assert_unchanged(model, before)
    # every result exports: attrs are netCDF-safe
    result.to_netcdf(tmp_path / "r.nc", engine="h5netcdf")
    back = xr.load_dataarray(tmp_path / "r.nc", engine="h5netcdf")
    np.testing.assert_array_equal(back.values, result.values)
    assert back.attrs["method"] == method


@pytest.mark.parametrize("method", cnn_methods())
def test_method_leaves_model_untouched_when_it_raises(method):
    model = make_model().train()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ex = xw.Explainer(model, x)
    ex.logits()  # so the failure happens inside the method, not in target resolution
    before = snapshot(model)
    explain_armed(ex, model, method)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", xw.methods())
def test_method_rejects_unknown_and_out_of_range_parameters(method):
    ex = xw.Explainer(make_model(), torch.rand(1, 3, 16, 16))
    with pytest.raises(TypeError, match="does not take parameter"):
        ex.explain(method, target=0, not_a_parameter=1)
    for p in xw.get_method(method).params:
        if p.kind in ("float", "int") and p.low is not None:
            with pytest.raises(ValueError, match=p.name):
                ex.explain(method, target=0, **{p.name: p.low - 1})
        if p.kind == "choice":
            with pytest.raises(ValueError, match=p.name):
                ex.explain(method, target=0, **{p.name: "no-such-choice"})


def test_in_place_relu_models_work_and_keep_their_flag(tiny_cnn, images):
    a = xw.explain(tiny_cnn, images, "guided_backprop", target=0)
    assert np.isfinite(a.values).all() and a.values.max() > 0
    assert tiny_cnn[2].inplace is True


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.rand(2, 16, 16), ValueError, "grayscale|3 channels|shape"),
        (torch.rand(1, 1, 16, 16), ValueError, "grayscale"),
        (torch.rand(1, 16, 16, 3), ValueError, "channels-last"),
        (torch.rand(16, 16), ValueError, "shape"),
        (torch.randint(0, 255, (1, 3, 16, 16)), TypeError, "dtype"),
        (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_are_rejected_clearly(images, error, match):
    with pytest.raises(error, match=match):
        xw.Explainer(make_model(), images)


def test_display_images_outside_unit_range_with_preprocess():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        xw.Explainer(make_model(), torch.rand(1, 3, 16, 16) * 255, preprocess=lambda x: x)


def test_clear_errors_for_method_layer_and_target():
    ex = xw.Explainer(make_model(), torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown method 'gradcm'.*gradcam"):
        ex.explain("gradcm")
    with pytest.raises(ValueError, match="unknown layer '3.conv3'.*3.conv"):
        ex.explain("gradcam", layer="3.conv3")
    with pytest.raises(ValueError, match="out of range.*3 classes"):
        ex.explain("gradient", target=3)
    with pytest.raises(ValueError, match="got 3 targets for 2 images"):
        ex.explain("gradient", target=[0, 1, 2])
    with pytest.raises(TypeError, match="does not take a layer"):
        ex.explain("gradient", layer="0")
    with pytest.raises(ValueError, match="reduce"):
        ex.explain("gradient", reduce="mean")


def test_model_on_another_device_is_reported():
    model = make_model()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float32)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="model is on"):
            xw.Explainer(model, x.cuda())
    else:  # the meta device stands in for a second device on CPU-only machines
        with pytest.raises(ValueError, match="model is on"):
            xw.Explainer(model.to("meta"), x)


def test_target_default_is_the_predicted_class():
    model = make_model()
    x = torch.rand(3, 3, 16, 16)
    a = xw.explain(model, x, "gradient")
    with torch.no_grad():
        assert list(a.attrs["target"]) == model.eval()(x).argmax(1).tolist()


def test_predict_returns_sorted_probabilities():
    ex = xw.Explainer(make_model(), torch.rand(2, 3, 16, 16), classes=["a", "b", "c"])
    p = ex.predict(top=2)
    assert p.dims == ("image", "rank") and p.shape == (2, 2)
    assert (p.values[:, 0] >= p.values[:, 1]).all()
    assert set(p.coords["class_name"].values.ravel()) <= {"a", "b", "c"}


def test_forward_pass_is_cached_and_invalidated_when_weights_change():
    model = make_model()
    calls = []
    # a pre-hook: a pass that stops after the layers it needs counts too
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    ex = xw.Explainer(model, torch.rand(1, 3, 16, 16))
    ex.predict()
    ex.activations(["3"])
    ex.predict()
    ex.activations(["3"])
    assert len(calls) == 2  # logits once, then the missing layer once
    with torch.no_grad():
        model[0].weight.mul_(2)
    ex.predict()
    assert len(calls) == 3


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_many_explanations_keep_memory_flat():
    model = make_model()
    ex = xw.Explainer(model, torch.rand(2, 3, 16, 16))
    for method in ("gradient", "gradcam", "integrated_gradients"):
        ex.explain(method, target=1, **quick(method))
    start = live_tensors()
    for _ in range(100):
        for method in ("gradient", "gradcam", "integrated_gradients"):
            ex.explain(method, target=1, **quick(method))
    assert live_tensors() - start <= 2
    assert hook_count(model) == 0


def test_threads_sharing_a_model_do_not_mix_rules_or_captures():
    """dask's threaded scheduler runs explanations concurrently on one model."""
    from concurrent.futures import ThreadPoolExecutor

    model = make_model().train()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    jobs = ["gradient", "guided_backprop", "deconvnet", "gradcam"] * 6
    serial = {m: xw.explain(model, x, m, target=1).values for m in set(jobs)}
    before = snapshot(model)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda m: xw.explain(model, x, m, target=1).values, jobs))
    for method, values in zip(jobs, results, strict=True):
        np.testing.assert_allclose(values, serial[method], rtol=1e-5, atol=1e-6)
    assert_unchanged(model, before)
    assert torch.nn.functional.relu.__module__ == "torch.nn.functional"


@pytest.mark.parametrize("method", cnn_methods())
def test_failure_inside_a_method_leaves_torch_and_the_thread_clean(method):
    """After a failure deep in a call no rule stays active: the thread's function mode
    stack is empty, torch's functions are the same objects, and plain gradients of an
    even-sized batch (what the old process-wide DeepLIFT patch zeroed) are right."""
    import torch.nn.functional as F

    functions = {name: id(obj) for name, obj in vars(F).items()}
    model = make_model()
    ex = xw.Explainer(model, torch.rand(2, 3, 16, 16))
    ex.logits()
    explain_armed(ex, model, method)
    assert torch._C._len_torch_function_stack() == 0
    assert {name: id(obj) for name, obj in vars(F).items()} == functions
    x = torch.tensor([[1.0, -1.0], [2.0, -2.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(torch.relu(x).sum(), x)
    assert grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]
