# Source of 04_evaluation.ipynb: edit here, then run python notebooks/make_notebooks.py
# ruff: noqa: E501

# %% [markdown]
# # Evaluating explanations
#
# An explanation map cannot be "correct" the way a prediction can: there is no ground truth
# for *why* a network decided. Three kinds of evidence are used instead, and this notebook
# runs each of them on the shipped shapes data:
#
# 1. **Agreement with people** — compare the map with a *gaze fixation density map* (GFDM)
#    recorded while people looked at the image (here: simulated observers). This is how the
#    survey (Ayyar et al., Table 1) and the MLFEM paper (Bourroux et al.) rank methods.
# 2. **Faithfulness to the model** — delete the pixels the map calls important and watch the
#    score fall (deletion/insertion, AOPC).
# 3. **Sanity checks** — a map that explains the model must change when the model's weights
#    are destroyed (Adebayo et al., 2018).
#
# Everything is kept small (a few dozen images) so that the notebook runs in about a minute
# on a laptop; the numbers therefore wobble, but the *shape* of the results is stable.
# For real experiments, raise `N` and pass a `dask.distributed.Client` to `xw.evaluate`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import xarray as xr
from IPython.display import display

import xaiwidgets as xw
from xaiwidgets import metrics
from xaiwidgets.evaluation import perturbation as perturbation_metrics
from xaiwidgets.evaluation import sanity
from xaiwidgets.evaluation.evaluate import wins
from xaiwidgets.evaluation.gfdm import sigma_from_visual_angle

N = 24
# the shipped models were trained on seeds >= 10000: these images are held out
ds = xw.datasets.shapes(n=N, seed=1)
vgg, vgg_pre, classes = xw.models.load("shapes-vgg")
resnet, resnet_pre, _ = xw.models.load("shapes-resnet")
images = torch.from_numpy(ds.image.values)

# %% [markdown]
# ## 1. From fixations to a density map
#
# An eye tracker records fixations: points where the eye rested. Each image has
# `ds.fixations`, a map of fixation counts from 5 simulated observers. Our fovea sees
# sharply about 2° of visual angle, so each fixation stands for a small disc, not a point:
#
# $$ \mathrm{GFDM}(p) = \sum_{f} \exp\Big(-\frac{\lVert p - f\rVert^2}{2\sigma^2}\Big), \qquad
#    \sigma = D \tan(1°)\cdot\text{pixels per cm} $$
#
# with D the viewing distance. For the synthetic images the default σ is 1/16 of the side.

# %%
print(f"σ for a 2° fovea at 60 cm on a 38 px/cm screen: {sigma_from_visual_angle(60, 38):.1f} px")
i = 0
ys, xs = np.nonzero(ds.fixations[i].values)
counts = ds.fixations[i].values[ys, xs]
fig, axes = plt.subplots(1, 5, figsize=(13, 2.8))
axes[0].imshow(ds.image[i].transpose("y", "x", "channel"))
axes[0].scatter(xs, ys, s=12 * counts, c="cyan", edgecolors="k", linewidths=0.5)
axes[0].set_title(f"{int(counts.sum())} fixations")
axes[1].imshow(ds.mask[i], cmap="gray")
axes[1].set_title("target mask")
for ax, sigma in zip(axes[2:], (2, ds.attrs["sigma"], 20), strict=True):
    ax.imshow(xw.gfdm(ds.fixations[i].values, sigma=sigma), cmap="inferno")
    ax.set_title(f"GFDM, σ = {sigma:g} px")
for ax in axes:
    ax.axis("off")
plt.tight_layout()

# %% [markdown]
# ## 2. Comparing one map with the GFDM
#
# The MIT saliency benchmark's metrics, each in one line (s = explanation, g = GFDM,
# F = fixated pixels):
#
# | metric | definition | best |
# |---|---|---|
# | PCC | Pearson correlation of s and g | 1 |
# | SIM | Σ min(ŝ, ĝ), each min-max normalised then summing to 1 | 1 |
# | KLD | Σ g log(g / s), both summing to 1 | 0 |
# | NSS | mean of the standardised s at the fixations | high |
# | AUC-Judd | ROC area: fixated pixels vs all others, thresholds at fixated values | 1 |
# | AUC-Borji | ROC area: fixated pixels vs uniformly random pixels | 1 |
#
# PCC, SIM and KLD compare two maps; NSS and AUC compare a map with raw fixations.

