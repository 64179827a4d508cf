"""Dataset-scale evaluation: every method × every image × every metric, on dask.

The images are split into chunks of ``batch_size``; each chunk is one
``dask.delayed`` task that builds an :class:`~xaiwidgets.Explainer` on its images,
computes every method's maps and scores them against the gaze data. Without a
client the tasks run on dask's configured scheduler (``dask.config.set(scheduler=
"synchronous")``, ``"processes"``, a default ``Client``), threads when none is set
(tqdm progress bar); with ``client=`` (a ``dask.distributed.Client``) the same tasks
go to the cluster and the model is scattered to the workers once. Every scheduler
gives bit-identical numbers (``attrs["scheduler"]`` says which one ran).

The result is an ``xr.Dataset`` with dims ("image", "method"), one variable per
metric, image coordinates (``label``, ``predicted``, ``correct``, ...) to split
correct from wrong predictions, and netCDF-safe attrs saying how to reproduce it::

    model, preprocess, classes = xw.models.load("shapes-vgg")
    ds = xw.datasets.shapes(n=64, seed=1)
    result = xw.evaluate(model, ds, ["gradcam", "fem"], preprocess=preprocess)
    result.pcc.where(result.correct).mean("image")
    result.pcc.sel({"method": "fem"})        # not .sel(method="fem"): see below
    result.to_netcdf("result.nc", engine="h5netcdf")     # or result.to_zarr(...)

Parameter sweeps: a list where a method parameter takes one number or choice
(``params={"mlfem": {"operator": ["max", "add"]}}``; also ``"layer"``) runs one
variant per value; each is an entry of the ``method`` dim, e.g.
``"mlfem(operator=max)"``, with coords ``method_name`` and ``method_params``.

Selecting methods: write ``result.sel({"method": "fem"})`` (or ``.loc``). In
``result.sel(method="fem")`` xarray takes ``method`` as its own argument (the
inexact-lookup mode) and silently selects nothing.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..core.ops import attr_value
from ..core.registry import get_method
from ..explainer import Explainer
from . import metrics as _metrics

DEFAULT_METRICS = ("pcc", "sim", "kld", "nss", "auc_judd", "ssim", "spearman", "l1")
#: the dataset variables each kind of metric needs (``Metric.needs``); "shuffled" also
#: reads the other images' fixations, "explainer"/"method" the model and the images
NEEDS: dict[str, tuple[str, ...]] = {
    "map": ("gfdm",), "fixations": ("fixations",), "mask": ("mask",),
    "shuffled": ("fixations",), "none": (), "explainer": (), "method": (),
}
REFERENCE = {"map": "gfdm", "fixations": "fixations", "mask": "mask"}  # the one reference
#: the count of images fixating each pixel, over the whole dataset (shuffled AUC's negatives)
FIXATED_TOTAL = "fixated_total"
_EXPLAIN_KEYWORDS = ("layer", "reduce")  # Explainer.explain arguments that are not Params


@dataclass(frozen=True)
class Variant:
    """One entry of the ``method`` dim: a registered method with fixed arguments."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def variants(methods: str | Sequence[str], params: Mapping[str, Mapping] | None) -> list[Variant]:
    """Expand methods and their parameters (lists = sweeps) into :class:`Variant` s.

    >>> [v.label for v in variants(["fem", "mlfem"], {"mlfem": {"operator": ["max", "add"]}})]
    ['fem', 'mlfem(operator=max)', 'mlfem(operator=add)']
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    params = dict(params or {})
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"params given for {unknown}, which are not in methods={names}")
    out: list[Variant] = []
    for name in names:
        method = get_method(name)
        declared = {p.name: p for p in method.params}
        given = dict(params.get(name, {}))
        unknown = sorted(set(given) - set(declared) - set(_EXPLAIN_KEYWORDS))
        if unknown:
            raise TypeError(f"method {name!r} has no parameter(s) {unknown}; it takes "
                            f"{list(declared) + list(_EXPLAIN_KEYWORDS)}")
        # a list sweeps a parameter that takes one number/choice (or ``layer``); lists
        # stay values for parameters that accept anything (``layers``, baselines)
        swept = {k: list(v) for k, v in given.items() if isinstance(v, (list, tuple))
                 and (k == "layer" or (k in declared and declared[k].kind != "any"))}
        fixed = {k: v for k, v in given.items() if k not in swept}
        for combo in itertools.product(*swept.values()):  # one empty combo: no sweep
            chosen = dict(zip(swept, combo, strict=True))
            values = {**fixed, **chosen}
            # validate now: a bad value should fail here, not inside a dask task
            method.resolve_params({k: v for k, v in values.items() if k in declared})
            label = ",".join(f"{k}={v}" for k, v in chosen.items())
            out.append(Variant(f"{name}({label})" if label else name, name, values))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods repeat: {labels}")
    return out


def dataset_needs(metric: str) -> tuple[str, ...]:
    """The dataset variables ``metric`` needs (none for complexity and the
    explainer-based metrics).

    >>> dataset_needs("pointing_game"), dataset_needs("road")
    (('mask',), ())
    """
    return NEEDS[_metrics.get(metric).needs]


def references(data: xr.Dataset | None, indices: Any, metric_names: Sequence[str]
               ) -> dict[str, np.ndarray]:
    """What the metrics need of ``data`` for the images ``indices``: the variables (as
    arrays), and for shuffled AUC the dataset-wide fixation count (:data:`FIXATED_TOTAL`).

    Too few images with fixations for shuffled AUC is a clear error.
    """
    kinds = {_metrics.get(m).needs for m in metric_names}
    names = sorted({v for k in kinds for v in NEEDS[k]})
    out = {name: np.asarray(data[name].values[indices]) for name in names} if names else {}
    if "shuffled" in kinds:
        fixated = np.asarray(data["fixations"].values) > 0
        seen = fixated.reshape(len(fixated), -1).any(axis=1)
        if seen.sum() < 2:
            raise ValueError(
                f"shuffled_auc takes its negatives from the other images' fixations; the "
                f"dataset has {int(seen.sum())} image(s) with fixations, it needs at least 2 "
                "(evaluate more images, or use auc_judd / auc_borji)")
        out[FIXATED_TOTAL] = fixated.sum(axis=0)
    return out


def score_maps(metric: str, maps: xr.DataArray, refs: Mapping[str, np.ndarray], *,
               explainer: Explainer | None = None, method: str | None = None,
               params: Mapping[str, Any] | None = None, target: Any = None,
               options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Score ``maps`` (image, ...) with the registered ``metric``: one number per image.

    ``refs`` comes from :func:`references`; the explainer-based metrics also take the
    ``explainer`` that made the maps (its images), the ``method`` and ``params`` (for
    the robustness metrics, which explain again) and the ``target``; ``options`` are the
    metric's own keyword arguments (e.g. ``{"n_samples": 8}``).

    >>> score_maps("sparseness", maps, {}).shape                      # doctest: +SKIP
    (4,)
    """
    spec = _metrics.get(metric)
    options = dict(options or {})
    if spec.needs == "explainer":
        return spec(explainer, maps, target, **options)[metric].values
    if spec.needs == "method":
        return spec(explainer, method, target, params=dict(params or {}),
                    **options)[metric].values
    plain = maps.drop_vars(list(maps.coords))

    def as_maps(values: Any) -> xr.DataArray:  # clips: per frame, then the mean over t
        values = np.asarray(values)
        return xr.DataArray(values, dims=maps.dims[-values.ndim:])

    if spec.needs == "none":
        return spec(plain, **options).values
    if spec.needs == "shuffled":
        own = np.asarray(refs["fixations"]) > 0
        others = (np.asarray(refs[FIXATED_TOTAL]) - own) > 0
        return spec(plain, as_maps(own), as_maps(others), **options).values
    return spec(plain, as_maps(refs[REFERENCE[spec.needs]]), **options).values


