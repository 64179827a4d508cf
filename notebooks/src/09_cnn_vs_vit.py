# Source of 09_cnn_vs_vit.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # CNN or Vision Transformer: whose maps look where people look?
#
# A CNN sees an image through convolutions: every layer is a stack of feature **maps**
# (N, C, h, w). A Vision Transformer (ViT, Dosovitskiy et al. 2021) cuts the image into
# patches, turns each patch into a **token** and lets every token attend to every other
# one: its layers output (N, L, D), one row per token, plus a *class token* whose final
# state is what the classifier reads. The same explanation methods run on both, and this
# notebook compares their maps with the simulated gaze of the shapes data:
#
# * `shapes-vgg` and `shapes-resnet`, the shipped CNNs, and
# * `shapes-vit`, the shipped ViT, a **hybrid** as in the ViT paper (timm's `HybridEmbed`):
#   a small convolutional stem (the first three stages of `shapes-resnet`'s layout, stride
#   16) embeds each 16 × 16 patch of the 128 px images into a token (an **8 × 8 token
#   grid**), then a class token, position embeddings and 4 pre-norm blocks of 3-head
#   self-attention, dimension 96, laid out as timm's `VisionTransformer`. (A plain ViT with
#   a linear patch embedding stayed at chance on this data for the CPU budget of its
#   training; the convolutional stem is what hybrids are for.)
#
# All three were trained on the same data (`xw.datasets.shapes`, seeds ≥ 10 000: the images
# below are fresh). Methods: **Grad-CAM** and **FEM** (both read a layer's feature map; on a
# ViT the token grid), **attention rollout** (ViT only: it reads the attention) and **LRP**
# (CNNs; on the ViT it is refused, with the reason).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display

import xaiwidgets as xw

NAMES = ["shapes-vgg", "shapes-resnet", "shapes-vit"]
models = {name: xw.models.load(name) for name in NAMES}
N = 12
ds = xw.datasets.shapes(n=N, seed=4)  # fresh images, with fixations and their GFDM
images = torch.from_numpy(ds.image.values)
classes = ds.attrs["classes"]
explainers = {name: xw.Explainer(m.model, images, preprocess=m.preprocess,
                                 classes=m.classes, progress=False)
              for name, m in models.items()}
for name, ex in explainers.items():
    predicted = ex.predict(top=1).label.values[:, 0]
    parameters = sum(p.numel() for p in models[name].model.parameters())
    print(f"{name:14s} {parameters / 1e3:5.0f} k parameters, "
          f"{(predicted == ds.label.values).mean():.0%} of the {N} images right")

# %% [markdown]
# ## A ViT's layers are token grids
#
# Each block of the ViT outputs 65 tokens of dimension 96: the class token first, then the
# 64 patches in row-major order. For a map, the explainer drops the class token and folds
# the patches back into their 8 × 8 grid, so that Grad-CAM and FEM see a (N, 96, 8, 8)
# feature map as they would in a CNN. The layer list offers the stem's convolutions and
# residual blocks (feature maps already), the patch projection and the transformer blocks;
# the default layer is the last block's first norm, `blocks.3.norm1` (after the last
# block, only the class token reaches the classifier, so the patch tokens there have no
# gradient).

# %%
vit = explainers["shapes-vit"]
vit_model = models["shapes-vit"].model
print("layers:", vit.layers()[-6:], f"(and {len(vit.layers()) - 6} in the stem)")
print("default layer:", vit.default_layer())
kept = {}
handle = vit_model.blocks[3].norm1.register_forward_hook(lambda _m, _i, out: kept.update(a=out))
try:
    with torch.no_grad():
        vit_model(models["shapes-vit"].preprocess(images))
finally:
    handle.remove()
print("blocks.3.norm1 output:", tuple(kept["a"].shape),
      "= (images, 1 class token + 8·8 patches, dim)")
grid = vit.activations(["blocks.3.norm1"])["blocks.3.norm1"]
print("as the explainer reads it:", tuple(grid.shape), "= (images, dim, 8, 8)")

# %% [markdown]
# Grad-CAM on the token grid, by hand: the gradient of the class score at the layer,
# averaged over the patches, weights the patch tokens' features; the ReLU of the weighted
# sum is an 8 × 8 map, upsampled bilinearly to 128 px and min-max normalised. The
# library gives the same map:

# %%
layer = "blocks.3.norm1"
module = vit_model.get_submodule(layer)
kept = {}
handle = module.register_forward_hook(lambda _m, _i, out: kept.update(a=out))
try:
    x = models["shapes-vit"].preprocess(images)
    logits = vit_model(x)
    target = logits.argmax(1)
    gradient, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept["a"])
finally:
    handle.remove()
