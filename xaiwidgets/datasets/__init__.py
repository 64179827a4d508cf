"""Data shipped with the package: synthetic shapes with simulated gaze, and real photos.

>>> import xaiwidgets as xw
>>> ds = xw.datasets.shapes(n=8, size=64, clutter=2, seed=0)
>>> sorted(ds.data_vars)
['distractors', 'fixations', 'gfdm', 'image', 'label', 'mask']
"""

from .photos import PHOTOS, photos, resize
from .shapes import CLASSES, shapes

__all__ = ["CLASSES", "PHOTOS", "photos", "resize", "shapes"]
