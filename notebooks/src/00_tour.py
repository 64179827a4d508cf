# Source of 00_tour.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # xaiwidgets in five minutes
#
# *Which pixels made the network say "triangle"?* An **explanation map** (saliency map,
# heatmap) gives every pixel of an image a score for how much it mattered to a classifier's
# decision. `xaiwidgets` computes such maps for any PyTorch CNN with many methods from the
# literature, returns them as labelled `xarray` arrays, compares them with where people
# looked, and lets you explore them with sliders in Jupyter.
#
# The flow is always the same:
#
# ```
# model + images ──► Explainer (one cached forward pass) ──► method ──► xarray map ──► plot / widget / metric
# ```
#
# Everything here runs offline on a laptop CPU in well under a minute: the package ships a
# synthetic data set of coloured shapes and two small trained CNNs.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import display

import xaiwidgets as xw

torch.manual_seed(0)
print("methods:", ", ".join(xw.methods()))

# %% [markdown]
# ## 1. Images and a model
#
# `xw.datasets.shapes` draws images of simple shapes on a textured background. Each image
# has a class label, a mask of the target object and **simulated gaze fixations**: where a
# human asked "what is this?" would have looked. Their blurred sum is the *gaze fixation
# density map* (GFDM), the "human explanation" we compare the methods with in
# `04_evaluation.ipynb`.
#
# `xw.models.load("shapes-vgg")` returns a small VGG-style network trained on these images,
# the function that maps images in [0, 1] to the network's input (`preprocess`), and the
# class names.

# %%
ds = xw.datasets.shapes(n=6, seed=0)
model, preprocess, classes = xw.models.load("shapes-vgg")
images = torch.from_numpy(ds.image.values)
print(images.shape, "classes:", classes)

fig, axes = plt.subplots(2, 6, figsize=(12, 4.2))
for i, (top, bottom) in enumerate(axes.T):
    top.imshow(ds.image[i].transpose("y", "x", "channel"))
    top.set_title(classes[int(ds.label[i])])
    bottom.imshow(ds.gfdm[i], cmap="inferno")
    bottom.set_title("GFDM")
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# ## 2. Predict
#
# The `Explainer` holds the model and the images. It runs the model once and caches the
# result (logits, and the activations of any layer a method asks for), so asking again,
# or changing a parameter that does not need a new pass, is instant.

# %%
ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes)
pred = ex.predict(top=2)
pred.to_dataframe().unstack("rank")[["class_name", "probability"]]

# %% [markdown]
# ## 3. A gradient map
#
# The oldest idea (Simonyan et al., 2014): how much does the class score change when a pixel
# changes a little? That is the gradient of the target **logit** f_c (the score before the
# softmax) with respect to the input:
#
# $$ R(x) = \frac{\partial f_c}{\partial x} $$
#
# One number per pixel *and* per colour channel; the usual picture keeps the largest
# absolute value over R, G, B. Look for: edges of the object light up, but the map is
# speckled. That noise is the gradient's well-known weakness (see `01_gradient_methods`).

# %%
grad = ex.explain("gradient")  # target=None: the predicted class
display(grad)

# %% [markdown]
# The result is an `xarray.DataArray` with named dimensions and, in `attrs`, everything
# needed to reproduce it (method, target, layer, every parameter, defaults included).
# A small helper draws maps over their images. We use the perceptually uniform **inferno**
# colormap: equal steps in value look like equal steps in colour. Many papers use **jet**
# (rainbow), whose bright yellow band invents edges that are not in the data.


