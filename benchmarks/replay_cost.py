"""Scaling cost: switching blocks against model-level scaling, on generated resource traces.

On the ResNet-20 bank of ``benchmarks/estimate_fidelity.py``, for each target (ort-1t, torch-1t) and
each trace generator (steps, random-walk, phone: ``--steps`` steps each, fixed seeds) spanning the
bank's range on that target (``blockscale.replay.budget_range``), ``blockscale.replay.replay`` runs
the runtime through the trace, switching blocks, against model-level scaling (one whole model per
sparsity level, every block reloaded on a switch), both for real on the target and with the
definitions of ``blockscale.replay``. Reported per trace and target: bytes loaded, switch seconds
(total and median), mean accuracy over the steps both met (estimated, and measured on
``--test-images`` Fashion-MNIST test images for every distinct selection), and the bytes again as
if the teacher's blocks were not kept resident (on both sides).

Each ``--policy`` (a :class:`blockscale.multi.SwitchCost`: a price per changed block and per MiB
loaded, and a hysteresis margin) runs every trace again with that policy applied to both methods
alike; every row is also compared with the model level of the 'free' policy (no switching cost,
the paper's baseline, which switches to the best variant that fits at every step).

Then, per target, switch time against a full reload of the same selection: ``--reloads`` random
changes of 1 to 9 blocks, each timed as the runtime's switch from the live selection and as a switch
of a second runtime to the same selection from one that shares no block with it (every block
loaded, and on ONNX Runtime exported, then the model built; the frame stays resident in both).

Run with ``OMP_NUM_THREADS=1``; it writes ``--out-json`` and a figure, ``--out-plot``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from blockscale import Bank, compose, evaluate, load_dataset
from blockscale._provenance import command, provenance
from blockscale.bank import json_safe
from blockscale.data import subset
from blockscale.multi import SwitchCost
from blockscale.replay import METHODS, ReplayResult, budget_range, plot_replay, replay
from blockscale.runtime import Runtime, RuntimeConfig
from blockscale.traces import GENERATORS
from blockscale.types import Budget

SEEDS = {"steps": 1, "random-walk": 2, "phone": 3}
_TARGET_COLOURS = ("tab:green", "tab:purple", "tab:red", "tab:brown")
Choices = tuple[int, ...]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default="benchmarks/results/fidelity-bank")
    parser.add_argument("--targets", default="ort-1t,torch-1t")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=2000, help="0: estimates only")
    parser.add_argument("--reloads", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--policy",
        action="append",
        help="a switching policy, applied to both methods: 'free' (no cost) or SwitchCost fields, "
        "e.g. 'hysteresis=0.005' or 'per_mb=0.1,hysteresis=0.01' (accuracy as a fraction); "
        "repeat for several (default: free). 'free' always runs: it is the paper's baseline",
    )
    parser.add_argument(
        "--onnx",
        default=None,
        help="the bank's ONNX export (blockscale export BANK --out DIR): ONNX Runtime targets "
        "read descendants from it on both sides instead of exporting them at switch time",
    )
    parser.add_argument("--out-json", default="benchmarks/results/replay_cost.json")
    parser.add_argument("--out-plot", default="benchmarks/results/replay_cost.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bank = Bank.open(args.bank)
    targets = args.targets.split(",")

    policies = {"free": None} | {p: _policy(p) for p in args.policy or () if p != "free"}
    results: dict[tuple[str, str, str], ReplayResult] = {}
    seconds: dict[tuple[str, str, str], float] = {}
    spans = {target: budget_range(bank, target) for target in targets}
    for policy, cost in policies.items():
        config = RuntimeConfig(cache_bytes=0, switch_cost=cost)
        for target, (low, high) in spans.items():
            for kind, seed in SEEDS.items():
                key = (policy, kind, target)
                start = time.perf_counter()
                trace = GENERATORS[kind](low, high, args.steps, seed=seed)
                onnx = args.onnx if target.startswith("ort") else None
                results[key] = replay(bank, trace, target, config, onnx_export=onnx)
                seconds[key] = time.perf_counter() - start
                print(f"replayed {' '.join(key)} in {seconds[key]:.1f} s", file=sys.stderr)
    for (policy, kind, target), result in results.items():
        if kind == "steps" and target == targets[0]:
            tag = policy.replace("=", "").replace(",", "-")
            name = f"replay-{kind}-{target}" + ("" if policy == "free" else f"-{tag}")
            plot_replay(result, Path(args.out_plot).with_name(f"{name}.png"))

    selections = {
        getattr(step, m).selection.choices
        for r in results.values()
        for step in r.steps
        for m in METHODS
    }
    measured = _measure(bank, selections, args.test_images, args.seed)
    teacher_bytes = [bank.file_bytes(b, 0) for b in range(bank.plan.num_blocks)]
    rows = [
        _row(key, result, spans[key[2]], measured, teacher_bytes, seconds[key])
        for key, result in results.items()
    ]
    _against_paper_baseline(rows)
    rng = random.Random(args.seed)
    reloads = {
        target: _switch_against_reload(
            bank, target, args.reloads, rng, args.onnx if target.startswith("ort") else None
        )
        for target in targets
    }

    out = json_safe(
        {
            "command": command("benchmarks/replay_cost.py", args, skip=("out_json", "out_plot")),
            **provenance(),
            "bank": args.bank,
            "definitions": {
                "bytes_loaded": "descendant weight files read from the bank; the frame and the "
                "teacher's own blocks stay resident on both sides (bytes_loaded_teacher_not_"
                "resident counts the teacher's blocks as read too, on both sides)",
                "model_level": "one variant per sparsity level (uniform across blocks); each step "
                "takes the most accurate variant whose estimate fits; a switch reloads every block",
                "caches": "none on either side beyond the live descendants",
                "policy": "the switching cost both methods switch under (SwitchCost fields; free: "
                "none); *_vs_free_model_level compares with the model level of the free policy",
                "switch_seconds": "wall time per step, deciding included; median over the steps "
                "that switched",
                "background_seconds": "ONNX Runtime's adaptive design: merging the selection "
                "into one session after the switch has published its chain; awaited after each "
                "step, outside switch_seconds",
                "model_form": "on ONNX Runtime a whole-model variant runs as one merged session",
                "mean_accuracy": "per step, over the steps both methods met, of the live selection "
                "(estimated; measured on the test images)",
                "start": "both start at the teacher; the first step's switch counts",
            },
            "test_images": args.test_images,
            "summary": _headline(rows, reloads),
            "replays": rows,
            "switch_against_reload": reloads,
        }
    )
    Path(args.out_json).write_text(json.dumps(out, indent=2) + "\n")
    _plot([r for r in rows if r["policy"] == list(policies)[-1]], reloads, args.out_plot)
    print(json.dumps(out["summary"], indent=2))


def _measure(bank: Bank, selections: set[Choices], images: int, seed: int) -> dict[Choices, float]:
    """Top-1 accuracy of every selection on ``images`` Fashion-MNIST test images (none: empty)."""
    if not images:
        return {}
    data = subset(load_dataset("fashion-mnist", "test"), images, seed=seed)
    decomposition = bank.decomposition()
    loaded: dict[tuple[int, int], torch.nn.Module] = {}

    def part(key: tuple[int, int]) -> torch.nn.Module:
        if key not in loaded:
            loaded[key] = bank.load_descendant(*key)
        return loaded[key]

    accuracy = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for choices in sorted(selections):
            model = compose(decomposition, [part((b, d)) for b, d in enumerate(choices)]).eval()
            accuracy[choices] = evaluate(model, data)
    print(
        f"measured {len(selections)} selections in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return accuracy


def _policy(text: str) -> SwitchCost:
    """``per_mb=0.1,hysteresis=0.01`` as a SwitchCost."""
    fields = dict(item.split("=", 1) for item in text.split(","))
    return SwitchCost(**{k.strip(): float(v) for k, v in fields.items()})


def _row(
    key: tuple[str, str, str],
    result: ReplayResult,
    span: tuple[Budget, Budget],
    measured: dict[Choices, float],
    teacher_bytes: list[int],
    seconds: float,
) -> dict[str, Any]:
    """One replay's summaries, with the measured accuracies and the teacher-not-resident bytes."""
    policy, kind, _ = key
    row: dict[str, Any] = {
        "policy": policy,
        "switch_cost": result.config.to_dict()["switch_cost"],
        "trace": kind,
        "seed": SEEDS[kind],
        "target": result.target,
        "steps": len(result.steps),
        "low": span[0].to_dict(),
        "high": span[1].to_dict(),
        "replay_seconds": seconds,
    }
    both = [s for s in result.steps if s.blockscale.feasible and s.model_level.feasible]
    for method in METHODS:
        summary = result.summary(method).to_dict()
        summary["bytes_loaded_teacher_not_resident"] = sum(
            r.bytes_loaded + sum(teacher_bytes[b] for b in r.changed if r.selection.choices[b] == 0)
            for r in result.responses(method)
        )
        if measured:
            summary["measured_mean_accuracy"] = statistics.fmean(
                measured[getattr(s, method).selection.choices] for s in both
            )
        row[method] = summary
    ours, theirs = row["blockscale"], row["model_level"]
    row["comparison"] = {
        **result.comparison(),
        "bytes_fewer_percent_teacher_not_resident": 100
        * (
            1
            - ours["bytes_loaded_teacher_not_resident"]
            / theirs["bytes_loaded_teacher_not_resident"]
        ),
    }
    if measured:
        row["comparison"]["measured_accuracy_gain_points"] = 100 * (
            ours["measured_mean_accuracy"] - theirs["measured_mean_accuracy"]
        )
    return row


