"""Token grids: which layer outputs are feature maps, and how to read them as (N, C, h, w).

Vision transformers hand their layers' outputs around in three layouts, and every
map method (Grad-CAM, FEM, MLFEM, ...) needs the third:

* tokens ``(N, L, D)`` (ViT, DeiT, DINOv2 with registers, EVA, PVT and LeViT blocks):
  the last ``h·w`` tokens are the patch grid; the leading ones (class, distillation,
  register tokens) are dropped for maps;
* channels-last ``(N, h, w, C)`` (Swin, timm stages that keep NHWC): transposed;
* channels-first ``(N, C, h, w)`` (CNNs, MaxViT and MobileViT blocks, stage outputs).

A layer's layout is read from its output shape in the construction pass (no model
call of its own), the input size and the model: the number of leading tokens is the
model's own (timm's ``num_prefix_tokens``, or its ``cls_token``/``dist_token``/
``reg_token``/torchvision's ``class_token`` parameters), and ``(h, w)`` must have the
input's aspect ratio (one cell of rounding allowed). A 4-D output is channels-last
when only ``(N, h, w, C)`` has that aspect ratio. When both readings fit (``C`` close to
``h``) the layer's modules decide (convolutions: channels-first; linear layers and
layer norms: channels-last); when nothing decides, or several token grids fit, the
layer is *ambiguous* and asking for it raises :class:`TokenGridError`, which says how
to give the grid: ``Explainer(model, images, grid=(h, w))`` (every token layer of that
grid) or ``grid={"blocks.3": (h, w)}`` per layer (``"channels_last"`` or
``"channels_first"`` for a 4-D output whose channel count equals its side).

>>> model = torch.nn.Identity()
>>> grid = layout_of(model, "blocks.0", (1, 65, 192), (32, 32), prefix=1)
>>> grid
Grid(layout='tokens', prefix=1, height=8, width=8)
>>> grid.to_map(torch.zeros(2, 65, 192)).shape
torch.Size([2, 192, 8, 8])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: a user's grid: ``(h, w)`` for every token layer it fits, or per layer name ``(h, w)`` or
#: ``"channels_last"``/``"channels_first"`` (a 4-D output whose channels equal its side)
GridOption = tuple[int, int] | Mapping[str, tuple[int, int] | str] | None

#: parameter names of leading tokens (timm, torchvision, DINOv2)
_PREFIX_PARAMETERS = ("cls_token", "dist_token", "reg_token", "register_tokens", "class_token")
_CONV_LIKE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


class TokenGridError(ValueError):
    """A layer's output could be read as a feature map in several ways (or none that
    fits the model): the message names the layer and how to pass the grid."""


@dataclass(frozen=True)
class Grid:
    """How one layer's output becomes a channels-first feature map.

    ``layout`` is ``"map"`` (already (N, C, h, w) or a clip's (N, C, t, h, w)),
    ``"tokens"`` ((N, L, D): ``prefix`` leading tokens, then ``height·width`` patches in
    row-major order) or ``"channels_last"`` ((N, h, w, C)).
    """

    layout: str
    prefix: int = 0
    height: int = 0
    width: int = 0

    def to_map(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a layer output, or the gradient there) as (N, C, h, w): a view.

        >>> Grid("channels_last").to_map(torch.zeros(1, 4, 4, 8)).shape
        torch.Size([1, 8, 4, 4])
        """
        if self.layout == "tokens":
            patches = tensor[:, self.prefix:]
            return patches.transpose(1, 2).unflatten(2, (self.height, self.width))
        if self.layout == "channels_last":
            return tensor.permute(0, 3, 1, 2)
        return tensor

    def map_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The (N, C, h, w) shape :meth:`to_map` makes of an output of ``shape``.

        >>> Grid("tokens", 1, 2, 2).map_shape((1, 5, 16))
        (1, 16, 2, 2)
        """
        if self.layout == "tokens":
            return (shape[0], shape[2], self.height, self.width)
        if self.layout == "channels_last":
            return (shape[0], shape[3], shape[1], shape[2])
        return tuple(shape)


def prefix_tokens(model: nn.Module) -> int:
    """How many leading (class, distillation, register) tokens ``model``'s token
    sequences carry: timm's ``num_prefix_tokens``, else the tokens of its
    ``cls_token``-like parameters, else 0.

    >>> prefix_tokens(nn.Linear(2, 2))
    0
    """
    declared = getattr(model, "num_prefix_tokens", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    count = 0
    for name, tensor in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _PREFIX_PARAMETERS and tensor.ndim >= 2:
            count += int(tensor.shape[-2])
    return count


def _fits(h: int, w: int, size: Sequence[int]) -> bool:
    """Whether an (h, w) grid has the input's aspect ratio (one cell of rounding)."""
    height, width = size[-2], size[-1]
    return 1 <= h <= height and 1 <= w <= width and abs(h * width - w * height) <= max(
        height, width)


def _token_grids(length: int, prefix: int, size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Every (prefix, h, w) with ``h·w = length - prefix`` that fits the input, with the
    model's prefix count, else (stages without class tokens) none."""
    for lead in dict.fromkeys((prefix, 0)):  # the model's own count first
        patches = length - lead
        divisors = [d for d in range(1, math.isqrt(max(patches, 0)) + 1) if patches % d == 0]
        sides = sorted({side for d in divisors for side in (d, patches // d)})
        found = [(lead, h, patches // h) for h in sides if _fits(h, patches // h, size)]
        if found:
            return found
    return []


def _module_kind(module: nn.Module | None) -> str | None:
    """"map" for convolution-like modules, "channels_last" for linear/layer-norm
    ones, ``None`` for mixed or unknown."""
    if module is None:
        return None
    leaves = [m for m in module.modules() if not list(m.children())]
    conv = any(isinstance(m, _CONV_LIKE) for m in leaves)
    linear = any(isinstance(m, (nn.Linear, nn.LayerNorm)) and "2d" not in type(m).__name__.lower()
                 for m in leaves)
    if conv != linear:
        return "map" if conv else "channels_last"
    return None


def _has_tokens(model: nn.Module) -> bool:
    """Whether the model has layer norms or attention (else it is a CNN)."""
    return any(isinstance(m, (nn.LayerNorm, nn.MultiheadAttention))
               or "Attention" in type(m).__name__ for m in model.modules())


def _given(grid: GridOption, name: str) -> tuple[int, int] | str | None:
    given = grid.get(name) if isinstance(grid, Mapping) else grid
    if given is None or isinstance(given, str):
        if given not in (None, "channels_last", "channels_first"):
            raise ValueError(f"grid for {name!r} is {given!r}; give (h, w), "
                             "'channels_last' or 'channels_first'")
        return given
    return tuple(int(side) for side in given)


def how_to_give(name: str, channels_last: bool = False) -> str:
    """The sentence that tells the user how to pass a layer's grid."""
    if channels_last:
        return (f"say which: xw.Explainer(model, images, grid={{{name!r}: 'channels_last'}}) "
                "or 'channels_first'")
    return (f"pass the patch grid: xw.Explainer(model, images, grid=(h, w)) or "
            f"grid={{{name!r}: (h, w)}} (h·w patch tokens after any class/register tokens)")


def layout_of(model: nn.Module, name: str, shape: Sequence[int], size: Sequence[int],
              prefix: int | None = None, grid: GridOption = None,
              batch: int | None = None) -> Grid | None:
    """How the output of layer ``name`` (``shape``, on inputs of spatial ``size``) reads
    as a feature map, or ``None`` when it is none (a vector, a sequence of another
    batch such as MobileViT's unfolded patches). Raises :class:`TokenGridError` when
    ambiguous. ``prefix``: the model's leading tokens (default :func:`prefix_tokens`);
    ``grid``: the user's grid option; ``batch``: the batch size ``shape`` came from.

    >>> layout_of(nn.Identity(), "x", (1, 4, 4, 96), (32, 32))
    Grid(layout='channels_last', prefix=0, height=4, width=4)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4) or (batch is not None and shape[0] != batch):
        return Grid("map") if len(shape) == 5 else None
    given = _given(grid, name)
    if len(shape) == 4:
        first, last = _fits(*shape[2:], size), _fits(*shape[1:3], size)
        if isinstance(given, str):
            first, last = given == "channels_first", given == "channels_last"
        elif given is not None:
            first, last = shape[2:] == given, shape[1:3] == given
        if last and not first:
            return Grid("channels_last", 0, shape[1], shape[2])
        if first and last and _has_tokens(model):
            kind = _module_kind(_find(model, name))
            if kind is None:
                raise TokenGridError(
                    f"layer {name!r} outputs shape {shape}, which reads both as (N, C, h, w) "
                    f"and as channels-last (N, h, w, C) on {tuple(size)} inputs; "
                    + how_to_give(name, channels_last=True))
            return Grid(kind, 0, *(shape[2:] if kind == "map" else shape[1:3]))
        return Grid("map")
    length = shape[1]
    if isinstance(given, tuple):
        lead = length - given[0] * given[1]
        # a grid given for every layer fits only where the leading tokens are fewer than
        # the patches (another stage of a hierarchical model is no such layer)
        if lead < 0 or (not isinstance(grid, Mapping) and lead >= given[0] * given[1]):
            return None
        return Grid("tokens", lead, *given)
    lead = prefix_tokens(model) if prefix is None else prefix
    found = _token_grids(length, lead, size)
    if len(found) == 1:
        return Grid("tokens", *found[0])
    if len(found) > 1 or (_has_tokens(model) and lead and length > lead):
        options = ", ".join(f"{h}×{w} after {p} leading tokens" for p, h, w in found[:4])
        raise TokenGridError(
            f"layer {name!r} outputs {length} tokens, and the patch grid cannot be told "
            f"from {tuple(size)} inputs ({options or 'no grid of that aspect ratio fits'}); "
            + how_to_give(name))
    return None


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def layouts(model: nn.Module, shapes: Mapping[str, Sequence[int]], size: Sequence[int],
            grid: GridOption = None) -> tuple[dict[str, Grid], dict[str, str]]:
    """The grid of every layer in ``shapes`` that is a feature map, and, for the
    ambiguous ones, the reason (shapes from the construction pass, batch 1).

    >>> grids, ambiguous = layouts(nn.Identity(), {"a": (1, 4, 8), "b": (1, 8)}, (16, 16))
    >>> grids, ambiguous
    ({'a': Grid(layout='tokens', prefix=0, height=2, width=2)}, {})
    """
    lead = prefix_tokens(model)
    grids: dict[str, Grid] = {}
    ambiguous: dict[str, str] = {}
    for name, shape in shapes.items():
        try:
            found = layout_of(model, name, shape, size, lead, grid, batch=1)
        except TokenGridError as error:
            ambiguous[name] = str(error)
            continue
        if found is not None:
            grids[name] = found
    return grids, ambiguous


def class_token_layer(model: nn.Module, block: str, grids: Mapping[str, Grid]) -> str:
    """The layer whose patch tokens a class-token head reads through the last block:
    that block's first layer norm (its attention's input), else the block itself.

    A head that reads only the class token never sees the last block's *output* patch
    tokens (their gradient is zero: Grad-CAM would be flat), but the class token is
    computed from the normalised inputs of the last block's attention.
    """
    module = _find(model, block)
    if module is None or grids.get(block, Grid("map")).prefix == 0:
        return block
    for sub, child in module.named_modules():
        name = f"{block}.{sub}"
        if sub and "norm" in type(child).__name__.lower() and name in grids:
            return name
    return block


def size_mismatch(model: nn.Module, inputs: torch.Tensor, error: Exception) -> ValueError | None:
    """A clear error for inputs whose size a transformer's patch embedding rejects (timm's
    and torchvision's ViTs assert the size they were built for), or ``None``.

    >>> size_mismatch(nn.Identity(), torch.zeros(1, 3, 8, 8), AssertionError("x")) is None
    True
    """
    embed = getattr(model, "patch_embed", None)
    expected = getattr(embed, "img_size", None) or getattr(model, "image_size", None)
    if expected is None:
        return None
    expected = tuple(expected) if isinstance(expected, (tuple, list)) else (expected, expected)
    got = tuple(int(s) for s in inputs.shape[-2:])
    if got == tuple(int(s) for s in expected):
        return None
    return ValueError(
        f"the model's patch embedding was built for {expected[0]}×{expected[1]} inputs and "
        f"rejects {got[0]}×{got[1]} ({error}); resize the images (or pass a preprocess that "
        f"does), or build the model for this size: timm.create_model(..., img_size={got}) "
        "or dynamic_img_size=True; torchvision VisionTransformer(image_size=...)")
