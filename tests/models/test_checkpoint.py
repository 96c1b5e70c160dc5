"""Checkpoints: bit-exact round trips, typed errors for every broken file, and no pickle anywhere."""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blockscale.errors import CheckpointError, UnknownModelError
from blockscale.models import _registry, create_model, list_models
from blockscale.models.checkpoint import load_checkpoint, save_checkpoint
from blockscale.models.resnet import resnet20

THIN = {
    "resnet20": {"width": 4},
    "resnet56": {"width": 2},
    "resnet18": {"width": 4},
    "vgg11_bn": {"width_mult": 1 / 32},
    "vgg16_bn": {"width_mult": 1 / 32},
    "mobilenetv2": {"width_mult": 0.25},
}
SMALL = {"width": 2, "num_classes": 3}


def trained(name: str, kwargs: dict[str, object]) -> nn.Module:
    """A thin model whose BN running stats moved off their defaults, so buffers are really tested."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, kwargs.get("in_channels", 3), 16, 16))
    return model.eval()


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Bytes of a valid small resnet20 checkpoint, shared by the corruption tests."""
    path = tmp_path_factory.mktemp("ckpt") / "r20.safetensors"
    save_checkpoint(trained("resnet20", SMALL), path, model_name="resnet20", model_kwargs=SMALL)
    return path.read_bytes()


@pytest.mark.parametrize("name", list_models())
def test_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    kwargs = {**THIN.get(name, {}), "in_channels": 1, "num_classes": 5}
    model = trained(name, kwargs)
    extra = {"epoch": 3, "acc": 0.91, "note": "ok"}
    path = save_checkpoint(
        model, tmp_path / "m.safetensors", model_name=name, model_kwargs=kwargs, extra=extra
    )
    loaded, meta = load_checkpoint(path)
    assert meta == {
        "format": "blockscale-checkpoint",
        "version": 1,
        "model": name,
        "kwargs": kwargs,
        "extra": extra,
    }
    assert not loaded.training
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_file_is_plain_safetensors_and_loads_without_pickle(
    small_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header_len = int.from_bytes(small_file[:8], "little")
    header = json.loads(small_file[8 : 8 + header_len])
    data_len = max(entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__")
    assert 8 + header_len + data_len == len(small_file)  # header and raw tensor bytes, nothing else
    assert all(isinstance(v, str) for v in header["__metadata__"].values())

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used on the load path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    path = tmp_path / "c.safetensors"
    path.write_bytes(small_file)
    load_checkpoint(path)


@settings(max_examples=40, deadline=None)
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_byte_is_detected(small_file: bytes, position: float, mask: int) -> None:
    corrupt = bytearray(small_file)
    corrupt[int(position * len(corrupt))] ^= mask
    with (
        _tmpfile(bytes(corrupt)) as path,
        pytest.raises(CheckpointError, match=re.escape(str(path))),
    ):
        load_checkpoint(path)


@settings(max_examples=15, deadline=None)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_file_is_detected(small_file: bytes, fraction: float) -> None:
    with (
        _tmpfile(small_file[: int(fraction * len(small_file))]) as path,
        pytest.raises(CheckpointError, match="not a readable safetensors file"),
    ):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_foreign_safetensors_is_refused(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="not a blockscale checkpoint"):
        load_checkpoint(path)


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v2.safetensors"
    meta = {"format": json.dumps("blockscale-checkpoint"), "version": "2"}
    safetensors.torch.save_file({"w": torch.zeros(2)}, path, metadata=meta)
    with pytest.raises(CheckpointError, match="version 2"):
        load_checkpoint(path)


def test_shape_mismatch_on_load_names_the_tensor(
    small_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(small_file)
    monkeypatch.setitem(_registry._MODELS, "resnet20", lambda **kw: create_model("resnet56", **kw))
    with pytest.raises(CheckpointError, match=r"missing layer1\.3\.conv1\.weight"):
        load_checkpoint(path)
    monkeypatch.setitem(_registry._MODELS, "resnet20", lambda **kw: resnet20(**{**kw, "width": 3}))
    with pytest.raises(
        CheckpointError, match=r"conv1.weight: file \(2, 3, 3, 3\) vs model \(3, 3, 3, 3\)"
    ):
        load_checkpoint(path)


def test_save_refuses_wrong_kwargs_and_writes_nothing(tmp_path: Path) -> None:
    model = trained("resnet20", SMALL)
    with pytest.raises(CheckpointError, match="do not fit"):
        save_checkpoint(model, tmp_path / "x.safetensors", model_name="resnet20", model_kwargs={})
    with pytest.raises(UnknownModelError):
        save_checkpoint(
            model, tmp_path / "x.safetensors", model_name="resnet2O", model_kwargs=SMALL
        )
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(
            model,
            tmp_path / "x.safetensors",
            model_name="resnet20",
            model_kwargs=SMALL,
            extra={"t": torch.ones(1)},
        )
    assert list(tmp_path.iterdir()) == []


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.safetensors"
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_checkpoint(
            create_model("resnet20", **SMALL), path, model_name="resnet20", model_kwargs=SMALL
        )
    loaded, _ = load_checkpoint(path)
    torch.manual_seed(2)
    assert torch.equal(loaded.conv1.weight, create_model("resnet20", **SMALL).conv1.weight)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]


@contextmanager
def _tmpfile(data: bytes) -> Iterator[Path]:
    """Write bytes to a fresh temporary .safetensors file, removed afterwards (hypothesis-friendly)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corrupt.safetensors"
        path.write_bytes(data)
        yield path