# %%
ex = xw.Explainer(vgg, images[:1], preprocess=vgg_pre, classes=classes, progress=False)
one = {"Grad-CAM": ex.explain("gradcam")[0], "gradient": ex.explain("gradient")[0]}
rows = []
for name, m in one.items():
    row = {"map": name}
    for metric in ("pcc", "sim", "kld", "nss", "auc_judd", "auc_borji"):
        reference = ds.gfdm[0] if metrics.METRICS[metric].needs == "map" else ds.fixations[0]
        arrow = "↑" if metrics.METRICS[metric].higher_is_better else "↓"
        row[f"{metric} {arrow}"] = float(metrics.get(metric)(m, reference))
    rows.append(row)
fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
for ax, (title, m) in zip(axes, {**one, "GFDM": ds.gfdm[0]}.items(), strict=True):
    ax.imshow(m, cmap="inferno")
    ax.set_title(title)
    ax.axis("off")
plt.show()
xr.Dataset({k: ("map", [r[k] for r in rows]) for k in rows[0] if k != "map"},
           coords={"map": [r["map"] for r in rows]}).to_dataframe().round(3)

# %% [markdown]
# ## 3. The survey's Table 1 on shapes-vgg
#
# The survey compares eight methods with the GFDM on a VGG16 (284 images of the MexCulture
# data set) by SIM and PCC. `xw.evaluate` runs every method on every image (in chunks, on
# dask threads) and returns an `xarray.Dataset` with dims (image, method), one variable per
# metric, plus per-image coordinates (label, prediction, correct).
#
# xarray tip: select methods with `result.sel({"method": "fem"})`, not
# `result.sel(method="fem")`: `method` is also an argument of `.sel` itself (the
# inexact-match rule), and xarray would silently take it as that.

# %%
table_methods = ["gradient", "guided_backprop", "smoothgrad", "integrated_gradients",
                 "gradcam", "lrp", "deeplift", "fem"]
t1 = xw.evaluate(vgg, ds, table_methods, metrics=("sim", "pcc"), preprocess=vgg_pre,
                 params={"smoothgrad": {"n": 8}, "integrated_gradients": {"steps": 8}},
                 model_name="shapes-vgg", progress=False)
print(f"accuracy on these {N} images: {float(t1.correct.mean()):.0%}")
display(t1)

# %%
# the survey's Table 1 (VGG16, MexCulture): (SIM, PCC)
paper = {"gradient": (0.498, 0.242), "guided_backprop": (0.572, 0.078),
         "smoothgrad": (0.577, 0.187), "integrated_gradients": (0.575, 0.139),
         "gradcam": (0.586, 0.397), "lrp": (0.573, 0.075), "deeplift": (0.585, 0.275),
         "fem": (0.600, 0.356)}
mean = t1[["sim", "pcc"]].mean("image")
sem = t1[["sim", "pcc"]].std("image") / np.sqrt(N)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
x = np.arange(len(table_methods))
for ax, metric, k in zip(axes[:2], ("sim", "pcc"), (0, 1), strict=True):
    ours = mean[metric].sel({"method": table_methods})
    ax.bar(x, ours, yerr=sem[metric].sel({"method": table_methods}), label="shapes-vgg (ours)")
    ax.plot(x, [paper[m][k] for m in table_methods], "D", color="C3", label="survey (VGG16)")
    ax.set_xticks(x, table_methods, rotation=40, ha="right")
    ax.set_title(metric.upper() + " vs GFDM (↑)")
axes[0].legend(fontsize=8)
axes[2].barh(table_methods, t1.seconds.sel({"method": table_methods}))
axes[2].invert_yaxis()
axes[2].set_title(f"seconds for {N} images")
plt.tight_layout()
plt.show()
display(mean.to_dataframe().round(3).T)

