"""The class app (notebooks/app.ipynb) with files as students upload them.

In Python: the app's code (notebooks/src/app.py, without its last cell's display) on the
shipped model: one upload shared by the three tabs, messages in words for files that are
no pictures and for models that fail, the same file read twice, the model picker.
The server settings that let a phone photo through (voila.json, Binder's config).

In Voilà, in headless Chromium: real uploads through the app's FileUpload (Playwright's
file chooser): a 12 MB phone photo appears (tornado's 10 MiB default dropped it without a
word), a text file named .png gets a message that goes at the next good upload, a file
above the maximum is refused in the page with a message. Screenshots go to
``test-artifacts/browser/app_*.png``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser_support import ARTIFACTS, HEATMAP, browser, open_page, pixels, serve
from tests.browser_support import chromium as chromium_fixture  # noqa: F401 - a fixture
from tests.helpers import encode, halves, phone_photo

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "src" / "app.py"
APP = ROOT / "notebooks" / "app.ipynb"
VOILA_JSON = ROOT / "voila.json"
BINDER_CONFIG = ROOT / "binder" / "jupyter_server_config.json"


@pytest.fixture(scope="module")
def app_code() -> dict:
    """The app's definitions (everything before its ``display(...)`` lines)."""
    text = SOURCE.read_text()
    code = text[: text.index("display(Javascript(")]
    namespace: dict = {"__name__": "class_app"}
    exec(compile(code, str(SOURCE), "exec"), namespace)  # noqa: S102 - our own notebook
    return namespace


@pytest.fixture()
def app(app_code):
    return app_code["ClassApp"](app_code["load"]("shapes-vgg"))


def upload(app, *files: tuple[str, bytes]) -> None:
    """What the browser sends when files are chosen."""
    import datetime

    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    app.upload.value = tuple({"name": name, "content": memoryview(data), "type": "image/png",
                              "size": len(data), "last_modified": when} for name, data in files)


def image_counts(app) -> list[int]:
    return [len(w.images) for w in app.widgets]


def test_one_upload_feeds_every_tab_and_the_same_file_is_read_again(app):
    assert [w.upload.layout.display for w in app.widgets] == ["none"] * 3  # one button
    photo = encode(Image.fromarray(halves(30, 60)))
    upload(app, ("me.png", photo))
    assert image_counts(app) == [7, 7, 7] and app.upload.value == ()
    assert "me.png (image 6)" in app.message.value
    upload(app, ("me.png", photo))                     # the same file again: read again
    assert image_counts(app) == [8, 8, 8]
    labels = [w.controls["image"].label for w in app.widgets]
    assert labels == ["7: me.png"] * 3                 # the same number in every tab


def test_a_text_file_named_png_gets_a_message_that_goes_at_the_next_good_upload(app):
    banner = app.note.value
    upload(app, ("x.png", b"my notes, not a photo"))
    message = app.message.value
    assert "x.png is not a picture we can read" in message
    assert "#fdecea" in message                        # styled as an error
    assert "BytesIO" not in message and "0x" not in message and "Error" not in message
    assert app.note.value == banner and image_counts(app) == [6, 6, 6]
    upload(app, ("x.png", b"my notes, not a photo"))  # again: processed again
    assert "x.png is not a picture" in app.message.value
    upload(app, ("ok.png", encode(Image.fromarray(halves(30, 60)))))
    assert "not a picture" not in app.message.value and "ok.png (image 6)" in app.message.value
    app_limit = app_code_limit()  # the kernel refuses too, should a server let one through
    upload(app, ("huge.jpg", b"\xff" * (app_limit * 1_000_000 + 1)))
    assert "huge.jpg is" in app.message.value and "too large" in app.message.value


def app_code_limit() -> int:
    return int(re.search(r"^MAX_UPLOAD_MB = (\d+)", SOURCE.read_text(), re.M).group(1))


