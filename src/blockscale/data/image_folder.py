"""Images in ``root/<class name>/*.png|jpg|jpeg|bmp`` folders, decoded with Pillow on access."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from blockscale.data._base import SPLITS, VisionDataset, check_split, uint8_to_float
from blockscale.data.transforms import STATS, Normalization
from blockscale.errors import DatasetFormatError, DatasetNotFoundError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


def _is_image(path: Path) -> bool:
    """True for a visible file with an image extension."""
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subfolders(folder: Path) -> set[str]:
    """Names of the visible subfolders of ``folder``."""
    return {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")}


def _layout(root: Path, split: str) -> tuple[Path, tuple[str, ...]]:
    """Return the folder of ``split`` and the class names, shared by every split folder.

    With ``root/train`` or ``root/test`` present, classes are the union of their subfolders, so a
    class missing from one split keeps the same label in the other; otherwise ``root`` holds the
    class folders and serves only the train split.
    """
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        if root / split not in split_dirs:
            raise DatasetNotFoundError(
                f"{root} has no {split!r} folder",
                hint=f"create {root / split}/<class>/..., or use train_val_split on the train split",
            )
        return root / split, tuple(sorted(set().union(*map(_subfolders, split_dirs))))
    if split != "train":
        raise DatasetNotFoundError(
            f"{root} has class folders but no {split!r} folder",
            hint=f"move the classes to {root / 'train'}/ and add {root / split}/<class>/..., "
            "or use train_val_split on the train split",
        )
    return root, tuple(sorted(_subfolders(root)))


class ImageFolderDataset(VisionDataset):
    """Labelled images in one folder per class; classes are the sorted folder names.

    ``root/train`` and ``root/test`` are the splits when present; otherwise ``root`` itself is
    the train split. Images are converted to RGB (or L with ``grayscale``), resized to
    ``size`` with bilinear filtering and normalised with ImageNet statistics unless ``mean`` and
    ``std`` are given.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        size: int | tuple[int, int] = 32,
        grayscale: bool = False,
        augment: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        check_split("image-folder", split)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(
                f"image folder {root} does not exist",
                hint="pass root=a folder holding one subfolder of images per class",
            )
        folder, classes = _layout(root, split)
        samples = [
            (path, label)
            for label, name in enumerate(classes)
            if (folder / name).is_dir()
            for path in sorted(p for p in (folder / name).rglob("*") if _is_image(p))
        ]
        if not samples:
            raise DatasetNotFoundError(
                f"no images in class folders under {folder}",
                hint=f"put images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}/<class>/",
            )
        height, width = (size, size) if isinstance(size, int) else size
        channels = 1 if grayscale else 3
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None and std is not None:
            normalization = Normalization(tuple(mean), tuple(std))
        else:
            normalization = STATS["imagenet-gray" if grayscale else "imagenet"]
        if len(normalization.mean) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(normalization.mean)}")
        self.root = folder
        self.paths = [path for path, _ in samples]
        self.mode = "L" if grayscale else "RGB"
        super().__init__(
            name="image-folder",
            split=split,
            classes=classes,
            in_channels=channels,
            input_size=(height, width),
            targets=np.array([label for _, label in samples], dtype=np.int64),
            normalization=normalization,
            augment=augment,
            crop_padding=max(1, min(height, width) // 8),
        )

    def _image(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        height, width = self.input_size
        try:
            with Image.open(path) as image:
                pixels = image.convert(self.mode).resize((width, height), Image.Resampling.BILINEAR)
                return uint8_to_float(np.asarray(pixels))
        except (UnidentifiedImageError, OSError) as error:
            raise DatasetFormatError(f"{path}: cannot decode image ({error})") from error
