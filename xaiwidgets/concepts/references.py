"""Reference patches of a layer's channels over a whole dataset (what each channel
responds to), streamed in chunks with only the top-k kept.

>>> import xaiwidgets as xw
>>> model, preprocess, classes = xw.models.load("shapes-vgg")
>>> ds = xw.datasets.shapes(n=16, seed=0)
>>> refs = xw.concepts.references(model, ds, "features.27", top=4, preprocess=preprocess,
...                               progress=False)
>>> refs.image.dims, refs.sizes["rank"]
(('channel', 'rank'), 4)

``progress=`` takes ``True`` (a tqdm bar), ``False`` or a callable ``progress(done,
total)`` (images done so far, dataset size; called once before the first new chunk and
after each one). A callable that raises stops the pass there: the store keeps the
chunks finished so far (never a half-written one) and the next call resumes after them
(the widgets cancel this way).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..core.channels import channel_count
from ..core.layers import resolve_layer
from ..core.ops import model_device
from ..core.registry import get_method
from ..core.scoped import model_guard
from ..datasets.adapters import ImageSource, image_source
from ..explainer import Explainer
from .patches import FIELDS, chunk_candidates, merge
from .store import Store, architecture, chunks, dataset_fingerprint, weights_hash

BY = ("activation", "relevance")
#: ``progress=`` of a dataset pass: a tqdm bar (True), none (False) or ``f(done, total)``
Progress = bool | Callable[[int, int], None]


@contextlib.contextmanager
def reporting(progress: Progress, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """``report(done)`` for a pass over ``total`` images: a tqdm bar (``True``), nothing
    (``False``), or ``progress(done, total)`` (it may raise to stop the pass).

    >>> seen = []
    >>> with reporting(lambda done, total: seen.append((done, total)), 10, "demo") as report:
    ...     report(4); report(10)
    >>> seen
    [(4, 10), (10, 10)]
    """
    if callable(progress):
        yield lambda done: progress(int(done), int(total))
        return
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress={progress!r}: pass True (a progress bar), False, or a "
                        "callable progress(done, total)")
    if not progress:
        yield lambda done: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=int(total), desc=desc, unit="image", leave=False)
    try:
        yield lambda done: bar.update(int(done) - bar.n)
    finally:
        bar.close()


def channel_maps(model: nn.Module, images: torch.Tensor, layer: str, by: str,
                 target: Any, preprocess: Callable | None, composite: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel of ``layer``: the value the references rank by (N, C) and
    the map their patch is read from (N, C, h, w).

    ``by="activation"``: the channel's maximum and its activation map; ``by="relevance"``:
    R_k for ``target`` (``None``: each image's predicted class) and the channel's
    relevance at the layer (CRP, LRP with ``composite``).
    """
    ex = Explainer(model, images, preprocess=preprocess, progress=False)
    resolve_layer(ex.model, layer)
    channel_count(ex.context, layer)  # a layer without channels: a clear error
    if by == "activation":
        maps = ex.activations([layer])[layer]
        return maps.flatten(2).amax(dim=2), maps
    lrp = get_method("lrp")
    params = lrp.resolve_params({"composite": composite})
    given = None if target is None else ex.context.parse_target(target)
    lrp.check(ex.context, layer, params)  # refused on attention, channels-last layers
    with model_guard(ex.model, exclusive=True):
        kept, chosen, rules = lrp.prepare(ex.context, given, **params)
        maps = kept.layer_relevance(chosen, composite, rules, layer)
    return maps.flatten(2).sum(dim=2), maps


def _chunk(model: Any, images: np.ndarray, indices: np.ndarray, layer: str, top: int,
           by: str, target: Any, preprocess: Callable | None,
           composite: str) -> dict[str, np.ndarray]:
    """One chunk's candidates (a dask task: ``model`` may come pickled)."""
    if isinstance(model, bytes):
        import cloudpickle

        model = cloudpickle.loads(model)
    x = torch.as_tensor(np.asarray(images)).to(model_device(model))
    values, maps = channel_maps(model, x, layer, by, target, preprocess, composite)
    return chunk_candidates(values.detach().cpu(), maps.detach().cpu(), indices, top,
                            tuple(x.shape[-2:]))


def _check(model: nn.Module, source: ImageSource, layer: str, target: Any,
           preprocess: Callable | None) -> None:
    """The layer has channels, the target is a class, the images suit the model: checked
    on the first image (the construction probe is remembered per model)."""
    ex = Explainer(model, source.images([0]).to(model_device(model)), preprocess=preprocess,
                   progress=False)
    resolve_layer(ex.model, layer)
    channel_count(ex.context, layer)
    if target is not None:
        ex.context.check_target(ex.context.parse_target(target), ex.num_classes)


def _as_dataset(candidates: dict[str, np.ndarray]) -> xr.Dataset:
    return xr.Dataset({name: (("channel", "rank"), array) for name, array in candidates.items()})


def _from_dataset(data: xr.Dataset) -> dict[str, np.ndarray]:
    return {name: data[name].values for name in ("value", *FIELDS)}


def _local(todo: list[int], parts: list[np.ndarray], source: ImageSource, model: nn.Module,
           args: tuple) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for i in todo:
        yield i, _chunk(model, source.images(parts[i]).numpy(), parts[i], *args)


