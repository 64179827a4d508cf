"""Training of MLFEM's NET fusion operator (the runtime is :mod:`xaiwidgets.net`).

Train one for a package model from the command line::

    python -m xaiwidgets.models.train_net train --model shapes-resnet --epochs 20 \\
        --out xaiwidgets/models/weights/net-shapes-resnet.pt

or in Python: ``maps, targets, layers = fem_dataset(...)``, ``net, _ = fit(maps, targets)``.

>>> maps, targets = torch.rand(4, 2, 8, 8), torch.rand(4, 8, 8)
>>> net, history = fit(maps, targets, epochs=1)
>>> len(history["train_mse"])
1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.ops import minmax
from ..evaluation import metrics
from ..explainer import Explainer
from ..families.fem import fem_maps, resolve_layers
from ..fusion import fuse_maps
from ..net import (
    WEIGHTS_DIR,
    FusionNet,
    apply_net,
    model_fingerprint,
    model_numel,
    save_net,
)


def fem_dataset(model: nn.Module, images: torch.Tensor, gfdm: torch.Tensor,
                preprocess: Callable | None = None, layers: Sequence[str] | None = None,
                K: float = 1.0, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor,
                                                              list[str]]:
    """FEM stacks (N, L, H, W) of ``images`` and GFDM targets min-max scaled to [0, 1].

    Returns ``(maps, targets, layer_names)``; images are explained in chunks.
    """
    chunks = []
    for start in range(0, len(images), batch_size):
        ex = Explainer(model, images[start:start + batch_size], preprocess=preprocess,
                       progress=False)
        names = resolve_layers(ex.context, layers)
        chunks.append(fem_maps(ex.context, names, K).float().cpu())
    targets = minmax(torch.as_tensor(np.asarray(gfdm), dtype=torch.float32))
    return torch.cat(chunks), targets, names


def fit(maps: torch.Tensor, targets: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor]
        | None = None, epochs: int = 20, lr: float = 3e-3, batch_size: int = 16,
        seed: int = 0, log: Callable[[str], None] | None = None) -> tuple[FusionNet, dict]:
    """Train a :class:`FusionNet` on (N, L, H, W) ``maps`` against (N, H, W) ``targets``.

    Adam, MSE, seeded (init and shuffling; the global RNG is left untouched). With
    ``val`` the weights of the epoch with the lowest validation MSE are kept.
    Returns ``(net, history)``, history lists ``train_mse`` and ``val_mse`` per epoch.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FusionNet(maps.shape[1]).to(maps.device)
    with torch.no_grad():
        # start at the mean target: gaze maps are mostly near 0, and from the sigmoid's
        # 0.5 the first steps drive every ReLU negative (a dead, constant net)
        mean = targets.mean().clamp(1e-3, 1 - 1e-3)
        net.combine.bias.fill_(float(torch.logit(mean)))
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    history: dict[str, list[float]] = {"train_mse": [], "val_mse": []}
    best = (float("inf"), None)
    for epoch in range(epochs):
        net.train()
        total = 0.0
        for idx in torch.randperm(len(maps), generator=generator).split(batch_size):
            idx = idx.to(maps.device)
            loss = F.mse_loss(net(maps[idx]), targets[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        history["train_mse"].append(total / len(maps))
        if val is not None:
            val_mse = float(F.mse_loss(apply_net(net, val[0]), val[1]))
            history["val_mse"].append(val_mse)
            if val_mse < best[0]:
                best = (val_mse, {k: v.clone() for k, v in net.state_dict().items()})
        if log is not None:
            val_text = f", val MSE {history['val_mse'][-1]:.5f}" if val is not None else ""
            log(f"epoch {epoch + 1}/{epochs}: train MSE {history['train_mse'][-1]:.5f}{val_text}")
    if best[1] is not None:
        net.load_state_dict(best[1])
    return net.eval(), history


def _train_command(args: argparse.Namespace) -> None:
    from .. import datasets, models

    if args.threads:
        torch.set_num_threads(args.threads)
    model, preprocess, _ = models.load(args.model)
    start = time.perf_counter()
    data = {}
    for split, n, seed in (("train", args.n_train, args.seed), ("val", args.n_val, args.seed + 1)):
        ds = datasets.shapes(n=n, size=args.size, seed=seed)
        images = torch.as_tensor(ds.image.values)
        data[split] = fem_dataset(model, images, ds.gfdm.values, preprocess, K=args.K)
        print(f"{split}: {n} images (seed {seed}), FEM stacks {tuple(data[split][0].shape)}")
    layers = data["train"][2]
    net, history = fit(data["train"][0], data["train"][1], val=data["val"][:2],
                       epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       seed=args.seed, log=print)
    maps, targets, _ = data["val"]
    scores = {"net": float(np.mean(metrics.pcc(apply_net(net, maps).numpy(), targets.numpy())))}
    for operator in ("max", "add", "top", "fem"):
        fused = fuse_maps(maps, operator).numpy()
        scores[operator] = float(np.mean(metrics.pcc(fused, targets.numpy())))
    print("validation PCC to the GFDM: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    save_net(net, args.out, model=args.model, model_fingerprint=model_fingerprint(model),
             model_numel=model_numel(model), model_class=type(model).__name__,
             layers=list(layers), K=args.K, size=args.size,
             n_train=args.n_train, n_val=args.n_val, seed=args.seed, epochs=args.epochs,
             lr=args.lr, val_mse=min(history["val_mse"]), val_pcc=scores["net"],
             train_seconds=round(time.perf_counter() - start, 1))
    print(f"saved {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m xaiwidgets.models.train_net train --model shapes-resnet ...``."""
    parser = argparse.ArgumentParser(prog="python -m xaiwidgets.models.train_net",
                                     description="Train MLFEM's NET fusion operator.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a NET on shapes images for a package model")
    train.add_argument("--model", default="shapes-resnet", help="xw.models.load name")
    train.add_argument("--n-train", type=int, default=800)
    train.add_argument("--n-val", type=int, default=200)
    train.add_argument("--size", type=int, default=128, help="image side (px)")
    train.add_argument("--K", type=float, default=1.0, help="FEM threshold")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seed", type=int, default=10, help="train data and init (val: +1)")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    train.add_argument("--out", default=str(WEIGHTS_DIR / "net-shapes-resnet.pt"))
    args = parser.parse_args(argv)
    if args.command == "train":
        _train_command(args)


if __name__ == "__main__":
    main()
