"""A seeded, learnable stand-in for image data, so tests and demos need no files."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from blockscale.data._base import SPLITS, VisionDataset, check_split


class SyntheticDataset(VisionDataset):
    """Noisy copies of one smooth random pattern per class; the label is recoverable from the image.

    Each class owns a low-frequency pattern drawn from ``seed``; an item is its class pattern
    scaled by a random contrast in [0.7, 1.3] plus Gaussian noise of std ``noise``. The patterns
    depend only on ``seed``, the items also on ``split``, so train and test share classes but no
    items. Values are already about zero-mean, so no normalisation is applied.
    """

    def __init__(
        self,
        n: int = 1024,
        num_classes: int = 10,
        in_channels: int = 3,
        size: int = 32,
        *,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.5,
        augment: bool = False,
    ) -> None:
        check_split("synthetic", split)
        if n < 0 or num_classes < 1 or in_channels < 1 or size < 4 or noise < 0:
            raise ValueError(
                "need n >= 0, num_classes >= 1, in_channels >= 1, size >= 4 and noise >= 0; got "
                f"n={n}, num_classes={num_classes}, in_channels={in_channels}, size={size}, "
                f"noise={noise}"
            )
        coarse = torch.from_numpy(
            np.random.default_rng([seed, 0]).standard_normal((num_classes, in_channels, 4, 4))
        ).float()
        patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
        patterns = patterns / patterns.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
        rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32)
        noise_field = rng.standard_normal((n, in_channels, size, size), dtype=np.float32)
        self.patterns = patterns
        self._images = patterns[labels] * torch.from_numpy(contrast) + noise * torch.from_numpy(
            noise_field
        )
        super().__init__(
            name="synthetic",
            split=split,
            classes=tuple(f"class_{i}" for i in range(num_classes)),
            in_channels=in_channels,
            input_size=(size, size),
            targets=labels,
            normalization=None,
            augment=augment,
            crop_padding=max(1, size // 8),
        )

    def _image(self, index: int) -> torch.Tensor:
        return self._images[index]
