"""DeepLIFT with the rescale rule (Shrikumar et al. 2017).

The input batch x and the reference batch x' run through the model together as one
batch [x; x'], so every non-linearity sees each input next to its own reference, even
when one module is called twice (torchvision's BasicBlock reuses ``self.relu``) or the
model calls ``torch.relu`` directly. Inside :func:`rescale_rule` the non-linearities
back-propagate DeepLIFT multipliers instead of gradients; linear layers (convolutions,
BatchNorm in eval mode, average pooling, residual additions) pass multipliers through
unchanged, which is exactly their gradient. The attribution is (x − x')·multiplier and
sums to f_c(x) − f_c(x') (summation to delta) when every non-linearity is handled:

* elementwise activations (ReLU, ReLU6/hardtanh, leaky ReLU, ELU, GELU, SiLU, sigmoid,
  tanh, module or functional): m = (y − y') / (z − z') where |z − z'| > 1e-7, else the
  gradient at z (docs/methods.md);
* max-pooling (``max_pool2d``, ``adaptive_max_pool2d``): rather than the gradient (which
  breaks summation to delta), the output difference o − o' is split as
  (max(o, o') − o') routed to the input's maximum plus (o − max(o, o')) routed to the
  reference's maximum, then divided by z − z' (the rule Captum uses). Summation to
  delta then holds through max-pools too.

Not handled (they act by their gradient, and summation to delta is then approximate):
activations called as tensor methods (``x.relu()``), softmax or other non-elementwise
operations inside the model.

>>> import torch, xaiwidgets as xw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
...                             torch.nn.Linear(4, 2))
>>> xw.explain(model, torch.rand(1, 3, 16, 16), "deeplift", baseline=0.0).dims
('image', 'y', 'x')
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..core.registry import Method, Param, register
from .gradient import BASELINE, baseline_tensor

#: below this |z − z'| the multiplier is the gradient (docs/methods.md)
EPS = 1e-7

_ELEMENTWISE = [
    (F, "relu"), (F, "relu_"), (torch, "relu"), (torch, "relu_"), (F, "relu6"),
    (F, "hardtanh"), (F, "leaky_relu"), (F, "elu"), (F, "gelu"), (F, "silu"),
    (torch, "sigmoid"), (torch, "tanh"), (F, "sigmoid"), (F, "tanh"),
]
_POOLS = [
    (F, "max_pool2d", F.max_pool2d_with_indices),
    (F, "adaptive_max_pool2d", F.adaptive_max_pool2d_with_indices),
]


class _Reentry:
    """While ``busy``, the patched functions behave like the originals: our own autograd
    Functions call the originals, which may call another patched function
    (``F.relu`` calls ``torch.relu``)."""

    busy = 0

    @classmethod
    @contextlib.contextmanager
    def bypass(cls) -> Iterator[None]:
        cls.busy += 1
        try:
            yield
        finally:
            cls.busy -= 1


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(t) // 2
    return t[:n], t[n:]


def _safe_divide(numerator: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return numerator / torch.where(delta.abs() > EPS, delta, torch.ones_like(delta))


class _Rescale(torch.autograd.Function):
    """y = fn(z) on [z; z']; backward gives the input rows g·(y − y')/(z − z')."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, fn: Callable) -> torch.Tensor:  # type: ignore[override]
        with _Reentry.bypass():
            y = fn(z)
        ctx.fn = fn
        ctx.save_for_backward(z, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        z, y = ctx.saved_tensors
        (zx, zr), (yx, yr) = _halves(z), _halves(y)
        g = _halves(grad)[0]
        delta = zx - zr
        out = g * _safe_divide(yx - yr, delta)
        close = delta.abs() <= EPS
        if close.any():
            # the gradient where input and reference (nearly) coincide
            with _Reentry.bypass(), torch.enable_grad():
                zl = zx.detach().requires_grad_(True)
                (local,) = torch.autograd.grad(ctx.fn(zl), zl, g)
            out = torch.where(close, local, out)
        return torch.cat([out, torch.zeros_like(out)]), None


def _route(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Add pooled ``values`` back onto the input positions their max came from."""
    flat = torch.zeros(shape[0], shape[1], shape[2] * shape[3], dtype=values.dtype,
                       device=values.device)
    flat.scatter_add_(2, indices.flatten(2), values.flatten(2))
    return flat.view(shape)


class _RescaleMaxPool(torch.autograd.Function):
    """Max-pool on [z; z'] whose backward keeps summation to delta (see module docstring)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, pool: Callable) -> torch.Tensor:  # type: ignore[override]
        with _Reentry.bypass():
            out, indices = pool(z)
        ctx.save_for_backward(z, out, indices)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        z, out, indices = ctx.saved_tensors
        (zx, zr), (ox, orf), (ix, ir) = _halves(z), _halves(out), _halves(indices)
        g = _halves(grad)[0]
        top = torch.maximum(ox, orf)
        moved = _route(g * (top - orf), ix, zx.shape) + _route(g * (ox - top), ir, zx.shape)
        delta = zx - zr
        out_grad = torch.where(delta.abs() > EPS, _safe_divide(moved, delta),
                               _route(g, ix, zx.shape))
        return torch.cat([out_grad, torch.zeros_like(out_grad)]), None


def _paired(x: Any) -> bool:
    """Only batches [x; x'] that need gradients get the rule."""
    return (isinstance(x, torch.Tensor) and x.requires_grad and x.ndim > 0
            and len(x) % 2 == 0 and not _Reentry.busy)


def _elementwise(original: Callable, out_of_place: Callable) -> Callable:
    """``original`` unless called on a paired batch; then ``out_of_place`` (the same
    function without in-place writing, which would overwrite the saved input) under
    the rescale rule."""
    try:
        signature: inspect.Signature | None = inspect.signature(original)
    except (TypeError, ValueError):  # some torch builtins have no signature
        signature = None
    takes_inplace = signature is not None and "inplace" in signature.parameters

    def patched(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not _paired(x):
            return original(x, *args, **kwargs)
        if takes_inplace:
            bound = signature.bind(x, *args, **kwargs)
            bound.arguments["inplace"] = False
            args, kwargs = bound.args[1:], bound.kwargs
        return _Rescale.apply(x, lambda z: out_of_place(z, *args, **kwargs))

    return patched


def _pool(original: Callable, with_indices: Callable) -> Callable:
    def patched(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not _paired(x) or x.ndim != 4 or kwargs.get("return_indices", False):
            return original(x, *args, **kwargs)
        return _RescaleMaxPool.apply(x, lambda z: with_indices(z, *args, **kwargs))

    return patched


@contextlib.contextmanager
def rescale_rule() -> Iterator[None]:
    """Inside the block, non-linearities called on a batch [x; x'] (inputs, then as many
    references) with autograd back-propagate DeepLIFT rescale multipliers to the input
    rows and zero to the reference rows. The functions are restored on exit.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> both = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    >>> with rescale_rule():
    ...     multipliers = torch.autograd.grad(net(both)[0].sum(), both)[0]
    """
    saved = [(module, name, getattr(module, name)) for module, name in _ELEMENTWISE]
    saved += [(module, name, getattr(module, name)) for module, name, _ in _POOLS]
    # relu_ computes like relu (read before patching, so these are the originals)
    replacements = [_elementwise(original, getattr(module, name.rstrip("_")))
                    for module, name, original in saved[:len(_ELEMENTWISE)]]
    replacements += [_pool(getattr(module, name), with_indices)
                     for module, name, with_indices in _POOLS]
    try:
        for (module, name, _), replacement in zip(saved, replacements, strict=True):
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@register
class DeepLift(Method):
    """DeepLIFT (rescale rule): (x − x')·multipliers, summing to f_c(x) − f_c(x')."""

    name = "deeplift"
    family = "deeplift"
    default_reduce = "sum"
    signed = True
    params = (
        BASELINE,
        Param("rule", "rescale", kind="choice", choices=("rescale",),
              doc="multiplier rule for non-linearities"),
    )

    def attribute(self, ctx, target, layer, baseline, rule) -> torch.Tensor:
        x = ctx.inputs
        reference = baseline_tensor(ctx, baseline)
        both = torch.cat([x, reference]).detach().requires_grad_(True)
        with rescale_rule():
            logits, _ = ctx.forward(both, grad=True)
            score = logits[:len(x)].gather(1, target[:, None]).sum()
            (multipliers,) = torch.autograd.grad(score, both)
        return (x - reference) * multipliers[:len(x)]
