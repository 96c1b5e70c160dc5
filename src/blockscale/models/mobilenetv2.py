"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and one fewer downsampling stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockscale.models._registry import init_weights, register_model

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]

# (expand ratio t, output channels c, repeats n, first stride s); the second stage's stride is 1
# instead of 2, as in the common CIFAR port, so 32x32 inputs end at 4x4.
_CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never below it or 10% under `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1, with the residual add inside when shapes allow."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_planes * expand_ratio)
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_planes, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block, adding the input back when stride is 1 and channels match."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: stem `conv1`/`bn1`, 17 blocks in `layers`, `conv2`/`bn2`, `linear`."""

    def __init__(
        self, *, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        c_in = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.conv1 = nn.Conv2d(in_channels, c_in, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        blocks = []
        for t, c, n, s in _CIFAR_SETTINGS:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(c_in, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        out = F.relu6(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu6(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model
def mobilenetv2(
    *, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0
) -> MobileNetV2:
    """MobileNetV2, CIFAR variant."""
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes, width_mult=width_mult)