def _run_chunk(model_bytes: bytes, images: np.ndarray, refs: dict[str, np.ndarray],
               labels: np.ndarray | None, preprocess: Callable | None,
               specs: list[Variant], metric_names: Sequence[str], target: str,
               device: str, metric_params: Mapping[str, Mapping[str, Any]] | None = None
               ) -> dict[str, Any]:
    """One task: explain a chunk of images with every variant and score the maps."""
    import cloudpickle

    # each task unpickles its own model: methods attach hooks and canonizers to it, so
    # tasks sharing one object in threads would see each other's
    model = cloudpickle.loads(model_bytes).to(device)
    ex = Explainer(model, torch.as_tensor(np.asarray(images)).to(device),
                   preprocess=preprocess, progress=False)
    probs = torch.softmax(ex.logits().float(), dim=1)
    predicted = probs.argmax(dim=1)
    chosen = predicted if target == "predicted" else torch.as_tensor(labels, device=device)
    n = ex.n_images
    scores = {m: np.empty((n, len(specs))) for m in metric_names}
    seconds, used = np.zeros(len(specs)), []
    for j, spec in enumerate(specs):
        start = time.perf_counter()
        maps = ex.explain(spec.method, target=chosen.tolist(), **spec.params)
        seconds[j] = time.perf_counter() - start
        if maps.dims not in (("image", "y", "x"), ("image", "t", "y", "x")):
            raise ValueError(f"{spec.label} gave maps of dims {maps.dims}; metrics need "
                             "one map per image (do not pass reduce=None)")
        for m in metric_names:
            scores[m][:, j] = score_maps(m, maps, refs, explainer=ex, method=spec.method,
                                         params=spec.params, target=chosen.tolist(),
                                         options=(metric_params or {}).get(m))
        used.append(json.dumps({"layer": maps.attrs["layer"],
                                **json.loads(maps.attrs["params"])}))
    return {
        "scores": scores,
        "predicted": predicted.cpu().numpy(),
        "probability": probs.gather(1, predicted[:, None])[:, 0].cpu().numpy(),
        "target": chosen.cpu().numpy(),
        "seconds": seconds,
        "params": used,
    }


