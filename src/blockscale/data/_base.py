"""What every built-in data set shares: metadata, the transform pipeline and split helpers."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from blockscale.data.transforms import Compose, Normalization, build_transform
from blockscale.errors import DatasetNotFoundError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data: classes, channels and input size."""

    name: str
    classes: tuple[str, ...]
    in_channels: int
    input_size: tuple[int, int]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


class VisionDataset(Dataset[tuple[torch.Tensor, int]]):
    """Labelled images served as ``(float32 CxHxW tensor, int label)``, normalised and maybe augmented.

    Subclasses set the metadata through ``__init__`` and implement ``_image`` (pixels in [0, 1]).
    ``targets`` holds every label as an int64 array, so class counts and splits need no image loads.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        classes: tuple[str, ...],
        in_channels: int,
        input_size: tuple[int, int],
        targets: np.ndarray,
        normalization: Normalization | None,
        augment: bool,
        crop_padding: int,
    ) -> None:
        self.name = name
        self.split = split
        self.classes = classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.targets = targets
        self.normalization = normalization
        self.crop_padding = crop_padding
        self.augment = augment
        self.transform: Compose = build_transform(
            normalization, augment=augment, padding=crop_padding
        )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def info(self) -> DatasetInfo:
        """This data set's metadata as a plain value."""
        return DatasetInfo(self.name, self.classes, self.in_channels, self.input_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._image(index)), int(self.targets[index])

    def _image(self, index: int) -> torch.Tensor:
        """Return image ``index`` as a float32 ``CxHxW`` tensor, before any transform."""
        raise NotImplementedError

    def augmented(self, augment: bool = True) -> Self:
        """Return a view of the same data with augmentation switched on or off (no data copied)."""
        view = copy.copy(self)
        view.augment = augment
        view.transform = build_transform(
            self.normalization, augment=augment, padding=self.crop_padding
        )
        return view

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, shape={(self.in_channels, *self.input_size)}, "
            f"augment={self.augment})"
        )


def uint8_to_float(pixels: np.ndarray) -> torch.Tensor:
    """Convert ``HxW`` or ``HxWxC`` uint8 pixels to a float32 ``CxHxW`` tensor in [0, 1]."""
    image = torch.tensor(pixels, dtype=torch.float32).div_(255.0)
    return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()


def cache_dir(name: str) -> Path:
    """Return blockscale's cache folder for data set ``name``, honouring ``XDG_CACHE_HOME``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blockscale" / name


def check_split(name: str, split: str) -> None:
    """Raise ``DatasetNotFoundError`` unless ``split`` is one of ``SPLITS``."""
    if split not in SPLITS:
        raise DatasetNotFoundError(
            f"{name} has no split {split!r}; splits: {', '.join(SPLITS)}",
            hint="for a validation set, use blockscale.data.train_val_split on the train split",
        )


def dataset_info(dataset: Dataset) -> DatasetInfo:
    """Return the metadata of a built-in data set, looking through any ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, VisionDataset):
        raise TypeError(f"{type(dataset).__name__} is not a blockscale VisionDataset")
    return dataset.info


def train_val_split(
    dataset: Dataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[Subset, Subset]:
    """Split ``dataset`` at random, reproducibly, into train and validation subsets.

    When ``dataset`` is a ``VisionDataset`` the validation subset draws from a view without
    augmentation, so validation images are never cropped or flipped.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(dataset)  # type: ignore[arg-type]
    n_val = round(n * val_fraction)
    if n_val == 0 or n_val == n:
        raise ValueError(f"val_fraction {val_fraction} of {n} items leaves one side empty")
    order = np.random.default_rng(seed).permutation(n)
    val_source = dataset.augmented(False) if isinstance(dataset, VisionDataset) else dataset
    train = Subset(dataset, np.sort(order[n_val:]).tolist())
    val = Subset(val_source, np.sort(order[:n_val]).tolist())
    return train, val


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """Return a reproducible random subset of at most ``n`` items, for quick runs."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = len(dataset)  # type: ignore[arg-type]
    chosen = np.random.default_rng(seed).permutation(total)[: min(n, total)]
    return Subset(dataset, np.sort(chosen).tolist())
