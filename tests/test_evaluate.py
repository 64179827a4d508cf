"""xw.evaluate on the shapes data: dask threads vs a LocalCluster, sweeps, netCDF."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import xarray as xr

import xaiwidgets as xw
from xaiwidgets import metrics
from xaiwidgets.evaluation.evaluate import evaluate, variants, wins

from .conftest import cnn_methods, make_tiny_cnn

FAST_METRICS = ("pcc", "sim", "kld", "nss", "auc_judd")


@pytest.fixture(scope="module")
def dataset() -> xr.Dataset:
    """The shipped shapes data, plus one per-image fact to carry into the result."""
    ds = xw.datasets.shapes(n=10, size=32, seed=0)
    return ds.assign(n_fixations=ds.fixations.sum(("y", "x")))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.25


def test_matches_a_direct_computation(dataset):
    model = make_tiny_cnn()
    result = evaluate(model, dataset, ["gradient", "gradcam"], FAST_METRICS,
                      preprocess=preprocess, batch_size=4, progress=False)
    assert result.pcc.dims == ("image", "method")
    assert list(result.method.values) == ["gradient", "gradcam"]
    ex = xw.Explainer(model, torch.from_numpy(dataset.image.values), preprocess=preprocess)
    predicted = ex.logits().argmax(1).numpy()
    for name in ("gradient", "gradcam"):
        maps = ex.explain(name).values
        for m in FAST_METRICS:
            ref = dataset.gfdm if metrics.METRICS[m].needs == "map" else dataset.fixations
            expected = metrics.METRICS[m](maps, ref)
            # a dim called "method" needs the dict form: sel(method=...) is the lookup mode
            np.testing.assert_allclose(result[m].sel({"method": name}), expected,
                                       rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.predicted, predicted)
    np.testing.assert_array_equal(result.correct, predicted == dataset.label.values)
    np.testing.assert_array_equal(result.n_fixations, dataset.n_fixations)  # per-image facts
    assert result.kld.attrs["higher_is_better"] == 0 and result.nss.attrs["needs"] == "fixations"
    assert json.loads(result.attrs["classes"])[0] == "circle"
    assert result.attrs["metrics"] == ",".join(FAST_METRICS)
    assert (result.seconds > 0).all()
    # splitting correct from wrong predictions is one groupby
    assert set(result.pcc.groupby("correct").mean().correct.values) <= {False, True}


@pytest.mark.filterwarnings("ignore:.*Zarr")
def test_threads_and_local_cluster_agree_and_netcdf_round_trip(dataset, tmp_path):
    distributed = pytest.importorskip("distributed")
    model = make_tiny_cnn()
    kwargs = {"metrics": FAST_METRICS, "preprocess": preprocess, "batch_size": 3,
              "params": {"mlfem": {"operator": ["max", "add"]}}}
    methods = ["gradient", "fem", "mlfem"]
    local = evaluate(model, dataset, methods, progress=False, **kwargs)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = evaluate(model, dataset, methods, client=client, progress=True, **kwargs)
    assert remote.attrs["scheduler"] == "distributed"
    for m in FAST_METRICS:
        np.testing.assert_allclose(remote[m], local[m], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(remote.method, local.method)

    path = tmp_path / "result.nc"
    local.to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), local)
    local.to_zarr(tmp_path / "result.zarr")
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "result.zarr").load(), local)


def test_every_scheduler_gives_bit_identical_numbers_for_every_method(dataset):
    """Threads, dask's configured synchronous scheduler and a LocalCluster, with every
    registered method mixed in one call (quick parameters, tiny model)."""
    distributed = pytest.importorskip("distributed")
    import dask

    model = make_tiny_cnn()
    names = cnn_methods()
    params = {n: dict(xw.get_method(n).quick_params) for n in names
              if xw.get_method(n).quick_params}
    small = dataset.isel(image=slice(0, 4))
    threads_seen: set[int] = set()

    def recording_preprocess(images: torch.Tensor) -> torch.Tensor:
        threads_seen.add(threading.get_ident())
        return preprocess(images)

    kwargs = {"metrics": ("pcc", "nss"), "preprocess": recording_preprocess,
              "params": params, "batch_size": 2, "progress": False}
    threaded = evaluate(model, small, names, **kwargs)
    assert threaded.attrs["scheduler"] == "threads"
    threads_seen.clear()
    with dask.config.set(scheduler="synchronous"):
        serial = evaluate(model, small, names, **kwargs)
    assert serial.attrs["scheduler"] == "synchronous"
    assert threads_seen == {threading.get_ident()}  # the configured scheduler ran them
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = evaluate(model, small, names, client=client, **kwargs)
        # a default client (no client=) is used too
        default = evaluate(model, small, names, **kwargs)
    assert remote.attrs["scheduler"] == default.attrs["scheduler"] == "distributed"
    for other in (serial, remote, default):
        for m in ("pcc", "nss"):
            np.testing.assert_array_equal(other[m].values, threaded[m].values)
    assert np.isfinite(threaded.pcc).all()


def test_parameter_sweeps_become_method_variants(dataset):
    specs = variants(["gradcam", "mlfem"], {"gradcam": {"layer": ["1", "4"]},
                                            "mlfem": {"operator": ["max", "top"], "K": 2}})
    assert [s.label for s in specs] == ["gradcam(layer=1)", "gradcam(layer=4)",
                                        "mlfem(operator=max)", "mlfem(operator=top)"]
    assert specs[3].params == {"K": 2, "operator": "top"}
    result = evaluate(make_tiny_cnn(), dataset.isel(image=slice(0, 4)), ["gradcam", "fem"],
                      ("pcc",), params={"gradcam": {"layer": ["2", "5"]}, "fem": {"K": 0.5}},
                      progress=False)
    assert list(result.method_name.values) == ["gradcam", "gradcam", "fem"]
    used = [json.loads(p) for p in result.method_params.values]
    assert [u["layer"] for u in used] == ["2", "5", "5"]
    assert used[2]["K"] == 0.5  # defaults and given values are recorded
    assert not np.allclose(result.pcc.isel(method=0), result.pcc.isel(method=1))


def test_target_label(dataset):
    result = evaluate(make_tiny_cnn(), dataset, "gradient", ("pcc",), target="label",
                      progress=False, batch_size=16)
    np.testing.assert_array_equal(result.target, dataset.label)


def test_every_registered_method_runs(dataset):
    small = dataset.isel(image=slice(0, 2))
    names = cnn_methods()
    params = {name: dict(xw.get_method(name).quick_params) for name in names
              if xw.get_method(name).quick_params}
    result = evaluate(make_tiny_cnn(), small, names, ("pcc", "nss"), params=params,
                      progress=False)
    assert list(result.method_name.values) == names
    assert np.isfinite(result.pcc).all() and np.isfinite(result.nss).all()


def test_errors_are_raised_before_any_task(dataset):
    model = make_tiny_cnn()
    with pytest.raises(ValueError, match="lacks"):
        evaluate(model, dataset.drop_vars("gfdm"), "gradient", ("pcc",))
    evaluate(model, dataset.drop_vars("gfdm").isel(image=[0]), "gradient", ("nss",),
             progress=False)  # fixation metrics only: no GFDM needed
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(model, dataset, "gradcm", ("pcc",))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(model, dataset, "gradient", ("pccc",))
    with pytest.raises(TypeError, match="no parameter"):
        evaluate(model, dataset, "fem", params={"fem": {"k": 1}})
    with pytest.raises(TypeError, match="K must be a number"):
        evaluate(model, dataset, "fem", params={"fem": {"K": [1.0, "big"]}})
    with pytest.raises(ValueError, match="not in methods"):
        evaluate(model, dataset, "fem", params={"gradcam": {"layer": "1"}})
    with pytest.raises(ValueError, match="target"):
        evaluate(model, dataset, "fem", target="truth")


def test_wins_counts_images_where_a_method_is_better():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.5, 0.4, np.nan]])
    result = xr.Dataset(
        {"pcc": (("image", "method"), scores), "kld": (("image", "method"), scores)},
        coords={"method": ["a", "b", "c"], "method_name": ("method", ["a", "b", "c"])},
    )
    higher = wins(result, "pcc")
    assert higher.sel({"method": "a", "other": "b"}) == 2
    assert higher.sel({"method": "b", "other": "a"}) == 1
    assert higher.sel({"method": "a", "other": "c"}) == 2  # NaN never wins nor loses
    lower = wins(result, "kld")
    assert lower.sel({"method": "a", "other": "b"}) == 1 and lower.attrs["higher_is_better"] == 0


def test_shipped_model_reproduces_the_survey_ordering():
    """On the shapes data, CAM-like maps agree with gaze better than the raw gradient
    (survey Table 1: Grad-CAM 0.397, FEM 0.356, gradient 0.242 PCC)."""
    model, preprocess, classes = xw.models.load("shapes-resnet")
    ds = xw.datasets.shapes(n=8, size=128, seed=7)
    result = evaluate(model, ds, ["gradient", "gradcam", "fem"], ("pcc", "nss", "auc_judd"),
                      preprocess=preprocess, batch_size=4, progress=False,
                      model_name="shapes-resnet")
    assert result.correct.mean() > 0.7
    mean = result.mean("image")
    for metric in ("pcc", "nss", "auc_judd"):
        for method in ("gradcam", "fem"):
            assert mean[metric].sel({"method": method}) > mean[metric].sel({"method": "gradient"})
    assert result.attrs["model"] == "shapes-resnet"


#: every registered metric, with quick settings for the explainer-based ones
QUICK = {"faithfulness_correlation": {"n_runs": 8, "subset_size": 40},
         "road": {"percentages": (10, 50, 90)}, "infidelity": {"patch_size": 16},
         "max_sensitivity": {"n_samples": 2}, "avg_sensitivity": {"n_samples": 2}}


def test_every_metric_on_every_scheduler_gives_identical_numbers(dataset):
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("ot")
    import dask

    model = make_tiny_cnn()
    small = dataset.isel(image=slice(0, 4))
    names = tuple(metrics.available())
    kwargs = {"metrics": names, "preprocess": preprocess, "batch_size": 2, "progress": False,
              "metric_params": QUICK}
    threaded = evaluate(model, small, ["gradient", "gradcam"], **kwargs)
    with dask.config.set(scheduler="synchronous"):
        serial = evaluate(model, small, ["gradient", "gradcam"], **kwargs)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = evaluate(model, small, ["gradient", "gradcam"], client=client, **kwargs)
    for m in names:
        assert threaded[m].attrs["higher_is_better"] == int(metrics.METRICS[m].higher_is_better)
        for other in (serial, remote):
            np.testing.assert_array_equal(other[m].values, threaded[m].values, err_msg=m)
    # independently: the maps scored directly (localisation, complexity, shuffled AUC, ROAD)
    ex = xw.Explainer(model, torch.from_numpy(small.image.values), preprocess=preprocess)
    maps = ex.explain("gradcam")
    got = threaded.sel({"method": "gradcam"})
    np.testing.assert_allclose(got.pointing_game, metrics.pointing_game(maps.values, small.mask))
    np.testing.assert_allclose(got.relevance_mass, metrics.relevance_mass(maps.values, small.mask),
                               rtol=1e-5)
    np.testing.assert_allclose(got.sparseness, metrics.sparseness(maps.values), rtol=1e-5)
    fixated = small.fixations.values > 0  # negatives: the other images evaluated
    others = [(fixated.sum(0) - fixated[i]) > 0 for i in range(4)]
    np.testing.assert_allclose(got.shuffled_auc, [metrics.shuffled_auc(
        maps.values[i], fixated[i], others[i]) for i in range(4)], rtol=1e-5)
    from xaiwidgets.evaluation import road

    direct = road(ex, maps, target=got.predicted.values.tolist(), percentages=(10, 50, 90))
    np.testing.assert_array_equal(got.road, direct.road)
    assert json.loads(threaded.attrs["metric_params"])["road"]["percentages"]


def test_metrics_say_what_the_dataset_lacks(dataset):
    model = make_tiny_cnn()
    with pytest.raises(ValueError, match="mask"):
        evaluate(model, dataset.drop_vars("mask"), ["gradient"], ("pointing_game",),
                 progress=False)
    one = dataset.isel(image=slice(0, 1))
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(model, one, ["gradient"], ("shuffled_auc",), progress=False)
    with pytest.raises(ValueError, match="metric_params"):
        evaluate(model, dataset, ["gradient"], ("pcc",), metric_params={"road": {}},
                 progress=False)
    # complexity needs nothing of the dataset but the images
    bare = dataset[["image"]]
    result = evaluate(model, bare, ["gradient"], ("sparseness", "complexity"), progress=False)
    assert np.isfinite(result.sparseness).all()


@pytest.mark.parametrize("metric", ["relevance_mass", "complexity", "shuffled_auc", "road"])
def test_dataset_explorer_sorts_by_any_metric(dataset, metric):
    from xaiwidgets.widgets.dataset_explorer import DatasetExplorer, resolve_metric

    model = make_tiny_cnn()
    data = dataset.isel(image=slice(0, 6))
    x = DatasetExplorer(model, data, preprocess=preprocess, methods=["gradcam"], metric=metric,
                        background=False, page_size=3)
    x.controls["sort"].value = f"{metric} ↓"
    scores = x.results[metric].sel({"method": "gradcam"})
    assert scores.sizes["image"] == 6
    ref = evaluate(model, data, ["gradcam"], (metric,), preprocess=preprocess, progress=False)
    np.testing.assert_allclose(scores.values, ref[metric].values[:, 0], rtol=1e-5, atol=1e-7)
    finite = np.where(np.isnan(scores.values), -np.inf, scores.values)
    assert x.shown == scores.image.values[np.argsort(-finite, kind="stable")][:3].tolist()
    assert x.results[metric].attrs["higher_is_better"] == int(
        metrics.METRICS[metric].higher_is_better)
    with pytest.raises(ValueError, match="mask"):
        resolve_metric("pointing_game", ("gfdm",))
