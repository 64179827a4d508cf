"""Live widgets: background computation that a newer change supersedes or Cancel stops,
first estimates while IG/SmoothGrad run, inline errors, browser downloads, layout, and
``add_image`` that validates before changing anything.

No timed assertions (the CI machine is shared): "returns at once" is checked as
"returns while the job is still running" (``w.busy``), and "stops at its next chunk"
by counting the model calls made after the change.
"""

from __future__ import annotations

import base64
import re
import threading
import time

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr

import xaiwidgets as xw
from xaiwidgets import rendering
from xaiwidgets.widgets import controls as C
from xaiwidgets.widgets.base import BACKGROUND_BATCH, SIDE_PX
from xaiwidgets.widgets.worker import Cancelled, Superseded, Worker, in_kernel

from .conftest import make_tiny_resnet

IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
SLOW_STEPS = 400  # IG steps: 50 chunks of BACKGROUND_BATCH on a ResNet18, many seconds


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return make_tiny_resnet()


class Calls:
    """Every forward pass of a model: (thread name, batch size), in order."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.log: list[tuple[str, int]] = []
        self.handle = model.register_forward_hook(
            lambda _m, inputs, _o: self.log.append((threading.current_thread().name,
                                                    len(inputs[0]))))

    def chunks(self, since: int = 0) -> int:
        """IG/SmoothGrad chunks (full background batches) since log position ``since``."""
        return sum(1 for _, n in self.log[since:] if n == BACKGROUND_BATCH)

    def wait_for_chunks(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.chunks() < n:
            assert time.monotonic() < deadline, "the background job never started"
            time.sleep(0.02)


def idle_widget(model: torch.nn.Module, method: str) -> xw.ExplainerWidget:
    """A background ExplainerWidget on ``IMAGES`` whose first ``method`` map is done."""
    w = xw.ExplainerWidget(model, IMAGES, method=method, background=True)
    assert w.wait(60)
    return w


def record_statuses(w) -> list[str]:
    """Every status line the widget shows from now on, in order."""
    statuses: list[str] = []
    w.status.observe(lambda change: statuses.append(change["new"]), "value")
    return statuses


def record_draws(w) -> list[tuple[str, bool, np.ndarray]]:
    """Every map the ExplainerWidget draws: (method, first estimate?, values)."""
    drawn: list[tuple[str, bool, np.ndarray]] = []
    original = w._show

    def show(da, estimate=False):
        drawn.append((da.attrs["method"], estimate, da.values[0].copy()))
        original(da, estimate=estimate)

    w._show = show
    return drawn


def start_slow_ig(w, model: torch.nn.Module, chunks: int = 1) -> Calls:
    """Switch the (idle) background widget ``w`` on ``model`` to a slow IG; return once
    ``chunks`` IG chunks have run, with the passes recorded from before the switch."""
    calls = Calls(model)
    with w.hold():
        w.controls["method"].value = "integrated_gradients"
        w.controls["steps"].value = SLOW_STEPS
    calls.wait_for_chunks(chunks)
    return calls


# ------------------------------------------------------------------ the worker
def test_worker_newest_job_wins_and_stale_jobs_stop_at_their_next_check():
    worker = Worker(background=True)
    checks = {"a": 0, "b": 0}
    shown: list[str] = []
    started = threading.Event()

    def job(tag):
        def run(token):
            for _ in range(500):
                started.set()
                time.sleep(0.005)
                checks[tag] += 1
                token.check()
            with worker.publishing(token):
                shown.append(tag)
        return run

    worker.submit(job("a"))
    assert started.wait(10)
    worker.submit(job("b"))
    stopped_at = checks["a"]
    assert worker.wait(60) and not worker.busy
    assert shown == ["b"]                      # the stale job never published
    assert checks["a"] <= stopped_at + 1 < 500  # ... and stopped at its next check
    worker.submit(job("a"))
    worker.cancel()
    assert worker.wait(10) and shown == ["b"]
    worker.close()


def test_worker_synchronous_runs_before_submit_returns():
    worker = Worker(background=False)
    ran = []
    worker.submit(lambda token: ran.append(token.generation))
    assert ran == [1] and not worker.busy and worker.wait(0)
    token_errors = []

    def job(token):
        worker.cancel()  # from inside: the token is stale now
        try:
            token.check()
        except Superseded as err:
            token_errors.append(type(err))
    worker.submit(job)
    assert token_errors == [Cancelled]


def test_background_defaults_to_off_in_plain_python(tiny):
    assert not in_kernel()
    w = xw.ExplainerWidget(tiny, IMAGES, method="gradient")
    assert w.background is False
    w.controls["method"].value = "gradcam"  # synchronous: done when the change returns
    assert not w.busy and w.result.attrs["method"] == "gradcam"
    assert w.wait(0)


# --------------------------------------------------------- supersede and cancel
def test_a_change_returns_while_the_work_runs_and_wait_gets_the_result(tiny):
    w = xw.ExplainerWidget(tiny, IMAGES, method="gradient", background=True)
    assert w.wait(60) and w.result.attrs["method"] == "gradient"
    with w.hold():
        w.controls["method"].value = "smoothgrad"
        w.controls["n"].value = 4000
    assert w.busy                                      # returned before the work is done
    assert w.result.attrs["method"] == "gradient"      # nothing half-done is stored
    w.controls["n"].value = 16                         # supersedes the 4000-sample run
    assert w.wait(120) and not w.busy
    assert w.result.attrs["method"] == "smoothgrad" and w.result.attrs["n"] == 16
    expected = xw.Explainer(tiny, IMAGES[:1]).explain(
        "smoothgrad", target=w.controls["target"].value, n=16)
    np.testing.assert_allclose(w.result.values, expected.values, rtol=1e-4, atol=1e-6)
    w.close()


def test_a_newer_change_stops_integrated_gradients_at_its_next_chunk(resnet18):
    w = idle_widget(resnet18, "gradcam")
    drawn = record_draws(w)
    calls = start_slow_ig(w, resnet18, chunks=2)
    mark = len(calls.log)
    w.controls["method"].value = "gradcam"
    assert w.wait(120)
    calls.handle.remove()
    # at most the chunk running at the change finishes; then the IG chunks stop
    assert calls.chunks(mark) <= 1
    assert calls.chunks() < SLOW_STEPS // BACKGROUND_BATCH
    # the IG result was never drawn (first estimates before the change may have been)
    assert not [d for d in drawn if d[0] == "integrated_gradients" and not d[1]]
    assert drawn[-1][:2] == ("gradcam", False) and w.result.attrs["method"] == "gradcam"
    assert w.error is None and "gradcam" in w.status.value
    w.close()


def test_cancel_stops_the_work_and_keeps_the_last_map(resnet18):
    w = idle_widget(resnet18, "gradient")
    calls = start_slow_ig(w, resnet18)
    assert C.is_visible(w.busy_box)           # the Cancel button shows while computing
    w.cancel_button.click()
    mark = len(calls.log)
    assert w.wait(60) and not w.busy
    calls.handle.remove()
    assert calls.chunks(mark) <= 1
    assert w.result.attrs["method"] == "gradient" and "cancelled" in w.status.value
    assert not C.is_visible(w.busy_box)
    w.controls["steps"].value = 8             # the cancelled change is computed with the next
    assert w.wait(120)
    assert w.result.attrs["method"] == "integrated_gradients" and w.result.attrs["steps"] == 8
    w.close()


def test_restyles_draw_at_once_without_stopping_the_computation(resnet18):
    w = idle_widget(resnet18, "gradcam")
    calls = start_slow_ig(w, resnet18)
    w.controls["opacity"].value = 0.3
    assert w.grid.heatmap(w.map_panel).opacity == 0.3   # drawn before the change returned
    assert w.busy                                        # ... and IG goes on
    w.controls["steps"].value = 16
    assert w.wait(120)
    calls.handle.remove()
    assert w.result.attrs["steps"] == 16 and w.grid.heatmap(w.map_panel).opacity == 0.3
    w.close()


def test_errors_show_inline_in_the_background_and_the_widget_keeps_working(tiny):
    w = idle_widget(tiny, "mlfem")
    good = w.result
    w.controls["operator"].value = "net"  # no trained NET for this model
    assert w.wait(60)
    assert w.error is not None and "net" in w.error and "color:#b00020" in w.status.value
    assert w.result is good
    w.controls["operator"].value = "top"
    assert w.wait(60) and w.error is None and w.result.attrs["operator"] == "top"
    w.close()


# ------------------------------------------------------------------ first estimates
def test_smoothgrad_draws_first_estimates_with_the_count(tiny):
    w = idle_widget(tiny, "gradient")
    drawn = record_draws(w)
    statuses = record_statuses(w)
    with w.hold():
        w.controls["method"].value = "smoothgrad"
        w.controls["n"].value = 3 * BACKGROUND_BATCH
        w.controls["sigma"].value = 0.3
    assert w.wait(120)
    estimates = [values for method, first, values in drawn if first]
    assert estimates, "no first estimate was drawn"
    assert any(f"{BACKGROUND_BATCH}/{3 * BACKGROUND_BATCH} samples" in s for s in statuses)
    # the first estimate is SmoothGrad of the first chunk's samples (same seeded noise)
    target = w.controls["target"].value
    first = xw.Explainer(tiny, IMAGES[:1]).explain("smoothgrad", target=target,
                                                   n=BACKGROUND_BATCH, sigma=0.3)
    np.testing.assert_allclose(estimates[0], first.values[0], rtol=1e-4, atol=1e-6)
    assert drawn[-1][1] is False  # the final map is drawn last, and is w.result
    np.testing.assert_array_equal(drawn[-1][2], w.result.values[0])
    w.close()


def test_integrated_gradients_estimates_converge_to_the_result(tiny):
    w = idle_widget(tiny, "gradient")
    drawn = record_draws(w)
    with w.hold():
        w.controls["method"].value = "integrated_gradients"
        w.controls["steps"].value = 4 * BACKGROUND_BATCH
    assert w.wait(120)
    estimates = [values for _, first, values in drawn if first]
    assert estimates and drawn[-1][1] is False
    final = w.result.values[0]
    # the steps come spread over the path: the first chunk is already close to the
    # result (correlated), and the map is exactly the synchronous one
    assert np.corrcoef(estimates[0].ravel(), final.ravel())[0, 1] > 0.5
    expected = xw.Explainer(tiny, IMAGES[:1]).explain(
        "integrated_gradients", target=w.controls["target"].value, steps=4 * BACKGROUND_BATCH)
    np.testing.assert_allclose(final, expected.values[0], rtol=1e-4, atol=1e-6)
    w.close()


# --------------------------------------------------------------------- downloads
def link_bytes(w) -> bytes:
    match = re.search(r"href='data:[^;]+;base64,([^']+)'", w.download_link.value)
    assert match, w.download_link.value
    return base64.b64decode(match.group(1))


def test_downloads_hand_the_files_to_the_browser(tiny, tmp_path):
    w = xw.ExplainerWidget(tiny, IMAGES, method="fem")
    w.save_name.value = "my map"
    assert w.download("png") == "my map.png"
    assert "download='my map.png'" in w.download_link.value
    assert link_bytes(w) == w.png_bytes() == w.save_png(tmp_path / "a.png").read_bytes()
    assert w.download("netcdf") == "my map.nc"
    path = tmp_path / "b.nc"
    path.write_bytes(link_bytes(w))
    back = xr.load_dataarray(path)
    np.testing.assert_array_equal(back.values, w.result.values)
    assert back.attrs["method"] == "fem"
    with pytest.raises(ValueError, match="png"):
        w.download("jpeg")


# ------------------------------------------------------------------------ layout
def test_layout_image_beside_a_large_map_top5_and_thumbnails(tiny):
    w = xw.ExplainerWidget(tiny, IMAGES, method="gradcam")
    assert w.grid.cols == 2 and w.grid.rows == 1       # the image, and the map beside it
    # two large panels, and the figure fits a notebook at a 900 px window (720 px)
    assert w.figure.layout.height >= 360 and 2 * 320 <= w.figure.layout.width <= 720
    assert w.grid.image(0).source and w.grid.heatmap(0).z is None  # panel 0: the image
    options = w.controls["target"].options
    bars = re.findall(r"title='([^']*)'>", w.top5.value)[1:]  # [0]: the chart's
    assert bars == [label.rpartition(" (")[0] for label, _ in options[:5]]
    assert len(w.thumbnails.children) == len(IMAGES)
    w.thumbnails.children[1].children[1].click()       # a thumbnail picks its image
    assert w.index == 1 and w.result.image.item() == 1
    assert w.thumbnails.children[1].children[1].button_style == "info"
    side = w.children[1].children[0]
    assert side.layout.min_width == f"{SIDE_PX}px"     # never squeezed by the figure
    assert w.children[1].layout.flex_flow == "row wrap"  # narrow screens: wraps, no clipping


def test_fem_stack_side_panel_shows_the_layer_name(tiny):
    w = xw.FEMStackWidget(tiny, IMAGES)
    assert w.controls["layer"].readout is False
    assert w.layers[-1] in w.layer_label.value
    w.controls["layer"].value = w.layers[0]
    assert w.layers[0] in w.layer_label.value and "(1/" in w.layer_label.value


# ------------------------------------------------- add_image validates first (#13)
def widget_state(w) -> tuple:
    return (len(w.images), list(w.controls["image"].options), w.index,
            len(w.thumbnails.children), w.result.image.item())


@pytest.mark.parametrize("bad, match", [
    (np.full((3, 32, 32), 2.0, dtype=np.float32), r"\[0, 1\]"),
    (np.zeros((3, 16, 16), dtype=np.float32), "resize"),
    (np.zeros((3, 32, 32), dtype=np.uint8), "dtype"),
    (np.zeros((32, 32), dtype=np.float32), "shape"),
    (np.zeros((1, 32, 32), dtype=np.float32), "channels"),
    ("not an image", "dtype"),
])
def test_add_image_refuses_bad_images_and_changes_nothing(tiny, bad, match):
    w = xw.ExplainerWidget(tiny, IMAGES, method="gradient", preprocess=lambda x: x - 0.5)
    before = widget_state(w)
    with pytest.raises((TypeError, ValueError), match=match):
        w.add_image(bad)
    assert widget_state(w) == before


def test_a_bad_upload_shows_an_error_and_changes_nothing(tiny):
    w = xw.ExplainerWidget(tiny, IMAGES, method="gradient")
    before = widget_state(w)
    w._on_upload({"new": ({"name": "broken.png", "content": memoryview(b"not a png")},)})
    assert w.error is not None and widget_state(w) == before


def test_compare_widget_accepts_added_images_without_reference(tiny):
    ds = xr.Dataset({"gfdm": (("image", "y", "x"), np.random.default_rng(0).random((2, 32, 32)))})
    w = xw.CompareWidget(tiny, IMAGES, ["gradient", "gradcam"], reference=ds)
    assert np.isfinite(w.scores.values).all()
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    index = w.add_image(xw.datasets.read_image(rendering.png_bytes(rgb), (32, 32)), "black")
    assert index == 2 and w.error is None and w.result.image.item() == 2
    assert np.isnan(w.scores.values).all()
    titles = [a.text for a in w.figure.layout.annotations]
    assert "no reference" in titles[0] and titles[2] == "no reference for this image"
    w.controls["image"].value = 0                      # the original images keep theirs
    assert np.isfinite(w.scores.values).all() and "reference (GFDM)" in \
        [a.text for a in w.figure.layout.annotations]


# ------------------------------------------------------------- inside a kernel
KERNEL_CODE = r"""
import sys, threading, torch, xaiwidgets as xw
sys.path.insert(0, {root!r})
from tests.conftest import make_tiny_resnet
w = xw.ExplainerWidget(make_tiny_resnet(), torch.rand(2, 3, 32, 32), method="gradient")
display(w)
assert w.background and w.wait(120)
with w.hold():
    w.controls["method"].value = "smoothgrad"
    w.controls["n"].value = 64
