"""CIFAR-10 and CIFAR-100 from the official python batches, read without running pickled code.

The batches are pickles, and a pickle can name any callable. ``load_cifar_batch`` therefore uses
an unpickler that resolves only the numpy constructors an array needs and refuses every other
global, so a tampered batch raises ``DatasetFormatError`` instead of executing anything.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockscale.data._base import VisionDataset, cache_dir, check_split
from blockscale.data.transforms import STATS
from blockscale.errors import DatasetFormatError, DatasetNotFoundError

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

CROP_PADDING = 4
IMAGE_SHAPE = (3, 32, 32)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
}


class _ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle that names a global outside the allow-list."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds plain containers and numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy constructor, refusing every other global."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobalError(f"{module}.{name}") from None


def load_cifar_batch(path: str | Path) -> dict[str, Any]:
    """Read one CIFAR python batch or meta file into a dict with ``str`` keys.

    Raises ``DatasetFormatError`` naming the file when it is not a pickled dict or names any
    global other than numpy's array constructors.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            content = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except _ForbiddenGlobalError as error:
        raise DatasetFormatError(
            f"{path}: refused to load {error}; CIFAR batches hold only numpy arrays and lists",
            hint="this file is not an official CIFAR batch; fetch a fresh copy from " + CIFAR_URL,
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFormatError(f"{path}: not a readable CIFAR batch ({error})") from error
    if not isinstance(content, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in content.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    """Return ``batch[key]`` or raise ``DatasetFormatError`` naming the file and the key."""
    if key not in batch:
        raise DatasetFormatError(f"{path}: no {key!r} entry (has {sorted(batch)})")
    return batch[key]


def _names(values: list[Any]) -> tuple[str, ...]:
    """Decode class names stored as bytes or str."""
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values)


class _CIFAR(VisionDataset):
    """Shared reader of the CIFAR python layout; subclasses name the files and fields."""

    dataset_name: str
    folder_name: str
    env_var: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_labels: int

    def __init__(
        self,
        split: str = "train",
        root: str | Path | None = None,
        *,
        augment: bool = False,
        download: bool = True,
    ) -> None:
        check_split(self.dataset_name, split)
        folder = self._find(split, root, download)
        names = self.train_files if split == "train" else self.test_files
        images, labels = [], []
        for name in names:
            path = folder / name
            batch = load_cifar_batch(path)
            data = np.asarray(_field(batch, "data", path))
            batch_labels = np.asarray(_field(batch, self.label_key, path), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE):
                raise DatasetFormatError(
                    f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}"
                )
            if batch_labels.shape != (len(data),):
                raise DatasetFormatError(
                    f"{path}: {len(data)} images but {batch_labels.size} labels"
                )
            if (
                batch_labels.size
                and not 0 <= batch_labels.min() <= batch_labels.max() < self.num_labels
            ):
                raise DatasetFormatError(f"{path}: labels outside 0..{self.num_labels - 1}")
            images.append(data.reshape(-1, *IMAGE_SHAPE))
            labels.append(batch_labels)
        self.folder = folder
        self._images = np.concatenate(images)
        super().__init__(
            name=self.dataset_name,
            split=split,
            classes=self._classes(folder),
            in_channels=IMAGE_SHAPE[0],
            input_size=IMAGE_SHAPE[1:],
            targets=np.concatenate(labels),
            normalization=STATS[self.dataset_name],
            augment=augment,
            crop_padding=CROP_PADDING,
        )

    def _classes(self, folder: Path) -> tuple[str, ...]:
        """Return class names from the meta file, or the label numbers when it is absent."""
        path = folder / self.meta_file
        if not path.is_file():
            return tuple(str(i) for i in range(self.num_labels))
        names = _names(_field(load_cifar_batch(path), self.names_key, path))
        if len(names) != self.num_labels:
            raise DatasetFormatError(
                f"{path}: {len(names)} class names, expected {self.num_labels}"
            )
        return names

    def _find(self, split: str, root: str | Path | None, download: bool) -> Path:
        """Return the folder holding ``split``'s batches: under root, the env var, or the cache."""
        bases = [] if root is None else [Path(root).expanduser()]
        if os.environ.get(self.env_var):
            bases.append(Path(os.environ[self.env_var]).expanduser())
        bases.append(cache_dir(self.dataset_name))
        searched = [folder for base in bases for folder in (base / self.folder_name, base)]
        needed = self.train_files if split == "train" else self.test_files
        for folder in searched:
            if all((folder / name).is_file() for name in needed):
                return folder
        looked = "\n    ".join(str(folder) for folder in searched)
        fetch = "automatic download is not supported; " if download else ""
        raise DatasetNotFoundError(
            f"{self.dataset_name} {split} batches ({', '.join(needed)}) not found; looked in:\n"
            f"    {looked}",
            hint=f"{fetch}download the python version from {CIFAR_URL} and extract it so that "
            f"ROOT/{self.folder_name}/ holds the batches, then pass root=ROOT or set {self.env_var}",
        )

    def _image(self, index: int) -> torch.Tensor:
        return torch.tensor(self._images[index], dtype=torch.float32).div_(255.0)


class CIFAR10(_CIFAR):
    """CIFAR-10: 32x32 colour images in 10 classes (50000 train, 10000 test)."""

    dataset_name = "cifar10"
    folder_name = "cifar-10-batches-py"
    env_var = "BLOCKSCALE_CIFAR10"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    num_labels = 10


class CIFAR100(_CIFAR):
    """CIFAR-100: 32x32 colour images in 100 fine classes (50000 train, 10000 test)."""

    dataset_name = "cifar100"
    folder_name = "cifar-100-python"
    env_var = "BLOCKSCALE_CIFAR100"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    num_labels = 100
