"""The construction probe is remembered per model and input shape (xaiwidgets.core.probe):
a new Explainer on a model already probed runs no pass at construction, and any change
that could change what the probe found makes it run again."""

import gc
import weakref

import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core import probe

from .conftest import count_forwards, make_tiny_cnn, make_tiny_resnet


def construction_passes(model: nn.Module, images: torch.Tensor, **kwargs) -> int:
    forwards, handle = count_forwards(model)
    try:
        xw.Explainer(model, images, **kwargs)
    finally:
        handle.remove()
    return len(forwards)


def probed(model: nn.Module, images: torch.Tensor, **kwargs) -> xw.Explainer:
    """An Explainer made while a pass counter is on the model, so it is probed afresh
    (the counter's hook is part of the key), then one made without the counter."""
    construction_passes(model, images, **kwargs)
    return xw.Explainer(model, images, **kwargs)


def test_a_second_explainer_on_the_same_model_and_size_runs_no_pass():
    model, images = make_tiny_resnet(), torch.rand(3, 3, 32, 32)
    forwards, handle = count_forwards(model)
    try:
        first = xw.Explainer(model, images)
        assert len(forwards) == 1  # the probe, on one image
        second = xw.Explainer(model, torch.rand(5, 3, 32, 32))  # other pixels, batch size
        assert len(forwards) == 1
        xw.Explainer(model, torch.rand(1, 3, 40, 40))  # another size: probed
        assert len(forwards) == 2
    finally:
        handle.remove()
    ctx1, ctx2 = first.context, second.context
    assert ctx2.shapes() == ctx1.shapes() and ctx2.layers() == ctx1.layers()
    assert ctx2.num_classes == ctx1.num_classes == 4
    assert ctx2.nonlinearities() == ctx1.nonlinearities() and ctx2.nonlinearities()
    assert ctx2._calls == ctx1._calls


def test_remembered_facts_give_the_same_explanations():
    model, images = make_tiny_cnn(), torch.rand(2, 3, 32, 32)
    forwards, handle = count_forwards(model)
    try:
        expected = {m: xw.Explainer(model, images).explain(m, target=[1, 2]).values
                    for m in ("gradcam", "fem", "guided_backprop")}
    finally:
        handle.remove()
    for method, values in expected.items():  # without the counter: recalled, not probed
        ex = xw.Explainer(model, images)
        torch.testing.assert_close(torch.from_numpy(ex.explain(method, target=[1, 2]).values),
                                   torch.from_numpy(values))
    # a single image: the probe was the whole batch and its logits were kept; recalled,
    # the first prediction runs the pass the probe would have run
    one = images[:1]
    assert probed(model, one).predict(top=1).values.shape == (1, 1)
    forwards, handle = count_forwards(model)
    try:
        ex = xw.Explainer(model, one)
        assert len(forwards) == 1  # the counter's hook changed the key: probed again
        ex.predict()
        assert len(forwards) == 1  # ... and the probe's logits were kept
    finally:
        handle.remove()


def test_replacing_a_module_or_changing_its_settings_probes_again():
    model, images = make_tiny_cnn(classes=4), torch.rand(2, 3, 32, 32)
    assert probed(model, images).context.num_classes == 4
    model[8] = nn.Linear(16 * 16, 7)  # a new head
    ex = xw.Explainer(model, images)
    assert ex.context.num_classes == 7 and ex.predict(top=1).values.shape == (2, 1)

    pool = next(m for m in model.modules() if isinstance(m, nn.MaxPool2d))
    before = xw.Explainer(model, images).context.shapes()
    pool.kernel_size = pool.stride = 4  # a setting changed in place, same module
    after = xw.Explainer(model, images).context.shapes()
    assert after != before
    assert after == probed(model, images).context.shapes()


def test_a_new_hook_or_a_callable_output_selector_probes_again():
    model, images = make_tiny_cnn(), torch.rand(2, 3, 32, 32)
    probed(model, images)
    assert construction_passes(model, images) == 1  # its own counter is a new hook

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"logits": self.net(x)}

    wrapped = Wrapped()
    pick = lambda out: out["logits"]  # noqa: E731
    probed(wrapped, images, output=pick)
    forwards, handle = count_forwards(wrapped)
    try:
        for _ in range(2):
            xw.Explainer(wrapped, images, output=pick)
        assert len(forwards) == 2  # a callable selector is never keyed
        xw.Explainer(wrapped, images, output="logits")
        xw.Explainer(wrapped, images, output="logits")
        assert len(forwards) == 3  # a key is: probed once
    finally:
        handle.remove()


def test_lazy_modules_are_probed_every_time():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    images = torch.rand(1, 3, 8, 8)
    assert probe.probe_key(model, images, None) is None
    xw.Explainer(model, images)  # the probe initialises the lazy layer
    assert probe.probe_key(model, images, None) is not None


def test_the_remembered_facts_do_not_keep_the_model_alive_and_stay_bounded():
    model = make_tiny_cnn()
    for size in range(16, 16 + 2 * (probe.KEEP + 3), 2):
        xw.Explainer(model, torch.rand(1, 3, size, size))
    assert len(probe._PROBES[model]) == probe.KEEP
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_probe_failures_are_not_remembered():
    model = make_tiny_cnn()
    with pytest.raises(ValueError, match="channel"):
        xw.Explainer(model, torch.rand(1, 1, 32, 32))  # grayscale for an RGB model
    with pytest.raises(ValueError, match="channel"):
        xw.Explainer(model, torch.rand(1, 1, 32, 32))  # still refused: nothing remembered


def test_recalled_facts_are_copies_the_next_explainer_does_not_share():
    model, images = make_tiny_cnn(), torch.rand(2, 3, 32, 32)
    first = probed(model, images).context
    shapes, calls = dict(first.shapes()), first._calls.copy()
    nonlinearities = first.nonlinearities().copy()
    # a caller scribbling on what its Context got cannot change what others recall
    first.shapes()["extra"] = (1,)
    first._calls["extra"] += 1
    first.nonlinearities()["extra"] += 1
    second = xw.Explainer(model, images).context
    assert second.shapes() == shapes and second._calls == calls
    assert second.nonlinearities() == nonlinearities
    second.shapes().clear()
    assert xw.Explainer(model, images).context.shapes() == shapes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_construction_refuses_a_single_non_finite_pixel(bad):
    images = torch.rand(2, 3, 32, 32)
    images[1, 2, 5, 7] = bad  # one value among 6144, not the minimum or maximum otherwise
    with pytest.raises(ValueError, match="NaN or inf"):
        xw.Explainer(make_tiny_cnn(), images)
    images[1, 2, 5, 7] = 0.5
    assert xw.Explainer(make_tiny_cnn(), images).n_images == 2
