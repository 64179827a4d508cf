"""NET: MLFEM's learned fusion operator, a light CNN over the FEM stack.

Input: the L per-layer FEM maps as channels (N, L, H, W). Three stages conv 3×3
+ ReLU + max-pool (pools 2, 2, 1: spatial /4) take the depth L → 2L → 4L → 8L; a
1×1 convolution makes the learned weighted sum; the result is upsampled
(bilinear) to (H, W) and squashed by a sigmoid. Trained per model with MSE
against the gaze density maps (GFDM, min-max scaled to [0, 1]).

A trained instance ships for the ``shapes-resnet`` model; ``operator="net"`` uses
it by default on that model. Train one for another model::

    python -m xaiwidgets.net_operator train --model shapes-resnet --epochs 20 \\
        --out xaiwidgets/models/weights/net-shapes-resnet.pt

or in Python: ``maps, targets, layers = fem_dataset(...)``, ``net, _ = fit(maps, targets)``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .explainer import minmax
from .hooks import model_guard

WEIGHTS_DIR = Path(__file__).parent / "models" / "weights"
#: model name (as tagged by ``xw.models.load``) -> shipped NET weights
SHIPPED = {"shapes-resnet": "net-shapes-resnet.pt"}


class FusionNet(nn.Module):
    """The NET fusion operator for stacks of ``n_layers`` maps: (N, L, H, W) → (N, H, W).

    >>> net = FusionNet(4)
    >>> net(torch.rand(2, 4, 32, 32)).shape
    torch.Size([2, 32, 32])
    """

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = int(n_layers)
        depth = [n_layers * 2**i for i in range(4)]  # L, 2L, 4L, 8L
        stages: list[nn.Module] = []
        for i, pool in enumerate((2, 2, 1)):
            stages += [nn.Conv2d(depth[i], depth[i + 1], 3, padding=1), nn.ReLU()]
            if pool > 1:
                stages.append(nn.MaxPool2d(pool))
        self.features = nn.Sequential(*stages)
        self.combine = nn.Conv2d(depth[3], 1, 1)
        #: training record (layers, K, data, scores) kept with saved weights
        self.meta: dict[str, Any] = {}

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.ndim != 4 or maps.shape[1] != self.n_layers:
            raise ValueError(
                f"this NET fuses {self.n_layers} maps: it needs input (N, {self.n_layers}, H, W), "
                f"got {tuple(maps.shape)}"
            )
        out = self.combine(self.features(maps))
        out = F.interpolate(out, size=maps.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(out[:, 0])


def apply_net(net: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """Run ``net`` on (N, L, H, W) maps without autograd, in eval mode (restored after),
    on the net's device; the result comes back on the maps' device."""
    param = next(net.parameters(), None)
    x = maps if param is None else maps.to(param.device, param.dtype)
    with model_guard(net), torch.no_grad():
        out = net(x)
    return out.to(maps.device)


def save_net(net: FusionNet, path: str | Path, **meta: Any) -> None:
    """Save weights, the number of layers and ``meta`` (str/number/list values)."""
    net.meta = {**net.meta, **meta}
    torch.save({"n_layers": net.n_layers, "state_dict": net.state_dict(), "meta": net.meta},
               path)


def load_net(path: str | Path, device: str | torch.device = "cpu") -> FusionNet:
    """Load a :class:`FusionNet` saved by :func:`save_net` (weights only, no pickled code)."""
    saved = torch.load(path, map_location=device, weights_only=True)
    net = FusionNet(saved["n_layers"]).to(device)
    net.load_state_dict(saved["state_dict"])
    net.meta = dict(saved.get("meta", {}))
    return net.eval()


@functools.lru_cache(maxsize=8)
def shipped_net(model: str, device: str = "cpu") -> FusionNet:
    """The NET shipped for the package model ``model`` (cached per device)."""
    if model not in SHIPPED:
        raise ValueError(f"no NET ships for model {model!r}; shipped: {sorted(SHIPPED)}")
    return load_net(WEIGHTS_DIR / SHIPPED[model], device)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of a model's state (names, shapes and float32 values of every tensor)."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_numel(model: nn.Module) -> int:
    """Number of parameter and buffer elements (a cheap first test of identity)."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def identify_model(model: nn.Module) -> str:
    """The package name of a model a NET ships for, else ``""``.

    A ``xaiwidgets_name`` attribute wins; otherwise the weights are compared with
    the model each shipped NET was trained on (class and size first: other models
    cost nothing).
    """
    tagged = getattr(model, "xaiwidgets_name", None)
    if tagged:
        return str(tagged)
    for name in SHIPPED:
        if not (WEIGHTS_DIR / SHIPPED[name]).exists():
            continue
        meta = shipped_net(name).meta
        if (meta.get("model_class") == type(model).__name__
                and meta.get("model_numel") == model_numel(model)
                and meta.get("model_fingerprint") == model_fingerprint(model)):
            return name
    return ""


def resolve_net(net: nn.Module | None, model: str, layers: Sequence[str] | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """The fusion net for ``operator="net"``: ``net`` if given, else the shipped one for
    ``model`` (checked against the stack's ``layers``), else a clear error."""
    if net is not None:
        expected = getattr(net, "n_layers", None)
        if layers is not None and expected is not None and expected != len(layers):
            raise ValueError(f"net fuses {expected} maps but the stack has {len(layers)} layers")
        return net
    if model not in SHIPPED:
        raise ValueError(
            "operator='net' needs a fusion network trained for this model: pass net=... "
            "(a FusionNet trained with `python -m xaiwidgets.net_operator train` or "
            f"net_operator.fit). A trained NET ships only for: {', '.join(sorted(SHIPPED))}"
        )
    shipped = shipped_net(model, str(torch.device(device)))
    trained_on = shipped.meta.get("layers")
    if layers is not None and trained_on is not None and list(layers) != list(trained_on):
        raise ValueError(
            f"the shipped NET of {model!r} fuses the layers {trained_on}; got {list(layers)}. "
            "Use the default layers or pass net=... trained on yours."
        )
    return shipped


# ----------------------------------------------------------------------------- training
def fem_dataset(model: nn.Module, images: torch.Tensor, gfdm: torch.Tensor,
                preprocess: Callable | None = None, layers: Sequence[str] | None = None,
                K: float = 1.0, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor,
                                                              list[str]]:
    """FEM stacks (N, L, H, W) of ``images`` and GFDM targets min-max scaled to [0, 1].

    Returns ``(maps, targets, layer_names)``; images are explained in chunks.
    """
    from .explainer import Explainer
    from .families.fem import fem_maps, resolve_layers

    chunks = []
    for start in range(0, len(images), batch_size):
        ex = Explainer(model, images[start:start + batch_size], preprocess=preprocess,
                       progress=False)
        names = resolve_layers(ex, layers)
        chunks.append(fem_maps(ex, names, K).float().cpu())
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
    from . import datasets, metrics, models
    from .fusion import fuse_maps

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
    """Command line: ``python -m xaiwidgets.net_operator train --model shapes-resnet ...``."""
    parser = argparse.ArgumentParser(prog="python -m xaiwidgets.net_operator",
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
