"""A directory store that a long dataset pass writes as it goes and reads back later,
and the fingerprint conventions of every dataset pass (``xw.concepts.references``,
``xw.DatasetExplorer``): :func:`weights_hash`, :func:`architecture`,
:func:`dataset_fingerprint`, :func:`describe`, and :func:`chunks` of a dataset
(read with :func:`chunk_images`).

Layout of ``refs.zarr/``: ``fingerprint.json`` (what the numbers depend on),
``chunks/c000012/`` (one zarr store per finished chunk) and, once every chunk is in,
``result/`` (the merged result, ``xr.open_zarr("refs.zarr/result")``). Every store is
written under a temporary name and renamed into place (an atomic rename on a local
disk), so a reader never sees half-written state; an interrupted run leaves only
finished chunks, and the next run with the same fingerprint resumes after them.
Results computed on demand (a widget's scores, page by page) go to named logs:
``logs/<name>/r<time>/`` (:meth:`Store.append`, :meth:`Store.records`).

>>> import tempfile, xarray as xr
>>> root = Store(tempfile.mkdtemp() + "/refs.zarr", {"model": "m", "layer": "l"}, strict=())
>>> root.put_chunk(0, xr.Dataset({"value": ("x", [1.0])}))
>>> root.done_chunks()
[0]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..datasets.adapters import ImageSource

#: marks a directory as a store of this module (never delete a folder without it)
MARK = "xaiwidgets-store"


def _need_zarr() -> None:
    try:
        import zarr  # noqa: F401
    except ImportError:  # pragma: no cover - zarr is in the io extra
        raise ImportError("store= needs zarr: pip install 'xaiwidgets[io]' (or zarr)") from None


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes and bytes).

    >>> len(weights_hash(nn.Linear(2, 2)))
    64
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def architecture(model: nn.Module) -> str:
    """The model's class and its state's names and shapes (what another model changes)."""
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    return f"{type(model).__module__}.{type(model).__qualname__}:{digest}"


def chunks(source: ImageSource, batch_size: int) -> list[np.ndarray]:
    """The dataset indices of each chunk, in order.

    >>> [c.tolist() for c in chunks(range(5), 2)]
    [[0, 1], [2, 3], [4]]
    """
    return [np.arange(start, min(start + batch_size, len(source)))
            for start in range(0, len(source), batch_size)]


def _view(source: ImageSource, indices: np.ndarray) -> np.ndarray | None:
    """The images at ``indices`` (consecutive, ascending) as a view of an in-memory
    float32 array, or ``None`` when the dataset has no such array (then read a copy)."""
    array = source.data["image"].data if source.data is not None else None
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or not len(indices):
        return None
    part = array[int(indices[0]):int(indices[-1]) + 1]
    ok = len(part) == len(indices) and part.flags.c_contiguous and part.flags.writeable
    return part if ok else None


def chunk_images(source: ImageSource, indices: np.ndarray) -> torch.Tensor:
    """The images of a chunk (consecutive indices, as :func:`chunks` gives them) as a
    float tensor (k, C, H, W): a view of an in-memory float32 dataset (no copy), else
    ``source.images(indices)``. Treat it as read-only.

    >>> import xaiwidgets as xw
    >>> from xaiwidgets.datasets.adapters import image_source
    >>> src = image_source(xw.datasets.shapes(n=4, size=16, seed=0))
    >>> bool((chunk_images(src, np.arange(1, 3)) == src.images([1, 2])).all())
    True
    """
    view = _view(source, indices)
    return torch.from_numpy(view) if view is not None else source.images(indices)


def _image_bytes(source: ImageSource, indices: np.ndarray) -> Any:
    """The images at ``indices`` (consecutive) as float32 bytes (a view when it can)."""
    view = _view(source, indices)
    return memoryview(view).cast("B") if view is not None else \
        source.images(indices).numpy().tobytes()


def dataset_fingerprint(source: ImageSource, batch_size: int) -> str:
    """Size, labels, class names and image bytes of a dataset: every image of an
    in-memory ``xr.Dataset``; the first and last chunk of a torch dataset (read lazily,
    a full read would cost a pass)."""
    digest = hashlib.sha256(f"{len(source)}|{source.classes}".encode())
    if source.labels is not None:
        digest.update(source.labels.tobytes())
    if source.data is not None:  # chunk by chunk: a lazy (dask, zarr) dataset stays lazy
        for indices in chunks(source, batch_size):
            digest.update(_image_bytes(source, indices))
    else:
        last = max(0, len(source) - batch_size)
        for start in sorted({0, last}):
            indices = np.arange(start, min(start + batch_size, len(source)))
            digest.update(source.images(indices).numpy().tobytes())
    return digest.hexdigest()


def variables_hash(data: xr.Dataset | None, names: Sequence[str]) -> str:
    """SHA-256 of the variables ``names`` of ``data`` (those it has; gaze data, masks).

    >>> a = xr.Dataset({"gfdm": ("image", np.zeros(2, np.float32))})
    >>> variables_hash(a, ["gfdm"]) == variables_hash(a.copy(deep=True), ["gfdm"])
    True
    """
    digest = hashlib.sha256()
    for name in names:
        if data is not None and name in data.variables:
            values = np.ascontiguousarray(data[name].values)
            digest.update(f"{name}|{values.dtype}|{values.shape}".encode())
            digest.update(memoryview(values).cast("B") if values.size else b"")
    return digest.hexdigest()


def describe(function: Any) -> str | None:
    """A description of ``function`` (a ``preprocess``) that is the same in every session:
    its ``repr`` (a module, ``Normalize(...)``), or for a plain function or lambda its
    module, name and code (their ``repr`` holds a memory address).

    >>> describe(None), describe(abs)
    (None, '<built-in function abs>')
    >>> describe(lambda x: x) == describe(lambda x: x)
    True
    """
    if function is None:
        return None
    code = getattr(function, "__code__", None)
    if code is None:
        return repr(function)
    digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
    return f"{function.__module__}.{function.__qualname__}:{digest}"


class Store:
    """The store at ``path`` for results with ``fingerprint`` (a JSON-able dict).

    A store written for another fingerprint is replaced (with a warning) when only
    keys outside ``strict`` differ (weights, dataset, settings); a difference in a
    ``strict`` key (the model's architecture, the layer) raises a ``ValueError``
    naming the fix, and so does a folder that is not such a store.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any],
                 strict: tuple[str, ...] = ("model", "layer"),
                 overwrite: bool = False) -> None:
        _need_zarr()
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        #: whether the folder holds this fingerprint's store (else it is (re)made on the
        #: first write: a call that fails before then leaves the folder as it was)
        self.ready = False
        if self.path.exists():
            found = self._read_fingerprint()
            if found != self.fingerprint:
                differ = sorted(k for k in set(found) | set(self.fingerprint)
                                if found.get(k) != self.fingerprint.get(k))
                hard = [k for k in strict if k in differ]
                if hard and not overwrite:
                    raise ValueError(
                        f"the store {str(self.path)!r} holds results for another "
                        f"{' and '.join(hard)} ({', '.join(f'{k}={found.get(k)!r}' for k in hard)}"
                        f"); pass store= another path, or overwrite=True to replace it")
                if not overwrite:
                    warnings.warn(f"the store {str(self.path)!r} was written with other "
                                  f"{', '.join(differ)}: recomputing into it", stacklevel=3)
            else:
                self.ready = True
                for stale in self.path.glob("**/.tmp-*"):  # left by an interrupted write
                    shutil.rmtree(stale, ignore_errors=True)

    def _prepare(self) -> None:
        """Make the folder this fingerprint's store (emptied if it held another)."""
        if self.ready:
            return
        if self.path.exists():
            self._clear()
        else:
            self.path.mkdir(parents=True)
            self._write_fingerprint()
        self.ready = True

    def _read_fingerprint(self) -> dict[str, Any]:
        file = self.path / "fingerprint.json"
        try:
            stored = json.loads(file.read_text())
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict) or stored.get("mark") != MARK:
            raise ValueError(
                f"{str(self.path)!r} exists and is not an xaiwidgets results store; pass "
                "store= a new path (nothing was written there)")
        return stored["fingerprint"]

    def _write_fingerprint(self) -> None:
        temporary = self.path / f".tmp-{uuid.uuid4().hex}.json"
        temporary.write_text(json.dumps({"mark": MARK, "fingerprint": self.fingerprint}))
        os.replace(temporary, self.path / "fingerprint.json")

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
        self._write_fingerprint()

    def _put(self, relative: str, data: xr.Dataset) -> None:
        self._prepare()
        final = self.path / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.parent / f".tmp-{uuid.uuid4().hex}"
        data.to_zarr(temporary, mode="w", consolidated=False)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)

    def put_chunk(self, index: int, data: xr.Dataset) -> None:
        """Write chunk ``index``'s result (visible only once complete)."""
        self._put(f"chunks/c{index:06d}", data)

    def done_chunks(self) -> list[int]:
        """The indices of the chunks written completely, ascending."""
        folder = self.path / "chunks"
        if not self.ready or not folder.exists():
            return []
        return sorted(int(p.name[1:]) for p in folder.iterdir() if p.name.startswith("c"))

    def chunk(self, index: int) -> xr.Dataset:
        return xr.open_zarr(self.path / f"chunks/c{index:06d}", consolidated=False).load()

    def put_result(self, data: xr.Dataset) -> None:
        """Write the final result, then drop the chunks it was merged from."""
        self._put("result", data)
        shutil.rmtree(self.path / "chunks", ignore_errors=True)

    def append(self, log: str, data: xr.Dataset) -> None:
        """Add ``data`` to the log ``log`` (results computed on demand, e.g. a widget's
        scores page by page), visible only once complete."""
        self._put(f"logs/{log}/r{time.time_ns():020d}-{uuid.uuid4().hex[:8]}", data)

    def records(self, log: str, dim: str | None = None) -> list[xr.Dataset]:
        """The records of ``log``, oldest first. With ``dim``, several records are merged
        into one along ``dim``, in order (written first, then the old ones removed, so
        an interruption leaves duplicates, never a loss), and the next read opens one.

        >>> import tempfile
        >>> root = Store(tempfile.mkdtemp() + "/s.zarr", {"model": "m"}, strict=())
        >>> for k in (1, 2):
        ...     root.append("scores", xr.Dataset({"v": ("image", [k])}, {"image": [k]}))
        >>> [r.v.values.tolist() for r in root.records("scores", dim="image")]
        [[1, 2]]
        """
        folder = self.path / "logs" / log
        if not self.ready or not folder.exists():
            return []
        names = sorted(p.name for p in folder.iterdir() if p.name.startswith("r"))
        found = [xr.open_zarr(folder / name, consolidated=False).load() for name in names]
        if dim is None or len(found) < 2:
            return found
        merged = xr.concat(found, dim=dim)
        self.append(log, merged)
        for name in names:
            shutil.rmtree(folder / name, ignore_errors=True)
        return [merged]

    def result(self) -> xr.Dataset | None:
        """The final result, or ``None`` while the run is not complete."""
        if not self.ready or not (self.path / "result").exists():
            return None
        return xr.open_zarr(self.path / "result", consolidated=False).load()