def _against_paper_baseline(rows: list[dict[str, Any]]) -> None:
    """Each row's blockscale side against the model level of the 'free' policy on the same trace
    and target (a variant switch at every step where a better one fits, as the paper's baseline)."""
    free = {(r["trace"], r["target"]): r["model_level"] for r in rows if r["policy"] == "free"}
    for r in rows:
        theirs, ours = free[r["trace"], r["target"]], r["blockscale"]
        r["comparison"]["bytes_fewer_percent_vs_free_model_level"] = 100 * (
            1 - ours["bytes_loaded"] / theirs["bytes_loaded"]
        )
        r["comparison"]["switch_seconds_ratio_vs_free_model_level"] = (
            ours["switch_seconds"] / theirs["switch_seconds"]
        )
        if "measured_mean_accuracy" in ours:
            r["comparison"]["measured_accuracy_gain_points_vs_free_model_level"] = 100 * (
                ours["measured_mean_accuracy"] - theirs["measured_mean_accuracy"]
            )


def _switch_against_reload(
    bank: Bank, target: str, samples: int, rng: random.Random, onnx: str | None
) -> dict[str, Any]:
    """The runtime's switch for random changes of 1 to n blocks (its background merge, if any,
    awaited and timed apart), against a switch of a second runtime, one merged session, to the
    same selection from one sharing no block with it (a full reload)."""
    live = Runtime(bank, target, RuntimeConfig(cache_bytes=0), onnx_export=onnx)
    cold = Runtime(bank, target, RuntimeConfig(cache_bytes=0, design="merged"), onnx_export=onnx)
    blocks, levels = bank.plan.num_blocks, len(bank.derive_config.sparsities)
    runs = []
    for i in range(samples):
        current = live.selection.choices
        choices = list(current)
        for b in rng.sample(range(blocks), 1 + i % blocks):
            choices[b] = rng.choice([d for d in range(levels) if d != current[b]])
        live.settle()
        merged_before = live.refine_seconds
        switch = live.set_selection(choices)
        live.settle()
        cold.set_selection([(d + 1) % levels for d in choices])
        reload = cold.set_selection(choices)
        runs.append(
            {
                "choices": choices,
                "blocks_changed": len(switch.changed),
                "switch_seconds": switch.seconds,
                "switch_bytes": switch.bytes_loaded,
                "background_seconds": live.refine_seconds - merged_before,
                "reload_seconds": reload.seconds,
                "reload_bytes": reload.bytes_loaded,
            }
        )
    by_blocks = {
        m: {
            "median_switch_seconds": statistics.median(r["switch_seconds"] for r in group),
            "median_reload_seconds": statistics.median(r["reload_seconds"] for r in group),
            "median_background_seconds": statistics.median(r["background_seconds"] for r in group),
        }
        for m in range(1, blocks + 1)
        if (group := [r for r in runs if r["blocks_changed"] == m])
    }
    switch = statistics.median(r["switch_seconds"] for r in runs)
    reload = statistics.median(r["reload_seconds"] for r in runs)
    return {
        "samples": samples,
        "median_switch_seconds": switch,
        "median_reload_seconds": reload,
        "median_background_seconds": statistics.median(r["background_seconds"] for r in runs),
        "median_ratio": switch / reload,
        "median_per_sample_ratio": statistics.median(
            r["switch_seconds"] / r["reload_seconds"] for r in runs
        ),
        "switch_bytes": sum(r["switch_bytes"] for r in runs),
        "reload_bytes": sum(r["reload_bytes"] for r in runs),
        "by_blocks_changed": by_blocks,
        "runs": runs,
    }


