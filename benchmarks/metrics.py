"""Saliency-metric throughput: maps per second for PCC, SIM, KLD, NSS, AUC-Judd, SSIM
and Spearman, each on N random saliency / reference pairs scored in batches.

Each metric (and all seven one after another, "all seven") scores the N maps batch by
batch; one warm-up batch each, then ``--repeats`` rounds in a rotated order (a burst of
load from another process hits every metric alike). Every call is timed on both clocks:
elapsed time and this process's CPU time (steadier on a shared machine). The metrics
are NumPy/SciPy code on one thread.

>>> result = main(["--n", "4", "--batch", "2", "--size", "16", "--repeats", "1", "--quiet"])
>>> sorted(result["rows"])[:2], result["rows"]["all seven"]["maps"]
(['all seven', 'auc_judd'], 4)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xaiwidgets.evaluation import metrics

#: the metrics of issue #14 item 6, in xw.evaluate's order
METRIC_NAMES = ("pcc", "sim", "kld", "nss", "auc_judd", "ssim", "spearman")
#: the map-only metrics of issue #25 (``--metrics new``); EMD is timed on its own (``emd``)
NEW_METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "sparseness", "complexity",
               "shuffled_auc", "info_gain")


def make_pool(count: int, size: int, fixations: int, ties: float,
              seed: int) -> dict[str, np.ndarray]:
    """``count`` random (saliency, gfdm, fixation map) triples of ``size``².

    Saliency and GFDM are uniform noise (float64); each fixation map has ``fixations``
    random fixated pixels. ``ties`` > 0 sets that fraction of each saliency map's
    lowest pixels to 0, as a ReLU'd map (ties slow the rank metrics).

    >>> pool = make_pool(2, 8, 3, 0.5, seed=0)
    >>> pool["saliency"].shape, int((pool["saliency"][0] == 0).sum())
    ((2, 8, 8), 32)
    """
    rng = np.random.default_rng(seed)
    saliency = rng.random((count, size, size))
    if ties > 0:
        cut = np.quantile(saliency.reshape(count, -1), ties, axis=1)
        saliency[saliency < cut[:, None, None]] = 0.0
    fix = np.zeros((count, size * size))
    for row in fix:
        row[rng.choice(size * size, size=min(fixations, size * size), replace=False)] = 1
    fix = fix.reshape(count, size, size)
    mask = np.zeros((count, size, size), bool)  # a centred box of a quarter of the image
    mask[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    return {"saliency": saliency, "gfdm": rng.random((count, size, size)), "fixations": fix,
            "mask": mask, "others": np.roll(fix, 1, axis=0) > 0}


def references(name: str, pool: dict[str, np.ndarray], rows: slice) -> tuple:
    """What metric ``name`` compares the maps with, for the pool's ``rows``."""
    needs = metrics.METRICS[name].needs
    keys = {"map": ("gfdm",), "fixations": ("fixations",), "mask": ("mask",), "none": (),
            "shuffled": ("fixations", "others")}[needs]
    return tuple(pool[k][rows] for k in keys)


def scorer(names: tuple[str, ...], pool: dict[str, np.ndarray], n: int,
           batch: int) -> Callable[[], None]:
    """A function scoring ``n`` maps with the metrics ``names``, ``batch`` maps a call,
    cycling through the pool (no metric caches anything, so re-used maps cost the same).

    The pool holds a whole number of batches: each batch is a slice, not a copy."""
    count = len(pool["saliency"])
    if count % batch and count < n:
        raise ValueError(f"the pool ({count} maps) must hold a whole number of batches")
    batches = [slice(i % count, i % count + min(batch, n - i)) for i in range(0, n, batch)]

    def run() -> None:
        for rows in batches:
            for name in names:
                metrics.METRICS[name](pool["saliency"][rows], *references(name, pool, rows))

    return run


