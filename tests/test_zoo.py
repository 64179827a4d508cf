"""The engine's contract over a zoo: every registered method on the 15 torchvision
families, a set of timm CNNs and hand-written models leaves the model, its hooks and
torch itself exactly as before, whether the call succeeds, refuses or fails.

Random weights, small inputs and the methods' quick parameters keep it within CI's
time. Set ``XAIWIDGETS_ZOO_TABLE=path.json`` to write the table model x method ->
ok / refused (reason) and LRP's rule per layer type.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from torch import nn

import xaiwidgets as xw

from .helpers import (
    ZOO,
    assert_model_unchanged,
    model_snapshot,
    randomise_batchnorms,
    write_zoo_table,
)

TABLE: dict[str, dict[str, str]] = {}

#: methods that only run the model forward on perturbed or interpolated inputs, through
#: the same guarded pass as ``gradient``: what they could change on a model, gradient and
#: occlusion already exercise. CI runs them on the small models; XAIWIDGETS_ZOO_FULL=1 runs
#: every method on every model (about 20 min on 2 cores).
SAMPLING = {"integrated_gradients", "smoothgrad", "lime", "meaningful_perturbation"}
SMALL = {"resnet18", "vgg11_bn", "densenet (121's blocks, narrow)", "mobilenet_v3_small",
         "timm/resnet18", "hand/functional_relu", "hand/residual_add",
         "hand/silu_gelu_tanh", "hand/batchnorm_out_of_order"}


def zoo_methods(name: str) -> list[str]:
    """Every registered method on the small models (or with XAIWIDGETS_ZOO_FULL=1), the
    structural ones (all but :data:`SAMPLING`) on the others."""
    if name in SMALL or os.environ.get("XAIWIDGETS_ZOO_FULL") == "1":
        return xw.methods()
    return [m for m in xw.methods() if m not in SAMPLING]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_method_leaves_the_zoo_untouched(name):
    build, size = ZOO[name]
    torch.manual_seed(0)
    model = randomise_batchnorms(build().eval())
    for m in model.modules():  # like a user's model: in-place activations where allowed
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish)):
            m.inplace = True
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    ex = xw.Explainer(model, x)
    ex.logits()
    before = model_snapshot(model)
    row = TABLE.setdefault(name, {})
    # .ci/run's second pass (zennit 1.0) sets XAIWIDGETS_ZOO_METHODS=lrp
    chosen = os.environ.get("XAIWIDGETS_ZOO_METHODS")
    for method in chosen.split(",") if chosen else zoo_methods(name):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = ex.explain(method, target=3, **xw.get_method(method).quick_params)
            except (ValueError, TypeError) as error:  # a documented refusal
                assert len(str(error)) > 20, f"{method} on {name}: unclear refusal {error!r}"
                row[method] = f"refused: {str(error)[:160]}"
            else:
                assert result.shape == (1, size, size)
                assert torch.isfinite(torch.from_numpy(result.values)).all(), \
                    f"{method} on {name}: non-finite map"
                row[method] = "ok"
                if method == "lrp":
                    row["lrp_rules"] = result.attrs["lrp_rules"]
                    row["lrp_unseen"] = result.attrs["lrp_unseen"]
                    row["lrp_conservation_error"] = float(result.attrs["conservation_error"][0])
        notes = sorted({str(w.message)[:120] for w in caught
                        if issubclass(w.category, UserWarning)})
        if notes:
            row[method] += f" (warns: {len(notes)})"
        row[method] += f" [{time.perf_counter() - start:.2f}s]"
        assert_model_unchanged(model, before, f"{method} on {name}")
    write_zoo_table(TABLE)


@pytest.mark.parametrize("name", ["resnet18", "densenet (121's blocks, narrow)",
                                  "hand/batchnorm_out_of_order"])
def test_lrp_failures_inside_canonizers_and_rules_leave_the_zoo_untouched(name, monkeypatch):
    from zennit import rules
    from zennit.torchvision import ResNetBasicBlockCanonizer

    from xaiwidgets.families.lrp import engine as lrp_engine

    build, size = ZOO[name]
    torch.manual_seed(0)
    model = randomise_batchnorms(build().eval())
    x = torch.rand(1, 3, size, size)
    before = model_snapshot(model)
    calls = {"merge": 0}
    real_merge = lrp_engine.merge_batchnorm

    def failing_merge(layer, norm):
        calls["merge"] += 1
        if calls["merge"] == 2:  # one merge done, the second fails
            raise RuntimeError("injected merge failure")
        real_merge(layer, norm)

    def failing_rule(self, module, grad_input, grad_output):
        raise RuntimeError("injected rule failure")

    def failing_block(self, module, name_):
        raise RuntimeError("injected canonizer failure")

    for target, attribute, replacement, message in [
        (lrp_engine, "merge_batchnorm", failing_merge, "merge"),
        (rules.ZPlus, "backward", failing_rule, "rule"),
        (rules.Pass, "backward", failing_rule, "rule"),
        (ResNetBasicBlockCanonizer, "register", failing_block, "canonizer"),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, replacement)
            try:
                xw.explain(model, x, "lrp", target=1)
            except RuntimeError as error:
                assert f"injected {message} failure" in str(error)
        assert_model_unchanged(model, before, f"lrp with a failing {message}")
    # and the model still works, with the same maps as a fresh copy would give
    fresh = randomise_batchnorms(build().eval())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(xw.explain(model, x, "lrp", target=1).values,
                               xw.explain(fresh, x, "lrp", target=1).values)