# %%
def show(maps: dict, images=images, n: int = 6, cmap: str = "inferno") -> None:
    """Rows: maps (name -> DataArray); columns: the first ``n`` images."""
    fig, axes = plt.subplots(len(maps) + 1, n, figsize=(2 * n, 2 * (len(maps) + 1)),
                             squeeze=False)
    for i in range(n):
        picture = images[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(picture)
        axes[0, i].set_title(str(pred.class_name[i, 0].values))
        for row, (name, m) in enumerate(maps.items(), 1):
            axes[row, i].imshow(picture.mean(-1), cmap="gray")
            axes[row, i].imshow(m[i], cmap=cmap, alpha=0.7)
            axes[row, 0].set_ylabel(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    plt.tight_layout()


show({"gradient": grad})

# %% [markdown]
# ## 4. Grad-CAM
#
# Grad-CAM (Selvaraju et al., 2017) looks at a convolutional layer instead of the pixels. Each
# channel k of the layer's activation A gets a weight α_k, the spatial mean of the gradient;
# the map keeps the positive part of the weighted sum, then is upsampled to the image:
#
# $$ \mathrm{CAM} = \mathrm{ReLU}\Big(\sum_k \alpha_k A_k\Big), \qquad
#    \alpha_k = \frac{1}{hw}\sum_{u,v} \frac{\partial f_c}{\partial A_k(u,v)} $$
#
# The default layer is the last convolutional block (`ex.default_layer()`); `ex.layers()`
# lists the others. Look for: smooth blobs on the object, coarse because the last layer is
# small.

# %%
print("layers:", ex.layers())
print("default layer:", ex.default_layer())
cam = ex.explain("gradcam")
show({"gradient": grad, "Grad-CAM": cam})

# %% [markdown]
# ## 5. FEM, the feature explanation method
#
# FEM (Fuad et al., 2020) needs no gradient and no class: it keeps, in every channel of the
# last convolutional layer, the *unusually strong* activations (above mean + K standard
# deviations) and weights each channel's mask by the channel's mean:
#
# $$ \mathrm{FEM} = \sum_k \mu_k \,[A_k \ge \mu_k + K\sigma_k] $$
#
# One forward pass, so it is the fastest method here. `03_fem_mlfem` explains it in detail
# and fuses it over many layers (MLFEM).

# %%
fem = ex.explain("fem")
show({"gradient": grad, "Grad-CAM": cam, "FEM": fem, "GFDM (people)": ds.gfdm})

# %% [markdown]
# Grad-CAM and FEM land on the object, roughly where the (simulated) observers looked; the
# gradient is sharper but noisier. `04_evaluation` turns this impression into numbers.
#
# ## 6. Your own model, on real photos
#
# Any `torch.nn.Module` classifier works, for example a torchvision network on photos.
# `xw.models.load_or_fallback("resnet50")` downloads ResNet-50's ImageNet weights (once, into
# the torch hub cache) with the 1000 ImageNet class names. Without internet it builds the same
# network with **random weights** instead and says so: the maps below then show the
# machinery, not a meaningful explanation. On Binder the download works.

# %%
choice = xw.models.load_or_fallback("resnet50")
print(choice.note)
net, net_preprocess, net_classes = choice.loaded
photos, photo_names = xw.datasets.photos(size=224, names=["cat", "coffee"])
photo_ex = xw.Explainer(net, photos, preprocess=net_preprocess, classes=net_classes)
photo_pred = photo_ex.predict(top=1)
print("ResNet-50 residual blocks:", photo_ex.block_layers())
photo_cam = photo_ex.explain("gradcam")
fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for i, name in enumerate(photo_names):
    guess = str(photo_pred.class_name[i, 0].values)
    axes[2 * i].imshow(photos[i].permute(1, 2, 0).numpy())
    axes[2 * i].set_title(f"{name}: {guess}"[:28])
    axes[2 * i + 1].imshow(photo_cam.xai.overlay(photos, index=i))
    axes[2 * i + 1].set_title("Grad-CAM" + (" (random weights!)" if choice.offline else ""))
for ax in axes:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# ## 7. Explore with the widget
#
# `ExplainerWidget` puts all of this behind controls: pick an image, a method, a layer, a
# target class and the method's parameters (sliders come from each method's declared
# parameters). In a live notebook, move the sliders; here we also drive it from code,
# exactly as a click would. Slow methods compute in the background (the controls stay
# responsive, a newer change cancels the older one); `w.wait()` waits for the latest map.

# %%
w = xw.ExplainerWidget(model, images, preprocess=preprocess, classes=classes)
w.controls["method"].value = "gradcam"
display(w)
w.wait()  # maps are computed in the background: a slow method never freezes the notebook
print(w.result.attrs["method"], w.result.attrs["layer"])

# %% [markdown]
# ## Where next
#
# | notebook | what you learn |
# |---|---|
# | `01_gradient_methods` | gradient, guided backprop, DeconvNet, Integrated Gradients, SmoothGrad, Grad-CAM, occlusion |
# | `02_lrp_deeplift` | layer-wise relevance propagation and its rules, DeepLIFT, LIME, meaningful perturbation |
# | `03_fem_mlfem` | FEM step by step, the per-layer FEM stack, fusing layers (MLFEM) |
# | `04_evaluation` | comparing maps with human fixations, deletion/insertion, sanity checks |
# | `05_classroom` | short exercises with solutions, and the teaching widgets (`LookWidget`, `SanityQuiz`, HTML handouts) |
# | `06_dataset_explorer` | a whole dataset's maps and scores: filters, sorting, the confusion matrix, errors first |
# | `07_video` | FEM and the other methods on video clips (N, C, T, H, W), frame by frame |
# | `08_concepts` | what a layer sees: channels, reference patches, class usage, NMF concepts |
# | `09_cnn_vs_vit` | a CNN and a Vision Transformer: whose maps look where people look? |
# | `app` | the class app (open it in Voilà): your own photos, three widgets in tabs |
# | `lesson` | a lesson app (open it in Voilà): look where you look, compare with the methods, a sanity quiz |
