"""Any image collection as the layout of :func:`~xaiwidgets.datasets.shapes`.

The dataset-scale tools (``xw.evaluate``, ``xw.DatasetExplorer``) read images in
pieces through an :class:`ImageSource`, which wraps

* an ``xr.Dataset`` with ``image`` (image, channel, y, x) and optionally ``label``,
  ``gfdm``, ``fixations`` (``xw.datasets.shapes(...)``, :func:`from_folder`);
* a torch ``Dataset`` of ``(image, label)`` pairs (or of images alone), read item by
  item, so a large dataset is never held in memory;
* a torch ``DataLoader`` (its map-style ``dataset`` is read in index order; an
  iterable-style one is read once into memory).

:func:`from_folder` reads an ImageFolder-style tree of the user's own pictures
(``root/<class name>/<picture>``) into the same ``xr.Dataset`` layout::

    >>> import xaiwidgets as xw
    >>> ds = xw.datasets.from_folder("my_pictures", size=224)       # doctest: +SKIP
    >>> ds.image.dims, ds.attrs["classes"]                          # doctest: +SKIP
    (('image', 'channel', 'y', 'x'), ['cat', 'dog'])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from .photos import PictureError, read_image

#: picture files :func:`from_folder` reads (lower-case suffixes)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: per-image gaze variables an ``xr.Dataset`` may carry (metrics against people's gaze)
GAZE = ("gfdm", "fixations")


def _as_image(item: Any, index: int) -> torch.Tensor:
    """One dataset item's image as a float tensor (C, H, W).

    Tensors and arrays (C, H, W) pass through as floats; uint8 (or PIL pictures, and
    (H, W, 3) arrays) become [0, 1] floats.
    """
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL picture
        item = np.array(item.convert("RGB"))
    tensor = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
    if tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)  # (H, W, C) pictures
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise ValueError(f"item {index}: expected an image (C, H, W); got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255
    return tensor.float()


def _split_item(item: Any, index: int) -> tuple[Any, int | None]:
    """``(image, label)`` from one torch dataset item (a bare image has no label)."""
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            return item[0], None
        label = item[1]
        try:
            return item[0], int(label)
        except (TypeError, ValueError):
            raise ValueError(f"item {index}: the label {label!r} is not a class index (int); "
                             "a torch dataset must give (image, label) pairs") from None
    return item, None


class ImageSource:
    """A dataset of images read in pieces: its size, labels, class names and gaze data.

    Build one with :func:`image_source`; ``images(indices)`` returns a float tensor
    (k, C, H, W); ``labels`` is an int array (or ``None``); ``gaze`` the names of
    the gaze variables present (``gfdm``, ``fixations``); ``subset(indices)`` the
    ``xr.Dataset`` layout of ``xw.datasets.shapes`` for those images.

    >>> import xaiwidgets as xw
    >>> src = image_source(xw.datasets.shapes(n=4, size=32, seed=0))
    >>> len(src), src.images([2, 0]).shape, src.gaze
    (4, torch.Size([2, 3, 32, 32]), ('gfdm', 'fixations'))
    """

    def __init__(self, n: int, read: Any, labels: np.ndarray | None,
                 classes: Sequence[str] | None, data: xr.Dataset | None = None) -> None:
        self.n = int(n)
        self._read = read
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = None if classes is None else [str(c) for c in classes]
        #: the wrapped ``xr.Dataset`` (``None`` for torch datasets)
        self.data = data

    def __len__(self) -> int:
        return self.n

    @property
    def gaze(self) -> tuple[str, ...]:
        """The gaze variables present (gaze metrics need them)."""
        if self.data is None:
            return ()
        return tuple(name for name in GAZE if name in self.data.variables)

    def images(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The images at ``indices`` as one float tensor (k, C, H, W)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"image indices {indices.tolist()} out of range 0..{self.n - 1}")
        return self._read(indices)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(indices, images)`` over the whole dataset in order, ``batch_size`` at a time."""
        for start in range(0, self.n, batch_size):
            indices = np.arange(start, min(start + batch_size, self.n))
            yield indices, self.images(indices)

    def subset(self, indices: Sequence[int] | np.ndarray) -> xr.Dataset:
        """The images at ``indices`` (and their label, gaze, ...) as an ``xr.Dataset``.

        The ``index`` coordinate (over ``image``) holds the dataset indices.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.data is not None:
            ds = self.data.isel(image=indices)
        else:
            images = self.images(indices).numpy()
            ds = xr.Dataset({"image": (("image", "channel", "y", "x"), images)})
            if self.labels is not None:
                ds["label"] = ("image", self.labels[indices])
        ds = ds.assign_coords(index=("image", indices))
        ds.attrs = {**ds.attrs, "classes": list(self.classes or [])}
        return ds

    def check_labels(self, num_classes: int) -> None:
        """Raise a clear error when a label is not a class index below ``num_classes``."""
        if self.labels is None or not len(self.labels):
            return
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if len(bad):
            raise ValueError(
                f"labels out of range: image {int(bad[0])} has label {int(self.labels[bad[0]])} "
                f"({len(bad)} bad in all) but the model has {num_classes} classes (0.."
                f"{num_classes - 1}); give labels as class indices in the model's order")


def _from_xarray(ds: xr.Dataset, classes: Sequence[str] | None) -> ImageSource:
    if "image" not in ds.variables or ds["image"].ndim != 4 or "image" not in ds["image"].dims:
        found = (f"`image` has dims {ds['image'].dims}" if "image" in ds.variables
                 else f"it has {sorted(map(str, ds.variables))}")
        raise ValueError(
            "the dataset needs an `image` variable with dims (image, channel, y, x); "
            f"{found}. xw.datasets.shapes() and xw.datasets.from_folder() make one; "
            "xr.Dataset({'image': (('image', 'channel', 'y', 'x'), array)}) wraps your own")
    ds = ds.transpose("image", *[d for d in ds["image"].dims if d != "image"], ...)
    labels = None
    if "label" in ds.variables:
        raw = np.asarray(ds["label"].values)
        if raw.shape != (ds.sizes["image"],) or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"`label` must be one integer class index per image; got dtype "
                             f"{raw.dtype} and shape {raw.shape}")
        labels = raw
    if classes is None and ds.attrs.get("classes") is not None:
        classes = list(np.atleast_1d(ds.attrs["classes"]))
    image = ds["image"]

    def read(indices: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(image.data[indices], dtype=np.float32))

    return ImageSource(ds.sizes["image"], read, labels, classes, data=ds)


def _from_torch(dataset: Any, classes: Sequence[str] | None) -> ImageSource:
    """A map-style torch dataset: labels are read once (images again when needed)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the torch dataset is empty")
    labels = np.full(n, -1, dtype=np.int64)
    first_image, first_label = _split_item(dataset[0], 0)
    shape = tuple(_as_image(first_image, 0).shape)
    has_labels = first_label is not None
    # ImageFolder & co keep their targets: no need to decode every picture for them
    targets = getattr(dataset, "targets", None)
    if has_labels and targets is not None and len(targets) == n:
        labels[:] = np.asarray(targets, dtype=np.int64)
    elif has_labels:
        for i in range(n):
            labels[i] = _split_item(dataset[i], i)[1]

    def read(indices: np.ndarray) -> torch.Tensor:
        out = []
        for i in indices:
            image = _as_image(_split_item(dataset[int(i)], int(i))[0], int(i))
            if tuple(image.shape) != shape:
                raise ValueError(
                    f"item {int(i)} is {tuple(image.shape)}, item 0 {shape}: images must "
                    "share one size (add a Resize transform to the dataset)")
            out.append(image)
        return torch.stack(out) if out else torch.empty((0, *shape))

    if classes is None and getattr(dataset, "classes", None) is not None:
        classes = list(dataset.classes)
    return ImageSource(n, read, labels if has_labels else None, classes)


