# Source of 05_classroom.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Classroom: eight short exercises
#
# Each exercise has **a task**, **a cell to edit** that already runs (with a deliberately
# naive answer), a **check** cell that tells you how you are doing, and a **solution** you can
# unfold. Run the notebook top to bottom once, then go back and improve each answer. The
# earlier notebooks (`01`–`04`) explain every method used here.
#
# Rules of thumb for the whole session: explain the *logit* of a class; look at several
# images before concluding; a pretty map is not a faithful map.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

import xaiwidgets as xw
from xaiwidgets import metrics
from xaiwidgets.evaluation import sanity

ds = xw.datasets.shapes(n=8, clutter=2, seed=7)
model, preprocess, classes = xw.models.load("shapes-vgg")
images = torch.from_numpy(ds.image.values)
ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes, progress=False)
predicted = ex.resolve_target(None).numpy()
print("predicted:", [classes[p] for p in predicted])
print("true     :", [classes[t] for t in ds.label.values])


def on_object(maps) -> float:
    """Share of a map's (positive) mass that falls on the target object, averaged over images."""
    m = np.clip(np.asarray(maps), 0, None)
    inside = (m * ds.mask.values[: len(m)]).sum(axis=(1, 2))
    return float(np.mean(inside / np.maximum(m.sum(axis=(1, 2)), 1e-12)))


def strip(maps: dict, image: int = 0) -> None:
    """Draw a few maps of one image in a row."""
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.1 * (len(maps) + 1), 2.4))
    axes[0].imshow(images[image].permute(1, 2, 0).numpy())
    for ax, (title, m) in zip(axes[1:], maps.items(), strict=True):
        ax.imshow(np.asarray(m[image]), cmap="inferno")
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.axis("off")
    plt.tight_layout()
    plt.show()


# %% [markdown]
# ## Exercise 1 — Which layer gives the sharpest Grad-CAM?
#
# Grad-CAM can use any convolutional layer. Deep layers are semantic but coarse (8 × 8 here),
# shallow ones are fine but respond to every edge. **Task:** compute Grad-CAM at every conv
# block (`ex.block_layers()`) and find the one whose map puts the largest share of its mass
# on the target object (`on_object`).

# %%
candidates = [ex.default_layer()]  # edit me: which layers should you try?
scores = {layer: on_object(ex.explain("gradcam", layer=layer)) for layer in candidates}
best_layer = max(scores, key=scores.get)

# %%
# check
assert best_layer in ex.layers(), "best_layer must be one of ex.layers()"
print(f"tried {len(scores)} layer(s); best: {best_layer}, {scores[best_layer]:.0%} on the object")
strip({f"{name}\n{score:.0%}": ex.explain("gradcam", layer=name) for name, score in scores.items()})

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# `candidates = ex.block_layers()`. The last block (the default) is coarse: its 8 × 8 cells
# spill over the object's border. The first blocks light up every edge, distractors and
# background stripes included. A 16 × 16 block (`features.17` here, about half of the mass on
# the object against a third for the default) is sharper than the default and still
# class-specific. The answer depends on the image: try `on_object` per image.
# </details>
#
# ## Exercise 2 — Find the ε where LRP stops being noisy
#
# LRP-ε with a tiny ε is gradient × input: speckled. Larger ε absorbs weak, contradictory
# contributions. **Task:** sweep ε (the widget's slider spans 1e-9 … 10) and pick the
# *smallest* ε whose map puts at least 90 % of the best achievable share on the object.

# %%
epsilons = [1e-6]  # edit me: e.g. np.logspace(-9, 1, 6)
shares = {eps: on_object(ex.explain("lrp", composite="epsilon", epsilon=float(eps)))
          for eps in epsilons}
best = max(shares.values())
eps = min(e for e, s in shares.items() if s >= 0.9 * best)

# %%
# check
assert 1e-9 <= eps <= 10, "ε must lie in the slider's range 1e-9 ... 10"
plt.figure(figsize=(4, 2.6))
plt.semilogx(list(shares), list(shares.values()), "o-")
plt.axvline(eps, color="C3")
plt.xlabel("ε")
plt.ylabel("share on object")
plt.show()
print(f"tried {len(shares)} value(s): chosen ε = {eps:g} ({shares[eps]:.0%} on the object)")

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# `epsilons = np.logspace(-9, 1, 11)`. Below about 1e-3 nothing changes (ε is far smaller than
# the activations z_j: the rule is LRP-0); the share on the object climbs as ε reaches the
# typical size of z_j, and ε ≈ 1 is the answer here. Beyond it the map keeps only a few
# strong paths and most relevance is absorbed (see `02_lrp_deeplift`). The value depends on
# the network's activation scale, which is why the slider is logarithmic.
# </details>
#
# ## Exercise 3 — Does SmoothGrad pass the randomisation test?
#
# Adebayo et al.'s cascading randomisation destroys the network from the top layer down. A
# method that explains the model must change (similarity with the original map → 0).
# **Task:** run the test for SmoothGrad and guided backprop as well as the gradient, and
# decide which methods pass: a passing method's map soon stops resembling the original, so
# its similarity *averaged over the cascade* stays below 0.5.

