"""xaiwidgets: look inside CNN image classifiers.

>>> import xaiwidgets as xw
>>> xw.methods()[:3]
['gradient', 'guided_backprop', 'deconvnet']
"""

from . import datasets, metrics, models
from .evaluate import evaluate
from .explainer import Explainer, explain
from .fusion import fuse
from .gfdm import gfdm
from .registry import Method, Param, get_method, methods, register

__all__ = [
    "Explainer", "Method", "Param", "datasets", "evaluate", "explain", "fuse", "get_method",
    "gfdm", "methods", "metrics", "models", "register",
]
__version__ = "0.1.0"

from . import rendering  # noqa: E402,F401  (registers the ``da.xai`` accessor)

#: widgets are imported on first use: ``import xaiwidgets`` never loads ipywidgets or plotly
_WIDGETS = ("ExplainerWidget", "FEMStackWidget", "CompareWidget")


def __getattr__(name: str):
    if name in _WIDGETS:
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WIDGETS])
