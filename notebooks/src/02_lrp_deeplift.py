# Source of 02_lrp_deeplift.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Relevance propagation, DeepLIFT, and two black-box methods
#
# Gradients say how the score would *change*. The methods here instead try to **distribute
# the score itself** over the pixels: each pixel gets a share, and the shares add up to
# (roughly) the score. Layer-wise Relevance Propagation (LRP) and DeepLIFT do it with one
# modified backward pass; LIME and meaningful perturbation treat the network as a black box
# and probe it with masked inputs.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from skimage.segmentation import mark_boundaries, slic

import xaiwidgets as xw

ds = xw.datasets.shapes(n=4, seed=2)
model, preprocess, classes = xw.models.load("shapes-vgg")
images = torch.from_numpy(ds.image.values)
ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes, progress=False)
target = ex.resolve_target(None)
logit = ex.logits().gather(1, target[:, None])[:, 0]
names = [classes[int(t)] for t in target]
print("predicted:", names)


def signed_row(maps: dict, image: int = 0, size: float = 2.1) -> None:
    """Maps of one image side by side, RdBu_r centred at 0 (red: for the class), the
    colour scale clipped at the 99.5th percentile of |map|."""
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(size * (len(maps) + 1), size + 0.3))
    axes[0].imshow(images[image].permute(1, 2, 0).numpy())
    axes[0].set_title(names[image])
    for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
        values = np.asarray(m[image])
        limit = np.percentile(np.abs(values), 99.5) or 1.0  # a few pixels must not set the scale
        ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    plt.tight_layout()
    plt.show()


# %% [markdown]
# ## LRP: rules
#
# LRP (Bach et al., 2015) starts with the target logit as the relevance of the output and
# walks back layer by layer. For a layer z_j = Σ_i a_i w_ij + b_j, each input i receives a
# share of R_j proportional to its contribution a_i w_ij. The rules differ in how they treat
# small or negative contributions:
#
# | rule | relevance of input i | use |
# |---|---|---|
# | LRP-0 | Σ_j a_i w_ij / z_j · R_j | = gradient × input; noisy |
# | LRP-ε | Σ_j a_i w_ij / (z_j + ε·sign z_j) · R_j | ε absorbs weak, contradictory contributions: denoises |
# | LRP-γ | w → w + γ w⁺ | favours positive contributions: more stable |
# | LRP-αβ | Σ_j (α (a_i w_ij)⁺/z_j⁺ − β (a_i w_ij)⁻/z_j⁻) R_j, α − β = 1 | separates evidence for/against |
# | flat / z^B | first layer: spread uniformly / use the pixel range | the input is not a ReLU output |
#
# A **composite** assigns rules to layers, e.g. ε on dense layers, α1β0 on convolutions and
# flat on the first layer (`epsilon_plus_flat`, a common recommendation of Montavon et al.).
# BatchNorm is first merged into the preceding convolution (canonization).

# %%
composites = ("zero", "epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box",
              "alpha_beta")
lrp = {c: ex.explain("lrp", composite=c) for c in composites}
for image in (0, 1):
    signed_row(lrp, image)

# %% [markdown]
# ## Conservation
#
# LRP-0 without biases conserves relevance exactly: the pixel relevances add up to the logit.
# Every bias (including the shifts of the merged BatchNorms) keeps a share for itself, ε
# absorbs more as it grows, and α/β does not conserve either (α − β = 1 balances only the
# neurons with both positive and negative inputs). The ratio Σ R / f_c(x) shows how much of
# the score reached the pixels; in this network with biases, often less than half:

# %%
sums = {c: lrp[c].sum(("y", "x")).values for c in composites}
ratios = np.array([sums[c] / logit.numpy() for c in composites])
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.axhline(1, color="k", lw=0.8)
for i in range(len(images)):
    ax.plot(composites, ratios[:, i], "o", label=f"image {i}")
ax.set_ylabel("Σ R / f_c(x)")
ax.tick_params(axis="x", rotation=30)
ax.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# ## The ε denoising effect
#
# With ε → 0, LRP-ε is LRP-0, i.e. gradient × input, and looks as noisy. Raising ε lets only
# the strong, consistent contributions through. Too large and almost everything is absorbed:
# the map fades and conservation is lost. We sweep ε over eleven orders of magnitude and
# measure how much positive relevance falls on the target object (`ds.mask`).

