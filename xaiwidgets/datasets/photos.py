"""Real photographs: a handful that ship with scikit-image, and the user's own files.

:func:`photos` gives an astronaut, a cat, a cup of coffee, a rocket and a motorcycle
(no download needed), good for trying ImageNet models. :func:`read_image` reads any
picture file as people have them (a phone photo, a PNG cut-out, a scan) into a
model-sized image, the way the widgets' upload buttons and
:func:`~xaiwidgets.datasets.from_folder` do.

>>> import xaiwidgets as xw
>>> images, names = xw.datasets.photos(size=64)
>>> tuple(images.shape), names[1]
((5, 3, 64, 64), 'cat')
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

#: how :func:`read_image` gives a picture the model's shape: ``"crop"`` (default)
#: centre-crops it to the model's aspect ratio (ImageNet evaluation does so), ``"pad"``
#: keeps all of it and fills the rest with white, ``"squash"`` stretches it
FITS = ("crop", "pad", "squash")
#: picture formats :func:`read_image` reads (what Pillow decodes), for messages
FORMATS = "PNG, JPEG, GIF, BMP, TIFF or WebP"
#: largest value of each integer mode that is not 8-bit (Pillow's names)
_INTEGER_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535,
                       "I": 65535}

#: photo name -> loader; all read files bundled in the scikit-image wheel (no pooch fetch)
PHOTOS = {
    "astronaut": skimage.data.astronaut,
    "cat": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}


class PictureError(ValueError):
    """A file that cannot be read as a picture; the message is meant for the person who
    chose the file ("x.png is not a picture we can read: ...").

    >>> try:
    ...     read_image(b"just some notes", size=(32, 32), name="notes.png")
    ... except PictureError as error:
    ...     print(str(error).split(":")[0])
    notes.png is not a picture we can read
    """


def fit_size(images: torch.Tensor, size: tuple[int, int], how: str = "crop") -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] to (N, 3, *size*) keeping their aspect ratio.

    ``how`` is one of :data:`FITS`: ``"crop"`` cuts the centre part of the target's
    aspect ratio, ``"pad"`` adds white borders to reach it, ``"squash"`` stretches.
    Then antialiased bilinear resampling.

    >>> wide = torch.zeros(1, 3, 10, 20)                     # black, twice as wide as high
    >>> column = fit_size(wide, (20, 20), "pad")[0, 0, :, 0]  # white above and below
    >>> column.tolist() == [1.0] * 5 + [0.0] * 10 + [1.0] * 5
    True
    """
    if how not in FITS:
        raise ValueError(f"fit {how!r}: choose one of {FITS}")
    target_h, target_w = (int(s) for s in size)
    height, width = images.shape[-2:]
    if how == "crop":  # the largest centred window of the target's aspect
        keep_h = min(height, round(width * target_h / target_w))
        keep_w = min(width, round(height * target_w / target_h))
        top, left = (height - keep_h) // 2, (width - keep_w) // 2
        images = images[..., top:top + keep_h, left:left + keep_w]
    elif how == "pad":  # the smallest enclosing canvas of the target's aspect, white
        canvas_h = max(height, round(width * target_h / target_w))
        canvas_w = max(width, round(height * target_w / target_h))
        top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
        images = F.pad(images, (left, canvas_w - width - left, top, canvas_h - height - top),
                       value=1.0)
    out = F.interpolate(images, size=(target_h, target_w), mode="bilinear", antialias=True)
    return out.clamp(0, 1)


def resize(images: Any, size: int = 224, crop: bool = True) -> torch.Tensor:
    """Images (H,W,3)/(3,H,W)/(N,3,H,W), uint8 or float, to float (N,3,size,size) in [0,1].

    ``crop=True`` centre-crops to a square first (keeps the aspect ratio, as ImageNet
    evaluation does); ``crop=False`` squashes. Antialiased bilinear resampling.

    >>> resize(np.zeros((30, 40, 3), np.uint8), size=8).shape
    torch.Size([1, 3, 8, 8])
    """
    array = torch.as_tensor(np.asarray(images))
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] not in (3, 4):
        array = array[..., :3].permute(2, 0, 1)
    if array.ndim == 3:
        array = array.unsqueeze(0)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected (H,W,3), (3,H,W) or (N,3,H,W) images; got {tuple(array.shape)}")
    if array.dtype == torch.uint8:
        array = array.float() / 255
    array = array.float()
    return fit_size(array, (size, size), "crop" if crop else "squash")


