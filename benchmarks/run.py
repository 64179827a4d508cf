"""Benchmark xaiwidgets against Captum, Zennit, pytorch-grad-cam and bare torch.

One run, one model, one input, one machine: every method is timed for ours (a re-used
``xw.Explainer``, explicit targets), each reference library that implements it, and
the physical limit (the bare torch passes the method needs). Then slider latencies
(FEM/MLFEM/LRP parameter changes, a method switch) and the peak memory of IG /
SmoothGrad with many samples.

Usage::

    python -m benchmarks.run                       # ResNet50, 224², batch 8, CPU
    python -m benchmarks.run --device cuda --batch 64 --out benchmarks/results/cuda.json
    python -m benchmarks.run --model resnet18 --size 64 --methods gradient,fem --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import xaiwidgets as xw

from .cases import Config, build_cases, build_model, make_setup
from .memory import measure_in_subprocess, memory_specs
from .slider import run_sliders
from .timing import interleaved, median, use_clock

PEERS = ("captum", "zennit", "pytorch-grad-cam")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--model", default="resnet50", help="torchvision model name (random init)")
    p.add_argument("--size", type=int, default=224, help="image side (px)")
    p.add_argument("--batch", type=int, default=8, help="images per explanation")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after 1 warm-up")
    p.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed seconds; cpu: process CPU seconds (steadier on a "
                   "shared machine; CPU device only)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--markdown", default="", help="write the tables as Markdown here")
    sizes = p.add_argument_group("method sizes (default: small on CPU, as the methods' "
                                 "defaults on CUDA; the same for every implementation)")
    for name, kind in (("steps", int), ("samples", int), ("chunk", int), ("window", int),
                       ("stride", int), ("lime-samples", int), ("lime-segments", int),
                       ("mp-steps", int)):
        sizes.add_argument(f"--{name}", type=kind, default=None)
    extra = p.add_argument_group("slider latency and memory")
    extra.add_argument("--no-slider", action="store_true", help="skip slider latencies")
    extra.add_argument("--slider-repeats", type=int, default=3)
    extra.add_argument("--no-memory", action="store_true", help="skip the memory part")
    extra.add_argument("--memory-model", default=None, help="default: --model")
    extra.add_argument("--memory-size", type=int, default=None,
                       help="image side of the memory runs (default: 64 on CPU, --size on GPU)")
    extra.add_argument("--memory-n", type=int, default=256, help="IG steps / SmoothGrad samples")
    extra.add_argument("--memory-batch-sizes", default="8,64")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config.for_device(args.device, args.size)
    overrides = {field: getattr(args, field) for field in
                 ("steps", "samples", "chunk", "window", "stride", "lime_samples",
                  "lime_segments", "mp_steps") if getattr(args, field) is not None}
    return Config(**{**cfg.as_dict(), **overrides})


def hardware(device: torch.device) -> str:
    """The CPU's model name (lscpu) or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "xaiwidgets": xw.__version__}
    for dist in ("torchvision", "captum", "zennit", "grad-cam"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "n/a"
    return out


def git_commit() -> str:
    """The checked-out commit, with ``+dirty`` when the working tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def time_cases(setup, methods: list[str] | None, repeats: int,
               device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for case in build_cases(setup, methods):
        fns = {"limit": case.limit, "ours": case.ours,
               "ours_fresh": fresh_explainer(setup, case) if case.ours else None, **case.peers}
        available = {name: fn for name, fn in fns.items() if fn is not None}

        def before(name: str, case=case) -> None:
            if name == "ours" and case.cold_cache:
                setup.explainer.clear_cache()  # time the forward pass, not a cache hit

        print(f"  {case.method} ...", flush=True, file=sys.stderr)
        samples = interleaved(available, device, repeats, before=before)
        times = {name: {"median_s": median(samples[name]) if name in samples else None,
                        "samples": samples.get(name, [])} for name in fns}
        for name, entry in times.items():
            if name not in available:
                entry["note"] = "n/a"
            elif entry["median_s"] is None:
                entry["note"] = "error: " + str(entry["samples"][0])
        peer_times = {p: times[p]["median_s"] for p in case.peers
                      if times[p]["median_s"] is not None}
        best = min(peer_times, key=peer_times.get) if peer_times else None
        ours = times["ours"]["median_s"]
        rows.append({
            "method": case.method, "params": {k: _jsonable(v) for k, v in case.params.items()},
            "limit": case.limit_doc, "peer_note": case.peer_note, "times": times,
            "best_peer": best,
            "ratio_best_peer": ratio(ours, peer_times.get(best)) if best else None,
            "ratio_limit": ratio(ours, times["limit"]["median_s"]),
            "ratio_fresh_best_peer": ratio(times["ours_fresh"]["median_s"],
                                           peer_times.get(best)) if best else None,
        })
    return rows


def fresh_explainer(setup, case) -> Callable[[], Any]:
    """``xw.explain`` from a new Explainer (a one-shot call, as each chunk of
    ``xw.evaluate`` makes): it pays every pass the re-used Explainer had cached."""
    layer = setup.layer if xw.get_method(case.method).uses_layer else None

    def run() -> Any:
        ex = xw.Explainer(setup.model, setup.x, progress=False)
        return ex.explain(case.method, target=setup.targets, layer=layer, **case.params)

    return run


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The three tables as Markdown."""
    meta = result["meta"]
    lines = [
        f"{meta['model']} (random init), {meta['batch']}×3×{meta['size']}², "
        f"{meta['device']} ({meta['hardware']}, {meta['threads']} threads), "
        f"torch {meta['versions']['torch']}; median of {meta['repeats']} interleaved runs "
        f"after 1 warm-up; {meta['clock']}-clock seconds per call.", "",
        "| method | ours | ours (fresh) | captum | zennit | pytorch-grad-cam | limit | "
        "ours / best peer | fresh / best peer | ours / limit | sizes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["methods"]:
        t = row["times"]
        cells = [fmt_s(t.get(name, {}).get("median_s"))
                 for name in ("ours", "ours_fresh", *PEERS, "limit")]
        sizes = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"| {row['method']} | " + " | ".join(cells) +
                     f" | {fmt_ratio(row['ratio_best_peer'])}"
                     f" | {fmt_ratio(row.get('ratio_fresh_best_peer'))}"
                     f" | {fmt_ratio(row['ratio_limit'])}"
                     f" | {sizes} |")
    lines += ["", "Limits: " + "; ".join(f"{r['method']}: {r['limit']}"
                                         for r in result["methods"])]
    notes = [f"{r['method']}: {r['peer_note']}" for r in result["methods"] if r["peer_note"]]
    if notes:
        lines += ["", "Peers that differ: " + "; ".join(notes)]
    if result.get("slider"):
        lines += ["", "| slider (batch 1) | median latency (ms) | / fresh gradient | model calls "
                  "| values |", "|---|---|---|---|---|"]
        for row in result["slider"]:
            ms = "n/a" if row["median_ms"] is None else f"{row['median_ms']:.1f}"
            calls = row.get("model_calls")
            calls = "n/a" if calls is None else f"{calls} in {row['changes']} changes"
            lines.append(f"| {row['slider']} | {ms} | {fmt_ratio(row.get('vs_fresh_gradient'))} "
                         f"| {calls} | {row.get('note') or ', '.join(map(str, row['values']))} |")
    if result.get("memory"):
        lines += ["", "| memory | impl | n | batch_size | peak increase (MiB) |",
                  "|---|---|---|---|---|"]
        for row in result["memory"]:
            peak = "n/a" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}"
            lines.append(f"| {row['method']} | {row['impl']} | {row['n']} | "
                         f"{row['batch_size']} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from(args)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU time: use it with --device cpu")
    use_clock(args.clock)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    print(f"sizes: {cfg.as_dict()}", file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    model = build_model(args.model, device)
    setup = make_setup(model, args.batch, args.size, device, cfg)
    result: dict[str, Any] = {"meta": {
        "hardware": hardware(device), "cores": os.cpu_count(), "threads":
        torch.get_num_threads(), "device": str(device), "model": args.model,
        "size": args.size, "batch": args.batch, "repeats": args.repeats, "clock": args.clock,
        "sizes": cfg.as_dict(), "versions": versions(), "commit": git_commit(),
        "started": started,
        "loadavg_start": load, "targets": setup.targets,
    }}
    print("timing methods", file=sys.stderr)
    result["methods"] = time_cases(setup, methods, args.repeats, device)
    if not args.no_slider:
        print("slider latencies", file=sys.stderr)
        result["slider"] = run_sliders(model, setup.x, setup.targets[0], args.slider_repeats)
    if not args.no_memory:
        print("memory", file=sys.stderr)
        size = args.memory_size or (64 if device.type == "cpu" else args.size)
        batch_sizes = [int(b) for b in args.memory_batch_sizes.split(",")]
        # one thread: the peak does not depend on it, and a busy machine slows
        # multi-threaded small batches a lot
        result["memory"] = [
            measure_in_subprocess(spec) for spec in memory_specs(
                args.memory_model or args.model, size, str(device), args.memory_n,
                batch_sizes, 1 if device.type == "cpu" else None)
        ]
    result["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    table = markdown(result)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return result


if __name__ == "__main__":
    main()
