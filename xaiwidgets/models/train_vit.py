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
from .architectures import HYBRID_STEM, build
from .train import _augment, arguments, finish, fit, prepare

NAME = "shapes-vit"


def train(
    n_train: int = 6000,
    n_test: int = 1000,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = 2,
    out: str | Path | None = None,
    init_from: str | None = "shapes-resnet",
) -> dict:
    """Train ``shapes-vit`` and save it; returns the checkpoint dict (weights + metadata).

    ``init_from``: the shipped CNN whose stem and first three stages initialise the
    patch embedding (``None``: random initialisation)."""
    data = prepare(shapes, n_train, n_test, seed, threads)
    model = build(NAME)
    if init_from:  # the patch embedding starts as the trained CNN's first stages
        from . import load

        stem = load(init_from).model.state_dict()
        model.patch_embed.backbone.load_state_dict(
            {k: v for k, v in stem.items() if k.split(".")[0] in HYBRID_STEM})
    # channels-last convolutions are about 1.5-3x faster on CPU (oneDNN)
    model = fit(model.to(memory_format=torch.channels_last), data.inputs, data.labels,
                data.preprocess, _augment, data.generator, epochs, batch_size, lr,
                torch.channels_last, NAME)
    model = model.to(memory_format=torch.contiguous_format)
    meta = {"size": int(data.inputs.shape[-1]), "n_train": n_train, "n_test": n_test,
            "epochs": epochs, "seed": seed, "augment": True, "init_from": init_from}
    return finish(model, data, NAME, NAME, meta, "xaiwidgets.models.train_vit", out)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(train, __doc__.split("\n")[0])
    parser.add_argument("--init-from", default="shapes-resnet",
                        help="shipped CNN whose first stages start the patch embedding "
                             "('none': random)")
    args = vars(parser.parse_args(argv))
    args["init_from"] = None if args["init_from"] == "none" else args["init_from"]
    train(**args)


if __name__ == "__main__":
    main()
