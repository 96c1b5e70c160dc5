"""VGG with batch norm, CIFAR style: five conv stages, each ending in a ceil-mode max-pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from blockscale.models._registry import init_weights, register_model

__all__ = ["VGG", "vgg11_bn", "vgg16_bn"]

_CONFIG_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))
_CONFIG_D = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    """VGG-BN whose `features` holds one `nn.Sequential` per stage, so each stage can be a block."""

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        c_in = in_channels
        stage_modules = []
        for stage in stages:
            layers: list[nn.Module] = []
            for c in stage:
                c_out = max(1, round(c * width_mult))
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(),
                ]
                c_in = c_out
            # ceil_mode keeps odd sizes alive: 28 -> 14 -> 7 -> 4 -> 2 -> 1
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            stage_modules.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stage_modules)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def vgg11_bn(*, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """VGG-11 (config A) with batch norm."""
    return VGG(_CONFIG_A, in_channels=in_channels, num_classes=num_classes, width_mult=width_mult)


@register_model
def vgg16_bn(*, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """VGG-16 (config D) with batch norm."""
    return VGG(_CONFIG_D, in_channels=in_channels, num_classes=num_classes, width_mult=width_mult)
