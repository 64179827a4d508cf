"""DatasetExplorer: predictions, filters, sorting, paging cache, confusion clicks, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import TensorDataset

import xaiwidgets as xw
from xaiwidgets.evaluation import perturbation
from xaiwidgets.widgets import dataset_explorer as dx
from xaiwidgets.widgets.dataset_explorer import DatasetExplorer
from xaiwidgets.widgets.worker import Superseded

pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def shapes_model():
    return xw.models.load("shapes-resnet")


@pytest.fixture(scope="module")
def data():
    # 64 px images for a model trained at 128 px: plenty of mistakes to filter
    return xw.datasets.shapes(n=24, size=64, seed=5)


@pytest.fixture(scope="module")
def explorer(shapes_model, data):
    model, preprocess, classes = shapes_model
    return DatasetExplorer(model, data, preprocess=preprocess, methods=["gradcam", "fem"],
                           background=False, page_size=4)


def test_opens_with_batched_predictions_and_confusion(explorer, shapes_model, data):
    model, preprocess, _ = shapes_model
    with torch.no_grad():
        probs = torch.softmax(model(preprocess(torch.from_numpy(data.image.values))), 1)
    np.testing.assert_array_equal(explorer.predicted, probs.argmax(1).numpy())
    np.testing.assert_allclose(explorer.confidence, probs.max(1).values.numpy(), rtol=1e-5)
    labels = data.label.values
    counts = explorer.confusion
    assert counts.dims == ("true", "predicted") and int(counts.sum()) == len(labels)
    for t in range(4):
        for p in range(4):
            expected = int(np.sum((labels == t) & (explorer.predicted == p)))
            assert int(counts.values[t, p]) == expected
    assert list(counts.true.values) == list(data.attrs["classes"])
    assert explorer.metric == "pcc"  # the dataset has a gfdm
    # the confusion matrix is also a plotly heatmap with the same counts
    np.testing.assert_array_equal(np.asarray(explorer.confusion_figure.data[0].z), counts.values)


def test_first_page_scores_match_evaluate(explorer, shapes_model, data):
    model, preprocess, _ = shapes_model
    with explorer._silenced():
        for name, value in (("outcome", "all"), ("class", "all"), ("sort", dx.ORDER),
                            ("method", "gradcam"), ("page", 1)):
            explorer.controls[name].value = value
    explorer.filter_pair(None)
    assert explorer.shown == [0, 1, 2, 3]
    ref = xw.evaluate(model, data.isel(image=explorer.shown), ["gradcam"], ["pcc"],
                      preprocess=preprocess, progress=False)
    got = explorer.results.pcc.sel({"image": explorer.shown, "method": "gradcam"})
    np.testing.assert_allclose(got.values, ref.pcc.values[:, 0], rtol=1e-4, atol=1e-5)
    res = explorer.results
    assert res.pcc.dims == ("image", "method") and res.pcc.attrs["higher_is_better"] == 1
    np.testing.assert_array_equal(res.correct.values, res.label.values == res.predicted.values)
    # thumbnails: the picture and its map, side by side, with the score in the caption
    tile = explorer._tiles[0]
    assert tile.image.value[:4] == b"\x89PNG"
    assert f"pcc {got.values[0]:.3f}" in tile.caption.value


def test_filters_sorting_and_paging_cache(explorer, monkeypatch):
    labels, predicted = explorer.labels, explorer.predicted
    explorer.controls["outcome"].value = "wrong"
    wrong = np.flatnonzero(labels != predicted)
    assert len(wrong) > 4, "the fixture should have mistakes"
    assert explorer.shown == wrong[:4].tolist()
    explorer.controls["sort"].value = "confidence ↓"
    order = wrong[np.argsort(-explorer.confidence[wrong], kind="stable")]
    assert explorer.shown == order[:4].tolist()
    assert explorer.controls["page"].max == -(-len(wrong) // 4)
    explorer.controls["page"].value = 2
    assert explorer.shown == order[4:8].tolist()
    # paging back costs nothing: no map is recomputed
    calls = []
    original = DatasetExplorer._compute
    monkeypatch.setattr(DatasetExplorer, "_compute",
                        lambda self, m, idx: (calls.append(idx), original(self, m, idx)))
    explorer.controls["page"].value = 1
    assert calls == [] and explorer.shown == order[:4].tolist()
    # a class filter: true class only
    explorer.controls["class"].value = "star"
    assert all(labels[i] == 3 and predicted[i] != 3 for i in explorer.shown)
    explorer.controls["outcome"].value = "correct"
    assert all(labels[i] == 3 == predicted[i] for i in explorer.shown)


def test_sort_by_metric_scores_every_candidate(explorer):
    with explorer._silenced():
        explorer.controls["outcome"].value = "all"
        explorer.controls["class"].value = "all"
    explorer.controls["sort"].value = "pcc ↓"
    scores = explorer.results.pcc.sel({"method": "gradcam"})
    assert scores.sizes["image"] == 24 and not np.isnan(scores.values).any()
    expected = scores.image.values[np.argsort(-scores.values, kind="stable")][:4]
    assert explorer.shown == expected.tolist()
    explorer.controls["sort"].value = "pcc ↑"
    assert explorer.shown == scores.image.values[np.argsort(scores.values, kind="stable")][
        :4].tolist()
    labels = [label for label, _ in [(o, o) for o in explorer.controls["sort"].options]]
    assert {"pcc ↑", "pcc ↓", "confidence ↑", "confidence ↓"} <= set(labels)


def test_confusion_click_filters_the_gallery(explorer):
    labels, predicted = explorer.labels, explorer.predicted
    counts = explorer.confusion.values.copy()
    np.fill_diagonal(counts, 0)
    t, p = np.unravel_index(np.argmax(counts), counts.shape)
    names = explorer.classes
    with explorer._silenced():
        explorer.controls["sort"].value = dx.ORDER

    class Points:  # what plotly passes to a heatmap's on_click callback
        xs, ys, point_inds = [names[p]], [names[t]], [[t, p]]

    explorer._on_cell(explorer.confusion_figure.data[0], Points(), None)
    pair = np.flatnonzero((labels == t) & (predicted == p))
    assert explorer.shown == pair[:4].tolist() and explorer.shown
    assert explorer.controls["class"].value == names[t]
    assert f"predicted as <b>{names[p]}</b>" in explorer.pair_label.value
    explorer.controls["outcome"].value = "wrong"  # the user's own filter replaces the click
    assert explorer._pair is None
    wrong_t = np.flatnonzero((labels == t) & (predicted != t))
    assert explorer.shown == wrong_t[:4].tolist()
    assert explorer._pair_box.layout.display == "none"


def test_empty_filter_result_is_a_message(explorer):
    labels, predicted = explorer.labels, explorer.predicted
    empty = [(t, p) for t in range(4) for p in range(4)
             if not np.any((labels == t) & (predicted == p))]
    assert empty
    explorer.filter_pair(*empty[0])
    assert explorer.shown == [] and explorer.error is None
    assert "No image matches" in explorer.message and explorer.message in explorer.empty.value
    assert explorer.gallery.layout.display == "none"
    explorer.filter_pair(None)
    assert explorer.shown and explorer.message == ""


def test_select_opens_the_image_in_an_explainer_widget(explorer, data):
    w = explorer.select(5)
    assert w is explorer.explainer and w.method == explorer.method
    np.testing.assert_array_equal(w.images[0].numpy(), data.image.values[5])
    assert w.wait(timeout=60) and w.result is not None and w.error is None
    with pytest.raises(IndexError, match="out of range"):
        explorer.select(24)


def test_torch_dataset_without_gaze_scores_deletion(shapes_model, data):
    model, preprocess, classes = shapes_model
    images = torch.from_numpy(data.image.values[:6])
    pairs = TensorDataset(images, torch.from_numpy(data.label.values[:6]))
    x = DatasetExplorer(model, pairs, preprocess=preprocess, classes=classes,
                        methods=["gradient"], background=False, page_size=3)
    assert x.metric == "deletion" and x.shown == [0, 1, 2]
    assert x.results.deletion.attrs["higher_is_better"] == 0
    ex = xw.Explainer(model, images[:3], preprocess=preprocess)
    maps = ex.explain("gradient")
    ref = perturbation.deletion(ex, maps, step=dx.PERTURBATION_STEP).auc.values
    np.testing.assert_allclose(x.results.deletion.values[:, 0], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="compares maps with gaze data .*'deletion'"):
        DatasetExplorer(model, pairs, preprocess=preprocess, metric="pcc", background=False)


def test_bad_input_errors(shapes_model, data):
    model, preprocess, _ = shapes_model
    with pytest.raises(ValueError, match="needs an `image` variable"):
        DatasetExplorer(model, data.drop_vars("image"), preprocess=preprocess)
    bad = data.isel(image=slice(0, 3)).copy()
    bad["label"] = ("image", np.array([0, 7, 1]))
    with pytest.raises(ValueError, match="labels out of range: image 1 has label 7"):
        DatasetExplorer(model, bad, preprocess=preprocess, background=False)
    with pytest.raises(ValueError, match="unknown metric 'psc'"):
        DatasetExplorer(model, data, preprocess=preprocess, metric="psc")
    no_fix = data.isel(image=slice(0, 3)).drop_vars("fixations")
    with pytest.raises(ValueError, match="`fixations`"):
        DatasetExplorer(model, no_fix, preprocess=preprocess, metric="nss", background=False)
    with pytest.raises(ValueError, match="3 class names for a model with 4 outputs"):
        DatasetExplorer(model, data.isel(image=slice(0, 3)), preprocess=preprocess,
                        classes=["a", "b", "c"], background=False)


def test_unlabelled_images_have_no_confusion(shapes_model, data):
    model, preprocess, _ = shapes_model
    ds = xr.Dataset({"image": data.image[:5]}, attrs=data.attrs)
    x = DatasetExplorer(model, ds, preprocess=preprocess, methods=["fem"], background=False,
                        page_size=8)
    assert x.confusion is None and x.confusion_figure is None
    assert x.controls["outcome"].disabled and x.shown == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no labels"):
        x.filter_pair("circle", "star")
    # the class filter falls back to the predicted class
    name = x.classes[int(x.predicted[0])]
    x.controls["class"].value = name
    assert x.shown == np.flatnonzero(x.predicted == x.predicted[0]).tolist()


def test_large_dataset_computes_only_the_page():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    images = torch.rand(3000, 3, 16, 16)
    pairs = TensorDataset(images, torch.randint(0, 3, (3000,)))
    x = DatasetExplorer(model, pairs, methods=["gradient"], background=False, page_size=6,
                        batch_size=500)
    assert len(x.predicted) == 3000 and x.results.sizes["image"] == 6
    assert x.open_s < 30  # predictions only (plus one page)


def test_background_compute_and_wait(shapes_model, data):
    model, preprocess, _ = shapes_model
    x = DatasetExplorer(model, data.isel(image=slice(0, 8)), preprocess=preprocess,
                        methods=["gradcam", "fem"], background=True, page_size=4)
    assert x.wait(timeout=120) and not x.busy
    assert x.shown == [0, 1, 2, 3] and x.results.sizes["image"] == 4
    x.controls["method"].value = "fem"
    x.controls["page"].value = 2  # supersedes the fem page-1 job
    assert x.wait(timeout=120) and x.error is None
    assert x.shown == [4, 5, 6, 7]
    fem = x.results.pcc.sel({"method": "fem"}).dropna("image")
    assert {4, 5, 6, 7} <= set(fem.image.values.tolist())


def test_clear_pair_clears_the_class_filter_and_the_opened_image_keeps_its_index(explorer):
    """Class-app regressions: "clear pair" left the class filter of the click set; the
    opened image's header said "image 5" while its picker and title said "image 0"."""
    with explorer._silenced():
        explorer.controls["outcome"].value = "all"
        explorer.controls["class"].value = "all"
    true = int(explorer.labels[0])
    explorer.filter_pair(true, int(explorer.predicted[0]))
    assert explorer.controls["class"].value == explorer.classes[true]
    explorer.filter_pair(None)
    assert explorer.controls["class"].value == "all"
    assert len(explorer._candidates()) == len(explorer.source)  # every image again
    w = explorer.select(5)
    assert w.wait(timeout=60)
    head = explorer._detail.children[0].value
    assert head.startswith("<b>image 5</b>")
    assert w.controls["image"].label == "image 5"
    assert w.figure.layout.annotations[0].text == "image 5"