# %%
epsilons = [1e-9, 1e-6, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
sweep = {eps: ex.explain("lrp", composite="epsilon", epsilon=eps) for eps in epsilons}
signed_row({f"ε={eps:g}": m for eps, m in sweep.items()}, image=0, size=1.7)

mask = ds.mask.values
on_object, kept = [], []
for m in sweep.values():
    positive = np.clip(m.values, 0, None)
    on_object.append((positive * mask).sum() / positive.sum())
    kept.append(float((m.sum(("y", "x")).values / logit.numpy()).mean()))
fig, ax = plt.subplots(1, 2, figsize=(8, 2.8))
ax[0].semilogx(epsilons, on_object, "o-")
ax[0].set_title("share of positive relevance on the object")
ax[1].semilogx(epsilons, kept, "o-")
ax[1].set_title("Σ R / f_c(x)")
for a in ax:
    a.set_xlabel("ε")
plt.tight_layout()

# %% [markdown]
# What to look for: the share on the object rises as the background noise cancels, then the
# total relevance collapses once ε exceeds the typical size of the activations z_j. In the
# `ExplainerWidget` the ε slider is logarithmic for this reason.
#
# ## α/β
#
# α/β treats positive and negative contributions separately. α1β0 keeps only the evidence
# *for* the class (a positive map); increasing β shows evidence against it in blue.

# %%
pairs = [(1.0, 0.0), (2.0, 1.0), (3.0, 2.0)]
signed_row({f"α={a:g}, β={b:g}": ex.explain("lrp", composite="alpha_beta", alpha=a, beta=b)
            for a, b in pairs}, image=0)

# %% [markdown]
# ## DeepLIFT (rescale rule)
#
# DeepLIFT (Shrikumar et al., 2017) compares the input with a **reference** x' (default 0,
# the mean colour in model-input space). Through each non-linearity y = g(x) it passes the
# finite-difference slope instead of the local derivative:
#
# $$ m = \frac{g(x) - g(x')}{x - x'}, \qquad \mathrm{attr} = (x - x')\cdot m_{\text{chain}} $$
#
# **Summation to delta**: the attributions add up exactly to f_c(x) − f_c(x'), without
# IG's integration steps. Compare with IG (same reference) and gradient × input:

# %%
reference = torch.zeros_like(ex.inputs)
delta = (logit - ex.scores(reference, target)).numpy()
dl = ex.explain("deeplift", reduce=None)
ig = ex.explain("integrated_gradients", steps=16, reduce=None)
print("f(x) − f(x')      ", delta.round(3))
print("Σ DeepLIFT        ", dl.sum(("channel", "y", "x")).values.round(3))
print("Σ IG (16 steps)   ", ig.sum(("channel", "y", "x")).values.round(3))
gxi = ex.explain("gradient", reduce=None) * (ex.inputs.numpy() - reference.numpy())
signed_row({"DeepLIFT": dl.sum("channel"), "IG": ig.sum("channel"),
            "gradient × input": gxi.sum("channel")}, image=0)

# %% [markdown]
# ## LIME
#
# LIME (Ribeiro et al., 2016) does not open the network at all. It cuts the image into
# superpixels (SLIC), switches random subsets of them off (grey), records the score of each
# masked image and fits a weighted linear model *score ≈ Σ w_s · [superpixel s on]*. The map
# is the weight of each superpixel. Here are the superpixels LIME works with:

# %%
first = xw.Explainer(model, images[:1], preprocess=preprocess, classes=classes, progress=False)
picture = images[0].permute(1, 2, 0).numpy()
segments = slic(picture, n_segments=40, start_label=0)
fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
axes[0].imshow(mark_boundaries(picture, segments))
axes[0].set_title(f"{segments.max() + 1} superpixels")
for ax, samples in zip(axes[1:], (50, 300), strict=True):
    m = first.explain("lime", n_samples=samples, n_segments=40, seed=0)
    limit = float(abs(m[0]).max()) or 1.0
    ax.imshow(m[0], cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"LIME, {samples} samples")
for ax in axes:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# Pitfalls: the map can only be as fine as the superpixels, and with few samples the
# regression is noisy (compare the two maps; change `seed`).
#
# ## Meaningful perturbation
#
# Fong & Vedaldi (2017) *learn* the smallest mask m whose deletion (blurring the image where
# m = 0) destroys the score:
#
# $$ \min_m\; \lambda_1 \lVert 1 - m\rVert_1 + \lambda_{TV}\,\mathrm{TV}(m) + f_c\big(x\odot m + \mathrm{blur}(x)\odot(1-m)\big) $$
#
# The map is 1 − m. It is an optimisation (Adam, a few hundred steps), so it is slow, and the
# regularisers decide how blobby the answer is. We use few steps to keep this notebook fast.

# %%
pair = [0, 2]
two = xw.Explainer(model, images[pair], preprocess=preprocess, classes=classes, progress=False)
mp = two.explain("meaningful_perturbation", steps=50, seed=0)
probability = ex.predict(top=1)[pair, 0].values
fig, axes = plt.subplots(1, 2, figsize=(5, 2.7))
for k, ax in enumerate(axes):
    ax.imshow(mp.xai.overlay(two.images, index=k))
    ax.set_title(f"{names[pair[k]]}, p = {probability[k]:.4f}", fontsize=9)
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# Pitfall: the loss uses the softmax probability, as in the paper. When the network is very
# sure (p ≈ 1, the logit far above the others), the softmax is saturated, its gradient is
# almost zero, and the mask barely moves from "keep everything" within a short optimisation:
# an empty map then means "not enough steps", not "nothing matters". Compare the two images,
# and try more `steps` or a larger `l1`.
