# Source of lesson.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Where do you look? Where does the network look?
#
# **1 · Look.** Click on the picture where your eyes go: each click is one *fixation*.
# (Choose *timed* to see the picture for only 3 seconds, as in an eye-tracking study.)
# Only when you have looked, press **Reveal**: you see your own map of attention next to
# what three explanation methods say the network used, and how alike they are.
#
# **2 · Compare.** The methods side by side on the same image, scored against the
# attention of a simulated observer.
#
# **3 · Quiz.** One map comes from the trained network, the other from a copy whose
# weights were scrambled. Can you tell which one is broken?

# %%
import ipywidgets as W
import torch
from IPython.display import display

import xaiwidgets as xw

ds = xw.datasets.shapes(n=6, clutter=2, seed=11)
model, preprocess, classes = xw.models.load("shapes-vgg")
images = torch.from_numpy(ds.image.values)

look = xw.LookWidget(images, classes=classes, model=model, preprocess=preprocess,
                     methods=("gradcam", "fem", "gradient"), gaze=ds)
compare = xw.CompareWidget(model, images, ["gradcam", "fem", "gradient"], reference=ds,
                           preprocess=preprocess, classes=classes)
quiz = xw.SanityQuiz(model, images, preprocess=preprocess, method="gradcam", seed=0,
                     classes=classes)
lesson = W.Tab(children=[look, compare, quiz])
for i, title in enumerate(["1 · Look", "2 · Compare", "3 · Quiz"]):
    lesson.set_title(i, title)
display(lesson)

# %% [markdown]
# **Hand in your clicks:** type your name under the picture and press *my clicks
# (.nc)*; your teacher pools the class's files with `xw.LookWidget.merge` and shows the
# whole class's map against the methods (`look.class_view(files)`).