def evaluate(
    model: nn.Module,
    dataset: xr.Dataset,
    methods: str | Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    preprocess: Callable | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    client: Any = None,
    batch_size: int = 16,
    *,
    target: str = "predicted",
    device: str | torch.device | None = None,
    model_name: str | None = None,
    progress: bool = True,
    metric_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> xr.Dataset:
    """Explain every image of ``dataset`` with every method and score the maps.

    Parameters
    ----------
    model
        The classifier (``torch.nn.Module``); it is copied in each task, never modified.
    dataset
        ``xr.Dataset`` with ``image`` (image, channel, y, x), or video clips (image,
        channel, t, y, x) with (image, t, y, x) references scored per frame and
        averaged over t (``xw.datasets.moving_shapes``), in [0, 1] (or model input
        when ``preprocess`` is None), ``gfdm`` (image, y, x) for the map metrics,
        ``fixations`` (image, y, x) for NSS/AUC; optional ``label`` (image). Other
        per-image variables become coordinates of the result. ``xw.datasets.shapes``
        makes one.
    methods
        Registered method names (``xw.methods()``).
    metrics
        Names from ``xw.metrics.available()``, each where the dataset has what it
        needs (:func:`dataset_needs`): ``gfdm`` for the map metrics and EMD,
        ``fixations`` for NSS/AUC/information gain and shuffled AUC (which takes the
        other images' fixations as negatives: at least two images with fixations),
        ``mask`` for the localisation metrics; complexity needs nothing, and the
        faithfulness and robustness metrics use the model and the images.
    preprocess
        Maps display images to the model input (as for ``Explainer``).
    params
        ``{method: {parameter: value}}``; ``"layer"`` and ``"reduce"`` are accepted; a
        list for a number/choice parameter (or ``layer``) sweeps it (module docstring).
    client
        A ``dask.distributed.Client``. Default: dask's configured scheduler
        (``dask.config.set(scheduler="synchronous")``, a default ``Client``), and
        local threads when none is configured. Every scheduler gives the same numbers:
        each task explains with its own copy of the model, and method rules are
        scoped to the thread that runs them.
    batch_size
        Images per task (and per model call).
    target
        ``"predicted"`` (explain the predicted class, default) or ``"label"``.
    device
        Where tasks run the model; default the model's device.
    model_name
        Recorded in attrs (e.g. ``"shapes-vgg"``); default the model's class name.
    progress
        Show a tqdm bar.
    metric_params
        ``{metric: {keyword: value}}`` passed to the metrics, e.g.
        ``{"max_sensitivity": {"n_samples": 8}, "road": {"percentages": range(5, 100, 10)}}``.

    Returns
    -------
    xr.Dataset
        One variable per metric, dims ("image", "method"), attrs ``higher_is_better``
        and ``needs``; ``seconds`` (method): explanation time summed over tasks.
        Coordinates: ``method_name``, ``method_params`` (JSON, defaults included),
        ``label``, ``predicted``, ``probability``, ``correct``, ``target``.

    >>> result = evaluate(model, ds, ["gradcam", "fem"], ("pcc", "nss"),
    ...                   preprocess=preprocess)                      # doctest: +SKIP
    >>> result.pcc.groupby("correct").mean()                          # doctest: +SKIP
    """
    import dask

    metric_names = [_metrics.get(m).name for m in ([metrics] if isinstance(metrics, str)
                                                   else metrics)]
    specs = variants(methods, params)
    if target not in ("predicted", "label"):
        raise ValueError(f"target={target!r}: use 'predicted' or 'label'")
    needed = {"image"} | {v for m in metric_names for v in dataset_needs(m)}
    unknown = sorted(set(metric_params or {}) - set(metric_names))
    if unknown:
        raise ValueError(f"metric_params given for {unknown}, which are not in "
                         f"metrics={metric_names}")
    needed |= {"label"} if target == "label" else set()
    # ``image`` shares its name with its dim, so xarray files it under coords
    missing = sorted(needed - set(dataset.variables))
    if missing:
        raise ValueError(
            f"dataset lacks {missing} (needed by the metrics/target asked for); it has "
            f"{sorted(dataset.variables)}. xw.datasets.shapes() makes a complete one; "
            "xw.gfdm() turns fixations into a density map"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    n = dataset.sizes["image"]
    labels = dataset["label"].values if "label" in dataset.variables else None
    shuffled = [m for m in metric_names if _metrics.get(m).needs == "shuffled"]
    total = references(dataset, slice(0, 0), shuffled).get(FIXATED_TOTAL)
    refs = sorted(needed - {"image", "label"})

    import cloudpickle

    # pickled by us (cloudpickle: models defined in a notebook work too), because
    # distributed's own serialisation of modules loses their hook dicts' type
    model_ref: Any = cloudpickle.dumps(model)
    scheduler = scheduler_name(client)
    client = client if client is not None else default_client(scheduler)
    if client is not None:  # sent to each worker once, not with every task
        model_ref = client.scatter(model_ref, broadcast=True, hash=False)
    run = dask.delayed(_run_chunk, pure=False)
    tasks = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        tasks.append(run(
            model_ref, dataset["image"].data[part],
            {**{r: dataset[r].data[part] for r in refs},
             **({} if total is None else {FIXATED_TOTAL: total})},
            None if labels is None else labels[part],
            preprocess, specs, metric_names, target, str(device), metric_params,
        ))
    results = _compute(tasks, client, progress)
    result = _assemble(results, dataset, specs, metric_names, labels, model, model_name,
                       preprocess, params, target, batch_size, scheduler)
    result.attrs["metric_params"] = json.dumps(
        {k: dict(v) for k, v in (metric_params or {}).items()},
        default=lambda value: str(attr_value(value)))
    return result


def scheduler_name(client: Any = None) -> str:
    """The scheduler :func:`evaluate` uses: ``"distributed"`` with a client (given, or
    the default one a ``dask.distributed.Client`` sets), else dask's configured
    ``scheduler`` (``dask.config.set(scheduler="synchronous")``), else ``"threads"``.

    >>> import dask
    >>> with dask.config.set(scheduler="synchronous"):
    ...     scheduler_name()
    'synchronous'
    """
    if client is not None:
        return "distributed"
    import dask

    configured = dask.config.get("scheduler", None)
    if configured is None:
        return "threads"
    if not isinstance(configured, str):
        return getattr(configured, "__name__", type(configured).__name__)
    aliases = {"threading": "threads", "sync": "synchronous", "single-threaded":
               "synchronous", "multiprocessing": "processes", "dask.distributed":
               "distributed"}
    return aliases.get(configured, configured)


def default_client(scheduler: str) -> Any:
    """The distributed client a ``dask.config`` scheduler of "distributed" refers to."""
    if scheduler != "distributed":
        return None
    from distributed import default_client as current

    return current()


def _compute(tasks: list, client: Any, progress: bool) -> list[dict[str, Any]]:
    import dask

    desc = f"evaluate ({len(tasks)} tasks)"
    if client is None:
        # dask's configured scheduler (threads when none is): compute() reads it
        if not progress:
            return list(dask.compute(*tasks))
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=desc, leave=False):
            return list(dask.compute(*tasks))
    futures = client.compute(tasks)
    if progress:
        from distributed import as_completed
        from tqdm.auto import tqdm

        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False):
            pass
    return client.gather(futures)


