"""Retraining cost: a whole bank against model-level scaling, measured side by side in one run.

Bank: every pruned descendant of every block distilled on cached teacher features (blockscale).
Model level: the same sparsities applied uniformly to every block, giving whole pruned models that
are fine-tuned end to end on the labels, as model-level scaling offers. Both see the same images
for the same number of epochs. Reported:

- time at equal epochs (bank / model level; the paper claims "no more training time");
- time at equal quality: each descendant (bank) and each whole model (model level) is trained
  until its accuracy drop, or accuracy, stays within ``--tolerance`` points of its converged (final)
  value, as if each stopped there; a family's time is the sum of its members' (for the bank, the
  time of each descendant's own training steps, plus all shared work: the teacher pass, reading
  the cache);
- cached features against rerunning the teacher on every batch of every epoch (LegoDNN's code).

Evaluation time is not counted as training time.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from blockscale import compose, derive, evaluate, extract, load_checkpoint, load_dataset
from blockscale._provenance import command, provenance
from blockscale.retrain import RetrainConfig, retrain
from blockscale.types import DeriveConfig


def _subsets(n_train: int, n_val: int, seed: int) -> tuple[Subset, Subset]:
    data = load_dataset("fashion-mnist", "train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(data, order[:n_train]), Subset(data, order[n_train : n_train + n_val])


def _converged_epoch(values: list[float], tolerance: float) -> int:
    """The first epoch (0: before training) from which the value stays within tolerance of its
    final value."""
    final = values[-1]
    return next(
        i for i in range(len(values)) if all(abs(v - final) <= tolerance for v in values[i:])
    )


def bank_run(decomposition, families, train_set, val_set, args) -> dict:
    """Retrain the bank, recording each descendant's accuracy drop after every epoch."""
    teacher_acc = evaluate(compose(decomposition, decomposition.blocks), val_set)
    drops = [_drops(decomposition, families, val_set, teacher_acc)]

    def record(epoch: int, seconds: float) -> None:
        drops.append(_drops(decomposition, families, val_set, teacher_acc))

    cfg = RetrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, cache="memory", val_fraction=0
    )
    report = retrain(decomposition, families, train_set, cfg, progress=False, on_epoch=record)
    tolerance = args.tolerance / 100
    own = [s for family in report.epoch_seconds for s in family if s]
    shared = report.cache_seconds + report.train_seconds - sum(map(sum, own))
    epochs = [_converged_epoch(list(curve), tolerance) for curve in zip(*drops, strict=True)]
    return {
        "seconds": report.cache_seconds + report.train_seconds,
        "seconds_to_quality": shared + sum(sum(s[:e]) for s, e in zip(own, epochs, strict=True)),
        "shared_seconds": shared,
        "epochs_to_quality": epochs,
        "cache_seconds": report.cache_seconds,
        "final_drops_points": [100 * d for d in drops[-1]],
        "teacher_accuracy": teacher_acc,
    }


def _drops(decomposition, families, val_set, teacher_acc) -> list[float]:
    out = []
    for b, family in enumerate(families):
        for d in family:
            if d.info.sparsity == 0:
                continue
            blocks = list(decomposition.blocks)
            blocks[b] = d.module
            out.append(teacher_acc - evaluate(compose(decomposition, blocks), val_set))
    return out


def model_level_run(decomposition, families, train_set, val_set, args) -> dict:
    """Fine-tune each uniformly pruned whole model end to end on the labels."""
    total_times, accs_per_model = None, []
    for level in range(1, len(families[0])):
        model = copy.deepcopy(compose(decomposition, [f[level].module for f in families]))
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        loader = DataLoader(
            train_set,
            batch_size=args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(level),
        )
        times, accs = [0.0], [evaluate(model, val_set)]
        for _ in range(args.epochs):
            model.train()
            start = time.perf_counter()
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
            times.append(times[-1] + time.perf_counter() - start)
            accs.append(evaluate(model, val_set))
        accs_per_model.append((times, accs))
        total_times = (
            times
            if total_times is None
            else [a + b for a, b in zip(total_times, times, strict=True)]
        )
    epochs = [_converged_epoch(a, args.tolerance / 100) for _, a in accs_per_model]
    return {
        "seconds": total_times[-1],
        "seconds_to_quality": sum(t[e] for (t, _), e in zip(accs_per_model, epochs, strict=True)),
        "epochs_to_quality": epochs,
        "final_accuracies": [a[-1] for _, a in accs_per_model],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/resnet20-fashion-mnist.safetensors")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    parser.add_argument("--out-json", default="benchmarks/results/retrain_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, _ = load_checkpoint(args.checkpoint)
    train_set, val_set = _subsets(args.train_images, args.val_images, args.seed)
    decomposition = extract(teacher, train_set[0][0].unsqueeze(0))
    families = derive(decomposition, DeriveConfig(sparsities=(0.0, 0.2, 0.4, 0.6, 0.8, 0.9)))

    def fresh():  # every run starts from the same untrained descendants
        return copy.deepcopy(families)

    bank = bank_run(decomposition, fresh(), train_set, val_set, args)
    models = model_level_run(decomposition, fresh(), train_set, val_set, args)
    cfg = RetrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, val_fraction=0.0
    )
    cached = retrain(decomposition, fresh(), train_set, cfg, progress=False)
    rerun = retrain(
        decomposition,
        fresh(),
        train_set,
        RetrainConfig(**{**cfg.to_dict(), "cache": "none"}),
        progress=False,
    )
    result = {
        "command": command("benchmarks/retrain_cost.py", args),
        **provenance(),
        "args": vars(args),
        "bank": bank,
        "model_level": models,
        "ratio_equal_epochs": bank["seconds"] / models["seconds"],
        "ratio_equal_quality": bank["seconds_to_quality"] / models["seconds_to_quality"],
        "cached_seconds": cached.cache_seconds + cached.train_seconds,
        "rerun_seconds": rerun.train_seconds,
        "cache_speedup": rerun.train_seconds / (cached.cache_seconds + cached.train_seconds),
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("bank", "model_level")}, indent=2)
    )


if __name__ == "__main__":
    main()
