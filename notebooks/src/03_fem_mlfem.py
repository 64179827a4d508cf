# Source of 03_fem_mlfem.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # FEM and multi-layer FEM
#
# The **feature explanation method** (FEM; Fuad, Martin, Giot, Bourqui, Benois-Pineau, Zemmari,
# 2020) reads the activations of a convolutional layer and keeps the strongest features.
# It needs one forward pass, no gradient and no class: it explains what the network *saw*,
# whatever it then decided. **MLFEM** (Bourroux et al., 2022) computes FEM at every block of
# a ResNet and fuses the layers, adding the fine detail of shallow layers to the semantics of
# deep ones.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import xarray as xr
from IPython.display import display

import xaiwidgets as xw

ds = xw.datasets.shapes(n=4, seed=3)
model, preprocess, classes = xw.models.load("shapes-resnet")
images = torch.from_numpy(ds.image.values)
ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes, progress=False)
layer = ex.default_layer()
print("blocks:", ex.block_layers(), "| default layer:", layer)

# %% [markdown]
# ## FEM, one channel at a time
#
# Take the layer's activation F (after its ReLU), D channels of size h × w. For each
# channel k:
#
# 1. estimate its mean μ_k and standard deviation σ_k over the h × w positions;
# 2. keep the positions where the feature is **unusually strong**: B_k = [F_k ≥ μ_k + K σ_k]
#    (the *K-sigma rule*: under a Gaussian assumption, K = 1 keeps about the top 16 %);
# 3. weight the binary map by the channel's importance μ_k.
#
# $$ \mathrm{FEM} = \mathrm{normalise}\Big(\mathrm{upsample}\big(\textstyle\sum_k \mu_k B_k\big)\Big) $$
#
# Here is step 1–2 for the most active channel of the first image:

# %%
K = 1.0
act = ex.activations([layer])[layer]  # (N, D, h, w), cached: no new forward pass
mu = act.mean(dim=(2, 3))
sigma = act.std(dim=(2, 3), correction=0)  # population std, as in docs/methods.md
k = int(mu[0].argmax())
channel = act[0, k].numpy()
threshold = float(mu[0, k] + K * sigma[0, k])

fig, axes = plt.subplots(1, 4, figsize=(11, 2.7))
axes[0].imshow(images[0].permute(1, 2, 0).numpy())
axes[0].set_title("image")
im = axes[1].imshow(channel, cmap="viridis")
axes[1].set_title(f"channel {k}: F_k ({channel.shape[0]}×{channel.shape[1]})")
plt.colorbar(im, ax=axes[1], fraction=0.046)
axes[2].hist(channel.ravel(), bins=30, color="grey")
axes[2].axvline(float(mu[0, k]), color="C0", label="μ_k")
axes[2].axvline(threshold, color="C3", label="μ_k + Kσ_k")
axes[2].legend(fontsize=8)
axes[2].set_title("values of F_k")
axes[3].imshow(channel >= threshold, cmap="gray")
axes[3].set_title("B_k = [F_k ≥ μ_k + Kσ_k]")
for ax in (axes[0], axes[1], axes[3]):
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# Summing μ_k B_k over all channels gives the FEM map. Ten lines of torch reproduce the
# library's result, which is a good way to be sure what it computes:

# %%
binary = (act >= (mu + K * sigma)[..., None, None]).float()
by_hand = (mu[..., None, None] * binary).sum(1)
by_hand = torch.nn.functional.interpolate(by_hand[:, None], size=ex.size, mode="bilinear",
                                          align_corners=False)[:, 0]
low = by_hand.amin(dim=(1, 2), keepdim=True)
high = by_hand.amax(dim=(1, 2), keepdim=True)
by_hand = (by_hand - low) / (high - low)
fem = ex.explain("fem", layer=layer, K=K)
print("max |library − by hand| =", float(abs(fem.values - by_hand.numpy()).max()))

# %% [markdown]
# **K** sets how selective FEM is: K = 0 keeps everything above average, large K only the
# peaks. Changing K re-uses the cached activations (no forward pass).

# %%
Ks = (0.0, 1.0, 2.0, 3.0)
fig, axes = plt.subplots(1, len(Ks) + 1, figsize=(2.2 * (len(Ks) + 1), 2.4))
axes[0].imshow(images[0].permute(1, 2, 0).numpy())
for ax, k_value in zip(axes[1:], Ks, strict=True):
    ax.imshow(ex.explain("fem", layer=layer, K=k_value)[0], cmap="inferno")
    ax.set_title(f"K = {k_value:g}")
