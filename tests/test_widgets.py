"""Widgets driven from code: setting ``w.controls[name].value`` must update ``w.result``
and ``w.figure`` exactly as a click would. Expected values come from the engine called
directly (an independent path: no widget code involved)."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
import xarray as xr

import xaiwidgets as xw
from xaiwidgets import metrics, rendering
from xaiwidgets.core.registry import Param
from xaiwidgets.widgets import controls as C
from xaiwidgets.widgets.figures import colorscale, display_values

from .conftest import cnn_methods, count_calls, count_forwards, make_tiny_resnet
from .helpers import assert_display_close

IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def shown_map(w, panel: int | None = None) -> np.ndarray:
    """The map panel ``panel`` (default: the widget's map panel) of a widget or MapGrid."""
    grid = getattr(w, "grid", w)
    panel = getattr(w, "map_panel", 0) if panel is None else panel
    return np.asarray(grid.heatmap(panel).z, dtype=np.float64)


def visible(w) -> set[str]:
    return {name for name, c in w.controls.items() if C.is_visible(c)}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_resnet()


@pytest.fixture(scope="module")
def widget(model):
    return xw.ExplainerWidget(model, IMAGES)


# ----------------------------------------------------------------- dependency rule
def test_engine_import_loads_no_widget_library():
    code = (
        "import sys, torch, xaiwidgets as xw\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU(),\n"
        "    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 2))\n"
        "xw.explain(m, torch.rand(1, 3, 8, 8), 'gradient')\n"
        "assert 'ipywidgets' not in sys.modules and 'plotly' not in sys.modules, 'engine'\n"
        "xw.ExplainerWidget\n"
        "assert 'ipywidgets' in sys.modules and 'plotly' in sys.modules, 'lazy'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


# ------------------------------------------------------------ controls from Param
@pytest.mark.parametrize("param, cls, settings", [
    (Param("K", 1.0, low=0.0, high=10.0, step=0.1), "FloatSlider", {"min": 0.0, "max": 10.0}),
    (Param("eps", 1e-6, low=1e-9, high=10.0, log=True), "FloatLogSlider",
     {"min": -9.0, "max": 1.0}),
    (Param("n", 25, kind="int", low=1, high=200), "IntSlider", {"min": 1, "max": 200}),
    (Param("n", 25, kind="int", low=1), "BoundedIntText", {"min": 1}),
    (Param("v", 0.0), "FloatText", {}),
    (Param("op", "max", kind="choice", choices=("max", "add")), "Dropdown", {}),
    (Param("b", 0.0, kind="any", choices=(0.0, "black")), "Dropdown", {}),
])
def test_control_from_param(param, cls, settings):
    control = C.make_control(param)
    assert type(control).__name__ == cls
    assert control.value == param.default and control.description == param.name
    for key, value in settings.items():
        assert getattr(control, key) == pytest.approx(value)


def test_tensor_params_get_no_control():
    assert C.make_control(Param("baseline", torch.zeros(3), kind="any")) is None
    assert C.make_control(Param("seed", None, kind="int", optional=True)) is None


def test_shared_name_is_reranged_per_method():
    pc = C.ParamControls(["lrp", "mlfem"])
    pc.select("mlfem")
    alpha = pc.controls["alpha"]
    assert (alpha.min, alpha.max, alpha.value) == (0.0, 1.0, 0.5)     # mlfem's declaration
    alpha.value = 0.8
    pc.select("lrp")
    assert (alpha.min, alpha.max, alpha.value) == (1.0, 10.0, 2.0)    # lrp's derived default
    pc.select("mlfem")
    assert alpha.value == 0.8                                          # remembered per method


# ---------------------------------------------------------- every method, live
@pytest.mark.parametrize("method", cnn_methods())
def test_every_method_updates_result_and_figure(widget, model, method):
    m = xw.get_method(method)
    with widget.hold():
        widget.controls["method"].value = method
        for name, value in m.quick_params.items():
            if name in widget.params.keys[method]:
                widget.controls[widget.params.keys[method][name]].value = value
    assert widget.error is None
    # only the method's own parameters (and layer for layer methods) are shown
    own = set(widget.params.keys[method].values())
    assert visible(widget) & set(widget.params.controls) == own
    assert ("layer" in visible(widget)) == m.uses_layer
    # the engine called directly gives the same map
    params = widget.params.values(method)
    expected = xw.Explainer(model, IMAGES[:1]).explain(
        method, target=None if m.class_agnostic else widget.controls["target"].value,
        layer=widget.controls["layer"].value if m.uses_layer else None, **params)
    assert widget.result.attrs["method"] == method
    np.testing.assert_allclose(widget.result.values, expected.values, rtol=1e-4, atol=1e-6)
    # at the display's own precision: values 1e-4 apart may round one display step apart
    assert_display_close(shown_map(widget), expected.values[0], rtol=1e-4)


def test_a_new_widget_starts_from_the_method_defaults(model):
    w = xw.ExplainerWidget(model, IMAGES, method="mlfem")  # alpha is also LRP's (1..10)
    assert w.controls["alpha"].value == 0.5 and w.result.attrs["alpha"] == 0.5
    assert (w.controls["alpha"].min, w.controls["alpha"].max) == (0.0, 1.0)


def test_methods_subset(model):
    w = xw.ExplainerWidget(model, IMAGES, methods=["fem", "gradient"])
    assert list(w.controls["method"].options) == ["fem", "gradient"]
    assert w.result.attrs["method"] == "fem"  # gradcam is not offered: the first one
    assert set(w.params.controls) == {"K"}


def test_parameter_change_recomputes(widget, model):
    with widget.hold():
        widget.controls["method"].value = "fem"
        widget.controls["K"].value = 1.0
    before = shown_map(widget)
    widget.controls["K"].value = 0.2
    expected = xw.Explainer(model, IMAGES[:1]).explain("fem", K=0.2)
    assert widget.result.attrs["K"] == 0.2
    np.testing.assert_allclose(widget.result.values, expected.values, atol=1e-6)
    assert not np.allclose(shown_map(widget), before)


def test_view_changes_do_not_recompute(widget, monkeypatch):
    widget.controls["method"].value = "gradcam"
    calls = count_calls(monkeypatch, xw.Explainer, "explain")
    result = widget.result
    widget.controls["opacity"].value = 0.25
    widget.controls["colormap"].value = "viridis"
    assert calls == [] and widget.result is result
    heat = widget.grid.heatmap(widget.map_panel)
    assert heat.opacity == 0.25
    assert tuple(map(tuple, heat.colorscale)) == colorscale("viridis")
    widget.controls["K"].value = 2.5  # a hidden control of another method: no work either
    widget.controls["colormap"].value = "auto"
    assert calls == []
    widget.controls["method"].value = "fem"  # ... but the value set from code is used
    assert widget.result.attrs["K"] == 2.5


def test_signed_maps_get_a_diverging_colormap_centred_at_zero(widget):
    widget.controls["method"].value = "integrated_gradients"
    heat = widget.grid.heatmap(widget.map_panel)
    assert widget.result.attrs["signed"] == 1
    assert heat.zmid == 0 and heat.zmin == pytest.approx(-heat.zmax)
    assert heat.zmax == pytest.approx(np.abs(widget.result.values).max())
    assert tuple(map(tuple, heat.colorscale)) == colorscale(rendering.DIVERGING, signed=True)
    assert heat.colorscale[len(heat.colorscale) // 2][1].endswith(",0)")  # clear at 0
    widget.controls["method"].value = "gradcam"
    assert heat.zmid is None and heat.zmin == pytest.approx(widget.result.values.min())
    assert tuple(map(tuple, heat.colorscale)) == colorscale(rendering.SEQUENTIAL)


def test_fem_parameters_reuse_the_cached_forward_pass(model):
    w = xw.ExplainerWidget(model, IMAGES, method="fem")
    forwards, _ = count_forwards(model)
    for K in (0.5, 2.0, 3.0):
        w.controls["K"].value = K
        assert w.result.attrs["K"] == K
    assert forwards == []
    w.controls["method"].value = "mlfem"  # needs every block's activation: one forward pass
    assert len(forwards) == 1
    forwards.clear()
    for name, value in (("K", 1.5), ("operator", "add"), ("alpha", 0.3),
                        ("normalize", "interleaved")):
        w.controls[name].value = value
        assert w.result.attrs[name] == value and w.error is None
    assert forwards == []


def test_slow_methods_feed_the_progress_bar(model):
    w = xw.ExplainerWidget(model, IMAGES, method="gradient")
    seen: list[tuple[float, bool]] = []
    w.progress.observe(lambda c: seen.append((c["new"], C.is_visible(w.progress))), "value")
    with w.hold():
        w.controls["method"].value = "integrated_gradients"
        w.controls["steps"].value = 4
        w.controls["batch_size"].value = 1  # one model call per step: 4 progress reports
    assert seen == [(0.25, True), (0.5, True), (0.75, True), (1.0, True)]
    assert not C.is_visible(w.progress)  # hidden again once done


def test_errors_show_inline_and_the_widget_keeps_working(model):
    w = xw.ExplainerWidget(model, IMAGES, method="mlfem")
    good = w.result
    w.controls["operator"].value = "net"  # no trained NET for this model
    assert w.error is not None and "net" in w.error
    assert "color:#b00020" in w.status.value
    assert w.result is good  # the last good map stays
    w.controls["operator"].value = "top"
    assert w.error is None and w.result.attrs["operator"] == "top"


def test_derived_parameters_follow_the_method_rule(model):
    w = xw.ExplainerWidget(model, IMAGES, method="lrp")
    w.controls["composite"].value = "alpha_beta"
    w.controls["alpha"].value = 3.0
    assert (w.result.attrs["alpha"], w.result.attrs["beta"]) == (3.0, 2.0)
    assert w.controls["beta"].value == 2.0          # the control shows what was used
    w.controls["beta"].value = 0.5
    assert (w.result.attrs["alpha"], w.result.attrs["beta"]) == (1.5, 0.5)
    assert w.controls["alpha"].value == 1.5 and w.error is None


def test_image_and_class_pickers(widget, model):
    widget.controls["method"].value = "gradient"
    widget.controls["image"].value = 1
    probs = torch.softmax(model(IMAGES[1:2]), dim=1)[0].detach()
    order = torch.argsort(probs, descending=True).tolist()
    target = widget.controls["target"]
    assert [value for _, value in target.options] == order
    assert f"{probs[order[0]].item():.1%}" in target.options[0][0]
    assert target.value == order[0] and widget.result.image.item() == 1
    target.value = order[-1]
    assert int(widget.result.attrs["target"][0]) == order[-1]
    expected = xw.Explainer(model, IMAGES[1:]).explain("gradient", target=order[-1])
    np.testing.assert_allclose(widget.result.values, expected.values, rtol=1e-5)
    widget.controls["image"].value = 0


def test_upload_adds_a_resized_image(model):
    w = xw.ExplainerWidget(model, IMAGES, method="gradient")
    picture = np.zeros((40, 48, 3), dtype=np.uint8)
    picture[:, 24:] = 255  # right half white
    w._on_upload({"new": ({"name": "mine.png", "content": memoryview(
        rendering.png_bytes(picture))},)})
    assert w.error is None and len(w.images) == 3 and w.index == 2
    assert tuple(w.images[2].shape) == (3, 32, 32)
    # centre-cropped to 40×40 (columns 4–43), white from column 20 of 40 → 16 of 32;
    # antialiased resampling leaves white within float32 round-off of 1
    assert w.images[2, :, :, :14].max() == 0
    assert w.images[2, :, :, 18:].min() == pytest.approx(1.0, abs=1e-6)
    assert w.result.image.item() == 2


def test_export_png_and_netcdf(widget, tmp_path):
    with widget.hold():
        widget.controls["method"].value = "fem"
        widget.controls["K"].value = 1.0
        widget.controls["opacity"].value = 0.5
        widget.controls["colormap"].value = "gray"
    png = matplotlib.image.imread(widget.save_png(tmp_path / "map.png"))
    image = widget.images[widget.index]
    expected = rendering.overlay(widget.result.values[0], image, "gray", 0.5)
    np.testing.assert_allclose(png[..., :3] * 255, expected, atol=1)
    back = xr.load_dataarray(widget.save_netcdf(tmp_path / "map.nc"))
    np.testing.assert_array_equal(back.values, widget.result.values)
    assert back.attrs["method"] == "fem" and back.attrs["K"] == 1.0


# ------------------------------------------------------------------- FEM stack
def test_fem_stack_widget(model, monkeypatch):
    w = xw.FEMStackWidget(model, IMAGES)
    ex = xw.Explainer(model, IMAGES[:1])
    np.testing.assert_allclose(w.stack.values, ex.fem_stack(K=1.0).values, atol=1e-6)
    layers = list(w.stack.layer.values)
    assert layers == ex.block_layers() and w.layers_grid.n == len(layers)
    for i in range(len(layers)):  # small multiples: one panel per layer
        np.testing.assert_allclose(shown_map(w.layers_grid, i), w.stack.values[0, i], atol=6e-5)
    grid = w.layers_grid  # larger maps are block-averaged for display (never the result)
    grid.show(0, np.arange(130.0 * 130).reshape(130, 130))
    shown, heat = shown_map(grid, 0), grid.heatmap(0)
    assert shown.shape == (44, 44) and (heat.dx, heat.x0) == (3, 1.0)
    assert shown[0, 0] == pytest.approx(np.arange(130.0 * 130).reshape(130, 130)[:3, :3].mean())
    forwards, _ = count_forwards(model)
    stacks = count_calls(monkeypatch, xw.Explainer, "fem_stack")
    w.controls["operator"].value = "add"
    w.controls["alpha"].value = 0.8
    assert stacks == []  # a fusion change only re-fuses
    expected = xw.fuse(ex.fem_stack(K=1.0), operator="add", alpha=0.8)
    np.testing.assert_allclose(w.result.values, expected.values, atol=1e-6)
    np.testing.assert_allclose(shown_map(w, 1), expected.values[0], atol=6e-5)
    w.controls["K"].value = 2.0
    assert len(stacks) == 2 and forwards == []  # (one is ours, above) and no model run
    np.testing.assert_allclose(w.stack.values, ex.fem_stack(K=2.0).values, atol=1e-6)
    w.controls["layer"].value = layers[0]
    np.testing.assert_allclose(shown_map(w, 0), w.stack.values[0, 0], atol=6e-5)
    assert C.is_visible(w.controls["alpha"])
    w.controls["operator"].value = "max"
    assert not C.is_visible(w.controls["alpha"])  # max ignores alpha


# --------------------------------------------------------------------- compare
def reference_dataset(n: int, size: int) -> xr.Dataset:
    rng = np.random.default_rng(0)
    fixations = rng.poisson(0.05, (n, size, size))
    yy, xx = np.mgrid[:size, :size]
    gfdm = np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (2 * (size / 6) ** 2))
    return xr.Dataset({"gfdm": (("image", "y", "x"), np.broadcast_to(gfdm, (n, size, size))),
                       "fixations": (("image", "y", "x"), fixations)})


def test_compare_widget_scores_against_the_reference(model, monkeypatch):
    ds = reference_dataset(2, 32)
    names = ["gradient", "gradcam", "fem"]
    w = xw.CompareWidget(model, IMAGES, names, reference=ds, metrics=("pcc", "sim", "nss"))
    assert w.result.dims == ("method", "image", "y", "x") and w.grid.n == 4
    for i, name in enumerate(names):
        own = w.results[name].values[0]
        assert w.scores.sel({"method": name, "metric": "pcc"}) == pytest.approx(
            metrics.pcc(own, ds.gfdm.values[0]))
        assert w.scores.sel({"method": name, "metric": "nss"}) == pytest.approx(
            metrics.nss(own, ds.fixations.values[0]))
        assert "PCC" in w.grid.figure.layout.annotations[i].text
        np.testing.assert_allclose(shown_map(w, i), display_values(own), atol=1e-6)
    np.testing.assert_allclose(shown_map(w, 3), ds.gfdm.values[0], atol=6e-5)
    explained = []
    original = xw.Explainer.explain
    monkeypatch.setattr(xw.Explainer, "explain",
                        lambda self, method, **kw: explained.append(method)
                        or original(self, method, **kw))
    w.controls["target"].value = w.controls["target"].options[1][1]
    assert explained == ["gradient", "gradcam"]  # FEM is class-agnostic: kept
    explained.clear()
    w.controls["layer"].value = w.explainer().layers()[0]
    assert explained == ["gradcam", "fem"]       # only the layer methods
    explained.clear()
    w.controls["opacity"].value = 0.9
    assert explained == []


def test_compare_widget_without_reference(model):
    w = xw.CompareWidget(model, IMAGES, ["gradient", "occlusion"],
                         params={"occlusion": {"window": 8, "stride": 8}})
    assert w.scores is None and w.grid.n == 2
    assert w.results["occlusion"].attrs["window"] == 8
    assert w.grid.heatmap(1).zmid == 0  # occlusion is signed


def test_bad_reference_shape_is_rejected(model):
    with pytest.raises(ValueError, match="reference gfdm"):
        xw.CompareWidget(model, IMAGES, ["gradient"], reference=np.zeros((2, 16, 16)))


def test_new_view_gets_the_whole_current_figure():
    """A page can drop plotly edits sent while its plotly JavaScript still loads (Voilà
    connecting while the worker publishes): a new view (the front end's ``_view_count``
    goes up) gets the whole current figure, again once it reports its first drawing,
    and not on later reports (the echoes of ordinary edits)."""
    import threading

    from xaiwidgets.widgets.figures import MapGrid

    grid = MapGrid(1)
    fig = grid.figure
    sent: list[tuple[str, dict]] = []
    for name in ("_py2js_deleteTraces", "_py2js_addTraces", "_py2js_relayout",
                 "_py2js_update"):
        fig.observe(lambda c: c["new"] and sent.append((c["name"], c["new"])), name)
    values = np.arange(12.0).reshape(3, 4)
    grid.show(0, values, image=np.zeros((3, 3, 4)), title="now")
    assert [name for name, _ in sent] == ["_py2js_update"] and fig._view_count == 0

    def resynced() -> bool:
        names = [name for name, _ in sent]
        if not names:
            return False
        assert names == ["_py2js_deleteTraces", "_py2js_addTraces", "_py2js_relayout"]
        assert sent[0][1]["delete_inds"] == [0, 1]
        heat = sent[1][1]["trace_data"][1]
        assert heat["type"] == "heatmap" and np.allclose(np.asarray(heat["z"]), values)
        assert sent[2][1]["relayout_data"]["annotations"][0]["text"] == "now"
        sent.clear()
        return True

    def drawn() -> None:  # what plotly's view reports after drawing (or applying an edit)
        fig._js2py_layoutDelta = {"layout_delta": {}, "layout_edit_id": fig._last_layout_edit_id}

    sent.clear()
    fig.set_state({"_view_count": 1})  # the page displayed a view
    assert resynced()
    drawn()                             # its first drawing: plotly's JavaScript runs
    assert resynced()
    drawn()                             # the echo of an edit: nothing more
    assert not resynced()
    fig.set_state({"_view_count": 0})   # a view removed: nothing
    assert not resynced()

    # a re-sync from the kernel's thread waits for a worker's batch of edits to end
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with fig.batch_update():
            fig.data[1].zmax = 99.0
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    resync = threading.Thread(target=fig.resync)
    resync.start()
    resync.join(0.2)
    assert resync.is_alive() and not sent  # blocked by the batch
    release.set()
    thread.join(5)
    resync.join(5)
    assert [name for name, _ in sent][0] == "_py2js_update"
    assert sent[2][1]["trace_data"][1]["zmax"] == 99.0  # the re-sync has the batch's edit


def test_layer_follows_each_methods_default_until_the_user_picks_one():
    # on a class-token ViT the default layer (the last block's norm1) comes before an
    # activation: FEM refuses it, so the widgets use each method's own default (FEM's
    # after the activation) and the layer control shows the layer drawn
    model, preprocess, classes = xw.models.load("shapes-vit")
    images = xw.datasets.shapes(n=1, seed=1).image.values
    w = xw.ExplainerWidget(model, images, preprocess=preprocess, classes=classes,
                           method="fem")
    assert w.error is None and w.result.attrs["layer"] == "blocks.3.mlp.act"
    assert w.controls["layer"].value == "blocks.3.mlp.act" and w.layer_is_default
    w.controls["method"].value = "gradcam"
    assert w.result.attrs["layer"] == w.controls["layer"].value == "blocks.3.norm1"
    w.controls["layer"].value = "blocks.2"  # the user's pick stays for every method
    assert not w.layer_is_default and w.result.attrs["layer"] == "blocks.2"
    w.controls["method"].value = "fem"
    assert w.result.attrs["layer"] == "blocks.2" and w.error is None
    compare = xw.CompareWidget(model, images, preprocess=preprocess, classes=classes,
                               methods=["gradcam", "fem"])
    assert compare.error is None
    assert {k: v.attrs["layer"] for k, v in compare.results.items()} == \
        {"gradcam": "blocks.3.norm1", "fem": "blocks.3.mlp.act"}
