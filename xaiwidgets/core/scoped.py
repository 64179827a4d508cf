"""Scoped changes to a user's model: every one is undone on exit, exception or not.

* :func:`model_guard` – eval mode and non-in-place ReLUs for the duration of a call,
  then the exact ``training`` flags and ``inplace`` flags restored.
* :func:`capture` – forward hooks that record layer outputs; handles removed on exit.
* :func:`relu_backward` – swaps the backward rule of every ReLU (module, functional
  or in-place, shared modules included) for guided backprop / DeconvNet.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

# Explanations may run in several threads on one model (dask's threaded scheduler):
# the guard is reference-counted per model so the first entry saves the state and
# the last exit restores it, and hooks/ReLU swaps only act in the thread that made them.
_GUARD_LOCK = threading.Lock()
_GUARDED: dict[int, list] = {}  # id(model) -> [entries, training flags, inplace flags]


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode with non-in-place ReLUs; restore everything after.

    In-place activations break forward/backward hooks and overwrite captured
    activations, so they are switched off here rather than rejected. Nested and
    concurrent guards on one model are fine: the last one out restores the state.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True)).train()
    >>> with model_guard(m):
    ...     assert not m.training and not m[1].inplace
    >>> m.training, m[1].inplace
    (True, True)
    """
    key = id(model)
    with _GUARD_LOCK:
        if key in _GUARDED:
            _GUARDED[key][0] += 1
        else:
            modules = list(model.modules())
            training = [(m, m.training) for m in modules]
            inplace = [(m, True) for m in modules if getattr(m, "inplace", None) is True]
            _GUARDED[key] = [1, training, inplace]
            # flags are only written where they change: Module.train()/__setattr__ on
            # every module of an eval-mode ResNet50 costs milliseconds, paid by every
            # slider change
            for m, flag in training:
                if flag:
                    m.training = False
            for m, _ in inplace:
                m.inplace = False
    try:
        yield model
    finally:
        with _GUARD_LOCK:
            entry = _GUARDED[key]
            entry[0] -= 1
            if entry[0] == 0:
                del _GUARDED[key]
                for m, flag in entry[1]:
                    if m.training != flag:
                        m.training = flag
                for m, flag in entry[2]:
                    m.inplace = flag


class HookSet:
    """Handles collected in one place and removed in one call."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


class RecordOverwritten(RuntimeError):
    """A recorded output was changed in place later in the pass (see :func:`capture`)."""


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

    >>> conv = nn.Conv2d(3, 4, 3)
    >>> with capture({"conv": conv}) as acts:
    ...     _ = conv(torch.zeros(1, 3, 8, 8))
    >>> acts["conv"].shape
    torch.Size([1, 4, 6, 6])
    """
    records: dict[str, torch.Tensor] = {}
    versions: dict[str, int] = {}
    hooks = HookSet()
    owner = threading.get_ident()

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if threading.get_ident() != owner:  # another thread's pass on the same model
                return None
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "pick a layer whose output is a single feature map"
                )
            records[name] = output.detach() if detach else output
            if not copy:
                versions[name] = output._version  # shared with the detached record
                return None
            return output.clone()

        return hook

    try:
        for name, module in modules.items():
            hooks.add(module.register_forward_hook(make_hook(name)))
        yield records
    finally:
        hooks.remove()
    changed = [name for name, version in versions.items()
               if records[name]._version != version]
    if changed:
        raise RecordOverwritten(f"outputs of {changed} were modified in place after capture")


class RuleSwitch:
    """On/off switch of a swapped ReLU backward rule, read at backward time.

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
_ORIGINAL_RELUS = (F.relu, F.relu_, torch.relu, torch.relu_)
_relu_state = threading.local()
_swap_lock = threading.Lock()
_swap_users = 0


def _dispatch(original: Callable, takes_inplace: bool) -> Callable:
    """A stand-in for a ReLU function: the swapped rule in threads that asked for one."""

    def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        rule = getattr(_relu_state, "rule", None)
        if rule is None:
            return original(x, inplace=inplace) if takes_inplace else original(x)
        return rule.apply(x, _relu_state.switch)

    return relu


_SWAPPED = tuple(_dispatch(f, i == 0) for i, f in enumerate(_ORIGINAL_RELUS))


@contextlib.contextmanager
def relu_backward(rule: str) -> Iterator[RuleSwitch]:
    """Swap the backward rule of every ReLU called inside the block (this thread only).

    ``rule`` is ``"guided"`` or ``"deconvnet"``. It works by swapping
    ``torch.nn.functional.relu`` (which ``nn.ReLU`` calls) and ``torch.relu``
    while any thread is inside such a block, so a ReLU module used twice, a
    functional ReLU and an in-place ReLU all get the rule, and no module is
    edited. Other threads keep ordinary ReLUs. The block yields a :class:`RuleSwitch`
    that turns the rule off and on for later backward passes of the same forward.
    """
    global _swap_users
    function = _RELU_RULES[rule]
    previous = getattr(_relu_state, "rule", None), getattr(_relu_state, "switch", None)
    with _swap_lock:
        if _swap_users == 0:
            F.relu, F.relu_, torch.relu, torch.relu_ = _SWAPPED
        _swap_users += 1
    _relu_state.rule, _relu_state.switch = function, RuleSwitch()
    try:
        yield _relu_state.switch
    finally:
        _relu_state.rule, _relu_state.switch = previous
        with _swap_lock:
            _swap_users -= 1
            if _swap_users == 0:
                F.relu, F.relu_, torch.relu, torch.relu_ = _ORIGINAL_RELUS
