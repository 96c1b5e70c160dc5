"""The built-in demo: a small ResNet on Fashion-MNIST, from teacher to bank, in a few minutes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ._progress import progress_bar
from .bank import Bank
from .data import load_dataset, subset
from .derive import derive
from .extract import extract
from .models import create_model, load_checkpoint, save_checkpoint
from .train import TrainConfig, evaluate, train
from .types import DeriveConfig

DEFAULT_TEACHER = Path("checkpoints/resnet20-fashion-mnist.safetensors")


def _teacher(path: Path, out: Path, log: Any) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """The shipped teacher checkpoint, or a quickly trained one when it is absent."""
    if path.is_file():
        model, meta = load_checkpoint(path)
        log(f"teacher: {meta['model']} from {path}")
        return model, meta, path
    log(f"teacher: {path} not found; training resnet20 for 1 epoch on 10,000 images")
    train_set = subset(load_dataset("fashion-mnist", "train", augment=True), 10_000)
    test_set = subset(load_dataset("fashion-mnist", "test"), 2_000)
    kwargs = {"in_channels": 1, "num_classes": 10}
    model = create_model("resnet20", **kwargs)
    result = train(model, train_set, test_set, TrainConfig(epochs=1))
    target = out / "teacher.safetensors"
    extra = {"dataset": "fashion-mnist", "test_accuracy": result.test_accuracy}
    save_checkpoint(model, target, model_name="resnet20", model_kwargs=kwargs, extra=extra)
    meta = {"model": "resnet20", "kwargs": kwargs, "extra": extra}
    return model, meta, target


def run_demo(
    out: Path, *, teacher: Path = DEFAULT_TEACHER, test_images: int = 2_000, log: Any = print
) -> dict[str, Any]:
    """Extract, derive and bank the default teacher; check the bank and report what it holds.

    Writes ``out/bank`` and ``out/demo.json`` and returns the JSON summary.
    """
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, meta, teacher_path = _teacher(teacher, out, log)
    test_set = subset(load_dataset("fashion-mnist", "test"), test_images, seed=1)
    example = test_set[0][0].unsqueeze(0)

    decomposition = extract(model, example)
    config = DeriveConfig()
    total = decomposition.plan.num_blocks * len(config.sparsities)
    with progress_bar("derive", total) as advance:
        families = derive(decomposition, config, progress=lambda done, n: advance())
    description = {
        "name": meta["model"],
        "kwargs": meta["kwargs"],
        "checkpoint": str(teacher_path),
        **meta.get("extra", {}),
    }
    bank = Bank.write(out / "bank", decomposition, families, teacher=description, overwrite=True)
    bank = Bank.open(bank.path)

    batch = torch.stack([test_set[i][0] for i in range(min(64, len(test_set)))])
    with torch.no_grad():
        exact = torch.equal(bank.compose([0] * bank.plan.num_blocks)(batch), model(batch))
    rows = []
    for index, sparsity in enumerate(config.sparsities):
        composed = bank.compose([index] * bank.plan.num_blocks)
        params = sum(p.numel() for p in composed.parameters())
        accuracy = evaluate(composed, test_set)
        rows.append({"sparsity": sparsity, "params": params, "accuracy": accuracy})
        log(f"  uniform sparsity {sparsity:.1f}: {params:>8,} params, accuracy {accuracy:.2%}")
    summary = {
        "teacher": description,
        "bank": str(bank.path),
        "blocks": bank.plan.num_blocks,
        "descendants_per_block": len(config.sparsities),
        "options": len(config.sparsities) ** bank.plan.num_blocks,
        "bank_bytes": sum(r.bytes for r in bank.files.values()),
        "original_selection_reproduces_teacher": exact,
        "uniform_selections_before_retraining": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
