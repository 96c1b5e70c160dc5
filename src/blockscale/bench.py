"""The evaluation against model-level baselines: do the paper's claims hold, measured, on real data?

For each zoo model with a teacher checkpoint (``blockscale train`` makes one), :func:`bench_model`
builds a bank and the three baseline families of :mod:`blockscale.baselines` from the same
training images and epochs, then measures, side by side in one run:

* options: ``k ** n`` models in the bank, ``k`` in each family (the teacher counted in both);
* training time: the bank's retraining against each family's fine-tuning, at equal epochs; and at
  equal quality, each bank descendant charged up to its best epoch (by validation MSE, the state
  the bank keeps) plus the bank's shared work, each whole model up to the epoch after which its
  validation accuracy stays within 0.5 points of its final value;
* at latency budgets of ``fractions`` of the teacher's latency (and memory budgets likewise), the
  model each method picks: blockscale's exact selection from its profile, a family's member of
  best validation accuracy whose measured latency (memory) fits. Every pick is then timed on the
  target as one whole exported model, in round-robin turns with the teacher (budgets are judged
  as ratios to the teacher timed in the same turns), and its MEASURED test accuracy reported;
* switching: a phone-like trace replayed against whole-model variants (:mod:`blockscale.replay`),
  bytes and seconds only: the replay scores both sides by the profile's estimate, which judges
  the uniformly pruned whole-model variants poorly on deep banks; the measured accuracies are the
  picks' above.

Memory of a whole model, for every method alike: its parameter and buffer bytes plus the peak
bytes of activations alive at once at batch 1 (:func:`blockscale.profile.peak_activation_bytes`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import nn

from ._provenance import provenance
from .bank import Bank, json_safe
from .baselines import METHODS, BaselineConfig, BaselineModel, train_family
from .data import load_dataset, subset
from .errors import ConfigError, InfeasibleBudgetError
from .models import load_checkpoint
from .pipeline import BuildConfig, build, training_subsets
from .profile import ProfileConfig, peak_activation_bytes, weight_bytes, without_records
from .replay import budget_range, replay
from .retrain import RetrainConfig
from .targets import Target
from .traces import phone
from .train import evaluate
from .types import Budget, DeriveConfig

CONFIDENT = "blockscale_confident"  # blockscale's picks under the validated latency margin
ALL_METHODS = ("blockscale", CONFIDENT, *METHODS)
_TOLERANCE = 0.005  # equal quality: within 0.5 points of the final accuracy
_MIB = float(2**20)


@dataclass(frozen=True)
class BenchConfig:
    """What the evaluation runs: models (each needs ``checkpoints/MODEL-DATASET.safetensors``),
    the bank's sparsity levels (the families get the same, less 0) and the multiple every kept
    width is rounded up to (bank and families alike; :class:`DeriveConfig`), epochs for bank
    and families alike, image counts, the random selections the build validates (and fits its
    corrections on, as a default build does), the confidence of blockscale's second pick at each latency
    budget (``Bank.select(..., confidence=)``; None: no second pick), budget fractions, the
    target, the trace length, the seed, and how latency is timed."""

    models: tuple[str, ...] = ("resnet20", "vgg11_bn", "mobilenetv2")
    dataset: str = "fashion-mnist"
    checkpoints: str = "checkpoints"
    sparsities: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
    round_to: int | None = 8
    epochs: int = 5
    train_images: int = 10_000
    val_images: int = 2_000
    test_images: int = 5_000
    validate_samples: int = 50
    confidence: float | None = 0.95
    fractions: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    target: str = "ort-1t"
    trace_steps: int = 100
    seed: int = 0
    timing: ProfileConfig = field(default_factory=lambda: ProfileConfig(repeats=60, rounds=6))

    def __post_init__(self) -> None:
        for name in ("models", "sparsities", "fractions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.models:
            raise ConfigError("BenchConfig.models names no model")
        if self.sparsities[:1] != (0.0,) or len(self.sparsities) < 2:
            raise ConfigError(
                f"BenchConfig.sparsities must start at 0 (the teacher), got {list(self.sparsities)}"
            )
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"BenchConfig.fractions must be in (0, 1], got {self.fractions}")
        Target.parse(self.target)

    @classmethod
    def quick(cls, models: Sequence[str] = ("resnet20",)) -> BenchConfig:
        """Tiny subsets, one epoch, three budgets: the whole evaluation in a few minutes."""
        return cls(
            models=tuple(models),
            sparsities=(0.0, 0.5, 0.9),
            epochs=1,
            train_images=512,
            val_images=256,
            test_images=256,
            validate_samples=4,
            fractions=(0.5, 0.75, 1.0),
            trace_steps=20,
            timing=ProfileConfig(warmup=2, repeats=10, rounds=2, batch_size=256),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Whole:
    """One model a method offers, as one module: what it is, its size and its accuracies."""

    method: str
    label: str
    module: nn.Module
    val_accuracy: float
    memory_mb: float
    estimate: dict[str, float] | None = None  # blockscale: the profile's estimates
    ratio: float = math.nan  # measured latency / the teacher's, timed in the same turns
    test_accuracy: float = math.nan


def bench_model(
    name: str,
    config: BenchConfig,
    work: Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build, train, select, time and measure for model ``name``; the results as JSON data."""
    path = Path(config.checkpoints) / f"{name}-{config.dataset}.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"no teacher checkpoint for {name} at {path}",
            hint=f"train one: blockscale train --model {name} --dataset {config.dataset} "
            f"--out {path}",
        )
    teacher, _ = load_checkpoint(path)
    train_set = load_dataset(config.dataset, "train")
    test_set = subset(load_dataset(config.dataset, "test"), config.test_images, seed=config.seed)
    build_config = BuildConfig(
        derive=DeriveConfig(sparsities=config.sparsities, round_to=config.round_to),
        retrain=RetrainConfig(epochs=config.epochs, seed=config.seed),
        profile=config.timing,
        target=config.target,
        retrain_samples=config.train_images,
        profile_samples=config.val_images,
        validate_samples=config.validate_samples,
        seed=config.seed,
    )
    retrain_set, val_set = training_subsets(train_set, build_config)
    log(f"{name}: building the bank")
    bank = build(
        teacher,
        train_set,
        work / f"{name}-bank",
        build_config,
        teacher_info={"name": name},
        overwrite=True,
        progress=progress,
        log=log,
    )
    decomposition = bank.decomposition()
    baseline = BaselineConfig(
        sparsities=config.sparsities[1:],
        epochs=config.epochs,
        round_to=config.round_to,
        seed=config.seed,
    )
    families: dict[str, list[BaselineModel]] = {}
    for method in METHODS:
        log(f"{name}: training the {method} family")
        families[method] = train_family(
            method, decomposition, retrain_set, val_set, baseline, progress=progress
        )

    shape = bank.plan.input_shape
    target = Target.parse(config.target)
    runner = target.runner(decomposition)
    reference = bank.compose([0] * bank.plan.num_blocks).eval()
    teacher_whole = _whole("teacher", "teacher", reference, bank.profile.teacher_accuracy, shape)
    offered = {
        m: [teacher_whole]
        + [_whole(m, f"{m} {b.sparsity:g}", b.module, b.accuracy, shape) for b in family]
        for m, family in families.items()
    }
    log(f"{name}: timing {sum(map(len, offered.values()))} whole models on {target.name}")
    others = [w for ws in offered.values() for w in ws[1:]]
    _time([teacher_whole, *others], target, runner, shape, config.timing)

    teacher_est = bank.estimate([0] * bank.plan.num_blocks)
    picks: dict[tuple[str, float], dict[str, _Whole | None]] = {}
    chosen: dict[tuple[int, ...], _Whole] = {}
    for kind in ("latency", "memory"):
        for fraction in config.fractions:
            row: dict[str, _Whole | None] = {}
            budget = (
                Budget(latency_ms=fraction * teacher_est.latency_ms)
                if kind == "latency"
                else Budget(memory_mb=fraction * teacher_est.memory_mb)
            )
            # the margin only raises latency: under a memory budget both picks are one
            confidence = config.confidence if kind == "latency" else None
            for method, level in (("blockscale", None), (CONFIDENT, confidence)):
                if method == CONFIDENT and config.confidence is None:
                    row[method] = None
                    continue
                try:
                    selection = bank.select(budget, confidence=level)
                except InfeasibleBudgetError:
                    row[method] = None
                    continue
                if selection.choices not in chosen:
                    chosen[selection.choices] = _whole(
                        "blockscale",
                        "".join(map(str, selection.choices)),
                        bank.compose(selection.choices).eval(),
                        selection.accuracy,
                        shape,
                        estimate=selection.to_dict(),
                    )
                row[method] = chosen[selection.choices]
            for method, wholes in offered.items():
                row[method] = _best_within(wholes, kind, fraction, teacher_whole)
            picks[kind, fraction] = row
    log(f"{name}: timing {len(chosen)} blockscale selections with the teacher")
    _time([teacher_whole, *chosen.values()], target, runner, shape, config.timing)
    measured = {id(w): w for row in picks.values() for w in row.values() if w is not None}
    measured[id(teacher_whole)] = teacher_whole
    log(f"{name}: measuring {len(measured)} models on {len(test_set)} test images")
    for whole in measured.values():
        whole.test_accuracy = evaluate(whole.module, test_set)

    low, high = budget_range(bank)
    trace = phone(low, high, config.trace_steps, seed=config.seed)
    switching = {
        key: value
        for key, value in replay(bank, trace).comparison().items()
        if not key.startswith("accuracy")
    }
    return json_safe(
        {
            "model": name,
            "blocks": bank.plan.num_blocks,
            "levels": len(config.sparsities),
            "options": {
                "blockscale": len(config.sparsities) ** bank.plan.num_blocks,
                **{m: len(config.sparsities) for m in METHODS},
            },
            "teacher": {
                "val_accuracy": teacher_whole.val_accuracy,
                "test_accuracy": teacher_whole.test_accuracy,
                "memory_mb": teacher_whole.memory_mb,
            },
            "training": _training(bank, families),
            "budgets": [
                {
                    "kind": kind,
                    "fraction": fraction,
                    **{m: _pick(w, kind, fraction, teacher_whole) for m, w in row.items()},
                }
                for (kind, fraction), row in picks.items()
            ],
            "switching": switching,
            "validation": without_records(bank.profile.validation.get(config.target, {})),
            "latency_correction": (
                fix.to_dict()
                if (fix := bank.profile.latency_corrections.get(config.target))
                else None
            ),
            "families": {m: [b.summary() for b in fam] for m, fam in families.items()},
        }
    )