grid_of = lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (8, 8))  # noqa: E731  (N, D, 8, 8)
activation, grad = grid_of(kept["a"].detach()), grid_of(gradient)
weights = grad.mean(dim=(2, 3), keepdim=True)
cam = torch.relu((weights * activation).sum(1, keepdim=True))
cam = F.interpolate(cam, size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
low, high = cam.flatten(1).min(1).values, cam.flatten(1).max(1).values
cam = (cam - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None]
library = vit.explain("gradcam", layer=layer)
print("max |library − by hand| =", float(abs(library.values - cam.numpy()).max()))

# %% [markdown]
# ## Attention rollout, by hand
#
# Attention rollout (Abnar & Zuidema 2020) follows the class token's attention down the
# blocks. Per block, A = softmax(q kᵀ / √d) averaged over the heads; the residual
# connection keeps half of each token, so Â = (A + I) / row sums; the product
# R = Â₄ Â₃ Â₂ Â₁ says how much each input token reaches each output token. The map is
# the class token's row of R over the 64 patches. The queries and keys come from each
# block's `attn.qkv` layer (hooks; the model is not changed):

# %%
qkv = []
handles = [block.attn.qkv.register_forward_hook(lambda _m, _i, out: qkv.append(out))
           for block in vit_model.blocks]
try:
    with torch.no_grad():
        vit_model(x)
finally:
    for h in handles:
        h.remove()
rollout = torch.eye(65).expand(N, 65, 65)
for block, out in zip(vit_model.blocks, qkv, strict=True):
    heads = block.attn.num_heads
    q, k, _ = out.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # each (N, heads, 65, 32)
    attention = torch.softmax(q @ k.transpose(-2, -1) * block.attn.scale, dim=-1).mean(1)
    attention = attention + torch.eye(65)
    rollout = (attention / attention.sum(-1, keepdim=True)) @ rollout
by_hand = rollout[:, 0, 1:].reshape(N, 1, 8, 8)
by_hand = F.interpolate(by_hand, size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
low, high = by_hand.flatten(1).min(1).values, by_hand.flatten(1).max(1).values
by_hand = (by_hand - low[:, None, None]) / (high - low)[:, None, None]
library = vit.explain("attention_rollout")
print("max |library − by hand| =", float(abs(library.values - by_hand.numpy()).max()))

# %% [markdown]
# ## LRP on a transformer: refused, with the reason
#
# LRP's rules redistribute relevance through layers, activations and sums. The attention's
# softmax and its products q·kᵀ and A·v have no rule here, so the relevance would not be
# conserved; rather than return such a map, the explainer refuses and says what to use
# instead. On the CNNs, LRP runs; its `conservation_error` records how far the relevance
# sum is from the score (the biases absorb part of it).

# %%
try:
    vit.explain("lrp")
    lrp_on_vit = "runs"
except ValueError as refusal:
    lrp_on_vit = f"refused: {refusal}"
print("LRP on shapes-vit:", lrp_on_vit)
lrp = explainers["shapes-vgg"].explain("lrp")
print("LRP on shapes-vgg: conservation error", np.round(lrp.attrs["conservation_error"], 2))

# %% [markdown]
# ## The maps side by side
#
# Left: the image with the observers' fixations and their density map (GFDM). Then Grad-CAM
# and FEM of each model, the ViT's attention rollout, and LRP of the CNNs (its positive
# relevance). Grad-CAM reads each model's default layer; FEM, defined on activations after
# a non-linearity, reads the CNNs' default layer and the ViT's last MLP activation
# (`blocks.3.mlp.act`, a token grid of 384 channels).

# %%
CNN_METHODS = ["gradcam", "fem", "lrp"]
VIT_METHODS = ["gradcam", "fem", "attention_rollout"]
methods_of = {"shapes-vgg": CNN_METHODS, "shapes-resnet": CNN_METHODS, "shapes-vit": VIT_METHODS}
params_of = {"shapes-vit": {"fem": {"layer": "blocks.3.mlp.act"}}}
maps = {(name, method): explainers[name].explain(method, **params_of.get(name, {}).get(method, {}))
        for name, methods in methods_of.items() for method in methods}
for key, values in maps.items():  # LRP is signed: show its positive part, scaled per image
    if values.attrs.get("signed"):
        positive = values.clip(min=0)
        maps[key] = positive / positive.max(("y", "x")).clip(min=1e-12)
columns = [("image", ""), ("gaze", "GFDM")] + list(maps)
shown = [0, 1, 2]
fig, axes = plt.subplots(len(shown), len(columns), figsize=(1.45 * len(columns), 1.6 * len(shown)))
for row, i in enumerate(shown):
    for col, (name, method) in enumerate(columns):
        ax = axes[row, col]
        if name == "image":
            ax.imshow(ds.image[i].transpose("y", "x", "channel").values)
            ys, xs = np.nonzero(ds.fixations[i].values)
            ax.scatter(xs, ys, s=3, c="white", edgecolors="k", linewidths=0.2)
        elif name == "gaze":
            ax.imshow(ds.gfdm[i].values, cmap="inferno")
        else:
            ax.imshow(maps[name, method][i].values, cmap="inferno", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
            title = name if name in ("image", "gaze") else name.removeprefix("shapes-")
            ax.set_title(f"{title}\n{method.replace('attention_', '')}", fontsize=7)
    axes[row, 0].set_ylabel(classes[int(ds.label[i])], fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Against gaze: the table
#
# `xw.evaluate` explains every image with each method and scores the map against the gaze:
# PCC (correlation with the GFDM), SIM (histogram intersection with the GFDM) and NSS (the
# normalised map's mean value at the fixations). Higher is better for all three.

# %%
rows = []
for name, methods in methods_of.items():
    m = models[name]
    scores = xw.evaluate(m.model, ds, methods, metrics=("pcc", "sim", "nss"),
                         preprocess=m.preprocess, params=params_of.get(name), progress=False)
    table = scores[["pcc", "sim", "nss"]].mean("image").to_dataframe()[["pcc", "sim", "nss"]]
    rows.append(table.assign(model=name).reset_index())
table = pd.concat(rows).set_index(["model", "method"])
display(table.round(3))

# %% [markdown]
# The CNNs' Grad-CAM and FEM follow the target, as the gaze does (70 % of the fixations
# fall on it). The ViT is different: its attention rollout finds the target, but Grad-CAM
# and FEM on its transformer blocks do not; FEM there even anti-correlates with the gaze
# (it lights the background). After a few rounds of attention, a token no longer holds
# only its own patch: the class decision is read from the class token, which gathered it
# from the target's tokens, while strong features sit on background tokens (large ViTs
# do this too: Darcet et al. 2023 found high-norm background tokens used as global
# storage). Twelve images make a noisy table: raise `N` for a real comparison.
#
# Where is the localisation lost? PCC per layer, from the stem's last residual block (a CNN
# feature map, before any attention) through the transformer blocks (Grad-CAM at the block
# outputs, FEM at their MLP activations). Inside the last block only the class token
# reaches the head, so a layer after its attention gives Grad-CAM no gradient on the patches.

# %%
stem = "patch_embed.backbone.layer3.1"
gradcam_layers = [stem, "blocks.0", "blocks.1", "blocks.2", "blocks.3.norm1"]
fem_layers = [stem] + [f"blocks.{i}.mlp.act" for i in range(4)]
m = models["shapes-vit"]
per_layer = xw.evaluate(m.model, ds, ["gradcam", "fem"], metrics=("pcc",), preprocess=m.preprocess,
                        params={"gradcam": {"layer": gradcam_layers}, "fem": {"layer": fem_layers}},
                        progress=False)
display(per_layer.pcc.mean("image").to_series().round(3).to_frame("pcc"))

# %% [markdown]
# ## FEM over the blocks, and the widgets
#
# FEM reads every block's token grid: the per-block stack shows where each block's
# unusually strong features are, from the stem's residual blocks (feature maps) to the
# transformer blocks (token grids). A transformer block's output is the residual stream:
# signed, about half of its mass below zero, so FEM warns (`FEMWarning`) that a channel with
# a negative mean subtracts where it fires. That is why the table above reads FEM at the
# blocks' MLP activations. The `FEMStackWidget` and `ExplainerWidget` take the ViT like any
# CNN (their layer lists are the blocks).

# %%
stack = vit.fem_stack()
print("FEM stack:", dict(stack.sizes), list(stack.layer.values))
# each stem stage's last block, then the 4 transformer blocks
stack = stack.isel(layer=[1, 3, 5, 6, 7, 8, 9])
fig, axes = plt.subplots(1, stack.sizes["layer"] + 1, figsize=(11, 1.9))
axes[0].imshow(ds.image[0].transpose("y", "x", "channel").values)
axes[0].set_title("image", fontsize=8)
for ax, layer_name in zip(axes[1:], stack.layer.values, strict=True):
    ax.imshow(stack.sel(layer=layer_name)[0].values, cmap="inferno", vmin=0, vmax=1)
    ax.set_title(layer_name.replace("patch_embed.backbone.", "stem "), fontsize=7)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %%
m = models["shapes-vit"]
xw.FEMStackWidget(m.model, images[:2], preprocess=m.preprocess, classes=m.classes)

# %%
xw.ExplainerWidget(m.model, images[:2], preprocess=m.preprocess, classes=m.classes,
                   method="attention_rollout")
