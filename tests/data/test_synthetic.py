"""Synthetic data: seeded, balanced, split-aware, and learnable by a tiny CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blockscale.data import SyntheticDataset


def stack(dataset: SyntheticDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``dataset`` as two tensors."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = (
        stack(SyntheticDataset(64, 4, 2, 8, seed=3)),
        stack(SyntheticDataset(64, 4, 2, 8, seed=3)),
    )
    c = stack(SyntheticDataset(64, 4, 2, 8, seed=4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_metadata_and_balanced_labels() -> None:
    dataset = SyntheticDataset(100, num_classes=5, in_channels=1, size=12)
    assert (len(dataset), dataset.num_classes, dataset.in_channels) == (100, 5, 1)
    assert dataset.input_size == (12, 12) and dataset.classes[4] == "class_4"
    assert torch.bincount(torch.from_numpy(dataset.targets)).tolist() == [20] * 5
    image, label = dataset[0]
    assert image.shape == (1, 12, 12) and image.dtype == torch.float32 and isinstance(label, int)


def test_splits_share_patterns_but_not_items() -> None:
    train = SyntheticDataset(40, 4, 3, 8, split="train")
    test = SyntheticDataset(40, 4, 3, 8, split="test")
    assert torch.equal(train.patterns, test.patterns)
    assert not torch.equal(stack(train)[0], stack(test)[0])


def test_labels_are_recoverable_by_nearest_pattern() -> None:
    test = SyntheticDataset(200, 10, 3, 16, split="test", noise=0.5)
    images, labels = stack(test)
    scores = torch.einsum("nchw,kchw->nk", images, test.patterns)
    assert (scores.argmax(1) == labels).float().mean() > 0.95


def test_tiny_cnn_learns_it() -> None:
    torch.manual_seed(0)
    train_x, train_y = stack(SyntheticDataset(256, 4, 3, 16, split="train"))
    test_x, test_y = stack(SyntheticDataset(128, 4, 3, 16, split="test"))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 4),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimiser.step()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.9


@pytest.mark.parametrize(
    "kwargs",
    [{"n": -1}, {"num_classes": 0}, {"in_channels": 0}, {"size": 2}, {"noise": -0.1}],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need n >= 0"):
        SyntheticDataset(**kwargs)  # type: ignore[arg-type]