def tiny_explorer(background: bool) -> DatasetExplorer:
    """12 random 16 px images, a 3-class convnet: fast enough to test the update loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    pairs = TensorDataset(torch.rand(12, 3, 16, 16), torch.randint(0, 3, (12,)))
    x = DatasetExplorer(model, pairs, methods=["gradient"], background=background,
                        page_size=4)
    assert x.wait(timeout=60) and x.error is None
    return x


def test_silencing_in_one_thread_does_not_silence_another():
    """The explorer had its own ``_silenced`` (one counter for all threads): while the
    worker re-ranged the page slider, a user's change in another thread was dropped."""
    x = tiny_explorer(background=False)
    inside, leave = threading.Event(), threading.Event()

    def worker_side():
        with x._silenced():
            inside.set()
            leave.wait(30)

    other = threading.Thread(target=worker_side)
    other.start()
    try:
        assert inside.wait(30)
        x.controls["sort"].value = f"confidence {dx.DESCENDING}"  # the user's change counts
    finally:
        leave.set()
        other.join()
    assert x.shown == np.argsort(-x.confidence, kind="stable")[:4].tolist()
    with x._silenced():  # the explorer's own change in this thread does not
        x.controls["sort"].value = dx.ORDER
    assert x.shown == np.argsort(-x.confidence, kind="stable")[:4].tolist()