def test_photo_shape_option_keeps_the_aspect(app):
    wide = encode(Image.fromarray(halves(20, 80)))     # red | blue, four times as wide
    upload(app, ("wide.png", wide))
    centre = app.widgets[0].images[-1].numpy()
    assert centre[0, :, :4].mean() > 0.9 and centre[2, :, -4:].mean() > 0.9  # centre crop
    app.fit.value = "pad"
    padded = app.widgets[0].images[-1].numpy()         # re-read: the whole photo on white
    assert image_counts(app) == [7, 7, 7]
    assert padded[:, :5].min() > 0.99 and padded[:, -5:].min() > 0.99
    assert padded[1, padded.shape[1] // 2].max() < 0.05  # red and blue rows: no green


def test_the_picker_offers_only_models_the_app_runs_and_reports_failures(app, app_code):
    options = list(app.picker.options)
    assert "digits" not in options and "shapes-video" not in options
    assert set(options) <= set(app_code["IMAGENET_MODELS"] + app_code["SHIPPED_MODELS"])
    app.picker.value = "shapes-resnet"                  # a shipped one loads and shows
    assert app.choice.name == "shapes-resnet" and "shapes-resnet" in app.note.value
    assert app.message.value == "" and not app.picker.disabled

    def broken(name):
        raise RuntimeError(f"no weights for {name}")

    app_code["load"], kept = broken, app_code["load"]
    try:
        banner = app.note.value
        app.picker.value = "shapes-vgg"
    finally:
        app_code["load"] = kept
    assert "Could not load the model shapes-vgg: no weights" in app.message.value
    assert app.picker.value == "shapes-resnet" and not app.picker.disabled  # as shown
    assert app.note.value == banner


def test_the_intro_is_for_students():
    intro = SOURCE.read_text().split("# %%\n")[0]
    assert "<owner>" not in intro and "voila notebooks" not in intro and "Binder" not in intro
    assert "photos" in intro


def test_servers_let_a_phone_photo_through():
    """Voilà reads voila.json from the folder it starts in (`voila notebooks/app.ipynb`
    from the repository root); Binder's Jupyter server reads binder's config, which
    postBuild puts in the environment's config folder."""
    voila = json.loads(VOILA_JSON.read_text())["Voila"]["tornado_settings"]
    server = json.loads(BINDER_CONFIG.read_text())["ServerApp"]["tornado_settings"]
    limit = voila["websocket_max_message_size"]
    assert server["websocket_max_message_size"] == limit
    assert limit >= app_code_limit() * 1_000_000 + 4 * 2**20  # a full upload and its message
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "binder/jupyter_server_config.json" in post_build and "etc/jupyter" in post_build
    for doc in (ROOT / "binder" / "README.md", ROOT / "README.md"):
        assert f"{app_code_limit()} MB" in doc.read_text(), f"{doc.name}: state the maximum"


# ------------------------------------------------------------------------- Voilà
@pytest.fixture(scope="module")
def voila_app(tmp_path_factory):
    """Voilà on the app, started beside the repository's voila.json (as from the repo root)."""
    yield from serve("voila", tmp_path_factory.mktemp("voila_app"), APP, VOILA_JSON)


MESSAGE = "() => (document.querySelector('.xw-app-message') || {}).innerText || ''"


def choose(page, path: Path) -> None:
    """Click "add photos" and pick ``path`` in the file chooser, as a student does."""
    with page.expect_file_chooser() as chooser:
        page.locator(".widget-upload:visible", has_text="add photos").click()
    chooser.value.set_files(str(path))


def wait_drawn(page, name: str) -> None:
    """Wait until a figure's panel title names the uploaded file (the picture is drawn)."""
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot "
                           ".annotation-text')].some(t => t.textContent.includes("
                           f"{json.dumps(name)}))", timeout=120_000)
    page.wait_for_timeout(1000)  # plotly finishes drawing the picture


def wait_message(page, text: str, timeout: float = 120_000) -> str:
    page.wait_for_function(f"() => ({MESSAGE})().includes({json.dumps(text)})",
                           timeout=timeout)
    return page.evaluate(MESSAGE)


