"""The one place where the engine changes a model or torch; every change is undone.

Rules (tested in ``tests/test_scoped.py`` and ``tests/test_threads.py``):

* nothing in ``torch`` or ``torch.nn.functional`` is ever replaced: rules for
  functions (guided backprop, DeconvNet, DeepLIFT) are :class:`FunctionRules`, a
  ``torch.overrides.TorchFunctionMode``. A mode lives on the calling thread's own
  mode stack, so a rule acts only inside the ``with`` block and only in the thread
  that entered it; another thread's forward and backward passes never see it;
* every change to a model (hooks, flags, attributes, canonizers, merged weights) is
  recorded in a :class:`Scope` and undone in reverse order in a ``finally``, also
  when setting it up fails part-way.

The pieces:

* :class:`Scope` – a change log (a ``contextlib.ExitStack``) with helpers for each
  kind of change::

      with Scope() as scope:
          scope.handle(module.register_forward_hook(hook))   # hook handle: removed
          scope.set(module, "eps", 0.0)                      # attribute: restored
          scope.undo(canonizer.remove)                       # any undo function
          canonizer.register(...)                            # (record the undo first)
          scope.mode(FunctionRules({F.relu: rule}))          # function rules: exited
          ...                                                # everything undone here

  Record an undo *before* the change it reverts when the change can fail half-way
  (zennit's ``Composite.register``): ``scope.undo(composite.remove)`` then
  ``composite.register(model)``.
* :func:`model_guard` – eval mode and non-in-place activations for the duration of a
  call, reference-counted per model so several threads can explain one model.
* :func:`capture` – forward hooks that record layer outputs (this thread's passes only).
* :func:`relu_backward` – guided backprop / DeconvNet backward rules for ReLUs
  (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place forms).
* :func:`census` – the non-linearities one forward pass calls, for preconditions.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

_MISSING = object()


class Scope(contextlib.ExitStack):
    """A log of changes, undone in reverse order on exit (exception or not).

    >>> m = nn.BatchNorm2d(2)
    >>> with Scope() as scope:
    ...     scope.set(m, "eps", 0.0)
    ...     assert m.eps == 0.0
    >>> m.eps
    1e-05
    """

    def handle(self, handle: RemovableHandle) -> RemovableHandle:
        """Record a hook handle (``register_*_hook``'s result): removed on exit."""
        self.callback(handle.remove)
        return handle

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, restoring the old value (or its absence) on exit."""
        own = name in _instance_names(obj)
        old = getattr(obj, name, _MISSING)
        setattr(obj, name, value)
        if own or (old is not _MISSING and name not in _instance_names(obj)):
            self.callback(setattr, obj, name, old)  # an own attribute, or a property
        else:  # new, or now shadowing a class attribute
            self.callback(_delete, obj, name)

    def undo(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Record any undo function (e.g. a canonizer's ``remove``), called on exit."""
        self.callback(function, *args, **kwargs)

    def mode(self, mode: TorchFunctionMode) -> TorchFunctionMode:
        """Enter a torch function mode (this thread only) until exit."""
        return self.enter_context(mode)


def _instance_names(obj: Any) -> set[str]:
    names = set(getattr(obj, "__dict__", {}))
    if isinstance(obj, nn.Module):
        names |= set(obj._parameters) | set(obj._buffers) | set(obj._modules)
    return names


def _delete(obj: Any, name: str) -> None:
    if name in _instance_names(obj):
        delattr(obj, name)


# ----------------------------------------------------------------- model guard
# Explanations may run in several threads on one model (widgets, user threads): the
# guard is a per-model readers-writer lock. Shared entries (methods that only run the
# model) overlap; an exclusive entry (a method that changes the model, e.g. LRP's
# BatchNorm merge) waits for them and keeps others out. The first entry saves the
# flags, the last exit restores them. Entries nest within a thread.
_GUARD = threading.Condition(threading.Lock())
_GUARDED: dict[int, _Guard] = {}
_WRITERS_WAITING: Counter[int] = Counter()


class _Guard:
    def __init__(self, scope: Scope, owner: int | None) -> None:
        self.scope = scope  # eval mode, for every holder
        self.owner = owner  # the thread holding it exclusively, or None
        self.holders: Counter[int] = Counter()
        self.inplace_scope: Scope | None = None  # in-place activations off
        self.sensitive = 0  # holders that need them off (all but no-grad passes)


def _flag_scope(model: nn.Module, flag: str) -> Scope:
    """``flag`` (``"training"`` or ``"inplace"``) set to False where it is True."""
    scope = Scope()
    try:
        # flags are only written where they change: Module.train()/__setattr__ on
        # every module of an eval-mode ResNet50 costs milliseconds, paid by every
        # slider change
        for m in model.modules():
            if getattr(m, flag, None) is True:
                scope.set(m, flag, False)
    except BaseException:
        scope.close()  # what was set before the failure is restored too
        raise
    return scope


def _admitted(key: int, me: int, exclusive: bool) -> bool:
    entry = _GUARDED.get(key)
    if entry is None or entry.owner == me:
        return True
    if exclusive:
        if me in entry.holders:
            raise RuntimeError(
                "a model guarded for this thread's shared use cannot be changed inside "
                "the same call; declare the method with changes_model = True so that the "
                "Explainer takes the model exclusively from the start"
            )
        return False
    return entry.owner is None and (me in entry.holders or not _WRITERS_WAITING[key])


@contextlib.contextmanager
def model_guard(model: nn.Module, exclusive: bool = False,
                keep_inplace: bool = False) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode with non-in-place activations; restore everything after.

    In-place activations break forward/backward hooks and overwrite captured
    activations, so they are switched off here rather than rejected. Nested and
    concurrent guards on one model are fine: the last one out restores the state.
    ``exclusive=True`` (for code that changes the model: canonizers, merged weights)
    waits until no other thread uses the model and keeps other threads' guards waiting.
    ``keep_inplace=True`` (passes without autograd whose records :func:`capture`
    checks) leaves in-place activations as the model has them, unless another
    holder, in this thread or another, needs them off: a flag flipped during such a
    pass changes nothing it computes. Non-in-place ReLUs cost ResNet-50 ~3 % more.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True)).train()
    >>> with model_guard(m):
    ...     assert not m.training and not m[1].inplace
    >>> with model_guard(m, keep_inplace=True):
    ...     assert not m.training and m[1].inplace
    >>> m.training, m[1].inplace
    (True, True)
    """
    key, me = id(model), threading.get_ident()
    with _GUARD:
        if exclusive:
            _WRITERS_WAITING[key] += 1
        try:
            _GUARD.wait_for(lambda: _admitted(key, me, exclusive))
        finally:
            if exclusive:
                _WRITERS_WAITING[key] -= 1
                if not _WRITERS_WAITING[key]:
                    del _WRITERS_WAITING[key]
        entry = _GUARDED.get(key)
        if entry is None:
            entry = _GUARDED[key] = _Guard(_flag_scope(model, "training"),
                                           me if exclusive else None)
        if not keep_inplace and entry.inplace_scope is None:
            try:
                entry.inplace_scope = _flag_scope(model, "inplace")
            except BaseException:
                if not entry.holders:  # nobody else holds it: undo the eval mode too
                    del _GUARDED[key]
                    entry.scope.close()
                raise
        entry.sensitive += not keep_inplace
        entry.holders[me] += 1
    try:
        yield model
    finally:
        with _GUARD:
            entry.holders[me] -= 1
            if not entry.holders[me]:
                del entry.holders[me]
            entry.sensitive -= not keep_inplace
            inplace_scope = None
            if not entry.sensitive:
                inplace_scope, entry.inplace_scope = entry.inplace_scope, None
            try:
                if inplace_scope is not None:
                    inplace_scope.close()
            finally:
                if not entry.holders:
                    del _GUARDED[key]
                    try:
                        entry.scope.close()
                    finally:
                        _GUARD.notify_all()
                elif entry.owner is None:
                    _GUARD.notify_all()


# --------------------------------------------------------------------- capture
class RecordOverwritten(RuntimeError):
    """A recorded output was changed in place later in the pass (see :func:`capture`);
    ``layers``: the names of those records."""

    def __init__(self, layers: list[str]) -> None:
        super().__init__(f"outputs of {layers} were modified in place after capture")
        self.layers = layers


def own_output(owner: int, layer: Any, output: Any) -> torch.Tensor | None:
    """What a forward hook on ``layer`` should handle: ``output`` when the hook runs in
    thread ``owner``, ``None`` for another thread's pass on the same model (left alone).
    An output that is not a tensor is a ``TypeError`` naming the layer.

    >>> own_output(threading.get_ident(), "conv", torch.ones(2)).shape
    torch.Size([2])
    """
    if threading.get_ident() != owner:
        return None
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"layer {layer!r} returns {type(output).__name__}, not a tensor; "
            "pick a layer whose output is a single feature map"
        )
    return output


@contextlib.contextmanager
def capture(
    modules: dict[str, nn.Module], detach: bool = False, copy: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named module during forward passes inside the block.

    The recorded tensor is the module's own output; downstream code receives a
    copy, so later in-place operations (``out += identity`` in ResNets) cannot
    change what was recorded. With ``detach=True`` the record is detached.
    With ``copy=False`` nothing is copied (cheaper: MLFEM records 16 blocks);
    instead, leaving the block raises :class:`RecordOverwritten` if a record was
    changed in place after it was made, so the caller can run again with copies.
    Only passes of the thread that opened the block are recorded.

    >>> conv = nn.Conv2d(3, 4, 3)
    >>> with capture({"conv": conv}) as acts:
    ...     _ = conv(torch.zeros(1, 3, 8, 8))
    >>> acts["conv"].shape
    torch.Size([1, 4, 6, 6])
    """
    records: dict[str, torch.Tensor] = {}
    versions: dict[str, int] = {}
    owner = threading.get_ident()

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Any) -> torch.Tensor | None:
            output = own_output(owner, name, output)
            if output is None:
                return None
            records[name] = output.detach() if detach else output
            if not copy:
                versions[name] = output._version  # shared with the detached record
                return None
            return output.clone()

        return hook

    with Scope() as scope:
        for name, module in modules.items():
            scope.handle(module.register_forward_hook(make_hook(name)))
        yield records
    changed = [name for name, version in versions.items()
               if records[name]._version != version]
    if changed:
        raise RecordOverwritten(changed)


