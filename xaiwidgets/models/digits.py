"""``digits``: a small grayscale CNN for the classroom, trained offline on scikit-learn's
bundled 8×8 handwritten digits, upsampled to 32×32 (one channel).

>>> import xaiwidgets as xw
>>> model, preprocess, classes = xw.models.load("digits")
>>> images, labels = held_out(4)
>>> model(preprocess(images)).argmax(1).shape, images.shape[1], classes[3]
(torch.Size([4]), 1, '3')

Train (seeded, about a CPU-minute on one thread; writes ``weights/digits.pt``)::

    python -m xaiwidgets.models.digits --epochs 30

Data: ``sklearn.datasets.load_digits`` (1797 images, 8×8, values 0..16, shipped with
scikit-learn, no download), scaled to [0, 1] and bilinearly upsampled to 32×32; a
seeded 80/20 split (:data:`SPLIT_SEED`): 1438 training and 359 held-out images.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 32
CLASSES = [str(d) for d in range(10)]
#: seed of the train / held-out permutation (the held-out part is never trained on)
SPLIT_SEED = 0
HELD_OUT = 0.2
WEIGHTS = Path(__file__).parent / "weights" / "digits.pt"


def build() -> nn.Module:
    """The architecture: 3 × (Conv3×3-BN-ReLU), max-pools after the first two, widths
    16-32-64 (feature maps 32, 16, 8 px), global average pool, Linear(64, 10); 24 k
    parameters.

    >>> build()(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
    """
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                      *block(32, 64)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def dataset(split: str = "held_out") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) in [0, 1] and labels of the ``"train"`` or ``"held_out"`` split.

    Needs scikit-learn (its bundled copy of the UCI digits; no network).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits data need scikit-learn: pip install scikit-learn") \
            from error
    data = load_digits()
    small = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear",
                                             align_corners=False).clamp(0.0, 1.0)
    labels = torch.as_tensor(data.target, dtype=torch.long)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    cut = int(round(len(labels) * (1 - HELD_OUT)))
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r}: choose 'train' or 'held_out'")
    index = torch.as_tensor(order[:cut] if split == "train" else order[cut:])
    return images[index], labels[index]


def held_out(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` held-out images (N, 1, 32, 32) in [0, 1] and their labels."""
    images, labels = dataset("held_out")
    return images[:n], labels[:n]


def accuracy(model: nn.Module, preprocess, images: torch.Tensor,
             labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose predicted class is ``labels`` (eval mode, no autograd)."""
    model.eval()
    with torch.no_grad():
        return float((model(preprocess(images)).argmax(1) == labels).float().mean())


def train(epochs: int = 30, seed: int = 0, lr: float = 3e-3, batch: int = 64,
          threads: int = 1) -> tuple[nn.Module, dict]:
    """Train :func:`build` on the training split; returns the model and its metadata.

    Adam, one-cycle learning rate up to ``lr``, random shifts of up to 2 px as
    augmentation, seeded (``seed``), ``torch.set_num_threads(threads)``.
    """
    from . import Normalize

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = dataset("train")
    mean, std = float(images.mean()), float(images.std())
    preprocess = Normalize((mean,), (std,))
    model = build()
    steps = epochs * -(-len(images) // batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(images), generator=generator).split(batch):
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(images[index], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(preprocess(x)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    meta = {
        "classes": CLASSES, "mean": (mean,), "std": (std,), "size": SIZE,
        "train_accuracy": accuracy(model, preprocess, images, labels),
        "held_out_accuracy": accuracy(model, preprocess, *dataset("held_out")),
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu, 1),
        "command": f"python -m xaiwidgets.models.digits --epochs {epochs} --seed {seed} "
                   f"--lr {lr} --threads {threads}",
    }
    return model.eval(), meta


def save(model: nn.Module, meta: dict, path: str | Path = WEIGHTS) -> Path:
    """Write float16 weights with the metadata (``torch.load(path, weights_only=True)``)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "architecture": "digits", **meta}, path)
    return path


def load(weights: str | Path | None = "default"):
    """``(model, preprocess, classes)`` of the digits CNN (what ``xw.models.load("digits")``
    returns); ``weights=None`` gives random initialisation with the shipped normalisation."""
    from . import LoadedModel, Normalize, _read_checkpoint

    path = WEIGHTS if weights == "default" else weights
    checkpoint = _read_checkpoint(WEIGHTS if path is None else path)
    model = build()
    if path is not None:
        model.load_state_dict(checkpoint["state_dict"])
        if weights == "default":
            model.xaiwidgets_name = "digits"
    preprocess = Normalize(checkpoint.get("mean", (0.5,)), checkpoint.get("std", (0.25,)))
    return LoadedModel(model.eval(), preprocess, list(checkpoint.get("classes", CLASSES)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    model, meta = train(args.epochs, args.seed, args.lr, threads=args.threads)
    path = save(model, meta, args.out)
    print(f"wrote {path}: held-out accuracy {meta['held_out_accuracy']:.4f}, "
          f"train {meta['train_accuracy']:.4f}, {meta['train_cpu_seconds']} CPU s")


if __name__ == "__main__":  # pragma: no cover
    main()
