"""CIFAR-10/100: reading fake python batches, and refusing pickles that would run code."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from blockscale.data import CIFAR10, CIFAR100, load_cifar_batch
from blockscale.errors import DatasetFormatError, DatasetNotFoundError

CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def dump(path: Path, content: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    """Pickle ``content`` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=protocol)
    return path


def fake_batch(n: int, first_label: int, num_labels: int, label_key: bytes) -> dict[bytes, Any]:
    """A batch like the official ones: bytes keys, uint8 N x 3072 data, a list of int labels."""
    data = np.random.default_rng(first_label).integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [(first_label + i) % num_labels for i in range(n)]
    return {b"batch_label": b"fake", label_key: labels, b"data": data, b"filenames": [b"x.png"] * n}


def write_cifar10(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL, meta: bool = True) -> Path:
    """Write a tiny CIFAR-10 (5 x 4 train images, 3 test images) under ``root``."""
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", fake_batch(4, i, 10, b"labels"), protocol)
    dump(folder / "test_batch", fake_batch(3, 7, 10, b"labels"), protocol)
    if meta:
        dump(folder / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_vis": 3072}, protocol)
    return folder


def write_cifar100(root: Path) -> Path:
    """Write a tiny CIFAR-100 (6 train, 2 test images) under ``root``."""
    folder = root / "cifar-100-python"
    dump(folder / "train", fake_batch(6, 95, 100, b"fine_labels"))
    dump(folder / "test", fake_batch(2, 0, 100, b"fine_labels"))
    names = [f"fine{i}".encode() for i in range(100)]
    dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    return folder


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the host's env vars and cache out of lookups."""
    monkeypatch.delenv("BLOCKSCALE_CIFAR10", raising=False)
    monkeypatch.delenv("BLOCKSCALE_CIFAR100", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar10_round_trip(tmp_path: Path, protocol: int) -> None:
    folder = write_cifar10(tmp_path, protocol)
    train, test = CIFAR10("train", tmp_path), CIFAR10("test", tmp_path)
    assert (len(train), len(test)) == (20, 3)
    assert (train.num_classes, train.in_channels, train.input_size) == (10, 3, (32, 32))
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert train.targets.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(4)]
    image, label = train[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 3
    row = load_cifar_batch(folder / "data_batch_2")["data"][1]
    red = torch.tensor(row[:1024], dtype=torch.float32).view(32, 32) / 255
    torch.testing.assert_close(image[0], (red - 0.4914) / 0.2470)


def test_cifar10_rgb_layout(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    batch = fake_batch(1, 0, 10, b"labels")
    batch[b"data"][0] = np.repeat(np.array([255, 0, 0], dtype=np.uint8), 1024)
    dump(folder / "test_batch", batch)
    image, _ = CIFAR10("test", folder)[0]
    means = image.flatten(1).mean(1)
    expected = torch.tensor([(1 - 0.4914) / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616])
    torch.testing.assert_close(means, expected)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    train = CIFAR100("train", tmp_path, augment=True)
    assert train.num_classes == 100 and train.classes[99] == "fine99"
    assert train.targets.tolist() == [95, 96, 97, 98, 99, 0]
    assert all(train[i][0].shape == (3, 32, 32) for i in range(len(train)))


def test_missing_meta_names_classes_by_number(tmp_path: Path) -> None:
    write_cifar10(tmp_path, meta=False)
    assert CIFAR10("test", tmp_path).classes == tuple(str(i) for i in range(10))


def test_env_var_and_bare_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "somewhere")
    monkeypatch.setenv("BLOCKSCALE_CIFAR10", str(folder))
    assert CIFAR10("test").folder == folder
    assert CIFAR10("test", folder).folder == folder


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """Hand-assemble a batch the way Python 2's cPickle wrote the official files (protocol 2)."""

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    rows, width = data.shape
    return (
        b"\x80\x02}(" + short(b"data")
        + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b")
        + b"\x87R(K\x01K" + bytes([rows]) + b"M" + struct.pack("<H", width) + b"\x86"
        + b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R(K\x03" + short(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + b"T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb"
        + short(b"labels") + b"](" + b"".join(b"K" + bytes([x]) for x in labels) + b"eu."
    )  # fmt: skip


def test_python2_pickles_load(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "test_batch"
    path.write_bytes(python2_batch(data, [4, 0, 9]))
    batch = load_cifar_batch(path)
    np.testing.assert_array_equal(batch["data"], data)
    assert batch["labels"] == [4, 0, 9]


def test_python3_protocol2_is_refused(tmp_path: Path) -> None:
    path = dump(tmp_path / "b", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, 2)
    with pytest.raises(DatasetFormatError, match=r"_codecs\.encode"):
        load_cifar_batch(path)


def test_str_keys_are_accepted(tmp_path: Path) -> None:
    path = dump(tmp_path / "b", {"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
    assert set(load_cifar_batch(path)) == {"data", "labels"}


def test_not_found_says_where_to_put_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR100("train", tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / "cifar-100-python") in message
    assert str(tmp_path / "xdg-cache" / "blockscale" / "cifar100") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "BLOCKSCALE_CIFAR100" in message and "not supported" in message


class _System:
    """Pickles to a call of os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    """Pickles to a call of builtins.eval."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    """Pickles to a call of subprocess.Popen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize(
    ("payload", "name"), [(_System, "system"), (_Eval, "eval"), (_Popen, "Popen")]
)
def test_malicious_pickle_is_refused_without_running(
    tmp_path: Path, payload: type, name: str
) -> None:
    marker = tmp_path / "pwned"
    folder = write_cifar10(tmp_path)
    batch = fake_batch(4, 3, 10, b"labels")
    batch[b"labels"] = payload(marker)
    dump(folder / "data_batch_3", batch)
    with pytest.raises(DatasetFormatError, match=name) as info:
        CIFAR10("train", tmp_path)
    assert str(folder / "data_batch_3") in str(info.value)
    assert not marker.exists(), "the pickled payload was executed"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([1, 2, 3], "expected a pickled dict"),
        ({b"labels": [0]}, "no 'data' entry"),
        ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "must be uint8 N x 3072"),
        ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, "must be uint8 N x 3072"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "labels outside 0..9"),
    ],
    ids=["not-dict", "no-data", "float-data", "wrong-width", "label-count", "label-range"],
)
def test_malformed_batches(tmp_path: Path, content: Any, match: str) -> None:
    folder = write_cifar10(tmp_path)
    dump(folder / "test_batch", content)
    with pytest.raises(DatasetFormatError, match=re.escape(match)):
        CIFAR10("test", tmp_path)


def test_truncated_pickle(tmp_path: Path) -> None:
    path = dump(tmp_path / "batch", fake_batch(2, 0, 10, b"labels"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match="not a readable CIFAR batch"):
        load_cifar_batch(path)