def rounds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[tuple]]:
    """(wall s, CPU s) per call of each function, over ``repeats`` rotated rounds."""
    names = list(fns)
    samples: dict[str, list[tuple]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="maps per metric and round")
    p.add_argument("--batch", type=int, default=100, help="maps per metric call")
    p.add_argument("--size", type=int, default=224, help="map side (pixels)")
    p.add_argument("--fixations", type=int, default=50, help="fixated pixels per map")
    p.add_argument("--ties", type=float, default=0.0,
                   help="fraction of each saliency map set to 0 (default 0: no ties)")
    p.add_argument("--pool", type=int, default=200,
                   help="distinct maps generated, rounded up to whole batches (the N maps "
                   "cycle through them)")
    p.add_argument("--threads", type=int, default=metrics.THREADS,
                   help="metrics.THREADS: threads that score a stack's chunks (default: "
                   "%(default)s, the CPUs of this process)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--metrics", default=",".join(METRIC_NAMES),
                   help="comma-separated, or 'new' for the map-only metrics of issue #25")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write every sample as JSON here")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--memory", type=int, default=0,
                   help="also score this many maps (e.g. 50000) and report the peak memory")
    p.add_argument("--vs-quantus", action="store_true",
                   help="also time ROAD, IROF, faithfulness correlation against Quantus 0.6")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and with ``--out`` writes) the rows and the setup."""
    args = parse_args(argv)
    listed = ",".join(NEW_METRICS) if args.metrics == "new" else args.metrics
    names = tuple(metrics.get(m).name for m in listed.split(","))
    metrics.THREADS = args.threads
    count = min(-(-args.pool // args.batch) * args.batch, args.n)
    pool = make_pool(count, args.size, args.fixations, args.ties, args.seed)
    fns = {name: scorer((name,), pool, args.n, args.batch) for name in names}
    fns["all seven" if names == METRIC_NAMES else "all"] = scorer(names, pool, args.n,
                                                                   args.batch)
    for name in fns:  # warm-up: one batch each
        scorer(names if name.startswith("all") else (name,), pool, min(args.batch, args.n),
               args.batch)()
    samples = rounds(fns, args.repeats)
    rows = {}
    for name, times in samples.items():
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        rows[name] = {"maps": args.n, "wall_s": wall, "cpu_s": cpu,
                      "maps_per_s_wall": args.n / wall,
                      "maps_per_s_cpu": args.n / cpu if cpu > 0 else None,  # clock tick
                      "samples": times}
    result = {"setup": {k: v for k, v in vars(args).items() if k not in ("out", "quiet")},
              "load_average": list(os.getloadavg()), "rows": rows}
    if args.memory:
        result["memory"] = memory(names, args.memory, args.size, args.batch)
    if args.vs_quantus:
        result["versus_quantus"] = versus_quantus()
    if not args.quiet:
        print(table(result))
        for row in result.get("memory", []):
            print(f"memory: {row['maps']} maps scored, peak RSS {row['peak_rss_mib']:.0f} MiB")
        for name, row in result.get("versus_quantus", {}).items():
            print(f"{name}: {row['ours']:.2f} s here, {row['quantus']:.2f} s Quantus (CPU), "
                  f"ratio {row['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def memory(names: tuple[str, ...], total: int = 50_000, size: int = 224, batch: int = 100,
           checkpoints: int = 5, seed: int = 0) -> list[dict[str, float]]:
    """Peak resident memory (MiB) while scoring ``total`` maps with ``names``, ``batch`` at a
    time (a pool of one batch, cycled), read after each of ``checkpoints`` equal parts:
    flat when nothing accumulates.

    >>> rows = memory(("sparseness",), total=20, size=16, batch=5, checkpoints=2)
    >>> [r["maps"] for r in rows]
    [10, 20]
    """
    import resource

    pool = make_pool(batch, size, 50, 0.0, seed)
    part = total // checkpoints
    run = scorer(names, pool, part, batch)
    rows = []
    for k in range(1, checkpoints + 1):
        start = time.process_time()
        run()
        rows.append({"maps": k * part, "cpu_s": time.process_time() - start,
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return rows


def tiny_model(size: int) -> Any:
    """A small seeded 1-channel CNN (3 classes) for the faithfulness timings."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 16, 3)).eval()


def versus_quantus(n: int = 8, size: int = 64, repeats: int = 1) -> dict[str, dict[str, float]]:
    """CPU seconds of ROAD, IROF and faithfulness correlation here and in Quantus 0.6 on
    the same model, images, maps and settings (Quantus' defaults; one image per IROF and
    per Infidelity call there, its batch quirks), median of ``repeats``; ``ratio`` =
    ours / Quantus (<= 1: not slower). Needs ``quantus`` (the ``test`` extra)."""
    import warnings

    import torch

    import xaiwidgets as xw
    from xaiwidgets.evaluation import faithfulness

    if not hasattr(np, "trapz"):  # Quantus still calls it
        np.trapz = np.trapezoid
    import quantus

    model = tiny_model(size)
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, size, size)).astype(np.float32)
    a = rng.random((n, size, size))
    ex = xw.Explainer(model, torch.as_tensor(x), progress=False)
    y = ex.logits().argmax(1).numpy()

    def ours(name: str) -> Callable[[], Any]:
        fn = getattr(faithfulness, name)
        return lambda: fn(xw.Explainer(model, torch.as_tensor(x), progress=False), a, target=y)

    def theirs(name: str) -> Callable[[], Any]:
        metric = {"road": quantus.ROAD, "irof": quantus.IROF,
                  "faithfulness_correlation": quantus.FaithfulnessCorrelation}[name]

        def run() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parts = [slice(i, i + 1) for i in range(n)] if name == "irof" else [slice(0, n)]
                for part in parts:
                    metric(disable_warnings=True, return_aggregate=False)(
                        model=model, x_batch=x[part], y_batch=y[part], a_batch=a[part, None],
                        device="cpu")
        return run

    out = {}
    for name in ("road", "irof", "faithfulness_correlation"):
        times = {}
        for side, fn in (("ours", ours(name)), ("quantus", theirs(name))):
            samples = []
            for _ in range(repeats):
                start = time.process_time()
                fn()
                samples.append(time.process_time() - start)
            times[side] = statistics.median(samples)
        out[name] = {**times, "ratio": times["ours"] / times["quantus"]}
    return out


def table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (maps per second on both clocks)."""
    s = result["setup"]
    lines = [f"{s['n']} maps of {s['size']}², batches of {s['batch']}, {s['fixations']} "
             f"fixations per map, ties {s['ties']:g}, {s['threads']} thread(s); median of "
             f"{s['repeats']} rounds; "
             f"load average {result['load_average'][0]:.1f}", "",
             "| metric | maps/s (elapsed) | maps/s (CPU) | ms/map (CPU) |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        cpu = row["maps_per_s_cpu"]
        lines.append(f"| {name} | {row['maps_per_s_wall']:.0f} | "
                     f"{'n/a' if cpu is None else f'{cpu:.0f}'} "
                     f"| {1000 * row['cpu_s'] / row['maps']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