def _headline(rows: list[dict[str, Any]], reloads: dict[str, Any]) -> dict[str, Any]:
    """Totals over every trace, per target and over all."""
    groups = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        groups |= {f"{policy} {t}": [r for r in mine if r["target"] == t] for t in reloads}
        groups[f"{policy} all"] = mine
    free = {(r["trace"], r["target"]): r["model_level"] for r in rows if r["policy"] == "free"}
    headline = {}
    for name, group in groups.items():
        total = {
            m: {
                key: sum(r[m][key] for r in group)
                for key in (
                    "bytes_loaded",
                    "bytes_loaded_teacher_not_resident",
                    "switch_seconds",
                    "background_seconds",
                    "switches",
                )
            }
            for m in METHODS
        }
        for m in METHODS:
            for key in ("mean_accuracy", "measured_mean_accuracy"):
                if key in group[0][m]:
                    total[m][key] = statistics.fmean(r[m][key] for r in group)
        ours, theirs = total["blockscale"], total["model_level"]
        headline[name] = {
            **total,
            "bytes_fewer_percent": 100 * (1 - ours["bytes_loaded"] / theirs["bytes_loaded"]),
            "bytes_fewer_percent_teacher_not_resident": 100
            * (
                1
                - ours["bytes_loaded_teacher_not_resident"]
                / theirs["bytes_loaded_teacher_not_resident"]
            ),
            "switch_seconds_ratio": ours["switch_seconds"] / theirs["switch_seconds"],
            "seconds_with_background_ratio_vs_free_model_level": (
                ours["switch_seconds"] + ours["background_seconds"]
            )
            / sum(free[r["trace"], r["target"]]["switch_seconds"] for r in group),
            "bytes_fewer_percent_vs_free_model_level": 100
            * (
                1
                - ours["bytes_loaded"]
                / sum(free[r["trace"], r["target"]]["bytes_loaded"] for r in group)
            ),
            "switch_seconds_ratio_vs_free_model_level": ours["switch_seconds"]
            / sum(free[r["trace"], r["target"]]["switch_seconds"] for r in group),
        }
        if "measured_mean_accuracy" in ours:
            headline[name]["measured_accuracy_gain_points_vs_free_model_level"] = 100 * (
                ours["measured_mean_accuracy"]
                - statistics.fmean(
                    free[r["trace"], r["target"]]["measured_mean_accuracy"] for r in group
                )
            )
        target = name.split(" ", 1)[1]
        if target in reloads:
            headline[name]["switch_against_reload_median_ratio"] = reloads[target]["median_ratio"]
    return headline


