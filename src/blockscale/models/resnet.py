"""CIFAR-style ResNets (He et al. 2016): residual teachers whose BasicBlocks are the natural blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockscale.models._registry import init_weights, register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet18", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers plus shortcut with the final ReLU inside: one single-entry, single-exit block."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Compute relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, stages `layer1..layerK` of BasicBlocks."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if min(widths) < 1:
            raise ValueError(f"stage widths must be at least 1, got {list(widths)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        names = []
        for i, (n, planes) in enumerate(zip(blocks_per_stage, widths, strict=True), start=1):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            names.append(f"layer{i}")
            in_planes = planes
        self.stage_names: tuple[str, ...] = tuple(names)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            out = getattr(self, name)(out)
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model
def resnet20(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-20 for CIFAR: 3 stages of 3 BasicBlocks, widths width/2*width/4*width."""
    return CifarResNet(
        (3, 3, 3), (width, 2 * width, 4 * width), in_channels=in_channels, num_classes=num_classes
    )


@register_model
def resnet56(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-56 for CIFAR: 3 stages of 9 BasicBlocks, widths width/2*width/4*width."""
    return CifarResNet(
        (9, 9, 9), (width, 2 * width, 4 * width), in_channels=in_channels, num_classes=num_classes
    )


@register_model
def resnet18(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet-18, CIFAR variant: 4 stages of 2 BasicBlocks, widths width..8*width."""
    return CifarResNet(
        (2, 2, 2, 2),
        (width, 2 * width, 4 * width, 8 * width),
        in_channels=in_channels,
        num_classes=num_classes,
    )
