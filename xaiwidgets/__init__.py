"""xaiwidgets: look inside CNN image classifiers.

The package is layered; each layer imports only the ones before it::

    core/        tensor ops, inputs, registry, layers, scoped model changes, Context
    explainer    the Explainer (validation, cache, targets, DataArray packing)
    net          the NET runtime (MLFEM's trained fusion operator; imports core only)
    families/    one module per method family, each a registered Method (MLFEM too)
    fusion       xw.fuse: MLFEM fusion of a labelled FEM stack
    evaluation/  gfdm, metrics, perturbation metrics, sanity checks, evaluate on dask
    datasets/, models/   shipped data generators, models and training scripts
    concepts/    channels over a dataset: reference patches, class usage, NMF concepts
    widgets/     the only place that imports ipywidgets / plotly (loaded on first use)

>>> import xaiwidgets as xw
>>> xw.methods()[:3]
['gradient', 'guided_backprop', 'deconvnet']
"""

import sys

from . import (  # noqa: F401  (rendering: the ``da.xai`` accessor)
    concepts,
    datasets,
    families,  # noqa: F401  (importing the families registers every method)
    fusion,  # noqa: F401  (xw.fusion: fuse and the MLFEM operators)
    models,
    rendering,
)
from ._version import __version__
from .core.registry import Method, Param, get_method, methods, register
from .evaluation import metrics
from .evaluation.evaluate import evaluate
from .evaluation.gfdm import gfdm
from .explainer import Explainer, explain
from .fusion import fuse

# ``import xaiwidgets.metrics`` and ``from xaiwidgets.metrics import pcc`` keep working
sys.modules[f"{__name__}.metrics"] = metrics

__all__ = [
    "Explainer", "Method", "Param", "__version__", "concepts", "datasets", "evaluate",
    "explain", "fuse",
    "get_method", "gfdm", "methods", "metrics", "models", "register",
]

#: widgets are imported on first use: ``import xaiwidgets`` never loads ipywidgets or plotly
_WIDGETS = ("ExplainerWidget", "FEMStackWidget", "CompareWidget", "DatasetExplorer",
            "ConceptExplorer", "LookWidget", "SanityQuiz")


def __getattr__(name: str):
    if name in _WIDGETS:
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WIDGETS])
