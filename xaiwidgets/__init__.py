"""xaiwidgets: look inside CNN image classifiers.

>>> import xaiwidgets as xw
>>> xw.methods()[:3]
['gradient', 'guided_backprop', 'deconvnet']
"""

from .explainer import Explainer, explain
from .fusion import fuse
from .registry import Method, Param, get_method, methods, register

__all__ = ["Explainer", "Method", "Param", "explain", "fuse", "get_method", "methods", "register"]
__version__ = "0.1.0"
