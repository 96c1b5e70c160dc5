"""Fashion-MNIST read from its IDX files, found locally or fetched once into the cache."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from blockscale.data._base import VisionDataset, cache_dir, check_split, uint8_to_float
from blockscale.data.transforms import STATS
from blockscale.errors import DatasetFormatError, DatasetNotFoundError

ENV_VAR = "BLOCKSCALE_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
TIMEOUT_S = 10.0
CROP_PADDING = 2
_INSTALL_HINT = (
    "run `apt-get install dataset-fashion-mnist`, or set "
    f"{ENV_VAR} to a folder holding the four IDX files, or pass root=that folder"
)

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a native-endian numpy array.

    Raises ``DatasetFormatError`` naming the file when the magic number, the dimensions or the
    payload size are not what the format requires.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetFormatError(f"{path}: corrupt gzip stream ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})",
            hint="re-fetch the file; IDX files start with 00 00 <type> <ndim>",
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFormatError(
            f"{path}: IDX dimensions {shape} need {expected} bytes, file has {len(raw)}",
            hint="the file is truncated or not the one its name says; re-fetch it",
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _split_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    """Return the image and label files of ``split`` in ``folder`` (``.gz`` preferred), if both exist."""
    found = []
    for stem in FILES[split]:
        candidates = [folder / f"{stem}.gz", folder / stem]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            return None
        found.append(match)
    return found[0], found[1]


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    """Return the folders searched, in order: root (and its usual subfolders), env var, system, cache."""
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs += [SYSTEM_DIR, cache_dir("fashion-mnist")]
    return dirs


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest``; the one place that touches the network."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out)


def _md5(path: Path) -> str:
    """Return the hex md5 of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_one(filename: str, folder: Path) -> list[str]:
    """Fetch one file into ``folder`` from the first mirror that serves it intact; return failures."""
    failures = []
    for mirror in MIRRORS:
        url = mirror + filename
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp, TIMEOUT_S)
            digest = _md5(tmp)
            if digest != MD5[filename]:
                failures.append(f"{url}: md5 {digest}, expected {MD5[filename]}")
                continue
            os.replace(tmp, folder / filename)
            return []
        except (OSError, http.client.HTTPException) as error:
            failures.append(f"{url}: {error}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return failures


def download_fashion_mnist(folder: Path | None = None) -> Path:
    """Fetch the four official Fashion-MNIST files into ``folder`` (default: the cache), md5-checked.

    Each file is written to a temporary name and renamed only once its md5 matches, so an
    interrupted or tampered download never leaves a file that looks complete.
    """
    folder = folder or cache_dir("fashion-mnist")
    for filename in MD5:
        if (folder / filename).is_file():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            failures = _download_one(filename, folder)
        except OSError as error:
            failures = [f"{folder}: {error}"]
        if failures:
            raise DatasetNotFoundError(
                "could not download Fashion-MNIST:\n    " + "\n    ".join(failures),
                hint=_INSTALL_HINT,
            )
    return folder


def find_fashion_mnist(
    split: str = "train", root: str | Path | None = None, *, download: bool = True
) -> tuple[Path, Path]:
    """Return the image and label files of ``split``, searching then (if allowed) downloading.

    Order: ``root`` (also ``root/fashion-mnist`` and ``root/FashionMNIST/raw``), the folder in
    ``$BLOCKSCALE_FASHION_MNIST``, ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``), then ``$XDG_CACHE_HOME/blockscale/fashion-mnist``. If none has
    the files and ``download`` is true, the official files are fetched into that cache folder.
    """
    check_split("fashion-mnist", split)
    searched = _candidate_dirs(root)
    for folder in searched:
        files = _split_files(folder, split)
        if files is not None:
            return files
    looked = "\n    ".join(str(d) for d in searched)
    message = f"Fashion-MNIST {split} files not found; looked in:\n    {looked}"
    if download:
        try:
            files = _split_files(download_fashion_mnist(), split)
        except DatasetNotFoundError as error:
            raise DatasetNotFoundError(f"{message}\n{error.message}", hint=_INSTALL_HINT) from None
        if files is not None:
            return files
    raise DatasetNotFoundError(message, hint=_INSTALL_HINT)


class FashionMNIST(VisionDataset):
    """Fashion-MNIST: 28x28 grayscale clothing images in 10 classes (60000 train, 10000 test).

    Pixels stay in memory as uint8 (47 MB for the train split) and become floats per item.
    Augmentation is a random crop with 2 pixels of padding and a horizontal flip.
    """

    def __init__(
        self,
        split: str = "train",
        root: str | Path | None = None,
        *,
        augment: bool = False,
        download: bool = True,
    ) -> None:
        image_file, label_file = find_fashion_mnist(split, root, download=download)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DatasetFormatError(
                f"{image_file}: expected uint8 images N x H x W, got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetFormatError(
                f"{label_file}: expected {len(images)} labels, got shape {labels.shape}"
            )
        if labels.size and int(labels.max()) >= len(CLASSES):
            raise DatasetFormatError(f"{label_file}: label {int(labels.max())} is not in 0..9")
        self.files = (image_file, label_file)
        self._images = images
        super().__init__(
            name="fashion-mnist",
            split=split,
            classes=CLASSES,
            in_channels=1,
            input_size=(int(images.shape[1]), int(images.shape[2])),
            targets=labels.astype(np.int64),
            normalization=STATS["fashion-mnist"],
            augment=augment,
            crop_padding=CROP_PADDING,
        )

    def _image(self, index: int) -> torch.Tensor:
        return uint8_to_float(self._images[index])
