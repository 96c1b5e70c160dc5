"""Model-level baselines: the families of whole models that block-grained scaling is compared with.

Each family offers one whole model per sparsity level (the bank's levels, so both offer the same
sizes) and trains every member end to end:

* ``uniform`` (FLOP scaling): every block pruned at the same sparsity, as the bank's descendants
  are (block boundaries whole), composed into one model and fine-tuned on the labels;
* ``compression``: whole-model L1 filter pruning at the level, every prunable channel of the
  teacher included (the residual stream's too; only the input and the logits stay whole), then
  fine-tuned on the labels;
* ``distillation``: the ``compression`` architecture at the level, re-initialised and trained from
  scratch by knowledge distillation from the teacher (Hinton et al.: KL divergence at temperature
  ``T``, weighted ``alpha``, plus cross-entropy on the labels).

Training is Adam at a fixed learning rate; every member records its training time (evaluation
excluded) and validation accuracy after each epoch, so time-to-quality can be judged per member.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._progress import progress_bar
from .derive import prune_block
from .errors import ConfigError
from .extract import Decomposition, compose
from .models._registry import init_weights
from .train import evaluate

Method = Literal["uniform", "compression", "distillation"]
METHODS: tuple[Method, ...] = ("uniform", "compression", "distillation")


@dataclass(frozen=True)
class BaselineConfig:
    """How the baseline families are made and trained: the sparsity levels (one member each),
    epochs, Adam's learning rate, batch size, the distillation temperature and weight, the pruning
    importance, the multiple kept widths are rounded up to (as :class:`DeriveConfig`'s, so the
    families run on the same SIMD-friendly widths as the bank) and the seed."""

    sparsities: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9)
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.9
    importance: str = "l1"
    round_to: int | None = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            raise ConfigError(
                f"BaselineConfig.sparsities must be in (0, 1), got {list(self.sparsities)}",
                hint="the teacher itself (sparsity 0) is every family's first member anyway",
            )
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(
                f"BaselineConfig epochs, batch_size and lr must be positive, got "
                f"{self.epochs}, {self.batch_size}, {self.lr}"
            )
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(
                f"BaselineConfig.temperature must be > 0 and alpha in [0, 1], got "
                f"{self.temperature}, {self.alpha}"
            )
        if self.importance not in ("l1", "l2"):
            raise ConfigError(
                f"BaselineConfig.importance must be l1 or l2, got {self.importance!r}"
            )
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"BaselineConfig.round_to must be positive, got {self.round_to}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineConfig:
        return cls(**{**data, "sparsities": tuple(data["sparsities"])})


@dataclass
class BaselineModel:
    """One trained member of a baseline family, with its training record: per epoch (0 is before
    training), the cumulative training seconds and the validation accuracy."""

    method: Method
    sparsity: float
    module: nn.Module
    params: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Validation accuracy after the last epoch."""
        return self.history[-1]["val_accuracy"]

    def summary(self) -> dict[str, Any]:
        """Everything but the module, as JSON-ready data."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "params": self.params,
            "seconds": self.seconds,
            "accuracy": self.accuracy,
            "history": self.history,
        }


def pruned_model(
    decomposition: Decomposition,
    method: Method,
    sparsity: float,
    importance: str = "l1",
    round_to: int | None = 8,
) -> nn.Module:
    """The untrained architecture of ``method`` at ``sparsity``, weights pruned from the teacher
    (``distillation`` re-initialises them)."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}", hint=f"use one of {', '.join(METHODS)}")
    plan = decomposition.plan
    if method == "uniform":
        blocks = [
            prune_block(
                block, info.input_shape, info.output_shape, sparsity,
                round_to=round_to, importance=importance, name=info.name,
            )[0]
            for info, block in zip(plan.blocks, decomposition.blocks, strict=True)
        ]  # fmt: skip
        return copy.deepcopy(compose(decomposition, blocks))  # the frame is shared: copy it
    teacher = compose(decomposition, decomposition.blocks).eval()
    with torch.no_grad():
        logits = teacher(torch.zeros(1, *plan.input_shape))
    model, _ = prune_block(
        teacher,
        plan.input_shape,
        tuple(logits.shape[1:]),
        sparsity,
        round_to=round_to,
        importance=importance,
        name=plan.model,
    )
    if method == "distillation":  # the student learns from scratch: the zoo's initialisation
        init_weights(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return model


def train_family(
    method: Method,
    decomposition: Decomposition,
    train_set: Dataset,
    val_set: Dataset,
    config: BaselineConfig | None = None,
    *,
    progress: bool = True,
) -> list[BaselineModel]:
    """Make and train ``method``'s family: one whole model per sparsity level of ``config``."""
    config = config or BaselineConfig()
    teacher = compose(decomposition, decomposition.blocks).eval()
    family = []
    for level, sparsity in enumerate(config.sparsities):
        model = pruned_model(decomposition, method, sparsity, config.importance, config.round_to)
        seconds, history = _fit(
            model,
            train_set,
            val_set,
            config,
            teacher=teacher if method == "distillation" else None,
            seed=config.seed + level,
            label=f"{method} {sparsity:g}",
            progress=progress,
        )
        family.append(
            BaselineModel(
                method=method,
                sparsity=sparsity,
                module=model.eval(),
                params=sum(p.numel() for p in model.parameters()),
                seconds=seconds,
                history=history,
            )
        )
    return family


def _fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: BaselineConfig,
    *,
    teacher: nn.Module | None,
    seed: int,
    label: str,
    progress: bool,
) -> tuple[float, list[dict[str, float]]]:
    """Train ``model`` in place (cross-entropy, or distillation from ``teacher``); the training
    seconds, and the per-epoch record."""
    torch.manual_seed(seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = [{"epoch": 0, "seconds": 0.0, "val_accuracy": evaluate(model, val_set)}]
    seconds = 0.0
    with progress_bar(f"train {label}", config.epochs * len(loader), enabled=progress) as advance:
        for epoch in range(1, config.epochs + 1):
            model.train()
            start = time.perf_counter()
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(model(images), labels, images, teacher, config)
                loss.backward()
                optimizer.step()
                advance(epoch=epoch, loss=loss.item())
            seconds += time.perf_counter() - start
            accuracy = evaluate(model, val_set)
            history.append({"epoch": epoch, "seconds": seconds, "val_accuracy": accuracy})
    model.eval()
    return seconds, history


def _loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    teacher: nn.Module | None,
    config: BaselineConfig,
) -> torch.Tensor:
    """Cross-entropy, or Hinton's distillation loss when there is a teacher."""
    hard = nn.functional.cross_entropy(logits, labels)
    if teacher is None:
        return hard
    with torch.no_grad():
        target = teacher(images)
    t = config.temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(logits / t, dim=1),
        nn.functional.log_softmax(target / t, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return config.alpha * t * t * soft + (1 - config.alpha) * hard
