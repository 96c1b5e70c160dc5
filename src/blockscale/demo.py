"""The built-in demo: a small ResNet on Fashion-MNIST, from teacher to bank to selections.

It builds a bank from the shipped teacher (or one trained in a minute when the checkpoint is
absent), picks the best selection at several latency budgets, and measures each on the test set:
estimated against measured accuracy and latency, next to uniform (model-level) sparsity.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .bank import Bank
from .data import load_dataset, subset
from .errors import InfeasibleBudgetError
from .extract import compose
from .models import create_model, load_checkpoint, save_checkpoint
from .pipeline import BuildConfig, build
from .plots import plot_frontier
from .profile import ProfileConfig, without_records
from .retrain import RetrainConfig
from .targets import Target
from .train import TrainConfig, evaluate, train
from .types import Budget

DEFAULT_TEACHER = Path("checkpoints/resnet20-fashion-mnist.safetensors")
BUDGET_STEPS = (1.0, 0.75, 0.5, 0.25, 0.0)  # from the teacher's latency down to the fastest


def demo_config() -> BuildConfig:
    """Build settings small enough for a few minutes on two cores."""
    return BuildConfig(
        retrain=RetrainConfig(epochs=3, batch_size=64, lr=1e-3),
        profile=ProfileConfig(warmup=10, repeats=60),
        retrain_samples=3_000,
        profile_samples=1_000,
        validate_samples=12,
        validate_frontier=6,
    )


def _teacher(path: Path, out: Path, log: Callable[[str], None]) -> tuple[torch.nn.Module, dict]:
    """The shipped teacher checkpoint, or a quickly trained one when it is absent."""
    if path.is_file():
        model, meta = load_checkpoint(path)
        log(f"teacher: {meta['model']} from {path}")
        return model, {
            "name": meta["model"],
            "kwargs": meta["kwargs"],
            "checkpoint": str(path),
            **meta.get("extra", {}),
        }
    log(f"teacher: {path} not found; training resnet20 for 1 epoch on 10,000 images")
    train_set = subset(load_dataset("fashion-mnist", "train", augment=True), 10_000)
    test_set = subset(load_dataset("fashion-mnist", "test"), 2_000)
    kwargs = {"in_channels": 1, "num_classes": 10}
    model = create_model("resnet20", **kwargs)
    result = train(model, train_set, test_set, TrainConfig(epochs=1))
    target = out / "teacher.safetensors"
    extra = {"dataset": "fashion-mnist", "test_accuracy": result.test_accuracy}
    save_checkpoint(model, target, model_name="resnet20", model_kwargs=kwargs, extra=extra)
    return model, {"name": "resnet20", "kwargs": kwargs, "checkpoint": str(target), **extra}


def run_demo(
    out: Path,
    *,
    teacher: Path = DEFAULT_TEACHER,
    config: BuildConfig | None = None,
    test_images: int = 2_000,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build a bank, select at several budgets, measure; write ``out/`` and return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, description = _teacher(teacher, out, log)
    train_set = load_dataset("fashion-mnist", "train")
    test_set = subset(load_dataset("fashion-mnist", "test"), test_images, seed=1)
    config = config or demo_config()
    bank = build(
        model,
        train_set,
        out / "bank",
        config,
        teacher_info=description,
        overwrite=True,
        progress=progress,
        log=log,
    )
    target = Target.parse(config.target)

    frontier = bank.frontier()
    slowest, fastest = frontier[-1].latency_ms, frontier[0].latency_ms
    chosen: list[tuple[float, Any]] = []
    for step in BUDGET_STEPS:
        budget = Budget(latency_ms=fastest + step * (slowest - fastest) + 1e-6)
        try:
            chosen.append((budget.latency_ms, bank.select(budget)))
        except InfeasibleBudgetError as exc:
            chosen.append((budget.latency_ms, exc.message))
    n = bank.plan.num_blocks
    candidates = [tuple([0] * n)]
    candidates += [tuple(c.choices) for _, c in chosen if not isinstance(c, str)]
    candidates += [tuple([i] * n) for i in range(len(bank.derive_config.sparsities))]
    accuracy, latency = _measure(bank, candidates, test_set, target)
    teacher_accuracy, teacher_ms = accuracy[candidates[0]], latency[candidates[0]]
    # Drops were profiled on held-out training images; estimates of test accuracy subtract them
    # from the teacher's test accuracy.
    shift = teacher_accuracy - bank.profile.teacher_accuracy
    rows = []
    for budget_ms, selection in chosen:
        if isinstance(selection, str):
            rows.append({"budget_ms": budget_ms, "infeasible": selection})
            continue
        key = tuple(selection.choices)
        rows.append(
            {
                "budget_ms": budget_ms,
                "choices": list(key),
                "estimated_accuracy": max(0.0, selection.accuracy + shift),
                "measured_accuracy": accuracy[key],
                "estimated_latency_ms": selection.latency_ms,
                "measured_latency_ms": latency[key],
                "memory_mb": selection.memory_mb,
            }
        )
    uniform = [
        {
            "sparsity": sparsity,
            "measured_accuracy": accuracy[tuple([i] * n)],
            "measured_latency_ms": latency[tuple([i] * n)],
        }
        for i, sparsity in enumerate(bank.derive_config.sparsities)
    ]
    frontier = [replace(s, accuracy=max(0.0, s.accuracy + shift)) for s in frontier]
    plot = plot_frontier(
        frontier,
        out / "frontier.png",
        title=f"{description['name']} on Fashion-MNIST: {len(frontier)} frontier selections",
        target=target.name,
        measured=[
            (r["measured_latency_ms"], r["measured_accuracy"]) for r in rows if "choices" in r
        ],
        uniform=[(u["measured_latency_ms"], u["measured_accuracy"]) for u in uniform],
        teacher=(teacher_ms, teacher_accuracy),
    )
    summary = {
        "teacher": description,
        "bank": str(bank.path),
        "target": target.name,
        "test_images": len(test_set),
        "teacher_test_accuracy": teacher_accuracy,
        "teacher_latency_ms": teacher_ms,
        "options": len(bank.derive_config.sparsities) ** bank.plan.num_blocks,
        "selections": rows,
        "uniform": uniform,
        "validation": bank.profile.validation.get(target.name, {}),
        "frontier_plot": str(plot),
        "timings": bank.manifest.get("timings", {}),
        "seconds": round(time.perf_counter() - start, 1),
    }
    summary["validation"] = without_records(summary["validation"])
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _measure(
    bank: Bank, candidates: list[tuple[int, ...]], test_set: Any, target: Target
) -> tuple[dict[tuple[int, ...], float], dict[tuple[int, ...], float]]:
    """Test accuracy and median latency on ``target`` of each selection; latencies are taken
    round-robin, so a machine whose speed drifts slows all of them alike."""
    keys = list(dict.fromkeys(candidates))
    decomposition = bank.decomposition()
    descendants = bank.load_descendants()
    blocks = {key: [descendants[b][d].module for b, d in enumerate(key)] for key in keys}
    accuracy = {key: evaluate(compose(decomposition, blocks[key]), test_set) for key in keys}
    runner = target.runner(decomposition)
    spans = target.time_calls([runner.model(blocks[key]) for key in keys], warmup=3, repeats=60)
    return accuracy, {key: statistics.median(span) for key, span in zip(keys, spans, strict=True)}
