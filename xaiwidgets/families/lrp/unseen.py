"""Operations of a forward pass that LRP's rules cannot see (functional residual adds,
gates, pooling, ...), reported by module name.

Observed through :class:`~xaiwidgets.core.scoped.FunctionRules` (a torch function
mode on the calling thread only: nothing in torch is replaced) with module hooks
recorded in a :class:`~xaiwidgets.core.scoped.Scope`, both undone on exit.

>>> class Residual(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv = nn.Conv2d(2, 2, 3, padding=1)
...     def forward(self, x):
...         return x + self.conv(x)
>>> model = Residual()
>>> with unseen_operations(model, ruled={id(model.conv)}) as found:
...     _ = model(torch.rand(1, 2, 4, 4, requires_grad=True))
>>> describe_unseen(found)
"residual add (relevance is copied to both summands, not split) in (the model's forward)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...core.scoped import FunctionRules, Scope

#: torch functions (by name) that carry relevance wrongly when called outside a module
#: that has a rule: relevance then crosses them as a plain gradient
UNSEEN = {
    "residual add (relevance is copied to both summands, not split)":
        {"add", "add_", "__add__", "__radd__", "__iadd__",
         "sub", "sub_", "__sub__", "__rsub__", "__isub__"},
    "product of two activations (a gate; relevance goes to both factors)":
        {"mul", "mul_", "__mul__", "__rmul__", "__imul__",
         "div", "div_", "__truediv__", "__itruediv__"},
    "functional average pooling or mean (relevance is divided by the pool size)":
        {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean", "sum"},
    "functional linear map (no LRP rule)":
        {"linear", "conv1d", "conv2d", "conv3d", "matmul", "__matmul__", "mm", "bmm",
         "einsum"},
    "functional normalisation (no LRP rule)":
        {"batch_norm", "layer_norm", "group_norm", "instance_norm", "normalize"},
    "functional non-ReLU activation (relevance is scaled by its derivative)":
        {"silu", "gelu", "sigmoid", "tanh", "softmax", "log_softmax", "hardswish",
         "hardsigmoid", "mish", "elu", "softplus"},
}
_KIND = {fn: kind for kind, names in UNSEEN.items() for fn in names}
_TWO_OPERANDS = {next(iter(UNSEEN)), list(UNSEEN)[1]}


def _flows(value: Any) -> bool:
    """``value`` is a tensor that carries relevance (depends on the input)."""
    return (isinstance(value, torch.Tensor) and value.requires_grad
            and not isinstance(value, nn.Parameter))


@contextlib.contextmanager
def unseen_operations(model: nn.Module, ruled: set[int]) -> Iterator[dict[str, set[str]]]:
    """Inside the block, record ``{module name: {problems}}`` for every operation of a
    forward pass that LRP's rules do not see (see :data:`UNSEEN`).

    ``ruled``: ids of the modules whose output a rule computes (operations inside them
    are the rule's business). The module name is the innermost module whose
    ``forward`` made the call ("" for the model's own forward). Only this thread's
    passes are observed; the hooks and the function mode go on exit.
    """
    names = {id(m): name for name, m in model.named_modules()}
    stack: list[tuple[str, bool]] = []  # (module name, has a rule) of the open forwards
    found: dict[str, set[str]] = {}

    def enter(module: nn.Module, _args: tuple) -> None:
        stack.append((names.get(id(module), ""), id(module) in ruled))

    def leave(_module: nn.Module, _args: tuple, _output: Any) -> None:
        stack.pop()

    with Scope() as scope:
        for module in model.modules():
            scope.handle(module.register_forward_pre_hook(enter))
            scope.handle(module.register_forward_hook(leave))
        scope.mode(FunctionRules({}, observe=_observer(stack, found)))
        yield found


def _observer(stack: list[tuple[str, bool]], found: dict[str, set[str]]
              ) -> Callable[[Callable, tuple, dict], None]:
    """What :func:`unseen_operations` does with each torch call: a call outside a
    rule-bearing module on relevance-carrying tensors is recorded under the innermost
    module's name."""

    def observe(func: Callable, args: tuple, kwargs: dict) -> None:
        kind = _KIND.get(getattr(func, "__name__", ""))
        if kind is None or (stack and stack[-1][1]):
            return
        operands = [a for a in (*args, *kwargs.values()) if _flows(a)]
        if len(operands) >= (2 if kind in _TWO_OPERANDS else 1):
            where = stack[-1][0] if stack else ""
            found.setdefault(where, set()).add(kind)

    return observe


def describe_unseen(unseen: dict[str, set[str]], most: int = 4) -> str:
    """``"residual add (...) in 'block1', 'block2'; ..."`` ("" when nothing was found).

    >>> describe_unseen({"b1": {"residual add"}, "": {"residual add", "mean"}})
    "mean in (the model's forward); residual add in (the model's forward), 'b1'"
    """
    where: dict[str, list[str]] = {}
    for name, kinds in sorted(unseen.items()):
        for kind in kinds:
            where.setdefault(kind, []).append(repr(name) if name else "(the model's forward)")
    parts = []
    for kind, names in sorted(where.items()):
        more = f" and {len(names) - most} more" if len(names) > most else ""
        parts.append(f"{kind} in {', '.join(names[:most])}{more}")
    return "; ".join(parts)