def _from_iterable(loader: Any, classes: Sequence[str] | None) -> ImageSource:
    """An iterable-style loader cannot be indexed: it is read once into memory."""
    images, labels = [], []
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        images.append(torch.as_tensor(x).float())
        labels.append(None if y is None else np.asarray(y, dtype=np.int64).reshape(-1))
    if not images:
        raise ValueError("the data loader gave no batches")
    stacked = torch.cat(images)
    ds = xr.Dataset({"image": (("image", "channel", "y", "x"), stacked.numpy())})
    if all(y is not None for y in labels):
        ds["label"] = ("image", np.concatenate(labels))
    return _from_xarray(ds, classes)


def image_source(data: Any, classes: Sequence[str] | None = None) -> ImageSource:
    """Wrap an ``xr.Dataset``, a torch ``Dataset`` or a ``DataLoader`` as an :class:`ImageSource`.

    ``classes`` (names in the model's output order) overrides the dataset's own
    (``attrs["classes"]`` or a torchvision dataset's ``classes``).

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> pairs = TensorDataset(torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 1, 0, 1]))
    >>> image_source(pairs, classes=["a", "b"]).labels.tolist()
    [0, 1, 1, 0, 1]
    """
    if isinstance(data, ImageSource):
        return data
    if isinstance(data, xr.Dataset):
        return _from_xarray(data, classes)
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return _from_iterable(data, classes)
        return _from_torch(data.dataset, classes)
    if isinstance(data, IterableDataset):
        return _from_iterable(data, classes)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(
            data, (np.ndarray, torch.Tensor, xr.DataArray, str, bytes)):
        return _from_torch(data, classes)
    raise TypeError(
        f"cannot read images from a {type(data).__name__}: pass an xr.Dataset with `image` "
        "(xw.datasets.shapes(), xw.datasets.from_folder()), a torch Dataset of (image, label) "
        "or a DataLoader")


