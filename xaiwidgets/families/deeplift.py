"""DeepLIFT with the rescale rule (Shrikumar et al. 2017).

Two passes: the reference x' runs first without autograd (:func:`reference_pass`:
one row when its rows are all equal, as for a number or ``"black"``, kept in the
Context's memo for the next target), keeping, call by call, each non-linearity's input
and output; then the N input rows run with autograd, and each non-linearity call is
paired with the same call of the reference pass, so a module called twice
(torchvision's BasicBlock reuses ``self.relu``) or ``torch.relu`` / ``x.relu()`` called
directly all see their own reference. The backward has N rows. A model whose two
passes call their non-linearities differently (data-dependent branches) runs input
and reference as one 2N-row batch [x; x'] instead (:func:`rescale_rule`), as Captum
does. Inside the rules (a per-thread :class:`~xaiwidgets.core.scoped.FunctionRules`
mode: nothing in torch is replaced, other threads are unaffected) the non-linearities
back-propagate DeepLIFT multipliers instead of gradients; linear layers (convolutions,
BatchNorm in eval mode, average pooling, residual additions) pass multipliers through
unchanged, which is exactly their gradient. The attribution is (x − x')·multiplier and sums to
f_c(x) − f_c(x') (summation to delta) when every non-linearity is handled:

* elementwise activations, module, functional or tensor method (ReLU, ReLU6/hardtanh,
  leaky ReLU, ELU, SELU, CELU, GELU, SiLU, Mish, softplus, Hardswish, Hardsigmoid,
  sigmoid, tanh, ``clamp``/``threshold``/``maximum`` with constant bounds):
  m = (y − y') / (z − z') where |z − z'| > 1e-7, else the gradient at z (docs/methods.md);
* max-pooling (``max_pool2d``, ``adaptive_max_pool2d`` and their 3-D forms): rather
  than the gradient (which breaks summation to delta), the output difference o − o' is
  split as (max(o, o') − o') routed to the input's maximum plus (o − max(o, o'))
  routed to the reference's maximum, then divided by z − z' (the rule Captum uses).
  Summation to delta then holds through max-pools too.

Other non-linearities (softmax, LayerNorm/GroupNorm, products of two activations as in
squeeze-and-excitation gates, 1-D max-pools, ...) act by their gradient; DeepLIFT
then warns, naming them (:class:`DeepLiftWarning`). Every result carries
``attrs["delta_error"]``: per image, |Σ attribution − (f_c(x) − f_c(x'))| /
|f_c(x) − f_c(x')|, and a warning fires when it exceeds :data:`DELTA_TOLERANCE`.

Video clips (N, C, T, H, W) need nothing more: the rescale rule is elementwise,
Conv3d/BatchNorm3d/average pools are linear, and the 3-D max-pools have the max-pool
rule, so summation to delta holds on 3D CNNs too (``r3d_18``, ``mc3_18``,
``r2plus1d_18``, ``shapes-video``; tests/test_video_engine.py). The result has dims
(image, t, y, x).

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
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..core.registry import Method, Param, register
from ..core.scoped import (
    NAMESPACES,
    OTHER_ACTIVATIONS,
    RELU_FUNCTIONS,
    RELU_LIKE,
    FunctionRules,
    named_functions,
)
from .attention import refuse_attention
from .gradient import BASELINE, baseline_tensor

#: below this |z − z'| the multiplier is the gradient (docs/methods.md)
EPS = 1e-7
#: relative summation-to-delta error above which DeepLIFT warns. With every
#: non-linearity handled the error is float32 round-off (below 1e-4 on the shipped
#: models and ResNet18); one non-linearity acting by its gradient costs percents
#: (Hardswish by its gradient: 2 %, ``x.relu()``: 110 %), so 1 % separates the two.
DELTA_TOLERANCE = 0.01


class DeepLiftWarning(UserWarning):
    """DeepLIFT met a non-linearity it has no rule for, or summation to delta failed."""


#: elementwise functions whose multiplier is the rescale rule
_ELEMENTWISE = {**RELU_FUNCTIONS, **OTHER_ACTIVATIONS, **RELU_LIKE}
#: max-pools -> (their index-returning variant, the input's ndim, the position of a
#: positional ``return_indices``): the max-pool rule, on images and on clips
_POOLS = {F.max_pool2d: (F.max_pool2d_with_indices, 4, 6),
          F.adaptive_max_pool2d: (F.adaptive_max_pool2d_with_indices, 4, 2),
          F.max_pool3d: (F.max_pool3d_with_indices, 5, 6),
          F.adaptive_max_pool3d: (F.adaptive_max_pool3d_with_indices, 5, 2)}


#: non-linear functions without a rule: they act by their gradient (warned about)
_UNHANDLED = {
    **named_functions("F", "softmax log_softmax softmin layer_norm group_norm instance_norm "
                      "local_response_norm normalize glu max_pool1d "
                      "adaptive_max_pool1d lp_pool1d lp_pool2d lp_pool3d "
                      "fractional_max_pool2d fractional_max_pool3d"),
    **named_functions("torch", "softmax log_softmax amax amin exp log sqrt rsqrt pow "
                          "logsumexp square abs sin cos erf"),
    **named_functions("Tensor", "softmax log_softmax amax amin exp log sqrt rsqrt pow "
                           "logsumexp square abs __pow__"),
}
#: bilinear functions: non-linear when two of their arguments depend on the input
_BILINEAR = {
    **named_functions("torch", "mul div matmul bmm einsum"),
    **named_functions("Tensor", "mul div matmul bmm __mul__ __rmul__ __truediv__ __matmul__ mul_ "
                           "div_"),
}


def _depends(value: Any) -> bool:
    """The (differentiated) input or a tensor computed from it; not a parameter or constant."""
    return (isinstance(value, torch.Tensor) and value.requires_grad
            and not isinstance(value, torch.nn.Parameter))


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    flat: list[Any] = []
    for value in (*args, *kwargs.values()):
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(t) // 2
    return t[:n], t[n:]


def _safe_divide(numerator: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return numerator / torch.where(delta.abs() > EPS, delta, torch.ones_like(delta))


def _rescale_multiplier(g: torch.Tensor, zx: torch.Tensor, zr: torch.Tensor, yx: torch.Tensor,
                        yr: torch.Tensor, fn: Callable, mode: FunctionRules) -> torch.Tensor:
    """g·(y − y')/(z − z'), and g·fn'(z) where |z − z'| ≤ EPS (the reference rows
    ``zr``, ``yr`` may be one row, standing for every input row)."""
    delta = zx - zr
    close = delta.abs() <= EPS
    # few passes, in place where possible: these multipliers were a third of a
    # ResNet50's DeepLIFT time, each pass over the activations costing about the same
    out = (yx - yr).div_(delta.masked_fill_(close, 1.0)).mul_(g)
    if close.any():
        # the gradient where input and reference (nearly) coincide; on CPU the
        # backward may run in the calling thread, inside the mode: bypass it
        with mode.bypass(), torch.enable_grad():
            zl = zx.detach().requires_grad_(True)
            (local,) = torch.autograd.grad(fn(zl), zl, g)
        out = torch.where(close, local, out)
    return out


def _route(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Add pooled ``values`` back onto the input positions their max came from (the
    indices are flat over the pooled dims: (y, x) for images, (t, y, x) for clips; one
    row of indices stands for every row of values)."""
    flat = torch.zeros(shape[0], shape[1], shape[2:].numel(), dtype=values.dtype,
                       device=values.device)
    flat.scatter_add_(2, indices.expand_as(values).flatten(2), values.flatten(2))
    return flat.view(shape)


