"""Small tensor and naming helpers shared by every layer.

>>> import torch
>>> minmax(torch.tensor([[[1.0, 3.0]]]))
tensor([[[0., 1.]]])
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

#: a map whose span (max − min) is at most this fraction of its largest magnitude is
#: constant: float32 rounding (eps ≈ 1.2e-7, a few operations) leaves spans below it,
#: e.g. a 1×1 feature map upsampled; stretching those would draw rounding noise
CONSTANT_RTOL = 1e-6


def informative(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Per map: True unless it is constant (span ≤ :data:`CONSTANT_RTOL` · max |map|).

    >>> informative(torch.tensor([[[1.0, 1.0 + 1e-8]], [[0.0, 1.0]]])).tolist()
    [False, True]
    """
    low, high = maps.amin(dim=dims), maps.amax(dim=dims)
    return (high - low) > CONSTANT_RTOL * torch.maximum(low.abs(), high.abs())


class NonFiniteWarning(RuntimeWarning):
    """A method's map holds NaN or infinite values (a float overflow)."""


def non_finite_share(raw: torch.Tensor, method: str,
                     logits: torch.Tensor | None = None) -> np.ndarray | None:
    """Per image, the share of ``raw``'s values that are NaN or infinite; ``None``
    when all are finite. Otherwise a :class:`NonFiniteWarning` names the cause (a
    float overflow) and the fixes, so no non-finite map is returned silently.

    >>> non_finite_share(torch.ones(2, 3, 3), "gradient") is None
    True
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     non_finite_share(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), "lrp").tolist()
    [0.5, 0.0]
    """
    finite = torch.isfinite(raw)
    if bool(finite.all()):
        return None
    share = (~finite).flatten(1).float().mean(1).cpu().numpy()
    images = np.flatnonzero(share).tolist()
    reach = ""
    if logits is not None:
        largest = float(logits.detach().abs().max())
        reach = f"; the model's logits reach {largest:.3g}"
    warnings.warn(
        f"{method}: {share.max():.0%} of the map of image(s) {images[:8]} is NaN or "
        f"infinite: the computation overflowed {str(raw.dtype).replace('torch.', '')} "
        f"(largest finite value {torch.finfo(raw.dtype).max:.3g}{reach}; randomly "
        "initialised deep networks often have such activations). Fix: explain a model "
        "with trained weights, or compute in float64 (model.double(): the images "
        "follow), or give a stabilised method a larger stabiliser (LRP's epsilon)",
        NonFiniteWarning, stacklevel=3)
    return share


def minmax(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Min-max normalise to [0, 1] over ``dims``; a constant map becomes all zeros.

    Constant means a span of at most :data:`CONSTANT_RTOL` times the map's largest
    magnitude (rounding noise is not stretched into contrast).

    >>> minmax(torch.full((1, 2, 2), 5.0)).sum().item()
    0.0
    >>> minmax(torch.tensor([[[5.0, 5.0 + 4e-7]]])).sum().item()
    0.0
    """
    trailing = len(dims)
    if tuple(dims) == tuple(range(-trailing, 0)) and maps.ndim >= trailing:
        # one pass for both extremes (a slider re-normalises whole FEM stacks)
        low, high = torch.aminmax(maps.flatten(-trailing), dim=-1, keepdim=True)
        low, high = (low.reshape(*low.shape[:-1], *[1] * trailing),
                     high.reshape(*high.shape[:-1], *[1] * trailing))
    else:
        low = maps.amin(dim=dims, keepdim=True)
        high = maps.amax(dim=dims, keepdim=True)
    span = high - low
    varies = span > CONSTANT_RTOL * torch.maximum(low.abs(), high.abs())
    out = (maps - low).div_(torch.where(varies, span, torch.ones_like(span)))
    # a constant map (rounding noise at most) becomes all zeros
    return out if bool(varies.all()) else out.mul_(varies)


def value_span(maps: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Per-map ``max - min`` over ``dims`` (0 for a constant map).

    >>> value_span(torch.tensor([[[1.0, 4.0]]])).tolist()
    [3.0]
    """
    return maps.amax(dim=dims) - maps.amin(dim=dims)


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per image ``(N,)`` shaped to broadcast against a batch ``like``
    (images (N,C,H,W) or clips (N,C,T,H,W)).

    >>> per_image(torch.tensor([1.0, 2.0]), torch.zeros(2, 3, 8, 4, 4)).shape
    torch.Size([2, 1, 1, 1, 1])
    """
    return values.reshape(-1, *[1] * (like.ndim - 1))


def image_span(x: torch.Tensor) -> torch.Tensor:
    """Each image's (or clip's) ``max - min`` over all its values, shaped to broadcast
    against ``x``.

    >>> image_span(torch.tensor([[[[0.0, 2.0]]], [[[1.0, 1.5]]]])).flatten().tolist()
    [2.0, 0.5]
    """
    flat = x.flatten(1)
    return per_image(flat.amax(1) - flat.amin(1), x)


def map_dims(size: Sequence[int]) -> tuple[int, ...]:
    """The trailing dims of one map for an input of spatial ``size``: (-2, -1) for
    images (H, W), (-3, -2, -1) for clips (T, H, W).

    >>> map_dims((8, 32, 32))
    (-3, -2, -1)
    """
    return tuple(range(-len(size), 0))


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize maps to ``size``: bilinear for images, trilinear for clips (align_corners=False).

    ``size`` (H, W): maps (N, H, W) or (N, C, H, W); ``size`` (T, H, W): maps
    (N, T, H, W) or (N, C, T, H, W). The result stays within each map's [min, max]
    (the interpolation weights are convex; the clamp removes rounding), so upsampling
    never invents contrast: a constant map stays exactly constant.

    >>> upsample(torch.zeros(1, 2, 2), (4, 4)).shape
    torch.Size([1, 4, 4])
    >>> upsample(torch.full((1, 1, 1), 0.1), (16, 16)).unique().numel()
    1
    >>> upsample(torch.rand(1, 2, 4, 4), (8, 16, 16)).shape
    torch.Size([1, 8, 16, 16])
    """
    size = tuple(int(s) for s in size)
    k = len(size)
    if k not in (2, 3):
        raise ValueError(f"size must be (H, W) or (T, H, W); got {size}")
    if tuple(maps.shape[-k:]) == size:
        return maps
    squeeze = maps.ndim == k + 1
    x = maps.unsqueeze(1) if squeeze else maps
    low, high = torch.aminmax(x.flatten(-k), dim=-1)
    mode = "bilinear" if k == 2 else "trilinear"
    x = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False)
    expand = (...,) + (None,) * k
    x = torch.maximum(torch.minimum(x, high[expand]), low[expand])
    return x.squeeze(1) if squeeze else x