for ax in axes:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# ## The FEM stack: one map per block
#
# `ex.fem_stack()` computes FEM at every residual block (shallowest first), each upsampled to
# the image and normalised: a cube with dims (image, layer, y, x). Shallow blocks respond to
# edges and texture, deep blocks to whole objects. xarray's faceting draws the cube as small
# multiples in one line.

# %%
stack = ex.fem_stack(K=1.0)
print(stack.dims, stack.sizes)
grid = stack.plot(row="image", col="layer", cmap="inferno", size=1.5, add_colorbar=False,
                  yincrease=False)  # image convention: row 0 at the top
for ax in grid.axs.flat:
    ax.set_aspect("equal")
    ax.set_axis_off()
plt.show()

# %% [markdown]
# ## Fusing the layers (MLFEM)
#
# MLFEM fuses the stack recursively from shallow to deep, S ← op(S, S_l), then normalises.
# The operators, elementwise:
#
# | operator | op(a, b) | effect |
# |---|---|---|
# | `max` | max(a, b) | any layer that fires wins; keeps shallow noise too |
# | `add` | α a + (1 − α) b | geometric weights: the last layer gets 1 − α, layer l gets α^(L−l)(1 − α), the first α^(L−1) |
# | `top` | add(a, b′), b′ = b where b > mean(b), else 0 | adds only the strong part of each layer |
# | `fem` | b | the deepest layer alone (= FEM) |
# | `net` | a small CNN trained on the stack to predict the GFDM | learned fusion |
#
# Fusing never runs the model again: it only combines the cached stack.

# %%
operators = ("max", "add", "top", "fem")
fused = {op: xw.fuse(stack, operator=op) for op in operators}
fig, axes = plt.subplots(len(images), len(operators) + 2, figsize=(13, 8.6))
for i in range(len(images)):
    axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
    axes[0, 0].set_title("image")
    for j, op in enumerate(operators, 1):
        axes[i, j].imshow(fused[op][i], cmap="inferno")
        axes[0, j].set_title(op)
    axes[i, -1].imshow(ds.gfdm[i], cmap="inferno")
axes[0, -1].set_title("GFDM (people)")
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# The `add` weights, checked on a probe stack: pixel (0, l) fires (value 1) in layer l only,
# so the fused value there is that layer's weight w_l. Pixel (1, 0) fires in every layer and
# gets Σ w_l = 1, so the final min-max normalisation leaves the values unchanged.

# %%
L = stack.sizes["layer"]
alpha = 0.5
expected = np.array([alpha ** (L - 1)] + [alpha ** (L - k) * (1 - alpha) for k in range(2, L + 1)])
probe = xr.zeros_like(stack.isel(image=[0]))
for k in range(L):
    probe[0, k, 0, k] = 1.0
probe[0, :, 1, 0] = 1.0
measured = xw.fuse(probe, operator="add", alpha=alpha)[0, 0, :L].values
print("expected w_l, shallow → deep:", expected.round(4), " sum =", expected.sum())
print("measured                    :", measured.round(4))

# %% [markdown]
# ## The NET operator
#
# Instead of a fixed rule, NET *learns* to fuse: the L maps enter a small CNN as L channels
# (three conv + ReLU + pooling stages, then a weighted sum), trained to reproduce the GFDM
# on training images. The package ships one trained for `shapes-resnet` on the shapes data.

# %%
net_map = xw.fuse(stack, operator="net")
fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.6))
for i in range(len(images)):
    axes[0, i].imshow(net_map[i], cmap="inferno")
    axes[1, i].imshow(ds.gfdm[i], cmap="inferno")
axes[0, 0].set_title("NET", loc="left")
axes[1, 0].set_title("GFDM", loc="left")
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# The same fusion is available as a method, `mlfem`, with the layers, K, operator and α as
# parameters (and in the `ExplainerWidget`):

# %%
mlfem = ex.explain("mlfem", operator="add", alpha=0.5)
print("mlfem == fuse(fem_stack):", np.allclose(mlfem.values, fused["add"].values, atol=1e-5))

# %% [markdown]
# ## Explore the stack
#
# `FEMStackWidget` shows the per-layer maps next to the fused one, with K, the operator, α
# and the normalisation as controls. Every change re-uses the cached activations.

# %%
w = xw.FEMStackWidget(model, images, preprocess=preprocess, classes=classes)
w.controls["operator"].value = "top"
display(w)
