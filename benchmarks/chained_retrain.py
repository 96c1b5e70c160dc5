"""Chained block retraining against LegoDNN's local distillation: what a selection that prunes many
blocks keeps.

For each zoo model with a teacher checkpoint, descendants are derived at the default sparsities
(widths rounded to multiples of 8) and retrained once per ``--chains`` value
(``RetrainConfig.chain``: the share of each batch a descendant sees through the previous block's
descendant at its level; 0 is LegoDNN's purely local distillation), from the same images, epochs
and seed. Each is then measured on the test images, composed whole: every block at one level (the
uniform selections, where errors compound most), and ``--selections`` random selections, the same
for every value. Retraining seconds are reported beside, timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from blockscale import DeriveConfig, derive, extract, load_checkpoint, load_dataset
from blockscale._provenance import command, provenance
from blockscale.data import subset
from blockscale.extract import compose
from blockscale.pipeline import BuildConfig, training_subsets
from blockscale.retrain import RetrainConfig, retrain
from blockscale.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,mobilenetv2")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--chains", default="0,0.5,1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--selections", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/chained_retrain.json")
    args = parser.parse_args()
    train_set = load_dataset(args.dataset, "train")
    test_set = subset(load_dataset(args.dataset, "test"), args.test_images, seed=args.seed)
    # the images a build with these settings retrains on (as the paper benchmark's banks)
    retrain_set, _ = training_subsets(
        train_set, BuildConfig(retrain_samples=args.train_images, seed=args.seed)
    )
    results = {}
    for name in args.models.split(","):
        teacher, _ = load_checkpoint(Path(args.checkpoints) / f"{name}-{args.dataset}.safetensors")
        decomposition = extract(teacher.eval(), torch.zeros(1, *train_set[0][0].shape))
        levels = len(DeriveConfig().sparsities)
        rng = random.Random(args.seed)
        picks = [
            [rng.randrange(levels) for _ in decomposition.blocks] for _ in range(args.selections)
        ]
        results[name] = {"teacher_test_accuracy": 100 * evaluate(teacher, test_set)}
        for chain in (float(c) for c in args.chains.split(",")):
            families = derive(decomposition, DeriveConfig())
            config = RetrainConfig(epochs=args.epochs, seed=args.seed, chain=chain)
            start = time.perf_counter()
            retrain(decomposition, families, retrain_set, config, progress=False)
            seconds = time.perf_counter() - start

            n = len(decomposition.blocks)
            uniform = {
                str(level): _accuracy(decomposition, families, [level] * n, test_set)
                for level in range(1, levels)
            }
            random_acc = [_accuracy(decomposition, families, c, test_set) for c in picks]
            results[name][f"chain {chain:g}"] = {
                "retrain_seconds": seconds,
                "uniform_test_accuracy": uniform,
                "random_median_test_accuracy": statistics.median(random_acc),
                "random_min_test_accuracy": min(random_acc),
            }
            print(name, chain, json.dumps(results[name][f"chain {chain:g}"]), flush=True)
    out = {"command": command("benchmarks/chained_retrain.py", args), **provenance()}
    out["models"] = results
    Path(args.out_json).write_text(json.dumps(out, indent=1))


def _accuracy(decomposition, families, choices: list[int], test_set) -> float:
    """Test accuracy (%) of the selection ``choices``, composed whole."""
    blocks = [families[b][d].module for b, d in enumerate(choices)]
    return 100 * evaluate(compose(decomposition, blocks).eval(), test_set)


if __name__ == "__main__":
    main()
