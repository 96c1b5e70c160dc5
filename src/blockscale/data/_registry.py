"""Built-in data sets by name: ``load_dataset("cifar10", "train")`` and ``list_datasets()``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockscale.data._base import VisionDataset
from blockscale.data.cifar import CIFAR10, CIFAR100
from blockscale.data.fashion_mnist import FashionMNIST
from blockscale.data.image_folder import ImageFolderDataset
from blockscale.data.synthetic import SyntheticDataset
from blockscale.errors import DatasetNotFoundError

Factory = Callable[..., VisionDataset]


def _image_folder(
    split: str, root: str | Path | None, augment: bool, download: bool, **kwargs: Any
) -> VisionDataset:
    """Build an image-folder data set; ``root`` is required and ``download`` does not apply."""
    if root is None:
        raise DatasetNotFoundError(
            "the image-folder data set needs a root folder",
            hint='pass root="path/to/folder" holding one subfolder of images per class',
        )
    return ImageFolderDataset(root, split, augment=augment, **kwargs)


def _synthetic(
    split: str, root: str | Path | None, augment: bool, download: bool, **kwargs: Any
) -> VisionDataset:
    """Build a synthetic data set; ``root`` and ``download`` do not apply."""
    return SyntheticDataset(split=split, augment=augment, **kwargs)


def _files(cls: type[FashionMNIST | CIFAR10 | CIFAR100]) -> Factory:
    """Adapt a file-backed data set class to the registry's call signature."""

    def build(
        split: str, root: str | Path | None, augment: bool, download: bool, **kwargs: Any
    ) -> VisionDataset:
        return cls(split, root, augment=augment, download=download, **kwargs)

    return build


_REGISTRY: dict[str, tuple[Factory, str]] = {
    "fashion-mnist": (_files(FashionMNIST), "Fashion-MNIST, 1x28x28, 10 classes (IDX files)"),
    "cifar10": (_files(CIFAR10), "CIFAR-10, 3x32x32, 10 classes (python batches)"),
    "cifar100": (_files(CIFAR100), "CIFAR-100, 3x32x32, 100 classes (python batches)"),
    "image-folder": (_image_folder, "root/<class>/*.png|jpg|jpeg|bmp, resized to size"),
    "synthetic": (_synthetic, "seeded learnable patterns for tests (no files)"),
}
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "imagefolder": "image-folder",
}


def list_datasets() -> dict[str, str]:
    """Return each built-in data set's name with a one-line description."""
    return {name: description for name, (_, description) in _REGISTRY.items()}


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | Path | None = None,
    augment: bool = False,
    download: bool = True,
    **kwargs: Any,
) -> VisionDataset:
    """Return the built-in data set ``name`` (case, ``_`` and ``-`` are forgiven) for ``split``.

    ``kwargs`` go to the data set's class: e.g. ``size`` and ``grayscale`` for ``image-folder``,
    ``n``, ``num_classes``, ``in_channels``, ``size``, ``seed`` for ``synthetic``.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise DatasetNotFoundError(
            f"unknown data set {name!r}; known: {', '.join(_REGISTRY)}",
            hint="use one of the known names, or wrap your own torch Dataset",
        )
    factory, _ = _REGISTRY[key]
    return factory(split, root, augment, download, **kwargs)
