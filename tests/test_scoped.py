"""core/scoped.py: one change log, undone in reverse order; function rules per thread;
nothing in torch replaced; the model guard's lock and failure paths."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core.scoped import (
    FunctionRules,
    Scope,
    census,
    model_guard,
    relu_backward,
    relu_like_call,
)

from .conftest import cnn_methods, make_tiny_cnn


def torch_identities() -> dict[str, int]:
    """``{qualified name: id(object)}`` of everything stored in torch, F and the tensor
    classes (their ``__dict__``: what a replacement would change)."""
    owners = (("torch", torch), ("F", F), ("Tensor", torch.Tensor),
              ("TensorBase", torch._C.TensorBase))
    return {f"{prefix}.{name}": id(obj) for prefix, owner in owners
            for name, obj in list(vars(owner).items())}


def test_scope_undoes_in_reverse_order_even_when_setting_up_fails():
    model = make_tiny_cnn()
    log: list[str] = []
    conv, norm = model[0], model[1]
    had_extra = hasattr(norm, "extra")
    with pytest.raises(RuntimeError, match="fails part-way"), Scope() as scope:
        scope.undo(log.append, "first")
        scope.handle(conv.register_forward_hook(lambda *a: None))
        scope.set(norm, "eps", 0.0)
        scope.set(norm, "eps", 1.0)  # a second change of one attribute
        scope.set(norm, "extra", 3)  # an attribute the module did not have
        scope.undo(log.append, "last")
        assert norm.eps == 1.0 and norm.extra == 3 and len(conv._forward_hooks) == 1
        raise RuntimeError("fails part-way")
    assert log == ["last", "first"]
    assert norm.eps == 1e-5 and hasattr(norm, "extra") == had_extra
    assert len(conv._forward_hooks) == 0


def test_scope_keeps_undoing_when_an_undo_fails():
    norm = nn.BatchNorm2d(2)

    def broken() -> None:
        raise ValueError("undo failed")

    with pytest.raises(ValueError, match="undo failed"), Scope() as scope:
        scope.set(norm, "eps", 0.0)
        scope.undo(broken)
        scope.set(norm, "momentum", 0.5)
    assert norm.eps == 1e-5 and norm.momentum == 0.1


class FailingFlag(nn.Module):
    """``inplace`` that cannot be written: the model guard fails half-way through."""

    @property
    def inplace(self) -> bool:
        return True

    @inplace.setter
    def inplace(self, value: bool) -> None:
        raise RuntimeError("read-only flag")


def test_model_guard_failing_half_way_restores_what_it_changed():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True), FailingFlag()).train()
    with pytest.raises(RuntimeError, match="read-only"), model_guard(model):
        pass
    assert all(m.training for m in model.modules())
    assert model[1].inplace is True
    with model_guard(model[:2]):  # the guard is usable again afterwards
        assert not model[1].inplace


def test_function_rules_act_only_in_the_thread_and_block_that_set_them():
    x = torch.tensor([-1.0, 2.0])
    inside = threading.Event()
    done = threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        inside.wait(10)
        seen["other"] = F.relu(x)  # runs while the main thread is inside the mode
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with FunctionRules({F.relu: lambda f, args, kw: f(*args, **kw) + 10}):
        inside.set()
        assert done.wait(10)
        seen["mine"] = F.relu(x)
    worker.join()
    assert seen["other"].tolist() == [0.0, 2.0]
    assert seen["mine"].tolist() == [10.0, 12.0]
    assert F.relu(x).tolist() == [0.0, 2.0]


@pytest.mark.parametrize("call", [
    lambda x: F.relu(x), lambda x: torch.relu(x), lambda x: x.relu(),
    lambda x: nn.ReLU()(x), lambda x: F.relu(x.clone(), inplace=True),
    lambda x: x.clone().relu_(), lambda x: torch.relu_(x.clone()),
])
def test_relu_rules_cover_every_way_to_call_a_relu(call):
    x = torch.tensor([[-1.0, 2.0, 3.0]], requires_grad=True)
    upstream = torch.tensor([[1.0, -1.0, 2.0]])
    expected = {"guided": [[0.0, 0.0, 2.0]], "deconvnet": [[1.0, 0.0, 2.0]]}
    for rule, grads in expected.items():
        with relu_backward(rule):
            out = call(x)
            assert out.tolist() == [[0.0, 2.0, 3.0]]
            (grad,) = torch.autograd.grad(out, x, upstream)
        assert grad.tolist() == grads, rule
    (plain,) = torch.autograd.grad(call(x), x, upstream)
    assert plain.tolist() == [[0.0, -1.0, 2.0]]


def test_in_place_relu_under_a_rule_still_writes_in_place():
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    with relu_backward("guided"):
        y = x * 1
        y.relu_()  # the result is ignored, as in code that relies on in-place writing
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert y.tolist() == [0.0, 2.0] and grad.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("method", cnn_methods())
def test_no_function_in_torch_is_replaced_during_or_after_a_call(method):
    before = torch_identities()
    model = make_tiny_cnn()
    during: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:  # another thread looks while the method runs
        while not stop.is_set():
            during.update({k: v for k, v in torch_identities().items() if before.get(k) != v})
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        xw.explain(model, torch.rand(2, 3, 16, 16), method, target=[0, 1],
                   **xw.get_method(method).quick_params)
    finally:
        stop.set()
        watcher.join()
    assert during == {}
    after = torch_identities()
    assert {k for k in before if after.get(k) != before[k]} == set()


def test_census_names_every_kind_of_non_linearity():
    class Mixed(nn.Module):
        def forward(self, x):
            x = F.silu(x) + x.relu() + torch.relu(x) + nn.GELU()(x) + nn.Hardswish()(x)
            x = x + x.clamp(min=0) + F.threshold(x, 0.0, 0.0) + torch.maximum(x, torch.zeros(()))
            return x + x.clamp(min=-1, max=1) + nn.LeakyReLU()(x)  # clamp(-1, 1) is no ReLU

    found = census(Mixed(), torch.randn(1, 4))
    assert dict(found) == {
        "F.silu": 1, "Tensor.relu": 1, "torch.relu": 1, "F.gelu": 1, "F.hardswish": 1,
        "Tensor.clamp(min=0)": 1, "F.threshold(x, 0, 0)": 1, "torch.maximum(x, 0)": 1,
        "F.leaky_relu": 1,
    }
    assert relu_like_call(torch.clamp, (torch.ones(1),), {"min": 0.5}) is None


def test_a_rule_that_fails_leaves_no_mode_behind():
    def broken(func, args, kwargs):
        raise RuntimeError("rule failed")

    x = torch.tensor([-1.0, 2.0])
    with pytest.raises(RuntimeError, match="rule failed"), FunctionRules({F.relu: broken}):
        F.relu(x)
    assert torch._C._len_torch_function_stack() == 0
    assert F.relu(x).tolist() == [0.0, 2.0]


def test_no_shipped_method_changes_the_model_as_the_guide_says():
    # every shipped method leaves the model alone (LRP hooks a shadow copy), so none
    # declares changes_model; the guide says so instead of telling authors to set it
    from pathlib import Path

    from xaiwidgets.core import scoped

    assert not [name for name in xw.methods() if xw.get_method(name).changes_model]
    guide = (Path(__file__).parents[1] / "docs" / "guide" / "adding-a-method.md").read_text()
    assert "none of the shipped ones does" in guide
    assert "`changes_model = True`" in guide
    assert not hasattr(scoped, "HookSet")  # unused: one Scope collects every hook


def test_guard_keeps_in_place_activations_only_while_no_holder_needs_them_off():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True)).train()
    with model_guard(model, keep_inplace=True):
        assert not model.training and model[1].inplace
        with model_guard(model):  # a pass with autograd inside a forward-only call
            assert not model[1].inplace
        assert model[1].inplace and not model.training
        with model_guard(model, keep_inplace=True):
            assert model[1].inplace
    assert model.training and model[1].inplace
    with model_guard(model):
        with model_guard(model, keep_inplace=True):  # no-grad pass inside a gradient call
            assert not model[1].inplace
        assert not model[1].inplace
    assert model.training and model[1].inplace


def test_guard_failing_to_switch_in_place_off_restores_eval_mode_too():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True), FailingFlag()).train()
    with pytest.raises(RuntimeError):
        with model_guard(model, keep_inplace=True):
            with model_guard(model):
                pass
    assert model.training and model[1].inplace
    with pytest.raises(RuntimeError):
        with model_guard(model):
            pass
    assert all(m.training for m in model.modules()) and model[1].inplace
