"""ONNX Runtime composition: chained per-block sessions against one merged graph per selection.

For the shipped Fashion-MNIST ResNet-20 and its descendants (default sparsities, not retrained:
timing does not depend on the weights), over random selections at batch 1 on one thread:

- latency per inference of the chained sessions, the merged graph, a monolithic export of the same
  selection (``export_selection``) and torch eager, timed round-robin side by side (one call of each
  per round) so that drift of the shared machine cancels; overhead = design / monolithic;
- switch time of each design: swapping one block, and swapping every block (to the next
  selection), and the first inference after the swap;
- export seconds per descendant with the TorchScript exporter (the default) and, on a few, with the
  dynamo exporter.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blockscale import compose, derive, extract, load_checkpoint
from blockscale._provenance import command, provenance
from blockscale.export import export_frame, export_onnx, export_selection
from blockscale.ort import (
    ChainedSession,
    MergedSession,
    OnnxFrame,
    inference_session,
    round_robin_latency,
)

DESIGNS = {"chained": ChainedSession, "merged": MergedSession}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _export_times(decomposition, families, dynamo_blocks: int) -> tuple[OnnxFrame, list, dict]:
    """Export the frame and every descendant (default exporter, checked), timing each, and time a
    few descendants with the dynamo exporter; returns the frame, the models and the times."""
    start = time.perf_counter()
    frame = export_frame(decomposition)
    frame_seconds = time.perf_counter() - start
    models, seconds = [], []
    for info, family in zip(decomposition.plan.blocks, families, strict=True):
        example = (torch.zeros(1, *info.input_shape),)
        models.append([])
        for desc in family:
            start = time.perf_counter()
            models[-1].append(export_onnx(desc.module, example))
            seconds.append(time.perf_counter() - start)
    dynamo = []
    for info, family in list(zip(decomposition.plan.blocks, families, strict=True))[:dynamo_blocks]:
        start = time.perf_counter()
        export_onnx(family[0].module, (torch.zeros(1, *info.input_shape),), exporter="dynamo")
        dynamo.append(time.perf_counter() - start)
    report = {
        "frame_pieces_seconds": frame_seconds,
        "torchscript_seconds_per_descendant": _summary(seconds),
        "torchscript_total_seconds": sum(seconds),
        "dynamo_seconds_per_descendant": dynamo,
        "descendants": len(seconds),
    }
    return frame, models, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/resnet20-fashion-mnist.safetensors")
    parser.add_argument("--selections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dynamo-blocks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/ort_compose.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    teacher, _ = load_checkpoint(args.checkpoint)
    decomposition = extract(teacher, torch.randn(1, 1, 28, 28))
    families = derive(decomposition)
    frame, models, export_report = _export_times(decomposition, families, args.dynamo_blocks)
    n, k = decomposition.plan.num_blocks, len(families[0])
    selections = [[rng.randrange(k) for _ in range(n)] for _ in range(args.selections + 1)]
    x = np.random.default_rng(args.seed).standard_normal((1, 1, 28, 28), dtype=np.float32)
    xt = torch.from_numpy(x)
    rows = []
    for i, selection in enumerate(selections[:-1]):
        blocks = [f[s].module for f, s in zip(families, selection, strict=True)]
        composed = compose(decomposition, blocks).eval()
        with tempfile.TemporaryDirectory() as tmp:
            model = export_selection(decomposition, blocks, Path(tmp) / "selection.onnx")
        monolithic = inference_session(model, args.threads)
        chosen = [f[s] for f, s in zip(models, selection, strict=True)]
        sessions = {name: cls(frame, chosen, threads=args.threads) for name, cls in DESIGNS.items()}

        def eager(composed=composed):
            with torch.no_grad():
                return composed(xt)

        expected = eager().numpy()
        diffs = {
            "monolithic": float(np.abs(monolithic.run(None, {"input": x})[0] - expected).max()),
            **{name: float(np.abs(s(x) - expected).max()) for name, s in sessions.items()},
        }
        latency = round_robin_latency(
            {"monolithic": lambda m=monolithic: m.run(None, {"input": x}), "eager": eager}
            | {name: (lambda s=s: s(x)) for name, s in sessions.items()},
            rounds=args.rounds,
            warmup=args.warmup,
        )
        switches = {}
        following = selections[i + 1]
        block = rng.randrange(n)
        other = rng.choice([d for d in range(k) if d != selection[block]])
        for name, session in sessions.items():
            one = session.swap({block: models[block][other]})
            start = time.perf_counter()
            session(x)
            first_one = time.perf_counter() - start
            every = session.swap({b: models[b][d] for b, d in enumerate(following)})
            start = time.perf_counter()
            session(x)
            first_all = time.perf_counter() - start
            switches[name] = {
                "swap_one_seconds": one.seconds,
                "first_call_after_one_seconds": first_one,
                "swap_all_seconds": every.seconds,
                "first_call_after_all_seconds": first_all,
            }
        rows.append(
            {"selection": selection, "latency_seconds": latency, "max_abs_diff": diffs}
            | {"switch": switches}
        )
        print(
            f"selection {i + 1}/{args.selections}: "
            + ", ".join(f"{name} {t * 1e3:.3f} ms" for name, t in latency.items())
        )

    def across(get) -> dict[str, float]:
        return _summary([get(r) for r in rows])

    summary = {
        "latency_ms": {
            name: across(lambda r, name=name: r["latency_seconds"][name] * 1e3)
            for name in ("monolithic", "merged", "chained", "eager")
        },
        "overhead_vs_monolithic": {
            name: across(
                lambda r, name=name: r["latency_seconds"][name] / r["latency_seconds"]["monolithic"]
            )
            for name in ("merged", "chained", "eager")
        },
        "switch_ms": {
            name: {
                key.replace("_seconds", ""): across(
                    lambda r, name=name, key=key: r["switch"][name][key] * 1e3
                )
                for key in rows[0]["switch"][name]
            }
            for name in DESIGNS
        },
        "max_abs_diff_vs_torch": max(max(r["max_abs_diff"].values()) for r in rows),
        "export": export_report,
    }
    result = {
        "command": command("benchmarks/ort_compose.py", args),
        **provenance(),
        "args": vars(args),
        "blocks": n,
        "descendants_per_block": k,
        "summary": summary,
        "selections": rows,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