def _whole(
    method: str,
    label: str,
    module: nn.Module,
    val_accuracy: float,
    shape: tuple[int, ...],
    *,
    estimate: dict[str, float] | None = None,
) -> _Whole:
    memory = weight_bytes(module) + peak_activation_bytes(module, shape)
    return _Whole(method, label, module.eval(), val_accuracy, memory / _MIB, estimate)


def _time(
    wholes: Sequence[_Whole],
    target: Target,
    runner: Any,
    shape: tuple[int, ...],
    timing: ProfileConfig,
) -> None:
    """Time every model as one whole exported model, round-robin with ``wholes[0]`` (the
    teacher); each gets its latency as a ratio to the teacher's in the same turns."""
    calls = [runner.block(w.module, shape) for w in wholes]
    spans = target.time_calls(
        calls, warmup=timing.warmup, repeats=timing.repeats, rounds=timing.rounds
    )
    teacher = statistics.median(spans[0])
    for whole, span in zip(wholes, spans, strict=True):
        whole.ratio = statistics.median(span) / teacher


def _best_within(
    wholes: Sequence[_Whole], kind: str, fraction: float, teacher: _Whole
) -> _Whole | None:
    """The most accurate (on validation images) of ``wholes`` within the budget, or None."""
    fits = [
        w
        for w in wholes
        if (w.ratio if kind == "latency" else w.memory_mb / teacher.memory_mb) <= fraction
    ]
    return max(fits, key=lambda w: w.val_accuracy, default=None)


