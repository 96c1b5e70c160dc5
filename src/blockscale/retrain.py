"""Block retraining: block-level knowledge distillation from cached teacher features.

The teacher runs once per batch: the input and output of every block are captured and cached (in
memory when they fit, else in memory-mapped files on disk, optionally as float16), so later epochs
never rerun it. Every descendant of a block trains from the same cached pairs, with the mean squared
error between its output and the teacher block's output, fed the teacher's block input or, for a
share of each batch (``RetrainConfig.chain``), the output of the previous block's descendant at the
same level. The state with the lowest validation error, fed the same way, is kept. Unpruned copies
are not retrained: they already equal the teacher's block exactly.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._progress import progress_bar
from .derive import Descendant
from .errors import BlockscaleError, ConfigError
from .extract import Decomposition

CacheMode = Literal["auto", "memory", "disk", "none"]


@dataclass(frozen=True)
class RetrainConfig:
    """How descendants are distilled.

    ``cache``: ``"memory"``, ``"disk"`` (memory-mapped files in a temporary folder, made inside
    ``cache_dir`` when given and removed afterwards),
    ``"auto"`` (memory when the features fit in ``memory_limit_mb``), or ``"none"`` (rerun the
    teacher on every batch of every epoch, as LegoDNN's code does; for comparison).

    ``chain``: where a block's input is the previous block's output, the share of each batch that
    its descendants see through the previous block's pruned descendant at the same level (that
    step's output, detached) instead of the teacher's input; 0 is LegoDNN's purely local
    distillation. The target stays the teacher's output, so a chained descendant also learns to
    undo its pruned predecessor's error, the error that compounds when a selection prunes many
    blocks in a row.
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    cache: CacheMode = "auto"
    cache_dtype: Literal["float32", "float16"] = "float32"
    cache_dir: str | None = None
    memory_limit_mb: int = 4096
    chain: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"epochs, batch_size and lr must be positive, got {self}")
        if not 0.0 <= self.chain <= 1.0:
            raise ConfigError(f"chain must lie in [0, 1], got {self.chain}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.cache not in ("auto", "memory", "disk", "none"):
            raise ConfigError(f"cache must be auto, memory, disk or none, got {self.cache!r}")
        if self.cache_dtype not in ("float32", "float16"):
            raise ConfigError(f"cache_dtype must be float32 or float16, got {self.cache_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrainConfig:
        return cls(**data)


@dataclass
class RetrainReport:
    """What retraining did: validation MSE per descendant before and after, and the time spent.

    ``history[b][d]`` is descendant ``d`` of block ``b``'s validation MSE after each epoch and
    ``epoch_seconds[b][d]`` the time its own training steps took in each epoch; what is left of
    ``train_seconds`` is shared work (reading the cache, validation).
    """

    cache: str
    cache_bytes: int
    cache_seconds: float
    train_seconds: float
    samples: int
    val_mse_before: list[list[float]] = field(default_factory=list)
    val_mse_after: list[list[float]] = field(default_factory=list)
    best_epoch: list[list[int]] = field(default_factory=list)
    history: list[list[list[float]]] = field(default_factory=list)
    epoch_seconds: list[list[list[float]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FeatureCache:
    """The teacher's input and output of every block for a fixed set of images.

    Tensors that are both one block's output and the next block's input are stored once.
    """

    def __init__(self, arrays: list[np.ndarray | torch.Tensor], slots: list[tuple[int, int]]):
        self._arrays = arrays
        self._slots = slots  # block -> (input array index, output array index)

    def __len__(self) -> int:
        return len(self._arrays[0])

    @property
    def nbytes(self) -> int:
        return int(
            sum(
                a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
                for a in self._arrays
            )
        )

    @property
    def slots(self) -> list[tuple[int, int]]:
        """For each block, the indices of its input and output features."""
        return list(self._slots)

    @property
    def on_disk(self) -> bool:
        """Whether the features live in memory-mapped files rather than in memory."""
        return any(isinstance(a, np.ndarray) for a in self._arrays)

    def pair(self, block: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher input and output of ``block`` for the samples at ``index`` (float32)."""
        i, o = self._slots[block]
        return self._take(i, index), self._take(o, index)

    def _take(self, array: int, index: torch.Tensor) -> torch.Tensor:
        data = self._arrays[array]
        if isinstance(data, np.ndarray):
            rows = np.sort(index.numpy())
            order = np.argsort(np.argsort(index.numpy()))
            return torch.from_numpy(np.ascontiguousarray(data[rows][order])).float()
        return data[index].float()

    @classmethod
    def build(
        cls,
        decomposition: Decomposition,
        dataset: Dataset,
        *,
        batch_size: int = 256,
        mode: CacheMode = "auto",
        dtype: str = "float32",
        directory: Path | None = None,
        memory_limit_mb: int = 4096,
        progress: bool = True,
    ) -> FeatureCache:
        """Run the teacher once over ``dataset`` and keep every block's input and output."""
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        frame = decomposition.frame.eval()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        n = len(dataset)
        arrays: list[np.ndarray | torch.Tensor] = []
        slots: list[tuple[int, int]] = []
        start = 0
        with (
            _Recorder(decomposition.blocks) as recorder,
            torch.no_grad(),
            progress_bar("cache teacher features", len(loader), enabled=progress) as advance,
        ):
            for images, _ in loader:
                recorder.clear()
                frame(images)
                if not arrays:
                    slots = list(recorder.slots)
                    shapes = [tuple(t.shape[1:]) for t in recorder.tensors]
                    per_sample = sum(math.prod(s) for s in shapes) * (
                        2 if dtype == "float16" else 4
                    )
                    on_disk = mode == "disk" or (
                        mode == "auto" and per_sample * n > memory_limit_mb * 2**20
                    )
                    arrays = _allocate(shapes, n, torch_dtype, on_disk, directory)
                if recorder.slots != slots:
                    raise BlockscaleError(
                        "the teacher's blocks shared tensors differently from batch to batch",
                        hint="cut blocks so that glue code between them does not alter tensors",
                    )
                stop = start + len(images)
                for array, tensor in zip(arrays, recorder.tensors, strict=True):
                    if isinstance(array, np.ndarray):
                        array[start:stop] = tensor.to(torch_dtype).numpy()
                    else:
                        array[start:stop] = tensor.to(torch_dtype)
                start = stop
                advance()
        for array in arrays:
            if isinstance(array, np.memmap):
                array.flush()
        return cls(arrays, slots)


class _Recorder:
    """Copies of every block's input and output while the teacher runs.

    The input is copied before the block runs and the output right after, so in-place operations
    anywhere later cannot change them. A block whose input is the previous block's output, with the
    same values, shares its copy (``slots`` maps each block to (input, output) indices).
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = blocks
        self.tensors: list[torch.Tensor] = []
        self.slots: list[tuple[int, int]] = []
        self._input = 0
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._before))
            self._handles.append(block.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def clear(self) -> None:
        self.tensors.clear()
        self.slots.clear()

    def _before(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        last = self.tensors[-1] if self.tensors else None
        if last is not None and last.shape == x.shape and torch.equal(last, x):
            self._input = len(self.tensors) - 1
        else:
            self.tensors.append(x.detach().clone())
            self._input = len(self.tensors) - 1

    def _after(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.tensors.append(out.detach().clone())
        self.slots.append((self._input, len(self.tensors) - 1))


def _allocate(
    shapes: list[tuple[int, ...]],
    n: int,
    dtype: torch.dtype,
    on_disk: bool,
    directory: Path | None,
) -> list[np.ndarray | torch.Tensor]:
    if not on_disk:
        return [torch.empty((n, *s), dtype=dtype) for s in shapes]
    if directory is None:
        raise ConfigError(
            "features too large for memory need a folder for their memory-mapped files",
            hint="pass directory= to FeatureCache.build (retrain makes and removes one itself)",
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    return [
        np.lib.format.open_memmap(
            folder / f"feature-{i}.npy", mode="w+", dtype=np_dtype, shape=(n, *s)
        )
        for i, s in enumerate(shapes)
    ]


def _teacher_pairs(
    decomposition: Decomposition, images: torch.Tensor
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[int, int]]]:
    """Every block's teacher input and output for one batch, computed afresh (no cache), and
    the recorder's slots (which blocks share a tensor)."""
    with _Recorder(decomposition.blocks) as recorder, torch.no_grad():
        decomposition.frame.eval()(images)
    pairs = [(recorder.tensors[i], recorder.tensors[o]) for i, o in recorder.slots]
    return pairs, list(recorder.slots)


def _follows(slots: Sequence[tuple[int, int]]) -> list[bool]:
    """For each block, whether its input is the previous block's output."""
    return [b > 0 and slots[b][0] == slots[b - 1][1] for b in range(len(slots))]


def _fed(x: torch.Tensor, previous: torch.Tensor | None, share: int) -> torch.Tensor:
    """A block's input for a descendant: the teacher's ``x`` with its first ``share`` samples
    replaced by ``previous`` (the previous block's descendant's output), when there is one."""
    return x if previous is None or not share else torch.cat([previous[:share], x[share:]])


@torch.no_grad()
def _val_errors(
    descendants: Sequence[Sequence[Descendant]],
    val_batches: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    chain: float,
    follows: Sequence[bool],
    *,
    pruned_only: bool = False,
) -> list[list[float]]:
    """Validation MSE of every descendant against the teacher's block output, each pruned one
    fed as it trains: the ``chain`` share of each batch through the previous block's pruned
    descendant at its level (where the block follows it), the rest the teacher's input. With
    ``pruned_only`` the unpruned ones (which never change) are skipped, as NaN."""
    errors = []
    upstream: list[dict[int, torch.Tensor]] = [{} for _ in val_batches]
    for b, family in enumerate(descendants):
        outputs: list[dict[int, torch.Tensor]] = [{} for _ in val_batches]
        row = []
        for level, d in enumerate(family):
            if pruned_only and not d.info.pruned:
                row.append(math.nan)
                continue
            d.module.eval()
            total = count = 0.0
            for j, pairs in enumerate(val_batches):
                x, y = pairs[b]
                k = round(len(x) * chain)
                if d.info.pruned and follows[b]:
                    x = _fed(x, upstream[j].get(level), k)
                out = d.module(x)
                total += nn.functional.mse_loss(out, y, reduction="sum").item()
                count += y.numel()
                if d.info.pruned and k:
                    outputs[j][level] = out
            row.append(total / max(count, 1) if val_batches else math.nan)
        upstream = outputs
        errors.append(row)
    return errors


def retrain(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    dataset: Dataset,
    config: RetrainConfig | None = None,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RetrainReport:
    """Distill every pruned descendant in place against the teacher's block features.

    ``on_epoch(epoch, train_seconds)`` runs after each epoch (its own time is not counted), for
    instance to evaluate the descendants as they train.
    """
    config = config or RetrainConfig()
    work_dir: Path | None = None
    if config.cache in ("disk", "auto"):
        if config.cache_dir is not None:
            Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="blockscale-cache-", dir=config.cache_dir))
    try:
        return _distill(decomposition, descendants, dataset, config, work_dir, progress, on_epoch)
    finally:
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)


def _distill(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    dataset: Dataset,
    config: RetrainConfig,
    cache_dir: Path | None,
    progress: bool,
    on_epoch: Callable[[int, float], None] | None,
) -> RetrainReport:
    plan = decomposition.plan
    n = len(dataset)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=generator)
    n_val = max(1, round(n * config.val_fraction)) if config.val_fraction > 0 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]

    cache_start = time.perf_counter()
    cache: FeatureCache | None = None
    if config.cache != "none":
        cache = FeatureCache.build(
            decomposition,
            dataset,
            mode=config.cache,
            dtype=config.cache_dtype,
            directory=cache_dir,
            memory_limit_mb=config.memory_limit_mb,
            progress=progress,
        )
    cache_seconds = time.perf_counter() - cache_start
    report = RetrainReport(
        cache=config.cache if cache is None else ("disk" if cache.on_disk else "memory"),
        cache_bytes=cache.nbytes if cache else 0,
        cache_seconds=cache_seconds,
        train_seconds=0.0,
        samples=n,
    )

    def batches(indices: torch.Tensor, shuffle: bool, epoch: int):
        if shuffle:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            indices = indices[torch.randperm(len(indices), generator=g)]
        for start in range(0, len(indices), config.batch_size):
            yield indices[start : start + config.batch_size]

    slots = cache.slots if cache is not None else []  # which blocks share a tensor

    def pairs_for(batch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if cache is not None:
            return [cache.pair(b, batch) for b in range(plan.num_blocks)]
        images = torch.stack([dataset[int(i)][0] for i in batch])
        pairs, slots[:] = _teacher_pairs(decomposition, images)
        return pairs

    val_batches = [pairs_for(b) for b in batches(val_idx, False, 0)] if n_val else []
    trainable = [[d for d in family if d.info.pruned] for family in descendants]
    states = {}
    optimizers = {}
    for family in trainable:
        for d in family:
            optimizers[d.info.key] = torch.optim.Adam(
                d.module.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
    val_follows = _follows(slots)
    initial = _val_errors(descendants, val_batches, config.chain, val_follows)
    for b, family in enumerate(descendants):
        before = initial[b]
        report.val_mse_before.append(before)
        report.val_mse_after.append(list(before))
        report.best_epoch.append([0] * len(family))
        report.history.append([[] for _ in family])
        report.epoch_seconds.append([[] for _ in family])
        for i, d in enumerate(family):
            states[d.info.key] = (before[i], copy.deepcopy(d.module.state_dict()))

    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    train_start = time.perf_counter()
    excluded = 0.0
    with progress_bar(
        "retrain blocks", config.epochs * steps_per_epoch, enabled=progress
    ) as advance:
        for epoch in range(1, config.epochs + 1):
            for family in trainable:
                for d in family:
                    d.module.train()
            running = 0.0
            spent = dict.fromkeys(optimizers, 0.0)
            for step, batch in enumerate(batches(train_idx, True, epoch), start=1):
                pairs = pairs_for(batch)
                chained = round(len(batch) * config.chain)
                follows = _follows(slots)
                loss_sum = 0.0
                upstream: dict[int, torch.Tensor] = {}  # level -> previous block's output
                for b, family in enumerate(descendants):
                    x, y = pairs[b]
                    outputs: dict[int, torch.Tensor] = {}
                    for level, d in enumerate(family):
                        if not d.info.pruned:
                            continue
                        start = time.perf_counter()
                        inputs = _fed(x, upstream.get(level) if follows[b] else None, chained)
                        opt = optimizers[d.info.key]
                        opt.zero_grad(set_to_none=True)
                        out = d.module(inputs)
                        loss = nn.functional.mse_loss(out, y)
                        loss.backward()
                        opt.step()
                        if chained:
                            outputs[level] = out.detach()
                        loss_sum += loss.item()
                        spent[d.info.key] += time.perf_counter() - start
                    upstream = outputs
                running += loss_sum
                advance(epoch=epoch, mse=running / step / max(1, sum(map(len, trainable))))
            current = _val_errors(
                descendants, val_batches, config.chain, val_follows, pruned_only=True
            )
            for b, family in enumerate(descendants):
                for i, d in enumerate(family):
                    if d.info.pruned:
                        report.epoch_seconds[b][i].append(spent[d.info.key])
                    if not d.info.pruned or not val_batches:
                        continue  # without validation data the last state is kept
                    mse = current[b][i]
                    report.history[b][i].append(mse)
                    if mse < states[d.info.key][0]:
                        states[d.info.key] = (mse, copy.deepcopy(d.module.state_dict()))
                        report.val_mse_after[b][i] = mse
                        report.best_epoch[b][i] = epoch
            if on_epoch is not None:
                paused = time.perf_counter()
                on_epoch(epoch, paused - train_start - excluded)
                excluded += time.perf_counter() - paused
    report.train_seconds = time.perf_counter() - train_start - excluded
    for family in descendants:
        for d in family:
            if val_batches:
                d.module.load_state_dict(states[d.info.key][1])
            d.module.eval()
    return report