# %% [markdown]
# What to look for: as in the survey, the class-activation style methods (Grad-CAM, FEM) are
# closest to where people look, the pixel-level gradient methods lowest in PCC, because
# their maps are sparse and speckled while a GFDM is smooth. FEM is also among the cheapest.
# The signed methods (IG, DeepLIFT, LRP) are scored as they are, negative relevance included,
# which costs them PCC: a choice every comparison must state (the survey does not).
# Pitfall: a smooth blob at the image centre also scores well against GFDMs (people look at
# the centre): compare with a centre-bias baseline before claiming success.
#
# ## 4. The MLFEM paper's comparisons on shapes-resnet
#
# MLFEM computes FEM at every residual block and fuses the maps (see `03_fem_mlfem`). The
# paper compares the fusion operators with FEM (last layer only) and Grad-CAM, per image:
# "method a beats method b on how many images", for correct and wrong predictions, and as
# the images get more cluttered. We build one evaluation set of 64 images with 0 to 6
# distractor shapes per image (`clutter` becomes a per-image coordinate of the result);
# `xw.evaluate` sweeps the operator (a list of values = one variant each).

# %%
levels = (0, 2, 4, 6)  # distractors per image; the models were trained with 2
parts = [xw.datasets.shapes(n=16, clutter=c, seed=20 + c).assign(clutter=("image", np.full(16, c)))
         for c in levels]
mix = xr.concat(parts, dim="image")
ml = xw.evaluate(resnet, mix, ["gradcam", "fem", "mlfem"], metrics=("pcc", "sim"),
                 preprocess=resnet_pre,
                 params={"mlfem": {"operator": ["max", "add", "top", "fem", "net"]}},
                 model_name="shapes-resnet", progress=False)
ml = ml.assign_coords(method=[m.replace("mlfem(operator=", "").rstrip(")").upper()
                              if m.startswith("mlfem") else m for m in ml.method.values])
order = ["gradcam", "fem", "MAX", "ADD", "TOP", "FEM", "NET"]
pcc = ml.pcc.sel({"method": order})
gain = float(pcc.sel({"method": "NET"}).mean() / pcc.sel({"method": "gradcam"}).mean() - 1)
print(f"accuracy: {float(ml.correct.mean()):.0%}")
print(f"mean PCC of NET vs Grad-CAM: {gain:+.0%} (the paper, on Salicon: +89%)")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
axes[0].boxplot([pcc.sel({"method": m}).values for m in order], tick_labels=order)
axes[0].set_title("PCC with the GFDM per image (↑)")
w = wins(ml.sel({"method": order}), "pcc")
im = axes[1].imshow(w, cmap="viridis")
for a in range(len(order)):
    for b in range(len(order)):
        axes[1].text(b, a, int(w[a, b]), ha="center", va="center",
                     color="w" if w[a, b] < w.max() / 2 else "k", fontsize=8)
axes[1].set_xticks(range(len(order)), order, rotation=45)
axes[1].set_yticks(range(len(order)), order)
axes[1].set_xlabel("... beats this method")
axes[1].set_ylabel("this method ...")
axes[1].set_title(f"on how many of {ml.sizes['image']} images (PCC)")
plt.colorbar(im, ax=axes[1])
plt.tight_layout()

# %% [markdown]
# Note that "MLFEM with the `fem` operator" is by definition FEM on the last block: the two
# columns agree, a useful consistency check. `NET` was trained on other images of the same
# data set to predict the GFDM, which is why it wins most duels; the fixed operators trade
# the sharpness of early layers against their noise.
#
# **Correct vs wrong predictions, and clutter.** With more distractors the classifier errs
# more often, and the explanations drift to the distractors that people (asked for the
# target) ignore.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
by_correct = pcc.groupby("correct").mean()
for k, correct in enumerate((True, False)):
    if correct in by_correct.correct.values:
        count = int((ml.correct == correct).sum())
        axes[0].bar(np.arange(len(order)) + 0.4 * k, by_correct.sel(correct=correct), 0.4,
                    label=f"{'correct' if correct else 'wrong'} ({count} images)")
axes[0].set_xticks(np.arange(len(order)) + 0.2, order)
axes[0].set_title("mean PCC by prediction")
axes[0].legend(fontsize=8)
by_clutter = pcc.groupby("clutter").mean()
for m in order:
    axes[1].plot(by_clutter.clutter, by_clutter.sel({"method": m}), "o-", label=m)