def _pick(
    whole: _Whole | None, kind: str, fraction: float, teacher: _Whole
) -> dict[str, Any] | None:
    """A method's pick at one budget, and whether it meets the budget as measured (baselines are
    picked by what was measured; blockscale by its estimates, so it may miss)."""
    if whole is None:
        return None
    share = whole.ratio if kind == "latency" else whole.memory_mb / teacher.memory_mb
    return {
        "label": whole.label,
        "meets_budget": bool(share <= fraction),
        "test_accuracy": whole.test_accuracy,
        "val_accuracy": whole.val_accuracy,
        "latency_ratio": whole.ratio,
        "memory_mb": whole.memory_mb,
        "estimate": whole.estimate,
    }


def _training(bank: Bank, families: dict[str, list[BaselineModel]]) -> dict[str, Any]:
    """Training seconds of the bank and of each family, at equal epochs and at equal quality."""
    report = bank.manifest["retrain"]
    descendants = sum(sum(e) for fam in report["epoch_seconds"] for e in fam)
    shared = report["cache_seconds"] + report["train_seconds"] - descendants
    to_quality = shared + sum(
        sum(seconds[:best])
        for fam, bests in zip(report["epoch_seconds"], report["best_epoch"], strict=True)
        for seconds, best in zip(fam, bests, strict=True)
    )
    bank_seconds = report["cache_seconds"] + report["train_seconds"]
    out: dict[str, Any] = {
        "blockscale": {"seconds": bank_seconds, "seconds_to_quality": to_quality}
    }
    for method, family in families.items():
        seconds = sum(m.seconds for m in family)
        quality = sum(_seconds_to_quality(m.history) for m in family)
        out[method] = {
            "seconds": seconds,
            "seconds_to_quality": quality,
            "ratio": bank_seconds / seconds,
            "ratio_to_quality": to_quality / quality if quality else math.nan,
        }
    return out