def _distributed(todo: list[int], parts: list[np.ndarray], source: ImageSource,
                 model: nn.Module, args: tuple, client: Any
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Chunks on a dask.distributed client, a few in flight at a time (memory stays
    bounded: images are read only when their task is submitted); closing the generator
    early releases the chunks still in flight."""
    import cloudpickle
    from distributed import as_completed

    model_ref = client.scatter(cloudpickle.dumps(model), broadcast=True, hash=False)
    window = max(2, 2 * len(client.scheduler_info().get("workers", {})))
    queue = iter(todo)

    def submit(i: int) -> Any:
        future = client.submit(_chunk, model_ref, source.images(parts[i]).numpy(), parts[i],
                               *args, pure=False)
        owner[future.key] = i
        return future

    owner: dict[str, int] = {}
    running = as_completed([submit(i) for i in itertools.islice(queue, window)])
    try:
        for future in running:
            yield owner.pop(future.key), future.result()
            nxt = next(queue, None)
            if nxt is not None:
                running.add(submit(nxt))
    finally:  # a stopped pass (its progress callback raised): drop the chunks in flight
        running.clear()


def references(model: nn.Module, dataset: Any, layer: str, top: int = 8,
               by: str = "activation", target: int | None = None,
               preprocess: Callable | None = None, store: str | None = None,
               client: Any = None, batch_size: int = 64, progress: Progress = True, *,
               composite: str = "epsilon_plus_flat", overwrite: bool = False) -> xr.Dataset:
    """The ``top`` reference images of every channel of ``layer`` over ``dataset``.

    Parameters
    ----------
    model, preprocess
        The classifier and its preprocessing (as for ``Explainer``); never modified.
    dataset
        An ``xr.Dataset`` with ``image`` (``xw.datasets.shapes``, ``from_folder``), a
        torch ``Dataset`` of (image, label) or a ``DataLoader``; read in chunks of
        ``batch_size`` images, only the running top-k kept (memory does not grow with
        the dataset).
    by
        ``"activation"``: rank by the channel's maximum, patch from its activation map;
        ``"relevance"``: rank by R_k (CRP, LRP ``composite``) for ``target`` (a class;
        ``None``: each image's predicted class), patch from the channel's relevance map.
    store
        A folder (``"refs.zarr"``): each finished chunk is written there as it comes,
        the result once complete; a later call with the same model weights, layer,
        dataset and settings reads it back, an interrupted one resumes after the last
        finished chunk. Another architecture or layer there: an error (pass another
        path, or ``overwrite=True``); other weights, data or settings: recomputed.
    client
        A ``dask.distributed.Client``: chunks run on its workers (same numbers).
    progress
        ``True``: a progress bar; ``False``: none; a callable ``progress(done, total)``
        (images): called before the first new chunk and after each finished one; when
        it raises, the pass stops there (finished chunks stay in the store, so a later
        call resumes after them).

    Returns
    -------
    xr.Dataset
        Dims ("channel", "rank"): ``image`` (dataset index), ``value``, and the patch
        ``y0, x0, y1, x1`` in input pixels (end exclusive): the box of the channel's
        map at or above half its maximum, each cell covering one layer stride.
    """
    if by not in BY:
        raise ValueError(f"by={by!r}: choose 'activation' or 'relevance'")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top={top!r} must be a whole number >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a whole number >= 1")
    if target is not None and by == "activation":
        raise ValueError("target= only applies to by='relevance' (activations do not depend "
                         "on a class)")
    source = image_source(dataset)
    if len(source) == 0:
        raise ValueError("the dataset has no images")
    parts = chunks(source, int(batch_size))
    args = (layer, int(top), by, target, preprocess, composite)
    settings = {"top": int(top), "by": by, "target": target, "batch_size": int(batch_size),
                "preprocess": repr(preprocess), "composite": composite if by == "relevance"
                else None}
    with reporting(progress, len(source), f"references {layer}") as report:
        saved, attrs = None, {"settings": json.dumps(settings)}
        if store is not None:  # hashing weights and images costs time: only for a store
            fingerprint = {"kind": "concept-references", "model": architecture(model),
                           "layer": layer, "weights": weights_hash(model),
                           "dataset": dataset_fingerprint(source, int(batch_size)),
                           "settings": settings}
            saved = Store(store, fingerprint, overwrite=overwrite)
            found = saved.result()
            if found is not None:
                report(len(source))
                return found
            attrs = {"fingerprint": json.dumps(fingerprint)}
        _check(model, source, layer, target, preprocess)  # before anything is stored
        kept = None
        done = saved.done_chunks() if saved is not None else []
        for i in done:
            kept = merge(kept, _from_dataset(saved.chunk(i)), int(top))
        todo = sorted(set(range(len(parts))) - set(done))
        finished = sum(len(parts[i]) for i in done)
        report(finished)  # a cancellation point before any new chunk
        work = (_local(todo, parts, source, model, args) if client is None
                else _distributed(todo, parts, source, model, args, client))
        for i, candidates in work:
            if saved is not None:
                saved.put_chunk(i, _as_dataset(candidates))
            kept = merge(kept, candidates, int(top))
            finished += len(parts[i])
            report(finished)  # may stop the pass: the chunks written so far stay
    result = _as_dataset(kept)
    result = result.assign_coords(channel=np.arange(result.sizes["channel"]),
                                  rank=np.arange(result.sizes["rank"]))
    result.attrs = {"layer": layer, "by": by, "target": "none" if target is None else target,
                    "top": int(top), "n_images": len(source),
                    "model": type(model).__name__, **attrs}
    if source.classes:
        result.attrs["classes"] = json.dumps(source.classes)
    if saved is not None:
        saved.put_result(result)
    return result
