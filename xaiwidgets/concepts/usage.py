"""Which channels of a layer each class uses: mean relevance per (channel, class).

>>> import xaiwidgets as xw
>>> model, preprocess, classes = xw.models.load("shapes-vgg")
>>> ds = xw.datasets.shapes(n=8, seed=0)
>>> xw.concepts.class_usage(model, ds, "features.27", preprocess=preprocess,
...                         progress=False).dims
('channel', 'class')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from torch import nn

from ..core.ops import model_device
from ..datasets.adapters import image_source
from ..explainer import Explainer
from .references import Progress, reporting
from .store import chunks


def class_usage(model: nn.Module, dataset: Any, layer: str,
                preprocess: Callable | None = None, batch_size: int = 64,
                progress: Progress = True, *,
                composite: str = "epsilon_plus_flat") -> xr.DataArray:
    """Mean R_k (CRP relevance reaching channel k of ``layer``) over the images of each
    class, each image explained for its own label; dims ("channel", "class").

    The dataset needs labels (``label`` of an ``xr.Dataset``, or (image, label) pairs);
    a class without images gets NaN. Coordinates ``class_name`` (when the dataset
    names its classes) and ``n_per_class`` (images per class). ``progress``: ``True``
    (a progress bar), ``False``, or ``progress(done, total)`` (images), called before
    the first chunk and after each; when it raises, the pass stops there.
    """
    source = image_source(dataset)
    if source.labels is None:
        raise ValueError("class_usage needs labels: pass an xr.Dataset with a `label` "
                         "variable (xw.datasets.shapes(), from_folder()) or a torch dataset "
                         "of (image, label) pairs")
    device = model_device(model)
    sums: np.ndarray | None = None
    counts: np.ndarray | None = None
    parts = chunks(source, int(batch_size))
    with reporting(progress, len(source), f"class usage {layer}") as report:
        report(0)  # a cancellation point before the first chunk
        for indices in parts:
            ex = Explainer(model, source.images(indices).to(device), preprocess=preprocess,
                           progress=False)
            if sums is None:
                source.check_labels(ex.num_classes)
                sums = np.zeros((0, ex.num_classes))
                counts = np.zeros(ex.num_classes)
            labels = source.labels[indices]
            terms = ex.channels(layer, "lrp", target=labels.tolist(),
                                composite=composite).values.astype(np.float64)
            if not len(sums):
                sums = np.zeros((terms.shape[1], len(counts)))
            np.add.at(sums.T, labels, terms)
            np.add.at(counts, labels, 1)
            report(indices[-1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    coords: dict[str, Any] = {"channel": np.arange(mean.shape[0]),
                              "class": np.arange(mean.shape[1]),
                              "n_per_class": ("class", counts.astype(np.int64))}
    if source.classes and len(source.classes) == mean.shape[1]:
        coords["class_name"] = ("class", source.classes)
    return xr.DataArray(mean, dims=("channel", "class"), coords=coords, name="class_usage",
                        attrs={"layer": layer, "composite": composite, "n_images": len(source)})