def _seconds_to_quality(history: Sequence[dict[str, float]]) -> float:
    """Training seconds up to the epoch after which validation accuracy stays within the
    tolerance of its final value."""
    final = history[-1]["val_accuracy"]
    epoch = len(history) - 1
    while epoch > 0 and abs(history[epoch - 1]["val_accuracy"] - final) <= _TOLERANCE:
        epoch -= 1
    return history[epoch]["seconds"]


def run_bench(
    config: BenchConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every model of ``config``: writes ``bench.json`` and ``bench-MODEL.png`` (accuracy against
    latency and memory budgets, every method) to ``out_dir``, and returns the JSON data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = []
    for name in config.models:
        models.append(bench_model(name, config, out / "work", progress=progress, log=log))
        plot_bench(models[-1], out / f"bench-{name}.png")
    result = {
        "config": config.to_dict(),
        **provenance(),
        "seconds": time.perf_counter() - start,
        "models": models,
        "goals": [_goals(m) for m in models],
    }
    (out / "bench.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    return result


def _goals(model: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for one model: at every budget blockscale's measured accuracy at least
    the best baseline's that fits; at the tightest budget a baseline meets, 5 points more."""
    rows = []
    for row in model["budgets"]:
        theirs = [row[m]["test_accuracy"] for m in METHODS if row[m] is not None]
        best = max(theirs, default=None)
        entry: dict[str, Any] = {"kind": row["kind"], "fraction": row["fraction"]}
        for method, gain in (("blockscale", "gain_points"), (CONFIDENT, "confident_gain_points")):
            ours = row[method]
            entry[method] = None if ours is None else ours["test_accuracy"]
            entry[gain] = (
                None if ours is None or best is None else 100 * (ours["test_accuracy"] - best)
            )
        rows.append({**entry, "best_baseline": best})
    met = [r for r in rows if r["gain_points"] is not None]

    def over(method: str) -> int:
        return sum(
            row[method] is not None and not row[method]["meets_budget"] for row in model["budgets"]
        )

    return {
        "model": model["model"],
        "rows": rows,
        "blockscale_over_budget": over("blockscale"),
        "confident_over_budget": over(CONFIDENT),
        "at_least_best_baseline_everywhere": all(r["gain_points"] >= 0 for r in met),
        "budgets_blockscale_alone_meets": sum(
            r["blockscale"] is not None and r["best_baseline"] is None for r in rows
        ),
        "training_ratio": {m: model["training"][m]["ratio"] for m in METHODS},
        "training_ratio_to_quality": {m: model["training"][m]["ratio_to_quality"] for m in METHODS},
    }


_COLOURS = {
    "blockscale": "tab:blue",
    CONFIDENT: "tab:purple",
    "uniform": "tab:orange",
    "compression": "tab:green",
    "distillation": "tab:red",
}


def plot_bench(model: dict[str, Any], path: str | Path) -> Path:
    """Measured test accuracy against the latency and the memory budget, every method."""
    path = Path(path)
    fig = Figure(figsize=(10, 4.2), dpi=120)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, ("latency", "memory"), strict=True):
        rows = [r for r in model["budgets"] if r["kind"] == kind]
        for method in ALL_METHODS:
            points = [
                (r["fraction"], 100 * r[method]["test_accuracy"])
                for r in rows
                if r[method] is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                marker = {"blockscale": "o-", CONFIDENT: "^:"}.get(method, "s--")
                ax.plot(xs, ys, marker, color=_COLOURS[method], label=method)
        ax.set_xlabel(f"{kind} budget (fraction of the teacher's)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("measured test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{model['model']}: {model['options']['blockscale']:,} block selections against "
        f"{model['levels']} whole models per baseline"
    )
    fig.tight_layout()
    fig.savefig(path)
    return path
