"""Latency where the model runs: torch eager against ONNX Runtime, measured side by side in one run.

On a bank of the shipped ResNet-20 (``benchmarks/estimate_fidelity.py`` builds it), in one run:

- every descendant is timed on ``torch-1t`` and ``ort-1t`` (and ``tflite-1t`` with the extra and
  ``--tflite``), and the rank agreement (Spearman) of the two targets' block latencies is reported;
- on each target, ``--samples`` random selections are measured end to end and compared with the
  additive estimate (MAPE of the latency, and of the latency relative to the teacher timed in the
  same turns, which cancels the drift of a shared machine);
- the cost of choosing on the wrong target's numbers: at budgets of 20% to 100% of the teacher's
  ONNX Runtime latency, the selection made from ONNX Runtime's own profile against the one made
  from torch's profile at the same fraction of the teacher's torch latency, both then measured on
  ONNX Runtime (does it meet the budget?) and on the test set (accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.data import Subset

from blockscale import Bank, BuildConfig, compose, evaluate, load_dataset
from blockscale._provenance import command, provenance
from blockscale.errors import InfeasibleBudgetError
from blockscale.pipeline import training_subsets
from blockscale.profile import ProfileConfig, add_target, estimate, spearman, validate
from blockscale.targets import Target
from blockscale.types import Budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default="benchmarks/results/fidelity-bank")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--tflite", action="store_true", help="also profile tflite-1t")
    parser.add_argument(
        "--accuracy-images",
        type=int,
        default=0,
        help="measure the validated selections' accuracy on the first this many profile images "
        "(0: all of them); latency, what this benchmark is about, does not depend on it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/deploy_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bank = Bank.open(args.bank)
    config = BuildConfig.from_dict(bank.manifest["build"])
    _, profile_set = training_subsets(load_dataset("fashion-mnist", "train"), config)
    if args.accuracy_images:
        profile_set = Subset(profile_set, range(min(args.accuracy_images, len(profile_set))))
    test_set = Subset(load_dataset("fashion-mnist", "test"), range(args.test_images))
    decomposition, descendants = bank.decomposition(), bank.load_descendants()
    profiles = bank.profile
    names = ["torch-1t", "ort-1t"] + (["tflite-1t"] if args.tflite else [])
    targets = [Target.parse(n) for n in names]
    measure = ProfileConfig()
    for target in targets:
        profiles = add_target(profiles, decomposition, descendants, target, measure)
    bank.update(profiles=profiles.to_dict())

    def block_latencies(name: str) -> list[float]:
        return [p.latency_ms[name] for family in profiles.descendants for p in family]

    rank = {
        f"{a}/{b}": spearman(block_latencies(a), block_latencies(b))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    fidelity = {}
    for target in targets:
        result = validate(
            profiles,
            decomposition,
            descendants,
            profile_set,
            target,
            samples=args.samples,
            seed=args.seed + 1,
            config=measure,
        )
        fidelity[target.name] = result
        print(target.name, {k: v for k, v in result.items() if k != "records"})
    wrong = _wrong_target(bank, decomposition, descendants, test_set, measure)
    summary = {
        "block_latency_spearman": rank,
        **{
            name: {
                key: fidelity[name][key]
                for key in (
                    "latency_mape_percent",
                    "latency_spearman",
                    "relative_latency_mape_percent",
                    "relative_latency_spearman",
                )
            }
            for name in names
        },
    }
    out = {
        "command": command("benchmarks/deploy_latency.py", args),
        **provenance(),
        "summary": summary,
        "wrong_target": wrong,
        "fidelity": fidelity,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"summary": summary, "wrong_target": wrong}, indent=2))


def _wrong_target(bank, decomposition, descendants, test_set, measure) -> list[dict]:
    """Selections at the same fraction of the teacher's latency, made from each target's profile,
    all measured on ONNX Runtime (in one round-robin pass) and on the test set."""
    teachers = [0] * bank.plan.num_blocks
    teacher = {t: estimate(bank.profile, teachers, t)["latency_ms"] for t in ("ort-1t", "torch-1t")}
    fractions = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    rows, choices = [], []
    for fraction in fractions:
        row = {"fraction": fraction, "budget_ms": fraction * teacher["ort-1t"]}
        for source in ("ort-1t", "torch-1t"):
            try:
                picked = bank.select(Budget(latency_ms=fraction * teacher[source]), source)
            except InfeasibleBudgetError:
                row[source] = None
                continue
            row[source] = {"choices": list(picked.choices), "estimated_ms": picked.latency_ms}
            choices.append(tuple(picked.choices))
        rows.append(row)
    unique = sorted(set(choices))
    target = Target.parse("ort-1t")
    runner = target.runner(decomposition)
    blocks = [[descendants[b][d].module for b, d in enumerate(c)] for c in unique]
    teacher_span, *spans = target.time_calls(
        [runner.model(decomposition.blocks), *(runner.model(b) for b in blocks)],
        warmup=measure.warmup,
        repeats=measure.repeats,
        rounds=measure.rounds,
    )
    teacher_ms = statistics.median(teacher_span)
    measured = {
        c: {
            "ort_ms": statistics.median(s),
            "ort_ratio": statistics.median(s) / teacher_ms,
            "test_accuracy": evaluate(compose(decomposition, b), test_set),
        }
        for c, b, s in zip(unique, blocks, spans, strict=True)
    }
    for row in rows:
        for source in ("ort-1t", "torch-1t"):
            if row[source] is not None:
                m = measured[tuple(row[source]["choices"])]
                # judged against the teacher timed in the same turns: the machine drifts
                row[source].update(m, meets_budget=m["ort_ratio"] <= row["fraction"])
    return rows


if __name__ == "__main__":
    main()
