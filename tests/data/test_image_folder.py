"""Image folders: class discovery, splits, decoding, resizing and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blockscale.data import ImageFolderDataset
from blockscale.errors import DatasetFormatError, DatasetNotFoundError


def save(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (5, 7)) -> Path:
    """Write a solid-colour image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """Two classes directly under root, mixed formats and sizes, plus files to be ignored."""
    root = tmp_path / "flat"
    save(root / "dog" / "a.png", (0, 0, 255))
    save(root / "dog" / "nested" / "b.JPG", (0, 0, 250), (9, 3))
    save(root / "cat" / "c.bmp", (255, 0, 0), (2, 2))
    save(root / "cat" / "d.jpeg", (250, 0, 0))
    (root / "cat" / "notes.txt").write_text("not an image")
    save(root / "cat" / ".hidden.png", (0, 255, 0))
    save(root / ".trash" / "x.png", (0, 255, 0))
    return root


def test_classes_labels_and_shapes(flat: Path) -> None:
    dataset = ImageFolderDataset(flat, size=8)
    assert dataset.classes == ("cat", "dog") and dataset.num_classes == 2
    assert [p.name for p in dataset.paths] == ["c.bmp", "d.jpeg", "a.png", "b.JPG"]
    assert dataset.targets.tolist() == [0, 0, 1, 1]
    assert (dataset.in_channels, dataset.input_size) == (3, (8, 8))
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert label == dataset.targets[index]


def test_pixels_are_rgb_in_unit_range_before_normalisation(flat: Path) -> None:
    dataset = ImageFolderDataset(flat, size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image, _ = dataset[0]
    torch.testing.assert_close(image, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 4))


def test_grayscale_and_rectangular_size(flat: Path) -> None:
    dataset = ImageFolderDataset(flat, size=(6, 10), grayscale=True)
    image, _ = dataset[2]
    assert dataset.in_channels == 1 and image.shape == (1, 6, 10)
    expected = (round(0.114 * 255) / 255 - 0.449) / 0.226
    torch.testing.assert_close(image, torch.full((1, 6, 10), expected), atol=0.02, rtol=0)


def test_augmentation_keeps_shape(flat: Path) -> None:
    dataset = ImageFolderDataset(flat, size=16, augment=True)
    assert dataset.crop_padding == 2
    assert all(dataset[i][0].shape == (3, 16, 16) for i in range(len(dataset)))


def test_split_folders_share_the_class_list(tmp_path: Path) -> None:
    save(tmp_path / "train" / "ant" / "1.png", (1, 1, 1))
    save(tmp_path / "train" / "bee" / "2.png", (2, 2, 2))
    save(tmp_path / "test" / "bee" / "3.png", (3, 3, 3))
    save(tmp_path / "test" / "cow" / "4.png", (4, 4, 4))
    train = ImageFolderDataset(tmp_path, "train")
    test = ImageFolderDataset(tmp_path, "test")
    assert train.classes == test.classes == ("ant", "bee", "cow")
    assert train.targets.tolist() == [0, 1] and test.targets.tolist() == [1, 2]


def test_test_split_needs_a_test_folder(flat: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train_val_split"):
        ImageFolderDataset(flat, "test")
    save(tmp_path / "only-train" / "train" / "a" / "1.png", (0, 0, 0))
    with pytest.raises(DatasetNotFoundError, match="no 'test' folder"):
        ImageFolderDataset(tmp_path / "only-train", "test")


def test_missing_or_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_corrupt_image_names_the_file(flat: Path) -> None:
    broken = flat / "dog" / "zz.png"
    broken.write_bytes(b"\x89PNG not really")
    dataset = ImageFolderDataset(flat)
    with pytest.raises(DatasetFormatError, match="cannot decode") as info:
        dataset[len(dataset) - 1]
    assert str(broken) in str(info.value)


def test_normalisation_arguments_are_checked(flat: Path) -> None:
    with pytest.raises(ValueError, match="both mean and std"):
        ImageFolderDataset(flat, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="need 1 values"):
        ImageFolderDataset(flat, grayscale=True, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))


def test_downscaling_keeps_the_layout(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:, 2:] = 255
    (tmp_path / "c").mkdir()
    Image.fromarray(pixels).save(tmp_path / "c" / "half.png")
    image, _ = ImageFolderDataset(tmp_path, size=2, mean=(0, 0, 0), std=(1, 1, 1))[0]
    left, right = image[0, :, 0], image[0, :, 1]
    assert (left < 0.25).all() and (right > 0.75).all()
