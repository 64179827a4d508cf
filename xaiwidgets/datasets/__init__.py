"""Data shipped with the package: synthetic shapes with simulated gaze, and real photos.

>>> import xaiwidgets as xw
>>> ds = xw.datasets.shapes(n=8, size=64, clutter=2, seed=0)
>>> ds.image.dims, ds.gfdm.dims
(('image', 'channel', 'y', 'x'), ('image', 'y', 'x'))
"""

from .adapters import as_dataset, from_folder, image_source
from .moving_shapes import MOTIONS, moving_shapes
from .photos import FITS, PHOTOS, PictureError, fit_size, photos, read_image, resize
from .shapes import CLASSES, shapes

__all__ = ["CLASSES", "FITS", "MOTIONS", "PHOTOS", "PictureError", "as_dataset", "fit_size",
           "from_folder", "image_source", "moving_shapes", "photos", "read_image", "resize",
           "shapes"]
