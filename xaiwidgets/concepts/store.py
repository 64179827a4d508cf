"""A directory store that a long dataset pass writes as it goes and reads back later.

Layout of ``refs.zarr/``: ``fingerprint.json`` (what the numbers depend on),
``chunks/c000012/`` (one zarr store per finished chunk) and, once every chunk is in,
``result/`` (the merged result, ``xr.open_zarr("refs.zarr/result")``). Every store is
written under a temporary name and renamed into place (an atomic rename on a local
disk), so a reader never sees half-written state; an interrupted run leaves only
finished chunks, and the next run with the same fingerprint resumes after them.

>>> import tempfile, xarray as xr
>>> root = Store(tempfile.mkdtemp() + "/refs.zarr", {"model": "m", "layer": "l"}, strict=())
>>> root.put_chunk(0, xr.Dataset({"value": ("x", [1.0])}))
>>> root.done_chunks()
[0]
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import xarray as xr

#: marks a directory as a store of this module (never delete a folder without it)
MARK = "xaiwidgets-store"


def _need_zarr() -> None:
    try:
        import zarr  # noqa: F401
    except ImportError:  # pragma: no cover - zarr is in the io extra
        raise ImportError("store= needs zarr: pip install 'xaiwidgets[io]' (or zarr)") from None


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

    def result(self) -> xr.Dataset | None:
        """The final result, or ``None`` while the run is not complete."""
        if not self.ready or not (self.path / "result").exists():
            return None
        return xr.open_zarr(self.path / "result", consolidated=False).load()
