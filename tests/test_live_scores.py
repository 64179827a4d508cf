"""Live scores beside a map and the sanity toggle's randomised model copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import xaiwidgets as xw
from xaiwidgets.evaluation import sanity
from xaiwidgets.widgets.live_scores import LiveScores, score_map

pytest.importorskip("ipywidgets")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def deletion_by_hand(model: nn.Module, image: torch.Tensor, saliency: np.ndarray,
                     target: int, step: float) -> float:
    """Textbook deletion: zero the most relevant pixels first, trapezoid of the probability."""
    h, w = saliency.shape
    order = np.argsort(-saliency.ravel(), kind="stable")
    fractions = np.round(np.arange(0, 1 + step / 2, step), 10)
    probs = []
    for f in fractions:
        x = image.clone().reshape(3, -1)
        x[:, order[:int(round(f * h * w))]] = 0.0
        with torch.no_grad():
            probs.append(torch.softmax(model(x.reshape(1, 3, h, w)), 1)[0, target].item())
    return float(np.trapezoid(probs, fractions))


def test_score_map_matches_independent_computations():
    model = tiny_model()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ex = xw.Explainer(model, image, progress=False)
    saliency = ex.explain("gradient")
    gaze = np.random.default_rng(2).random((8, 8))
    scores, curves = score_map(ex, saliency, gaze, step=0.25)
    target = int(saliency.target.values[0])
    expected = deletion_by_hand(model, image[0], saliency.values[0], target, 0.25)
    assert scores["deletion"] == pytest.approx(expected, rel=1e-5)
    assert len(curves["deletion"][0]) == 5 and curves["insertion"][1][-1] == pytest.approx(
        torch.softmax(model(image), 1)[0, target].item(), rel=1e-5)  # all pixels back
    assert scores["pcc"] == pytest.approx(np.corrcoef(saliency.values[0].ravel(),
                                                      gaze.ravel())[0, 1], rel=1e-6)
    s = saliency.values[0].astype(np.float64)
    s = (s - s.min()) / (s.max() - s.min())
    g = (gaze - gaze.min()) / (gaze.max() - gaze.min())
    assert scores["sim"] == pytest.approx(np.minimum(s / s.sum(), g / g.sum()).sum(), rel=1e-6)
    assert set(score_map(ex, saliency, step=0.5)[0]) == {"deletion", "insertion"}
    with pytest.raises(ValueError, match="gaze map is"):
        score_map(ex, saliency, np.zeros((4, 4)))


def test_panel_shows_scores_and_curves():
    model = tiny_model()
    ex = xw.Explainer(model, torch.rand(1, 3, 8, 8), progress=False)
    panel = LiveScores(step=0.5)
    scores = panel.update(ex, ex.explain("gradient"), gaze=np.ones((8, 8)))
    assert panel.scores == scores and "deletion" in panel.table.value
    assert "↓" in panel.table.value and "pcc" in panel.table.value
    deletion = next(t for t in panel.figure.data if t.name == "deletion")
    np.testing.assert_allclose(deletion.y, panel.curves["deletion"][1])
    assert list(deletion.x) == [0.0, 0.5, 1.0]
    panel.clear()
    assert panel.scores == {} and "computing" in panel.table.value


def test_randomized_copy_leaves_the_model_and_matches_the_cascade():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(2, 3, 12, 12)  # SSIM (in the reference test) wants >= 11 px
    layers = sanity.weight_layers(model, images[:1])
    assert layers == ["0", "2", "6"]
    copy = sanity.randomized_copy(model, images[:1], down_to="2", seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the user's model is untouched
    state = copy.state_dict()
    assert torch.equal(state["0.weight"], before["0.weight"])  # below the cut: trained
    assert not torch.equal(state["2.weight"], before["2.weight"])
    assert not torch.equal(state["6.weight"], before["6.weight"])
    # the same model as the cascading randomisation test at that layer
    target = xw.Explainer(model, images, progress=False).resolve_target(None).tolist()
    ref = sanity.model_randomization(model, images, "gradient", modes=["cascading"],
                                     seed=3, keep_maps=True, progress=False)
    mine = xw.Explainer(copy, images, progress=False).explain("gradient", target=target)
    np.testing.assert_allclose(
        mine.values, ref.saliency.sel(mode="cascading", layer="2").values, rtol=1e-5,
        atol=1e-7)
    with pytest.raises(ValueError, match="not a randomisable layer"):
        sanity.randomized_copy(model, images[:1], down_to="4")


def test_explainer_widget_live_scores_and_randomize_toggle():
    from xaiwidgets.widgets import ExplainerWidget

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    gaze = np.random.default_rng(5).random((2, 12, 12))
    w = ExplainerWidget(model, images, method="gradient", background=False, gaze=gaze)
    assert not w.live.enabled and w.live.scores == {}  # synchronous: off by default
    w.live.enabled = True
    w.refresh()
    assert w.error is None and set(w.live.scores) == {"pcc", "sim", "deletion", "insertion"}
    expected, _ = score_map(w.explainer(0), w.result, gaze[0])
    assert w.live.scores == pytest.approx(expected)
    original = w.result.values.copy()
    # the sanity toggle: a randomised copy from the logits down to the first conv
    assert [v for _, v in w.controls["randomize"].options] == ["none", "6", "2", "0"]
    w.controls["randomize"].value = "0"
    assert w.error is None and not np.allclose(w.result.values, original)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the user's model is untouched
    copy = sanity.randomized_copy(model, images[:1], down_to="0")
    ref = xw.Explainer(copy, images[:1], progress=False).explain(
        "gradient", target=int(w.result.target.values[0]))
    np.testing.assert_allclose(w.result.values, ref.values, rtol=1e-5, atol=1e-7)
    w.controls["randomize"].value = "none"
    np.testing.assert_allclose(w.result.values, original, rtol=1e-6)


def test_compare_widget_scores_every_method():
    from xaiwidgets.widgets import CompareWidget

    model = tiny_model()
    images = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    w = CompareWidget(model, images, ["gradient", "gradcam"], background=False)
    w.live.enabled = True
    w.refresh()
    assert w.error is None and set(w.live.scores) == {"gradient", "gradcam"}
    for name in ("gradient", "gradcam"):
        expected, _ = score_map(w.explainer(0), w.results[name])
        assert w.live.scores[name] == pytest.approx(expected)
    assert len(w.live.figure.data) == 4 and "gradcam" in w.live.table.value


def test_live_scores_in_the_background_follow_the_map():
    from xaiwidgets.widgets import ExplainerWidget

    model = tiny_model()
    images = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    w = ExplainerWidget(model, images, method="gradient", background=True)
    assert w.wait(timeout=60) and w.live.enabled and w.error is None
    assert set(w.live.scores) == {"deletion", "insertion"}
    w.controls["method"].value = "gradcam"
    assert w.wait(timeout=60)
    expected, _ = score_map(w.explainer(0), w.result)
    assert w.result.attrs["method"] == "gradcam" and w.live.scores == pytest.approx(expected)
