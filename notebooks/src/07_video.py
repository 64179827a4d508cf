# Source of 07_video.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Explaining video: FEM on clips
#
# A video classifier sees a **clip**: T frames stacked into a tensor (N, C, T, H, W). A 3D
# CNN convolves over time as well as space, so its activations are *volumes* (D channels of
# t × h × w), and an explanation is a volume too: one map per frame, dims (image, t, y, x).
# Every map-based method of the package runs on clips (FEM, MLFEM, Grad-CAM, gradient,
# Integrated Gradients, DeepLIFT, occlusion, ...); this notebook takes FEM apart on a clip,
# looks at the per-layer stack over time, and compares the maps with simulated gaze.
#
# The data: `xw.datasets.moving_shapes`, clips of a large shape moving over a textured
# background among smaller drifting distractors. The **class is the direction of motion**
# (right, left, up, down). The model: `shapes-video`, a small `r3d`-style 3D ResNet that
# ships with the package (stem, `layer1`–`layer3`, global max pool).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

import xaiwidgets as xw

model, preprocess, classes = xw.models.load("shapes-video")
# the shipped model was trained on seeds >= 10000: these clips are held out
ds = xw.datasets.moving_shapes(n=8, frames=8, size=64, seed=7)
clips = torch.from_numpy(ds.image.values)
ex = xw.Explainer(model, clips, preprocess=preprocess, classes=classes, progress=False)
print("clips:", tuple(clips.shape), "(N, C, T, H, W) | classes:", classes)
print("labels:   ", [classes[i] for i in ds.label.values])
print("predicted:", list(ex.predict(top=1).class_name.values[:, 0]))

# %% [markdown]
# ## Clips as frame strips
#
# A clip is easiest to read as a strip of frames, left to right. The white dots are the
# gaze of the simulated observers at each frame (one sample per observer per frame): they
# mostly pursue the moving target, sometimes jump to a distractor and come back.

# %%
def strip(rows, titles, cmap="inferno", points=None):
    """Draw rows of frames, one row per entry of ``rows``: RGB frames (T, H, W, 3) or
    maps in [0, 1] (T, H, W); ``points`` optionally marks nonzero pixels per frame."""
    T = len(rows[0])
    fig, axes = plt.subplots(len(rows), T, figsize=(1.3 * T, 1.35 * len(rows)), squeeze=False)
    for r, (frames, title) in enumerate(zip(rows, titles, strict=True)):
        for t in range(T):
            ax = axes[r, t]
            ax.imshow(frames[t], cmap=cmap, vmin=0, vmax=1)
            if points is not None and points[r] is not None:
                ys, xs = np.nonzero(points[r][t])
                ax.scatter(xs, ys, s=6, c="white", edgecolors="k", linewidths=0.3)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=8)
        axes[r, 0].set_ylabel(title, fontsize=8)
    plt.tight_layout()
    plt.show()


def frames(i):
    """Clip i as (T, H, W, 3) for imshow."""
    return ds.image[i].transpose("t", "y", "x", "channel").values


shown = [0, 1, 2, 3]
strip([frames(i) for i in shown], [classes[int(ds.label[i])] for i in shown],
      points=[ds.fixations[i].values for i in shown])

# %% [markdown]
# ## One frame cannot tell the class
#
# The generator draws the scene (shapes, colours, positions, texture) independently of the
# label, and `labels=` redraws the *same* scene with another motion. Below, one scene in all
# four classes: **frame 0 is identical** in every row, and any later frame shows the target
# somewhere uniformly random, whatever the class. Only the change between frames carries
# the class, so a classifier must look at time, and so must its explanation.

# %%
same_scene = [xw.datasets.moving_shapes(n=1, frames=8, size=64, seed=7, labels=[motion])
              for motion in classes]
scene_clips = torch.cat([torch.from_numpy(d.image.values) for d in same_scene])
print("frame 0 identical in the four clips:",
      all(torch.equal(scene_clips[0, :, 0], c[:, 0]) for c in scene_clips))
strip([d.image[0].transpose("t", "y", "x", "channel").values for d in same_scene], classes)

# the model on the four clips, and on a "clip" that repeats frame 0 (no motion at all)
frozen = scene_clips[:1, :, :1].expand(-1, -1, 8, -1, -1)
with torch.no_grad():
    p_moving = torch.softmax(model(preprocess(scene_clips)), 1)
    p_frozen = torch.softmax(model(preprocess(frozen)), 1)
table = pd.DataFrame(p_moving.numpy(), index=[f"moving {c}" for c in classes], columns=classes)
table.loc["frame 0 repeated"] = p_frozen[0].numpy()
display(table.round(2))

# %% [markdown]
# ## FEM on a clip, step by step
#
# FEM (Fuad et al., 2020) reads the activation F of one convolutional layer. On a clip, F has
# D channels, each a **volume** of t × h × w values. For each channel k:
#
# 1. μ_k and σ_k are the mean and (population) standard deviation over the whole (t, h, w)
#    volume, not frame by frame: a feature that is strong in a few frames only stands out;
# 2. the binary volume B_k = [F_k ≥ μ_k + K σ_k] keeps its unusually strong voxels;
# 3. FEM = Σ_k μ_k B_k, a (t, h, w) volume, upsampled **trilinearly** (in t, y and x) to the
#    clip's (T, H, W) and min-max normalised over the whole volume.
#
# The default layer is the last block, `layer3.0`: its volume is 4 frames of 8 × 8 (the
# stem and `layer2` halve space, `layer3` halves time and space).

