"""Small CNNs for the synthetic shapes data, shaped like the big torchvision families.

* :class:`ShapesVGG` – a plain conv stack as in torchvision's ``vgg11_bn``
  (``features`` of Conv-BatchNorm-ReLU(inplace) blocks and max-pools, ``avgpool``,
  ``classifier``), 8 convs in 5 stages, widths 16-16-32-64-64 (VGG11's layout at
  1/8 of its width or less), global average pooling.
* :class:`ShapesResNet` – a narrow ResNet-18: stem, 4 stages x 2 torchvision
  ``BasicBlock`` (8 residual blocks, with BatchNorm), widths 16-32-64-128.

>>> import torch
>>> ShapesResNet()(torch.rand(2, 3, 128, 128)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .video_architectures import ShapesVideo3D
from .vit import HybridEmbed, ShapesViT

#: VGG-style configuration: conv widths, "M" for a 2x2 max-pool (VGG11's pattern)
VGG_CONFIG = (16, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M")


class ShapesVGG(nn.Module):
    """VGG-style classifier: ``features`` -> ``avgpool`` (global) -> ``classifier``.

    BatchNorm and global pooling because, on CPU budgets, the plain variant
    (no BatchNorm, 4x4 pooling) stayed at chance level for hundreds of steps.
    """

    def __init__(self, num_classes: int = 4, config: tuple = VGG_CONFIG, hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(channels, item, 3, padding=1),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )
        # torchvision's VGG initialisation
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class ShapesResNet(nn.Module):
    """ResNet-18 layout at 1/4 width: conv stem (stride 2) + max-pool, four stages of
    two ``BasicBlock``, global average pool, ``fc`` (torchvision's attribute names)."""

    def __init__(self, num_classes: int = 4, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(width),
                )
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, width, stride, downsample), BasicBlock(width, width)
                )
            )
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


#: the layers of :class:`ShapesResNet` that ``shapes-vit`` uses as its patch embedding
HYBRID_STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def shapes_vit(num_classes: int = 4) -> ShapesViT:
    """The hybrid ViT of ``shapes-vit`` (the ViT paper's "R+ViT" form, timm's
    ``HybridEmbed``): :class:`ShapesResNet`'s stem and first three stages (total stride
    16, 64 channels: an 8 × 8 token grid at 128 px) embed the patches, then a
    :class:`~xaiwidgets.models.vit.ShapesViT` with 4 blocks, 3 heads, dimension 96.

    >>> shapes_vit()(torch.rand(1, 3, 128, 128)).shape
    torch.Size([1, 4])
    """
    resnet = ShapesResNet(num_classes)
    backbone = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in HYBRID_STEM))
    features = resnet.layer3[-1].bn2.num_features
    return ShapesViT(num_classes, patch_embed=HybridEmbed(backbone, features))


ARCHITECTURES = {
    "shapes-vgg": ShapesVGG,
    "shapes-resnet": ShapesResNet,
    "shapes-video": ShapesVideo3D,
    "shapes-vit": shapes_vit,
}


def build(name: str, num_classes: int = 4) -> nn.Module:
    """A freshly initialised shapes architecture by name (a ``-shuffled`` suffix is
    the same architecture)."""
    return ARCHITECTURES[name.removesuffix("-shuffled")](num_classes=num_classes)