busy = w.busy
assert w.wait(120) and w.result.attrs["method"] == "smoothgrad" and w.error is None
print("OK", w.background, busy, w.worker._thread.name)
"""


def test_in_a_kernel_the_widget_computes_in_the_background_and_updates_reach_the_front():
    from pathlib import Path
    from queue import Empty

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        msg_id = kc.execute(KERNEL_CODE.format(root=str(Path(__file__).parents[1])))
        text, updates, deadline = [], 0, time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=5)
            except Empty:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_msg" and content["data"].get("method") == "update":
                updates += 1
            elif kind == "stream":
                text.append(content["text"])
            elif kind == "error":
                text.append("\n".join(content["traceback"]))
            elif (kind == "status" and content["execution_state"] == "idle"
                  and msg["parent_header"].get("msg_id") == msg_id):
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    output = "".join(text)
    assert "OK True True xaiwidgets-ExplainerWidget" in output, output[-3000:]
    assert updates > 0  # trait changes made in the worker thread were sent to the browser


# ------------------------------------------------------------------ benchmark
def test_widget_latency_benchmark_rows(tiny):
    from benchmarks.slider import time_widget_changes, widget_markdown

    w = idle_widget(tiny, "gradcam")
    second = w.controls["target"].options[1][1]  # "target" 1: the second most probable
    rows = time_widget_changes(w, (("opacity", 0.4), ("target", 1),
                                   ("method", "integrated_gradients")))
    w.close()
    assert [r["control"] for r in rows] == ["opacity", "target", "method"]
    assert all(0 < r["return_ms"] <= r["drawn_ms"] and r["error"] is None for r in rows)
    assert rows[1]["value"] == str(second) and w.result.attrs["method"] != "gradcam"
    assert rows[2]["first_estimate_ms"] is not None  # IG: 32 steps, chunks of 8
    assert rows[2]["first_estimate_ms"] <= rows[2]["drawn_ms"]
    assert "| ExplainerWidget | opacity → 0.4 |" in widget_markdown(rows)


@pytest.mark.parametrize("method, params, unit", [
    ("lime", {"n_samples": 3 * BACKGROUND_BATCH, "n_segments": 8}, "samples"),
    ("occlusion", {"window": 8, "stride": 4}, "windows"),
    ("meaningful_perturbation", {"steps": 6}, "steps"),
])
def test_perturbation_methods_draw_first_estimates(tiny, method, params, unit):
    w = idle_widget(tiny, "gradient")
    drawn = record_draws(w)
    statuses = record_statuses(w)
    with w.hold():
        w.controls["method"].value = method
        for name, value in params.items():
            w.controls[w.params.keys[method][name]].value = value
    assert w.wait(120) and w.error is None
    assert [first for m, first, _ in drawn if m == method][0] is True  # an estimate first
    assert drawn[-1][:2] == (method, False)                            # the result last
    assert any(re.search(rf"\d+/\d+ {unit}", s) for s in statuses)
    expected = xw.Explainer(tiny, IMAGES[:1]).explain(
        method, target=w.controls["target"].value, **params)
    np.testing.assert_allclose(w.result.values, expected.values, rtol=1e-4, atol=1e-5)
    w.close()


def test_shown_maps_are_compared_at_the_display_precision():
    # #22's flake: values 1e-7 apart round to neighbouring 5-digit display steps
    from xaiwidgets.widgets.figures import display_values

    from .helpers import assert_display_close

    engine = np.array([1.0, 0.12344999])
    shown = display_values(np.array([1.0, 0.12345001]))  # 0.1235, the engine's 0.1234
    with pytest.raises(AssertionError):  # the comparison that flaked
        np.testing.assert_allclose(shown, display_values(engine), rtol=1e-4, atol=1e-5)
    assert_display_close(shown, engine)  # one display step apart: equal as displayed
    with pytest.raises(AssertionError):  # two steps apart is a different picture
        assert_display_close(shown + np.array([0.0, 1e-4]), engine)
