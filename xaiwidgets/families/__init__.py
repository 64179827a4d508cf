"""Explanation methods, one module per family (a package named `families` so that
`xw.methods()` stays a function); importing this package registers them all.

Every module in this folder is imported, so adding a method is adding a file with a
``@register``-ed :class:`~xaiwidgets.core.registry.Method` subclass.
"""

import importlib
import pkgutil

# families in teaching order; any other module follows alphabetically
_ORDER = ["gradient", "cam", "attention", "lrp", "deeplift", "occlusion", "lime",
          "meaningful_perturbation", "fem", "mlfem"]
_names = [i.name for i in pkgutil.iter_modules(__path__)]
for _name in sorted(_names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
    importlib.import_module(f"{__name__}.{_name}")