# ------------------------------------------------------------- function rules
Rule = Callable[[Callable, tuple, dict], Any]


class FunctionRules(TorchFunctionMode):
    """Call ``rules[f](f, args, kwargs)`` instead of torch function ``f`` inside the block.

    A ``TorchFunctionMode``: it sits on the entering thread's mode stack, so other
    threads never see it, and no function in torch is replaced. Inside a rule the
    mode is off (calling ``f`` runs torch's own function). ``observe(f, args, kwargs)``,
    if given, sees every torch function called in the block (e.g. to name the
    non-linearities a model uses). ``bypass()`` turns the rules off for a while in
    this thread (an ``autograd.Function.backward`` that calls the original function).

    >>> double_relu = FunctionRules({F.relu: lambda f, args, kw: 2 * f(*args, **kw)})
    >>> with double_relu:
    ...     F.relu(torch.tensor([-1.0, 3.0]))
    tensor([0., 6.])
    """

    def __init__(self, rules: Mapping[Callable, Rule],
                 observe: Callable[[Callable, tuple, dict], None] | None = None) -> None:
        super().__init__()
        self.rules = dict(rules)
        self.observe = observe
        self._bypass = 0

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self._bypass:
            return func(*args, **kwargs)
        if self.observe is not None:
            self.observe(func, args, kwargs)
        rule = self.rules.get(func)
        if rule is None:
            return func(*args, **kwargs)
        return rule(func, args, kwargs)


