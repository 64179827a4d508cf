"""Engine-side drawing: colour limits, colormaps, overlays, PNG export, the ``.xai`` accessor."""

from __future__ import annotations

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import xarray as xr

from xaiwidgets import rendering


def test_color_limits():
    assert rendering.color_limits(np.array([-1.0, 3.0]), signed=True) == (-3.0, 3.0)
    assert rendering.color_limits(np.array([0.2, 0.7]), signed=False) == (0.2, 0.7)
    assert rendering.color_limits(np.zeros(4), signed=True) == (-1.0, 1.0)   # no NaN
    assert rendering.color_limits(np.full(4, 2.0), signed=False) == (2.0, 3.0)


def test_colormap_choice_follows_the_sign():
    assert rendering.resolve_colormap("auto", signed=True) == "RdBu_r"
    assert rendering.resolve_colormap(None, signed=False) == "inferno"
    assert rendering.resolve_colormap("jet", signed=True) == "jet"
    with pytest.raises(ValueError, match="unknown colormap"):
        rendering.resolve_colormap("nope", signed=False)


def test_signed_zero_is_the_diverging_midpoint():
    rgba = rendering.colorize(np.array([[-2.0, 0.0, 1.0, 2.0]]), signed=True)
    mid = matplotlib.colormaps["RdBu_r"](0.5)[:3]
    np.testing.assert_allclose(rgba[0, 1, :3], mid)
    assert rgba[0, 0, 2] > rgba[0, 0, 0] and rgba[0, 3, 0] > rgba[0, 3, 2]  # blue low, red high
    np.testing.assert_allclose(rgba[0, :, 3], [1.0, 0.0, 0.5, 1.0])  # transparent at 0


def test_signed_overlay_leaves_the_image_where_the_map_is_zero():
    image = np.full((1, 3, 3), 0.25)  # (H, W, RGB)
    out = rendering.overlay(np.array([[-1.0, 0.0, 1.0]]), image, opacity=1.0, signed=True)
    assert tuple(out[0, 1]) == (64, 64, 64)  # untouched image
    red = np.round(np.asarray(matplotlib.colormaps["RdBu_r"](1.0)[:3]) * 255)
    np.testing.assert_allclose(out[0, 2], red, atol=1)


def test_overlay_blends_image_and_map():  # unsigned: the colour covers evenly
    image = np.random.default_rng(0).random((3, 4, 5))
    values = np.arange(20.0).reshape(4, 5)
    only_image = rendering.overlay(values, image, "gray", opacity=0.0)
    np.testing.assert_array_equal(only_image, np.round(image.transpose(1, 2, 0) * 255))
    only_map = rendering.overlay(values, image, "gray", opacity=1.0)
    np.testing.assert_allclose(only_map[..., 0], values / 19 * 255, atol=1)  # 256-entry LUT
    half = rendering.overlay(values, image, "gray", opacity=0.5).astype(float)
    np.testing.assert_allclose(half, (only_image.astype(float) + only_map) / 2, atol=1)


def test_display_image_rescales_model_inputs():
    normalised = np.linspace(-2, 2, 3 * 2 * 2).reshape(3, 2, 2)
    shown = rendering.display_image(normalised)
    assert shown.shape == (2, 2, 3) and shown.min() == 0 and shown.max() == 1


def test_accessor_png_round_trip(tmp_path):
    da = xr.DataArray(np.random.default_rng(1).normal(size=(2, 6, 7)).astype(np.float32),
                      dims=("image", "y", "x"), attrs={"signed": 1})
    image = np.random.default_rng(2).random((2, 3, 6, 7))
    path = da.xai.to_png(tmp_path / "m.png", image=image, index=1, opacity=0.7)
    back = matplotlib.image.imread(path)[..., :3]
    expected = rendering.overlay(da.values[1], image[1], "RdBu_r", 0.7, signed=True)
    np.testing.assert_allclose(back * 255, expected, atol=1)
    with pytest.raises(ValueError, match="dims"):
        xr.DataArray(np.zeros((1, 3, 4, 4)), dims=("image", "channel", "y", "x")).xai.map2d()




def test_small_multiples_shorten_long_layer_titles_and_keep_them_on_hover():
    """FEMStackWidget's grid titles (layer names) overlapped on small panels: a
    ``short_titles`` grid elides the middle of a title that would not fit, in a smaller
    font, and keeps the whole title as the annotation's hover text."""
    from xaiwidgets.widgets.figures import MapGrid, fit_title

    long = "stages.3.blocks.2.mlp.act"
    grid = MapGrid(8, cols=4, titles=[long, "features.27"] * 4, panel_px=170,
                   short_titles=True)
    first, second = grid.figure.layout.annotations[:2]
    chars = grid._title_chars()
    assert len(first.text) == chars < len(long) and "…" in first.text
    assert first.text.startswith("stages.3") and first.text.endswith("act")
    assert first.hovertext == long and first.font.size == 12
    assert second.text == "features.27" and second.hovertext is None
    grid.set_title(1, long)  # a later title is shortened alike
    assert grid.figure.layout.annotations[1].text == first.text
    # without short_titles nothing changes (titles that carry scores stay whole)
    plain = MapGrid(2, titles=[long, "b"], panel_px=170)
    assert plain.figure.layout.annotations[0].text == long
    assert fit_title("abc", 8) == "abc" and len(fit_title("a" * 40, 9)) == 9
