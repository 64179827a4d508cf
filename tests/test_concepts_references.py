"""Concepts over a dataset (#23): reference patches against a brute-force top-k, the
store (round trip, fingerprint, resume, nothing half-written), dask = local, class
usage against per-class means, NMF concepts."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import DataLoader, TensorDataset

import xaiwidgets as xw
from tests.conftest import count_forwards
from tests.helpers import assert_unchanged, snapshot

refs_module = importlib.import_module("xaiwidgets.concepts.references")

LAYER = "features.20"  # 64 channels on 8×8 for 64 px images: stride 8


@pytest.fixture(scope="module")
def setup():
    model, preprocess, classes = xw.models.load("shapes-vgg")
    ds = xw.datasets.shapes(n=20, size=64, seed=5)
    return model, preprocess, ds


def brute_force(values: np.ndarray, maps: np.ndarray, top: int, size: int = 64) -> dict:
    """Top-k per channel over all images (value desc, index asc) and the box of the
    map ≥ half its max, each cell a stride of input pixels; plain numpy loops."""
    n, channels = values.shape
    stride = size // maps.shape[-1]
    out = {name: np.zeros((channels, top), dtype=np.int64) for name in
           ("image", "y0", "x0", "y1", "x1")}
    out["value"] = np.zeros((channels, top))
    for k in range(channels):
        order = sorted(range(n), key=lambda i: (-values[i, k], i))[:top]
        for rank, i in enumerate(order):
            m = maps[i, k]
            if m.max() > 0:
                ys, xs = np.nonzero(m >= 0.5 * m.max())
            else:
                ys, xs = np.array([0, m.shape[0] - 1]), np.array([0, m.shape[1] - 1])
            out["image"][k, rank], out["value"][k, rank] = i, values[i, k]
            out["y0"][k, rank], out["x0"][k, rank] = ys.min() * stride, xs.min() * stride
            out["y1"][k, rank] = (ys.max() + 1) * stride
            out["x1"][k, rank] = (xs.max() + 1) * stride
    return out


def assert_matches(result: xr.Dataset, expected: dict) -> None:
    for name in ("image", "y0", "x0", "y1", "x1"):
        np.testing.assert_array_equal(result[name].values, expected[name], err_msg=name)
    np.testing.assert_allclose(result["value"].values, expected["value"], rtol=1e-5, atol=1e-6)


def test_references_by_activation_equal_a_brute_force_top_k(setup):
    model, preprocess, ds = setup
    before = snapshot(model)
    result = xw.concepts.references(model, ds, LAYER, top=3, preprocess=preprocess,
                                    batch_size=6, progress=False)
    assert result["image"].dims == ("channel", "rank") and result.sizes["channel"] == 64
    ex = xw.Explainer(model, ds.image.values, preprocess=preprocess, progress=False)
    maps = ex.activations([LAYER])[LAYER].numpy()
    assert_matches(result, brute_force(maps.max((2, 3)), maps, 3))
    assert result.attrs["layer"] == LAYER and result.attrs["by"] == "activation"
    assert_unchanged(model, before)


def test_references_by_relevance_equal_a_brute_force_top_k(setup):
    model, preprocess, ds = setup
    result = xw.concepts.references(model, ds, LAYER, top=2, by="relevance", target=3,
                                    preprocess=preprocess, batch_size=7, progress=False)
    ex = xw.Explainer(model, ds.image.values, preprocess=preprocess, progress=False)
    values = ex.channels(LAYER, "lrp", target=3).values
    lrp = xw.get_method("lrp")
    kept, target, rules = lrp.prepare(ex.context, torch.full((20,), 3), **lrp.resolve_params({}))
    maps = kept.layer_relevance(target, "epsilon_plus_flat", rules, LAYER).numpy()
    np.testing.assert_allclose(maps.sum((2, 3)), values, rtol=1e-4, atol=1e-6)
    assert_matches(result, brute_force(values, maps, 2))


def test_torch_dataset_and_loader_give_the_same_references(setup):
    model, preprocess, ds = setup
    pairs = TensorDataset(torch.as_tensor(ds.image.values), torch.as_tensor(ds.label.values))
    from_xr = xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess,
                                     batch_size=8, progress=False)
    for data in (pairs, DataLoader(pairs, batch_size=5)):
        other = xw.concepts.references(model, data, LAYER, top=2, preprocess=preprocess,
                                       batch_size=8, progress=False)
        xr.testing.assert_equal(other.drop_attrs(), from_xr.drop_attrs())


def test_store_round_trip_fingerprint_and_errors(setup, tmp_path):
    model, preprocess, ds = setup
    path = tmp_path / "refs.zarr"
    first = xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess,
                                   batch_size=8, store=str(path), progress=False)
    assert (path / "result").is_dir() and not (path / "chunks").exists()
    forwards, handle = count_forwards(model)
    try:
        again = xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess,
                                       batch_size=8, store=str(path), progress=False)
    finally:
        handle.remove()
    assert not forwards, "a matching store ran the model"
    xr.testing.assert_identical(again, first)
    assert json.loads(again.attrs["fingerprint"])["layer"] == LAYER
    # other settings: recomputed into the store (with a warning)
    with pytest.warns(UserWarning, match="settings"):
        more = xw.concepts.references(model, ds, LAYER, top=3, preprocess=preprocess,
                                      batch_size=8, store=str(path), progress=False)
    assert more.sizes["rank"] == 3
    # other weights: recomputed, and the numbers change
    changed = xw.models.load("shapes-vgg").model
    with torch.no_grad():
        changed.features[18].weight.mul_(1.5)
    with pytest.warns(UserWarning, match="weights"):
        other = xw.concepts.references(changed, ds, LAYER, top=3, preprocess=preprocess,
                                       batch_size=8, store=str(path), progress=False)
    assert not np.allclose(other.value.values, more.value.values)
    # another layer or architecture: an error naming the fix, the store left as it was
    with pytest.raises(ValueError, match="another layer.*overwrite=True"):
        xw.concepts.references(changed, ds, "features.13", top=3, preprocess=preprocess,
                               batch_size=8, store=str(path), progress=False)
    resnet, resnet_pre, _ = xw.models.load("shapes-resnet")
    with pytest.raises(ValueError, match="another model"):
        xw.concepts.references(resnet, ds, "layer1", top=3, preprocess=resnet_pre,
                               batch_size=8, store=str(path), progress=False)
    xr.testing.assert_identical(xr.open_zarr(path / "result", consolidated=False).load(), other)
    replaced = xw.concepts.references(changed, ds, "features.13", top=3, preprocess=preprocess,
                                      batch_size=8, store=str(path), overwrite=True,
                                      progress=False)
    assert replaced.attrs["layer"] == "features.13"
    # a folder that is no store is never written
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an xaiwidgets results store"):
        xw.concepts.references(model, ds, LAYER, store=str(tmp_path / "mine"), progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_an_interrupted_run_resumes_after_its_last_finished_chunk(setup, tmp_path,
                                                                  monkeypatch):
    model, preprocess, ds = setup
    path = str(tmp_path / "refs.zarr")
    whole = xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess,
                                   batch_size=6, progress=False)
    real, runs = refs_module._chunk, []

    def failing(*args, **kwargs):
        if len(runs) == 2:
            raise KeyboardInterrupt  # the user stops the run during chunk 3 of 4
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(refs_module, "_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess,
                               batch_size=6, store=path, progress=False)
    chunks = sorted(p.name for p in (tmp_path / "refs.zarr" / "chunks").iterdir())
    assert chunks == ["c000000", "c000001"] and not (tmp_path / "refs.zarr" / "result").exists()
    runs.clear()
    monkeypatch.setattr(refs_module, "_chunk", lambda *a, **k: runs.append(1) or real(*a, **k))
    resumed = xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess,
                                     batch_size=6, store=path, progress=False)
    assert len(runs) == 2  # only chunks 3 and 4
    xr.testing.assert_equal(resumed.drop_attrs(), whole.drop_attrs())


def test_dask_client_gives_the_same_numbers(setup):
    distributed = pytest.importorskip("distributed")
    model, preprocess, ds = setup
    local = xw.concepts.references(model, ds, LAYER, top=2, by="relevance",
                                   preprocess=preprocess, batch_size=6, progress=False)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        remote = xw.concepts.references(model, ds, LAYER, top=2, by="relevance",
                                        preprocess=preprocess, batch_size=6, client=client,
                                        progress=False)
    xr.testing.assert_identical(remote, local)


def test_class_usage_is_the_mean_relevance_per_class(setup):
    model, preprocess, ds = setup
    usage = xw.concepts.class_usage(model, ds, LAYER, preprocess=preprocess, batch_size=8,
                                    progress=False)
    assert usage.dims == ("channel", "class")
    labels = ds.label.values
    ex = xw.Explainer(model, ds.image.values, preprocess=preprocess, progress=False)
    R = ex.channels(LAYER, "lrp", target=labels.tolist()).values
    for c in range(4):
        np.testing.assert_allclose(usage.sel({"class": c}).values, R[labels == c].mean(0),
                                   rtol=1e-4, atol=1e-6)
    assert usage.n_per_class.values.tolist() == np.bincount(labels, minlength=4).tolist()
    assert list(usage.class_name.values) == list(ds.attrs["classes"])
    with pytest.raises(ValueError, match="needs labels"):
        xw.concepts.class_usage(model, ds.drop_vars("label"), LAYER, preprocess=preprocess)


def test_factorize_is_a_seeded_non_negative_factorisation(setup):
    model, preprocess, ds = setup
    ex = xw.Explainer(model, ds.image.values[:6], preprocess=preprocess, progress=False)
    fac = xw.concepts.factorize(ex, LAYER, n=4, seed=0)
    assert fac.maps.dims == ("image", "concept", "y", "x") and fac.maps.shape == (6, 4, 64, 64)
    assert fac.basis.dims == ("concept", "channel") and fac.basis.shape == (4, 64)
    assert float(fac.maps.min()) >= 0 and float(fac.basis.min()) >= 0
    A = ex.activations([LAYER])[LAYER].permute(0, 2, 3, 1).reshape(-1, 64).numpy()
    W = fac.maps_layer.transpose("image", "v", "u", "concept").values.reshape(-1, 4)
    # scikit-learn's NMF on the same rows, fitted and applied by hand
    from sklearn.decomposition import NMF

    reference = NMF(n_components=4, init="nndsvda", random_state=0, max_iter=400)
    reference.fit(A.astype(np.float64))
    np.testing.assert_allclose(fac.basis.values, reference.components_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(W, reference.transform(A.astype(np.float64)), rtol=1e-3,
                               atol=1e-4)
    error = np.linalg.norm(A - W @ fac.basis.values) / np.linalg.norm(A)
    finer = xw.concepts.factorize(ex, LAYER, n=16, seed=0)
    W16 = finer.maps_layer.transpose("image", "v", "u", "concept").values.reshape(-1, 16)
    assert np.linalg.norm(A - W16 @ finer.basis.values) / np.linalg.norm(A) < error < 1
    again = xw.concepts.factorize(ex, LAYER, n=4, seed=0)
    xr.testing.assert_identical(again, fac)
    # fitting on a sample: the basis comes from the sample, every row is transformed
    sampled = xw.concepts.factorize(ex, LAYER, n=4, seed=0, sample=100)
    assert sampled.attrs["fit_rows"] == 100 and sampled.maps.shape == fac.maps.shape
    with pytest.raises(ValueError, match="negative activations.*ReLU"):
        xw.concepts.factorize(ex, "features.18", n=2)  # a conv before its ReLU
    with pytest.raises(ValueError, match="concepts"):
        xw.concepts.factorize(ex, LAYER, n=0)


def test_bad_arguments_get_clear_errors(setup):
    model, preprocess, ds = setup
    with pytest.raises(ValueError, match="by="):
        xw.concepts.references(model, ds, LAYER, by="gradient", preprocess=preprocess)
    with pytest.raises(ValueError, match="top="):
        xw.concepts.references(model, ds, LAYER, top=0, preprocess=preprocess)
    with pytest.raises(ValueError, match="target= only applies"):
        xw.concepts.references(model, ds, LAYER, target=1, preprocess=preprocess)
    with pytest.raises(ValueError, match="no channels"):
        xw.concepts.references(model, ds, "classifier.0", preprocess=preprocess,
                               progress=False)


def test_a_failing_call_leaves_no_store(setup, tmp_path):
    model, preprocess, ds = setup
    path = tmp_path / "refs.zarr"
    with pytest.raises(ValueError, match="no channels"):
        xw.concepts.references(model, ds, "classifier.0", preprocess=preprocess,
                               store=str(path), progress=False)
    with pytest.raises(ValueError, match="target class 7 is out of range"):
        xw.concepts.references(model, ds, LAYER, by="relevance", target=7,
                               preprocess=preprocess, store=str(path), progress=False)
    assert not path.exists()


class Stop(Exception):
    """What a widget's Cancel raises from the progress callback (``Superseded``)."""


