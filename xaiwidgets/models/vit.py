"""A small Vision Transformer for the synthetic shapes, in the layout of timm's ViT.

:class:`ShapesViT` is the standard ViT (Dosovitskiy et al. 2021) at toy size: a
convolutional patch embedding (``patch_embed.proj``, 16 × 16 patches, so 128 px images
give an 8 × 8 token grid), a class token and learned position embeddings, pre-norm
blocks (``blocks[i]``: ``norm1`` → ``attn`` → residual, ``norm2`` → ``mlp`` → residual),
a final ``norm`` and a linear ``head`` on the class token. Module and parameter names
are timm's, so its state_dict loads into ``timm.models.vision_transformer.VisionTransformer``
(tested) and tools written for timm ViTs find what they look for: ``attn.qkv``,
``attn.num_heads``, ``attn.scale``. Attention is computed explicitly (no fused kernel).

>>> import torch
>>> model = ShapesViT()
>>> model(torch.rand(2, 3, 128, 128)).shape, model.grid_size((128, 128))
(torch.Size([2, 4]), (8, 8))
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: a ``patch × patch`` convolution with stride
    ``patch`` (``proj``), flattened to (N, h·w, dim) in row-major order."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_multiple(x, self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)


class HybridEmbed(nn.Module):
    """A CNN's feature map → tokens (timm's ``HybridEmbed``, the ViT paper's hybrids):
    ``backbone`` (total stride ``patch_size``), a 1 × 1 convolution ``proj`` to the
    embedding dimension, flattened to (N, h·w, dim) in row-major order."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embed_dim: int = 96,
                 patch_size: int = 16) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.backbone = backbone
        self.proj = nn.Conv2d(feature_dim, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_multiple(x, self.patch_size)
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)


def _check_multiple(x: torch.Tensor, patch_size: tuple[int, int]) -> None:
    height, width = x.shape[-2:]
    if height % patch_size[0] or width % patch_size[1]:
        raise ValueError(
            f"input size {height}×{width} is not a multiple of the patch size "
            f"{patch_size[0]}: resize or crop the images to a multiple of it")


class Attention(nn.Module):
    """Multi-head self-attention as in timm: one ``qkv`` Linear, softmax(q kᵀ · scale) v
    per head, an output ``proj``. ``q_norm``/``k_norm`` are identities, as in timm's
    default ViTs: hooks on them see each block's queries and keys (attention rollout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class Mlp(nn.Module):
    """``fc1`` → GELU (``act``) → ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ShapesViT(nn.Module):
    """ViT classifier: patch embedding, class token + position embedding, ``depth``
    pre-norm blocks, final ``norm``, ``head`` on the class token.

    The defaults (128 px, patch 16, dim 96, 4 blocks, 3 heads) are timm's
    ``VisionTransformer(img_size=128, patch_size=16, embed_dim=96, depth=4, num_heads=3,
    num_classes=4)``; the input size is fixed by the position embedding. ``patch_embed``:
    another embedding with the same ``patch_size`` and ``embed_dim`` (a
    :class:`HybridEmbed`), default a :class:`PatchEmbed`.
    """

    def __init__(self, num_classes: int = 4, img_size: int = 128, patch_size: int = 16,
                 embed_dim: int = 96, depth: int = 4, num_heads: int = 3,
                 mlp_ratio: float = 4.0, patch_embed: nn.Module | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.num_prefix_tokens = 1
        self.patch_embed = (patch_embed if patch_embed is not None
                            else PatchEmbed(patch_size, 3, embed_dim))
        tokens = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + tokens, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        # timm's initialisation: truncated normal (std 0.02) for tokens and Linear weights
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (h, w) for images of ``image_size`` (H, W)."""
        patch = self.patch_embed.patch_size
        return image_size[0] // patch[0], image_size[1] // patch[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        if tokens.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} gives {tokens.shape[1]} patches; this "
                f"model's position embedding is for {self.img_size} images "
                f"({self.pos_embed.shape[1] - 1} patches): resize the images to {self.img_size}"
            )
        cls = self.cls_token.expand(len(x), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])
