"""Pictures as students upload them: real files made here with Pillow, read by read_image.

Each file is one that went wrong in the class app: a portrait phone JPEG with EXIF
orientation 6, a 16-bit grayscale PNG, an RGBA cut-out, CMYK and palette pictures,
a 12 MB phone photo, a truncated JPEG and a text file named ``.png``.
"""

from __future__ import annotations

import datetime
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

import xaiwidgets as xw
from tests.helpers import encode, halves, phone_photo
from xaiwidgets.datasets.photos import FITS, PictureError, fit_size, read_image

ORIENTATION = 0x0112  # the EXIF tag


def test_exif_orientation_6_is_shown_upright():
    stored = halves(40, 60)                     # as the sensor wrote it: landscape
    exif = Image.Exif()
    exif[ORIENTATION] = 6                        # "rotate 90° clockwise to view"
    data = encode(Image.fromarray(stored), "jpeg", quality=95, exif=exif)
    out = read_image(data, (60, 40), fit="squash")  # the upright shape: portrait
    expected = np.rot90(stored, k=-1).astype(np.float32) / 255  # clockwise, by numpy
    assert expected.shape == (60, 40, 3)
    diff = np.abs(out.transpose(1, 2, 0) - expected)
    assert np.median(diff) < 0.02 and diff.mean() < 0.05  # JPEG error only
    assert out[0, :20].mean() > 0.9 and out[2, -20:].mean() > 0.9  # red on top, blue below


def test_16_bit_png_keeps_its_gradient():
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))
    data = encode(Image.fromarray(gradient))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    out = read_image(data, (32, 64), fit="squash")  # same size: no resampling
    for channel in out:
        np.testing.assert_allclose(channel, gradient / 65535, atol=1e-6)
    dark = encode(Image.fromarray((gradient // 4).astype(np.uint16)))  # a dark scan stays dark
    assert read_image(dark, (32, 64), fit="squash").max() == pytest.approx(0.25, abs=1e-4)


def test_transparent_area_is_white_and_half_alpha_blends():
    rgba = np.zeros((8, 8, 4), np.uint8)        # transparent black everywhere ...
    rgba[2:6, 2:6] = (255, 0, 0, 255)            # ... an opaque red square ...
    rgba[0, 0] = (0, 0, 255, 128)                # ... and one half-transparent blue pixel
    out = read_image(encode(Image.fromarray(rgba, "RGBA")), (8, 8), fit="squash")
    np.testing.assert_allclose(out[:, 7, 7], 1.0, atol=1e-6)       # white, not black
    np.testing.assert_allclose(out[:, 3, 3], [1.0, 0.0, 0.0], atol=1e-6)
    alpha = 128 / 255                                              # over white
    np.testing.assert_allclose(out[:, 0, 0], [1 - alpha, 1 - alpha, 1.0], atol=1 / 255)


def test_cmyk_palette_and_gray_pictures_become_rgb():
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 0, 0))  # full magenta ink: (255, 0, 255)
    for fmt in ("tiff", "jpeg"):
        out = read_image(encode(cmyk, fmt), (4, 6), fit="squash")
        np.testing.assert_allclose(out[:, 2, 3], [1.0, 0.0, 1.0], atol=0.03)
    palette = Image.fromarray(halves(4, 6)).convert("P", palette=Image.Palette.ADAPTIVE,
                                                    colors=2)
    out = read_image(encode(palette), (4, 6), fit="squash")
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[:, 0, 5], [0.0, 0.0, 1.0], atol=1e-6)
    palette.info["transparency"] = palette.getpixel((0, 0))  # red index is transparent
    out = read_image(encode(palette, transparency=palette.info["transparency"]), (4, 6),
                     fit="squash")
    np.testing.assert_allclose(out[:, 0, 0], 1.0, atol=1e-6)  # on white
    gray = read_image(encode(Image.new("L", (3, 3), 51)), (3, 3))
    np.testing.assert_allclose(gray, 0.2, atol=1e-6)


def test_aspect_is_kept_by_crop_and_pad():
    wide = torch.zeros(1, 3, 10, 30)
    wide[..., 10:20] = 1.0                        # the middle third is white
    cropped = fit_size(wide, (10, 10), "crop")    # the centre 10x10: all white
    np.testing.assert_allclose(cropped.numpy(), 1.0, atol=1e-6)
    padded = fit_size(torch.zeros(1, 3, 10, 30), (30, 30), "pad")
    column = padded[0, 0, :, 15].numpy()          # 10 black rows between white bands
    np.testing.assert_allclose(column, [1.0] * 10 + [0.0] * 10 + [1.0] * 10)
    squashed = fit_size(wide, (10, 10), "squash")
    assert squashed[0, 0, 0, 0] < 0.5            # stretched: the black sides stay
    data = encode(Image.fromarray(halves(20, 60)))  # red | blue, three times as wide
    centre = read_image(data, (8, 8))            # default: centre crop
    assert centre[0, :, :3].mean() > 0.95 and centre[2, :, -3:].mean() > 0.95
    tall = read_image(data, (16, 8), fit="pad")
    assert tall[:, 0].min() > 0.99 and tall[:, -1].min() > 0.99  # white bands
    with pytest.raises(ValueError, match="choose one of"):
        read_image(data, 8, fit="stretch")
    assert FITS == ("crop", "pad", "squash")


def test_twelve_megabyte_phone_photo():
    data = phone_photo()
    assert 10.5e6 < len(data) < 16e6, len(data)  # above tornado's 10 MiB message limit
    start = time.perf_counter()
    out = read_image(data, (224, 224))
    seconds = time.perf_counter() - start
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    # the centre crop of a left-to-right gradient: dark on the left, bright on the right
    assert out[:, :, :10].mean() < out[:, :, -10:].mean() - 0.2
    assert seconds < 10, f"{seconds:.1f} s to read a phone photo"


def test_files_that_are_no_pictures_get_a_message_for_students():
    with pytest.raises(PictureError) as text:
        read_image(b"these are my notes, not a photo\n", 32, name="x.png")
    message = str(text.value)
    assert message.startswith("x.png is not a picture we can read:")
    assert "PNG" in message and "JPEG" in message
    assert "BytesIO" not in message and "0x" not in message and "<" not in message
    whole = encode(Image.fromarray(halves(64, 64)), "jpeg", quality=90)
    with pytest.raises(PictureError, match="cut.jpg is not a picture we can read: the file is "
                                           "damaged or incomplete"):
        read_image(whole[: len(whole) // 2], 32, name="cut.jpg")
    with pytest.raises(PictureError, match="empty.png .*empty"):
        read_image(b"", 32, name="empty.png")
    assert isinstance(PictureError("x"), ValueError)  # callers catching ValueError still do
    assert xw.datasets.read_image is read_image and xw.datasets.PictureError is PictureError


def test_widget_upload_reads_the_same_file_twice():
    """The widgets' own upload: every upload is read (the value is emptied after it)."""
    import ipywidgets as W

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    w = xw.ExplainerWidget(model, torch.rand(1, 3, 32, 32), method="gradient",
                           background=False)
    assert isinstance(w.upload, W.FileUpload)
    photo = {"name": "me.png", "content": memoryview(encode(Image.fromarray(halves(20, 40)))),
             "type": "image/png", "size": 0,
             "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)}
    for expected in (2, 3):
        w.upload.value = (photo,)
        assert len(w.images) == expected and w.upload.value == ()
    w.upload.value = ({**photo, "name": "notes.png", "content": memoryview(b"notes")},)
    assert "notes.png is not a picture we can read" in w.error and len(w.images) == 3