# %%
K = 1.0
layer = ex.default_layer()
act = ex.activations([layer])[layer]  # (N, D, t, h, w), cached: no new forward pass
print(layer, "activation:", tuple(act.shape))
mu = act.mean(dim=(2, 3, 4))  # (N, D): over the whole volume
sigma = act.std(dim=(2, 3, 4), correction=0)
i = 0
k = int(mu[i].argmax())
channel = act[i, k]  # (t, h, w)
threshold = float(mu[i, k] + K * sigma[i, k])
print(f"clip {i}, channel {k}: μ = {float(mu[i, k]):.3f}, σ = {float(sigma[i, k]):.3f}, "
      f"μ + Kσ = {threshold:.3f}")
top = float(channel.max())
strip([(channel / top).numpy(), (channel >= threshold).float().numpy()],
      [f"F_{k} / max", f"B_{k}"], cmap="viridis")

# %% [markdown]
# The sum over channels and the trilinear upsampling, by hand, against the library:

# %%
binary = (act >= (mu + K * sigma)[..., None, None, None]).float()
volume = (mu[..., None, None, None] * binary).sum(1)  # (N, t, h, w)
by_hand = torch.nn.functional.interpolate(volume[:, None], size=ex.size, mode="trilinear",
                                          align_corners=False)[:, 0]
low = by_hand.flatten(1).amin(1)[:, None, None, None]
high = by_hand.flatten(1).amax(1)[:, None, None, None]
by_hand = (by_hand - low) / (high - low)
fem = ex.explain("fem", layer=layer, K=K)
print("volume before upsampling:", tuple(volume.shape), "→ after:", tuple(by_hand.shape))
print("FEM dims:", fem.dims)
print("max |library − by hand| =", float(abs(fem.values - by_hand.numpy()).max()))

# %% [markdown]
# FEM follows the target through the clip (top: clip, middle: FEM, bottom: the target's
# mask). Since the normalisation spans the whole volume, a frame where the layer sees
# little stays dark.

# %%
strip([frames(i), fem[i].values, ds.mask[i].values.astype(float)],
      ["clip", "FEM", "target mask"])

# %% [markdown]
# ## The per-layer stack over time, and MLFEM
#
# `ex.fem_stack()` computes FEM at every block, shallow to deep, each upsampled to the clip
# and normalised over its volume: dims (image, layer, t, y, x). For one clip that is a
# layer × frame grid. `layer1.0` keeps the full frame rate and responds to edges and
# texture everywhere; `layer3.0` fires on the moving objects. The first and last frames
# stand out: the 3 × 3 × 3 convolutions pad time with zeros, so at the clip's ends the
# network sees a change from or to a black frame. **MLFEM** fuses the layers (here
# the `top` operator: add each layer's above-average part), on clips exactly as on images
# but with means over the (t, y, x) volume.

# %%
stack = ex.fem_stack(K=K)
print(stack.dims, dict(stack.sizes))
layers = list(stack.layer.values)
strip([stack.isel(image=i).sel(layer=name).values for name in layers], layers)
mlfem = xw.fuse(stack, operator="top", alpha=0.5)
print("mlfem == fuse(fem_stack):",
      np.allclose(ex.explain("mlfem", operator="top", alpha=0.5).values, mlfem.values, atol=1e-5))
strip([mlfem[i].values, ds.gfdm[i].values], ["MLFEM (top)", "GFDM"])

# %% [markdown]
# ## Against the gaze
#
# Each clip comes with a gaze fixation density map per frame (`ds.gfdm`, dims (image, t, y,
# x)): the observers' samples blurred with σ = size/16, the images' convention. A metric on
# a clip is computed **frame by frame and averaged over t** (frames without a fixation are
# left out), so a clip scores like the average of its frames. `xw.evaluate` does it for a
# dataset; PCC is the correlation with the GFDM, SIM the histogram intersection.
#
# DeepLIFT runs on clips too; its attributions sum to f(x) − f(x') to float precision,
# as the `delta_error` in its attrs shows.

# %%
methods = ["fem", "gradcam", "gradient", "integrated_gradients", "deeplift", "mlfem"]
scores = xw.evaluate(model, ds, methods, metrics=("pcc", "sim"), preprocess=preprocess,
                     params={"integrated_gradients": {"steps": 8}}, progress=False)
summary = scores[["pcc", "sim"]].mean("image").to_dataframe()[["pcc", "sim"]]
display(summary.round(3).sort_values("pcc", ascending=False))
print("DeepLIFT delta_error:", np.round(ex.explain("deeplift").attrs["delta_error"], 8))

# %% [markdown]
# The maps behind the table, for one clip (eight clips make a noisy table: the ordering
# of close methods can change with the seed):

# %%
maps = {m: ex.explain(m).isel(image=i) for m in ("fem", "gradcam", "gradient")}
rows = [frames(i)] + [abs(v.values) / abs(v.values).max() for v in maps.values()]
strip(rows + [ds.gfdm[i].values], ["clip", *maps, "GFDM"])

# %% [markdown]
# ## Explore a clip
#
# The `ExplainerWidget` takes clips as they are: a frame slider (with a play button) moves
# through time (it only redraws: the whole volume was computed once), and with `gaze=` the
# live scores compare each map with the GFDM.

# %%
w = xw.ExplainerWidget(model, clips[:4], preprocess=preprocess, classes=classes, method="fem",
                       gaze=ds.gfdm[:4])
# compact: the picture fits beside the controls (Play is at their top), so the Play button
# and the picture share one screen, even on a laptop with JupyterLab's file browser open
w.figure.layout.width = 430
w.figure.layout.height = 290
w.figure.update_annotations(font_size=10)  # the panels' titles, smaller to fit
display(w)
