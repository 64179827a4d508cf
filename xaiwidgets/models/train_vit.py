"""Train the shipped ``shapes-vit`` Vision Transformer (seeded, CPU-friendly) and write its weights.

    python -m xaiwidgets.models.train_vit

Data, seeds, augmentation and the loop are those of :mod:`xaiwidgets.models.train`:
:func:`xaiwidgets.datasets.shapes` at 128 px (training seed ``TRAIN_SEED + seed``,
held-out ``TEST_SEED + seed``), the 8 flips/rotations by 90 degrees, AdamW with a
one-cycle learning rate. A transformer needs more steps than the CNNs, so it trains
for more epochs. Weights are stored in float16 with their metadata in
``xaiwidgets/models/weights/shapes-vit.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..datasets.shapes import shapes
from .architectures import build
from .train import _augment, arguments, finish, fit, prepare

NAME = "shapes-vit"


def train(
    n_train: int = 8000,
    n_test: int = 1000,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = 2,
    out: str | Path | None = None,
) -> dict:
    """Train ``shapes-vit`` and save it; returns the checkpoint dict (weights + metadata).

    ``threads``: torch's CPU threads (2 by default, the machine it was trained on)."""
    data = prepare(shapes, n_train, n_test, seed, threads)
    model = fit(build(NAME), data.inputs, data.labels, data.preprocess, _augment,
                data.generator, epochs, batch_size, lr, torch.contiguous_format, NAME)
    meta = {"size": int(data.inputs.shape[-1]), "n_train": n_train, "n_test": n_test,
            "epochs": epochs, "seed": seed, "augment": True}
    return finish(model, data, NAME, NAME, meta, "xaiwidgets.models.train_vit", out)


def main(argv: list[str] | None = None) -> None:
    train(**vars(arguments(train, __doc__.split("\n")[0]).parse_args(argv)))


if __name__ == "__main__":
    main()