axes[1].set_xlabel("distractors per image")
axes[1].set_title("mean PCC vs clutter")
axes[1].legend(fontsize=7, ncol=2)
axes[2].plot(by_clutter.clutter, ml.correct.groupby("clutter").mean(), "ko-")
axes[2].set_ylim(0, 1.05)
axes[2].set_xlabel("distractors per image")
axes[2].set_title("accuracy vs clutter")
plt.tight_layout()

# %% [markdown]
# ## 5. Faithfulness: deletion and insertion
#
# Agreement with people is not faithfulness to the model. Petsiuk et al.'s **deletion**
# test removes pixels (sets them to black) most-relevant first and records the class
# probability: a faithful map makes it drop fast (small area under the curve). **Insertion**
# starts from a blurred image and puts the relevant pixels back first: the probability
# should rise fast (large area). A random map is the baseline every method must beat.

# %%
few = xw.Explainer(vgg, images[:8], preprocess=vgg_pre, classes=classes, progress=False)
rng = np.random.default_rng(0)
candidates = {"gradient": few.explain("gradient"), "gradcam": few.explain("gradcam"),
              "fem": few.explain("fem"),
              "random": xr.DataArray(rng.random((8, *few.size)), dims=("image", "y", "x"))}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, m in candidates.items():
    for ax, test in zip(axes, (perturbation_metrics.deletion, perturbation_metrics.insertion),
                        strict=True):
        result = test(few, m, step=0.05)
        curve = result.curve.mean("image")
        ax.plot(curve.fraction, curve, label=f"{name} (AUC {float(result.auc.mean()):.2f})")
axes[0].set_title("deletion (↓ better)")
axes[1].set_title("insertion (↑ better)")
for ax in axes:
    ax.set_xlabel("fraction of pixels removed / inserted")
    ax.set_ylabel("probability of the class")
    ax.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# Pitfall, visible here: the gradient's speckled map deletes scattered pixels, exactly like the
# random map, and the two curves coincide. Black salt-and-pepper noise is unlike anything the
# network was trained on: it answers "star" for every such image, whatever is left of the
# content, so the curve sits at 1 for the star images and 0 for the others. Deletion scores
# therefore mix the map's quality with the network's reaction to out-of-distribution inputs
# (a blurred or mean baseline, or the ROAD protocol of Rong et al. 2022, reduce this).
#
# ## 6. Sanity checks: does the map depend on the model?
#
# Adebayo et al. (2018) randomise the network's weights **cascading** from the logits down
# to the first layer and compare each new explanation with the original (Spearman rank
# correlation). A method that explains the model must produce a different map once the
# model is destroyed: its curve should fall towards 0. A method that merely detects edges
# in the image keeps its map, whatever the weights.

# %%
checks = {m: sanity.model_randomization(vgg, images[:4], m, preprocess=vgg_pre,
                                        modes=["cascading"], keep_maps=True, progress=False)
          for m in ("gradient", "guided_backprop", "gradcam")}
fig, ax = plt.subplots(figsize=(7, 3.2))
for name, result in checks.items():
    similarity = result.spearman_abs.sel(mode="cascading").mean("image")
    ax.plot(range(result.sizes["layer"]), similarity, "o-", label=name)
layers_top_down = list(checks["gradient"].layer.values)
ax.set_xticks(range(len(layers_top_down)), layers_top_down, rotation=45, ha="right")
ax.set_xlabel("randomised down to this layer (cascading, top first)")
ax.set_ylabel("Spearman |·| with the original")
ax.axhline(0, color="k", lw=0.5)
ax.legend()
plt.tight_layout()

# %%
steps = [0, 2, 5, len(layers_top_down) - 1]
fig, axes = plt.subplots(len(checks), len(steps) + 1, figsize=(2.2 * (len(steps) + 1), 6.6))
for r, (name, result) in enumerate(checks.items()):
    axes[r, 0].imshow(result.original[0], cmap="inferno")
    axes[r, 0].set_ylabel(name)
    for c, step in enumerate(steps, 1):
        axes[r, c].imshow(result.saliency.sel(mode="cascading")[step, 0], cmap="inferno")
        axes[0, c].set_title(f"random to {layers_top_down[step]}", fontsize=8)
axes[0, 0].set_title("trained")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()

