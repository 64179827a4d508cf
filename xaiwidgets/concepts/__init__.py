"""Concepts: what a layer's channels see, over a whole dataset.

* :func:`references` – each channel's top images and patches (by activation or by
  relevance for a class), streamed in chunks, on dask, kept in a store;
* :func:`class_usage` – each channel's mean relevance per class;
* :func:`factorize` – NMF concepts of a layer's activations (maps and channel basis);
* :func:`box_contributions` – every channel's contribution inside a box of one image.

Per image, ``Explainer.channels`` ranks a layer's channels and
``Explainer.explain(..., channels=[...])`` draws their conditional maps.
"""

from .factorize import factorize
from .references import references
from .regions import box_contributions
from .usage import class_usage

__all__ = ["box_contributions", "class_usage", "factorize", "references"]