def _plot(rows: list[dict[str, Any]], reloads: dict[str, Any], path: str) -> None:
    """Bytes, switch seconds and accuracy per trace and target; switch against reload per target."""
    fig = Figure(figsize=(11, 7.5), dpi=120)
    axes = fig.subplots(2, 2)
    labels = [f"{r['trace']}\n{r['target']}" for r in rows]
    x = range(len(rows))
    colours = {"blockscale": "tab:blue", "model_level": "tab:orange"}
    names = {"blockscale": "blocks (blockscale)", "model_level": "whole models (model level)"}
    accuracy = (
        "measured_mean_accuracy"
        if "measured_mean_accuracy" in rows[0]["blockscale"]
        else "mean_accuracy"
    )
    panels = (
        (axes[0][0], "bytes_loaded", 1 / 1024, "KiB loaded over the trace"),
        (axes[0][1], "switch_seconds", 1.0, "switch seconds over the trace"),
        (axes[1][0], accuracy, 100.0, f"mean accuracy (%, {accuracy.split('_')[0]})"),
    )
    for ax, key, scale, title in panels:
        for j, method in enumerate(METHODS):
            ax.bar(
                [i + (j - 0.5) * 0.38 for i in x],
                [r[method][key] * scale for r in rows],
                width=0.38,
                color=colours[method],
                label=names[method],
            )
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[1][0].set_ylim(bottom=min(100 * r[m][accuracy] for r in rows for m in METHODS) - 5)
    axes[0][0].legend(fontsize=8, loc="upper center")
    ax = axes[1][1]
    for (target, data), colour in zip(reloads.items(), _TARGET_COLOURS, strict=False):
        steps = sorted(data["by_blocks_changed"])
        ax.plot(
            steps,
            [1e3 * data["by_blocks_changed"][m]["median_switch_seconds"] for m in steps],
            "o-",
            color=colour,
            label=f"switch, {target} (median)",
        )
        ax.axhline(
            1e3 * data["median_reload_seconds"],
            linestyle="--",
            color=colour,
            label=f"full reload, {target} (median)",
        )
    ax.set_xlabel("blocks changed")
    ax.set_ylabel("ms")
    ax.set_title("switch against a full reload of the same selection", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("ResNet-20 bank: scaling cost of switching blocks against whole models")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
