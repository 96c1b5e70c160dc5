"""Estimate fidelity: the additive (LegoDNN) estimate against measured random selections.

Builds a bank from the shipped ResNet-20 teacher (or opens one), then measures ``--samples`` random
selections end to end on the images the drops were profiled on (the estimate is defined on them)
and compares with the estimate: accuracy MAE (points) and Spearman, latency MAPE and Spearman.
Also reports the monotone drop correction by leave-one-out, next to the plain sum.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Subset

from blockscale import Bank, BuildConfig, build, load_checkpoint, load_dataset
from blockscale._provenance import command, provenance
from blockscale.pipeline import training_subsets
from blockscale.profile import (
    BankProfile,
    DropCorrection,
    ProfileConfig,
    add_target,
    corrected_accuracy_errors,
    estimate,
    fit_block_weights,
    profile,
    spearman,
    validate,
)
from blockscale.retrain import RetrainConfig
from blockscale.targets import Target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/resnet20-fashion-mnist.safetensors")
    parser.add_argument("--bank", default="benchmarks/results/fidelity-bank")
    parser.add_argument("--reuse-bank", action="store_true", help="open --bank instead of building")
    parser.add_argument(
        "--remeasure-latency",
        action="store_true",
        help="time the reused bank's descendants again first (the machine may have been busier)",
    )
    parser.add_argument("--retrain-samples", type=int, default=6000)
    parser.add_argument("--profile-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument(
        "--profile-images",
        type=int,
        default=0,
        help="profile the drops again, and validate, on this many held-out training images (the "
        "bank's profiling images, then images neither retraining nor profiling used)",
    )
    parser.add_argument("--combine", choices=("sum", "logit", "fitted"), default="fitted")
    parser.add_argument(
        "--fit-samples",
        type=int,
        default=50,
        help="random selections measured to fit the corrections (block weights, the monotone "
        "drop correction), disjoint from the --samples that test every estimator",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/estimate_fidelity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, meta = load_checkpoint(args.checkpoint)
    train_set = load_dataset("fashion-mnist", "train")
    config = BuildConfig(
        retrain=RetrainConfig(epochs=args.epochs),
        retrain_samples=args.retrain_samples,
        profile_samples=args.profile_samples,
        validate_samples=args.fit_samples,
        combine=args.combine,
        target=f"torch-{args.threads}t",
        seed=args.seed,
    )
    if args.reuse_bank:
        bank = Bank.open(args.bank)
        config = BuildConfig.from_dict(bank.manifest["build"])
    else:
        bank = build(
            teacher,
            train_set,
            args.bank,
            config,
            teacher_info={"name": meta["model"]},
            overwrite=True,
        )
    _, profile_set = training_subsets(train_set, config)
    target = Target.parse(config.target)
    profiles, decomposition, descendants = (
        bank.profile,
        bank.decomposition(),
        bank.load_descendants(),
    )
    fit_records = profiles.validation.get(target.name, {}).get("records", [])
    if args.profile_images:  # drops (and the logits the interaction fit needs) measured again
        profile_set = _held_out(train_set, config, args.profile_images)
        again = profile(decomposition, descendants, profile_set, target, config.profile)
        profiles = _with_other_targets(again, profiles)
        fit_records = []
    elif args.remeasure_latency:
        profiles = add_target(profiles, decomposition, descendants, target, config.profile)
    profiles.combine = args.combine
    timing = ProfileConfig(warmup=20, repeats=50)
    if len(fit_records) < args.fit_samples:  # the corrections' selections, as build measures them
        fit = validate(
            profiles, decomposition, descendants, profile_set, target,
            samples=args.fit_samples, seed=config.seed, config=timing,
        )  # fmt: skip
        profiles.validation[target.name] = fit
        fit_records = fit["records"]
    estimators = _estimators(profiles, fit_records)
    # the bank keeps what build would: the estimator and a correction that held out of sample
    if "fitted + block weights" in estimators:
        profiles.block_weights = estimators["fitted + block weights"].block_weights
    bank.update(profiles=profiles.to_dict())
    result = validate(
        profiles,
        decomposition,
        descendants,
        profile_set,
        target,
        samples=args.samples,
        seed=args.seed + 1,
        config=timing,
    )
    summary = {k: v for k, v in result.items() if k != "records"}
    summary["estimators"] = {
        name: _errors(variant, result["records"], target.name)
        for name, variant in estimators.items()
    }
    summary["gamma"] = profiles.gamma
    summary["fit_samples"] = len(fit_records)
    out = {
        # a reused bank keeps the settings it was built with (under "build")
        "command": command(
            "benchmarks/estimate_fidelity.py",
            args,
            skip={"out_json"}
            | ({"retrain_samples", "profile_samples", "epochs"} if args.reuse_bank else set()),
        ),
        **provenance(),
        "build": config.to_dict(),
        "timings": bank.manifest.get("timings", {}),
        **summary,
        "records": result["records"],
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _with_other_targets(new: BankProfile, old: BankProfile) -> BankProfile:
    """``new`` with the latencies ``old`` held for targets ``new`` did not measure."""
    for fresh, stale in zip(new.descendants, old.descendants, strict=True):
        for a, b in zip(fresh, stale, strict=True):
            a.latency_ms.update({k: v for k, v in b.latency_ms.items() if k not in a.latency_ms})
    new.frame.latency_ms.update(
        {k: v for k, v in old.frame.latency_ms.items() if k not in new.frame.latency_ms}
    )
    new.targets = {**old.targets, **new.targets}
    return new


def _estimators(profiles: BankProfile, fit: list[dict]) -> dict[str, BankProfile]:
    """Every estimator compared, its corrections fitted on the ``fit`` selections only."""
    plain = dict(correction=None, block_weights=None)
    variants = {
        "LegoDNN: drops summed in points": replace(profiles, combine="sum", **plain),
        "drops summed in log-odds": replace(profiles, combine="logit", **plain),
    }
    logit = variants["drops summed in log-odds"]
    costs = logit.costs()  # the records' summed costs are the bank's own estimator's
    on_logit = [
        {**r, "summed_cost": sum(costs[b][d] for b, d in enumerate(r["choices"]))} for r in fit
    ]
    correction = corrected_accuracy_errors(on_logit, logit)["correction"]
    variants["log-odds + monotone correction"] = replace(
        logit, correction=DropCorrection(**correction)
    )
    if profiles.fitted_costs is not None:
        fitted = replace(profiles, combine="fitted", **plain)
        variants["fitted (no measured selection)"] = fitted
        variants["fitted + block weights"] = replace(
            fitted, block_weights=fit_block_weights(fit, fitted)
        )
    return variants


def _errors(variant: BankProfile, records: list[dict], target: str) -> dict[str, float]:
    """Accuracy MAE (points) and Spearman of ``variant`` on the measured ``records``."""
    est = [estimate(variant, r["choices"], target)["accuracy"] for r in records]
    real = [r["measured_accuracy"] for r in records]
    return {
        "accuracy_mae_points": 100
        * statistics.fmean(abs(e - m) for e, m in zip(est, real, strict=True)),
        "accuracy_spearman": spearman(est, real),
    }


def _held_out(train_set, config: BuildConfig, n: int) -> Subset:
    """``n`` training images that retraining never saw: the bank's profiling images first, then
    those after the retraining images in the same seeded order."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed))
    retrain, profiled = training_subsets(train_set, config)
    unused = order[len(profiled) + len(retrain) :].tolist()
    return Subset(train_set, (list(profiled.indices) + unused)[:n])


if __name__ == "__main__":
    main()
