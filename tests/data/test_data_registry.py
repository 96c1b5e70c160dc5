"""The data set registry, split helpers and shared dataset behaviour."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset

from blockscale.data import (
    SyntheticDataset,
    VisionDataset,
    dataset_info,
    list_datasets,
    load_dataset,
    subset,
    train_val_split,
)
from blockscale.data import fashion_mnist as fm
from blockscale.errors import BlockscaleError, DatasetNotFoundError


def test_lists_the_built_in_names() -> None:
    names = list_datasets()
    assert list(names) == ["fashion-mnist", "cifar10", "cifar100", "image-folder", "synthetic"]
    assert all(names.values())


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("imagenet")
    assert isinstance(info.value, BlockscaleError)
    for name in list_datasets():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["Synthetic", "SYNTHETIC", " synthetic "])
def test_names_forgive_case_and_spaces(name: str) -> None:
    assert isinstance(load_dataset(name, n=8), SyntheticDataset)


@pytest.mark.parametrize(
    ("alias", "phrase"), [("CIFAR_10", "cifar10 train"), ("cifar-100", "cifar100 train")]
)
def test_aliases_reach_the_right_loader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, alias: str, phrase: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BLOCKSCALE_CIFAR10", raising=False)
    monkeypatch.delenv("BLOCKSCALE_CIFAR100", raising=False)
    with pytest.raises(DatasetNotFoundError, match=phrase):
        load_dataset(alias, root=tmp_path)


def test_fashion_mnist_offline_error_via_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("FashionMNIST", "test", download=False)


def test_unknown_split_points_to_train_val_split() -> None:
    with pytest.raises(DatasetNotFoundError, match="train_val_split"):
        load_dataset("synthetic", "val")


def test_image_folder_needs_root_and_takes_options(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="root"):
        load_dataset("image-folder")
    (tmp_path / "a").mkdir()
    Image.new("RGB", (3, 3)).save(tmp_path / "a" / "x.png")
    dataset = load_dataset("image_folder", root=tmp_path, size=6, grayscale=True, augment=True)
    assert dataset[0][0].shape == (1, 6, 6) and dataset.augment


def test_train_val_split_is_deterministic_disjoint_and_complete() -> None:
    dataset = SyntheticDataset(50, 5, 1, 8)
    train, val = train_val_split(dataset, 0.2, seed=7)
    again = train_val_split(dataset, 0.2, seed=7)
    other = train_val_split(dataset, 0.2, seed=8)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(train.indices + val.indices) == list(range(50))
    assert train.indices == again[0].indices and val.indices == again[1].indices
    assert val.indices != other[1].indices


def test_validation_is_never_augmented() -> None:
    dataset = SyntheticDataset(20, 2, 1, 8, augment=True)
    train, val = train_val_split(dataset, 0.5)
    assert train.dataset is dataset and dataset.augment
    assert isinstance(val.dataset, VisionDataset) and not val.dataset.augment
    index = val.indices[0]
    assert torch.equal(val[0][0], SyntheticDataset(20, 2, 1, 8)[index][0])


def test_train_val_split_accepts_any_dataset() -> None:
    dataset = TensorDataset(torch.arange(10))
    train, val = train_val_split(dataset, 0.3, seed=1)
    assert (len(train), len(val)) == (7, 3) and val.dataset is dataset


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.01])
def test_train_val_split_rejects_empty_sides(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(SyntheticDataset(10, 2, 1, 8), fraction)


def test_subset_is_seeded_and_capped() -> None:
    dataset = SyntheticDataset(30, 3, 1, 8)
    assert subset(dataset, 10, seed=1).indices == subset(dataset, 10, seed=1).indices
    assert subset(dataset, 10, seed=1).indices != subset(dataset, 10, seed=2).indices
    assert len(subset(dataset, 10)) == 10 and len(subset(dataset, 100)) == 30
    with pytest.raises(ValueError):
        subset(dataset, -1)


def test_dataset_info_looks_through_subsets() -> None:
    dataset = SyntheticDataset(30, 3, 2, 8)
    nested = Subset(subset(dataset, 10), [0, 1])
    info = dataset_info(nested)
    assert (info.name, info.num_classes, info.in_channels, info.input_size) == (
        "synthetic",
        3,
        2,
        (8, 8),
    )
    with pytest.raises(TypeError):
        dataset_info(TensorDataset(torch.zeros(2)))


def test_augmented_view_shares_data_and_leaves_original_alone() -> None:
    dataset = SyntheticDataset(10, 2, 1, 8)
    view = dataset.augmented()
    assert view.augment and not dataset.augment
    assert view.targets is dataset.targets
    assert "augment=True" in repr(view)


def test_batches_through_a_dataloader_and_pickles() -> None:
    dataset = SyntheticDataset(10, 2, 3, 8, augment=True)
    images, labels = next(iter(DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(clone.targets, dataset.targets)
