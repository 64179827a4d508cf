"""Peak memory of IG / SmoothGrad with many samples: bounded by ``batch_size``, not ``n``;
resident memory over many rounds of explanations (``python -m benchmarks.memory
rounds 60``: with and without :mod:`xaiwidgets.core.memory`'s trim); and resident memory
over simulated widget use (``python -m benchmarks.memory session 30``: 30 minutes).

Each configuration runs in a fresh subprocess (``python -m benchmarks.memory '<json>'``)
so one run's allocations cannot hide another's. On CPU the peak resident set size
(VmHWM, reset through ``/proc/self/clear_refs`` just before the call; ``getrusage``
where that is unavailable) minus the resident size before the call; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

>>> spec = {"method": "smoothgrad", "impl": "ours", "n": 4, "batch_size": 2,
...         "model": "resnet18", "size": 32, "device": "cpu"}
>>> measure(spec)["peak_mib"] > 0  # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import xaiwidgets as xw

from .cases import Config, build_model, make_setup

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes(field: str = "VmRSS") -> int | None:
    """Resident (``VmRSS``) or peak resident (``VmHWM``) bytes, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def attribution(spec: dict[str, Any], setup) -> Any:
    """The call whose peak memory is measured."""
    n, bs, method, x = spec["n"], spec["batch_size"], spec["method"], setup.x
    if spec["impl"] == "ours":
        params = {"steps": n} if method == "integrated_gradients" else {"n": n}
        return lambda: setup.explainer.explain(method, target=setup.targets, batch_size=bs,
                                               **params)
    from captum import attr as captum

    if method == "integrated_gradients":
        return lambda: captum.IntegratedGradients(setup.model).attribute(
            x, baselines=0.0, target=setup.targets, n_steps=n, method="riemann_right",
            internal_batch_size=bs)
    return lambda: captum.NoiseTunnel(captum.Saliency(setup.model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=max(1, bs // len(x)),
        stdevs=0.15 * float(x.max() - x.min()), target=setup.targets, abs=False)


#: the long-running-kernel case: five methods per round, each round a fresh Explainer
ROUND_METHODS: dict[str, dict[str, Any]] = {
    "gradient": {}, "integrated_gradients": {"steps": 16}, "lrp": {}, "deeplift": {},
    "gradcam": {},
}
#: rounds before the reference resident size is taken (caches, allocator pools)
WARMUP_ROUNDS = 5


def rounds_rss(spec: dict[str, Any]) -> dict[str, Any]:
    """Resident memory over ``spec["rounds"]`` rounds of :data:`ROUND_METHODS` on fresh
    Explainers (torchvision ResNet18, random weights, ``batch`` images at ``size``²).

    ``trim=False`` switches :mod:`xaiwidgets.core.memory` off: glibc then keeps the
    freed heap (the retention this measures). Reported: the resident size after
    :data:`WARMUP_ROUNDS` rounds and the largest and final growth over it (MiB).
    """
    import gc

    import torchvision

    from xaiwidgets.core import memory

    memory.ENABLED = bool(spec.get("trim", True))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.rand(spec.get("batch", 4), 3, spec.get("size", 64), spec.get("size", 64))
    rss = []
    for _ in range(int(spec["rounds"])):
        ex = xw.Explainer(model, images, progress=False)
        for method, params in ROUND_METHODS.items():
            ex.explain(method, **params)
        del ex
        gc.collect()
        rss.append(rss_bytes() or 0)
    warm = rss[min(WARMUP_ROUNDS, len(rss)) - 1]
    after = rss[WARMUP_ROUNDS:] or [warm]
    return {**spec, "warm_mib": warm / 2**20, "max_growth_mib": (max(after) - warm) / 2**20,
            "final_growth_mib": (after[-1] - warm) / 2**20, "xaiwidgets": xw.__version__}


#: what a simulated user does in :func:`session_rss`, with relative frequencies
SESSION_ACTIONS = {"image": 3, "method": 3, "slider": 6, "stack": 2, "compare": 1,
                   "explorer_page": 2, "explorer_open": 1, "channel": 3, "region": 1,
                   "rerun_cell": 1}
#: the ExplainerWidget's methods in the session (every family; sizes kept small)
SESSION_METHODS = ("gradcam", "fem", "gradient", "guided_backprop", "lrp", "deeplift",
                   "integrated_gradients", "smoothgrad", "occlusion", "mlfem")


def session_widgets(background: bool) -> dict[str, Any]:
    """The widgets of a class session on ``shapes-vgg``: an ExplainerWidget, a
    FEMStackWidget, a CompareWidget, a DatasetExplorer (200 images) and a
    ConceptExplorer (64 images)."""
    from xaiwidgets.widgets.lifecycle import running_cell

    model, preprocess, classes = xw.models.load("shapes-vgg")
    data = xw.datasets.shapes(n=200, seed=3)
    images = data.isel(image=slice(0, 8))
    kw = {"preprocess": preprocess, "classes": classes, "background": background}
    with running_cell("explainer-cell", "run-0"):
        explainer = xw.ExplainerWidget(model, images, methods=SESSION_METHODS, **kw)
    return {
        "explainer": explainer,
        "stack": xw.FEMStackWidget(model, images, **kw),
        "compare": xw.CompareWidget(model, images.isel(image=slice(0, 2)),
                                    methods=("gradcam", "fem", "gradient"), **kw),
        "explorer": xw.DatasetExplorer(model, data, methods=("gradcam", "fem"), **kw),
        "concepts": xw.ConceptExplorer(model, data.isel(image=slice(0, 64)), **kw),
    }


def session_step(widgets: dict[str, Any], action: str, rng: Any) -> None:
    """One user action on the session's widgets (a control change, as a click makes)."""
    w = widgets["explainer"]

    def pick(control: Any) -> Any:
        options = [o[1] if isinstance(o, tuple) else o for o in control.options]
        return options[int(rng.integers(len(options)))]

    if action == "image":
        w.controls["image"].value = pick(w.controls["image"])
    elif action == "method":
        w.controls["method"].value = pick(w.controls["method"])
    elif action == "slider":  # the current method's first numeric slider, or the view
        name = next((n for n, c in w.controls.items() if c.layout.display != "none"
                     and hasattr(c, "max") and n not in ("image", "frame")
                     and n in w.params.keys.get(w.method, {}).values()), "opacity")
        c = w.controls[name]
        value = c.min + (c.max - c.min) * float(rng.random())
        c.value = type(c.value)(round(value) if isinstance(c.value, int) else value)
    elif action == "stack":
        s = widgets["stack"]
        s.controls["image"].value = pick(s.controls["image"])
    elif action == "compare":
        c = widgets["compare"]
        c.controls["image"].value = pick(c.controls["image"])
    elif action == "explorer_page":
        x = widgets["explorer"]
        x.controls["page"].value = pick(x.controls["page"]) if hasattr(
            x.controls["page"], "options") else int(rng.integers(
                x.controls["page"].min, x.controls["page"].max + 1))
    elif action == "explorer_open":
        x = widgets["explorer"]
        x.wait()
        if x.shown:
            x.select(x.shown[int(rng.integers(len(x.shown)))])
    elif action == "channel":
        c = widgets["concepts"]
        c.wait()
        if c.channels is not None and c.channels.sizes.get("rank"):
            c.select_channel(int(c.channels.channel.values[
                int(rng.integers(c.channels.sizes["rank"]))]))
    elif action == "region":
        c = widgets["concepts"]
        y0, x0 = (int(v) for v in rng.integers(0, 64, size=2))
        c.select_region(y0, x0, y0 + 48, x0 + 48)
    elif action == "rerun_cell":  # a student re-runs the cell: a new ExplainerWidget,
        # the old one dropped as a kernel drops it (no close() call: the cell's new run
        # closes the widgets of its earlier run, see xaiwidgets.widgets.lifecycle)
        from xaiwidgets.widgets.lifecycle import running_cell

        old = widgets.pop("explainer")
        with running_cell("explainer-cell", f"run-{rng.integers(2**62)}"):
            widgets["explainer"] = xw.ExplainerWidget(
                old.model, old.images, preprocess=old.preprocess, classes=old.classes,
                methods=SESSION_METHODS, background=old.background)


def session_rss(spec: dict[str, Any]) -> dict[str, Any]:
    """Resident memory over ``spec["minutes"]`` of simulated widget use: random
    (seeded) actions from :data:`SESSION_ACTIONS` on :func:`session_widgets`, as
    fast as they compute, the background threads on as in a kernel (an action often
    supersedes the previous one's work). The reference is the resident size after
    ``spec["warmup_minutes"]``; reported: the largest and final growth over it (MiB),
    the actions done, and a resident-size sample per minute.
    """
    import gc
    import time

    import numpy as np

    from xaiwidgets.core import memory

    memory.ENABLED = bool(spec.get("trim", True))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rng = np.random.default_rng(spec.get("seed", 0))
    widgets = session_widgets(background=bool(spec.get("background", True)))
    names, weights = zip(*SESSION_ACTIONS.items(), strict=True)
    p = np.asarray(weights, dtype=float) / sum(weights)
    start = time.monotonic()
    end, warm_end = start + 60 * float(spec["minutes"]), start + 60 * float(
        spec.get("warmup_minutes", 3))
    warm, samples, actions, errors, next_sample = None, [], 0, 0, start
    while time.monotonic() < end:
        action = names[int(rng.choice(len(names), p=p))]
        try:
            session_step(widgets, action, rng)
        except Exception:  # noqa: BLE001 - a failing action is counted, the run goes on
            errors += 1
        actions += 1
        if rng.random() < 0.3:  # the user waits for the result now and then
            for w in widgets.values():
                w.wait()
        now = time.monotonic()
        if now >= next_sample:
            gc.collect()
            samples.append(((now - start) / 60, (rss_bytes() or 0) / 2**20))
            next_sample = now + 60
        if warm is None and now >= warm_end:
            for w in widgets.values():
                w.wait()
            gc.collect()
            warm = (rss_bytes() or 0) / 2**20
    for w in widgets.values():
        w.wait()
    gc.collect()
    final = (rss_bytes() or 0) / 2**20
    warm = final if warm is None else warm
    after = [mib for minute, mib in samples if minute >= float(spec.get("warmup_minutes", 3))]
    return {**spec, "warm_mib": warm, "max_growth_mib": max([*after, final]) - warm,
            "final_growth_mib": final - warm, "actions": actions, "errors": errors,
            "samples": samples, "xaiwidgets": xw.__version__}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory (MiB) of one configuration, in this process (a ``rounds`` spec:
    :func:`rounds_rss`)."""
    if "rounds" in spec:
        return rounds_rss(spec)
    if "minutes" in spec:
        return session_rss(spec)
    device = torch.device(spec.get("device", "cpu"))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = build_model(spec["model"], device)
    setup = make_setup(model, spec.get("batch", 1), spec["size"], device, Config())
    call = attribution(spec, setup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        how = "torch.cuda.max_memory_allocated"
    else:
        before = rss_bytes() or 0
        if reset_peak_rss():
            call()
            peak, how = (rss_bytes("VmHWM") or 0) - before, "VmHWM (clear_refs)"
        else:
            call()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            how = "ru_maxrss"
    return {**spec, "peak_mib": max(peak, 0) / 2**20, "measured_with": how,
            "xaiwidgets": xw.__version__}


def measure_in_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process; errors come back as ``{"error": ...}``."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "peak_mib": None, "error": tail[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_specs(model: str, size: int, device: str, n: int, batch_sizes: list[int],
                 threads: int | None) -> list[dict[str, Any]]:
    """Configurations: IG at n/4 with the smallest batch size (the peak must not grow
    with n), then ours and Captum at n with every batch size."""
    base = {"model": model, "size": size, "device": device, "threads": threads}
    # n/4 once, for IG: SmoothGrad runs through the same chunked gradient sum
    specs = [{**base, "method": "integrated_gradients", "impl": "ours", "n": max(1, n // 4),
              "batch_size": min(batch_sizes)}]
    for method in ("integrated_gradients", "smoothgrad"):
        for impl in ("ours", "captum"):
            for bs in batch_sizes:
                specs.append({**base, "method": method, "impl": impl, "n": n,
                              "batch_size": bs})
    return specs


if __name__ == "__main__":
    if sys.argv[1:2] == ["rounds"]:  # python -m benchmarks.memory rounds [N]
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 60
        print("| malloc_trim | rounds | RSS after warm-up (MiB) | max growth | final growth |")
        print("|---|---|---|---|---|")
        for trim in (False, True):
            row = measure_in_subprocess({"rounds": n, "trim": trim, "size": 64, "batch": 4},
                                        timeout=3600)
            if "error" in row:
                print(f"| {'on' if trim else 'off'} | {n} | error: {row['error']} | | |")
                continue
            print(f"| {'on' if trim else 'off'} | {n} | {row['warm_mib']:.0f} | "
                  f"{row['max_growth_mib']:+.0f} | {row['final_growth_mib']:+.0f} |")
    elif sys.argv[1:2] == ["session"]:  # python -m benchmarks.memory session [MINUTES]
        minutes = float(sys.argv[2]) if len(sys.argv) > 2 else 30
        row = measure_in_subprocess({"minutes": minutes, "warmup_minutes": min(3, minutes / 3)},
                                    timeout=int(120 * minutes) + 600)
        if "error" in row:
            print(f"error: {row['error']}")
        else:
            print("| minutes | actions | RSS after warm-up (MiB) | max growth | final growth |")
            print("|---|---|---|---|---|")
            print(f"| {minutes:g} | {row['actions']} ({row['errors']} failed) | "
                  f"{row['warm_mib']:.0f} | {row['max_growth_mib']:+.0f} | "
                  f"{row['final_growth_mib']:+.0f} |")
            print("per minute (min, MiB):", ", ".join(f"{m:.0f}:{r:.0f}"
                                                      for m, r in row["samples"]))
    else:
        print(json.dumps(measure(json.loads(sys.argv[1]))))
