"""Fashion-MNIST: IDX parsing, folder lookup, offline download path and the real Debian files."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from blockscale.data import FashionMNIST, find_fashion_mnist, read_idx
from blockscale.data import fashion_mnist as fm
from blockscale.errors import DatasetFormatError, DatasetNotFoundError

IDX_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def encode_idx(array: np.ndarray, dtype: str) -> bytes:
    """Serialise ``array`` as an IDX payload with the given big-endian element type."""
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim])
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, dtype: str = "u1") -> Path:
    """Write ``array`` as an IDX file, gzipped when the name ends in .gz."""
    payload = encode_idx(array, dtype)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_fake_fashion(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> Path:
    """Write a tiny Fashion-MNIST with the official file names into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Isolate lookups from the host (env var, cache) and fail loudly on any network access."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def no_network(url: str, dest: Path, timeout: float) -> None:
        raise AssertionError(f"test tried to reach the network: {url}")

    monkeypatch.setattr(fm, "_fetch", no_network)


@pytest.fixture
def no_system_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Pretend the Debian package is not installed."""
    missing = tmp_path / "no-debian-package"
    monkeypatch.setattr(fm, "SYSTEM_DIR", missing)
    return missing


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(sorted(IDX_CODES)),
    shape=array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    gz=st.booleans(),
    data=st.data(),
)
def test_idx_round_trip(
    tmp_path: Path, dtype: str, shape: tuple[int, ...], gz: bool, data: st.DataObject
) -> None:
    array = data.draw(arrays(np.dtype(dtype), shape))
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array, dtype)
    loaded = read_idx(path)
    assert loaded.dtype.isnative and loaded.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x08\x03\x00\x00" + b"\x00" * 12, "not an IDX file"),
        (b"\x00\x00\x07\x01" + b"\x00" * 4, "not an IDX file"),
        (b"", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "header truncated"),
        (encode_idx(np.zeros((2, 3, 3)), "u1")[:-1], "need 34 bytes, file has 33"),
        (encode_idx(np.zeros((2, 3, 3)), "u1") + b"\x00", "need 34 bytes, file has 35"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
    ids=["bad-magic", "bad-type", "empty", "short-header", "truncated", "trailing", "bad-gzip"],
)
def test_corrupt_idx_names_the_file(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DatasetFormatError, match=re.escape(match)) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [True, False])
def test_loads_fake_files_from_root(tmp_path: Path, no_system_copy: Path, gz: bool) -> None:
    root = write_fake_fashion(tmp_path / "fm", gz=gz)
    train, test = FashionMNIST("train", root), FashionMNIST("test", root)
    assert (len(train), len(test)) == (20, 10)
    assert (train.num_classes, train.in_channels, train.input_size) == (10, 1, (28, 28))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    image, label = train[13]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 3
    raw = read_idx(root / f"train-images-idx3-ubyte{'.gz' if gz else ''}")[13]
    expected = (torch.tensor(raw, dtype=torch.float32) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(image[0], expected)


def test_augmented_items_keep_shape_and_label(tmp_path: Path, no_system_copy: Path) -> None:
    dataset = FashionMNIST("train", write_fake_fashion(tmp_path / "fm"), augment=True)
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (1, 28, 28) and label == index % 10


def test_root_subfolder_layouts(tmp_path: Path, no_system_copy: Path) -> None:
    write_fake_fashion(tmp_path / "a" / "fashion-mnist")
    write_fake_fashion(tmp_path / "b" / "FashionMNIST" / "raw")
    assert find_fashion_mnist("train", tmp_path / "a")[0].parent.name == "fashion-mnist"
    assert find_fashion_mnist("test", tmp_path / "b")[1].parent.name == "raw"


def test_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = write_fake_fashion(tmp_path / "root")
    env = write_fake_fashion(tmp_path / "env")
    system = write_fake_fashion(tmp_path / "system")
    cache = write_fake_fashion(tmp_path / "xdg-cache" / "blockscale" / "fashion-mnist")
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    monkeypatch.setenv(fm.ENV_VAR, str(env))
    assert find_fashion_mnist("train", root)[0].parent == root
    assert find_fashion_mnist("train", tmp_path / "empty")[0].parent == env
    monkeypatch.delenv(fm.ENV_VAR)
    assert find_fashion_mnist("train")[0].parent == system
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "gone")
    assert find_fashion_mnist("train")[0].parent == cache


def test_missing_without_download_lists_every_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_system_copy: Path
) -> None:
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "env-dir"))
    with pytest.raises(DatasetNotFoundError) as info:
        FashionMNIST("test", tmp_path / "given-root", download=False)
    message = str(info.value)
    for place in [
        tmp_path / "given-root",
        tmp_path / "env-dir",
        no_system_copy,
        tmp_path / "xdg-cache" / "blockscale" / "fashion-mnist",
    ]:
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert fm.ENV_VAR in message and "root=" in message


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[str]]:
    """Serve fake official files from a local folder through ``_fetch`` and record each request."""
    served = write_fake_fashion(tmp_path / "served")
    monkeypatch.setattr(
        fm, "MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    )
    requests: dict[str, list[str]] = {"urls": []}

    def fetch(url: str, dest: Path, timeout: float) -> None:
        requests["urls"].append(url)
        assert timeout <= 30 and dest.parent == fm.cache_dir("fashion-mnist")
        shutil.copyfile(served / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(fm, "_fetch", fetch)
    return requests


def test_download_into_cache(mirror: dict[str, list[str]], no_system_copy: Path) -> None:
    dataset = FashionMNIST("test")
    cache = fm.cache_dir("fashion-mnist")
    assert len(dataset) == 10 and dataset.files[0].parent == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(fm.MD5)
    assert [u.rsplit("/", 1)[1] for u in mirror["urls"]] == list(fm.MD5)
    assert all(u.startswith(fm.MIRRORS[0]) for u in mirror["urls"])
    FashionMNIST("train")
    assert len(mirror["urls"]) == 4, "a second load must be served from the cache"


def test_download_falls_back_to_next_mirror_on_bad_md5(
    monkeypatch: pytest.MonkeyPatch, mirror: dict[str, list[str]], no_system_copy: Path
) -> None:
    good_fetch = fm._fetch

    def tampering_fetch(url: str, dest: Path, timeout: float) -> None:
        good_fetch(url, dest, timeout)
        if url.startswith(fm.MIRRORS[0]):
            dest.write_bytes(b"tampered")

    monkeypatch.setattr(fm, "_fetch", tampering_fetch)
    assert len(FashionMNIST("train")) == 20
    assert len(mirror["urls"]) == 8


def test_download_failure_keeps_no_partial_file(
    monkeypatch: pytest.MonkeyPatch, no_system_copy: Path
) -> None:
    def offline_fetch(url: str, dest: Path, timeout: float) -> None:
        dest.write_bytes(b"half a file")
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fm, "_fetch", offline_fetch)
    with pytest.raises(DatasetNotFoundError) as info:
        FashionMNIST("train")
    message = str(info.value)
    assert "Name or service not known" in message and fm.MIRRORS[1] in message
    assert str(no_system_copy) in message and "apt-get install" in message
    assert list(fm.cache_dir("fashion-mnist").iterdir()) == []


def test_bad_labels_are_format_errors(tmp_path: Path, no_system_copy: Path) -> None:
    root = write_fake_fashion(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(20, 10))
    with pytest.raises(DatasetFormatError, match=r"label 10 is not in 0\.\.9"):
        FashionMNIST("train", root)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(19))
    with pytest.raises(DatasetFormatError, match="expected 20 labels"):
        FashionMNIST("train", root)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train_val_split"):
        FashionMNIST("val", tmp_path)


@pytest.mark.skipif(
    not (fm.SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist to run this test",
)
def test_real_debian_files() -> None:
    train = FashionMNIST("train", download=False)
    test = FashionMNIST("test", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.files[0].parent == fm.SYSTEM_DIR
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert set(test.targets.tolist()) == set(range(10))
    sample = torch.stack([train[i][0] for i in range(0, 60000, 20)])
    assert sample.shape == (3000, 1, 28, 28)
    assert abs(sample.mean().item()) < 0.05 and abs(sample.std().item() - 1) < 0.05
