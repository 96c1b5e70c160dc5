"""Replaying a resource trace: block-grained switching against model-level scaling, step by step.

:func:`replay` runs a bank's :class:`~blockscale.runtime.Runtime` through a trace, one
:meth:`~blockscale.runtime.Runtime.set_budget` per step, and on the same trace the model-level
baseline: the uniform selections (sparsity level k in every block, one variant per level), of which
each step takes the most accurate whose estimate fits the budget. Both run on the target for real,
through the same runtime code, so they differ only in what a switch changes: the blocks whose
descendant changed, or every block of the model.

Definitions, the same on both sides:

* Start: the teacher (sparsity 0 in every block), already loaded; the first step's switch counts.
* Bytes loaded: bytes of descendant weight files read from the bank. The frame and the teacher's
  own blocks stay resident in the runtime on both sides and are never read again, so a model-level
  switch to level k > 0 reads the n files of level k, and one to the teacher reads none.
* Caches: the model level keeps none (a switch reloads the whole model); block-grained switching
  uses ``config``, which by default keeps none either, so the comparison is of granularity alone.
* Switching costs: ``config.switch_cost`` (see :class:`~blockscale.multi.SwitchCost`) applies to
  both sides alike, unless the model level is given its own. The runtime trades accuracy against the blocks and MiB a move loads; the
  model level scores each variant that fits as its accuracy less the same charge for the blocks
  it changes and the MiB it reads, and keeps its live variant within the same hysteresis.
* Switch seconds: the wall time a method spends on a step, deciding included: ``set_budget``
  (select, load, build, publish) against choosing the variant and, when it changes,
  ``set_selection`` (load every changed block, build). The median is over the steps that switched.
* Model form on ONNX Runtime: a whole-model variant runs as one merged session, so its switch
  builds one session of the whole model; the block-grained side runs in ``config.design``.
* Background seconds: what the ``adaptive`` design merges after a switch has already published
  its chain (off the switch's path, but work the device does). Each step waits for it to finish
  before the next (steps of a trace are far apart next to a merge), outside its switch seconds.
* Infeasible step: no selection (no variant) meets the budget; the method keeps its live model,
  and the step records ``feasible: false`` and that model.
* Mean accuracy: the estimated accuracy of the live selection, averaged per step (each step counts
  once; generated traces are evenly spaced, so this is also the time-weighted mean) over the steps
  where both methods met the budget, so both are averaged over the same budgets.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from .bank import Bank, json_safe
from .errors import ConfigError, InfeasibleBudgetError, ProfileError, TraceError
from .export import OnnxExport
from .multi import SwitchCost
from .runtime import ModelSlot, MultiRuntime, Runtime, RuntimeConfig
from .traces import Trace
from .types import Budget, Selection

Method = Literal["blockscale", "model_level"]
METHODS: tuple[Method, ...] = ("blockscale", "model_level")
_LEAST = 1e-9  # a budget (ms and MB) below every selection's costs
_WHOLE_MODEL = RuntimeConfig(cache_bytes=0, design="merged")  # how the model level runs


@dataclass(frozen=True)
class Response:
    """What one method did at one step: whether it met the budget, the selection live afterwards
    (the one kept when it did not), the blocks it changed, the bytes it read and its seconds."""

    feasible: bool
    selection: Selection
    changed: tuple[int, ...]
    bytes_loaded: int
    seconds: float
    background_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "feasible": self.feasible,
            **self.selection.to_dict(),
            "changed": list(self.changed),
            "bytes_loaded": self.bytes_loaded,
            "seconds": self.seconds,
            "background_seconds": self.background_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Response:
        return cls(
            feasible=bool(data["feasible"]),
            selection=Selection(
                choices=tuple(int(c) for c in data["choices"]),
                accuracy=float(data["accuracy"]),
                latency_ms=float(data["latency_ms"]),
                memory_mb=float(data["memory_mb"]),
            ),
            changed=tuple(int(b) for b in data["changed"]),
            bytes_loaded=int(data["bytes_loaded"]),
            seconds=float(data["seconds"]),
            background_seconds=float(data.get("background_seconds", 0.0)),
        )


@dataclass(frozen=True)
class ReplayStep:
    """One step of the trace: its time and budget, and each method's response."""

    time_s: float
    budget: Budget
    blockscale: Response
    model_level: Response

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "budget": self.budget.to_dict(),
            "blockscale": self.blockscale.to_dict(),
            "model_level": self.model_level.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayStep:
        return cls(
            time_s=float(data["time_s"]),
            budget=Budget(**data["budget"]),
            blockscale=Response.from_dict(data["blockscale"]),
            model_level=Response.from_dict(data["model_level"]),
        )


