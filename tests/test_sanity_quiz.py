"""SanityQuiz: the randomised map is the one its reveal names, the maps and SSIM are the
sanity module's, the sides are seeded, the score counts first answers, the model stays
bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from tests.conftest import make_tiny_cnn
from tests.helpers import assert_untouched, state
from xaiwidgets import metrics
from xaiwidgets.evaluation.sanity import randomized_copy, weight_layers


def images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_cnn()


@pytest.fixture(scope="module")
def quiz(model) -> tuple[xw.SanityQuiz, tuple]:
    before = state(model)
    return xw.SanityQuiz(model, images(), method="gradient", seed=3), before


def test_answers_match_the_reveal_and_the_score_counts_first_answers(quiz):
    q, _ = quiz
    q._answers.clear()
    for i in range(len(q)):
        broken = q.reveal(i)
        other = "left" if broken == "right" else "right"
        assert q.answer(i, other) is False
        assert q.answer(i, broken) is True  # right, but the first answer counts
    assert q.score == (0, len(q))
    q._answers.clear()
    assert q.answer(0, q.reveal(0)) is True and q.score == (1, 1)


def test_maps_are_the_trained_and_the_fully_randomised_models(quiz, model):
    q, _ = quiz
    x = images()
    trained = xw.Explainer(model, x).explain("gradient", target=q.target.tolist()).values
    layers = weight_layers(model, x[:1])
    broken = randomized_copy(model, x[:1], down_to=layers[0], seed=3)
    random = xw.Explainer(broken, x).explain("gradient", target=q.target.tolist()).values
    for i in range(len(q)):
        left, right = q.left_right(i)
        shown_random, shown_trained = (left, right) if q.reveal(i) == "left" else (right, left)
        np.testing.assert_allclose(shown_trained, trained[i], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(shown_random, random[i], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(q.ssim, metrics.ssim(trained, random), rtol=1e-6)
    assert f"SSIM between the two maps: {q.ssim[0]:.2f}" in q.explanation(0)
    assert q.layers == layers and layers[0] in q.explanation(0)


def test_sides_are_seeded(model, quiz):
    q, _ = quiz
    again = xw.SanityQuiz(model, images(), method="gradient", seed=3)
    assert [again.reveal(i) for i in range(6)] == [q.reveal(i) for i in range(6)]
    sides = {tuple(xw.SanityQuiz(model, images(), method="gradient", seed=s)._random_side)
             for s in (0, 1, 2)}
    assert len(sides) > 1
    assert set(q._random_side) == {"left", "right"}  # both sides occur (6 images, seed 3)


def test_the_model_is_untouched(quiz, model):
    _, before = quiz
    assert_untouched(model, before)


def test_buttons_answer_the_shown_image_and_bad_input(quiz):
    q, _ = quiz
    q._answers.clear()
    q.controls["image"].value = 1
    buttons = q.children[3].children
    broken = q.reveal(1)
    buttons[0 if broken == "left" else 1].click()
    assert q.score == (1, 1) and "Right!" in q.feedback.value
    with pytest.raises(ValueError, match="choose 'left' or 'right'"):
        q.answer(0, "middle")
    with pytest.raises(IndexError, match="out of range"):
        q.reveal(6)


def test_quiz_handout_folds_the_answers(quiz, tmp_path):
    q, _ = quiz
    text = q.export_html(tmp_path / "quiz.html", progress=False).read_text()
    assert text.count("<details><summary>answer") == 6