#: where the functions named below live
NAMESPACES: dict[str, Any] = {"F": F, "torch": torch, "Tensor": torch.Tensor}


def named_functions(namespace: str, names: str) -> dict[Callable, str]:
    """``{function: "namespace.name"}`` for the space-separated ``names`` that exist.

    >>> named_functions("F", "relu no_such_function")  # doctest: +ELLIPSIS
    {<function relu at ...>: 'F.relu'}
    """
    owner = NAMESPACES[namespace]
    return {getattr(owner, n): f"{namespace}.{n}" for n in names.split() if hasattr(owner, n)}


#: every way to call a ReLU: nn.ReLU calls F.relu; in-place forms included
RELU_FUNCTIONS: dict[Callable, str] = {
    **named_functions("F", "relu relu_"), **named_functions("torch", "relu relu_"),
    **named_functions("Tensor", "relu relu_"),
}
#: elementwise activations other than ReLU (the torch functions their modules call)
OTHER_ACTIVATIONS: dict[Callable, str] = {
    **named_functions("F", "silu gelu leaky_relu leaky_relu_ hardswish hardsigmoid elu elu_ "
                     "selu celu mish softplus relu6 hardtanh hardtanh_ prelu rrelu logsigmoid "
                     "softsign tanhshrink sigmoid tanh"),
    **named_functions("torch", "sigmoid sigmoid_ tanh tanh_ selu celu prelu rrelu"),
    **named_functions("Tensor", "sigmoid sigmoid_ tanh tanh_"),
}
#: functions that compute a ReLU when called with a zero bound (warned about)
RELU_LIKE: dict[Callable, str] = {
    **named_functions("torch", "clamp clamp_ clip clamp_min clamp_min_ maximum fmax max"),
    **named_functions("Tensor", "clamp clamp_ clip clip_ clamp_min clamp_min_ maximum "
                                     "fmax max"),
    **named_functions("F", "threshold threshold_"),
}