def test_progress_callback_counts_images_up_to_the_total(setup):
    model, preprocess, ds = setup
    seen = []
    xw.concepts.references(model, ds, LAYER, top=2, preprocess=preprocess, batch_size=6,
                           progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 20), (6, 20), (12, 20), (18, 20), (20, 20)]
    seen.clear()
    xw.concepts.class_usage(model, ds, LAYER, preprocess=preprocess, batch_size=8,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 20), (8, 20), (16, 20), (20, 20)]
    with pytest.raises(TypeError, match="progress="):
        xw.concepts.references(model, ds, LAYER, preprocess=preprocess, progress="yes")


def test_a_cancelled_pass_keeps_only_finished_chunks_and_resumes_identically(
        setup, tmp_path, monkeypatch):
    model, preprocess, ds = setup
    settings = dict(top=2, by="relevance", preprocess=preprocess, batch_size=6)
    whole = xw.concepts.references(model, ds, LAYER, store=str(tmp_path / "whole.zarr"),
                                   progress=False, **settings)

    def cancel_at(images: int):
        def progress(done: int, total: int) -> None:
            if done >= images:
                raise Stop
        return progress

    # a cancel before the first chunk writes nothing
    with pytest.raises(Stop):
        xw.concepts.references(model, ds, LAYER, store=str(tmp_path / "none.zarr"),
                               progress=cancel_at(0), **settings)
    assert not (tmp_path / "none.zarr").exists()
    # a cancel after two chunks: those two are kept, nothing else (no temporary folder)
    path = tmp_path / "refs.zarr"
    with pytest.raises(Stop):
        xw.concepts.references(model, ds, LAYER, store=str(path), progress=cancel_at(12),
                               **settings)
    assert sorted(p.name for p in (path / "chunks").iterdir()) == ["c000000", "c000001"]
    assert not (path / "result").exists() and not list(path.glob("**/.tmp-*"))
    # the next call resumes: only the two missing chunks run, its progress starts at 12
    real, runs = refs_module._chunk, []
    monkeypatch.setattr(refs_module, "_chunk", lambda *a, **k: runs.append(1) or real(*a, **k))
    seen = []
    resumed = xw.concepts.references(model, ds, LAYER, store=str(path),
                                     progress=lambda done, total: seen.append((done, total)),
                                     **settings)
    assert len(runs) == 2 and seen == [(12, 20), (18, 20), (20, 20)]
    xr.testing.assert_identical(resumed, whole)
    # class usage stops at its next chunk as well
    with pytest.raises(Stop):
        xw.concepts.class_usage(model, ds, LAYER, preprocess=preprocess, batch_size=8,
                                progress=cancel_at(8))


def test_a_cancelled_pass_on_dask_resumes_identically(setup, tmp_path):
    distributed = pytest.importorskip("distributed")
    model, preprocess, ds = setup
    settings = dict(top=2, preprocess=preprocess, batch_size=6)
    local = xw.concepts.references(model, ds, LAYER, progress=False, **settings)
    path = tmp_path / "refs.zarr"

    def stop(done: int, total: int) -> None:
        if done:
            raise Stop

    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        with pytest.raises(Stop):
            xw.concepts.references(model, ds, LAYER, store=str(path), client=client,
                                   progress=stop, **settings)
        assert len(list((path / "chunks").iterdir())) == 1  # the one finished first
        resumed = xw.concepts.references(model, ds, LAYER, store=str(path), client=client,
                                         progress=False, **settings)
    xr.testing.assert_equal(resumed.drop_attrs(), local.drop_attrs())
