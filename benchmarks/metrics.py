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
    return {"saliency": saliency, "gfdm": rng.random((count, size, size)),
            "fixations": fix.reshape(count, size, size)}


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
                metric = metrics.METRICS[name]
                reference = pool["fixations" if metric.needs == "fixations" else "gfdm"]
                metric(pool["saliency"][rows], reference[rows])

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
    p.add_argument("--metrics", default=",".join(METRIC_NAMES), help="comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write every sample as JSON here")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and with ``--out`` writes) the rows and the setup."""
    args = parse_args(argv)
    names = tuple(metrics.get(m).name for m in args.metrics.split(","))
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
    if not args.quiet:
        print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


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