def _is_zero(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() > 0 and not value.requires_grad and bool((value == 0).all())
    return isinstance(value, (int, float)) and value == 0


def relu_like_call(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """How a call computes a ReLU without being one (``clamp(min=0)``, ``maximum(x, 0)``,
    ``threshold(x, 0, 0)``), or ``None``."""
    name = RELU_LIKE.get(func)
    if name is None:
        return None
    rest = list(args[1:])
    if name.endswith(("clamp", "clamp_", "clip", "clip_")):
        low = kwargs.get("min", rest[0] if rest else None)
        high = kwargs.get("max", rest[1] if len(rest) > 1 else None)
        return f"{name}(min=0)" if _is_zero(low) and high is None else None
    if name.endswith(("clamp_min", "clamp_min_")):
        return f"{name}(0)" if rest and _is_zero(rest[0]) else None
    if name.endswith(("maximum", "fmax", "max")):
        other = kwargs.get("other", rest[0] if rest else None)
        zero_first = _is_zero(args[0]) if args else False
        return f"{name}(x, 0)" if _is_zero(other) or zero_first else None
    threshold = kwargs.get("threshold", rest[0] if rest else None)
    value = kwargs.get("value", rest[1] if len(rest) > 1 else None)
    return f"{name}(x, 0, 0)" if _is_zero(threshold) and _is_zero(value) else None


@contextlib.contextmanager
def counting_nonlinearities() -> Iterator[Counter[str]]:
    """Count, by name, the non-linearities called inside the block (this thread only).

    Names are ``"F.relu"``, ``"Tensor.relu"``, ``"F.silu"``, ... and for ReLUs written
    another way ``"torch.clamp(min=0)"`` etc. Nothing is changed in the model or torch.
    The Context runs its construction pass inside it, so preconditions cost no pass.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.SiLU(), nn.ReLU())
    >>> with counting_nonlinearities() as found:
    ...     _ = net(torch.ones(1, 2))
    >>> found
    Counter({'F.silu': 1, 'F.relu': 1})
    """
    found: Counter[str] = Counter()

    def observe(func: Callable, args: tuple, kwargs: dict) -> None:
        name = RELU_FUNCTIONS.get(func) or OTHER_ACTIVATIONS.get(func)
        name = name or relu_like_call(func, args, kwargs)
        if name is not None:
            found[name] += 1

    with FunctionRules({}, observe=observe):
        yield found


def census(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    """The non-linearities one forward pass of ``model`` on ``x`` calls, by name and count.

    >>> census(nn.Sequential(nn.Linear(2, 2), nn.SiLU(), nn.ReLU()), torch.ones(1, 2))
    Counter({'F.silu': 1, 'F.relu': 1})
    """
    with model_guard(model), torch.no_grad(), counting_nonlinearities() as found:
        model(x)
    return found


def activation_modules(model: nn.Module) -> list[str]:
    """Class names of the activation modules in ``model`` other than ``nn.ReLU``."""
    kinds = {type(m).__name__ for m in model.modules()
             if type(m).__module__.startswith("torch.nn.modules.activation")
             and not isinstance(m, nn.ReLU)}
    return sorted(kinds)


# --------------------------------------------------------- ReLU backward rules
class RuleSwitch:
    """On/off switch of a ReLU backward rule, read at backward time.

    One forward pass inside :func:`relu_backward` can then serve two backward passes:
    ``active = False`` gives ordinary ReLU gradients (e.g. Grad-CAM's, to a layer),
    ``active = True`` the rule's (e.g. guided backprop's, to the input).
    """

    def __init__(self) -> None:
        self.active = True


def _relu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * [x > 0]`` in one kernel (autograd's own ReLU backward)."""
    return torch.ops.aten.threshold_backward(grad, x, 0)


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes ``g * [x > 0] * [g > 0]`` (guided backprop)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: RuleSwitch) -> torch.Tensor:  # type: ignore[override]
        out = x.clamp(min=0)
        # the output, as torch's own ReLU keeps ([out > 0] = [x > 0]): the input can go
        ctx.save_for_backward(out)
        ctx.switch = switch
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        grad = _relu_grad(grad, out)
        # in place: one new tensor per ReLU instead of two
        return (grad.clamp_(min=0) if ctx.switch.active else grad), None


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward passes ``g * [g > 0]`` (DeconvNet), ignoring the forward sign."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: RuleSwitch) -> torch.Tensor:  # type: ignore[override]
        out = x.clamp(min=0)
        ctx.save_for_backward(out)  # only read when the switch is off (ordinary ReLU)
        ctx.switch = switch
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.switch.active:
            return grad.clamp(min=0), None
        (out,) = ctx.saved_tensors
        return _relu_grad(grad, out), None


_RELU_RULES = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}


@contextlib.contextmanager
def relu_backward(rule: str) -> Iterator[RuleSwitch]:
    """Give every ReLU called inside the block (this thread only) another backward rule.

    ``rule`` is ``"guided"`` or ``"deconvnet"``. ``nn.ReLU`` (which calls ``F.relu``),
    ``F.relu``, ``torch.relu``, ``Tensor.relu`` and the in-place forms all get it, a
    ReLU module used twice included; no module is edited and no torch function is
    replaced (a :class:`FunctionRules` mode). Other activations keep their gradient.
    The block yields a :class:`RuleSwitch` that turns the rule off and on for later
    backward passes of the same forward.

    >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
    >>> with relu_backward("deconvnet"):
    ...     torch.autograd.grad(torch.relu(x).sum(), x)[0]
    tensor([1., 1.])
    """
    if rule not in _RELU_RULES:
        raise ValueError(f"unknown ReLU rule {rule!r}; use one of {list(_RELU_RULES)}")
    function, switch = _RELU_RULES[rule], RuleSwitch()

    def apply(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        out = function.apply(args[0], switch)
        if RELU_FUNCTIONS[func].endswith("_") or kwargs.get("inplace") or (
                len(args) > 1 and args[1] is True):
            # in place, as asked (callers may ignore the result): autograd records the copy
            return args[0].copy_(out)
        return out

    with FunctionRules(dict.fromkeys(RELU_FUNCTIONS, apply)):
        yield switch
