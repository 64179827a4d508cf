"""A small 3D CNN for the moving-shapes clips, shaped like torchvision's ``r3d_18``.

:class:`ShapesVideo3D` takes clips ``(N, 3, T, H, W)``: a Conv3d-BatchNorm-ReLU stem
(spatial stride 2), three stages of one torchvision video ``BasicBlock`` each (two
3x3x3 Conv3d with BatchNorm and a residual connection; the attribute names of
``r3d_18``: ``stem``, ``layer1``..``layer3``, ``fc``), widths 12-24-48, global **max**
pooling over (t, y, x) (``pool``) and a linear classifier. The first stage keeps the
full frame rate so that the small per-frame motions stay visible; the last one halves
time and space. Max rather than average pooling: the motion that sets the class
covers a few percent of the volume, and with average pooling the same network stayed
at chance level for hundreds of steps (static texture dominated the pooled features),
while with max pooling it learned within a hundred.

>>> import torch
>>> ShapesVideo3D()(torch.rand(2, 3, 8, 64, 64)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv3DSimple


def _stage(channels: int, width: int, stride: tuple[int, int, int]) -> nn.Sequential:
    """One residual ``BasicBlock`` (with a 1x1x1 projection when the shape changes)."""
    downsample = None
    if stride != (1, 1, 1) or channels != width:
        downsample = nn.Sequential(
            nn.Conv3d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm3d(width)
        )
    return nn.Sequential(BasicBlock(channels, width, Conv3DSimple, stride, downsample))


class ShapesVideo3D(nn.Module):
    """A narrow 3-stage ``r3d``: stem, ``layer1``-``layer3`` (one ``BasicBlock`` each),
    global max pool, ``fc``; about 0.13 M parameters."""

    def __init__(
        self,
        num_classes: int = 4,
        widths: tuple[int, int, int] = (12, 24, 48),
        strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2)),
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, widths[0], (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
        )
        channels = widths[0]
        stages = []
        for width, stride in zip(widths, strides, strict=True):
            stages.append(_stage(channels, width, stride))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(channels, num_classes)
        # torchvision's video ResNet initialisation
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