def as_dataset(data: Any, classes: Sequence[str] | None = None) -> xr.Dataset:
    """Any supported collection (see :func:`image_source`) as one in-memory ``xr.Dataset``.

    The layout of ``xw.datasets.shapes``: ``image`` (image, channel, y, x), ``label``
    when known, ``attrs["classes"]``; ready for ``xw.evaluate``.

    >>> from torch.utils.data import TensorDataset
    >>> as_dataset(TensorDataset(torch.rand(2, 3, 8, 8), torch.tensor([1, 0]))).label.values
    array([1, 0])
    """
    source = image_source(data, classes)
    return source.subset(np.arange(len(source)))


def _pictures(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)


def from_folder(path: str | Path, size: int = 224, crop: bool = True,
                classes: Sequence[str] | None = None, on_error: str = "skip") -> xr.Dataset:
    """Read an ImageFolder-style tree (``path/<class>/<picture>``) into an ``xr.Dataset``.

    Every picture (PNG, JPEG, BMP, GIF, TIFF, WebP; searched in sub-folders too)
    becomes an RGB image (channel, size, size) in [0, 1] through
    :func:`~xaiwidgets.datasets.read_image`: turned upright by its EXIF orientation,
    16-bit and CMYK pictures converted, transparency on white, centre-cropped to a
    square when ``crop`` (else squashed), then resized with antialiasing. Labels are
    the class folders' positions in ``classes`` (default: the folder names, sorted, as
    torchvision's ``ImageFolder``). Pass the model's class names as ``classes`` so
    labels follow the model's output order; folders not in ``classes`` are an error.

    A file that cannot be read (damaged, or not a picture) is skipped with one
    warning naming every skipped file (``on_error="skip"``, the default), or raises
    :class:`~xaiwidgets.datasets.PictureError` (``on_error="raise"``).

    Returns the layout of :func:`~xaiwidgets.datasets.shapes`: ``image``, ``label``,
    ``file`` (the picture's path relative to ``path``) and ``attrs["classes"]``.

    >>> ds = from_folder("pictures", size=64)            # pictures/cat/1.jpg ...  # doctest: +SKIP
    >>> ds.attrs["classes"], ds.label.values              # doctest: +SKIP
    (['cat', 'dog'], array([0, 0, 1]))
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}: use 'skip' (warn and go on) or 'raise'")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder; from_folder wants "
                                "path/<class name>/<pictures>")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {p.name: _pictures(p) for p in folders}
    found = {name: files for name, files in found.items() if files}
    if not found:
        loose = _pictures(root)
        hint = (f" ({len(loose)} pictures lie directly in it: put them in one sub-folder per "
                "class)" if loose else "")
        raise ValueError(f"no pictures in class sub-folders of {str(root)!r}{hint}; expected "
                         f"path/<class name>/<picture> with suffixes {PICTURE_SUFFIXES}")
    names = sorted(found) if classes is None else [str(c) for c in classes]
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"folders {unknown} are not among classes={names}")
    images, labels, files, skipped = [], [], [], []
    for label, name in enumerate(names):
        for file in found.get(name, []):
            relative = str(file.relative_to(root))
            try:
                images.append(read_image(file, size, fit="crop" if crop else "squash",
                                         name=relative))
            except PictureError as err:
                if on_error == "raise":
                    raise
                skipped.append(f"{relative} ({str(err).split(': ', 1)[-1]})")
                continue
            labels.append(label)
            files.append(relative)
    if skipped:
        warnings.warn(f"from_folder skipped {len(skipped)} of {len(skipped) + len(files)} "
                      f"files it could not read: {'; '.join(skipped)}", stacklevel=2)
    if not images:
        raise ValueError(f"none of the pictures in {str(root)!r} could be read (see the "
                         "warning for why)")
    return xr.Dataset(
        {"image": (("image", "channel", "y", "x"), np.stack(images)),
         "label": ("image", np.asarray(labels, dtype=np.int64)),
         "file": ("image", np.asarray(files))},
        attrs={"classes": names, "source": str(root), "size": size, "crop": int(crop)},
    )