def reduce_channels(attribution: torch.Tensor, how: str) -> torch.Tensor:
    """(N, C, ...) → (N, ...) over dim 1: ``max_abs`` (survey's RGB rule), ``sum``, ``sum_abs``.

    >>> reduce_channels(torch.tensor([[[[1.0]], [[-2.0]]]]), "max_abs").item()
    2.0
    """
    if how == "max_abs":
        return attribution.abs().amax(dim=1)
    if how == "sum":
        return attribution.sum(dim=1)
    if how == "sum_abs":
        return attribution.abs().sum(dim=1)
    raise ValueError(f"unknown reduction {how!r}; choose max_abs, sum or sum_abs")


def attr_value(value: Any) -> Any:
    """A parameter as a netCDF-safe attribute (str, number or array; never None/dict).

    >>> attr_value(None), attr_value(True), attr_value(["a", "b"])
    ('none', 1, 'a,b')
    """
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


def close_matches(word: str, options: Sequence[str], n: int = 5) -> list[str]:
    """Options that look like ``word`` (for 'did you mean' errors).

    >>> close_matches("gradcm", ["gradcam", "fem"])
    ['gradcam']
    """
    matches = difflib.get_close_matches(str(word), list(options), n=n, cutoff=0.5)
    if not matches:
        matches = [o for o in options if str(word).lower() in o.lower()][:n]
    return matches


