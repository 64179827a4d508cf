"""Context.memo: typed entries (owner, key) built once, kept with the cache."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.core.context import Context
from xaiwidgets.families import cam, fem
from xaiwidgets.families import lrp as lrp_module


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


class Counter:
    """A build function counting its calls."""

    def __init__(self, value: object) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> object:
        self.calls += 1
        return self.value


def test_same_key_different_owners_do_not_collide():
    ctx = Context(small_cnn(), torch.rand(1, 3, 8, 8))
    first, second = object(), object()
    assert ctx.memo(first, ("layer", 1.0), lambda: "first") == "first"
    assert ctx.memo(second, ("layer", 1.0), lambda: "second") == "second"
    assert ctx.memoized(first, ("layer", 1.0)) == "first"
    assert ctx.memoized(second, ("layer", 1.0)) == "second"
    assert ctx.memoized(second, ("layer", 2.0)) is None


def test_build_runs_once_per_key_also_across_threads():
    ctx = Context(small_cnn(), torch.rand(1, 3, 8, 8))
    build, gate = Counter(1), threading.Event()

    def slow() -> object:
        gate.wait(0.2)  # let the other threads arrive while the first builds
        return build()

    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(lambda _: ctx.memo("owner", "key", slow), range(8)))
    assert values == [1] * 8 and build.calls == 1
    other = Counter(2)
    assert ctx.memo("owner", "other key", other) == 2 and other.calls == 1


def test_a_failing_build_keeps_nothing():
    ctx = Context(small_cnn(), torch.rand(1, 3, 8, 8))

    def fail() -> object:
        raise RuntimeError("no")

    try:
        ctx.memo("owner", "key", fail)
    except RuntimeError:
        pass
    assert ctx.memoized("owner", "key") is None
    assert ctx.memo("owner", "key", lambda: 3) == 3


def test_limit_drops_the_owners_oldest_entries_only():
    ctx = Context(small_cnn(), torch.rand(1, 3, 8, 8))
    ctx.memo("other", 0, lambda: "kept")
    for k in range(5):
        ctx.memo("owner", k, lambda k=k: k, limit=3)
    assert [ctx.memoized("owner", k) for k in range(5)] == [None, None, 2, 3, 4]
    assert ctx.memoized("other", 0) == "kept"


def test_entries_go_with_new_images_new_weights_and_clear_cache():
    model = small_cnn()
    ex = xw.Explainer(model, torch.rand(2, 3, 8, 8), progress=False)
    ex.context.memo("owner", "key", lambda: 1)
    ex.context.clear_cache()
    assert ex.context.memoized("owner", "key") is None
    ex.context.memo("owner", "key", lambda: 1)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # edited in place: the entries refer to another model
    assert ex.context.memoized("owner", "key") is None
    ex.context.memo("owner", "key", lambda: 1)
    ex.set_images(torch.rand(2, 3, 8, 8))
    assert ex.context.memoized("owner", "key") is None


def test_families_keep_their_entries_under_their_own_owner():
    ex = xw.Explainer(small_cnn(), torch.rand(2, 3, 8, 8), progress=False)
    ex.explain("lrp", target=[0, 1])
    ex.explain("mlfem", layers=["1", "3"])
    ex.explain("gradcam", layer="2", target=[0, 1], channels=[0, 1])
    ctx = ex.context
    assert ctx.memoized(lrp_module.canonized, None) is not None
    assert ctx.memoized(fem.fem_maps, (("1", "3"), 1.0)) is not None
    activation, weights = ctx.memoized(cam.layer_terms, ("2", (0, 1)))
    # the kept terms are the layer's activation and its mean gradient
    act, grad = ctx.layer_gradient("2", torch.tensor([0, 1]))
    torch.testing.assert_close(activation, act)
    torch.testing.assert_close(weights, grad.mean(dim=(2, 3), keepdim=True))


def test_explainer_offers_the_user_facing_names_and_leaves_passes_to_its_context():
    ex = xw.Explainer(small_cnn(), torch.rand(2, 3, 8, 8), progress=False)
    ctx = ex.context
    assert (ex.device, ex.n_images, ex.size, ex.num_classes) == \
        (ctx.device, 2, (8, 8), 3)
    assert ex.layers() == ctx.layers() and ex.block_layers() == ctx.block_layers()
    assert ex.default_layer() == ctx.default_layer()
    torch.testing.assert_close(ex.logits(), ctx.logits())
    with torch.no_grad():
        torch.testing.assert_close(ex.activations(["1"])["1"], torch.relu(ctx.model[0](ctx.inputs)))
    assert ex.resolve_target(None).tolist() == ctx.logits().argmax(1).tolist()
    torch.testing.assert_close(ex.scores(ctx.inputs, torch.tensor(1)), ctx.logits()[:, 1])
    ex.clear_cache()
    assert ctx.cached_logits() is None
    for internal in ("forward", "input_gradient", "layer_gradient", "summed_input_gradient",
                     "progress_bar", "report_progress", "valid_cache"):
        assert not hasattr(ex, internal), internal