def _max_pool_multiplier(g: torch.Tensor, zx: torch.Tensor, zr: torch.Tensor,
                         ox: torch.Tensor, orf: torch.Tensor, ix: torch.Tensor,
                         ir: torch.Tensor) -> torch.Tensor:
    """The max-pool rule (module docstring): o − o' split between the input's and the
    reference's maxima, divided by z − z'; the gradient where z = z'."""
    top = torch.maximum(ox, orf)
    moved = _route(g * (top - orf), ix, zx.shape) + _route(g * (ox - top), ir, zx.shape)
    delta = zx - zr
    return torch.where(delta.abs() > EPS, _safe_divide(moved, delta), _route(g, ix, zx.shape))


class _Rescale(torch.autograd.Function):
    """y = fn(z); backward gives g·(y − y')/(z − z') with the reference's z', y'."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, zr: torch.Tensor, yr: torch.Tensor,  # type: ignore[override]
                fn: Callable, mode: FunctionRules) -> torch.Tensor:
        y = fn(z)
        ctx.fn, ctx.mode = fn, mode
        ctx.save_for_backward(z, y, zr, yr)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        z, y, zr, yr = ctx.saved_tensors
        return _rescale_multiplier(grad, z, zr, y, yr, ctx.fn, ctx.mode), None, None, None, None


class _PairedRescale(torch.autograd.Function):
    """y = fn(z) on [z; z']; backward gives the input rows g·(y − y')/(z − z')."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, fn: Callable, mode: FunctionRules  # type: ignore[override]
                ) -> torch.Tensor:
        y = fn(z)
        ctx.fn, ctx.mode = fn, mode
        ctx.save_for_backward(z, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        z, y = ctx.saved_tensors
        (zx, zr), (yx, yr) = _halves(z), _halves(y)
        out = _rescale_multiplier(_halves(grad)[0], zx, zr, yx, yr, ctx.fn, ctx.mode)
        return torch.cat([out, torch.zeros_like(out)]), None, None


class _MaxPool(torch.autograd.Function):
    """Max-pool whose backward keeps summation to delta, given the reference's
    pool input z', output o' and indices."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, zr: torch.Tensor, orf: torch.Tensor,  # type: ignore[override]
                ir: torch.Tensor, pool: Callable) -> torch.Tensor:
        out, indices = pool(z)
        ctx.save_for_backward(z, out, indices, zr, orf, ir)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        z, out, indices, zr, orf, ir = ctx.saved_tensors
        return _max_pool_multiplier(grad, z, zr, out, orf, indices, ir), None, None, None, None


class _PairedMaxPool(torch.autograd.Function):
    """Max-pool on [z; z'] whose backward keeps summation to delta (module docstring)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, pool: Callable) -> torch.Tensor:  # type: ignore[override]
        out, indices = pool(z)
        ctx.save_for_backward(z, out, indices)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        z, out, indices = ctx.saved_tensors
        (zx, zr), (ox, orf), (ix, ir) = _halves(z), _halves(out), _halves(indices)
        out_grad = _max_pool_multiplier(_halves(grad)[0], zx, zr, ox, orf, ix, ir)
        return torch.cat([out_grad, torch.zeros_like(out_grad)]), None


def _out_of_place(func: Callable) -> tuple[Callable, inspect.Signature | None]:
    """The function without in-place writing (which would overwrite the saved input),
    and its signature when it takes ``inplace=``."""
    namespace, name = _ELEMENTWISE[func].split(".")
    if name.endswith("_"):
        func = getattr(NAMESPACES[namespace], name.rstrip("_"))
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # torch builtins have no signature
        return func, None
    return func, signature if "inplace" in signature.parameters else None


#: each elementwise function's out-of-place form and its signature if it takes inplace=
_PLAIN = {f: _out_of_place(f) for f in _ELEMENTWISE}


def _plain_call(func: Callable, args: tuple, kwargs: dict
                ) -> tuple[Callable, tuple, dict, bool]:
    """An elementwise call made out of place: (function, args, kwargs, whether the
    call was in place)."""
    plain, signature = _PLAIN[func]
    inplace = _ELEMENTWISE[func].endswith("_")
    if signature is not None:
        bound = signature.bind(*args, **kwargs)
        inplace = inplace or bool(bound.arguments.get("inplace", False))
        bound.arguments["inplace"] = False
        args, kwargs = bound.args, bound.kwargs
    return plain, args, kwargs, inplace


def _pool_call(func: Callable, args: tuple, kwargs: dict) -> Callable | None:
    """``z -> (pooled, indices)`` for a max-pool call the max-pool rule handles (an
    image or clip batch, indices not asked for), else ``None``."""
    with_indices, ndim, position = _POOLS[func]
    indices = kwargs.get("return_indices", args[position] if len(args) > position else False)
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or indices:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
    rest = args[1:position]
    return lambda z: with_indices(z, *rest, **kwargs)


def _rule_table(elementwise: Callable, pool: Callable) -> dict[Callable, Callable]:
    rules: dict[Callable, Callable] = dict.fromkeys(_ELEMENTWISE, elementwise)
    rules.update(dict.fromkeys(_POOLS, pool))
    return rules


class _Mismatch(Exception):
    """The input pass called its non-linearities otherwise than the reference pass."""


#: what the input pass needs from one call of the reference pass: the function and
#: (z', y') for an elementwise function, (z', o', indices) for a max-pool; or None
Record = tuple[Callable, tuple[torch.Tensor, ...]] | None


class _Recorded:
    """A reference pass: the reference logits and, in call order, one :data:`Record`
    per call of a function that has a rule (``rows`` reference rows: 1 or N)."""

    def __init__(self, logits: torch.Tensor, calls: list[Record]) -> None:
        self.logits = logits
        self.calls = calls
        self.rows = len(logits)


class _RecordRules(FunctionRules):
    """Runs every function that has a rule as called (no autograd) and keeps, in call
    order, what the rules need from the reference (no copies: :meth:`overwritten`
    tells whether the model changed a kept tensor in place)."""

    def __init__(self) -> None:
        super().__init__(_rule_table(self._elementwise, self._pool))
        self.calls: list[Record] = []
        self._versions: list[tuple[torch.Tensor, int]] = []

    def _keep(self, func: Callable, *tensors: torch.Tensor) -> None:
        self._versions.extend((t, t._version) for t in tensors)
        self.calls.append((func, tensors))

    def overwritten(self) -> bool:
        """Whether a kept tensor was changed in place after it was kept (the input
        pass, with autograd, would have failed: this model differs without it)."""
        return any(t._version != version for t, version in self._versions)

    def _elementwise(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            self.calls.append(None)
            return func(*args, **kwargs)
        z = x.clone() if _plain_call(func, args, kwargs)[3] else x
        y = func(*args, **kwargs)
        if isinstance(y, torch.Tensor) and y.shape == x.shape:
            self._keep(func, z, y)
        else:  # a reduction (x.max(), torch.max(x, 1))
            self.calls.append(None)
        return y

    def _pool(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        pool = _pool_call(func, args, kwargs)
        if pool is None:
            self.calls.append(None)
            return func(*args, **kwargs)
        out, indices = pool(args[0])
        self._keep(func, args[0], out, indices)
        return out


class _RescaleRules(FunctionRules):
    """The rescale rules for a batch of ``rows`` = 2N rows [x; x'], and the names of
    the non-linearities met without a rule. Subclasses take the reference's values
    from elsewhere (:class:`_ReplayRules`)."""

    def __init__(self, rows: int) -> None:
        super().__init__(_rule_table(self._elementwise, self._pool), observe=self._observe)
        self.rows = rows
        self.unhandled: dict[str, int] = {}

    def _paired(self, x: Any) -> bool:
        return _depends(x) and x.ndim > 0 and len(x) == self.rows

    def _note(self, name: str) -> None:
        self.unhandled[name] = self.unhandled.get(name, 0) + 1

    def _observe(self, func: Callable, args: tuple, kwargs: dict) -> None:
        if func in _UNHANDLED and any(_depends(t) for t in _tensors(args, kwargs)):
            self._note(_UNHANDLED[func])
        elif func in _BILINEAR and sum(_depends(t) for t in _tensors(args, kwargs)) > 1:
            self._note(f"{_BILINEAR[func]} of two activations")

    def _next(self, func: Callable) -> Record:
        """The reference's record of this call of ``func`` (none here: the batch holds
        the reference)."""
        return None

    def _rescale(self, z: torch.Tensor, fn: Callable, record: Record) -> torch.Tensor:
        return _PairedRescale.apply(z, fn, self)

    def _max_pool(self, z: torch.Tensor, pool: Callable, record: Record) -> torch.Tensor:
        return _PairedMaxPool.apply(z, pool)

    def _elementwise(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        record = self._next(func)
        x, rest = args[0], _tensors(args[1:], kwargs)
        name = _ELEMENTWISE[func]
        if func in RELU_LIKE and name.endswith("max") and not rest:
            if _depends(x):  # a reduction (x.max(), torch.max(x, 1)), not elementwise
                self._note(name)
            return func(*args, **kwargs)
        constant = all(not _depends(t) and (t.ndim < x.ndim or len(t) == 1) for t in rest) \
            if isinstance(x, torch.Tensor) else False
        if not self._paired(x) or not constant:
            if any(_depends(t) for t in (x, *rest)):
                self._note(name)
            return func(*args, **kwargs)
        plain, args, kwargs, inplace = _plain_call(func, args, kwargs)
        other_args = args[1:]
        y = self._rescale(x.clone() if inplace else x,
                          lambda z: plain(z, *other_args, **kwargs), record)
        return x.copy_(y) if inplace else y

    def _pool(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        record = self._next(func)
        x, pool = args[0], _pool_call(func, args, kwargs)
        if not self._paired(x) or pool is None:
            if _depends(x):
                self._note(f"F.{func.__name__}")
            return func(*args, **kwargs)
        return self._max_pool(x, pool, record)


class _ReplayRules(_RescaleRules):
    """The rescale rules for the N input rows alone, the reference's values taken in
    call order from a :class:`_Recorded` reference pass; raises :class:`_Mismatch`
    where a call does not match its record."""

    def __init__(self, rows: int, recorded: _Recorded) -> None:
        super().__init__(rows)
        self.recorded = recorded
        self.position = 0

    def _next(self, func: Callable) -> Record:
        if self.position >= len(self.recorded.calls):
            raise _Mismatch("more non-linearity calls than in the reference pass")
        self.position += 1
        record = self.recorded.calls[self.position - 1]
        return record if record is not None and record[0] is func else None

    def finish(self) -> None:
        """Check that the input pass made as many calls as the reference pass."""
        if self.position != len(self.recorded.calls):
            raise _Mismatch("fewer non-linearity calls than in the reference pass")

    def _matching(self, x: torch.Tensor, record: Record) -> tuple[torch.Tensor, ...]:
        """The record's tensors if it is of the same call on an input of x's shape."""
        if record is None or record[1][0].shape != (self.recorded.rows, *x.shape[1:]):
            raise _Mismatch("a non-linearity call differs from the reference pass")
        return record[1]

    def _rescale(self, z: torch.Tensor, fn: Callable, record: Record) -> torch.Tensor:
        zr, yr = self._matching(z, record)
        return _Rescale.apply(z, zr, yr, fn, self)

    def _max_pool(self, z: torch.Tensor, pool: Callable, record: Record) -> torch.Tensor:
        zr, orf, ir = self._matching(z, record)
        return _MaxPool.apply(z, zr, orf, ir, pool)


@contextlib.contextmanager
def rescale_rule(rows: int) -> Iterator[dict[str, int]]:
    """Inside the block (this thread only), non-linearities called on a batch of ``rows``
    = 2N rows [x; x'] (inputs, then as many references) with autograd back-propagate
    DeepLIFT rescale multipliers to the input rows and zero to the reference rows.
    Yields a dict, filled during the block, of the non-linearities met without a rule
    (name -> calls). Nothing in torch is replaced.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> both = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    >>> with rescale_rule(rows=2) as unhandled:
    ...     multipliers = torch.autograd.grad(net(both)[0].sum(), both)[0]
    >>> unhandled
    {}
    """
    rules = _RescaleRules(rows)
    with rules:
        yield rules.unhandled


def reference_pass(ctx, reference: torch.Tensor) -> _Recorded:
    """The reference's logits and non-linearity values from one pass without autograd.

    A reference whose rows are all equal (a number, ``"black"``, one image) runs as
    one row, kept with the Context's cache (:meth:`~xaiwidgets.core.context.Context.memo`,
    the last one; 76 MiB for ResNet50 at 224²): explaining other targets or again costs
    no reference pass.

    >>> import xaiwidgets as xw
    >>> ex = xw.Explainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU()),
    ...                   torch.rand(2, 1, 2, 2))
    >>> recorded = reference_pass(ex.context, torch.zeros(2, 1, 2, 2))
    >>> recorded.rows, len(recorded.calls)
    (1, 1)
    """
    if len(reference) > 1 and bool((reference == reference[:1]).all()):
        reference = reference[:1]

    def build() -> _Recorded:
        with _RecordRules() as rules:
            logits, _ = ctx.forward(reference)
        if rules.overwritten():
            raise _Mismatch("the model changed a non-linearity's values in place")
        return _Recorded(logits, rules.calls)

    if len(reference) > 1:
        return build()
    one = reference.detach().contiguous()
    key = (tuple(one.shape), one.dtype, str(one.device),
           one.cpu().view(torch.uint8).numpy().tobytes())
    return ctx.memo(reference_pass, key, build, limit=1)


def _two_passes(ctx, target: torch.Tensor | None, reference: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Multipliers (N rows), f_c(x) − f_c(x') and the non-linearities without a rule,
    from the reference pass (:func:`reference_pass`) and an N-row input pass."""
    x = ctx.inputs
    recorded = reference_pass(ctx, reference)
    inputs = x.detach().requires_grad_(True)
    with _ReplayRules(len(x), recorded) as rules:
        logits, _ = ctx.forward(inputs, grad=True)  # fills the prediction cache
        rules.finish()
    target = ctx.pass_target(logits, target)
    score = logits.gather(1, target[:, None])[:, 0]
    (multipliers,) = torch.autograd.grad(score.sum(), inputs)
    reference_score = recorded.logits.expand(len(x), -1).gather(1, target[:, None])[:, 0]
    return multipliers, score.detach() - reference_score, rules.unhandled


def _one_batch(ctx, target: torch.Tensor | None, reference: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """As :func:`_two_passes`, from one 2N-row batch [x; x'] (for models whose two
    passes call their non-linearities differently)."""
    x = ctx.inputs
    n = len(x)
    both = torch.cat([x, reference]).detach().requires_grad_(True)
    with rescale_rule(rows=2 * n) as unhandled:
        logits, _ = ctx.forward(both, grad=True)
        # the image rows are the model's logits (the rule changes only the backward):
        # they give the predicted classes and fill the prediction cache
        target = ctx.pass_target(logits[:n], target)
        ctx.keep_logits(logits[:n])
        score = logits.gather(1, torch.cat([target, target])[:, None])[:, 0]
        (multipliers,) = torch.autograd.grad(score[:n].sum(), both)
    return multipliers[:n], (score[:n] - score[n:]).detach(), unhandled


def delta_error(attribution: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per image |Σ attribution − delta| / |delta| (delta = f_c(x) − f_c(x')).

    A |delta| below 1e-12 counts as 1e-12 (input equal to reference: error 0).

    >>> delta_error(torch.ones(1, 2, 2, 2), torch.tensor([8.0]))
    tensor([0.])
    """
    total = attribution.detach().double().flatten(1).sum(1)
    delta = delta.detach().double()
    return ((total - delta).abs() / delta.abs().clamp(min=1e-12)).to(attribution.dtype)


@register
class DeepLift(Method):
    """DeepLIFT (rescale rule): (x − x')·multipliers, summing to f_c(x) − f_c(x')."""

    name = "deeplift"
    family = "deeplift"
    targets = "from_own_pass"  # its image rows give the predictions
    default_reduce = "sum"
    signed = True
    params = (
        BASELINE,
        Param("rule", "rescale", kind="choice", choices=("rescale",),
              doc="multiplier rule for non-linearities"),
    )

    def check(self, ctx, layer, params) -> None:
        """Refused on self-attention models (``families/attention.py`` says why)."""
        refuse_attention(ctx.model, self.name)

    def attribute(self, ctx, target, layer, baseline, rule) -> torch.Tensor:
        x = ctx.inputs
        reference = baseline_tensor(ctx, baseline)
        try:
            multipliers, delta, unhandled = _two_passes(ctx, target, reference)
        except _Mismatch:
            multipliers, delta, unhandled = _one_batch(ctx, target, reference)
        attribution = (x - reference) * multipliers
        error = delta_error(attribution, delta)
        ctx.record("delta_error", error.tolist())
        if unhandled:
            found = ", ".join(f"{name} (x{count})" for name, count in unhandled.items())
            warnings.warn(
                f"DeepLIFT has no rule for {found}: they act by their gradient, so the "
                "attribution need not sum to f(x) - f(x'); see attrs['delta_error']",
                DeepLiftWarning, stacklevel=4)
        worst = float(error.max())
        if worst > DELTA_TOLERANCE:
            warnings.warn(
                f"DeepLIFT attributions miss f(x) - f(x') by {worst:.1%} (above "
                f"{DELTA_TOLERANCE:.0%}): a non-linearity without a rescale rule acted by "
                "its gradient; per-image errors are in attrs['delta_error']",
                DeepLiftWarning, stacklevel=4)
        return attribution
