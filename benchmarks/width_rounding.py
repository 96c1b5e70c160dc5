"""Kept widths rounded to multiples of 8 against exact widths: is a selection's summed latency what
it measures as one compiled model?

For each zoo model with a teacher checkpoint, descendants are derived at the default sparsities
twice, with exact widths (``round_to=1``) and with widths rounded up to multiples of 8 (the
default); nothing is retrained, as latency does not depend on the weights. In each of ``--runs``
passes (the two settings in alternating order), every descendant is timed alone on the target as
profiling does, then ``--selections`` random selections are timed whole, in round-robin turns
with the teacher. Reported per setting, as medians over the passes: the MAPE and Spearman
correlation of the summed estimate against what each selection measured, both relative to the
teacher, and the share of selections that measured more than 5% slower than summed (what puts a
pick over its budget).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from blockscale import DeriveConfig, derive, extract, load_checkpoint, load_dataset
from blockscale._provenance import command, provenance
from blockscale.profile import ProfileConfig, spearman, time_descendants
from blockscale.targets import Target

SETTINGS = {"exact widths": 1, "multiples of 8": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vgg11_bn,mobilenetv2")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--target", default="ort-1t")
    parser.add_argument("--selections", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/width_rounding.json")
    args = parser.parse_args()
    target = Target.parse(args.target)
    results = {}
    for name in args.models.split(","):
        path = Path(args.checkpoints) / f"{name}-{args.dataset}.safetensors"
        teacher, _ = load_checkpoint(path)
        image, _ = load_dataset(args.dataset, "test")[0]
        decomposition = extract(teacher.eval(), torch.zeros(1, *image.shape))
        derived = {
            label: derive(decomposition, DeriveConfig(round_to=multiple))
            for label, multiple in SETTINGS.items()
        }
        passes: dict[str, list[dict]] = {label: [] for label in SETTINGS}
        for run in range(args.runs):
            order = list(SETTINGS) if run % 2 == 0 else list(reversed(SETTINGS))
            for label in order:
                passes[label].append(
                    _one_pass(decomposition, derived[label], target, args.selections, args.seed)
                )
                print(name, label, run, {k: round(v, 3) for k, v in passes[label][-1].items()})
        results[name] = {
            label: {
                **{key: statistics.median(p[key] for p in runs) for key in runs[0]},
                "passes": runs,
            }
            for label, runs in passes.items()
        }
    out = {
        "command": command("benchmarks/width_rounding.py", args),
        **provenance(),
        "target": args.target,
        "results": results,
    }
    path = Path(args.out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, rows in results.items():
        for label, row in rows.items():
            print(name, label, {k: round(v, 3) for k, v in row.items() if k != "passes"})


def _one_pass(decomposition, descendants, target: Target, selections: int, seed: int) -> dict:
    """Every descendant timed alone, then the random selections (the same in every pass) timed
    whole beside the teacher; the summed estimate's errors relative to the teacher."""
    config = ProfileConfig()
    frame, latency = time_descendants(decomposition, descendants, target, config, progress=False)
    summed_teacher = frame + sum(latency[b, 0] for b in range(len(descendants)))
    runner = target.runner(decomposition)
    teacher = runner.model(decomposition.blocks)
    rng = random.Random(seed)
    estimated, measured = [], []
    for _ in range(selections):
        choices = [rng.randrange(len(family)) for family in descendants]
        modules = [descendants[b][d].module for b, d in enumerate(choices)]
        mine, reference = target.time_calls(
            [runner.model(modules), teacher],
            warmup=config.warmup,
            repeats=config.repeats,
            rounds=config.rounds,
        )
        summed = frame + sum(latency[b, d] for b, d in enumerate(choices))
        estimated.append(summed / summed_teacher)
        measured.append(statistics.median(mine) / statistics.median(reference))
    slower = [m / e - 1 for e, m in zip(estimated, measured, strict=True)]
    return {
        "relative_mape_percent": 100
        * statistics.fmean(abs(e - m) / m for e, m in zip(estimated, measured, strict=True)),
        "spearman": spearman(estimated, measured),
        "slower_than_summed_by_5pct_percent": 100 * sum(s > 0.05 for s in slower) / len(slower),
        "most_slower_than_summed_percent": 100 * max(slower),
        "measured_ratio_spread": max(measured) - min(measured),
    }


if __name__ == "__main__":
    main()
