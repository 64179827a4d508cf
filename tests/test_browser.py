"""The widgets in real browsers: JupyterLab 4, Notebook 7 and Voilà, in headless Chromium.

For each front end a server starts once (no token, private settings), Chromium
(Playwright, Debian's ``chromium``: Playwright never downloads a browser here) opens
a notebook, and the test checks:

* the plotly figure is drawn: its heatmap ``<image>`` exists and the plot's pixels are
  not blank (the Voilà bug: controls shown, figure area empty);
* a control changes it: the method dropdown (a new map from the kernel) and the opacity
  slider dragged with the mouse (a restyle), seen in the data *and* in the pixels;
* nothing is clipped at 900 px and 1400 px window widths: no control sticks out of a
  box that clips (``overflow`` not visible) or out of the window, and no button, label
  or slider readout has text cut inside its own box.

Lab and Notebook 7 run ``tests/browser/widget_demo.ipynb`` (a tiny random CNN); Voilà
runs the class app ``notebooks/app.ipynb`` offline (the shipped model) and visits its
three tabs. Screenshots go to ``test-artifacts/browser/``. Skipped only when no
Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.browser_support import (  # noqa: F401 - chromium, lab, notebook7, voila: fixtures
    APP,
    ARTIFACTS,
    DEMO,
    HEATMAP,
    ROOT,
    VIDEO,
    WIDTHS,
    assert_drawn,
    browser,
    changed,
    check_widths,
    chromium,
    control,
    drag_to_left,
    exercise_explainer,
    lab,
    notebook7,
    open_page,
    pixels,
    run_notebook,
    voila,
)


@browser
@pytest.mark.timeout(300)
@pytest.mark.parametrize("frontend", ["lab", "notebook7"])
def test_widget_in_jupyter(frontend, request, chromium):  # noqa: F811 - fixtures
    server = request.getfixturevalue(frontend)
    path = "lab/tree" if frontend == "lab" else "notebooks"
    with open_page(chromium, f"{frontend}_failed.png") as page:
        run_notebook(page, f"{server}/{path}/{DEMO.name}")
        if frontend == "lab":  # the file browser off: a narrow window gives the notebook room
            page.evaluate("window.jupyterapp.shell.collapseLeft()")
        exercise_explainer(page, frontend)
        check_widths(page, frontend)


@browser
@pytest.mark.timeout(300)
def test_video_clip_plays_in_jupyterlab(lab, chromium):  # noqa: F811 - fixtures
    """A clip: Play (jslinked to the frame slider, so it runs in the browser) moves the
    picture and the map; dragging the slider back to frame 0 shows the first map again."""
    frame = """() => { const s = [...document.querySelectorAll('.widget-hslider')].find(
      e => e.querySelector('label') && e.querySelector('label').textContent === 'frame');
      return s ? Number(s.querySelector('.widget-readout').textContent) : null; }"""
    with open_page(chromium, "lab_video_failed.png") as page:
        run_notebook(page, f"{lab}/lab/tree/{VIDEO.name}")
        first = page.wait_for_function(HEATMAP, timeout=120_000).json_value()
        plot = page.locator(".js-plotly-plot:visible", has=page.locator(".heatmaplayer")).first
        plot.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        before = plot.screenshot(path=ARTIFACTS / "lab_video_1_frame0.png")
        assert_drawn(before)
        assert page.evaluate(frame) == 0
        play = page.locator(".widget-play button:visible").first
        play.click()
        page.wait_for_function(changed(first), timeout=30_000)  # the kernel drew a new frame
        play.click()  # pause (the play button toggles)
        page.wait_for_timeout(1000)
        assert page.evaluate(frame) > 0
        later = plot.screenshot(path=ARTIFACTS / "lab_video_2_played.png")
        assert np.abs(pixels(later) - pixels(before)).mean() > 1.0
        drag_to_left(page, control(page, "hslider", "frame"))
        page.wait_for_function(f"() => {{ const h = ({HEATMAP})(); return h && "
                               f"Math.abs(h.sum - {first['sum']!r}) < 1e-6; }}", timeout=30_000)
        assert page.evaluate(frame) == 0


@browser
@pytest.mark.timeout(300)
def test_class_app_in_voila(voila, chromium):  # noqa: F811 - fixtures
    with open_page(chromium, "voila_failed.png") as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        # Voilà streams the page while the kernel runs the notebook: don't wait for "load"
        page.goto(voila, wait_until="commit", timeout=120_000)
        exercise_explainer(page, "voila_explain", method=False)
        assert "Offline" in page.inner_text("body")  # the note says which model this is
        check_widths(page, "voila_explain")
        page.set_viewport_size({"width": WIDTHS[0], "height": 1000})
        for title in ("FEM stack", "Compare"):
            page.locator(".lm-TabBar-tab", has_text=title).click()
            page.wait_for_function(HEATMAP, timeout=60_000)
            page.wait_for_timeout(800)
            plot = page.locator(".js-plotly-plot:visible", has=page.locator(".heatmaplayer")).first
            slug = title.split()[0].lower()
            assert_drawn(plot.screenshot(path=ARTIFACTS / f"voila_{slug}_figure.png"))
            check_widths(page, f"voila_{slug}")
            page.set_viewport_size({"width": WIDTHS[0], "height": 1000})
        assert not errors, errors


def test_late_page_gets_the_current_figure():
    """What a page that connects after the updates (Voilà, a reload) receives: the figure
    as it is now, not plotly's construction-time traces (the blank-figure bug)."""
    import plotly.graph_objects as go

    from xaiwidgets.widgets.figures import MapGrid

    grid = MapGrid(1)
    values = np.arange(12.0).reshape(3, 4)
    grid.show(0, values, image=np.zeros((3, 3, 4)), title="now")
    state = grid.figure.get_state()
    heat = state["_widget_data"][1]
    assert heat["type"] == "heatmap" and np.allclose(np.asarray(heat["z"]), values)
    assert state["_widget_layout"]["annotations"][0]["text"] == "now"
    # plain plotly keeps the empty traces of construction time for such a page
    plain = go.FigureWidget(go.Figure(grid.figure))
    plain.data[1].z = values * 2
    assert np.allclose(np.asarray(plain.get_state()["_widget_data"][1]["z"]), values)
    # a single-key sync (what every in-place edit sends) is not inflated with the whole figure
    assert set(grid.figure.get_state("_config")) == {"_config"}


def test_binder_opens_the_app_in_voila():
    link = "?urlpath=voila/render/notebooks/app.ipynb"
    for readme in (ROOT / "binder" / "README.md", ROOT / "README.md"):
        assert link in readme.read_text(), f"{readme.name} lacks the Voilà link"
    assert APP.is_file()
