"""A method's contract lives in its class: every registered method declares how its
target is resolved (``Method.targets``), and the Explainer reads only that."""

from __future__ import annotations

import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.core import registry
from xaiwidgets.core.registry import TARGETS, Method, Param, register


def declaring_class(method: Method) -> type | None:
    """The class (the method's own or a registered ancestor) that sets ``targets``."""
    for klass in type(method).__mro__:
        if klass is Method:
            return None
        if "targets" in vars(klass):
            return klass
    return None


@pytest.mark.parametrize("name", xw.methods())
def test_every_method_declares_how_its_target_is_resolved(name):
    method = xw.get_method(name)
    assert declaring_class(method) is not None, (
        f"{type(method).__name__} inherits Method.targets: declare it in the class")
    assert method.targets in TARGETS
    assert method.class_agnostic == (method.targets == "ignored")


class Recorded:
    """The ``target`` each call of a recording method received."""

    seen: list = []


def recording_method(mode: str) -> type[Method]:
    class RecordTarget(Method):
        name = f"_record_target_{mode}"
        targets = mode
        params = (Param("scale", 1.0),)

        def attribute(self, ctx, target, layer, scale):
            Recorded.seen.append(None if target is None else target.tolist())
            return torch.ones(ctx.inputs.shape[0], 4, 4) * scale

    return RecordTarget


@pytest.mark.parametrize("mode, given, received", [
    ("ignored", None, [None]),
    ("ignored", 1, [None]),
    ("from_own_pass", None, [None]),
    ("from_own_pass", 1, [[1, 1]]),
    ("resolved", 1, [[1, 1]]),
])
def test_the_declared_mode_decides_what_attribute_gets(mode, given, received, tiny_cnn, images):
    cls = register(recording_method(mode))
    try:
        Recorded.seen = []
        ex = xw.Explainer(tiny_cnn, images, progress=False)
        result = ex.explain(cls.name, target=given)
        assert Recorded.seen == received
        predicted = ex.logits().argmax(1).tolist()
        assert result.target.values.tolist() == (predicted if given is None else [1, 1])
        assert result.attrs["class_agnostic"] == int(mode == "ignored")
    finally:
        registry._REGISTRY.pop(cls.name, None)


def test_resolved_mode_gets_the_predicted_classes(tiny_cnn, images):
    cls = register(recording_method("resolved"))
    try:
        Recorded.seen = []
        ex = xw.Explainer(tiny_cnn, images, progress=False)
        ex.explain(cls.name)
        assert Recorded.seen == [ex.logits().argmax(1).tolist()]
    finally:
        registry._REGISTRY.pop(cls.name, None)


def test_from_own_pass_gets_resolved_targets_once_logits_are_cached(tiny_cnn, images):
    cls = register(recording_method("from_own_pass"))
    try:
        Recorded.seen = []
        ex = xw.Explainer(tiny_cnn, images, progress=False)
        predicted = ex.logits().argmax(1).tolist()
        ex.explain(cls.name)
        assert Recorded.seen == [predicted]
    finally:
        registry._REGISTRY.pop(cls.name, None)


@pytest.mark.parametrize("flag, value", [("class_agnostic", "ignored"),
                                         ("target_from_pass", "from_own_pass")])
def test_a_replaced_flag_is_refused_naming_the_declaration(flag, value):
    cls = type("OldStyle", (Method,), {"name": "_old_style", flag: True})
    with pytest.raises(TypeError, match=f"targets = '{value}'"):
        register(cls)
    assert "_old_style" not in xw.methods()


def test_an_unknown_mode_is_refused():
    cls = type("Unknown", (Method,), {"name": "_unknown_mode", "targets": "predicted"})
    with pytest.raises(ValueError, match="choose one of"):
        register(cls)
    assert "_unknown_mode" not in xw.methods()


def test_layer_channel_and_conditional_methods_come_from_the_classes(tiny_cnn, images):
    """Which methods take a layer, measure channels or give conditional maps is read
    from their classes: a newly registered method joins the lists, no name list to edit."""

    class Conditional(Method):
        name = "_conditional_probe"
        uses_layer = True

        def attribute(self, ctx, target, layer):
            return ctx.activations([layer])[layer].sum(1)

        def conditional(self, ctx, target, layer, channels):
            return ctx.activations([layer])[layer][:, channels].sum(1)

    register(Conditional)
    try:
        assert "_conditional_probe" in registry.layer_methods()
        assert "_conditional_probe" in registry.conditional_methods()
        assert "_conditional_probe" not in registry.channel_measures()
        ex = xw.Explainer(tiny_cnn, images, progress=False)
        layer = "0"  # the first convolution: at input size, so no upsampling
        acts = ex.activations([layer])[layer]
        one = ex.explain("_conditional_probe", layer=layer, channels=[1], reduce=None)
        whole = ex.explain("_conditional_probe", layer=layer)
        assert one.attrs["channels"] == [1] and whole.dims == ("image", "y", "x")
        # the conditional map is the one channel's activation (no normalize_output)
        assert acts.shape[-2:] == images.shape[-2:]
        torch.testing.assert_close(torch.from_numpy(one.values), acts[:, 1].float())
        with pytest.raises(ValueError, match="_conditional_probe"):
            ex.explain("gradient", channels=[0])
        with pytest.raises(TypeError, match="_conditional_probe"):
            ex.explain("gradient", layer=layer)
        with pytest.raises(ValueError, match="'lrp'"):
            ex.channels(layer, "_conditional_probe")
    finally:
        registry._REGISTRY.pop("_conditional_probe", None)
    assert registry.channel_measures()[-1] == registry.ACTIVATION


@pytest.mark.parametrize("name", xw.methods())
def test_every_method_says_what_its_progress_counts(name):
    unit = xw.get_method(name).progress_unit
    assert isinstance(unit, str) and unit.isalpha()
