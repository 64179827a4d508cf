"""Metrics on clip volumes (per frame, then averaged over t) and ``xw.evaluate`` on
video datasets (``xw.datasets.moving_shapes``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import xaiwidgets as xw
from xaiwidgets.evaluation import metrics


def volumes(seed: int = 0) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(seed)
    dims = ("image", "t", "y", "x")
    sal = xr.DataArray(rng.random((2, 3, 12, 12)), dims=dims)
    gfdm = xr.DataArray(rng.random((2, 3, 12, 12)), dims=dims)
    fix = np.zeros((2, 3, 12, 12))
    fix[:, :, 2, 3] = 1
    fix[0, 1, 5, 5] = 1
    fix[1, 2] = 0  # a frame without fixations: left out of the average
    return sal, gfdm, xr.DataArray(fix, dims=dims)


@pytest.mark.parametrize("name", metrics.available("map") + metrics.available("fixations"))
def test_volume_metric_is_the_mean_of_a_per_frame_loop(name: str) -> None:
    sal, gfdm, fix = volumes()
    metric = metrics.METRICS[name]
    ref = fix if metric.needs == "fixations" else gfdm
    got = metric(sal, ref)
    assert got.dims == ("image",)
    for i in range(2):
        per_frame = [metric(sal.values[i, t], ref.values[i, t]) for t in range(3)]
        np.testing.assert_allclose(got.values[i], np.nanmean(per_frame), rtol=1e-12)
    # a plain (T, H, W) array is never averaged: one score per frame
    assert metric(sal.values[0], ref.values[0]).shape == (3,)


def test_evaluate_on_moving_shapes() -> None:
    ds = xw.datasets.moving_shapes(3, frames=4, size=32, seed=1)
    assert ds["image"].dims == ("image", "channel", "t", "y", "x")
    assert ds["gfdm"].dims == ("image", "t", "y", "x")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(ds.sizes["channel"], 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    # one chunk (batch_size=3): the same batched forward pass as the check below
    result = xw.evaluate(model, ds, ["fem", "gradient"], ("pcc", "nss"), batch_size=3,
                         progress=False)
    assert result["pcc"].dims == ("image", "method") and result["pcc"].shape == (3, 2)
    # independently: explain the clips, score per frame, average over frames
    ex = xw.Explainer(model, torch.as_tensor(ds["image"].values))
    fem = ex.explain("fem", layer="1", target=result["predicted"].values.tolist()).values
    expected = [np.mean([metrics.pcc(fem[i, t], ds["gfdm"].values[i, t]) for t in range(4)])
                for i in range(3)]
    np.testing.assert_allclose(result["pcc"].isel(method=0).values, expected, rtol=1e-5)
