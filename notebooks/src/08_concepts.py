# Source of 08_concepts.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Concepts: what a layer sees
#
# Every map so far answered *where* the model looked. This notebook asks *what* it saw
# there. A convolutional layer does not output one picture but many: one **channel** per
# filter, each a small map of where its pattern occurs. We will
#
# 1. look at a few channels of `shapes-vgg`'s last block;
# 2. find each channel's **reference patches**: the places in a whole dataset where it fires most;
# 3. ask which channels make the model say **"star"** (Concept Relevance Propagation, CRP);
# 4. draw each of those channels' **conditional map**: the part of the LRP map that flows through it;
# 5. ask which channels explain one **region** of the image;
# 6. let **NMF** group the channels into a few concepts;
# 7. compare the trained model with `shapes-vgg-shuffled`, trained on shuffled labels: are its
#    channels' reference patches still about one shape?

# %%
import matplotlib.pyplot as plt
import numpy as np

import xaiwidgets as xw

model, preprocess, classes = xw.models.load("shapes-vgg")
data = xw.datasets.shapes(n=160, seed=1)       # held out: the models trained on seeds >= 10000
LAYER = "features.27"                          # the last block: 64 channels on an 8×8 grid
star = classes.index("star")
first_star = int(np.flatnonzero(data.label.values == star)[0])
ex = xw.Explainer(model, data.image.values[first_star:first_star + 1], preprocess=preprocess,
                  classes=classes, progress=False)
print(classes, "| image", first_star, "is a", classes[int(data.label[first_star])],
      "| predicted:", ex.predict(1).class_name.item())

# %% [markdown]
# ## 1. What a channel is
#
# The layer's output for one image has shape (channels, 8, 8). Each channel is one filter's
# response: bright where its pattern is. `ex.channels(layer, "activation")` gives each
# channel's maximum; here are the four strongest on this star.

# %%
activation = ex.activations([LAYER])[LAYER][0]
strongest = ex.channels(LAYER, "activation")[0].sortby(lambda a: -a)[:4].channel.values
fig, axes = plt.subplots(1, 5, figsize=(12, 2.6))
axes[0].imshow(data.image.values[first_star].transpose(1, 2, 0))
axes[0].set_title("image")
for ax, k in zip(axes[1:], strongest, strict=True):
    ax.imshow(activation[k], cmap="magma")
    ax.set_title(f"channel {k}")
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Top patches over a dataset
#
# One image says little about what a channel responds to. `xw.concepts.references` runs the
# whole dataset through the model in chunks and keeps, per channel, only the `top` images
# where the channel fires most (memory does not grow with the dataset), with the **patch**:
# the box where the channel's map is at least half its maximum. With `store="refs.zarr"` the
# result is written as it goes and read back next time; with `client=` it runs on dask.

# %%
refs = xw.concepts.references(model, data, LAYER, top=6, preprocess=preprocess, progress=False)


def show_patches(refs, channels, images, title=""):
    """Each channel's reference patches in a row (cropped from the dataset's images)."""
    ranks = refs.sizes["rank"]
    fig, axes = plt.subplots(len(channels), ranks, figsize=(1.6 * ranks, 1.7 * len(channels)))
    for row, k in zip(np.atleast_2d(axes), channels, strict=True):
        for ax, r in zip(row, range(ranks), strict=True):
            p = refs.sel(channel=k, rank=r)
            crop = images[int(p.image)][:, int(p.y0):int(p.y1), int(p.x0):int(p.x1)]
            ax.imshow(crop.transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"ch {k}")
    fig.suptitle(title)
    plt.show()


show_patches(refs, strongest[:3], data.image.values, "top patches by activation")

# %% [markdown]
# ## 3. Which channels make shapes-vgg say "star"?
#
# CRP (Achtibat et al. 2023) splits the LRP relevance of the "star" logit at the layer:
# R_k is the relevance that reaches channel k. Positive channels speak for "star", negative
# ones against it. (`"gradcam"` and `"fem"` measures exist too.)

# %%
R = ex.channels(LAYER, "lrp", target=star)[0]
top_channels = R.sortby(lambda r: -r)[:4].channel.values
plt.figure(figsize=(10, 2.5))
plt.bar(R.channel, R, color=np.where(R > 0, "tab:red", "tab:blue"))
plt.xlabel("channel")
plt.ylabel("R_k")
plt.title('relevance of each channel for "star"')
plt.show()
print("most relevant channels:", top_channels.tolist(), "| their share of the total:",
      f"{float(R.sel(channel=top_channels).sum() / R.sum()):.0%}")

# %% [markdown]
# ## 4. Each channel's conditional map
#
# `explain("lrp", layer=..., channels=[k])` keeps the relevance at the layer only on channel k
# and propagates it down with the same rules: *where* in the image channel k's evidence
# comes from. The maps of a partition of the channels add up to the whole LRP map (checked
# below); after the first one, each channel costs one backward pass from the layer down.

# %%
full = ex.explain("lrp", target=star)
maps = [ex.explain("lrp", target=star, layer=LAYER, channels=[int(k)]) for k in top_channels]
fig, axes = plt.subplots(1, 5, figsize=(12, 2.6))
limit = float(np.abs(full[0]).max())
axes[0].imshow(full[0], cmap="bwr", vmin=-limit, vmax=limit)
axes[0].set_title("LRP, all channels")
for ax, k, m in zip(axes[1:], top_channels, maps, strict=True):
    limit = float(np.abs(m[0]).max())
    ax.imshow(m[0], cmap="bwr", vmin=-limit, vmax=limit)
    ax.set_title(f"channel {k}")