# %%
methods = {"gradient": {}}  # edit me: add "smoothgrad" (e.g. {"n": 8}) and "guided_backprop"
results = {name: sanity.model_randomization(model, images[:4], name, preprocess=preprocess,
                                            params=params, modes=["cascading"], progress=False)
           for name, params in methods.items()}

# %%
# check
plt.figure(figsize=(5, 2.8))
for name, result in results.items():
    curve = result.spearman_abs.sel(mode="cascading").mean("image")
    assert bool(((curve >= -1) & (curve <= 1)).all()), "similarities are correlations"
    plt.plot(range(len(curve)), curve, "o-", label=name)
    verdict = "passes" if float(curve.mean()) < 0.5 else "FAILS"
    print(f"{name:16s} mean similarity over the cascade: {float(curve.mean()):.2f} -> {verdict}")
plt.xlabel("layers randomised (top first)")
plt.ylabel("Spearman |·|")
plt.legend()
plt.show()

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# `methods = {"gradient": {}, "smoothgrad": {"n": 8}, "guided_backprop": {}}`. SmoothGrad is
# an average of gradients, so it depends on the weights as the gradient does: it **passes**
# (its similarity falls to about 0.2 after three layers). Guided backprop keeps showing the
# image's edges until the randomisation reaches the first convolutions: it **fails**, a
# reminder that a crisp, plausible map can be independent of the
# model it claims to explain.
# </details>
#
# ## Exercise 4 — How many integration steps does IG need?
#
# Integrated Gradients is exact only in the limit of infinitely many steps; its attributions
# should add up to f_c(x) − f_c(x'). **Task:** find the smallest `steps` for which the
# relative completeness gap is below 5 % on every image.

# %%
steps = 2  # edit me

# %%
# check
assert isinstance(steps, int) and steps >= 1, "steps is a positive whole number"
target = ex.resolve_target(None)
f_x = ex.logits().gather(1, target[:, None])[:, 0]
delta = f_x - ex.scores(torch.zeros_like(ex.inputs), target)
ig = ex.explain("integrated_gradients", steps=steps, reduce=None)
gap = (torch.from_numpy(ig.sum(("channel", "y", "x")).values) - delta).abs() / delta.abs()
print(f"steps = {steps}: worst gap {float(gap.max()):.1%} ->",
      "below 5 %, well done" if gap.max() < 0.05 else "not yet: try more steps")

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# Double `steps` until the check passes: 32 steps leave a 5.1 % gap on the worst image, 64
# steps 2.2 % (the gap roughly halves each time m doubles). The gap is largest for images
# whose score changes abruptly along the path; a black or blurred baseline changes the
# answer. Never report IG maps without checking completeness.
# </details>
#
# ## Exercise 5 — Explain a mistake
#
# The model was trained on images with two distractors; with four it often names the wrong
# shape. **Task:** on the cluttered images below, take a misclassified one and compare
# Grad-CAM for the *predicted* class with Grad-CAM for the *true* class. Which object did the
# network look at?

# %%
hard = xw.datasets.shapes(n=8, clutter=4, seed=8)
hard_images = torch.from_numpy(hard.image.values)
hard_ex = xw.Explainer(model, hard_images, preprocess=preprocess, classes=classes, progress=False)
hard_predicted = hard_ex.resolve_target(None).numpy()
wrong = np.flatnonzero(hard_predicted != hard.label.values)
print(f"{len(wrong)} of {len(hard_images)} misclassified: images {wrong.tolist()}")
image = int(wrong[0]) if len(wrong) else 0  # edit me too: the other misclassified images
explain_class = int(hard_predicted[image])  # edit me: try the true class, int(hard.label[image])

# %%
# check
assert 0 <= explain_class < len(classes)
cam = hard_ex.explain("gradcam", target=[explain_class] * len(hard_images))
fig, axes = plt.subplots(1, 3, figsize=(7, 2.6))
axes[0].imshow(hard_images[image].permute(1, 2, 0).numpy())
truth, said = classes[int(hard.label[image])], classes[int(hard_predicted[image])]
axes[0].set_title(f"true: {truth}, predicted: {said}", fontsize=8)
axes[1].imshow(cam.xai.overlay(hard_images, index=image))
axes[1].set_title(f"Grad-CAM for '{classes[explain_class]}'", fontsize=8)
axes[2].imshow(hard.mask[image] * 1.0 + hard.distractors[image] * 0.5, cmap="gray")
axes[2].set_title("target (white), distractors (grey)", fontsize=8)
for ax in axes:
    ax.axis("off")