@browser
@pytest.mark.timeout(600)
def test_real_uploads_in_voila(voila_app, chromium_fixture, tmp_path):  # noqa: F811
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(phone_photo())                     # about 12 MB, 4000x3000
    notes = tmp_path / "notes.png"
    notes.write_text("my notes, not a photo\n")
    limit = app_code_limit()
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as file:                       # refused before it is read
        file.truncate((limit + 10) * 1_000_000)
    with open_page(chromium_fixture, "app_failed.png") as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(voila_app, wait_until="commit", timeout=120_000)
        page.wait_for_function(HEATMAP, timeout=180_000)
        assert page.evaluate("() => window.xwUploadLimit.bytes") == limit * 1_000_000
        banner = page.inner_text(".widget-html:has-text('shipped')")
        assert f"up to {limit} MB" in page.inner_text("body")
        assert page.locator(".widget-upload:visible").count() == 1  # one upload button

        choose(page, photo)
        text = wait_message(page, "phone.jpg (image 6)", timeout=240_000)
        assert "Added" in text
        wait_drawn(page, "phone.jpg")   # the picture panel's title, the picker below
        assert page.locator("select:visible option", has_text="6: phone.jpg").count() == 1
        page.wait_for_timeout(1500)
        shot = page.screenshot(path=ARTIFACTS / "app_1_phone_photo.png", full_page=True)
        assert pixels(shot).std() > 10

        choose(page, notes)
        text = wait_message(page, "notes.png is not a picture we can read")
        assert "BytesIO" not in text and "Error" not in text
        assert page.inner_text(".widget-html:has-text('shipped')") == banner  # banner stays
        colour = page.evaluate("() => getComputedStyle(document.querySelector("
                               "'.xw-app-message div[style]')).backgroundColor")
        assert colour == "rgb(253, 236, 234)"
        page.screenshot(path=ARTIFACTS / "app_2_not_a_picture.png", full_page=True)
        choose(page, notes)                                # the same file: read again
        page.wait_for_timeout(3000)
        assert "notes.png is not a picture" in page.evaluate(MESSAGE)

        small = tmp_path / "small.png"
        small.write_bytes(encode(Image.fromarray(halves(40, 40))))
        choose(page, small)
        text = wait_message(page, "small.png (image 7)")
        assert "not a picture" not in text                 # cleared by the good upload
        choose(page, small)                                # the same file again
        wait_message(page, "small.png (image 8)")

        choose(page, huge)
        page.wait_for_selector(".xw-too-large", timeout=30_000)
        refusal = page.inner_text(".xw-too-large")
        assert f"huge.jpg is {limit + 10}.0 MB: too large" in refusal
        assert f"at most {limit} MB at a time" in refusal
        page.screenshot(path=ARTIFACTS / "app_3_too_large.png", full_page=True)
        choose(page, small)                                # the next good choice clears it
        wait_message(page, "small.png (image 9)")
        assert page.locator(".xw-too-large").count() == 0

        # Compare: the live scores' legend sits below its axis title, not over it
        page.locator(".lm-TabBar-tab", has_text="Compare").click()
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some("
                               "g => g.offsetParent && g.querySelector('.legend .traces'))",
                               timeout=240_000)
        page.wait_for_timeout(1000)
        boxes = page.evaluate("""() => {
          const g = [...document.querySelectorAll('.js-plotly-plot')].find(
              g => g.offsetParent && g.querySelector('.legend .traces'));
          const r = e => { const b = e.getBoundingClientRect(); return [b.top, b.bottom]; };
          const entries = [...g.querySelectorAll('.legend .traces')];
          return {legend: r(g.querySelector('.legend')), title: r(g.querySelector('.xtitle')),
                  figure: r(g.querySelector('.main-svg')), entries: entries.length,
                  rows: new Set(entries.map(e => Math.round(r(e)[0]))).size};
        }""")
        (ARTIFACTS / "app_legend.json").write_text(json.dumps(boxes))
        assert boxes["legend"][0] >= boxes["title"][1] - 1, boxes      # below the title
        assert boxes["legend"][1] <= boxes["figure"][1] + 1, boxes     # inside the figure
        assert boxes["rows"] == -(-boxes["entries"] // 2), boxes       # two entries a row
        scores = page.locator(".js-plotly-plot:visible", has=page.locator(".legend .traces"))
        scores.first.screenshot(path=ARTIFACTS / "app_5_compare_scores.png")
        # the thumbnails wrap inside the controls column: none sticks out of the window
        strip = page.evaluate("""() => [...document.querySelectorAll('.widget-image')]
          .filter(e => e.offsetParent).map(e => e.getBoundingClientRect().right)""")
        assert strip and max(strip) <= page.viewport_size["width"]
        page.screenshot(path=ARTIFACTS / "app_4_compare.png", full_page=True)
        assert not errors, errors


def test_twelve_megabyte_photo_is_what_tornado_dropped():
    """The photo the browser test uploads is larger than tornado's default message limit
    (so that test fails without the app's server configuration)."""
    from tornado.websocket import _default_max_message_size

    data = phone_photo()
    assert len(data) > _default_max_message_size
    assert Image.open(io.BytesIO(data)).size == (4000, 3000)
    assert np.asarray(Image.open(io.BytesIO(data)).reduce(16)).std() > 5


# ------------------------------------------------------------- notebook 07 in JupyterLab
def video_widget_notebook(path: Path) -> Path:
    """Notebook 07's setup cell and its widget cell, as they are in the notebook."""
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "notebooks" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells = module.parse_cells((ROOT / "notebooks" / "src" / "07_video.py").read_text())
    code = [source for kind, source in cells if kind == "code"]
    assert "ExplainerWidget" in code[-1] and "load(\"shapes-video\")" in code[0]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code[0]), nbformat.v4.new_code_cell(code[-1])]
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python",
                                  "name": "python3"}}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def lab_video(tmp_path_factory):
    home = tmp_path_factory.mktemp("lab_video")
    yield from serve("lab", home, video_widget_notebook(home / "video_07.ipynb"))


