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

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from . import layers as _layers
from .hooks import RecordOverwritten, capture, model_guard
from .registry import Method, get_method

ProgressCallback = Callable[[int, int], None]

REDUCTIONS = ("default", "sum", "sum_abs", "max_abs", None)


def as_image_batch(images: Any, name: str = "images") -> torch.Tensor:
    """Validate and return ``images`` as a float tensor of shape (N, 3, H, W).

    Accepts a tensor or numpy array of shape (3, H, W) or (N, 3, H, W); rejects
    other shapes, grayscale, integer dtypes and NaN/inf with a message saying how to fix it.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, xr.DataArray):
        images = torch.from_numpy(np.asarray(images.values))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N,3,H,W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(
            f"{name} must have shape (N,3,H,W) or (3,H,W); got shape {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        raise ValueError(
            f"{name} look grayscale (1 channel, shape {tuple(images.shape)}); "
            "CNN classifiers take RGB: use images.repeat(1, 3, 1, 1)"
        )
    if images.shape[1] != 3 and images.shape[-1] == 3:
        raise ValueError(
            f"{name} look channels-last (shape {tuple(images.shape)}); "
            "use images.permute(0, 3, 1, 2) to get (N,3,H,W)"
        )
    if images.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (N,3,H,W); got shape {tuple(images.shape)}")
    if not torch.is_floating_point(images):
        raise TypeError(
            f"{name} have dtype {images.dtype}; pass floats, e.g. images.float() / 255 "
            "for uint8 pictures"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf values; clean them before explaining")
    return images


def minmax(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Min-max normalise to [0, 1] over ``dims``; a constant map becomes all zeros."""
    if tuple(dims) == (-2, -1) and maps.ndim >= 2:
        # one pass for both extremes (a slider re-normalises whole FEM stacks)
        low, high = torch.aminmax(maps.flatten(-2), dim=-1, keepdim=True)
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)
    else:
        low = maps.amin(dim=dims, keepdim=True)
        high = maps.amax(dim=dims, keepdim=True)
    span = high - low
    # a constant map has maps - low == 0 everywhere: dividing by 1 keeps it all zeros
    return (maps - low).div_(torch.where(span > 0, span, torch.ones_like(span)))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (N, H, W) or (N, C, H, W) maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    squeeze = maps.ndim == 3
    x = maps.unsqueeze(1) if squeeze else maps
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.squeeze(1) if squeeze else x


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

    The forward pass (logits and activations of the layers asked for) is cached,
    so predictions, FEM and MLFEM parameter changes never run the model again.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Any,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
        progress: bool | ProgressCallback = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.preprocess = preprocess
        self.classes = list(classes) if classes is not None else None
        self.progress = progress
        self._cache: dict[str, Any] = {}
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
        self.images = images
        self.inputs = self.preprocess(images) if self.preprocess is not None else images
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget cached logits and activations (done automatically when weights change)."""
        self._cache = {"fingerprint": self._fingerprint(), "acts": {}}

    def _fingerprint(self) -> tuple:
        # parameters edited in place bump their version counter: the cache then
        # refers to another model and must go (sanity checks randomise weights)
        return tuple((id(t), t._version) for t in self.model.state_dict(keep_vars=True).values())

    def _valid_cache(self) -> dict[str, Any]:
        if self._cache.get("fingerprint") != self._fingerprint():
            self.clear_cache()
        return self._cache

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.inputs.shape[-2]), int(self.inputs.shape[-1])

    # ------------------------------------------------------------------ passes
    def forward(
        self,
        x: torch.Tensor | None = None,
        layers: Sequence[str] = (),
        grad: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One model pass on ``x`` (default: the inputs), recording ``layers``' outputs.

        Runs in eval mode with hooks that are removed on exit. With ``grad=False``
        it runs without autograd. Not cached: see :meth:`logits` and :meth:`activations`.
        """
        x = self.inputs if x is None else x
        modules = {name: _layers.resolve_layer(self.model, name) for name in layers}
        # without autograd the records are not copied (MLFEM records 16 blocks); a
        # model that changes a recorded output in place gets a second, copying pass
        copies = (True,) if grad or not modules else (False, True)
        for copy in copies:
            context = torch.enable_grad() if grad else torch.no_grad()
            try:
                with (model_guard(self.model), capture(modules, detach=not grad, copy=copy)
                      as acts, context):
                    logits = self.model(x)
                break
            except RecordOverwritten:
                continue
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = getattr(logits, "shape", type(logits).__name__)
            raise ValueError(
                f"the model must return logits of shape (N, classes); it returned {shape}"
            )
        return logits, dict(acts)

    def logits(self) -> torch.Tensor:
        """Cached logits (N, classes) of the images (one forward pass, no autograd)."""
        cache = self._valid_cache()
        if "logits" not in cache:
            cache["logits"], _ = self.forward()
        return cache["logits"]

    def activations(self, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached outputs of ``layers`` (detached); runs the model only for missing layers."""
        cache = self._valid_cache()
        missing = [name for name in layers if name not in cache["acts"]]
        if missing:
            logits, acts = self.forward(layers=missing)
            cache["acts"].update(acts)
            cache.setdefault("logits", logits)
        return {name: cache["acts"][name] for name in layers}

    @property
    def num_classes(self) -> int:
        return int(self.logits().shape[1])

    def layers(self) -> list[str]:
        """Names usable as ``layer=``, in forward order: convolutions and block outputs."""
        return _layers.candidate_layers(self.model)

    def block_layers(self) -> list[str]:
        """The block outputs (residual blocks, or each conv's activation): MLFEM's layers."""
        return _layers.block_outputs(self.model)

    def default_layer(self) -> str:
        """Last convolutional block: the default layer of Grad-CAM and FEM."""
        return _layers.default_layer(self.model)

    def fem_stack(self, layers: Sequence[str] | str | None = None, K: float = 1.0) -> xr.DataArray:
        """Each layer's FEM map (default: every block output), dims ("image","layer","y","x").

        Maps are at input size and min-max normalised; a ``K`` change re-uses the
        cached activations. Fuse them with :func:`xaiwidgets.fuse`.
        """
        from .families.fem import fem_stack

        return fem_stack(self, layers, K)

    def predict(self, top: int = 5) -> xr.DataArray:
        """Top-``top`` class probabilities per image, dims ("image", "rank").

        Coordinates ``label`` (class index) and ``class_name`` (when classes are known).
        """
        probs = torch.softmax(self.logits().float(), dim=1)
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

    def resolve_target(self, target: Any) -> torch.Tensor:
        """One class index per image: ``None`` = predicted class; int; or a sequence."""
        n, classes = self.n_images, self.num_classes
        if target is None:
            return self.logits().argmax(dim=1)
        if isinstance(target, torch.Tensor):
            target = target.tolist()
        elif isinstance(target, np.ndarray):
            target = target.tolist()
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            values = [int(target)] * n
        elif isinstance(target, (list, tuple)):
            if len(target) != n:
                raise ValueError(
                    f"got {len(target)} targets for {n} images; pass one int per image, "
                    "a single int, or None for the predicted classes"
                )
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                       for t in target):
                raise TypeError(f"targets must be class indices (ints), got {target!r}")
            values = [int(t) for t in target]
        else:
            raise TypeError(
                f"target must be an int, a sequence of ints or None, got {type(target).__name__}"
            )
        bad = [t for t in values if not 0 <= t < classes]
        if bad:
            raise ValueError(
                f"target class {bad[0]} is out of range: the model has {classes} classes "
                f"(valid: 0..{classes - 1})"
            )
        return torch.tensor(values, device=self.device, dtype=torch.long)

    # ------------------------------------------------------------ gradients
    def input_gradient(
        self, x: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """∂ logit[target] / ∂ x for a batch ``x`` (one target per row), in chunks.

        Chunks of ``batch_size`` rows bound memory (IG steps, SmoothGrad samples).
        Call inside a ``relu_backward`` block for guided backprop / DeconvNet.
        """
        batch_size = batch_size or len(x)
        grads = torch.empty_like(x)
        chunks = range(0, len(x), batch_size)
        for done, start in enumerate(chunks, 1):
            stop = start + batch_size
            xb = x[start:stop].detach().requires_grad_(True)
            logits, _ = self.forward(xb, grad=True)
            score = logits.gather(1, target[start:stop, None]).sum()
            (grads[start:stop],) = torch.autograd.grad(score, xb)
            self.report_progress(done, len(chunks))
        return grads

    def summed_input_gradient(
        self,
        sample: Callable[[int], torch.Tensor],
        n: int,
        target: torch.Tensor,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Σ_k ∂ logit[target] / ∂ x at the inputs ``sample(k)``, k < n; (N, C, H, W).

        ``sample(k)`` returns the k-th sample of every image, shaped like the inputs.
        The n·N rows run ``batch_size`` at a time and each sample is built only when
        its rows are due, so memory is bounded by ``batch_size`` whatever ``n`` is
        (IG steps, SmoothGrad samples). Call inside ``relu_backward`` for the ReLU rules.
        """
        n_img = self.n_images
        total = n * n_img
        batch_size = batch_size or total
        summed = torch.zeros_like(self.inputs)
        pending: list[torch.Tensor] = []  # rows built but not run yet, in row order
        n_pending, k, row = 0, 0, 0
        n_chunks = -(-total // batch_size)
        for done in range(1, n_chunks + 1):
            while n_pending < batch_size and k < n:
                pending.append(sample(k))
                n_pending, k = n_pending + n_img, k + 1
            rows = torch.cat(pending) if len(pending) > 1 else pending[0]
            take = min(batch_size, n_pending)
            pending = [rows[take:]] if take < n_pending else []
            n_pending -= take
            xb = rows[:take].detach().requires_grad_(True)
            image = torch.arange(row, row + take, device=xb.device) % n_img
            logits, _ = self.forward(xb, grad=True)
            (grad,) = torch.autograd.grad(logits.gather(1, target[image, None]).sum(), xb)
            # add each row's gradient to its image's sum; a one-hot matmul is
            # deterministic on GPUs, unlike index_add_
            onehot = torch.nn.functional.one_hot(image, n_img).to(grad.dtype)
            summed += (onehot.T @ grad.flatten(1)).view_as(summed)
            row += take
            self.report_progress(done, n_chunks)
        return summed

    def layer_gradient(
        self, layer: str, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation of ``layer`` and ∂ logit[target] / ∂ activation, both (N, C, h, w)."""
        logits, acts = self.forward(layers=[layer], grad=True)
        activation = acts[layer]
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, activation)
        return activation.detach(), grad

    def scores(self, x: torch.Tensor, target: torch.Tensor, batch_size: int = 64,
               softmax: bool = False) -> torch.Tensor:
        """Target logits (or probabilities) of many inputs ``x`` without autograd, in chunks.

        ``target`` is one class per row of ``x`` (or a single class for all rows).
        """
        if target.ndim == 0 or len(target) == 1:
            target = target.reshape(1).expand(len(x))
        out = []
        chunks = range(0, len(x), batch_size)
        for done, start in enumerate(chunks, 1):
            logits, _ = self.forward(x[start:start + batch_size])
            if softmax:
                logits = torch.softmax(logits, dim=1)
            out.append(logits.gather(1, target[start:start + batch_size, None])[:, 0])
            if len(chunks) > 1:  # a one-chunk call is a step of its caller's progress loop
                self.report_progress(done, len(chunks))
        return torch.cat(out)

    def report_progress(self, done: int, total: int) -> None:
        """Forward progress to the callback, if the caller gave one."""
        if callable(self.progress):
            self.progress(done, total)

    def progress_bar(self, iterable: Any, total: int, desc: str) -> Any:
        """Wrap long loops in tqdm (when ``progress=True``) or the callback."""
        if callable(self.progress):
            def tracked():
                for i, item in enumerate(iterable, 1):
                    yield item
                    self.progress(i, total)
            return tracked()
        if self.progress and total >= 20:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False)
        return iterable

    # ------------------------------------------------------------- explain
    def explain(
        self,
        method: str,
        target: Any = None,
        layer: str | None = None,
        reduce: str | None = "default",
        **params: Any,
    ) -> xr.DataArray:
        """Explain the images with ``method``; a float32 ``xr.DataArray`` at input size.

        Dims ``("image", "y", "x")``, or ``("image", "channel", "y", "x")`` with
        ``reduce=None`` for pixel-space methods. ``attrs`` record the method,
        target, layer, reduction and every parameter used (defaults included).

        >>> ex.explain("integrated_gradients", target=3, steps=64)  # doctest: +SKIP
        """
        m = get_method(method)
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not valid; choose one of {list(REDUCTIONS)}")
        resolved = m.bind(self, m.resolve_params(params))
        if layer is not None and not m.uses_layer:
            raise TypeError(
                f"method {m.name!r} does not take a layer; layer methods: "
                "gradcam, guided_gradcam, fem (mlfem takes layers=)"
            )
        if m.uses_layer:
            layer = layer if layer is not None else m.default_layer(self)
            if layer is not None:
                _layers.resolve_layer(self.model, layer)
        with model_guard(self.model):
            if m.class_agnostic:
                # the target only labels the result: computing first lets the forward
                # that fills the activation cache also give the logits target=None
                # needs, instead of a second forward pass
                raw = m.attribute(self, None, layer, **resolved)
                target_t = self.resolve_target(target)
            else:
                target_t = self.resolve_target(target)
                raw = m.attribute(self, target_t, layer, **resolved)
        return self.pack(raw, m, target_t, layer, reduce, resolved)

    def pack(
        self,
        raw: torch.Tensor,
        method: Method,
        target: torch.Tensor,
        layer: str | None,
        reduce: str | None,
        params: dict[str, Any],
    ) -> xr.DataArray:
        """Reduce, upsample and label a method's raw output as a DataArray."""
        raw = raw.detach()
        how = method.default_reduce if reduce == "default" else reduce
        if raw.ndim == 4 and how is not None and how != "map":
            raw = reduce_channels(raw, how)
        raw = upsample(raw.float(), self.size)
        if raw.ndim == 3 and method.normalize_output:
            raw = minmax(raw)
        dims = ("image", "y", "x") if raw.ndim == 3 else ("image", "channel", "y", "x")
        coords: dict[str, Any] = {
            "image": np.arange(self.n_images),
            "y": np.arange(raw.shape[-2]),
            "x": np.arange(raw.shape[-1]),
            "target": ("image", target.cpu().numpy()),
        }
        if raw.ndim == 4:
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
        }
        attrs.update({k: attr_value(v) for k, v in params.items()})
        attrs["params"] = json.dumps({k: attr_value(v) for k, v in params.items()})
        return xr.DataArray(
            raw.to(torch.float32).cpu().numpy(), dims=dims, coords=coords, attrs=attrs,
            name=method.name,
        )


def reduce_channels(attribution: torch.Tensor, how: str) -> torch.Tensor:
    """(N, C, H, W) → (N, H, W): ``max_abs`` (survey's RGB rule), ``sum``, ``sum_abs``."""
    if how == "max_abs":
        return attribution.abs().amax(dim=1)
    if how == "sum":
        return attribution.sum(dim=1)
    if how == "sum_abs":
        return attribution.abs().sum(dim=1)
    raise ValueError(f"unknown reduction {how!r}")


def attr_value(value: Any) -> Any:
    """A parameter as a netCDF-safe attribute (str, number or array; never None/dict)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if isinstance(value, torch.Tensor):
        return "tensor" if value.numel() > 1 else float(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return ",".join(value)
        return np.asarray(value)
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)


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
