# Source of app.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Which pixels made the network decide?
#
# Pick a **model**, add **your own photos**, and explore how a neural network that
# recognises pictures makes its decision, in three tabs: one explanation method and its
# settings (**Explain**), one method layer by layer (**FEM stack**), and several methods
# side by side (**Compare**). Every control redraws the maps at once.
#
# Your photos (JPEG, PNG, GIF, BMP, TIFF or WebP) are added to every tab, with the same
# number in each. They are turned upright like on your phone and cut to the centre square
# (choose *whole photo* to keep all of it, with white borders). Transparent parts are shown
# on white.

# %%
import contextlib
import html
import io

import ipywidgets as W
from IPython.display import Javascript, display

import xaiwidgets as xw

#: torchvision classifiers offered when their ImageNet weights can be downloaded
#: (small enough for Binder)
IMAGENET_MODELS = ["resnet50", "resnet18", "mobilenet_v3_large"]
#: the shipped models this app runs: still-image classifiers of xw.datasets.shapes
#: (digits wants 8x8 gray digits, shapes-video clips: other notebooks show them)
SHIPPED_MODELS = ["shapes-vgg", "shapes-resnet", "shapes-vgg-shuffled"]
#: the shipped model used when nothing can be downloaded
OFFLINE_MODEL = "shapes-vgg"
#: the most one upload (all the files chosen at once) may weigh, in MB. The app's server
#: lets messages of 64 MiB through (voila.json, binder/jupyter_server_config.json; the
#: default, 10 MiB, silently drops a phone photo); a larger choice is refused in the page.
MAX_UPLOAD_MB = 50
#: how a photo gets the model's square shape: (label, xw.datasets.read_image's ``fit``)
FITS = [("centre square", "crop"), ("whole photo", "pad"), ("squashed", "squash")]

#: in the page: a choice of files heavier than the limit never leaves the browser (the
#: server would drop it without a word); a message says so, until the next good choice
REFUSE_LARGE_UPLOADS = """
(() => {
  const limit = %d;
  if (window.xwUploadLimit) { window.xwUploadLimit.bytes = limit; return; }
  const state = window.xwUploadLimit = {bytes: limit, button: null};
  document.addEventListener('click', event => {
    const button = event.target.closest && event.target.closest('.widget-upload');
    if (button) state.button = button;
  }, true);
  const click = HTMLInputElement.prototype.click;
  HTMLInputElement.prototype.click = function () {
    if (this.type === 'file' && !this.xwLimited) {
      this.xwLimited = true;
      const button = state.button;
      this.addEventListener('change', event => {
        const files = Array.from(this.files || []);
        const total = files.reduce((sum, file) => sum + file.size, 0);
        document.querySelectorAll('.xw-too-large').forEach(old => old.remove());
        if (total <= state.bytes) return;
        event.stopImmediatePropagation();
        this.value = '';
        const mb = n => (n / 1e6).toFixed(1) + ' MB';
        const box = document.createElement('div');
        box.className = 'xw-too-large';
        box.style.cssText = 'background:#fdecea;color:#8a1c1c;padding:4px 8px;' +
            'border-radius:4px;margin:4px 0';
        box.textContent = (files.length === 1 ? files[0].name + ' is ' : 'These files are ')
          + mb(total) + ': too large to upload here (at most '
          + Math.round(state.bytes / 1e6) + ' MB at a time). Make the photo smaller, or '
          + 'choose fewer files.';
        const anchor = document.querySelector('.xw-app-message') || button;
        if (anchor) anchor.insertAdjacentElement('afterend', box);
      }, true);
    }
    return click.apply(this, arguments);
  };
})();
"""

STYLES = {"info": ("#e7f5ea", "#1e4620"), "offline": ("#fff3cd", "#5c4400"),
          "error": ("#fdecea", "#8a1c1c")}


def banner(text: str, kind: str = "info") -> str:
    """``text`` in a coloured box (``kind``: info, offline or error)."""
    background, colour = STYLES[kind]
    return (f'<div style="background:{background};color:{colour};padding:4px 8px;'
            f'border-radius:4px;margin:2px 0">{html.escape(text)}</div>')


