"""The paper's claims against model-level baselines, measured: ``blockscale bench`` as a script.

For ResNet-20, VGG-11 and MobileNetV2 on Fashion-MNIST (teachers from ``blockscale train``), see
``blockscale.bench`` for what is measured. ``--quick`` runs everything on tiny subsets in a few
minutes. Writes ``OUT/bench.json`` and one figure per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from blockscale.bench import BenchConfig, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vgg11_bn,mobilenetv2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--validate-samples", type=int)
    parser.add_argument("--round-to", type=int, help="1: exact widths (default 8)")
    parser.add_argument("--target")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/paper")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = tuple(args.models.split(","))
    config = BenchConfig.quick(names) if args.quick else BenchConfig(models=names)
    changes = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("train_images", args.train_images),
            ("validate_samples", args.validate_samples),
            ("round_to", args.round_to),
            ("target", args.target),
        )
        if v is not None
    }
    result = run_bench(dataclasses.replace(config, **changes), args.out)
    print(json.dumps(result["goals"], indent=1))


if __name__ == "__main__":
    main()
