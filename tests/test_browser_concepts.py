"""The ConceptExplorer in real browsers: JupyterLab 4, Notebook 7 and Voilà, headless Chromium.

One server per front end runs ``tests/browser/concepts_demo.ipynb`` (the shipped shapes
model on twelve shapes images). In each, the test waits for the map, the bar chart of
the top channels and the reference patches, then

* clicks a bar with the mouse: the kernel draws that channel's conditional map (its
  panel title names it, its bar turns red, the pixels change);
* drags a box on the map with the mouse (press, move, release on the plotly plot
  area): the kernel ranks the channels inside the box (the bar chart says so, the
  box is drawn on the map);
* (JupyterLab) clicks a reference patch's button: its image opens in the picker.

Servers, Chromium and the screenshot folder are those of ``tests/browser_support.py``;
screenshots go to ``test-artifacts/browser/concepts_*.png``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser_support import (  # noqa: F401 - chromium is a fixture
    ARTIFACTS,
    assert_drawn,
    browser,
    chromium,
    open_page,
    pixels,
    run_notebook,
    serve,
)

NOTEBOOK = Path(__file__).resolve().parent / "browser" / "concepts_demo.ipynb"

# the visible bar chart: its channel labels, bar colours and title
BARS = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
      g => g.offsetParent !== null && g.data && g.data[0] && g.data[0].type === 'bar');
  if (!gd || !gd.data[0].x || !gd.data[0].x.length || !gd.querySelector('.bars .point'))
    return null;
  return {x: Array.from(gd.data[0].x), colors: Array.from(gd.data[0].marker.color),
          title: gd.layout.title.text};
}"""

# the map figure: its panel titles, its shapes, and where data points of panel 0 are
MAPS = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
      g => g.offsetParent !== null && g.data && g.data.some(t => t.type === 'heatmap' && t.z));
  if (!gd || !gd.querySelector('.heatmaplayer image')) return null;
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
  const sums = gd.data.filter(t => t.type === 'heatmap').map(
      t => t.z ? Array.from(t.z, row => Array.from(row)).flat().reduce(
          (a, b) => a + Math.abs(b), 0) : null);
  return {titles: (gd.layout.annotations || []).map(a => a.text), sums: sums,
          shapes: (gd.layout.shapes || []).length,
          left: r.left + xa._offset, top: r.top + ya._offset,
          x: [xa.range[0], xa.range[1], xa._length], y: [ya.range[0], ya.range[1], ya._length]};
}"""

# the reference patches: the button labels under their thumbnails
PATCHES = """() => [...document.querySelectorAll('.jupyter-button')].filter(
    b => b.offsetParent !== null && /^#\\d+$/.test(b.innerText.trim())).map(
    b => b.innerText.trim())"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict]:
    """Started on first use, one per front end, stopped at the end of the module."""
    running: dict[str, str] = {}
    stops = []

    def get(kind: str) -> str:
        if kind not in running:
            generator = serve(kind, tmp_path_factory.mktemp(kind), NOTEBOOK)
            running[kind] = next(generator)
            stops.append(generator)
        return running[kind]

    yield get
    for generator in stops:
        next(generator, None)  # runs serve's cleanup: the server stops


