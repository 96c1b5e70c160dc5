"""Tensor transforms without torchvision: per-data-set normalisation and training augmentation.

Every transform is a small picklable callable on a float32 ``CxHxW`` tensor, so data sets can be
used by ``DataLoader`` workers. Random transforms draw from ``generator`` when one is given and
otherwise from torch's global generator, which ``DataLoader`` seeds differently in each worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of a data set's pixels in [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


STATS: dict[str, Normalization] = {
    "fashion-mnist": Normalization((0.2860,), (0.3530,)),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet-gray": Normalization((0.449,), (0.226,)),
}


class Normalize:
    """Subtract a per-channel mean and divide by a per-channel std, so inputs are about N(0, 1)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must match; std > 0")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return the normalised image."""
        return (image - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop back to the input size at a random offset."""

    def __init__(self, padding: int, generator: torch.Generator | None = None) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return a randomly shifted copy of ``image`` with the same shape."""
        if self.padding == 0:
            return image
        height, width = image.shape[-2:]
        padded = F.pad(image, (self.padding,) * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=self.generator).tolist()
        return padded[..., top : top + height, left : left + width]

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror the image left to right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return ``image`` or its mirror image."""
        if torch.rand((), generator=self.generator).item() < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, *transforms: Transform) -> None:
        self.transforms = transforms

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return ``image`` passed through every transform."""
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


def build_transform(
    normalization: Normalization | None,
    *,
    augment: bool = False,
    padding: int = 4,
    generator: torch.Generator | None = None,
) -> Compose:
    """Return the standard pipeline: optional random crop and flip, then optional normalisation.

    Augmentation runs before normalisation so padding is black, as in the usual CIFAR recipe.
    """
    steps: list[Transform] = []
    if augment:
        steps += [RandomCrop(padding, generator), RandomHorizontalFlip(0.5, generator)]
    if normalization is not None:
        steps.append(Normalize(normalization.mean, normalization.std))
    return Compose(*steps)