def test_superseded_propagates_and_a_stale_page_is_never_drawn(monkeypatch):
    """The explorer's own ``_guarded`` showed ``Superseded`` as an error instead of
    letting the worker end the stale job; a superseded job neither draws nor errs."""
    x = tiny_explorer(background=True)

    def replaced():
        raise Superseded("a newer request came")

    with pytest.raises(Superseded):
        x._guarded(replaced)
    assert x.error is None
    started, release = threading.Event(), threading.Event()
    compute, drawn = x._compute, []

    def slow_then_fail(method, indices):
        if not started.is_set():  # the first (soon stale) job: blocks, then fails
            started.set()
            release.wait(30)
            raise RuntimeError("stale failure")
        compute(method, indices)

    monkeypatch.setattr(x, "_compute", slow_then_fail)
    monkeypatch.setattr(x, "_draw", lambda page, draw=x._draw: (drawn.append(
        [int(i) for i in page]), draw(page)))
    x.controls["sort"].value = f"confidence {dx.ASCENDING}"  # page 1 of the new order
    assert started.wait(30)
    x.controls["page"].value = 3  # supersedes it
    superseded_at = len(drawn)
    release.set()
    assert x.wait(timeout=60) and x.error is None
    last_page = np.argsort(x.confidence, kind="stable")[8:12].tolist()
    assert x.shown == last_page
    assert drawn[superseded_at:] and all(page == last_page for page in drawn[superseded_at:])
    assert "stale failure" not in x.status.value


