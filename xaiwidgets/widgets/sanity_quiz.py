"""SanityQuiz: which of two maps comes from a model whose weights were randomised?

Per image, the method's map from the trained model and the same method's map from a
copy with cascading randomisation of *all* its layers (the sanity check of Adebayo
et al., :func:`xaiwidgets.evaluation.sanity.randomized_copy`), both for the trained
model's predicted class, are shown left and right, the sides drawn at random
(``seed``). The student picks the broken one; the answer is explained (what changed,
and the SSIM between the two maps: a method that passes the check gives a low SSIM).
The model under study is never changed: the randomisation works on a deep copy.

>>> q = SanityQuiz(model, images, method="gradcam")                     # doctest: +SKIP
>>> q.answer(0, "left"); q.reveal(0); q.score                           # doctest: +SKIP
(False, 'right', (0, 1))
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import numpy as np
import torch
import xarray as xr

from ..core.registry import get_method
from ..evaluation.sanity import randomized_copy, similarity, weight_layers
from ..explainer import Explainer
from .controls import LAYOUT, STYLE
from .export import Exportable
from .figures import MapGrid, image_uri
from .lifecycle import Closable

SIDES = ("left", "right")
#: side of each map panel (px)
PANEL_PX = 300
#: the method quizzed when the caller names none
DEFAULT_METHOD = "gradcam"


class SanityQuiz(Closable, Exportable, W.VBox):
    """Two maps per image, one from a randomised copy of the model: spot the broken one.

    ``q.answer(i, "left"|"right")`` returns True when the student picked the map of
    the randomised model (the first answer per image counts towards the score);
    ``q.reveal(i)`` gives that map's side and shows why; ``q.score`` is
    ``(right, asked)``; ``q.ssim`` the SSIM of each image's two maps; ``q.maps`` the
    trained and randomised maps ("model", "image", "y", "x")::

        q = xw.SanityQuiz(model, ds.image.values, preprocess=preprocess, method="gradient")
        q.answer(0, "right"), q.reveal(0), q.explanation(0)
    """

    def __init__(self, model: torch.nn.Module, images: Any,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 method: str = DEFAULT_METHOD, seed: int = 0,
                 classes: Sequence[str] | None = None) -> None:
        super().__init__()
        self.method = get_method(method).name
        self.seed = int(seed)
        if isinstance(images, xr.Dataset):
            images = images["image"]
        ex = Explainer(model, images, preprocess=preprocess, classes=classes, progress=False)
        if ex.images.ndim != 4:
            raise ValueError("SanityQuiz takes still images (N,C,H,W)")
        #: the images (N,C,H,W) in [0, 1]
        self.images = ex.images
        self.target = ex.resolve_target(None)
        #: the randomised layers, bottom (first run) to top
        self.layers = weight_layers(model, ex.inputs[:1])
        if not self.layers:
            raise ValueError("the model has no convolution or linear layer to randomise")
        broken = randomized_copy(model, ex.inputs[:1], down_to=self.layers[0],
                                 layers=self.layers, seed=self.seed)
        trained = ex.explain(self.method, target=self.target.tolist())
        randomised = Explainer(broken, images, preprocess=preprocess, classes=classes,
                               progress=False).explain(self.method, target=self.target.tolist())
        self.maps = xr.concat(
            [trained.drop_vars(["target", "class_name"], errors="ignore"),
             randomised.drop_vars(["target", "class_name"], errors="ignore")],
            dim="model", combine_attrs="drop_conflicts", coords="minimal", compat="override",
        ).assign_coords(model=["trained", "randomised"])
        #: SSIM of each image's trained and randomised maps (1 = the same map)
        self.ssim = similarity(trained, randomised).ssim.values
        rng = np.random.default_rng(self.seed)
        self._random_side = [SIDES[k] for k in rng.integers(0, 2, len(self.target))]
        self.classes = list(classes) if classes is not None else None
        self._answers: dict[int, str] = {}
        self._build()

    # ------------------------------------------------------------------ quiz
    def __len__(self) -> int:
        return len(self._random_side)

    def left_right(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The (left, right) maps of image ``i`` as shown."""
        i = self._check(i)
        trained, randomised = (self.maps.sel(model=m).isel(image=i).values
                               for m in ("trained", "randomised"))
        return (randomised, trained) if self._random_side[i] == "left" else (trained,
                                                                             randomised)

    def answer(self, i: int, side: str) -> bool:
        """The student thinks ``side`` ("left"/"right") of image ``i`` is the broken map;
        True when it is. The first answer per image counts towards :attr:`score`."""
        i = self._check(i)
        if side not in SIDES:
            raise ValueError(f"side={side!r}: choose 'left' or 'right'")
        self._answers.setdefault(i, side)
        right = side == self._random_side[i]
        if i == self.index:
            self._feedback(right)
        return right

    def reveal(self, i: int) -> str:
        """The side ("left"/"right") of image ``i``'s map from the randomised model."""
        i = self._check(i)
        if i == self.index:
            self.feedback.value = self._explain_html(i)
        return self._random_side[i]

    def explanation(self, i: int) -> str:
        """Why: what was randomised, and the SSIM between the two maps of image ``i``."""
        i = self._check(i)
        ssim = float(self.ssim[i])
        verdict = ("very different: the method depends on what the model learnt"
                   if ssim < 0.3 else "still alike: this method's map partly ignores the "
                   "weights (it shows the image more than the model)" if ssim > 0.6 else
                   "only partly alike")
        return (f"The {self._random_side[i]} map of image {i} came from a copy of the model "
                f"whose {len(self.layers)} weight layers ({self.layers[-1]} down to "
                f"{self.layers[0]}) were all re-initialised at random (cascading "
                f"randomisation, seed {self.seed}): it has forgotten everything it learnt. "
                f"Both maps explain the same class with {self.method}. SSIM between the two "
                f"maps: {ssim:.2f} (1 = identical): {verdict}.")

    @property
    def score(self) -> tuple[int, int]:
        """(right answers, images answered), first answer per image."""
        right = sum(side == self._random_side[i] for i, side in self._answers.items())
        return right, len(self._answers)

    # -------------------------------------------------------------------- UI
    @property
    def index(self) -> int:
        """The image shown."""
        return int(self.controls["image"].value)

    def _build(self) -> None:
        n = len(self)
        self.controls: dict[str, W.ValueWidget] = {
            "image": W.Dropdown(options=[(f"image {i}", i) for i in range(n)], value=0,
                                description="image", style=STYLE, layout=W.Layout(**LAYOUT))}
        self.controls["image"].observe(lambda _: self._draw(), names="value")
        self.grid = MapGrid(2, titles=list(SIDES), panel_px=PANEL_PX)
        self.figure = self.grid.figure
        self.figure.layout.width = 2 * PANEL_PX + 40
        buttons = []
        for side in SIDES:
            button = W.Button(description=f"{side} is broken", icon="bug",
                              tooltip=f"the {side} map comes from the randomised model",
                              layout=W.Layout(width="150px"))
            button.on_click(lambda _, side=side: self.answer(self.index, side))
            buttons.append(button)
        nxt = W.Button(description="next", icon="arrow-right", layout=W.Layout(width="90px"))
        nxt.on_click(lambda _: setattr(self.controls["image"], "value", (self.index + 1) % n))
        self.feedback = W.HTML(layout=W.Layout(max_width="640px"))
        self.score_label = W.HTML()
        intro = W.HTML(f"<b>Sanity quiz</b> ({html.escape(self.method)}): one map comes from "
                       "the trained model, the other from a copy whose weights are random. "
                       "Which one is broken?")
        self.children = [intro, self.controls["image"], self.figure, W.HBox([*buttons, nxt]),
                         self.feedback, self.score_label]
        self._draw()

    def _draw(self) -> None:
        i = self.index
        left, right = self.left_right(i)
        uri = image_uri(self.images[i])
        with self.figure.batch_update():
            self.grid.show(0, left, image=uri, title="left")
            self.grid.show(1, right, image=uri, title="right")
        self.feedback.value = (self._explain_html(i) if i in self._answers else "")
        self._show_score()

    def _feedback(self, right: bool) -> None:
        verdict = ("<b style='color:#2e7d32'>Right!</b>" if right
                   else "<b style='color:#b00020'>Not this time.</b>")
        self.feedback.value = verdict + self._explain_html(self.index)
        self._show_score()

    def _explain_html(self, i: int) -> str:
        return f"<div style='line-height:1.4'>{html.escape(self.explanation(i))}</div>"

    def _show_score(self) -> None:
        right, asked = self.score
        self.score_label.value = f"score: <b>{right}</b> / {asked}"

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range 0..{len(self) - 1}")
        return i

    # ---------------------------------------------------------------- handout
    def _export_html_parts(self) -> list[str]:
        """The question and, folded, its answer (a handout is self-checking)."""
        i = self.index
        return [f"<p>Which map of image {i} comes from the randomised model?</p>"
                f"<details><summary>answer</summary><p>{html.escape(self.explanation(i))}"
                "</p></details>"]
