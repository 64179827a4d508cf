# Source of app.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Which pixels made the network decide? An app for the classroom
#
# Pick a **model**, add **your own photos**, and explore how a CNN image classifier decides,
# in three tabs: one method with its parameters (**Explain**), the feature explanation method
# layer by layer (**FEM stack**), and several methods side by side (**Compare**). Every
# control recomputes or redraws the maps in place.
#
# This notebook is meant to be run as an app with [Voilà](https://voila.readthedocs.io)
# (the code is hidden): `voila notebooks/app.ipynb`, or on Binder through
# `https://mybinder.org/v2/gh/<owner>/<repo>/HEAD?urlpath=voila/render/notebooks/app.ipynb`.
# With internet it uses torchvision's ImageNet models on photos; offline, the small models
# that ship with `xaiwidgets`, on its synthetic shapes.

# %%
import contextlib
import io

import ipywidgets as W
from IPython.display import display

import xaiwidgets as xw

#: torchvision classifiers offered when their ImageNet weights can be downloaded (small enough for Binder)
IMAGENET_MODELS = ["resnet50", "resnet18", "mobilenet_v3_large"]
#: the shipped model used when nothing can be downloaded
OFFLINE_MODEL = "shapes-vgg"


def load(name: str) -> xw.models.ModelChoice:
    """``name`` with pretrained weights, or the shipped model offline (the note says which);
    torch's download message stays out of the app."""
    with contextlib.redirect_stdout(io.StringIO()):
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
    """The model picker, the photo upload and the three widgets in tabs."""

    def __init__(self, first: xw.models.ModelChoice) -> None:
        online = not first.offline
        options = (IMAGENET_MODELS if online else []) + xw.models.available()
        self.picker = W.Dropdown(options=options, value=first.name, description="model")
        self.upload = W.FileUpload(accept="image/*", multiple=True, description="add photos")
        self.note = W.HTML()
        self.tabs = W.Tab()
        self.uploads: list[tuple[str, bytes]] = []
        super().__init__([W.HBox([self.picker, self.upload]), self.note, self.tabs])
        self.show(first)
        self.picker.observe(self._on_pick, names="value")
        self.upload.observe(self._on_upload, names="value")

    def show(self, choice: xw.models.ModelChoice) -> None:
        """Build the three widgets for a loaded model (and the photos added so far)."""
        model, preprocess, classes = choice.loaded
        images, reference = images_for(choice.name)
        common = dict(preprocess=preprocess, classes=classes)
        self.widgets = [
            xw.ExplainerWidget(model, images, method="gradcam", **common),
            xw.FEMStackWidget(model, images, **common),
            xw.CompareWidget(model, images, reference=reference, **common),
        ]
        for name, data in self.uploads:
            self._add(name, data)
        self.tabs.children = self.widgets
        self.tabs.titles = ("Explain", "FEM stack", "Compare")
        colour = "#fff3cd" if choice.offline else "#e7f5ea"
        self.note.value = (f'<div style="background:{colour};padding:4px 8px;border-radius:4px">'
                           f"{choice.note}</div>")

    def _add(self, name: str, data: bytes) -> None:
        for widget in self.widgets:
            image = xw.rendering.read_image(data, widget.explainer().size)
            widget.add_image(image, label=name)

    def _on_pick(self, change: dict) -> None:
        self.picker.disabled = True
        self.note.value = f"loading {change['new']}…"
        try:
            self.show(load(change["new"]))
        finally:
            self.picker.disabled = False

    def _on_upload(self, change: dict) -> None:
        for item in change["new"]:
            name, data = item["name"], bytes(item["content"])
            try:
                self._add(name, data)
                self.uploads.append((name, data))
            except Exception as error:  # a file that is no picture must not break the app
                self.note.value = f"could not read {name}: {error}"


app = ClassApp(load("resnet50"))
display(app)

# %% [markdown]
# **What to try.** Pick an image and compare Grad-CAM with the plain gradient in *Explain*;
# move FEM's K slider in *FEM stack* and watch the early layers light up edges and the late
# ones whole objects; in *Compare*, see which method agrees best with where people looked
# (shapes only: photos have no gaze maps). Then add a photo of your own.
