"""Smoke run of the benchmark script: tiny sizes, one repeat, structure of the JSON.

No timing is asserted (CI machines vary); only that every method has a row, every
contender a median or a reason why not, and that ratios are finite where defined.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    md = out.with_suffix(".md")
    threads = torch.get_num_threads()
    run.main(["--model", "resnet18", "--size", "32", "--batch", "2", "--repeats", "1",
              "--threads", "1", "--slider-repeats", "1", "--memory-n", "4",
              "--memory-batch-sizes", "2", "--memory-size", "32",
              "--out", str(out), "--markdown", str(md)])
    torch.set_num_threads(threads)  # main() sets it for the whole process
    return json.loads(out.read_text()), md.read_text()


def finite_or_none(value) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value) and value > 0)


def test_every_method_has_a_row_with_ours_peers_and_limit(result):
    data, _ = result
    rows = {row["method"]: row for row in data["methods"]}
    assert {"gradient", "integrated_gradients", "smoothgrad", "gradcam", "occlusion", "fem",
            "mlfem", "lrp"} <= set(rows)
    for row in rows.values():
        assert {"ours", "limit"} <= set(row["times"])
        assert row["times"]["limit"]["median_s"] > 0  # bare torch always runs
        for name, entry in row["times"].items():
            # a median, or a note saying why not (method/library missing, or its error)
            assert finite_or_none(entry["median_s"]), (row["method"], name)
            assert entry["median_s"] is not None or entry["note"], (row["method"], name)
        assert finite_or_none(row["ratio_best_peer"]) and finite_or_none(row["ratio_limit"])
    # the engine's own methods always run; the peers named in the brief too
    for method in ("gradient", "gradcam", "fem", "occlusion"):
        assert rows[method]["times"]["ours"]["median_s"] is not None
    assert rows["gradient"]["times"]["captum"]["median_s"] is not None
    assert rows["gradcam"]["times"]["pytorch-grad-cam"]["median_s"] is not None
    assert rows["lrp"]["times"]["zennit"]["median_s"] is not None
    assert rows["integrated_gradients"]["params"]["steps"] == data["meta"]["sizes"]["steps"]


def test_fem_sliders_reuse_the_cached_forward(result):
    data, _ = result
    sliders = {row["slider"]: row for row in data["slider"]}
    # FEM/MLFEM re-threshold cached activations; an LRP parameter change is one
    # backward on the kept graph: none of them runs the model again
    for name in ("fem: K", "mlfem: K", "mlfem: operator", "mlfem: alpha",
                 "lrp: epsilon", "lrp: gamma", "lrp: alpha/beta", "lrp: channel (CRP)"):
        assert sliders[name]["model_calls"] == 0, name
        assert sliders[name]["median_ms"] > 0
    # a gradient needs a new pass on every call: the counter does count
    assert sliders["method: gradient → gradcam"]["model_calls"] > 0
    # the LRP changes' yardstick: a fresh Explainer's gradient (one pass per call), and
    # every timed slider row carries its ratio to it
    reference = sliders["reference: gradient, fresh Explainer"]
    assert reference["model_calls"] == reference["changes"] > 0
    assert reference["vs_fresh_gradient"] == 1.0
    for name in ("lrp: epsilon", "lrp: gamma", "lrp: alpha/beta"):
        ratio = sliders[name]["vs_fresh_gradient"]
        assert ratio == sliders[name]["median_ms"] / reference["median_ms"], name


def test_memory_rows_and_markdown(result):
    data, table = result
    assert len(data["memory"]) == 5  # IG at n/4, then IG and SmoothGrad x ours/captum
    for row in data["memory"]:
        assert row.get("error") is None and row["peak_mib"] >= 0, row
    assert "| gradient |" in table and "ours / limit" in table and "model calls" in table


def test_metrics_benchmark_smoke(tmp_path, capsys):
    from benchmarks import metrics as metrics_bench
    from xaiwidgets.evaluation import metrics

    threads = metrics.THREADS
    out = tmp_path / "metrics.json"
    try:
        result = metrics_bench.main(["--n", "6", "--batch", "4", "--size", "24", "--repeats",
                                     "2", "--ties", "0.5", "--threads", "2", "--out", str(out)])
    finally:
        metrics.THREADS = threads  # main() sets it for the whole process
    assert json.loads(out.read_text())["setup"]["n"] == 6
    rows = result["rows"]
    assert list(rows) == [*metrics_bench.METRIC_NAMES, "all seven"]
    for name, row in rows.items():
        assert len(row["samples"]) == 2 and row["maps"] == 6, name
        assert row["cpu_s"] >= 0 and row["wall_s"] > 0 and row["maps_per_s_wall"] > 0, name
    table = capsys.readouterr().out
    assert "| all seven |" in table and "maps/s (CPU)" in table
