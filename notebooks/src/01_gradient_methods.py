# Source of 01_gradient_methods.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Gradient methods, CAM and occlusion
#
# The methods in this notebook all ask one question in different ways: *if this pixel (or
# this region, or this feature map) changed, how would the class score change?* We run each
# on the same four images and the same trained network, then put them side by side.
#
# Two conventions used throughout (see the library's SPEC):
#
# * we explain the **logit** f_c of the target class c (the score before the softmax);
#   the softmax couples all classes and saturates, which makes gradients vanish;
# * pixel-space attributions have three colour channels. For gradient-type maps we show the
#   largest absolute value over R, G, B (`reduce="max_abs"`, the survey's "RGB rule"); signed
#   methods (Integrated Gradients, occlusion) are summed over channels and drawn with a
#   **diverging** colormap centred at 0: red pushes towards the class, blue against it.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import xaiwidgets as xw
from xaiwidgets import metrics

ds = xw.datasets.shapes(n=4, seed=1)
model, preprocess, classes = xw.models.load("shapes-vgg")
images = torch.from_numpy(ds.image.values)
ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes, progress=False)
pred = ex.predict(top=1)
names = [str(c) for c in pred.class_name[:, 0].values]
print("predicted:", names, " true:", [classes[int(t)] for t in ds.label])


