"""Train a shipped shapes model (seeded, CPU-friendly) and write its weights file.

    python -m xaiwidgets.models.train --model shapes-vgg
    python -m xaiwidgets.models.train --model shapes-resnet
    python -m xaiwidgets.models.train --model shapes-vgg --shuffle-labels   # -> shapes-vgg-shuffled

Data: :func:`xaiwidgets.datasets.shapes` at the default size and clutter; the training
set uses seed ``TRAIN_SEED + seed`` and the held-out set ``TEST_SEED + seed``, so seeds
below 10_000 are never seen in training. Augmentation: the 8 flips/rotations by 90
degrees (they keep every class). Optimiser: AdamW with a one-cycle learning rate.
Weights are stored in float16 with their metadata (classes, normalisation, accuracy,
training time, command) in ``xaiwidgets/models/weights/<name>.pt``.

Every shipped classifier's script (this one, :mod:`xaiwidgets.models.train_video`) is
:func:`prepare` (seeded data and normalisation), :func:`fit` (the loop), :func:`finish`
(accuracy, metadata, :func:`save_checkpoint`), with :func:`arguments` for the shared options.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from tqdm.auto import tqdm

from ..datasets.shapes import shapes
from . import WEIGHTS_DIR, Normalize
from .architectures import build

#: the still-image models this script trains (``train_video`` trains shapes-video)
IMAGE_MODELS = ("shapes-resnet", "shapes-vgg")
TRAIN_SEED = 10_000
TEST_SEED = 20_000


def _augment(images: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random element of the dihedral group (flip + rotation by k * 90 degrees); every
    shapes class keeps its label."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    if torch.rand(1, generator=generator) < 0.5:
        images = images.flip(-1)
    return torch.rot90(images, k, dims=(-2, -1)), labels


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    preprocess,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
) -> float:
    """Fraction of ``images`` (display space, [0, 1]) whose top-1 class is ``labels``."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(preprocess(images[start : start + batch_size]))
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def fit(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    preprocess,
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator],
                      tuple[torch.Tensor, torch.Tensor]] | None,
    generator: torch.Generator,
    epochs: int,
    batch_size: int,
    lr: float,
    memory_format: torch.memory_format = torch.channels_last,
    desc: str = "train",
) -> torch.nn.Module:
    """The training loop every shipped classifier uses: AdamW, one-cycle learning rate,
    cross-entropy, a seeded order and augmentation, a tqdm bar.

    ``inputs`` are uint8 display images or clips (×255, compact in memory); ``augment``
    maps a float batch and its labels to an augmented batch and the labels it implies.

    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randint(0, 255, (8, 1, 2, 2), dtype=torch.uint8), torch.arange(8) % 2
    >>> fit(net, x, y, lambda b: b, None, torch.Generator().manual_seed(0), epochs=1,
    ...     batch_size=4, lr=1e-2, memory_format=torch.contiguous_format).training
    True
    """
    n_train = len(inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (n_train // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc=desc)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            batch, target = inputs[index].float() / 255, labels[index]
            if augment is not None:
                batch, target = augment(batch, target, generator)
            batch = batch.contiguous(memory_format=memory_format)
            logits = model(preprocess(batch))
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            hits = float((logits.argmax(1) == target).float().mean())
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{hits:.2f}")
            bar.update()
    bar.close()
    return model


def save_checkpoint(model: torch.nn.Module, meta: dict, path: Path, unit: str = "images") -> dict:
    """Write the float16 weights with their metadata (``meta``) to ``path``; return the dict.

    ``meta`` holds at least ``name``, ``test_accuracy``, ``train_accuracy``, ``n_test``,
    ``train_seconds`` and ``train_cpu_seconds`` (printed in the summary line).
    """
    checkpoint = {
        "state_dict": {
            k: (v.half() if v.is_floating_point() else v).contiguous()
            for k, v in model.state_dict().items()
        },
        **{k: v for k, v in meta.items() if k not in ("name", "n_test")},
        "threads": torch.get_num_threads(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    print(
        f"{meta['name']}: held-out accuracy {meta['test_accuracy']:.4f} ({meta['n_test']} "
        f"{unit}), train accuracy {meta['train_accuracy']:.4f}, {meta['train_seconds']:.0f} s "
        f"({meta['train_cpu_seconds']:.0f} CPU s), {path.stat().st_size / 1e6:.2f} MB -> {path}"
    )
    return checkpoint


@dataclass
class TrainingData:
    """What :func:`prepare` draws for a training script: the training set as uint8
    (×255, compact in memory), the held-out set in float, the normalisation of the
    training set, the seeded generator of the run and its start times."""

    inputs: torch.Tensor
    labels: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: np.ndarray
    std: np.ndarray
    preprocess: Normalize
    attrs: dict
    generator: torch.Generator
    started: tuple[float, float]


def prepare(make: Callable[..., xr.Dataset], n_train: int, n_test: int, seed: int,
            threads: int | None) -> TrainingData:
    """Seed torch and draw a shipped model's data: ``make(n=n_train, seed=TRAIN_SEED + seed)``
    to train on and ``make(n=n_test, seed=TEST_SEED + seed)`` held out; the mean and
    standard deviation per channel are the training set's. ``threads``: torch's CPU
    threads (0 or None: leave them).

    >>> data = prepare(shapes, n_train=4, n_test=2, seed=0, threads=None)
    >>> data.inputs.dtype, tuple(data.x_test.shape), data.attrs["classes"][0]
    (torch.uint8, (2, 3, 128, 128), 'circle')
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter(), time.process_time()
    train_set = make(n=n_train, seed=TRAIN_SEED + seed)
    test_set = make(n=n_test, seed=TEST_SEED + seed)
    # statistics over every dim but the channel: (image, y, x) or (image, t, y, x)
    dims = tuple(d for d in train_set.image.dims if d != "channel")
    mean = train_set.image.mean(dims).values
    std = train_set.image.std(dims).values
    return TrainingData(
        # uint8 keeps 8,000 images or 4,000 clips at ~400 MB
        inputs=torch.from_numpy(np.rint(train_set.image.values * 255).astype(np.uint8)),
        labels=torch.from_numpy(train_set.label.values),
        x_test=torch.from_numpy(test_set.image.values),
        y_test=torch.from_numpy(test_set.label.values),
        mean=mean, std=std, preprocess=Normalize(mean, std), attrs=dict(train_set.attrs),
        generator=generator, started=started,
    )


def finish(model: torch.nn.Module, data: TrainingData, name: str, architecture: str,
           meta: dict, script: str, out: str | Path | None, unit: str = "images",
           batch_size: int = 128) -> dict:
    """Time the run, score ``model`` on the held-out set and on as many training inputs,
    and write its checkpoint (:func:`save_checkpoint`) to ``out`` (default: the package's
    ``weights/<name>.pt``). ``meta``: the script's own fields (sizes, options);
    ``script``: the module that trained it, for the ``command`` field."""
    seconds = time.perf_counter() - data.started[0]
    cpu_seconds = time.process_time() - data.started[1]
    n_test = len(data.x_test)
    test_accuracy = accuracy(model, data.preprocess, data.x_test, data.y_test, batch_size)
    train_accuracy = accuracy(model, data.preprocess, data.inputs[:n_test].float() / 255,
                              data.labels[:n_test], batch_size)
    meta = {
        "name": name,
        "architecture": architecture,
        "classes": list(data.attrs["classes"]),
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        **meta,
        "test_accuracy": test_accuracy,
        "train_accuracy": train_accuracy,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "command": f"python -m {script} " + " ".join(sys.argv[1:]),
    }
    path = Path(out) if out else WEIGHTS_DIR / f"{name}.pt"
    return save_checkpoint(model, meta, path, unit)


def arguments(train_function: Callable, description: str) -> argparse.ArgumentParser:
    """The options every training script shares, named and defaulted as
    ``train_function``'s parameters (``--n-train`` sets ``n_train``)."""
    defaults = {k: p.default for k, p in inspect.signature(train_function).parameters.items()}
    parser = argparse.ArgumentParser(description=description)
    for option, kind in (("n_train", int), ("n_test", int), ("epochs", int),
                         ("batch_size", int), ("lr", float), ("seed", int)):
        parser.add_argument("--" + option.replace("_", "-"), type=kind, default=defaults[option])
    parser.add_argument("--threads", type=int, default=defaults["threads"],
                        help="torch CPU threads (0: torch's)")
    parser.add_argument("--out", default=None, help="weights path (default: the package's)")
    return parser


def train(
    name: str = "shapes-vgg",
    n_train: int = 8000,
    n_test: int = 1000,
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    shuffle_labels: bool = False,
    augment: bool = True,
    threads: int | None = 2,
    out: str | Path | None = None,
) -> dict:
    """Train ``name`` and save it; returns the checkpoint dict (weights + metadata)."""
    data = prepare(shapes, n_train, n_test, seed, threads)
    if shuffle_labels:
        data.labels = data.labels[torch.randperm(len(data.labels), generator=data.generator)]
    full_name = name + ("-shuffled" if shuffle_labels else "")
    # channels-last convolutions are about 1.5-3x faster on CPU (oneDNN)
    model = fit(build(name).to(memory_format=torch.channels_last), data.inputs, data.labels,
                data.preprocess, _augment if augment else None, data.generator, epochs,
                batch_size, lr, torch.channels_last, full_name)
    meta = {"size": int(data.inputs.shape[-1]), "n_train": n_train, "n_test": n_test,
            "epochs": epochs, "seed": seed, "shuffle_labels": shuffle_labels,
            "augment": augment}
    return finish(model, data, full_name, name, meta, "xaiwidgets.models.train", out)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(train, __doc__.split("\n")[0])
    parser.add_argument("--model", dest="name", choices=IMAGE_MODELS, default="shapes-vgg",
                        help="shapes-video: python -m xaiwidgets.models.train_video")
    parser.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="permute the training labels (data-randomisation sanity check)",
    )
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no flips/rotations (lets a shuffled-label model memorise its training set)",
    )
    train(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