def did_you_mean(kind: str, word: Any, options: Sequence[str]) -> str:
    """The message of an unknown-name error, with close matches and the known names.

    >>> did_you_mean("method", "gradcm", ["gradcam", "fem"])
    "unknown method 'gradcm'. Did you mean ['gradcam']? Known methods: fem, gradcam"
    """
    close = close_matches(str(word), options, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return f"unknown {kind} {word!r}.{hint} Known {kind}s: {', '.join(sorted(options))}"


def model_tag(model: nn.Module) -> str:
    """The package name a model was loaded under (``xw.models.load`` tags it), else ``""``.

    >>> model_tag(nn.Linear(1, 1))
    ''
    """
    return str(getattr(model, "xaiwidgets_name", "") or "")


def model_device(model: nn.Module, default: str | torch.device = "cpu") -> torch.device:
    """The device of a model's first parameter or buffer (``default`` when it has none).

    >>> model_device(nn.Linear(1, 1)).type
    'cpu'
    """
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device(default)


def select_logits(out: Any, output: Any = None) -> torch.Tensor:
    """The part of a model's output that holds its logits, shaped ``(N, k)``.

    ``output`` selects it: an index (tuple/list), a key (dict, or an attribute of
    an output object) or a callable; ``None`` takes ``out`` itself. One logit per
    image, ``(N,)``, becomes ``(N, 1)``. :func:`pick_logits` and :class:`LogitHead`
    (the module form) both select through it.

    >>> select_logits({"logits": torch.zeros(2, 3)}, "logits").shape
    torch.Size([2, 3])
    """
    whole = out
    try:
        if callable(output):
            out = output(out)
        elif isinstance(output, str) and not isinstance(out, Mapping):
            out = getattr(out, output)
        elif output is not None:
            out = out[output]
    except (KeyError, IndexError, AttributeError, TypeError) as error:
        raise ValueError(
            f"output={output!r} does not select anything in the model's output "
            f"({_describe_output(whole)}): {error}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"the model returns {_describe_output(out)}, not a logits tensor; say which "
            f"part holds the logits, e.g. Explainer(model, images, output={_suggest(out)!r})"
            " (a key, an index, or a callable)"
        )
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ValueError(
            f"the model must return logits of shape (N, classes); it returned shape "
            f"{tuple(out.shape)}. Pass output=<callable> to Explainer to turn it into logits."
        )
    return out


def pick_logits(out: Any, output: Any = None) -> tuple[torch.Tensor, bool]:
    """The logits ``(N, classes)`` in a model's output, and whether the model is binary.

    ``output`` selects them (:func:`select_logits`). One logit ``z`` per image,
    ``(N, 1)`` or ``(N,)``, is a binary classifier and becomes ``[-z, z]``.

    >>> pick_logits({"logits": torch.zeros(2, 3)}, "logits")[0].shape
    torch.Size([2, 3])
    >>> pick_logits(torch.tensor([[1.5]]))
    (tensor([[-1.5000,  1.5000]]), True)
    """
    out = select_logits(out, output)
    if out.shape[1] == 1:
        return torch.cat([-out, out], dim=1), True
    return out, False


class LogitHead(nn.Module):
    """:func:`pick_logits` as a module, for methods that propagate through modules
    (LRP): applied to a model's output, it gives the logits ``(N, classes)``.

    The single logit ``z`` of a binary model becomes ``[-z, z]`` through a fixed
    linear layer ``binary`` (weights ``[[-1], [1]]``, no bias): class 0 is then
    explained as the layer ``-z``, so a rule-based method attributes ``-z`` and not
    the gradient-through-a-negation ``+z``. Same values as :func:`pick_logits`.

    >>> LogitHead(output=1)((torch.zeros(1, 4), torch.tensor([[2.0]])))
    tensor([[-2.,  2.]])
    """

    def __init__(self, output: Any = None) -> None:
        super().__init__()
        self.output = output
        self.binary = nn.Linear(1, 2, bias=False)
        self.binary.weight.requires_grad_(False)
        with torch.no_grad():
            self.binary.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, out: Any) -> torch.Tensor:
        logits = select_logits(out, self.output)
        if logits.shape[1] != 1:
            return logits
        binary = self.binary.to(logits.device, logits.dtype)
        return binary(logits)


def _tensor_parts(out: Any) -> list[tuple[Any, Any]]:
    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    return [(k, v) for k, v in vars(out).items() if not k.startswith("_")] \
        if hasattr(out, "__dict__") else []


def _describe_output(out: Any) -> str:
    parts = [f"{k!r}: {tuple(v.shape)}" for k, v in _tensor_parts(out)
             if isinstance(v, torch.Tensor)]
    shape = f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""
    return f"a {type(out).__name__}{shape}" + (f" with tensors {{{', '.join(parts)}}}"
                                               if parts else "")


def _suggest(out: Any) -> Any:
    parts = [(k, v) for k, v in _tensor_parts(out) if isinstance(v, torch.Tensor)]
    for key, _ in parts:
        if isinstance(key, str) and "logit" in key.lower():
            return key
    matrices = [k for k, v in parts if v.ndim == 2]
    return matrices[0] if matrices else (parts[0][0] if parts else 0)


def image_seeds(images: torch.Tensor, seed: int) -> list[int]:
    """One seed per image, derived from ``seed`` and the image's content (a hash).

    Seeded methods (SmoothGrad, LIME, meaningful perturbation) draw each image's
    randomness from its own generator seeded this way, so an image gets the same map
    alone (the widget) or in any batch and chunking (``explain``, ``evaluate``).
    The hash covers the float32 values of the image (model-input space).

    >>> x = torch.rand(3, 3, 4, 4)
    >>> image_seeds(x, 0)[1] == image_seeds(x[1:2], 0)[0] != image_seeds(x[1:2], 1)[0]
    True
    """
    values = images.detach().to("cpu", torch.float32).contiguous().numpy()
    seeds = []
    for image in values:
        digest = hashlib.blake2b(image.tobytes(), digest_size=8).digest()
        sequence = np.random.SeedSequence([int(seed), int.from_bytes(digest, "little")])
        seeds.append(int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return seeds


def image_generators(images: torch.Tensor, seed: int) -> list[torch.Generator]:
    """Torch generators on the images' device, seeded by :func:`image_seeds`."""
    return [torch.Generator(device=images.device).manual_seed(s)
            for s in image_seeds(images, seed)]


def per_image_randn(generators: Sequence[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (N, ...), row i from ``generators[i]``.

    >>> g = image_generators(torch.zeros(2, 1, 2, 2), 0)
    >>> per_image_randn(g, torch.zeros(2, 1, 2, 2)).shape
    torch.Size([2, 1, 2, 2])
    """
    return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device,
                                    dtype=like.dtype) for g in generators])