# %% [markdown]
# Grad-CAM changes as soon as the classifier is random, the gradient soon after. Guided
# backprop keeps drawing the same edges until the randomisation reaches the first
# convolutions: its picture is computed by the lowest layers, not by the part of the network
# that decides. The **data randomisation** test compares with the same architecture trained
# on shuffled labels (`shapes-vgg-shuffled`, shipped): a method whose maps look the same for
# a network that learnt nothing fails it.

# %%
shuffled, _, _ = xw.models.load("shapes-vgg-shuffled")
data_checks = {m: sanity.data_randomization(vgg, shuffled, images[:8], m, preprocess=vgg_pre)
               for m in ("gradient", "guided_backprop", "gradcam", "fem")}
plt.figure(figsize=(5, 2.6))
plt.bar(list(data_checks), [float(r.spearman_abs.mean()) for r in data_checks.values()])
plt.ylabel("Spearman |·|, trained vs shuffled")
plt.title("data randomisation (↓ = depends on what was learnt)")
plt.tight_layout()
plt.show()

# %% [markdown]
# FEM stays similar: it reads the strongest *features*, and the features of a network trained
# on shuffled labels still respond to high-contrast objects. FEM explains what the network
# sees, not which class it learnt, which is consistent with it being class-agnostic.
#
# ## 7. Localisation and robustness
#
# The shapes data know where the object is (`ds.mask`), so a map can also be scored by
# **localisation** (Quantus' definitions): the **pointing game** (is the map's maximum on the
# object?), **relevance mass** (which share of the relevance lies on it) and **relevance
# rank** (which share of the |mask| highest pixels lies on it). **Sparseness** (a Gini index)
# says how concentrated a map is, whatever it points at.

# %%
loc_methods = ["gradient", "gradcam", "fem"]
loc = xw.evaluate(vgg, ds, loc_methods,
                  metrics=("pointing_game", "relevance_mass", "relevance_rank", "sparseness"),
                  preprocess=vgg_pre, model_name="shapes-vgg", progress=False)
loc[["pointing_game", "relevance_mass", "relevance_rank", "sparseness"]].mean(
    "image").reset_coords(drop=True).to_dataframe().round(3)

# %% [markdown]
# Grad-CAM and FEM put their maximum on the object for most images; the gradient's speckle
# spreads its mass over the background. Pitfall: signed maps (LRP, IG, DeepLIFT) are scored
# as they are, so negative relevance on the background counts against relevance mass.
# The pointing game has no tolerance
# here, as in Quantus; `metrics.pointing_game(maps, mask, tolerance=15)` gives the original
# paper's 15-pixel margin.
#
# **Robustness** asks whether the map is stable and specific: **max/avg sensitivity** is the
# relative change of the map when the input gets small uniform noise (lower is steadier),
# and the **random logit** test compares the map for the predicted class with the map for a
# random other class by SSIM (lower = the map depends on the class). Each metric that
# explains again runs the method once per noisy input: a few samples on 6 images here.

# %%
rob = xw.evaluate(vgg, ds.isel(image=slice(0, 6)), ["gradient", "gradcam", "fem"],
                  metrics=("max_sensitivity", "avg_sensitivity", "random_logit"),
                  preprocess=vgg_pre, model_name="shapes-vgg", progress=False,
                  metric_params={"max_sensitivity": {"n_samples": 3},
                                 "avg_sensitivity": {"n_samples": 3}})
rob[["max_sensitivity", "avg_sensitivity", "random_logit"]].mean("image").reset_coords(
    drop=True).to_dataframe().round(3)

# %% [markdown]
# FEM's random logit is exactly 1: FEM does not depend on the class at all (it explains what
# the network sees), which this test is designed to reveal. Grad-CAM's map changes with the
# class; the gradient's is noisy and moves most with the input. Every metric here has a
# direction (`metrics.METRICS[name].higher_is_better`) and its definition in the docs
# (methods, "Localisation metrics" and "Faithfulness and robustness metrics").
#
# ## Explore
#
# `CompareWidget` puts several methods side by side for one image and scores each against the
# GFDM, with the image, target class and layer as controls:

# %%
w = xw.CompareWidget(vgg, images[:4], ["gradient", "gradcam", "lrp", "fem"],
                     reference=ds.isel(image=slice(0, 4)), preprocess=vgg_pre, classes=classes)
display(w)
w.wait()  # maps are computed in the background: wait for them before reading the scores
w.scores.to_pandas().round(3)
