"""Estimate fidelity: the additive (LegoDNN) estimate against measured random selections.

Builds a bank from the shipped ResNet-20 teacher (or opens one), then measures ``--samples`` random
selections end to end on the images the drops were profiled on (the estimate is defined on them)
and compares with the estimate: accuracy MAE (points) and Spearman, latency MAPE and Spearman.
Also reports the monotone drop correction by leave-one-out, next to the plain sum.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import Subset

from blockscale import Bank, BuildConfig, build, load_checkpoint, load_dataset
from blockscale.pipeline import training_subsets
from blockscale.profile import ProfileConfig, add_target, profile, validate
from blockscale.retrain import RetrainConfig
from blockscale.targets import Target, machine


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
    parser.add_argument("--combine", choices=("sum", "logit"), default="logit")
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
        validate_samples=0,
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
    if args.profile_images:  # drops and latencies measured again, on more images
        profile_set = _held_out(train_set, config, args.profile_images)
        profiles = profile(decomposition, descendants, profile_set, target, config.profile)
        bank.update(profiles=profiles.to_dict())
    elif args.remeasure_latency:
        profiles = add_target(profiles, decomposition, descendants, target, config.profile)
        bank.update(profiles=profiles.to_dict())
    profiles.combine = args.combine
    result = validate(
        profiles,
        decomposition,
        descendants,
        profile_set,
        target,
        samples=args.samples,
        seed=args.seed + 1,
        config=ProfileConfig(warmup=20, repeats=50),
    )
    summary = {k: v for k, v in result.items() if k != "records"}
    out = {
        "command": "python benchmarks/estimate_fidelity.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k != "out_json"
            and v is not False
            # a reused bank keeps the settings it was built with (under "build")
            and not (args.reuse_bank and k in ("retrain_samples", "profile_samples", "epochs"))
        ),
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "build": config.to_dict(),
        "timings": bank.manifest.get("timings", {}),
        **summary,
        "records": result["records"],
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _held_out(train_set, config: BuildConfig, n: int) -> Subset:
    """``n`` training images that retraining never saw: the bank's profiling images first, then
    those after the retraining images in the same seeded order."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed))
    retrain, profiled = training_subsets(train_set, config)
    unused = order[len(profiled) + len(retrain) :].tolist()
    return Subset(train_set, (list(profiled.indices) + unused)[:n])


if __name__ == "__main__":
    main()