plt.show()
share = float((cam[image] * hard.mask[image]).sum() / cam[image].sum())
print(f"share of this map on the target: {share:.0%}")

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# Look at every misclassified image (`image = int(wrong[k])`): two kinds of mistakes show up.
# For images 2 and 4 both maps sit on the target: the network looked at the right object and
# misread its shape (a circle taken for a square). For images 5 and 6 the map of the
# predicted class leaves the target for the distractors and the background (5 % of it on the
# target for image 5), while the map of the true class goes back to the target (42 %): the
# network answered a different question than the one the labels ask. Explanations are per
# class: always say which class a map explains.
# </details>
#
# ## Exercise 6 — Tune FEM's K against people
#
# FEM keeps the activations above μ + Kσ in every channel. **Task:** find the K in [0, 3]
# that maximises the mean PCC between FEM and the GFDM on these images. Changing K re-uses
# the cached activations, so a fine sweep is cheap.

# %%
K = 1.0  # edit me (or sweep: np.linspace(0, 3, 13))

# %%
# check
assert 0 <= K <= 10
score = float(metrics.pcc(ex.explain("fem", K=K), ds.gfdm).mean())
baseline = float(metrics.pcc(ex.explain("fem", K=1.0), ds.gfdm).mean())
print(f"K = {K:g}: mean PCC {score:.3f} (K = 1: {baseline:.3f})")

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# ```python
# Ks = np.linspace(0, 3, 13)
# pccs = [float(metrics.pcc(ex.explain("fem", K=k), ds.gfdm).mean()) for k in Ks]
# K = float(Ks[int(np.argmax(pccs))])
# ```
# The best K is about 1.75 here (mean PCC 0.85 against 0.81 at the paper's K = 1). The curve
# falls for large K (only isolated peaks survive) and for K = 0 (about half of every channel
# fires, background included). Tuning K on the
# images you then report on is overfitting: keep a held-out set.
# </details>
#
# ## Exercise 7 — Be the gaze
#
# The GFDM of every exercise so far came from a *simulated* observer. Now you are the
# observer: in the widget below, click where your eyes go on each image (one click = one
# fixation; *timed* shows each image for only 3 s), then press **Reveal**. **Task:** on
# at least two images, find the method whose map agrees best with you (PCC against your
# GFDM), and check whether you agree more with the methods or with the simulated observer.

# %%
look = xw.LookWidget(images[:4], classes=classes, model=model, preprocess=preprocess,
                     methods=("gradcam", "fem", "gradient"), gaze=ds.gfdm.values[:4])
# in a live notebook, click instead: these stand-in clicks (the target's centre) only
# make the check below run
for i in range(4):
    ys, xs = np.nonzero(ds.mask.values[i])
    look.click(i, ys.mean(), xs.mean())
display(look)

# %%
# check
scores = look.scores
looked = scores.clicks.values > 0
print(f"you looked at {int(looked.sum())} image(s)")
best = scores.pcc.isel(image=np.flatnonzero(looked)).mean("image").to_series()
print(best.round(2).to_string())
print("closest to you:", best.drop("observer").idxmax())

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# There is no single right answer: it is *your* gaze. People look at the object first and
# at its centre, so a compact, object-centred map (FEM, Grad-CAM) usually agrees with a
# student better than the gradient, whose mass is spread over edges. The simulated observer
# also looks at distractors and has a centre bias: compare its row with the methods'. Save
# your clicks (`look.save("me.nc")`), pool a class with `xw.LookWidget.merge(files)` and
# look at `look.class_view(files)`: does the class agree more with the methods than each
# student does?
# </details>
#
# ## Exercise 8 — The sanity quiz
#
# One map of each pair comes from the trained network, the other from a copy whose weights
# were all re-initialised (cascading randomisation, the test of exercise 3). **Task:** try
# the quiz with Grad-CAM, then with `method="guided_backprop"`: with which method is it
# harder to spot the broken map, and what does the SSIM in the explanation say?

# %%
quiz = xw.SanityQuiz(model, images[:4], preprocess=preprocess, method="gradcam", seed=0)
display(quiz)

# %%
# check
for i in range(len(quiz)):
    quiz.answer(i, "left")  # in a live notebook, press the buttons instead
right, asked = quiz.score
print(f"score {right}/{asked};", "SSIM per image:", np.round(quiz.ssim, 2))
print(quiz.explanation(0))

# %% [markdown]
# <details><summary><b>Solution</b> (click)</summary>
#
# Grad-CAM's broken maps are blotches that ignore the shapes (low SSIM): easy. Guided
# backprop's broken maps still draw the image's edges, so both maps look alike (a much higher
# SSIM): guessing is all you can do, the same failure exercise 3 measured. Any widget makes
# a handout without a kernel for the class: `quiz.export_html("quiz.html")`.
# </details>
#
# ## Going further
#
# * Open `xw.ExplainerWidget(model, images, preprocess=preprocess, classes=classes)` and
#   repeat exercise 2 with the ε slider.
# * Redo exercise 1 with `shapes-resnet` and its residual blocks.
# * Add your own method: a class with `name`, `params` and `attribute()` in
#   `xaiwidgets/families/` gets sliders in every widget for free.