def _assemble(results: list[dict[str, Any]], dataset: xr.Dataset, specs: list[Variant],
              metric_names: Sequence[str], labels: np.ndarray | None, model: nn.Module,
              model_name: str | None, preprocess: Callable | None, params: Any,
              target: str, batch_size: int, scheduler: str) -> xr.Dataset:
    """Concatenate the chunks into the result Dataset (coords and netCDF-safe attrs)."""
    def cat(key: str) -> np.ndarray:
        return np.concatenate([r[key] for r in results])

    n = sum(len(r["predicted"]) for r in results)
    predicted = cat("predicted")
    coords: dict[str, Any] = {
        "image": np.arange(n),
        "method": [s.label for s in specs],
        "method_name": ("method", [s.method for s in specs]),
        "method_params": ("method", results[0]["params"]),
        "predicted": ("image", predicted),
        "probability": ("image", cat("probability")),
        "target": ("image", cat("target")),
    }
    if labels is not None:
        coords["label"] = ("image", labels)
        coords["correct"] = ("image", predicted == labels)
    for name, var in dataset.variables.items():  # other per-image facts (clutter, ...)
        if var.dims == ("image",) and name not in coords:
            coords[name] = ("image", var.values)
    data = {
        m: (("image", "method"), np.concatenate([r["scores"][m] for r in results]),
            {"higher_is_better": int(_metrics.METRICS[m].higher_is_better),
             "needs": _metrics.METRICS[m].needs, "long_name": _metrics.METRICS[m].doc})
        for m in metric_names
    }
    data["seconds"] = ("method", np.sum([r["seconds"] for r in results], axis=0),
                       {"long_name": "explanation time summed over tasks (s)"})
    from .._version import __version__

    attrs = {
        "model": model_name or type(model).__name__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "preprocess": repr(preprocess) if preprocess is not None else "none",
        "methods": ",".join(s.label for s in specs),
        "metrics": ",".join(metric_names),
        "params": json.dumps({k: dict(v) for k, v in (params or {}).items()},
                             default=lambda value: str(attr_value(value))),
        "target": target,
        "batch_size": batch_size,
        "scheduler": scheduler,
        "classes": json.dumps(list(dataset.attrs.get("classes", []))),
        "dataset_attrs": json.dumps({k: attr_value(v) for k, v in dataset.attrs.items()},
                                    default=str),
        "xaiwidgets_version": __version__,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def wins(result: xr.Dataset, metric: str) -> xr.DataArray:
    """Pairwise comparison: on how many images each method beats each other one.

    ``wins(result, "pcc").sel({"method": "fem", "other": "gradcam"})`` counts the images where
    FEM scores strictly better than Grad-CAM (lower for KLD/L1). NaN scores never win.

    >>> wins(result.where(result.correct), "pcc")                     # doctest: +SKIP
    """
    scores = result[metric].reset_coords(drop=True)
    higher = bool(_metrics.get(metric).higher_is_better)
    other = scores.rename(method="other")
    better = scores > other if higher else scores < other
    counts = better.sum("image").rename(f"{metric}_wins")
    counts.attrs = {"metric": metric, "higher_is_better": int(higher)}
    return counts