@browser
@pytest.mark.timeout(400)
def test_video_widget_of_notebook_07_fits_one_laptop_screen(lab_video, chromium_fixture):  # noqa: F811
    """In JupyterLab with the file browser open on a 1280x800 laptop screen, the Play
    button and the picture are on one screen (the picture sat under the whole controls
    column before)."""
    from tests.browser_support import run_notebook

    with open_page(chromium_fixture, "lab_video_07_failed.png", width=1280) as page:
        page.set_viewport_size({"width": 1280, "height": 800})
        run_notebook(page, f"{lab_video}/lab/tree/video_07.ipynb")
        page.wait_for_function(HEATMAP, timeout=240_000)
        page.evaluate("window.jupyterapp.shell.expandLeft()")  # the file browser open
        page.wait_for_timeout(1500)
        play = page.locator(".widget-play button:visible").first
        plot = page.locator(".js-plotly-plot:visible", has=page.locator(".heatmaplayer")).first
        play.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        a, b = play.bounding_box(), plot.bounding_box()
        page.screenshot(path=ARTIFACTS / "lab_video_07_laptop.png")
        # the notebook's visible area (below Lab's menus and toolbar, above its status bar)
        screen = page.locator(".jp-NotebookPanel:visible .jp-WindowedPanel-outer").first
        view = screen.bounding_box()
        top, bottom = min(a["y"], b["y"]), max(a["y"] + a["height"], b["y"] + b["height"])
        assert bottom - top <= view["height"], (a, b, view)  # one screen high ...
        assert b["x"] > a["x"] + a["width"], (a, b)            # ... the picture beside
        assert b["x"] + b["width"] <= view["x"] + view["width"], (b, view)
        titles = page.evaluate("""() => [...document.querySelectorAll(
            '.js-plotly-plot .annotation-text')].filter(t => t.textContent.trim()).map(
            t => { const r = t.getBoundingClientRect(); return [r.left, r.right]; })""")
        titles.sort()
        assert len(titles) >= 2 and all(left[1] <= right[0] for left, right
                                        in zip(titles[:-1], titles[1:], strict=True)), titles


@pytest.fixture(scope="module")
def binder_server(tmp_path_factory):
    """A Jupyter server configured as postBuild configures Binder's (the repository's
    binder/jupyter_server_config.json in a Jupyter config folder); it serves the app
    through Voilà's server extension, as Binder's ``?urlpath=voila/render/...`` does."""
    home = tmp_path_factory.mktemp("binder")
    (home / "config").mkdir()
    shutil.copy(BINDER_CONFIG, home / "config" / "jupyter_server_config.json")
    yield from serve("lab", home, APP)


@browser
@pytest.mark.timeout(400)
def test_phone_photo_through_binders_voila(binder_server, chromium_fixture, tmp_path):  # noqa: F811
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(phone_photo())
    with open_page(chromium_fixture, "app_binder_failed.png") as page:
        page.goto(f"{binder_server}/voila/render/{APP.name}", wait_until="commit",
                  timeout=120_000)
        page.wait_for_function(HEATMAP, timeout=180_000)
        choose(page, photo)
        assert "Added phone.jpg (image 6)" in wait_message(page, "phone.jpg (image 6)",
                                                           timeout=240_000)
        wait_drawn(page, "phone.jpg")
        page.screenshot(path=ARTIFACTS / "app_binder_phone_photo.png")