def picture_rgb(picture: Any) -> np.ndarray:
    """A Pillow picture, whatever its mode, as float32 RGB (H, W, 3) in [0, 1].

    16-bit grayscale (``I;16``, and ``I`` as Pillow reads 16-bit PNGs) is divided by
    65535 (its full scale, not its own maximum, so a dark scan stays dark); float
    pictures (``F``) are clipped to [0, 1]; CMYK, YCbCr, palette, 1-bit and gray
    become RGB; a transparent area (RGBA, LA, palette with transparency) is
    composited **on white**, as a page shows a cut-out.

    >>> from PIL import Image
    >>> picture_rgb(Image.new("LA", (1, 1), (0, 0)))[0, 0].tolist()   # transparent
    [1.0, 1.0, 1.0]
    """
    from PIL import Image

    mode = picture.mode
    if mode in _INTEGER_FULL_SCALE or mode == "F":
        values = np.asarray(picture, dtype=np.float32)
        if mode != "F":
            values = values / _INTEGER_FULL_SCALE[mode]
        gray = np.clip(values, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in picture.info:
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(white, rgba)
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)
    return rgb / 255.0


def _readable_name(data: Any, name: str | None) -> str:
    if name:
        return str(name)
    if isinstance(data, (str, Path)):
        return Path(data).name
    return "the file"


def read_image(data: bytes | str | Path, size: int | tuple[int, int] = 224,
               fit: str = "crop", name: str | None = None) -> np.ndarray:
    """Read a picture file into float32 (3, H, W) in [0, 1] of ``size`` (H, W).

    ``data`` is the file's bytes (an upload) or its path. The picture is turned
    upright by its EXIF orientation (phone photos), made RGB by
    :func:`picture_rgb` (16-bit, CMYK, palette; transparency on white), then given
    the model's shape by :func:`fit_size` (``fit``: ``"crop"`` centre-crops to the
    aspect ratio, the default; ``"pad"`` pads with white; ``"squash"`` stretches).
    A file that is no picture, or a damaged one, raises :class:`PictureError` with a
    message for the person who chose it (``name``: the file's name to show).

    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO(); Image.new("RGB", (40, 20), "red").save(buffer, "png")
    >>> read_image(buffer.getvalue(), (8, 8)).shape
    (3, 8, 8)
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    if fit not in FITS:  # before any decoding: a wrong option is the caller's error
        raise ValueError(f"fit={fit!r}: choose one of {FITS}")
    shown = _readable_name(data, name)
    if isinstance(data, (bytes, bytearray, memoryview)):
        if not len(data):
            raise PictureError(f"{shown} is not a picture we can read: the file is empty")
        source: Any = io.BytesIO(bytes(data))
    else:
        source = data
    try:
        with Image.open(source) as picture:
            # JPEG: decode at a reduced scale when the picture is much larger (fast)
            picture.draft(picture.mode, (2 * max(height, width),) * 2)
            picture.load()
            upright = ImageOps.exif_transpose(picture)
            rgb = picture_rgb(upright)
    except UnidentifiedImageError:
        raise PictureError(
            f"{shown} is not a picture we can read: it is not a {FORMATS} file (maybe "
            "another kind of file was renamed); save it as PNG or JPEG and try again"
        ) from None
    except Image.DecompressionBombError:
        raise PictureError(f"{shown} is too large a picture to read; make it smaller "
                           "(under 80 megapixels) and try again") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise PictureError(
            f"{shown} is not a picture we can read: the file is damaged or incomplete "
            "(cut off during a copy or a download?); open it in a photo viewer, save it "
            "again and try again") from err
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    return fit_size(tensor, (height, width), fit)[0].numpy()


def photos(size: int = 224, names: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Real photos as a float tensor (N, 3, size, size) in [0, 1] and their names.

    Parameters
    ----------
    size
        Side of the square output (224 suits ImageNet models).
    names
        A subset of ``PHOTOS`` (default: all, in its order).

    >>> images, names = photos(size=64)
    >>> tuple(images.shape[1:]), images.dtype
    ((3, 64, 64), torch.float32)
    """
    names = list(PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown photos {unknown}; choose from {list(PHOTOS)}")
    images = torch.cat([resize(PHOTOS[name](), size) for name in names])
    return images, names