def load(name: str) -> xw.models.ModelChoice:
    """``name`` with pretrained weights, or the shipped model offline (the note says which);
    torch's download message stays out of the app."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return xw.models.load_or_fallback(name, fallback=OFFLINE_MODEL)


def images_for(model_name: str):
    """The app's starting images for a model: photos for ImageNet models, shapes (with
    their simulated gaze maps as the reference to score against) for the shipped ones."""
    if model_name in xw.models.SHIPPED:
        ds = xw.datasets.shapes(n=6, seed=0)
        return ds.image.values, ds
    photos, _ = xw.datasets.photos(size=224)
    return photos, None


class ClassApp(W.VBox):
    """The model picker, one photo upload shared by the three widgets in tabs, the model's
    banner and a message line (what went wrong with an upload or a model, in words)."""

    def __init__(self, first: xw.models.ModelChoice) -> None:
        online = not first.offline
        shipped = [name for name in SHIPPED_MODELS if name in xw.models.available()]
        self.picker = W.Dropdown(options=(IMAGENET_MODELS if online else []) + shipped,
                                 value=first.name, description="model")
        self.upload = W.FileUpload(accept="image/*", multiple=True, description="add photos")
        self.fit = W.Dropdown(options=FITS, value="crop", description="photo shape",
                              style={"description_width": "initial"})
        limit = W.HTML(f'<span style="color:#555">JPEG, PNG, … up to {MAX_UPLOAD_MB} MB '
                       "at a time</span>")
        self.note = W.HTML()      # the model banner: which model, offline or not
        self.message = W.HTML()   # what happened to the last upload or model choice
        self.message.add_class("xw-app-message")
        self.tabs = W.Tab()
        self.uploads: list[tuple[str, bytes]] = []
        self.choice = first
        self._reverting = False
        row = W.HBox([self.picker, self.upload, limit, self.fit],
                     layout=W.Layout(flex_flow="row wrap", align_items="center"))
        super().__init__([row, self.note, self.message, self.tabs])
        self.show(first)
        self.picker.observe(self._on_pick, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.fit.observe(lambda _: self._guarded("the photo shape", self._refit), names="value")

    # ----------------------------------------------------------------- display
    def say(self, text: str = "", kind: str = "info") -> None:
        """Show ``text`` on the message line ("" clears it)."""
        self.message.value = banner(text, kind) if text else ""

    def _guarded(self, what: str, action) -> None:
        """Run a handler; any error becomes a message (a handler's traceback is lost)."""
        try:
            action()
        except Exception as error:  # shown in words: the app stays usable
            self.say(f"Something went wrong with {what}: {error}", "error")

    def show(self, choice: xw.models.ModelChoice) -> None:
        """Build the three widgets for a loaded model, with the photos added so far."""
        model, preprocess, classes = choice.loaded
        images, reference = images_for(choice.name)
        common = dict(preprocess=preprocess, classes=classes)
        widgets = [
            xw.ExplainerWidget(model, images, method="gradcam", **common),
            xw.FEMStackWidget(model, images, **common),
            xw.CompareWidget(model, images, reference=reference, **common),
        ]
        for widget in widgets:  # one upload for all: the tabs' own buttons are hidden
            widget.upload.layout.display = "none"
        self.widgets = widgets
        for name, data in self.uploads:
            self._add(name, data)
        self.tabs.children = widgets
        self.tabs.titles = ("Explain", "FEM stack", "Compare")
        self.choice = choice
        self.note.value = banner(choice.note, "offline" if choice.offline else "info")

    def _add(self, name: str, data: bytes) -> int:
        """Read one photo and add it to every tab; returns its number."""
        size = self.widgets[0].explainer().size  # one model: one size for every tab
        image = xw.datasets.read_image(data, size, fit=self.fit.value, name=name)
        return [widget.add_image(image, label=name) for widget in self.widgets][0]

    def _refit(self) -> None:
        if self.uploads:
            self.show(self.choice)  # the photos again, with the new shape
            self.say(f"Photos shown as: {self.fit.label}.")

    # ---------------------------------------------------------------- handlers
    def _on_pick(self, change: dict) -> None:
        if self._reverting:
            return
        name = change["new"]
        self.picker.disabled = True
        self.say(f"Loading {name}…")
        try:
            choice = load(name)
            self.show(choice)
            self.say()
        except Exception as error:
            self.say(f"Could not load the model {name}: {error}. Still showing "
                     f"{self.choice.name}.", "error")
        finally:
            self._reverting = True
            self.picker.value = self.choice.name  # what is shown (a fallback, or the old one)
            self._reverting = False
            self.picker.disabled = False

    def _on_upload(self, change: dict) -> None:
        files = list(change["new"])
        if not files:
            return
        # emptied first (before any message shows): the same file chosen again is a change
        self.upload.value = ()
        try:
            added, problems = [], []
            for item in files:
                name, data = item["name"], bytes(item["content"])
                if len(data) > MAX_UPLOAD_MB * 1_000_000:
                    problems.append(f"{name} is {len(data) / 1e6:.1f} MB: too large (at most "
                                    f"{MAX_UPLOAD_MB} MB); make the photo smaller")
                    continue
                try:
                    number = self._add(name, data)
                except xw.datasets.PictureError as error:
                    problems.append(str(error))
                    continue
                self.uploads.append((name, data))
                added.append(f"{name} (image {number})")
            if problems:
                done = f" Added {', '.join(added)}." if added else ""
                self.say(" ".join(problems) + done, "error")
            else:
                self.say(f"Added {', '.join(added)} to every tab.")
        except Exception as error:
            self.say(f"Something went wrong with the upload: {error}", "error")


display(Javascript(REFUSE_LARGE_UPLOADS % (MAX_UPLOAD_MB * 1_000_000)))
app = ClassApp(load("resnet50"))
display(app)

# %% [markdown]
# **What to try.** Pick an image and compare Grad-CAM with the plain gradient in *Explain*;
# move FEM's K slider in *FEM stack* and watch the early layers light up edges and the late
# ones whole objects; in *Compare*, see which method agrees best with where people looked
# (shapes only: photos have no gaze maps). Then add a photo of your own.