@dataclass(frozen=True)
class ReplaySummary:
    """One method over a whole trace (see the module docstring for the definitions); NaN where
    there is nothing to take a median or mean of."""

    steps: int
    infeasible_steps: int
    switches: int
    blocks_changed: int
    bytes_loaded: int
    switch_seconds: float
    median_switch_seconds: float
    mean_accuracy: float
    background_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "steps": self.steps,
                "infeasible_steps": self.infeasible_steps,
                "switches": self.switches,
                "blocks_changed": self.blocks_changed,
                "bytes_loaded": self.bytes_loaded,
                "switch_seconds": self.switch_seconds,
                "median_switch_seconds": self.median_switch_seconds,
                "mean_accuracy": self.mean_accuracy,
                "background_seconds": self.background_seconds,
            }
        )


@dataclass(frozen=True)
class ReplayResult:
    """A bank replayed through a trace on ``target``: every step, both methods."""

    bank: str
    model: str
    target: str
    config: RuntimeConfig
    steps: tuple[ReplayStep, ...]

    def responses(self, method: Method) -> tuple[Response, ...]:
        """``method``'s response at each step."""
        return tuple(getattr(step, method) for step in self.steps)

    def summary(self, method: Method) -> ReplaySummary:
        """``method``'s totals over the trace."""
        responses = self.responses(method)
        both = [s for s in self.steps if s.blockscale.feasible and s.model_level.feasible]
        switched = [r.seconds for r in responses if r.changed]
        accuracies = [getattr(s, method).selection.accuracy for s in both]
        return ReplaySummary(
            steps=len(responses),
            infeasible_steps=sum(not r.feasible for r in responses),
            switches=len(switched),
            blocks_changed=sum(len(r.changed) for r in responses),
            bytes_loaded=sum(r.bytes_loaded for r in responses),
            switch_seconds=sum(r.seconds for r in responses),
            median_switch_seconds=statistics.median(switched) if switched else math.nan,
            mean_accuracy=statistics.fmean(accuracies) if accuracies else math.nan,
            background_seconds=sum(r.background_seconds for r in responses),
        )

    def comparison(self) -> dict[str, float]:
        """Block-grained switching against the model level: ratios (blockscale / model level),
        over the trace and per switch, the percentage of bytes saved, and the mean accuracy gained
        in points."""
        return _compare(self.summary("blockscale"), self.summary("model_level"))

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "bank": self.bank,
                "model": self.model,
                "target": self.target,
                "config": self.config.to_dict(),
                "summary": {
                    **{m: self.summary(m).to_dict() for m in METHODS},
                    "comparison": self.comparison(),
                },
                "steps": [s.to_dict() for s in self.steps],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayResult:
        """A result from :meth:`to_dict`'s form (the summary is recomputed, not read)."""
        return cls(
            bank=str(data["bank"]),
            model=str(data["model"]),
            target=str(data["target"]),
            config=RuntimeConfig.from_dict(data["config"]),
            steps=tuple(ReplayStep.from_dict(s) for s in data["steps"]),
        )


