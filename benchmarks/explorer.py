"""DatasetExplorer's opening pass against a plain batched forward, and its re-opening
from a store.

For each model, on ``xw.datasets.shapes(n)`` (in memory), in rounds that interleave
the contenders (a burst of load hits all alike):

* **forward**: ``model(preprocess(x[i:i + batch]))`` over every image under
  ``torch.no_grad()``, the images already a tensor (the limit of the opening pass);
* **open**: ``xw.DatasetExplorer(model, ds, preprocess=..., background=True)`` until
  it returns (predictions, confusion, widgets; the first page's maps follow in the
  background, as in a notebook), and **first page**: until that page is drawn;
* **open + store**: the same with ``store=`` a new folder (weights and every image
  hashed, predictions written in chunks), and **re-open**: again on that store (no
  model call: checked), until the first page is drawn.

``--clock cpu`` (default) counts this process's CPU seconds, all threads, which a
busy shared machine disturbs much less than the wall clock::

    python -m benchmarks.explorer                                  # 10,000 images, both models
    python -m benchmarks.explorer --n 2000 --models shapes-resnet --clock wall
    python -m benchmarks.explorer --out benchmarks/results/explorer_cpu.json
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .timing import CLOCKS


def plain_forward(model: torch.nn.Module, preprocess: Callable, images: torch.Tensor,
                  batch: int) -> None:
    """The bare batched forward the opening pass cannot beat."""
    with torch.no_grad():
        for start in range(0, len(images), batch):
            model(preprocess(images[start:start + batch]))


def measure(name: str, ds: Any, batch: int, repeats: int, clock: Callable[[], float]
            ) -> dict[str, Any]:
    """One model's samples (seconds) for every contender, interleaved over rounds."""
    import xaiwidgets as xw
    from xaiwidgets.widgets.dataset_explorer import DatasetExplorer

    model, preprocess, _ = xw.models.load(name)
    images = torch.from_numpy(ds.image.values)
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    samples: dict[str, list[float]] = {k: [] for k in (
        "forward", "open", "first page", "open + store", "re-open")}
    reopen_calls = []

    def explorer(**kwargs: Any) -> tuple[float, float]:
        start = clock()
        x = DatasetExplorer(model, ds, preprocess=preprocess, background=True,
                            batch_size=batch, **kwargs)
        opened = clock() - start
        assert x.wait(timeout=3600) and x.error is None, x.error
        drawn = clock() - start
        x.close()
        return opened, drawn

    try:
        # warm-up: imports (widgets, plotly), the model's first calls, the page's methods
        small = ds.isel(image=slice(0, 2 * batch))
        plain_forward(model, preprocess, images[:2 * batch], batch)
        DatasetExplorer(model, small, preprocess=preprocess, background=False).close()
        for _ in range(repeats):
            start = clock()
            plain_forward(model, preprocess, images, batch)
            samples["forward"].append(clock() - start)
            opened, drawn = explorer()
            samples["open"].append(opened)
            samples["first page"].append(drawn)
            folder = Path(tempfile.mkdtemp(prefix="explorer-bench-"))
            try:
                samples["open + store"].append(explorer(store=folder / "x.zarr")[0])
                calls[0] = 0
                samples["re-open"].append(explorer(store=folder / "x.zarr")[1])
                reopen_calls.append(calls[0])
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        hook.remove()
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {"model": name, "samples": samples, "median": median,
            "ratio": {k: median[k] / median["forward"] for k in
                      ("open", "first page", "open + store")},
            "reopen_model_calls": reopen_calls}


def markdown(results: list[dict[str, Any]], n: int, clock: str) -> str:
    """The results as a Markdown table (medians; ratios to the plain forward)."""
    lines = [f"{n} shapes images, {clock} seconds (median); ratio = / plain forward", "",
             "| model | forward | open | first page | open + store | re-open | "
             "re-open model calls |", "|---|---|---|---|---|---|---|"]
    for r in results:
        m, q = r["median"], r["ratio"]
        lines.append(
            f"| {r['model']} | {m['forward']:.1f} | {m['open']:.1f} ({q['open']:.2f}×) | "
            f"{m['first page']:.1f} ({q['first page']:.2f}×) | {m['open + store']:.1f} "
            f"({q['open + store']:.2f}×) | {m['re-open']:.1f} | "
            f"{max(r['reopen_model_calls'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """DatasetExplorer opening vs a plain forward; re-opening from its store."""
    import argparse

    import xaiwidgets as xw

    p = argparse.ArgumentParser(prog="python -m benchmarks.explorer", description=main.__doc__)
    p.add_argument("--n", type=int, default=10_000, help="images (shapes, 128 px)")
    p.add_argument("--models", default="shapes-vgg,shapes-resnet")
    p.add_argument("--batch", type=int, default=64, help="images per forward (both)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default="", help="a JSON file for every sample")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ds = xw.datasets.shapes(n=args.n, seed=1)
    print(f"{args.n} images made in {time.perf_counter() - start:.0f} s", flush=True)
    results = []
    for name in args.models.split(","):
        results.append(measure(name, ds, args.batch, args.repeats, CLOCKS[args.clock]))
        print(markdown(results[-1:], args.n, args.clock), flush=True)
    table = markdown(results, args.n, args.clock)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "n": args.n, "batch": args.batch, "clock": args.clock, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "results": results,
            "table": table}, indent=1))


if __name__ == "__main__":
    main()