def to_pixels(maps: dict, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of the data point (x, y) of the map panel (a y axis runs from
    its range's first value at the bottom to its last at the top)."""
    (x0, x1, width), (y0, y1, height) = maps["x"], maps["y"]
    return (maps["left"] + (x - x0) / (x1 - x0) * width,
            maps["top"] + (y1 - y) / (y1 - y0) * height)


def open_front_end(page, kind: str, url: str) -> None:
    if kind == "voila":  # Voilà streams the page while the kernel runs: don't wait for load
        page.goto(url, wait_until="commit", timeout=120_000)
        return
    path = "lab/tree" if kind == "lab" else "notebooks"
    run_notebook(page, f"{url}/{path}/{NOTEBOOK.name}")
    if kind == "lab":
        page.evaluate("window.jupyterapp.shell.collapseLeft()")


@browser
@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind", ["lab", "notebook", "voila"])
def test_concept_explorer_click_and_box(kind, servers, chromium):  # noqa: F811
    prefix = f"concepts_{kind}"
    with open_page(chromium, f"{prefix}_failed.png", width=1400) as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        open_front_end(page, kind, servers(kind))
        # the first result: map, bars and the top channel's reference patches
        page.wait_for_function(f"() => ({MAPS})() && ({BARS})() && ({PATCHES})().length > 0",
                               timeout=180_000)
        page.wait_for_timeout(800)  # let plotly finish drawing
        plot = page.locator(".js-plotly-plot:visible", has=page.locator(".heatmaplayer")).first
        plot.scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / f"{prefix}_1_opened.png")
        before = plot.screenshot(path=ARTIFACTS / f"{prefix}_1_map.png")
        assert_drawn(before)
        bars, opened = page.evaluate(BARS), page.evaluate(MAPS)
        assert len(bars["x"]) >= 3 and bars["colors"][0] != bars["colors"][2]

        # a real click on the third bar: that channel's conditional map
        chosen = bars["x"][2]  # "ch 17"
        bar = page.locator(".js-plotly-plot:visible .bars .point").nth(2)
        bar.scroll_into_view_if_needed()
        box = bar.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        channel = chosen.split()[1]
        page.wait_for_function(
            f"() => {{ const m = ({MAPS})(), b = ({BARS})(); return m && b && "
            f"m.titles.includes('channel {channel} only') && b.colors[2] !== b.colors[0]; }}",
            timeout=60_000)
        page.wait_for_timeout(800)
        plot.scroll_into_view_if_needed()
        plot.screenshot(path=ARTIFACTS / f"{prefix}_2_bar_click.png")
        after = page.evaluate(MAPS)["sums"]  # another conditional map; the same map panel
        assert abs(after[1] - opened["sums"][1]) > 1e-6 * abs(opened["sums"][1])
        assert after[0] == opened["sums"][0]

        # a real dragged box on the map panel: the channels ranked inside it
        maps = page.evaluate(MAPS)
        start, end = to_pixels(maps, 30, 30), to_pixels(maps, 90, 80)
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=12)
        page.mouse.up()
        page.wait_for_function(
            f"() => {{ const m = ({MAPS})(), b = ({BARS})(); return m && b && m.shapes === 1 "
            "&& b.title.includes('in box'); }", timeout=120_000)
        page.wait_for_timeout(800)
        title = page.evaluate(BARS)["title"]
        y0, x0, y1, x1 = map(int, re.search(r"in box \[(\d+), (\d+), (\d+), (\d+)\]",
                                            title).groups())
        # the box the mouse drew, to the pixel grid (a pixel spans ±0.5 around its centre)
        assert abs(y0 - 30) <= 2 and abs(x0 - 30) <= 2 and abs(y1 - 81) <= 2 and abs(x1 - 91) <= 2
        plot.scroll_into_view_if_needed()
        boxed = plot.screenshot(path=ARTIFACTS / f"{prefix}_3_box.png")
        assert_drawn(boxed)
        page.screenshot(path=ARTIFACTS / f"{prefix}_3_page.png", full_page=True)

        if kind == "lab":  # a click on a reference patch opens its image
            label = page.evaluate(PATCHES)[0]
            page.locator(f".jupyter-button:text-is('{label}')").first.click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-dropdown select')].some("
                f"s => s.offsetParent !== null && s.selectedOptions[0] && "
                f"s.selectedOptions[0].text.endsWith('{label}'))", timeout=60_000)
        assert not [e for e in errors if "plotly" in e.lower() or "widget" in e.lower()], errors


# a figure edited right after the page asked for the widget states: the edit reaches a
# page still loading plotly's JavaScript (the race that left the explorer's plots blank)
EDITED_WHILE_LOADING = '''import threading
import plotly.graph_objects as go
from xaiwidgets.widgets.figures import LiveFigureWidget

class EditedWhileLoading(LiveFigureWidget):
    def get_state(self, key=None, drop_defaults=False):
        state = super().get_state(key, drop_defaults)
        if key is None and getattr(self, "_armed", False):  # the page asks for everything
            self._armed = False
            threading.Timer(0.05, lambda: setattr(self.data[0], "z", [[5, 6], [7, 8]])).start()
        return state

fig = EditedWhileLoading(go.Heatmap(z=[[1, 2], [3, 4]]))
fig._armed = True
fig'''

Z = """() => { const gd = document.querySelector('.js-plotly-plot');
  return gd && gd.data && gd.querySelector('.heatmaplayer image') ? gd.data[0].z : null; }"""


@browser
@pytest.mark.timeout(240)
def test_voila_page_gets_an_edit_made_while_it_loads(tmp_path, chromium):  # noqa: F811
    import nbformat

    notebook = tmp_path / "edited_while_loading.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(EDITED_WHILE_LOADING)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, notebook)
    (tmp_path / "home").mkdir()
    server = serve("voila", tmp_path / "home", notebook)
    url = next(server)
    try:
        with open_page(chromium, "voila_edited_while_loading_failed.png") as page:
            page.goto(url, wait_until="commit", timeout=120_000)
            page.wait_for_function(Z, timeout=120_000)
            # the edit, or the re-sync of the new view, lands within a moment of the drawing
            page.wait_for_function(f"() => JSON.stringify(({Z})()) === '[[5,6],[7,8]]'",
                                   timeout=15_000)
    finally:
        next(server, None)
