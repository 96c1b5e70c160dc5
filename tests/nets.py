"""Small hand-written models with the structures block extraction must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class InceptionBlock(nn.Module):
    """Two branches concatenated, then fused: channel concatenation inside a block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, 6)
        self.b = nn.Sequential(conv_bn(c, 4, k=1), conv_bn(4, 6))
        self.fuse = nn.Conv2d(12, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fuse(torch.cat([self.a(x), self.b(x)], dim=1)))


class ConcatNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8)
        self.inc1 = InceptionBlock(8)
        self.inc2 = InceptionBlock(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc2(self.inc1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SEBlock(nn.Module):
    """Depthwise-separable residual block with squeeze-and-excitation and a grouped conv."""

    def __init__(self, c: int, hidden: int = 16) -> None:
        super().__init__()
        self.expand = conv_bn(c, hidden, k=1)
        self.dw = conv_bn(hidden, hidden, groups=hidden)
        self.grouped = conv_bn(hidden, hidden, k=1, groups=2)
        self.squeeze = nn.Conv2d(hidden, 4, 1)
        self.excite = nn.Conv2d(4, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.grouped(self.dw(self.expand(x)))
        w = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * w)


class DepthwiseSENet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8, stride=2)
        self.blocks = nn.Sequential(SEBlock(8), SEBlock(8))
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))


class FunctionalNet(nn.Module):
    """Residual adds written at the top level, functional calls and a reshape in forward."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 16, 1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.c2(F.relu(self.c1(x)))
        x = F.relu(self.c4(F.relu(self.c3(x)))) * self.scale
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.shape[0], -1))


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace this."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class UntraceableNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8)
        self.body = nn.Sequential(conv_bn(8, 12), conv_bn(12, 8))
        self.gate = Gate()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.body(self.stem(x)))
        return self.head(x.mean((2, 3)))


class FlatVGG(nn.Module):
    """A flat Sequential of conv layers with pooling, as in torchvision's VGG."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width, convs in ((8, 2), (12, 2), (16, 3)):
            for _ in range(convs):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
                c = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


HAND_WRITTEN = {
    "concat": ConcatNet,
    "depthwise-se": DepthwiseSENet,
    "functional": FunctionalNet,
    "flat-vgg": FlatVGG,
}


def thin_zoo_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """A zoo model at a width small enough for fast tests, with randomised batch-norm statistics."""
    from blockscale.models import create_model

    width = {"resnet18": {"width": 8}, "resnet20": {"width": 4}, "resnet56": {"width": 4}}
    kwargs = width.get(name, {"width_mult": 0.25})
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    return randomise_bn(model)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial statistics so pruning and composition errors show up."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class TinyResBlock(nn.Module):
    """conv-bn-relu-conv-bn plus identity, then relu: one block with internal channels to prune."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(c, hidden),
            nn.Conv2d(hidden, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class TinyResNet(nn.Module):
    """Stem, two residual blocks and a linear head: the smallest teacher with two blocks."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 4, width: int = 4, hidden: int = 8
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.res1 = TinyResBlock(width, hidden)
        self.res2 = TinyResBlock(width, hidden)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res2(self.res1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def tiny_resnet(seed: int = 0, **kwargs: int) -> TinyResNet:
    """A seeded :class:`TinyResNet` with randomised batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomise_bn(TinyResNet(**kwargs), seed=seed)


def calibrate_bn(model: nn.Module, dataset) -> nn.Module:
    """Set every batch norm's running statistics to those of ``dataset`` (as a trained net has).

    With statistics that match the data, a block's train-mode and eval-mode outputs agree, so
    retraining a pruned copy of it can lower its validation error.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()