for ax in axes:
    ax.axis("off")
plt.show()
halves = [list(range(0, 64, 2)), list(range(1, 64, 2))]
parts = sum(ex.explain("lrp", target=star, layer=LAYER, channels=h).values for h in halves)
print("even + odd channels = whole map:", np.allclose(parts, full.values, atol=1e-6))

# %% [markdown]
# ## 5. A region query
#
# Which channels explain *this* part of the image? Sum each channel's conditional map inside
# a box: the ConceptExplorer widget does this when you drag a box on the map. Here the box is
# the star's bounding box from the dataset's mask. `xw.concepts.box_contributions` does it for
# all 64 channels at once (several channels per backward pass), and gives the same numbers as
# summing the conditional maps one channel at a time (checked below for the top three).

# %%
ys, xs = np.nonzero(data.mask.values[first_star])
box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)  # (y0, x0, y1, x1), end exclusive
inside = xw.concepts.box_contributions(ex, LAYER, box, "lrp", target=star)
ranked = inside.sortby(lambda c: -c)[:5]
print("box (y0, x0, y1, x1):", tuple(int(v) for v in box))
print("channels ranked inside it:", ranked.channel.values.tolist())
print("relevance inside the box:", np.round(ranked.values, 3).tolist())
y0, x0, y1, x1 = box
one_by_one = [
    ex.explain("lrp", target=star, layer=LAYER, channels=[int(k)])[0, y0:y1, x0:x1].sum().item()
    for k in ranked.channel.values[:3]
]
print("same as one channel at a time:", np.allclose(one_by_one, ranked.values[:3], rtol=1e-4))

# %% [markdown]
# ## 6. NMF concepts
#
# 64 channels are many to look at. Deep Feature Factorization (Collins et al. 2018) factorises
# the non-negative activations into a few **concepts**: each a mix of channels (`basis`) with
# a map per image (`maps`). Fitted on a sample of positions, applied to all.

# %%
batch = xw.Explainer(model, data.image.values[:8], preprocess=preprocess, progress=False)
fac = xw.concepts.factorize(batch, LAYER, n=3, seed=0)
fig, axes = plt.subplots(2, 4, figsize=(10, 5))
colours = np.array([[1, 0, 0], [0, 0.8, 0], [0, 0.3, 1]])
for ax, i in zip(axes.flat, range(8), strict=True):
    m = fac.maps[i].values / max(float(fac.maps[i].max()), 1e-9)
    tint = np.einsum("cyx,cr->yxr", m, colours)
    overlay = 0.5 * data.image.values[i].transpose(1, 2, 0) + 0.5 * tint
    ax.imshow(np.clip(overlay, 0, 1))
    ax.set_title(classes[int(data.label[i])])
    ax.axis("off")
fig.suptitle("three NMF concepts (red, green, blue)")
plt.show()
print("channels that make up each concept:",
      [np.argsort(-fac.basis[c].values)[:5].tolist() for c in range(3)])

# %% [markdown]
# ## 7. Trained vs shuffled labels: are the channels about shapes?
#
# `shapes-vgg-shuffled` is the same network trained on shuffled labels: it memorised its
# training set. If a channel detects a shape, its top reference images should mostly show
# *one* class. We measure each channel's **class purity**: the share of its 8 reference
# images that belong to its most common class (1.0: all one shape; chance is about the
# largest class's share of the dataset).

# %%
def purity(refs, labels):
    """Per channel: the share of its reference images from their most common class."""
    picked = labels[refs.image.values]
    return np.array([np.bincount(row, minlength=4).max() / len(row) for row in picked])


shuffled, shuffled_pre, _ = xw.models.load("shapes-vgg-shuffled")
labels = data.label.values
trained_refs = xw.concepts.references(
    model, data, LAYER, top=8, preprocess=preprocess, progress=False
)
shuffled_refs = xw.concepts.references(
    shuffled, data, LAYER, top=8, preprocess=shuffled_pre, progress=False
)
p_trained, p_shuffled = purity(trained_refs, labels), purity(shuffled_refs, labels)
chance = np.bincount(labels).max() / len(labels)
print(f"mean class purity: trained {p_trained.mean():.2f}, shuffled {p_shuffled.mean():.2f} "
      f"(largest class alone: {chance:.2f})")
plt.figure(figsize=(6, 3))
bins = np.linspace(0.125, 1.0, 9)
plt.hist([p_trained, p_shuffled], bins=bins, label=["trained", "shuffled labels"])
plt.xlabel("class purity of a channel's top-8 images")
plt.ylabel("channels")
plt.legend()
plt.show()

# %% [markdown]
# The trained model's channels pick images of one shape far more often than the shuffled
# model's: its features are about shapes. The shuffled model also has channels that fire on
# strong patterns, but what they fire on does not line up with the classes.
#
# Interactively: `xw.ConceptExplorer(model, data, preprocess=preprocess, classes=classes)`
# shows the bar chart, the conditional map of the channel you click, its reference patches
# and its class usage (`xw.concepts.class_usage`), and ranks channels inside a box you drag.
