# Source of 06_dataset_explorer.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Exploring a whole dataset: errors first
#
# One image tells you little about a model. The `DatasetExplorer` shows many at once: it
# predicts every image (batched, fast), then explains and scores only the page you look at.
# You filter by outcome (correct / wrong) and by class, sort by the score or by the model's
# confidence, and click a cell of the confusion matrix to see the images of that mistake.
# Any image opens in a full `ExplainerWidget` below the gallery.
#
# The workflow of this notebook:
#
# 1. open the explorer on the trained `shapes-vgg`;
# 2. look at the **errors first**, the most confident mistakes at the top;
# 3. let the **confusion matrix** pick a mistake and drive the gallery;
# 4. compare with `shapes-vgg-shuffled`, the same network trained on **shuffled labels**: it
#    memorised its training set and learnt nothing about shapes, so its maps explain nothing;
# 5. bring your own pictures (`xw.datasets.from_folder`) or a torch `Dataset`.
#
# Inside Jupyter the explorer computes in the background: a cell returns at once and the
# gallery fills in. `x.wait()` blocks until the page is drawn; the cells below use it so
# that the printed numbers are those of the finished page.

# %%
import tempfile
from pathlib import Path

import numpy as np
import torch
from IPython.display import display
from PIL import Image

import xaiwidgets as xw

# held-out images (the models trained on seeds >= 10000) with 4 distractors instead of the
# 2 of training: harder, so the trained model makes mistakes worth looking at
ds = xw.datasets.shapes(n=80, clutter=4, seed=1)
vgg, preprocess, classes = xw.models.load("shapes-vgg")
x = xw.DatasetExplorer(vgg, ds, preprocess=preprocess, methods=["gradcam", "fem", "gradient"],
                       page_size=8)
x.wait()
display(x)

# %% [markdown]
# The dataset carries simulated gaze (`gfdm`), so each map is scored by its **PCC** with the
# gaze map (higher: the map looks where people look). Without gaze data the explorer scores
# faithfulness instead (deletion AUC). `x.results` has the layout of `xw.evaluate`: dims
# `image` and `method`, one variable per metric, with the prediction of each image.

# %%
print(f"{len(ds.image)} images, accuracy {np.mean(x.predicted == x.labels):.0%}")
print("page 1 shows images", x.shown)
x.results.to_dataframe()[["pcc", "predicted", "label", "probability"]].head()

# %% [markdown]
# ## Errors first
#
# Set **outcome** to `wrong` and sort by **confidence ↓**: the mistakes the model was most
# sure about come first. These are the ones worth explaining: a confident mistake often
# points at a shortcut. Here, does the map sit on the target shape or on a distractor of the
# predicted class? (Each caption: index, true and predicted class, confidence, PCC.)

# %%
x.controls["outcome"].value = "wrong"
x.controls["sort"].value = "confidence ↓"
x.wait()
for i in x.shown:
    print(x.caption(i))
scores = x.results.pcc.sel({"method": "gradcam"})
print(f"mean Grad-CAM PCC so far: correct {float(scores.where(scores.correct).mean()):.3f}, "
      f"wrong {float(scores.where(~scores.correct).mean()):.3f}")

# %% [markdown]
# ## The confusion matrix drives the gallery
#
# `x.confusion` counts images per (true, predicted) pair; it is drawn beside the gallery.
# Clicking a cell shows only those images; `x.filter_pair(true, predicted)` does the same
# from code. Here we pick the most frequent mistake.

# %%
print(x.confusion.to_pandas())
off = x.confusion.values.copy()
np.fill_diagonal(off, 0)
true, predicted = np.unravel_index(off.argmax(), off.shape)
x.filter_pair(classes[true], classes[predicted])
x.wait()
print(f"true {classes[true]} predicted as {classes[predicted]}: images {x.shown}")

# %% [markdown]
# Open the first of them in the full explainer, with every method and parameter live:

# %%
if x.shown:
    x.select(x.shown[0])
    x.explainer.wait()
    display(x.explainer)

# %% [markdown]
# ## A model whose maps explain nothing
#
# `shapes-vgg-shuffled` has the same architecture, trained on the same images with **shuffled
# labels**. It reached 100 % training accuracy by memorising; on new images it guesses.
# Adebayo et al. (2018) use such a model as a sanity check: a map that *explains the model*
# must look different for a model that learnt nothing. Sort its images by PCC and compare
# the scores with those of the trained model on the same images.

# %%
shuffled, _, _ = xw.models.load("shapes-vgg-shuffled")
y = xw.DatasetExplorer(shuffled, ds, preprocess=preprocess, methods=["gradcam", "fem", "gradient"],
                       page_size=8)
y.controls["sort"].value = "pcc ↓"  # scores every image, so the order is global
y.wait()
x.filter_pair(None)
x.controls["outcome"].value = "all"
x.controls["sort"].value = "pcc ↓"
x.wait()
print(f"accuracy: trained {np.mean(x.predicted == x.labels):.0%}, "
      f"shuffled {np.mean(y.predicted == y.labels):.0%}")
trained_pcc = float(x.results.pcc.sel({"method": "gradcam"}).mean())
shuffled_pcc = float(y.results.pcc.sel({"method": "gradcam"}).mean())
print(f"Grad-CAM PCC with gaze: trained {trained_pcc:.3f}, shuffled labels {shuffled_pcc:.3f}")
display(y)

# %% [markdown]
# The shuffled model's Grad-CAM agrees much less with where people look, and its confusion
# matrix is close to uniform. Try the **method** dropdown: a method whose maps stay just as
# "good" for the shuffled model (edge detectors such as guided backprop often do) is
# showing the image, not the model. In the `ExplainerWidget`, the **randomize** control
# does the same test on a copy of the model, by re-initialising its layers from the logits
# down to a layer you choose.

# %% [markdown]
# ## Your own pictures
#
# `xw.datasets.from_folder(path)` reads an ImageFolder-style tree, `path/<class>/<picture>`,
# resizes the pictures and labels them by folder. Here we write a few shapes images to a
# temporary folder, as if they were your photos, and one file that only looks like a
# picture: unreadable files are skipped, with one warning naming them
# (`on_error="raise"` stops at the first instead). Phone photos are turned upright by their
# EXIF orientation and centre-cropped, not squashed. A torch `Dataset` or `DataLoader` of
# `(image, label)` pairs works as well.

# %%
folder = Path(tempfile.mkdtemp())
for i in range(12):
    label = classes[int(ds.label[i])]
    (folder / label).mkdir(exist_ok=True)
    picture = (ds.image.values[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    Image.fromarray(picture).save(folder / label / f"{i}.png")
(folder / label / "notes.jpg").write_text("not a photo")  # a file named like a picture
mine = xw.datasets.from_folder(folder, size=128, classes=classes)  # warns: notes.jpg skipped
print(mine.image.shape, mine.attrs["classes"], list(mine.file.values[:3]))
z = xw.DatasetExplorer(vgg, mine, preprocess=preprocess, methods=["gradcam"], page_size=4)
z.wait()
print("no gaze data, so the score is", z.metric, "(lower: removing the map's pixels hurts more)")
print(z.results[z.metric].to_pandas().round(3))

# %%
pairs = torch.utils.data.TensorDataset(
    torch.from_numpy(ds.image.values[:16]), torch.from_numpy(ds.label.values[:16])
)
t = xw.DatasetExplorer(
    vgg, pairs, preprocess=preprocess, classes=classes, methods=["fem"], page_size=4
)
t.wait()
print(t.metric, t.shown, t.confusion.values.sum())