def _compare(ours: ReplaySummary, theirs: ReplaySummary) -> dict[str, float]:
    """Ratios of ``ours`` to ``theirs`` (bytes, per switch, seconds), bytes saved in percent and
    the mean accuracy gained in points."""
    bytes_ratio = _ratio(ours.bytes_loaded, theirs.bytes_loaded)
    return {
        "bytes_ratio": bytes_ratio,
        "bytes_fewer_percent": 100.0 * (1.0 - bytes_ratio),
        "bytes_per_switch_ratio": _ratio(
            _ratio(ours.bytes_loaded, ours.switches),
            _ratio(theirs.bytes_loaded, theirs.switches),
        ),
        "switch_seconds_ratio": _ratio(ours.switch_seconds, theirs.switch_seconds),
        "median_switch_seconds_ratio": _ratio(
            ours.median_switch_seconds, theirs.median_switch_seconds
        ),
        "seconds_with_background_ratio": _ratio(
            ours.switch_seconds + ours.background_seconds,
            theirs.switch_seconds + theirs.background_seconds,
        ),
        "accuracy_gain_points": 100.0 * (ours.mean_accuracy - theirs.mean_accuracy),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def budget_range(bank: Bank | Sequence[Bank], target: str | None = None) -> tuple[Budget, Budget]:
    """The span of budgets worth tracing on ``target``: the least latency and the least memory any
    selection needs (below either nothing fits), and the teacher's latency and memory. For several
    banks sharing a budget, their spans added up (each on ``target``, or its first target)."""
    if not isinstance(bank, Bank):
        spans = [budget_range(b, target) for b in bank]
        if not spans:
            raise ConfigError("budget_range needs at least one bank")
        return tuple(  # type: ignore[return-value]
            Budget(
                latency_ms=sum(s[i].latency_ms for s in spans),
                memory_mb=sum(s[i].memory_mb for s in spans),
            )
            for i in (0, 1)
        )
    name = bank.target(target)
    teacher = bank.estimate(_uniform(bank, 0), name)
    try:
        bank.select(Budget(latency_ms=_LEAST, memory_mb=_LEAST), name)
    except InfeasibleBudgetError as exc:  # it carries the least latency and memory of any selection
        assert exc.min_latency_ms is not None and exc.min_memory_mb is not None
        least = Budget(latency_ms=exc.min_latency_ms, memory_mb=exc.min_memory_mb)
        return least, Budget(latency_ms=teacher.latency_ms, memory_mb=teacher.memory_mb)
    raise ProfileError(
        f"the bank's profiles on {name} give a selection that costs no time and no memory",
        hint="profile the bank again: blockscale profile BANK --target " + name,
    )


def _uniform(bank: Bank, level: int) -> tuple[int, ...]:
    """The selection with descendant ``level`` (sparsity level) in every block."""
    return (level,) * bank.plan.num_blocks


def replay(
    bank: Bank,
    trace: Trace,
    target: str | None = None,
    config: RuntimeConfig | None = None,
    *,
    model: str | None = None,
    model_level_cost: SwitchCost | Literal["same"] = "same",
    onnx_export: str | os.PathLike | None = None,
) -> ReplayResult:
    """Run ``bank`` through ``trace`` on ``target`` (default: its first), switching blocks, and run
    the model-level baseline through it too; see the module docstring for what is measured.

    ``config`` is the block-grained runtime's (default: no cache beyond the live descendants). A
    trace with budgets per model is read at ``model`` (default: the bank's folder name). The model
    level switches under ``config.switch_cost`` too, unless ``model_level_cost`` gives its own
    (``SwitchCost()``: it takes the most accurate variant that fits at every step, as the paper's
    baseline does). ``onnx_export`` (an ONNX export of the bank) is where both sides read
    descendants on an ONNX Runtime target (see :class:`~blockscale.runtime.Runtime`).
    """
    name = bank.target(target)
    budgets = trace.budgets(model or bank.path.name)
    config = config or RuntimeConfig(cache_bytes=0)
    teacher = _uniform(bank, 0)
    levels = min(len(family) for family in bank.descendants)
    # most accurate first; ties to lower latency, lower memory, then the lower level
    variants = sorted(
        (bank.estimate(_uniform(bank, k), name) for k in range(levels)),
        key=lambda v: (-v.accuracy, v.latency_ms, v.memory_mb, v.choices),
    )
    export = None if onnx_export is None else OnnxExport(onnx_export)  # read once for both
    by_block = Runtime(bank, name, config, onnx_export=export)
    by_model = Runtime(bank, name, _WHOLE_MODEL, onnx_export=export)
    for runtime in (by_block, by_model):
        runtime.set_selection(teacher)
        runtime.settle()
    cost = (config.switch_cost or SwitchCost()) if model_level_cost == "same" else model_level_cost
    steps = tuple(
        ReplayStep(
            time_s=step.time_s,
            budget=budget,
            blockscale=_follow(by_block, budget),
            model_level=_follow_variants(by_model, variants, budget, cost),
        )
        for step, budget in zip(trace.steps, budgets, strict=True)
    )
    return ReplayResult(str(bank.path), bank.plan.model, name, config, steps)


def _follow(runtime: Runtime, budget: Budget) -> Response:
    """Block-grained: the runtime switches to the best selection within ``budget``."""
    start = time.perf_counter()
    try:
        report = runtime.set_budget(budget)
    except InfeasibleBudgetError:
        return Response(False, runtime.selection, (), 0, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return Response(
        True, report.selection, report.changed, report.bytes_loaded, seconds, _settle(runtime)
    )


def _settle(runtime: Runtime) -> float:
    """Wait for ``runtime``'s background merge; the seconds it spent on it."""
    before = runtime.refine_seconds
    runtime.settle()
    return runtime.refine_seconds - before


def _follow_variants(
    runtime: Runtime, variants: Sequence[Selection], budget: Budget, cost: SwitchCost
) -> Response:
    """Model level: the runtime switches to the variant within ``budget`` that scores best, its
    accuracy less ``cost``'s charge for the switch, or keeps its own within the hysteresis."""
    start = time.perf_counter()
    live = runtime.selection
    # most accurate first, so that max keeps the more accurate of equal scores
    scores = {
        v.choices: v.accuracy - _charge(runtime, live, v, cost)
        for v in variants
        if _fits_all((v,), budget)
    }
    if not scores:
        return Response(False, runtime.selection, (), 0, time.perf_counter() - start)
    chosen = max((v for v in variants if v.choices in scores), key=lambda v: scores[v.choices])
    if _fits_all((live,), budget) and scores[chosen.choices] - live.accuracy <= cost.hysteresis:
        chosen = live
    if chosen.choices == runtime.selection.choices:
        return Response(True, chosen, (), 0, time.perf_counter() - start)
    report = runtime.set_selection(chosen.choices)
    seconds = time.perf_counter() - start
    return Response(True, report.selection, report.changed, report.bytes_loaded, seconds)


def _charge(runtime: Runtime, live: Selection, variant: Selection, cost: SwitchCost) -> float:
    """What moving from ``live`` to ``variant`` costs under ``cost``, in accuracy: per changed
    block, and per MiB of the changed blocks that are not the resident teacher's."""
    changed = [(b, d) for b, d in enumerate(variant.choices) if live.choices[b] != d]
    loads = sum(runtime.load_bytes(key) for key in changed)
    return cost.per_block * len(changed) + cost.per_mb * loads / 2**20


# -- several models sharing one budget -----------------------------------------------------------


@dataclass(frozen=True)
class JointStep:
    """One step of a shared-budget trace: each method's response per model, by name."""

    time_s: float
    budget: Budget
    blockscale: dict[str, Response]
    model_level: dict[str, Response]

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "budget": self.budget.to_dict(),
            **{m: {n: r.to_dict() for n, r in getattr(self, m).items()} for m in METHODS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JointStep:
        return cls(
            time_s=float(data["time_s"]),
            budget=Budget(**data["budget"]),
            **{m: {n: Response.from_dict(r) for n, r in data[m].items()} for m in METHODS},
        )


@dataclass(frozen=True)
class JointReplayResult:
    """Several banks replayed through one shared budget: ``priorities`` by model name, every step.

    The summary of a method adds its models' switches (a step where any model changed counts
    once), blocks, bytes and seconds; its mean accuracy is the priority-weighted mean of the
    models' estimated accuracies, averaged over the steps both methods met.
    """

    banks: dict[str, str]
    targets: dict[str, str]
    priorities: dict[str, float]
    config: RuntimeConfig
    hysteresis: float
    steps: tuple[JointStep, ...]

    def combined(self) -> ReplayResult:
        """The models taken together as one: per step and method, their choices side by side,
        latencies, memories, changed blocks (numbered across the models), bytes and seconds
        added up, and the priority-weighted mean of their accuracies. Its summary is this
        replay's summary, and :func:`plot_replay` draws it."""
        names = list(self.banks)
        total = sum(self.priorities.values()) or 1.0
        widths = [len(self.steps[0].blockscale[n].selection.choices) for n in names]
        offsets = dict(zip(names, itertools.accumulate([0, *widths[:-1]]), strict=True))

        def merge(responses: dict[str, Response]) -> Response:
            rs = [responses[n] for n in names]
            return Response(
                feasible=all(r.feasible for r in rs),
                selection=Selection(
                    choices=tuple(c for r in rs for c in r.selection.choices),
                    accuracy=sum(
                        self.priorities[n] * responses[n].selection.accuracy for n in names
                    )
                    / total,
                    latency_ms=sum(r.selection.latency_ms for r in rs),
                    memory_mb=sum(r.selection.memory_mb for r in rs),
                ),
                changed=tuple(offsets[n] + b for n in names for b in responses[n].changed),
                bytes_loaded=sum(r.bytes_loaded for r in rs),
                seconds=sum(r.seconds for r in rs),
                background_seconds=sum(r.background_seconds for r in rs),
            )

        return ReplayResult(
            bank=", ".join(self.banks.values()),
            model=" + ".join(names),
            target=", ".join(dict.fromkeys(self.targets.values())),
            config=self.config,
            steps=tuple(
                ReplayStep(s.time_s, s.budget, merge(s.blockscale), merge(s.model_level))
                for s in self.steps
            ),
        )

    def summary(self, method: Method) -> ReplaySummary:
        """``method``'s totals over the trace, all models together (see :meth:`combined`)."""
        return self.combined().summary(method)

    def comparison(self) -> dict[str, float]:
        """As :meth:`ReplayResult.comparison`, over all the models together."""
        return self.combined().comparison()

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "banks": self.banks,
                "targets": self.targets,
                "priorities": self.priorities,
                "config": self.config.to_dict(),
                "hysteresis": self.hysteresis,
                "summary": {
                    **{m: self.summary(m).to_dict() for m in METHODS},
                    "comparison": self.comparison(),
                },
                "steps": [s.to_dict() for s in self.steps],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JointReplayResult:
        return cls(
            banks=dict(data["banks"]),
            targets=dict(data["targets"]),
            priorities={n: float(p) for n, p in data["priorities"].items()},
            config=RuntimeConfig.from_dict(data["config"]),
            hysteresis=float(data["hysteresis"]),
            steps=tuple(JointStep.from_dict(s) for s in data["steps"]),
        )


def replay_joint(
    slots: Sequence[ModelSlot],
    trace: Trace,
    config: RuntimeConfig | None = None,
    *,
    hysteresis: float = 0.0,
) -> JointReplayResult:
    """Run several models through a trace of shared budgets: a :class:`MultiRuntime` (exact joint
    selection, swapping blocks) against the model level, where each step takes the combination of
    whole-model variants (one per sparsity level and model) with the largest priority-weighted
    accuracy whose latencies and memories add up within the budget, reloading a model that
    changes; both with the same ``hysteresis``. The definitions are the module docstring's."""
    if trace.models is not None:
        raise TraceError(
            "a joint replay takes one shared budget per step; this trace gives one per model",
            hint="replay each bank on its own (blockscale replay BANK --trace ...), or write a "
            "trace with one latency_ms/memory_mb per step",
        )
    config = config or RuntimeConfig(cache_bytes=0)
    by_block = MultiRuntime(slots, config, hysteresis=hysteresis)
    names = by_block.names
    for n in names:
        by_block[n].settle()
    slot = dict(zip(names, slots, strict=True))
    by_model = {n: Runtime(s.bank, by_block[n].target.name, _WHOLE_MODEL) for n, s in slot.items()}
    options = {
        n: [
            s.bank.estimate(_uniform(s.bank, k), by_model[n].target.name)
            for k in range(min(len(f) for f in s.bank.descendants))
        ]
        for n, s in slot.items()
    }
    combos = list(itertools.product(*(options[n] for n in names)))
    priorities = {n: s.priority for n, s in slot.items()}
    steps = []
    for step in trace.steps:
        budget = step.budget()
        steps.append(
            JointStep(
                step.time_s,
                budget,
                _follow_joint(by_block, budget),
                _follow_variant_combos(by_model, combos, priorities, budget, hysteresis),
            )
        )
    return JointReplayResult(
        banks={n: str(s.bank.path) for n, s in slot.items()},
        targets={n: by_block[n].target.name for n in names},
        priorities=priorities,
        config=config,
        hysteresis=hysteresis,
        steps=tuple(steps),
    )


def _follow_joint(multi: MultiRuntime, budget: Budget) -> dict[str, Response]:
    """Blocks: the multi-runtime switches every model to its share of the joint optimum."""
    start = time.perf_counter()
    try:
        report = multi.set_budget(budget)
    except InfeasibleBudgetError:
        seconds = (time.perf_counter() - start) / len(multi.names)
        return {n: Response(False, s, (), 0, seconds) for n, s in multi.selections.items()}
    # the joint selection's share of the time, spread over the models like the model level's
    deciding = (report.seconds - sum(r.seconds for r in report.reports.values())) / len(multi.names)
    background = {n: _settle(multi[n]) for n in multi.names}
    return {
        n: Response(
            True, r.selection, r.changed, r.bytes_loaded, deciding + r.seconds, background[n]
        )
        for n, r in report.reports.items()
    }


def _follow_variant_combos(
    runtimes: dict[str, Runtime],
    combos: Sequence[tuple[Selection, ...]],
    priorities: dict[str, float],
    budget: Budget,
    hysteresis: float,
) -> dict[str, Response]:
    """Model level: the best combination of whole-model variants within ``budget``."""
    start = time.perf_counter()
    names = list(runtimes)
    live = tuple(runtimes[n].selection for n in names)

    def value(combo: Sequence[Selection]) -> float:
        return sum(priorities[n] * s.accuracy for n, s in zip(names, combo, strict=True))

    fitting = [c for c in combos if _fits_all(c, budget)]
    if not fitting:
        seconds = (time.perf_counter() - start) / len(names)
        return {n: Response(False, s, (), 0, seconds) for n, s in zip(names, live, strict=True)}
    chosen = max(fitting, key=value)
    if _fits_all(live, budget) and value(chosen) - value(live) <= hysteresis:
        chosen = live
    decided = (time.perf_counter() - start) / len(names)
    out = {}
    for n, s in zip(names, chosen, strict=True):
        if s.choices == runtimes[n].selection.choices:
            out[n] = Response(True, s, (), 0, decided)
        else:
            r = runtimes[n].set_selection(s.choices)
            out[n] = Response(True, r.selection, r.changed, r.bytes_loaded, decided + r.seconds)
    return out


def _fits_all(combo: Sequence[Selection], budget: Budget) -> bool:
    """Whether the selections' estimated latencies and memories add up within ``budget`` (for
    one selection, as ``Bank.select`` compares them)."""
    return (
        budget.latency_ms is None or sum(s.latency_ms for s in combo) <= budget.latency_ms
    ) and (budget.memory_mb is None or sum(s.memory_mb for s in combo) <= budget.memory_mb)


# -- plot ------------------------------------------------------------------------------------------

_COLOURS = {"blockscale": "tab:blue", "model_level": "tab:orange"}
_LABELS = {"blockscale": "blockscale (blocks)", "model_level": "model level (whole models)"}


def plot_replay(result: ReplayResult, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the replay as a timeline: budget against each method's estimated latency and memory
    (crosses: steps a method could not meet), its estimated accuracy, and the KiB each switch
    loaded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(9, 8.5), dpi=120)  # no pyplot: no global state, no display needed
    axes = fig.subplots(4, 1, sharex=True)
    times = [s.time_s for s in result.steps]
    for ax, field, label in zip(
        axes[:2], ("latency_ms", "memory_mb"), ("latency (ms)", "memory (MB)"), strict=True
    ):
        limits = [getattr(s.budget, field) for s in result.steps]
        if any(v is not None for v in limits):
            budget = [math.nan if v is None else v for v in limits]
            ax.step(times, budget, where="post", color="black", linewidth=1.2, label="budget")
        for method in METHODS:
            responses = result.responses(method)
            values = [getattr(r.selection, field) for r in responses]
            ax.step(times, values, where="post", color=_COLOURS[method], label=_LABELS[method])
            missed = [
                (t, v) for t, v, r in zip(times, values, responses, strict=True) if not r.feasible
            ]
            if missed:
                ax.scatter(*zip(*missed, strict=True), marker="x", color=_COLOURS[method], zorder=3)
        ax.set_ylabel(label)
    for method in METHODS:
        responses = result.responses(method)
        accuracy = [100 * r.selection.accuracy for r in responses]
        axes[2].step(times, accuracy, where="post", color=_COLOURS[method])
        switched = [
            (t, r.bytes_loaded / 1024) for t, r in zip(times, responses, strict=True) if r.changed
        ]
        if switched:
            xs, ys = zip(*switched, strict=True)
            axes[3].vlines(xs, 0, ys, color=_COLOURS[method], alpha=0.6)
            axes[3].scatter(xs, ys, s=10, color=_COLOURS[method])
    axes[2].set_ylabel("est. accuracy (%)")
    axes[3].set_ylabel("KiB loaded")
    axes[3].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    totals = {m: result.summary(m).bytes_loaded / 1024 for m in METHODS}
    axes[3].set_title(
        f"switches: {totals['blockscale']:,.0f} KiB loaded by blocks, "
        f"{totals['model_level']:,.0f} KiB by whole models",
        fontsize=9,
    )
    fig.suptitle(title or f"{result.model} on {result.target}: replay of {len(times)} steps")
    fig.tight_layout()
    fig.savefig(path)
    return path
