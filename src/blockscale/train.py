"""Teacher training and evaluation: plain supervised training with SGD and a cosine schedule."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._progress import progress_bar
from .errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of teacher training (the CIFAR ResNet recipe, shortened)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"epochs, batch_size and lr must be positive, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What training produced: final test accuracy, time, and a per-epoch history."""

    test_accuracy: float
    train_loss: float
    seconds: float
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, progress: bool = False
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, in [0, 1]; every layer's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct = total = 0
    loader = _loader(dataset, batch_size, shuffle=False)
    with progress_bar("evaluate", len(loader), enabled=progress) as advance:
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += labels.numel()
            advance()
    for module, mode in modes.items():
        module.training = mode
    return correct / max(total, 1)


def train(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``train_set``; report accuracy on ``test_set`` after each epoch."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    loader = _loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(loader), pct_start=0.15
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    loss_avg = 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        running, seen = 0.0, 0
        with progress_bar(
            f"epoch {epoch}/{config.epochs}", len(loader), enabled=progress
        ) as advance:
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += loss.item() * labels.numel()
                seen += labels.numel()
                advance(loss=running / seen)
        loss_avg = running / max(seen, 1)
        accuracy = evaluate(model, test_set)
        history.append({"epoch": epoch, "train_loss": loss_avg, "test_accuracy": accuracy})
    model.eval()
    return TrainResult(
        test_accuracy=history[-1]["test_accuracy"],
        train_loss=loss_avg,
        seconds=time.perf_counter() - start,
        epochs=config.epochs,
        history=history,
    )