def show(maps: dict, n: int = 4, size: float = 2.0) -> None:
    """One row per map (name -> DataArray), one column per image.

    Unsigned maps are drawn with inferno over a grey copy of the image; signed maps
    (attrs["signed"] == 1) with RdBu_r, symmetric around 0 so that white means 0. The
    colour scale stops at the 99.5th percentile of |map|, so a few extreme pixels do not
    leave everything else dark.
    """
    rows = len(maps) + 1
    fig, axes = plt.subplots(rows, n, figsize=(size * n, size * rows), squeeze=False)
    for i in range(n):
        picture = images[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(picture)
        axes[0, i].set_title(names[i])
        for row, (name, m) in enumerate(maps.items(), 1):
            ax = axes[row, i]
            values = np.asarray(m[i])
            limit = np.percentile(np.abs(values), 99.5) or 1.0
            if m.attrs.get("signed", bool((values < 0).any())):
                ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                ax.imshow(picture.mean(-1), cmap="gray")
                ax.imshow(values, cmap="inferno", alpha=0.75, vmin=0, vmax=limit)
            axes[row, 0].set_ylabel(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    plt.tight_layout()
    plt.show()


maps, seconds = {}, {}


def timed(method: str, label: str | None = None, **params):
    """``ex.explain(method, **params)``, remembering the map and its run time for the end."""
    start = time.perf_counter()
    result = ex.explain(method, **params)
    seconds[label or method] = time.perf_counter() - start
    maps[label or method] = result
    return result


# %% [markdown]
# ## Gradient (saliency)
#
# $$ R = \frac{\partial f_c}{\partial x} $$
#
# The gradient is the best *linear* approximation of the network around x. What to look for:
# the object's edges are bright, and so is a lot of speckle on the background. Pitfall: the
# gradient says how the score would change, not what produced it: a pixel that fully
# saturates a ReLU unit gets gradient 0 even if it matters.
#
# `reduce=None` keeps the raw signed gradient per channel; the default reduction is what
# we usually plot.

# %%
raw = ex.explain("gradient", reduce=None)
grad = timed("gradient")
print(raw.dims, "->", grad.dims, "| reduce used:", grad.attrs["reduce"])
fig, axes = plt.subplots(1, 4, figsize=(9, 2.4))
limit = float(abs(raw[0]).max())
for c, ax in enumerate(axes[:3]):
    ax.imshow(raw[0, c], cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"∂f/∂x, channel {'RGB'[c]}")
axes[3].imshow(grad[0], cmap="inferno")
axes[3].set_title("max |·| over RGB")
for ax in axes:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# ## Guided backpropagation and DeconvNet
#
# Both change only how the gradient goes *backwards through a ReLU* (every other layer is
# differentiated normally). With g the gradient arriving from above and x_in the ReLU's input:
#
# | method | ReLU backward passes |
# |---|---|
# | gradient | g · [x_in > 0] |
# | DeconvNet (Zeiler & Fergus) | g · [g > 0] |
# | guided backprop (Springenberg et al.) | g · [x_in > 0] · [g > 0] |
#
# Guided backprop gives crisp, image-like maps. **Pitfall:** they are crisp partly because
# they hardly depend on the class. Below, image 0 is explained for each of the four classes
# in turn; the PCC says how alike the maps of two classes are (averaged over the pairs).
# Grad-CAM follows the evidence for each class (for "triangle" it moves to the small
# triangle). Guided backprop draws the same edges whatever the class (and, Adebayo et al.
# showed, whatever the weights: see `04_evaluation`); so, here, does the gradient once its
# sign is dropped by the RGB rule.
# Gradient maps are dominated by a few pixels, so, as usual, we clip the colour scale at the
# 99.5th percentile.

# %%
gbp = timed("guided_backprop")
deconv = timed("deconvnet")
show({"gradient": grad, "guided backprop": gbp, "DeconvNet": deconv})

# %%
first = xw.Explainer(model, images[:1], preprocess=preprocess, classes=classes, progress=False)
per_class = {name: [first.explain(name, target=c)[0] for c in range(len(classes))]
             for name in ("gradient", "guided_backprop", "gradcam")}
fig, axes = plt.subplots(3, len(classes), figsize=(2 * len(classes), 6.2))
for r, (name, maps_c) in enumerate(per_class.items()):
    for c, m in enumerate(maps_c):
        axes[r, c].imshow(m, cmap="inferno", vmax=np.percentile(m, 99.5))
        axes[0, c].set_title(f"target: {classes[c]}")
        axes[r, c].set_xticks([])
        axes[r, c].set_yticks([])
    pairs = [float(metrics.pcc(a, b)) for k, a in enumerate(maps_c) for b in maps_c[k + 1:]]
    axes[r, 0].set_ylabel(f"{name}\nmean PCC {np.mean(pairs):.2f}")
plt.tight_layout()

# %% [markdown]
# ## Integrated Gradients
#
# The gradient at x alone misses saturation. Integrated Gradients (Sundararajan et al., 2017)
# averages gradients along the straight path from a baseline x' (here 0 in the model's input
# space, i.e. the mean colour after normalisation) to x, and multiplies by x − x':
#
# $$ \mathrm{IG}_i = (x_i - x'_i)\,\frac{1}{m}\sum_{k=1}^{m}
#    \frac{\partial f_c}{\partial x_i}\Big(x' + \tfrac{k}{m}(x - x')\Big) $$
#
# **Completeness**: the attributions add up to f_c(x) − f_c(x'), up to the error of the
# m-step Riemann sum. Checking it is the standard way to choose `steps`: the gap should be
# a small fraction of the score difference.

# %%
target = ex.resolve_target(None)
baseline = torch.zeros_like(ex.inputs)
delta = ex.logits().gather(1, target[:, None])[:, 0] - ex.scores(baseline, target)
gaps = {}
for steps in (4, 16, 64):
    ig = ex.explain("integrated_gradients", steps=steps, reduce=None)
    total = torch.from_numpy(ig.sum(("channel", "y", "x")).values)
    gaps[steps] = ((total - delta).abs() / delta.abs()).numpy()
print("f(x) − f(x') per image:", delta.numpy().round(2))
plt.figure(figsize=(5, 3))
plt.loglog(list(gaps), [g.mean() for g in gaps.values()], "o-")
plt.xticks(list(gaps), [str(m) for m in gaps], minor=False)
plt.minorticks_off()
plt.xlabel("steps m")
plt.ylabel("relative gap")
plt.title("|Σ IG − (f(x) − f(x'))| / |f(x) − f(x')|")
plt.grid(True, which="both", alpha=0.3)
plt.show()

# %%
ig = timed("integrated_gradients", "IG", steps=16)
show({"IG (signed, Σ over RGB)": ig, "|IG| (Σ over RGB)": abs(ig)})

# %% [markdown]
# The signed map tells more than its absolute value: blue pixels argue *against* the class.
# Pitfall: the baseline is a choice. A black baseline cannot attribute anything to black
# pixels (x − x' = 0 there); try `baseline="black"` or a blurred image.
#
# ## SmoothGrad
#
# SmoothGrad (Smilkov et al., 2017) averages the gradient over n noisy copies of the image,
# which cancels the speckle:
#
# $$ R = \frac{1}{n}\sum_{j=1}^{n} \frac{\partial f_c}{\partial x}(x + \varepsilon_j),
#    \qquad \varepsilon_j \sim \mathcal{N}\big(0, (\sigma\,(x_{max} - x_{min}))^2\big) $$
#
# Two knobs: the noise level σ (a fraction of the input's range; the paper suggests 10–20 %)
# and the number of samples n. Too little noise: the gradient's speckle; too much: a blur
# that forgets the image.

# %%
one = xw.Explainer(model, images[:1], preprocess=preprocess, classes=classes, progress=False)
sigmas, counts = (0.0, 0.05, 0.15, 0.4), (4, 16)
fig, axes = plt.subplots(len(counts), len(sigmas), figsize=(2.2 * len(sigmas), 4.6))
for r, n in enumerate(counts):
    for c, sigma in enumerate(sigmas):
        m = one.explain("smoothgrad", n=n, sigma=sigma)
        axes[r, c].imshow(m[0], cmap="inferno")
        axes[r, c].set_title(f"σ={sigma}, n={n}", fontsize=9)
        axes[r, c].axis("off")
plt.tight_layout()

# %%
show({"gradient": grad, "SmoothGrad σ=0.15, n=16": timed("smoothgrad", n=16, sigma=0.15)})

# %% [markdown]
# ## Grad-CAM and Guided Grad-CAM
#
# Grad-CAM weights each channel of a convolutional layer by its average gradient:
#
# $$ \mathrm{CAM} = \mathrm{ReLU}\Big(\sum_k \alpha_k A_k\Big),\quad
#    \alpha_k = \mathrm{mean}_{u,v}\,\frac{\partial f_c}{\partial A_k(u,v)} $$
#
# It is class-discriminative (unlike guided backprop) but only as sharp as the layer. The
# layer matters: deep layers are coarse and semantic, shallow ones sharp and edge-like.
# **Guided Grad-CAM** multiplies guided backprop by the upsampled CAM to get both.

# %%
blocks = ex.block_layers()  # the output of every conv block, shallow → deep
print("conv blocks:", blocks, "\ndefault layer:", ex.default_layer())
picked = [blocks[len(blocks) // 2 - 1], blocks[-3], ex.default_layer()]  # three depths
sides = {name: act.shape[-1] for name, act in ex.activations(picked).items()}
cams = {f"{name} ({sides[name]}²)": ex.explain("gradcam", layer=name) for name in picked[:-1]}
default_name = f"{picked[-1]} ({sides[picked[-1]]}²), default"
show(cams | {default_name: timed("gradcam"), "Guided Grad-CAM": timed("guided_gradcam")})

# %% [markdown]
# ## Occlusion
#
# A perturbation method, not a gradient one (Zeiler & Fergus, 2014): slide a grey square over
# the image and record how much the score drops. Each pixel gets the average drop of the
# windows that covered it. It needs one forward pass per window position, so it is slow on
# big images, and the window size sets the resolution: a window much smaller than the object
# hides too little to change the score, a large one blurs the map. Signed: a negative value
# means hiding that region *raised* the score.

# %%
occ = timed("occlusion", window=24, stride=12)
show({"occlusion 24 px": occ, "occlusion 48 px": ex.explain("occlusion", window=48, stride=24)})

# %% [markdown]
# ## Side by side, and what each costs
#
# Every map computed above with its default or chosen parameters, and the wall-clock time it
# took for the four images on this machine. Gradient, guided backprop, DeconvNet and
# Grad-CAM cost one backward pass; IG and SmoothGrad one per step or sample; occlusion one
# forward pass per window position.

# %%
show(maps, size=1.5)
plt.figure(figsize=(6, 2.6))
plt.barh(list(seconds), list(seconds.values()))
plt.xscale("log")
plt.xlabel("seconds for 4 images")
plt.gca().invert_yaxis()
plt.tight_layout()

# %% [markdown]
# **Which is right?** None of them is "the" explanation; they answer different questions
# (local sensitivity, path attribution, region importance). `04_evaluation` compares them
# with human fixations and with perturbation tests.
#
# ## A note on colormaps
#
# Most papers draw heatmaps with **jet**. Jet is not perceptually uniform: its bright cyan
# and yellow bands create edges that are not in the data, and it does not print in grey.
# Compare the same Grad-CAM map:

# %%
fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
for ax, cmap in zip(axes, ("jet", "inferno", "viridis"), strict=True):
    ax.imshow(maps["gradcam"][0], cmap=cmap)
    ax.set_title(cmap)
    ax.axis("off")
plt.tight_layout()
