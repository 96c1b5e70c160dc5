"""The runtime: a live composed model that follows a changing budget by swapping only changed blocks.

:class:`Runtime` holds one selection of a bank running on a target the bank was profiled on. A
budget change re-selects (:meth:`Bank.select`) and swaps in the descendants of the blocks whose
choice changed; the other blocks' loaded modules (and, on ONNX Runtime, their exported models) are
reused. Every switch returns a :class:`SwitchReport`: blocks changed, bytes loaded, seconds.

Loading is lazy: a descendant is read from the bank only when a switch needs it and the cache does
not hold it. :meth:`Bank.load_descendant` reads the whole weight file and checks its sha256 before
parsing it (it does not memory-map: the check reads every byte anyway, and a mapping made after the
check could see a file changed since). The cache is an LRU bounded in bytes (each descendant
counted at its file size); live descendants are never evicted. The teacher's own blocks (sparsity
0) stay resident with the frame, which holds them, so switching to one never loads.

Switching is safe while other threads call the runtime: a switch builds the new model aside, then
publishes it by replacing one reference (under the switch lock, which serialises switches); a call
reads that reference once, so it runs wholly on the old model or wholly on the new one.

On ONNX Runtime the default design, ``adaptive``, makes a switch cost what changed: it publishes a
chain of per-block sessions in which only the changed blocks' sessions are new (the others are the
previous chain's), then a background thread merges the selection into one session, which runs
faster, and publishes that in its place unless a newer switch came first (:meth:`Runtime.settle`
waits for it). The live chain's sessions are kept beside the merged one for the next switch.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol, get_args

import numpy as np
import onnx
import torch
from torch import nn

from .bank import Bank
from .errors import BankError, ConfigError, InputShapeError
from .export import OnnxExport, export_frame, export_onnx
from .extract import Decomposition, compose
from .multi import JointSelector, Member, SwitchCost, select_switching
from .ort import ChainedSession, MergedSession
from .targets import Target
from .types import Budget, Selection

Key = tuple[int, int]  # (block, descendant index)
_Run = Callable[[torch.Tensor], torch.Tensor]
RuntimeDesign = Literal["adaptive", "merged", "chained"]
_DESIGNS: tuple[str, ...] = get_args(RuntimeDesign)


@dataclass(frozen=True)
class RuntimeConfig:
    """How a runtime keeps descendants and runs them.

    ``cache_bytes`` bounds the bytes of loaded descendants kept beyond the live ones (0: keep only
    what is live); ``design`` is how ONNX Runtime targets run a selection (see
    :mod:`blockscale.ort`): ``merged`` builds one session of the whole selection at every switch
    (fastest to run, a switch costs a whole model's session); ``chained`` builds only the changed
    blocks' sessions into a new chain (cheapest switch, each call about 1.5x slower, one call at a
    time as its buffers are shared); ``adaptive`` switches as ``chained`` and then merges in the
    background. ``history`` is how many switch reports are kept.

    ``switch_cost`` makes :meth:`Runtime.set_budget` switching-aware (see
    :class:`~blockscale.multi.SwitchCost`): a move is charged per changed block and per MiB it
    would load (what the cache or the resident teacher blocks hold loads nothing), and the live
    selection is kept within the hysteresis margin. None: always the most accurate selection.

    ``confidence`` (e.g. 0.95) selects under the latency margin that validation measured, so a
    pick meets its budget as measured that often (:meth:`Bank.select`); None: the estimate as is.
    """

    cache_bytes: int = 64 * 2**20
    design: RuntimeDesign = "adaptive"
    history: int = 1000
    switch_cost: SwitchCost | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.cache_bytes < 0:
            raise ConfigError(f"RuntimeConfig.cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.design not in _DESIGNS:
            raise ConfigError(
                f"unknown ONNX Runtime design {self.design!r}", hint=f"use one of {_DESIGNS}"
            )
        if self.history < 1:
            raise ConfigError(f"RuntimeConfig.history must be >= 1, got {self.history}")
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise ConfigError(
                f"RuntimeConfig.confidence must lie in (0, 1), got {self.confidence}",
                hint="e.g. 0.95, or None for the plain estimate",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        cost = data.get("switch_cost")
        return cls(
            cache_bytes=int(data["cache_bytes"]),
            design=data["design"],
            history=int(data["history"]),
            switch_cost=None if cost is None else SwitchCost(**cost),
        )


@dataclass(frozen=True)
class SwitchReport:
    """What one switch did: the selection now live (and the budget it answers, None for an explicit
    selection), the blocks whose descendant changed, the bytes read from the bank for descendants
    the cache did not hold, how many changed blocks the cache (or the resident teacher blocks)
    served, and the wall time of the switch (select, load, build, publish)."""

    selection: Selection
    budget: Budget | None
    changed: tuple[int, ...]
    bytes_loaded: int
    cache_hits: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "selection": self.selection.to_dict(),
            "budget": None if self.budget is None else self.budget.to_dict(),
            "changed": list(self.changed),
            "bytes_loaded": self.bytes_loaded,
            "cache_hits": self.cache_hits,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _Live:
    """Everything a call needs, published as one reference: never mutated once built."""

    selection: Selection
    budget: Budget | None
    parts: tuple[Any, ...]  # per block: what the backend builds models from
    run: _Run
    state: Any = None  # what the backend builds the next switch's model from (an ORT chain)
    refined: bool = False  # whether run is the background refiner's faster model


class _Backend(Protocol):
    """What differs between targets: the form a descendant takes, where it is read from, and how a
    model is built."""

    def load(self, key: Key) -> Any:
        """Descendant ``key``, read from storage, in the form :meth:`build` takes."""
        ...

    def file_bytes(self, key: Key) -> int:
        """What reading descendant ``key`` costs, in bytes."""
        ...

    def resident(self, key: Key, module: nn.Module) -> Any:
        """Descendant ``key``, already in memory as ``module``, in the form :meth:`build` takes."""
        ...

    def build(
        self, parts: Sequence[Any], changed: Sequence[int], previous: Any
    ) -> tuple[_Run, Any]:
        """A call running the frame with ``parts`` in its slots, and the state the next build
        starts from; ``previous`` is the live model's state (None at first), which differs from
        ``parts`` in the ``changed`` blocks."""
        ...

    def refine(self, parts: Sequence[Any]) -> _Run | None:
        """A faster call for ``parts`` to publish in place of :meth:`build`'s later (run in the
        background), or None where there is none."""
        ...


class _TorchBackend:
    """Torch eager: the composed module (the frame is shared, blocks are the loaded modules)."""

    def __init__(self, bank: Bank, decomposition: Decomposition) -> None:
        self.bank = bank
        self.decomposition = decomposition

    def load(self, key: Key) -> nn.Module:
        return self.bank.load_descendant(*key)

    def file_bytes(self, key: Key) -> int:
        return self.bank.file_bytes(*key)

    def resident(self, key: Key, module: nn.Module) -> nn.Module:
        return module

    def build(
        self, parts: Sequence[Any], changed: Sequence[int], previous: Any
    ) -> tuple[_Run, Any]:
        module = compose(self.decomposition, parts).eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return run, None

    def refine(self, parts: Sequence[Any]) -> _Run | None:
        return None


class _OrtBackend:
    """ONNX Runtime, in ``design`` (a live session is never swapped in place: a switch builds a new
    one, sharing the unchanged blocks' sessions where the design chains them). The frame and the
    descendants come from an ONNX export of the bank when one is given (read, never exported
    again), else each is exported from torch once, when first loaded."""

    def __init__(
        self,
        bank: Bank,
        decomposition: Decomposition,
        design: RuntimeDesign,
        threads: int,
        export: OnnxExport | None,
    ) -> None:
        self.bank = bank
        self.plan = decomposition.plan
        self.export = export
        self.frame = export.frame if export is not None else export_frame(decomposition)
        self.design = design
        self.threads = threads

    def load(self, key: Key) -> onnx.ModelProto:
        if self.export is not None:
            return self.export.descendant(*key)
        return self._exported(key, self.bank.load_descendant(*key))

    def file_bytes(self, key: Key) -> int:
        return (self.export or self.bank).file_bytes(*key)

    def resident(self, key: Key, module: nn.Module) -> onnx.ModelProto:
        return self.export.descendant(*key) if self.export else self._exported(key, module)

    def _exported(self, key: Key, module: nn.Module) -> onnx.ModelProto:
        example = (torch.zeros(1, *self.plan.blocks[key[0]].input_shape),)
        return export_onnx(module, example, name=f"{self.plan.model} block {key[0]}")

    def build(
        self, parts: Sequence[Any], changed: Sequence[int], previous: Any
    ) -> tuple[_Run, Any]:
        if self.design == "merged":
            return _numpy_call(MergedSession(self.frame, parts, threads=self.threads)), None
        if previous is None:
            chain = ChainedSession(self.frame, parts, threads=self.threads)
        else:
            chain = previous.swapped({b: parts[b] for b in changed})
        # a chain's IO buffers are shared by its calls: one call at a time
        return _numpy_call(_serialised(chain)), chain

    def refine(self, parts: Sequence[Any]) -> _Run | None:
        if self.design != "adaptive":
            return None
        return _numpy_call(MergedSession(self.frame, parts, threads=self.threads))


def _numpy_call(fn: Callable[[np.ndarray], np.ndarray]) -> _Run:
    """``fn`` of float32 arrays as a call of tensors."""

    def run(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(fn(array))

    return run


def _serialised(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` behind a lock, so that concurrent callers take turns."""
    lock = threading.Lock()

    def call(array: np.ndarray) -> np.ndarray:
        with lock:
            return fn(array)

    return call


class _Cache:
    """Loaded descendants by (block, index), least recently used first, each sized in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Key, tuple[Any, int]] = OrderedDict()

    def get(self, key: Key) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Key, part: Any, size: int) -> None:
        self._entries[key] = (part, size)

    def trim(self, live: set[Key]) -> None:
        """Evict the least recently used entries that are not live until the others fit."""
        spare = sum(size for key, (_, size) in self._entries.items() if key not in live)
        for key in [k for k in self._entries if k not in live]:
            if spare <= self.capacity:
                break
            spare -= self._entries.pop(key)[1]

    def keys(self) -> tuple[Key, ...]:
        return tuple(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def _matching_export(
    bank: Bank, export: str | os.PathLike | OnnxExport | None
) -> OnnxExport | None:
    """``export`` opened, checked to be of ``bank`` (its model, blocks and descendants)."""
    if export is None:
        return None
    opened = export if isinstance(export, OnnxExport) else OnnxExport(export)
    sizes = tuple(len(family) for family in bank.descendants)
    if opened.model != bank.plan.model or opened.sizes != sizes:
        raise ConfigError(
            f"the ONNX export at {opened.path} is of {opened.model} with {list(opened.sizes)} "
            f"descendants per block, not of this bank ({bank.plan.model}, {list(sizes)})",
            hint=f"export this bank: blockscale export {bank.path} --out DIR",
        )
    return opened


def _cost_per_accuracy(bank: Bank, summed: float, step: float = 1e-4) -> float:
    """How much summed cost one unit of estimated accuracy is worth near ``summed``: the inverse
    slope of :meth:`Bank.accuracy_of` there (1 where the accuracy is flat, e.g. clipped at 0)."""
    high, low = bank.accuracy_of(np.array([summed, summed + step]))
    slope = (high - low) / step
    return 1.0 / slope if slope > 0 else 1.0


class Runtime:
    """A bank's selection running live on ``target``, switched by :meth:`set_budget` or
    :meth:`set_selection` while other threads call it.

    ``target`` must be one the bank was profiled on (default: its first). It starts at the most
    accurate selection within ``budget`` (default: no limits). ``frame`` is needed only for a bank
    whose frame is Python code (see :meth:`Bank.load_frame`). Torch's intra-op thread count is
    process-wide and left to the caller; ONNX Runtime sessions use the target's threads.

    ``onnx_export``, an ONNX export of this bank (``blockscale export BANK --out DIR``, or an
    :class:`~blockscale.export.OnnxExport`), lets an ONNX Runtime target read each descendant's
    checked ONNX file when a switch needs it instead of exporting it from torch then, which is
    most of a small switch's time; bytes loaded are then those files' sizes.
    """

    def __init__(
        self,
        bank: Bank,
        target: str | Target | None = None,
        config: RuntimeConfig | None = None,
        *,
        frame: nn.Module | None = None,
        budget: Budget | None = None,
        onnx_export: str | os.PathLike | OnnxExport | None = None,
    ) -> None:
        name = bank.target(target.name if isinstance(target, Target) else target)
        self.bank = bank
        self.target = Target.parse(name)
        self.config = config or RuntimeConfig()
        if self.target.backend == "tflite":
            raise ConfigError(
                "the runtime runs torch and onnxruntime targets, not tflite",
                hint="profile the bank on ort-Nt or torch-Nt and run the runtime there",
            )
        if self.target.backend == "onnxruntime-int8":
            raise ConfigError(
                f"{self.target.name} profiles latency only; the runtime serves float models",
                hint=f"serve on ort-{self.target.threads}t (profile the bank there if needed)",
            )
        budget = budget or Budget()
        first = bank.select(budget, name)  # an infeasible budget fails before anything loads
        decomposition = bank.decomposition(frame)
        if self.target.backend == "torch":
            if onnx_export is not None:
                raise ConfigError(
                    f"an ONNX export runs on onnxruntime targets, not {self.target.name}",
                    hint="drop onnx_export=, or run on ort-Nt",
                )
            self._backend: _Backend = _TorchBackend(bank, decomposition)
        else:
            self._backend = _OrtBackend(
                bank,
                decomposition,
                self.config.design,
                self.target.threads,
                _matching_export(bank, onnx_export),
            )
        # what reading each descendant costs, asked once: every decision under a switch cost needs
        # them all, and an ONNX export looks each one up in its index
        self._file_bytes = {
            (b, d): self._backend.file_bytes((b, d))
            for b, family in enumerate(bank.descendants)
            for d in range(len(family))
        }
        # the teacher's own blocks, held by the frame anyway: parts made from them on first use
        self._teacher = {
            (b, info.index): module
            for b, (family, module) in enumerate(
                zip(bank.descendants, decomposition.blocks, strict=True)
            )
            for info in family
            if info.sparsity == 0
        }
        self._resident: dict[Key, Any] = {}
        self._cache = _Cache(self.config.cache_bytes)
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when the refiner stops
        self._history: deque[SwitchReport] = deque(maxlen=self.config.history)
        self._live: _Live | None = None
        self._pending: _Live | None = None  # the live model the refiner is to improve next
        self._refining = False  # whether the refiner thread runs
        self._refine_seconds = 0.0
        self._refine_error: BaseException | None = None
        with self._lock:
            self._switch(time.perf_counter(), first, budget)

    # -- calling -------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The live model's output for ``x`` (a batch of the bank's input shape)."""
        live = self._live  # read once: this call runs wholly on this model
        assert live is not None
        shape = self.bank.plan.input_shape
        if not isinstance(x, torch.Tensor) or x.dim() != len(shape) + 1 or x.shape[1:] != shape:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(
                f"the runtime takes a batch of shape (N, {', '.join(map(str, shape))}), got {got}",
                hint="pass a float tensor with a batch dimension, e.g. x.unsqueeze(0) for one sample",
            )
        return live.run(x)

    # -- switching -----------------------------------------------------------------------------

    def set_budget(self, budget: Budget) -> SwitchReport:
        """Switch to the most accurate selection within ``budget`` (with ``config.switch_cost``,
        the best trade of accuracy against what the switch costs); an infeasible budget raises
        :class:`~blockscale.errors.InfeasibleBudgetError` and leaves the live model as it is."""
        with self._lock:
            start = time.perf_counter()
            return self._switch(start, self._choose(budget), budget)

    def _choose(self, budget: Budget) -> Selection:
        """The selection ``budget`` calls for, given the live one (lock held)."""
        cost = self.config.switch_cost
        assert self._live is not None
        if cost is None:
            return self.bank.select(budget, self.target.name, self.config.confidence)
        table = self.bank.cost_table(self.target.name, self.config.confidence)
        live = self._live.selection.choices
        # the charges are in accuracy; the table's costs may be log-odds or corrected: convert at
        # the live selection's accuracy (exact for a bank whose costs are points)
        scale = _cost_per_accuracy(
            self.bank, table.teacher_accuracy - table.estimate(live).accuracy
        )
        charged = SwitchCost(cost.per_block * scale, cost.per_mb * scale, cost.hysteresis * scale)
        loads = [
            [self.load_bytes((b, d)) for d in range(len(family))]
            for b, family in enumerate(self.bank.descendants)
        ]
        picked = select_switching(table, budget, live, charged, loads)
        return self.bank.estimate(picked.choices, self.target.name)

    def holds(self, key: Key) -> bool:
        """Whether switching to ``key`` would load nothing (resident or cached)."""
        return key in self._teacher or key in self._cache

    def load_bytes(self, key: Key) -> int:
        """What switching to descendant ``key`` would read, in bytes: its file on the runtime's
        storage (the bank, or its ONNX export), or 0 when it is held."""
        return 0 if self.holds(key) else self._file_bytes[key]

    def set_selection(self, choices: Sequence[int]) -> SwitchReport:
        """Switch to descendant ``choices[b]`` in each block ``b`` (no budget)."""
        picks = tuple(int(c) for c in choices)
        sizes = [len(family) for family in self.bank.descendants]
        if len(picks) != len(sizes) or not all(
            0 <= c < k for c, k in zip(picks, sizes, strict=True)
        ):
            raise BankError(
                f"the selection {picks} does not name one descendant per block of the bank",
                hint=f"pass one index per block; the blocks have {sizes} descendants",
            )
        with self._lock:
            start = time.perf_counter()
            return self._switch(start, self.bank.estimate(picks, self.target.name), None)

    def _switch(self, start: float, selection: Selection, budget: Budget | None) -> SwitchReport:
        """Load the changed blocks, build the new model aside and publish it (lock held)."""
        old = self._live
        choices = selection.choices
        changed = tuple(
            b for b, d in enumerate(choices) if old is None or old.selection.choices[b] != d
        )
        loaded = hits = 0
        parts = list(old.parts) if old is not None else [None] * len(choices)
        try:
            for b in changed:
                parts[b], size = self._fetch((b, choices[b]))
                if size:
                    loaded += size
                else:
                    hits += 1
            if old is not None and not changed:
                self._live = replace(old, selection=selection, budget=budget)
            else:
                run, state = self._backend.build(parts, changed, None if old is None else old.state)
                self._live = _Live(selection, budget, tuple(parts), run, state)
                self._refine_later(self._live)
        finally:
            live = self._live.selection.choices if self._live is not None else ()
            self._cache.trim(set(enumerate(live)))
        report = SwitchReport(selection, budget, changed, loaded, hits, time.perf_counter() - start)
        self._history.append(report)
        return report

    def _refine_later(self, live: _Live) -> None:
        """Have the refiner thread improve ``live`` (lock held), starting it if it is idle; it
        stops when nothing is pending, so an idle runtime holds no thread."""
        if self.config.design != "adaptive" or self.target.backend != "onnxruntime":
            return
        self._pending = live
        if not self._refining:
            self._refining = True
            threading.Thread(target=self._refine, name="blockscale-refine", daemon=True).start()

    def _refine(self) -> None:
        """Refiner thread: build the faster model of the latest live selection outside the lock
        (switches go on meanwhile) and publish it if that selection is still live."""
        while True:
            with self._lock:
                live, self._pending = self._pending, None
                if live is None or self._refine_error is not None:
                    self._refining = False
                    self._settled.notify_all()
                    return
                if live is not self._live:  # superseded before it started
                    continue
            start = time.perf_counter()
            try:
                run = self._backend.refine(live.parts)
            except BaseException as error:  # kept for settle() to raise; the chain serves on
                with self._lock:
                    self._refine_error = error
                continue
            with self._lock:
                self._refine_seconds += time.perf_counter() - start
                if run is not None and self._live is live:
                    self._live = replace(live, run=run, refined=True)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no background refinement is pending or running (``adaptive`` design): then
        the live model is the fastest one for its selection. False if ``timeout`` seconds passed
        first; raises what a refinement raised (the chained model kept serving meanwhile)."""
        with self._settled:
            done = self._settled.wait_for(lambda: not self._refining, timeout)
            if self._refine_error is not None:
                error, self._refine_error = self._refine_error, None
                raise BankError(
                    f"merging the live selection in the background failed: {error}",
                    hint="the chained model serves meanwhile; run with design='chained' to skip "
                    "the merge, or report the bank and the selection",
                ) from error
            return done

    @property
    def refine_seconds(self) -> float:
        """Seconds the background refiner has spent building merged sessions so far (the work a
        switch leaves off its own path)."""
        with self._lock:
            return self._refine_seconds

    def _fetch(self, key: Key) -> tuple[Any, int]:
        """Descendant ``key`` as a part, and the bytes read from the bank for it (0 when the
        cache or the resident teacher blocks held it)."""
        if key in self._teacher:
            if key not in self._resident:
                self._resident[key] = self._backend.resident(key, self._teacher[key])
            return self._resident[key], 0
        part = self._cache.get(key)
        if part is not None:
            return part, 0
        size = self._file_bytes[key]
        part = self._backend.load(key)
        self._cache.put(key, part, size)
        return part, size

    # -- state ---------------------------------------------------------------------------------

    @property
    def selection(self) -> Selection:
        """The live selection."""
        assert self._live is not None
        return self._live.selection

    @property
    def budget(self) -> Budget | None:
        """The budget the live selection answers (None after :meth:`set_selection`)."""
        assert self._live is not None
        return self._live.budget

    @property
    def history(self) -> list[SwitchReport]:
        """The latest switch reports, oldest first; the first is the initial build."""
        with self._lock:
            return list(self._history)

    @property
    def cached(self) -> tuple[Key, ...]:
        """The (block, index) of every descendant the cache holds, least recently used first
        (the resident teacher blocks are not among them)."""
        with self._lock:
            return self._cache.keys()


# -- several models on one device -------------------------------------------------------------


@dataclass(frozen=True)
class ModelSlot:
    """One model of a :class:`MultiRuntime`: its bank and target, its weight in the objective and
    its own limits (see :class:`~blockscale.multi.Member`), and the confidence its latency is
    selected at (see :class:`RuntimeConfig`). ``name`` defaults to the bank's folder name."""

    bank: Bank
    target: str | None = None
    priority: float = 1.0
    min_accuracy: float | None = None
    max_latency_ms: float | None = None
    name: str | None = None
    confidence: float | None = None


@dataclass(frozen=True)
class MultiSwitchReport:
    """What one joint switch did: each model's :class:`SwitchReport` by name (its own switch,
    possibly of no block), the shared budget, and the wall time of the whole switch."""

    budget: Budget
    reports: dict[str, SwitchReport]
    seconds: float

    @property
    def bytes_loaded(self) -> int:
        return sum(r.bytes_loaded for r in self.reports.values())

    @property
    def changed(self) -> dict[str, tuple[int, ...]]:
        return {name: r.changed for name, r in self.reports.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "models": {name: r.to_dict() for name, r in self.reports.items()},
            "bytes_loaded": self.bytes_loaded,
            "seconds": self.seconds,
        }


class MultiRuntime:
    """Several models sharing one device: one budget for their latencies (one frame of each, added
    up) and their memories (added up), split by an exact joint selection that maximises the
    priority-weighted sum of their estimated accuracies (:class:`~blockscale.multi.JointSelector`,
    on each bank's corrected accuracies).

    Each model runs in its own :class:`Runtime` (``multi[name](x)``), switched to its share at
    every :meth:`set_budget`; each model's switch is atomic for its callers, and a joint switch
    applies the models' switches one after another. ``hysteresis`` (in accuracy, summed with the
    priorities) keeps the live selections while they fit and a move would gain at most that much.
    ``config`` is every model's runtime configuration; its ``switch_cost`` is not used here.
    """

    def __init__(
        self,
        slots: Sequence[ModelSlot],
        config: RuntimeConfig | None = None,
        *,
        budget: Budget | None = None,
        hysteresis: float = 0.0,
    ) -> None:
        if not slots:
            raise ConfigError("a MultiRuntime needs at least one model")
        if not (hysteresis >= 0 and np.isfinite(hysteresis)):
            raise ConfigError(f"hysteresis must be finite and >= 0, got {hysteresis}")
        names = [slot.name or slot.bank.path.name for slot in slots]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"the models' names must differ, got {names}",
                hint="give each ModelSlot its own name=",
            )
        self.names = tuple(names)
        self.hysteresis = hysteresis
        self._slots = dict(zip(names, slots, strict=True))
        self._targets = {n: s.bank.target(s.target) for n, s in self._slots.items()}
        self._selector = JointSelector(
            [
                Member(
                    s.bank.cost_table(self._targets[n], s.confidence),
                    priority=s.priority,
                    min_accuracy=s.min_accuracy,
                    max_latency_ms=s.max_latency_ms,
                    name=n,
                    accuracy_of=s.bank.accuracy_of,
                )
                for n, s in self._slots.items()
            ]
        )
        self._lock = threading.Lock()
        self._budget = budget or Budget()
        first = self._joint(self._budget)  # an infeasible budget fails before anything loads
        self._runtimes = {
            n: Runtime(s.bank, self._targets[n], config, budget=None)
            for n, s in self._slots.items()
        }
        for n, choices in first.items():
            self._runtimes[n].set_selection(choices)

    def __getitem__(self, name: str) -> Runtime:
        """The runtime of model ``name``."""
        if name not in self._runtimes:
            raise ConfigError(
                f"no model named {name!r}", hint=f"the models: {', '.join(self.names)}"
            )
        return self._runtimes[name]

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Model ``name``'s output for ``x``."""
        return self[name](x)

    @property
    def selections(self) -> dict[str, Selection]:
        """Each model's live selection."""
        return {n: r.selection for n, r in self._runtimes.items()}

    @property
    def budget(self) -> Budget:
        """The shared budget the live selections answer."""
        return self._budget

    def set_budget(self, budget: Budget) -> MultiSwitchReport:
        """Switch every model to its share of the best joint selection within ``budget``; an
        infeasible budget raises :class:`~blockscale.errors.InfeasibleBudgetError` and changes
        nothing."""
        with self._lock:
            start = time.perf_counter()
            picks = self._joint(budget)
            live = self.selections
            if self._keep(live, picks, budget):
                picks = {n: s.choices for n, s in live.items()}
            reports = {n: self._runtimes[n].set_selection(c) for n, c in picks.items()}
            self._budget = budget
            return MultiSwitchReport(budget, reports, time.perf_counter() - start)

    def settle(self, timeout: float | None = None) -> bool:
        """:meth:`Runtime.settle` for every model (``timeout`` for each); False if any timed out."""
        return all([r.settle(timeout) for r in self._runtimes.values()])

    def _joint(self, budget: Budget) -> dict[str, tuple[int, ...]]:
        chosen = self._selector.select(budget)
        return dict(zip(self.names, (s.choices for s in chosen), strict=True))

    def _keep(
        self, live: dict[str, Selection], picks: dict[str, tuple[int, ...]], budget: Budget
    ) -> bool:
        """Whether the live selections still fit ``budget`` (and each model's own limits) and the
        move gains at most the hysteresis margin."""
        if all(live[n].choices == picks[n] for n in self.names):
            return True
        latency = sum(s.latency_ms for s in live.values())
        memory = sum(s.memory_mb for s in live.values())
        if (budget.latency_ms is not None and latency > budget.latency_ms) or (
            budget.memory_mb is not None and memory > budget.memory_mb
        ):
            return False
        for n, slot in self._slots.items():
            s = live[n]
            if (slot.min_accuracy is not None and s.accuracy < slot.min_accuracy) or (
                slot.max_latency_ms is not None and s.latency_ms > slot.max_latency_ms
            ):
                return False
        new = {n: slot.bank.estimate(picks[n], self._targets[n]) for n, slot in self._slots.items()}
        gain = sum(
            slot.priority * (new[n].accuracy - live[n].accuracy) for n, slot in self._slots.items()
        )
        return gain <= self.hysteresis