def test_cancel_stops_the_page_and_close_stops_the_worker(monkeypatch):
    x = tiny_explorer(background=True)
    started, release = threading.Event(), threading.Event()

    def blocked(method, indices):
        started.set()
        release.wait(30)
        x.worker.check()  # the engine's cancellation point

    monkeypatch.setattr(x, "_compute", blocked)
    x.controls["page"].value = 2
    assert started.wait(30) and x.busy
    assert x.cancel() is True
    assert "cancelled" in x.status.value and x.progress.layout.display == "none"
    release.set()
    assert x.wait(timeout=30) and x.error is None and not x.busy
    assert x.cancel() is False  # nothing running
    x.close()
    with pytest.raises(RuntimeError, match="closed"):
        x.worker.submit(lambda token: None)


# ------------------------------------------------------------------ store=
class Calls:
    """Counts the forward calls of a model (a forward pre-hook, removed on exit)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.count = model, 0

    def __enter__(self) -> Calls:
        self.handle = self.model.register_forward_pre_hook(
            lambda module, args: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def test_store_reopens_predictions_scores_and_maps_without_a_model_call(
        tmp_path, shapes_model, data):
    model, preprocess, _ = shapes_model
    path = tmp_path / "explorer.zarr"
    kwargs = dict(preprocess=preprocess, methods=["gradcam", "fem"], background=False,
                  page_size=4, store=path)
    first = DatasetExplorer(model, data, **kwargs)
    first.controls["sort"].value = "pcc ↓"  # every image's gradcam score
    first.controls["method"].value = "fem"  # fem on the pcc-sorted first page
    first.controls["sort"].value = dx.ORDER
    first.controls["method"].value = "gradcam"
    before = first.results
    assert before.pcc.sel({"method": "gradcam"}).notnull().sum() == 24
    with Calls(model) as calls:
        again = DatasetExplorer(model, data, **kwargs)
        assert calls.count == 0 and again.error is None
        np.testing.assert_array_equal(again.predicted, first.predicted)
        np.testing.assert_allclose(again.confidence, first.confidence, rtol=1e-6)
        xr.testing.assert_equal(again.results, before)  # every score, both methods
        assert again.shown == first.shown == [0, 1, 2, 3]
        # the thumbnails show the stored maps (float16: equal to display precision)
        for i in again.shown:
            np.testing.assert_allclose(again._maps[("gradcam", i)],
                                       first._maps[("gradcam", i)], atol=2e-3)
        again.controls["sort"].value = "pcc ↓"  # scores and that page's maps: stored
        assert calls.count == 0
    assert again.shown == first.results.pcc.sel({"method": "gradcam"}).to_series() \
        .sort_values(ascending=False, kind="stable").index[:4].tolist()
    # a page never drawn before: its maps are computed, its scores are not
    again.controls["sort"].value = dx.ORDER
    scored = []
    original = again._compute
    again._compute = lambda m, idx, score=True: (scored.append(score), original(m, idx, score))
    again.controls["page"].value = 3
    assert scored == [False] and again.error is None and again.shown == [8, 9, 10, 11]
    # another metric keeps the predictions and starts its own scores
    with Calls(model) as calls:
        sim = DatasetExplorer(model, data, metric="sim", **kwargs)
        assert sim.results.sizes["image"] == 4  # the first page only
    assert calls.count > 0


def test_store_resumes_an_interrupted_opening_and_leaves_nothing_half_written(
        tmp_path, shapes_model, data, monkeypatch):
    model, preprocess, _ = shapes_model
    path = tmp_path / "explorer.zarr"
    monkeypatch.setattr(dx, "STORE_CHUNK", 10)  # chunks of 10, 10 and 4 images
    seen = []
    original = DatasetExplorer._predict_chunk

    def interrupted(self, indices):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(indices.tolist())
        return original(self, indices)

    monkeypatch.setattr(DatasetExplorer, "_predict_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DatasetExplorer(model, data, preprocess=preprocess, methods=["fem"],
                        background=False, store=path)
    assert not list(path.glob("**/.tmp-*")) and not (path / "result").exists()
    assert sorted(p.name for p in (path / "chunks").iterdir()) == ["c000000"]
    resumed = []
    monkeypatch.setattr(DatasetExplorer, "_predict_chunk", lambda self, indices: (
        resumed.append(indices.tolist()), original(self, indices))[1])
    x = DatasetExplorer(model, data, preprocess=preprocess, methods=["fem"],
                        background=False, store=path)
    assert resumed == [list(range(10, 20)), list(range(20, 24))]
    plain = DatasetExplorer(model, data, preprocess=preprocess, methods=["fem"],
                            background=False)
    np.testing.assert_array_equal(x.predicted, plain.predicted)
    np.testing.assert_allclose(x.confidence, plain.confidence, rtol=1e-6)
    assert (path / "result").exists() and not (path / "chunks").exists()


def test_store_fingerprint_other_weights_recompute_other_models_fail(
        tmp_path, shapes_model, data):
    import copy
    import json

    model, preprocess, _ = shapes_model
    path = tmp_path / "explorer.zarr"
    small = data.isel(image=slice(0, 8))
    kwargs = dict(preprocess=preprocess, methods=["fem"], background=False, store=path)
    first = DatasetExplorer(model, small, **kwargs)
    fingerprint = (path / "fingerprint.json").read_text()
    # other weights: a warning, the model runs again, the new predictions are stored
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias.add_(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    with pytest.warns(UserWarning, match="other weights: recomputing"), Calls(other) as calls:
        x = DatasetExplorer(other, small, **kwargs)
    assert calls.count > 0 and (x.predicted == 0).all() and not (first.predicted == 0).all()
    assert json.loads((path / "fingerprint.json").read_text()) != json.loads(fingerprint)
    # another architecture: a clear error, the store untouched
    written = (path / "fingerprint.json").read_text()
    vgg, vgg_preprocess, _ = xw.models.load("shapes-vgg")
    with pytest.raises(ValueError, match="another model .*store= another path, or "
                                         "overwrite=True"):
        DatasetExplorer(vgg, small, **kwargs)
    assert (path / "fingerprint.json").read_text() == written
    # a store of concept references is not replaced either
    refs = tmp_path / "refs.zarr"
    xw.concepts.references(model, small, "layer4", top=2, preprocess=preprocess,
                           store=str(refs), progress=False)
    with pytest.raises(ValueError, match="another kind \\(kind='concept-references'\\)"):
        DatasetExplorer(model, small, preprocess=preprocess, background=False, store=refs)
    # a folder that is no store; a failure before the first write leaves no folder
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="not an xaiwidgets results store"):
        DatasetExplorer(model, small, **{**kwargs, "store": tmp_path / "mine"})
    bad = small.copy()
    bad["label"] = ("image", np.array([0, 7, 1, 0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="labels out of range"):
        DatasetExplorer(model, bad, **{**kwargs, "store": tmp_path / "new.zarr"})
    assert not (tmp_path / "new.zarr").exists()


def test_store_keeps_the_scores_computed_before_a_failure(tmp_path, shapes_model, data):
    """Scores are written as they come: a sort by the metric that fails part-way leaves
    the scores computed before the failure in the store."""
    model, preprocess, _ = shapes_model
    kwargs = dict(preprocess=preprocess, methods=["fem"], background=False, page_size=4,
                  store=tmp_path / "x.zarr")
    x = DatasetExplorer(model, data, **kwargs)
    compute, calls = x._compute, []

    def fails_third(method, indices, score=True):
        calls.append(list(indices))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        compute(method, indices, score)

    x._compute = fails_third
    x.controls["sort"].value = "pcc ↓"  # every image: the 3rd chunk fails
    assert "out of memory" in x.error
    scored = x.results.pcc.sel({"method": "fem"}).dropna("image")
    assert sorted(scored.image.values.tolist()) == sorted(
        [0, 1, 2, 3, *calls[0], *calls[1]])
    with Calls(model) as counted:
        again = DatasetExplorer(model, data, **kwargs)
        assert counted.count == 0
    xr.testing.assert_equal(again.results, x.results)
