"""LookWidget: the student's clicks as fixations, their GFDM, scores against the methods,
save/merge of a class, the class view, the timed mode and the bad inputs."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from tests.conftest import make_tiny_cnn
from tests.helpers import assert_untouched, state
from xaiwidgets import metrics

SIZE = 32
CLICKS = {0: [(5, 6), (10, 12), (10, 12), (30, 1)], 2: [(16, 16)]}


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def clicked(widget: xw.LookWidget, clicks: dict = CLICKS) -> xw.LookWidget:
    for i, points in clicks.items():
        for y, x in points:
            assert widget.click(i, y, x) is True
    return widget


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_cnn()


def test_gfdm_is_xw_gfdm_of_the_clicks():
    g = clicked(xw.LookWidget(images()))
    assert g.sigma == SIZE / 16  # the datasets' convention
    for i in range(3):
        points = np.array(CLICKS.get(i, []), dtype=float).reshape(-1, 2)
        expected = xw.gfdm(points, shape=(SIZE, SIZE), sigma=g.sigma)
        np.testing.assert_allclose(g.gfdm.values[i], expected, atol=1e-6)
    assert g.fixations.dims == ("image", "y", "x")
    assert int(g.fixations.sel(image=0, y=10, x=12)) == 2
    assert int(g.fixations.sum()) == 5
    assert not g.gfdm.values[1].any()  # no clicks: an all-zero map
    # an explicit sigma, and a click between pixels goes to the nearest one
    h = xw.LookWidget(images(), sigma=5.0)
    h.click(1, 3.4, 7.6)
    np.testing.assert_allclose(h.gfdm.values[1],
                               xw.gfdm(np.array([[3, 8]]), (SIZE, SIZE), sigma=5.0), atol=1e-6)


def test_scores_are_the_metrics_on_the_same_maps(model):
    before = state(model)
    gaze = np.random.default_rng(1).random((3, SIZE, SIZE))
    g = clicked(xw.LookWidget(images(), model=model, methods=("gradcam", "gradient"),
                              gaze=gaze))
    scores = g.scores
    assert list(scores.method.values) == ["gradcam", "gradient", "observer"]
    ex = xw.Explainer(model, images())
    for i, points in CLICKS.items():
        student = xw.gfdm(np.array(points, float), (SIZE, SIZE), sigma=SIZE / 16)
        counts = np.zeros((SIZE, SIZE))
        for y, x in points:
            counts[y, x] += 1
        for name in ("gradcam", "gradient", "observer"):
            saliency = gaze[i] if name == "observer" else ex.explain(name).values[i]
            row = scores.sel({"image": i, "method": name})
            np.testing.assert_allclose(float(row.pcc), metrics.pcc(saliency, student),
                                       rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(float(row.sim), metrics.sim(saliency, student),
                                       rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(float(row.nss), metrics.nss(saliency, counts),
                                       rtol=1e-6, atol=1e-9)
    assert np.isnan(scores.sel(image=1).pcc.values).all()  # no clicks: NaN, not an error
    assert_untouched(model, before)


def test_gaze_from_a_dataset_and_without_a_model():
    ds = xw.datasets.shapes(n=2, size=SIZE, seed=3)
    g = xw.LookWidget(ds, gaze=ds)
    assert g.methods == [] and list(g.scores.method.values) == ["observer"]
    g.click(0, 12, 12)
    np.testing.assert_allclose(float(g.scores.pcc.sel({"image": 0, "method": "observer"})),
                               metrics.pcc(ds.gfdm.values[0], g.gfdm.values[0]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"gaze has shape \(3, 8, 8\); expected \(2, 32, 32\)"):
        xw.LookWidget(ds, gaze=np.zeros((3, 8, 8)))


def test_reveal_only_after_looking_and_no_clicks_is_a_note(model):
    g = xw.LookWidget(images(), model=model, methods=("gradcam",))
    assert g.reveal_button.disabled
    assert g.reveal_box.layout.display == "none"
    scores = g.reveal(1)  # from code: allowed, NaN with a note
    assert np.isnan(scores.pcc.values).all()
    assert "no clicks" in g.reveal_table.value
    g.controls["image"].value = 0
    assert g.reveal_button.disabled and g.reveal_box.layout.display == "none"
    g.click(0, 4, 4)
    assert not g.reveal_button.disabled
    g.reveal_button.click()
    assert g.reveal_box.layout.display is None and g.error is None
    assert "PCC" in g.reveal_table.value and "gradcam" in g.reveal_figure.layout.annotations[1].text


def test_clicks_outside_the_image(model):
    g = xw.LookWidget(images())
    with pytest.raises(ValueError, match=r"outside image 0 \(32×32 pixels"):
        g.click(0, 40, 3)
    with pytest.raises(IndexError, match="out of range"):
        g.click(5, 1, 1)
    # a click the browser reports outside (the plot's edge): ignored with a note
    g._on_plot_click(None, SimpleNamespace(xs=[-3], ys=[2]), None)
    assert int(g.fixations.sum()) == 0 and "ignored" in g.note
    g._on_plot_click(None, SimpleNamespace(xs=[7], ys=[2]), None)  # a real click, from the plot
    assert int(g.fixations.sel(image=0, y=2, x=7)) == 1
    assert list(g.figure.data[2].x) == [7] and list(g.figure.data[2].y) == [2]


def test_timed_mode_counts_only_the_clicks_while_shown():
    g = xw.LookWidget(images(), duration=0.4)
    g.controls["mode"].value = "timed"
    assert g.timed and g.start_button.layout.display is None
    assert g.click(0, 3, 3) is False and "press Start" in g.note  # not started
    g.start(0)
    assert g.click(0, 3, 3) is True and g.click(0, 4, 4) is True
    assert not g.has_looked(0)  # still looking: Reveal waits
    time.sleep(0.6)
    assert "time's up: 2 click(s)" in g.note
    assert g.click(0, 5, 5) is False and "not counted" in g.note  # too late
    assert g.has_looked(0) and not g.reveal_button.disabled
    assert int(g.fixations.sum()) == 2
    g.close()


def test_save_merge_adds_the_counts(tmp_path):
    a = clicked(xw.LookWidget(images()))
    b = xw.LookWidget(images())
    b.click(0, 10, 12)
    b.click(1, 20, 20)
    paths = [a.save(tmp_path / "ada.nc"), b.save(tmp_path / "bob.nc")]
    merged = xw.LookWidget.merge(paths)
    np.testing.assert_array_equal(merged.fixations.values, a._counts + b._counts)
    assert list(merged.student.values) == ["ada", "bob"]
    np.testing.assert_array_equal(merged.student_fixations.sel(student="bob").values, b._counts)
    np.testing.assert_allclose(merged.gfdm.values,
                               xw.gfdm(a._counts + b._counts, sigma=SIZE / 16), atol=1e-6)
    assert int(merged.fixations.sel(image=0, y=10, x=12)) == 3


def test_merge_refuses_files_of_other_images_or_sigma(tmp_path):
    a = xw.LookWidget(images(seed=0))
    other = xw.LookWidget(images(seed=1))
    wide = xw.LookWidget(images(seed=0), sigma=4.0)
    for g, name in ((a, "a.nc"), (other, "other.nc"), (wide, "wide.nc")):
        g.click(0, 1, 1)
        g.save(tmp_path / name)
    with pytest.raises(ValueError, match="a.nc and other.nc were made on different images"):
        xw.LookWidget.merge([tmp_path / "a.nc", tmp_path / "other.nc"])
    with pytest.raises(ValueError, match="different GFDM sigmas"):
        xw.LookWidget.merge([tmp_path / "a.nc", tmp_path / "wide.nc"])
    with pytest.raises(ValueError, match="at least one file"):
        xw.LookWidget.merge([])
    with pytest.raises(ValueError, match="other images"):
        a.class_scores(xw.LookWidget.merge([tmp_path / "other.nc"]))


def test_class_view_scores_the_class_and_each_student(tmp_path, model):
    a = clicked(xw.LookWidget(images(), model=model, methods=("gradcam",)))
    b = xw.LookWidget(images(), model=model, methods=("gradcam",))
    b.click(0, 11, 12)
    c = xw.LookWidget(images(), model=model, methods=("gradcam",))
    c.click(0, 25, 25)
    paths = [g.save(tmp_path / f"{n}.nc") for g, n in ((a, "a"), (b, "b"), (c, "c"))]
    merged = xw.LookWidget.merge(paths)
    scores = a.class_scores(merged)
    cam = xw.Explainer(model, images()).explain("gradcam").values
    np.testing.assert_allclose(float(scores.pcc.sel({"image": 0, "method": "gradcam"})),
                               metrics.pcc(cam[0], merged.gfdm.values[0]), rtol=1e-6)
    # a student against the other students (leave-one-out)
    others = b._counts[0] + c._counts[0]
    np.testing.assert_allclose(float(scores.agreement_pcc.sel(student="a", image=0)),
                               metrics.pcc(xw.gfdm(a._counts[0], sigma=2.0),
                                           xw.gfdm(others, sigma=2.0)), rtol=1e-6)
    assert np.isnan(float(scores.agreement_pcc.sel(student="b", image=2)))  # b: no clicks
    view = a.class_view(paths, image=0)
    assert "each student" in view.children[1].value and "<td>a</td>" in view.children[1].value


def test_handout_shows_every_image_revealed_and_leaves_the_widget(tmp_path, model):
    g = clicked(xw.LookWidget(images(), model=model, methods=("gradcam",)))
    path = g.export_html(tmp_path / "look.html", progress=False)
    text = path.read_text()
    assert text.count("PCC") >= 3 and "no clicks on this image yet" in text
    assert g._revealed == set() and g.reveal_box.layout.display == "none"


def test_download_is_the_saved_file(tmp_path):
    import base64
    import re

    g = clicked(xw.LookWidget(images()))
    g.student.value = "Ada L."
    assert g.download() == "Ada_L_.nc"
    data = base64.b64decode(re.search(r"base64,([^']+)'", g.download_link.value).group(1))
    (tmp_path / "d.nc").write_bytes(data)
    merged = xw.LookWidget.merge([tmp_path / "d.nc"])
    assert list(merged.student.values) == ["Ada L."]
    np.testing.assert_array_equal(merged.fixations.values, g._counts)
