"""Threads: a method's rules never reach another thread, and explanations computed
concurrently on one model equal serial ones, for every registered method."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.core.scoped import model_guard

from .conftest import cnn_methods, make_tiny_cnn, make_tiny_resnet, quick


def run_together(jobs: list[Callable[[], object]]) -> list[object]:
    """Run the jobs in one thread each, started together; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = jobs[i]()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "deeplift",
                                    "guided_gradcam"])
def test_another_threads_plain_gradient_is_untouched(method):
    # an even-sized batch: the old process-wide DeepLIFT patch zeroed its second half
    model = make_tiny_resnet()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1])
    x = images.clone()

    def plain() -> torch.Tensor:
        x_ = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(x_).gather(1, target[:, None]).sum(), x_)[0]

    serial = plain()
    rounds = 6
    explainer = xw.Explainer(model, images, progress=False)
    results = run_together([
        lambda: [explainer.explain(method, target=[0, 1]) for _ in range(rounds)],
        lambda: [plain() for _ in range(rounds)],
        lambda: [xw.Explainer(model, images, progress=False).explain("gradient", target=[0, 1])
                 for _ in range(rounds)],
    ])
    for grad in results[1]:
        assert torch.equal(grad, serial)
    alone = xw.Explainer(model, images, progress=False).explain("gradient", target=[0, 1])
    for result in results[2]:
        np.testing.assert_array_equal(result.values, alone.values)


def test_every_registered_method_concurrently_equals_serial():
    model = make_tiny_cnn()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = cnn_methods()

    def explain(name: str) -> np.ndarray:
        ex = xw.Explainer(model, images, progress=False)
        return ex.explain(name, target=[1, 2], **quick(name)).values

    serial = {name: explain(name) for name in names}
    concurrent = run_together([lambda name=name: explain(name) for name in names])
    for name, values in zip(names, concurrent, strict=True):
        np.testing.assert_array_equal(values, serial[name], err_msg=name)


def test_exclusive_guard_waits_for_shared_users_and_keeps_them_out():
    model = make_tiny_cnn().train()
    order: list[str] = []
    shared_in, release = threading.Event(), threading.Event()

    def shared() -> None:
        with model_guard(model):
            order.append("shared in")
            shared_in.set()
            release.wait(10)
            order.append("shared out")

    def exclusive() -> None:
        shared_in.wait(10)
        with model_guard(model, exclusive=True):
            order.append("exclusive")
            assert not model.training

    threads = [threading.Thread(target=shared), threading.Thread(target=exclusive)]
    for t in threads:
        t.start()
    shared_in.wait(10)
    threading.Event().wait(0.2)  # the exclusive guard is now waiting
    assert order == ["shared in"]
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["shared in", "shared out", "exclusive"]
    assert model.training  # restored by the last one out
    with model_guard(model), pytest.raises(RuntimeError, match="changes_model"), \
            model_guard(model, exclusive=True):
        pass


def test_forward_only_methods_keep_in_place_relus_beside_gradient_methods():
    # FEM and MLFEM run the model with its own in-place ReLUs while gradient methods
    # need them off: concurrent calls flip the flag under each other's passes, and
    # every result still equals the serial one; the flags end as they began
    model = make_tiny_resnet()  # its blocks' ReLU(inplace=True) runs twice
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    flags = [r.inplace for r in relus]
    assert any(flags)
    seen: list[bool] = []
    hooks = [r.register_forward_pre_hook(lambda m, _: seen.append(m.inplace)) for r in relus
             if r.inplace]
    try:
        xw.Explainer(model, images, progress=False).explain("fem")
        assert seen and all(seen)  # FEM alone: the model's in-place ReLUs ran as they are
        seen.clear()
        xw.Explainer(model, images, progress=False).explain("gradient", target=[0, 1])
        assert seen and not any(seen)  # a gradient: switched off
    finally:
        for h in hooks:
            h.remove()
    names = ["fem", "mlfem", "gradient", "gradcam", "guided_backprop", "fem"]

    def explain(name: str) -> np.ndarray:
        ex = xw.Explainer(model, images, progress=False)
        return ex.explain(name, target=[0, 1], **quick(name)).values

    serial = {name: explain(name) for name in names}
    for _ in range(3):
        concurrent = run_together([lambda name=name: explain(name) for name in names])
        for name, values in zip(names, concurrent, strict=True):
            np.testing.assert_array_equal(values, serial[name], err_msg=name)
    assert [r.inplace for r in relus] == flags
