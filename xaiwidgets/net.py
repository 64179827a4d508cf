"""NET: MLFEM's learned fusion operator, a light CNN over the FEM stack.

Input: the L per-layer FEM maps as channels (N, L, H, W). Three stages conv 3×3
+ ReLU + max-pool (pools 2, 2, 1: spatial /4) take the depth L → 2L → 4L → 8L; a
1×1 convolution makes the learned weighted sum; the result is upsampled
(bilinear) to (H, W) and squashed by a sigmoid. Trained per model with MSE
against the gaze density maps (GFDM, min-max scaled to [0, 1]).

This module is the runtime: the architecture, loading and applying shipped or
user-trained weights. Training lives in :mod:`xaiwidgets.models.train_net`.
A trained instance ships for the ``shapes-resnet`` model; ``operator="net"`` uses
it by default on that model.

>>> net = FusionNet(n_layers=3)
>>> apply_net(net, torch.rand(1, 3, 16, 16)).shape
torch.Size([1, 16, 16])
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core.scoped import model_guard

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
            "(a FusionNet trained with `python -m xaiwidgets.models.train_net train` or "
            "xaiwidgets.models.train_net.fit). A trained NET ships only for: "
            f"{', '.join(sorted(SHIPPED))}"
        )
    shipped = shipped_net(model, str(torch.device(device)))
    trained_on = shipped.meta.get("layers")
    if layers is not None and trained_on is not None and list(layers) != list(trained_on):
        raise ValueError(
            f"the shipped NET of {model!r} fuses the layers {trained_on}; got {list(layers)}. "
            "Use the default layers or pass net=... trained on yours."
        )
    return shipped
