"""The Explainer: one model, a batch of images, cached passes, xarray results.

>>> import torch, xaiwidgets as xw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
...                             torch.nn.Linear(4, 2))
>>> ex = xw.Explainer(model, torch.rand(2, 3, 16, 16))
>>> ex.explain("gradient", target=1).dims
('image', 'y', 'x')
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from .core import channels as _channels
from .core import layers as _layers
from .core import memory as _memory
from .core import tokens as _tokens
from .core.context import Context, OutputSelector, ProgressCallback
from .core.inputs import as_image_batch, channel_mismatch
from .core.ops import (
    attr_value,
    informative,
    map_dims,
    minmax,
    non_finite_share,
    reduce_channels,
    upsample,
)
from .core.registry import (
    ACTIVATION,
    Method,
    channel_measures,
    conditional_methods,
    get_method,
    layer_methods,
    methods,
)
from .core.scoped import model_guard

REDUCTIONS = ("default", "sum", "sum_abs", "max_abs", None)
#: the method whose per-layer maps :meth:`Explainer.fem_stack` gives (FEM by definition)
FEM_METHOD = "fem"

class Explainer:
    """Explain a CNN classifier's decisions on a batch of images.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` classifier returning logits ``(N, classes)``.
    images
        Float tensor ``(N,3,H,W)`` or ``(3,H,W)``: display images in [0, 1] when
        ``preprocess`` is given, else the model's input directly.
    preprocess
        Optional callable mapping display images to the model input (normalisation).
    classes
        Optional class names, indexed by class.
    progress
        ``True``/``False`` for a tqdm bar on long work, or a callable ``(done, total)``
        (the widgets pass one to drive their progress bar).
    output
        For models returning a tuple, a dict or an output object: which part holds the
        logits, an index (``output=0``), a key (``output="logits"``) or a callable.
        A model returning one logit per image is a binary classifier: classes 0 and 1
        are explained by ``-z`` and ``z``, and :meth:`predict` uses the sigmoid.
    grid
        Vision transformers: the patch grid ``(h, w)`` of token layers (or
        ``{layer: (h, w)}``), only where the model and the input size do not tell it
        (an error then says so; :mod:`xaiwidgets.core.tokens`).

    A model compiled with ``torch.compile`` is explained through the module it wraps
    (``_orig_mod``: same weights, layer names without the prefix). One pass on the
    first image checks the output and records the layers' shapes at construction;
    a model already probed with images of this shape is not run again (the facts are
    remembered per model: :mod:`xaiwidgets.core.probe`).

    The forward pass (logits and activations of the layers asked for) is cached,
    so predictions, FEM and MLFEM parameter changes never run the model again.

    >>> import xaiwidgets as xw
    >>> model, preprocess, classes = xw.models.load("shapes-vgg")
    >>> images = xw.datasets.shapes(n=2, seed=1).image.values
    >>> ex = xw.Explainer(model, images, preprocess=preprocess, classes=classes)
    >>> ex.explain("gradcam").dims
    ('image', 'y', 'x')
    """

    def __init__(
        self,
        model: nn.Module,
        images: Any,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
        progress: bool | ProgressCallback = True,
        output: OutputSelector = None,
        grid: tuple[int, int] | dict[str, tuple[int, int]] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            hint = ("; xw.models.load returns (model, preprocess, classes): unpack it, "
                    "`model, preprocess, classes = xw.models.load(...)`, and pass "
                    "preprocess= and classes= too" if isinstance(getattr(model, "model", None),
                                                                nn.Module) else "")
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
        self.model = _layers.unwrap(model)
        self.preprocess = preprocess
        self.classes = list(classes) if classes is not None else None
        self.progress = progress
        self.output = output
        self.grid = grid
        self.set_images(images)

    # ------------------------------------------------------------------ images
    def set_images(self, images: Any) -> None:
        """Replace the images (and drop every cached pass)."""
        images = as_image_batch(images)
        if self.preprocess is not None:
            low, high = float(images.min()), float(images.max())
            if low < -1e-3 or high > 1 + 1e-3:
                raise ValueError(
                    f"with preprocess=..., images must be display images in [0, 1]; got values "
                    f"in [{low:.3g}, {high:.3g}]. Pass preprocess=None if they are already "
                    "the model's input."
                )
        params = next(self.model.parameters(), None)
        if params is not None and params.device != images.device:
            raise ValueError(
                f"the model is on {params.device} but the images are on {images.device}; "
                f"move one of them, e.g. model.to({str(images.device)!r})"
            )
        if params is not None and params.dtype != images.dtype:
            images = images.to(params.dtype)
        self.context = Context(self.model, images, self.preprocess, self.progress,
                               self.output, self.grid)
        # one pass on one image: the output is usable, the classes fit, the layers' shapes
        try:
            self.context.shapes()
        except RuntimeError as error:  # e.g. grayscale images for an RGB model
            mismatch = channel_mismatch(self.model, self.context.inputs)
            if mismatch is None:
                raise
            raise mismatch from error
        except AssertionError as error:  # a ViT built for another input size
            mismatch = _tokens.size_mismatch(self.model, self.context.inputs, error)
            if mismatch is None:
                raise
            raise mismatch from error
        if self.classes is not None:
            classes = self.context.probe_classes
            if len(self.classes) != classes:
                raise ValueError(
                    f"got {len(self.classes)} class names for a model with {classes} "
                    f"outputs{' (a single logit: binary)' if self.context.binary else ''}; "
                    "pass one name per class, in the order of the model's outputs"
                )

    # the context's inputs and passes, under the Explainer's name
    @property
    def images(self) -> torch.Tensor:
        """The display images (N, C, H, W) being explained."""
        return self.context.images

    @property
    def inputs(self) -> torch.Tensor:
        """The model inputs: ``preprocess(images)``, or the images themselves."""
        return self.context.inputs

    # what users read about the model and images; a method's passes and gradients
    # (forward, input_gradient, layer_gradient, ...) are on ``ex.context``
    @property
    def device(self) -> torch.device:
        """The images' (and the model's) device."""
        return self.context.device

    @property
    def n_images(self) -> int:
        """Number of images being explained."""
        return self.context.n_images

    @property
    def size(self) -> tuple[int, ...]:
        """The model inputs' spatial size (H, W), or (T, H, W) for video clips."""
        return self.context.size

    @property
    def num_classes(self) -> int:
        """Number of classes (the logits' width); runs no pass."""
        return self.context.num_classes

    def logits(self) -> torch.Tensor:
        """Cached logits (N, classes) of the images (one pass, no autograd)."""
        return self.context.logits()

    def activations(self, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached outputs of ``layers`` as (N, C, h, w), by name; runs the model only
        for layers not cached yet."""
        return self.context.activations(layers)

    def layers(self) -> list[str]:
        """Names usable as ``layer=``, in forward order: convolutions and block outputs."""
        return self.context.layers()

    def block_layers(self) -> list[str]:
        """The block outputs (residual blocks, or each conv's activation): MLFEM's layers."""
        return self.context.block_layers()

    def default_layer(self) -> str:
        """The layer Grad-CAM and FEM use by default: the last one with a spatial output."""
        return self.context.default_layer()

    def resolve_target(self, target: Any) -> torch.Tensor:
        """One class index per image: ``None`` = the predicted class; an int; a sequence."""
        return self.context.resolve_target(target)

    def scores(self, x: torch.Tensor, target: torch.Tensor, batch_size: int = 64,
               softmax: bool = False) -> torch.Tensor:
        """Target logits (or probabilities) of model inputs ``x``, without autograd, in
        chunks of ``batch_size`` (one class per row, or one for all rows)."""
        return self.context.scores(x, target, batch_size=batch_size, softmax=softmax)

    def clear_cache(self) -> None:
        """Forget the cached passes (done automatically when the weights change)."""
        self.context.clear_cache()

    def fem_stack(self, layers: Sequence[str] | str | None = None, K: float = 1.0) -> xr.DataArray:
        """Each layer's FEM map (default: every block output), dims ("image","layer","y","x").

        Maps are at input size and min-max normalised; a ``K`` change re-uses the
        cached activations. Fuse them with :func:`xaiwidgets.fuse`.
        """
        # through the registry: the Explainer imports no method family
        return get_method(FEM_METHOD).stack(self.context, layers, K)

    def channels(self, layer: str | None = None, method: str = "lrp", target: Any = None,
                 **params: Any) -> xr.DataArray:
        """Each channel's contribution at ``layer``, dims ("image", "channel").

        ``method``: ``"lrp"`` (the relevance reaching the channel, R_k), ``"gradcam"``
        (α_k·Σ A_k), ``"fem"`` (the channel's share of the FEM map) or ``"activation"``
        (the channel's maximum); ``params`` are the method's (``composite=``, ``K=``).
        ``layer`` defaults to the last feature map. On a kept LRP forward a target or
        parameter change costs one backward pass down to the layer, no model call.

        >>> ex.channels("features.27", "lrp", target=3).argmax("channel")  # doctest: +SKIP
        """
        if method not in channel_measures():
            raise ValueError(f"method={method!r} has no channel measure; choose one of "
                             f"{channel_measures()}")
        ctx = self.context
        layer = layer if layer is not None else ctx.default_layer()
        _layers.resolve_layer(self.model, layer)
        _channels.channel_count(ctx, layer)  # a layer without channels fails here
        m = None if method == ACTIVATION else get_method(method)
        resolved = {} if m is None else m.bind(ctx, m.resolve_params(params))
        if m is None and params:
            raise TypeError(f"the activation measure takes no parameters, got {sorted(params)}")
        with model_guard(self.model, exclusive=m is not None and m.changes_model,
                         keep_inplace=m is None or m.forward_only):
            if m is None:  # the activation measure ignores the target
                terms, target_t = _with_target(
                    ctx, "ignored", target,
                    lambda _: _channels.activation_terms(ctx.activations([layer])[layer]))
            else:
                m.check(ctx, layer, resolved)  # its refusals (LRP on attention, FEM's layers)
                terms, target_t = _with_target(
                    ctx, m.targets, target,
                    lambda given: m.channel_terms(ctx, given, layer, **resolved))
        coords: dict[str, Any] = {"image": np.arange(self.n_images),
                                  "channel": np.arange(terms.shape[1]),
                                  "target": ("image", target_t.cpu().numpy())}
        if self.classes is not None:
            coords["class_name"] = ("image", [self.classes[t] for t in target_t.tolist()])
        attrs = {"method": method, "layer": layer, "target": target_t.cpu().numpy(),
                 **{k: attr_value(v) for k, v in resolved.items()},
                 "params": json.dumps({k: attr_value(v) for k, v in resolved.items()})}
        return xr.DataArray(terms.detach().float().cpu().numpy(), dims=("image", "channel"),
                            coords=coords, attrs=attrs, name="channel_" + method)

    def predict(self, top: int = 5) -> xr.DataArray:
        """Top-``top`` class probabilities per image, dims ("image", "rank").

        Coordinates ``label`` (class index) and ``class_name`` (when classes are known).
        """
        probs = self.context.probabilities(self.logits().float())
        top = max(1, min(int(top), probs.shape[1]))
        values, indices = probs.topk(top, dim=1)
        idx = indices.cpu().numpy()
        coords: dict[str, Any] = {
            "image": np.arange(self.n_images),
            "rank": np.arange(top),
            "label": (("image", "rank"), idx),
        }
        if self.classes is not None:
            coords["class_name"] = (("image", "rank"), np.asarray(self.classes, dtype=object)[idx])
        return xr.DataArray(
            values.cpu().numpy(), dims=("image", "rank"), coords=coords, name="probability"
        )

    # ------------------------------------------------------------- explain
    def explain(
        self,
        method: str,
        target: Any = None,
        layer: str | None = None,
        reduce: str | None = "default",
        channels: Sequence[int] | None = None,
        **params: Any,
    ) -> xr.DataArray:
        """Explain the images with ``method``; a float32 ``xr.DataArray`` at input size.

        Dims ``("image", "y", "x")``, or ``("image", "channel", "y", "x")`` with
        ``reduce=None`` for pixel-space methods; for video clips (N, C, T, H, W),
        ``("image", "t", "y", "x")`` (maps normalised over the whole clip) or
        ``("image", "channel", "t", "y", "x")``. ``attrs`` record the method,
        target, layer, reduction and every parameter used (defaults included).

        ``channels=[k, ...]``: the conditional map in which only these channels of
        ``layer`` contribute (lrp, gradcam, guided_gradcam, fem; ``layer`` defaults to
        the last feature map, also for lrp); recorded in ``attrs["channels"]``.

        >>> ex.explain("integrated_gradients", target=3, steps=64)  # doctest: +SKIP
        >>> ex.explain("lrp", layer="features.27", channels=[3, 7])  # doctest: +SKIP
        """
        m = get_method(method)
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not valid; choose one of {list(REDUCTIONS)}")
        ctx = self.context
        resolved = m.bind(ctx, m.resolve_params(params))
        if channels is not None and not m.has_conditional:
            raise ValueError(f"method {m.name!r} has no conditional map (channels=); use one "
                             f"of {conditional_methods()}")
        if layer is not None and not m.uses_layer and channels is None:
            several = [f"{n} (layers=)" for n in methods()
                       if "layers" in {p.name for p in get_method(n).params}]
            raise TypeError(f"method {m.name!r} does not take a layer; layer methods: "
                            f"{', '.join(layer_methods() + several)}")
        if m.uses_layer or channels is not None:
            layer = layer if layer is not None else (
                m.default_layer(ctx) if m.uses_layer else ctx.default_layer())
            if layer is not None:
                _layers.resolve_layer(self.model, layer)
        attribute = m.attribute
        if channels is not None:
            chosen = _channels.check_channels(ctx, layer, channels)
            attribute = functools.partial(m.conditional, channels=chosen)
        if ctx.is_clip and m.clip_refusal:
            usable = [n for n in methods() if not get_method(n).clip_refusal]
            raise ValueError(
                f"method {m.name!r} does not support video clips (N,C,T,H,W): "
                f"{m.clip_refusal}; on clips use one of {', '.join(usable)}"
            )
        with (model_guard(self.model, exclusive=m.changes_model, keep_inplace=m.forward_only),
              ctx.recording() as extra):
            m.check(ctx, layer, resolved)
            raw, target_t = _with_target(
                ctx, m.targets, target, lambda given: attribute(ctx, given, layer, **resolved))
        if channels is not None:
            extra["channels"] = chosen.tolist()
        packed = self.pack(raw, m, target_t, layer, reduce, resolved, extra)
        # the call's transient buffers are freed: hand the heap pages back to the OS
        # (glibc keeps them otherwise; rate-limited, see core.memory)
        _memory.release_memory()
        return packed

    def pack(
        self,
        raw: torch.Tensor,
        method: Method,
        target: torch.Tensor,
        layer: str | None,
        reduce: str | None,
        params: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> xr.DataArray:
        """Reduce, upsample and label a method's raw output as a DataArray.

        ``extra``: attrs the method recorded with ``Context.record`` (e.g. ``delta_error``).
        """
        raw = raw.detach()
        # a NaN/inf map never goes out silently: a warning names the overflow and the fix
        non_finite = None if bool(torch.isfinite(raw).all()) else non_finite_share(
            raw, method.name, self.context.cached_logits())
        how = method.default_reduce if reduce == "default" else reduce
        # one map per image is (N, H, W), or (N, T, H, W) for clips; one more dim = channels
        volume = ("t", "y", "x")[-len(self.size):]
        per_channel = raw.ndim == 2 + len(volume)
        if per_channel and how is not None and how != "map":
            raw = reduce_channels(raw, how)
            per_channel = False
        # a constant map carries no information: it stays constant (all zeros once
        # normalised) and the result says so
        flat = raw.float().flatten(1)[:, None] if per_channel else raw.float().flatten(1)
        useful = informative(flat, dims=(-1,))
        raw = upsample(raw.float(), self.size)
        if not per_channel and method.normalize_output:
            # clips: normalised over the whole (t, y, x) volume, like the FEM statistics
            raw = minmax(raw, dims=map_dims(self.size))
        dims = ("image", *volume) if not per_channel else ("image", "channel", *volume)
        coords: dict[str, Any] = {
            "image": np.arange(self.n_images),
            **{dim: np.arange(n) for dim, n in zip(volume, raw.shape[-len(volume):], strict=True)},
            "target": ("image", target.cpu().numpy()),
        }
        if per_channel:
            coords["channel"] = np.arange(raw.shape[1])
        if self.classes is not None:
            coords["class_name"] = ("image", [self.classes[t] for t in target.tolist()])
        attrs = {
            "method": method.name,
            "target": target.cpu().numpy(),
            "layer": layer or "",
            "reduce": str(how),
            "signed": int(method.signed and how not in ("max_abs", "sum_abs")),
            "class_agnostic": int(method.class_agnostic),
            # per image: 0 when the map is constant (see docs/methods.md)
            "informative": useful.reshape(-1).int().cpu().numpy(),
        }
        attrs.update({k: attr_value(v) for k, v in params.items()})
        attrs["params"] = json.dumps({k: attr_value(v) for k, v in params.items()})
        attrs.update({k: attr_value(v) for k, v in (extra or {}).items()})
        if non_finite is not None:  # per image: the share of NaN/inf values
            attrs["non_finite"] = non_finite
        return xr.DataArray(
            raw.to(torch.float32).cpu().numpy(), dims=dims, coords=coords, attrs=attrs,
            name=method.name,
        )


def _with_target(ctx: Context, targets: str, target: Any,
                compute: Callable[[torch.Tensor | None], torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute(t)`` with the ``t`` a method's ``targets`` declares, and the resolved
    targets (one class index per image) that label its result.

    ``"ignored"``: ``t`` is ``None``; computing first lets the pass that fills the
    activation cache also give the predictions. ``"from_own_pass"`` (no logits cached
    yet): ``t`` is ``None`` or the parsed given targets; the method's own pass gives the
    predicted classes (and checks given ones), so no prediction pass runs before it.
    Otherwise (``"resolved"``) ``t`` is the resolved targets.

    >>> ctx = Context(torch.nn.Flatten(), torch.rand(2, 3, 1, 1))
    >>> _with_target(ctx, "ignored", 1, lambda t: torch.zeros(2))[1].tolist()
    [1, 1]
    """
    if targets == "ignored" or (targets == "from_own_pass"
                                and ctx.cached_logits() is None):
        given = None if targets == "ignored" or target is None else ctx.parse_target(target)
        result = compute(given)
        return result, ctx.resolve_target(target)
    resolved = ctx.resolve_target(target)
    return compute(resolved), resolved


def explain(
    model: nn.Module,
    images: Any,
    method: str,
    target: Any = None,
    layer: str | None = None,
    reduce: str | None = "default",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    classes: Sequence[str] | None = None,
    **params: Any,
) -> xr.DataArray:
    """One-shot form of ``Explainer(model, images, ...).explain(method, ...)``.

    >>> xw.explain(model, images, "gradcam", target=0)  # doctest: +SKIP
    """
    ex = Explainer(model, images, preprocess=preprocess, classes=classes)
    return ex.explain(method, target=target, layer=layer, reduce=reduce, **params)
