"""Latency on targets never measured: proxy transfer and the scalable predictor, measured.

On a ResNet-20 bank of 9 blocks x 6 descendants built with the defaults (kept widths rounded to
multiples of 8), ``--bank``, made by ``blockscale build --model resnet20 --dataset fashion-mnist
--epochs 5 --retrain-samples 6000 --profile-samples 2000 --validate-samples 20 --out
benchmarks/results/transfer-bank``, in one run:

- every descendant is timed on every target (torch and ONNX Runtime at 1 and 2 threads, ONNX
  Runtime int8 at 1 and 2, TFLite with ``--tflite``); the rank agreement (Spearman) of block
  latencies between every pair of targets, drawn as a heat map;
- ``--selections`` random selections, the same on every target, are measured end to end there, in
  round-robin turns with the teacher;
- proxy transfer: for every target but the proxy and every k in ``--k``, k descendants (and the
  frame) taken as measured on the target, every other descendant predicted by calibrating the
  proxy's numbers (``blockscale.transfer``, what ``blockscale calibrate`` does); Spearman and MAPE
  of the predicted latency of every measured selection. Twice: from the fixed ``--proxy``, and
  from the proxy ``calibrate`` chooses on the k samples among the other targets ("auto");
- selection on predicted numbers: at budgets of 30% to 100% of the teacher's measured latency on
  each target, the picks from the predictions at k = ``--select-k`` (fixed proxy; auto proxy;
  auto proxy with the budget shrunk by its held-out MAPE), measured there (does it meet the
  budget?) and against the pick from the target's full profile (estimated accuracy lost);
- the selection-level latency correction a validated build fits
  (``blockscale.profile.LatencyCorrection``): fitted on the first ``--correct-on`` measured
  selections, applied to the target's own profile and to the auto prediction at k =
  ``--select-k``, scored on the other selections and in the picks; and the margin for
  ``--confidence`` that a validated build keeps with it (``Bank.select(..., confidence=)``),
  drawn from the same selections' leave-one-out residuals, in the picks; and the same margin
  drawn instead from ``--correct-on`` selections along the kept estimate's frontier, measured
  there (the kind of selection the solver picks, where a random selection's residual understates
  the error; what a build's ``validate_frontier`` and ``calibrate --frontier`` now keep);
- the scalable predictor (target features and descendant features to latency), leave one target
  out: each target predicted from the others and its probe-block signature alone;
- an amortised optimizer (nearest known target by signature, its stored exact picks per budget
  fraction) against the exact selector on the predicted numbers: time per new target and query,
  optimality gap, budget violations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from blockscale import Bank
from blockscale._provenance import command, provenance
from blockscale.errors import InfeasibleBudgetError
from blockscale.profile import (
    LatencyCorrection,
    ProfileConfig,
    add_target,
    corrected_latency_errors,
    estimate,
    kept_latency_estimate,
    spearman,
)
from blockscale.select import CostTable, frontier, solve
from blockscale.targets import Target
from blockscale.transfer import (
    LatencyPredictor,
    TargetSignature,
    choose_proxy,
    choose_samples,
    descendant_features,
    held_out_errors,
    leave_one_target_out,
    predict_target,
    probe_keys,
    profile_rows,
    spread_target,
)
from blockscale.types import Budget

FRACTIONS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default="benchmarks/results/transfer-bank")
    parser.add_argument("--proxy", default="ort-2t")
    parser.add_argument("--tflite", action="store_true", help="also profile tflite-1t")
    parser.add_argument("--selections", type=int, default=30)
    parser.add_argument("--k", default="0,5,10,20")
    parser.add_argument("--select-k", type=int, default=10)
    parser.add_argument(
        "--correct-on", type=int, default=10, help="measured selections the correction is fit on"
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="the picks' confidence of meeting a budget"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--reprofile", action="store_true", help="time targets already profiled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/latency_transfer.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    bank = Bank.open(args.bank)
    decomposition, descendants = bank.decomposition(), bank.load_descendants()
    names = ["torch-1t", "torch-2t", "ort-1t", "ort-2t", "ortq-1t", "ortq-2t"]
    names += ["tflite-1t"] if args.tflite else []
    profiles = bank.profile
    measure = ProfileConfig()
    for name in names:
        if args.reprofile or name not in profiles.targets:
            profiles = add_target(profiles, decomposition, descendants, Target.parse(name), measure)
    bank.update(profiles=profiles.to_dict())
    bank = Bank.open(args.bank)
    keys = [(b, d) for b, family in enumerate(profiles.descendants) for d in range(len(family))]

    def block_ms(name: str) -> list[float]:
        return [profiles.descendants[b][d].latency_ms[name] for b, d in keys]

    rank = {a: {b: spearman(block_ms(a), block_ms(b)) for b in names} for a in names}
    rng = random.Random(args.seed)
    selections = [[0] * len(descendants)] + [
        [rng.randrange(len(f)) for f in descendants] for _ in range(args.selections)
    ]
    measured = {
        name: _measure(decomposition, descendants, selections, name, args) for name in names
    }

    def selection_ms(latency: dict[tuple[int, int], float], frame: float) -> np.ndarray:
        return np.array([frame + sum(latency[(b, d)] for b, d in enumerate(c)) for c in selections])

    transfer = {}
    for name in names:
        if name == args.proxy:
            continue
        truth = np.array(measured[name]["ms"])
        rows = {}
        for k in ks:
            predicted, frame, _ = _predict(profiles, keys, args.proxy, name, k, args.seed)
            rows[k] = _agreement(selection_ms(predicted, frame), truth)
            predicted, frame, chosen = _predict(profiles, keys, "auto", name, k, args.seed)
            rows[f"auto {k}"] = {
                **_agreement(selection_ms(predicted, frame), truth),
                "proxy": chosen["proxy"],
                "held_out_mape_percent": chosen["held_out_mape_percent"],
            }
        full = {key: profiles.descendants[key[0]][key[1]].latency_ms[name] for key in keys}
        rows["measured profile"] = _agreement(
            selection_ms(full, profiles.frame.latency_ms[name]), truth
        )
        auto, auto_frame, _ = _predict(profiles, keys, "auto", name, args.select_k, args.seed)
        held = [0, *range(args.correct_on + 1, len(selections))]  # the teacher, then held out
        for label, (latency, frame) in {
            "measured profile": (full, profiles.frame.latency_ms[name]),
            f"auto {args.select_k}": (auto, auto_frame),
        }.items():
            plain = selection_ms(latency, frame)
            fix = _correction(plain, frame, measured[name]["relative"], args.correct_on)
            rows[f"{label}, corrected"] = {
                **_agreement(np.array([fix(ms) for ms in plain[held]]), truth[held]),
                "uncorrected_relative_mape_percent": _agreement(plain[held], truth[held])[
                    "relative_mape_percent"
                ],
                "correction": fix.to_dict(),
            }
        transfer[name] = rows
    picks = {
        name: _picks(
            bank, profiles, keys, decomposition, descendants, args, name, selection_ms, measured
        )
        for name in names
        if name != args.proxy
    }
    predictor = _loto(bank, profiles, names, measured, selection_ms)
    amortised = _amortised(bank, profiles, keys, names, args)
    summary = _summary(transfer, picks, predictor, args)
    out = {
        "command": command("benchmarks/latency_transfer.py", args),
        **provenance(),
        "targets": names,
        "summary": summary,
        "block_latency_spearman": rank,
        "transfer": {t: {str(k): v for k, v in rows.items()} for t, rows in transfer.items()},
        "selection_on_predicted": picks,
        "predictor_leave_one_target_out": predictor,
        "amortised_optimizer": amortised,
        "measured_selections": {name: {"choices": selections, **m} for name, m in measured.items()},
    }
    path = Path(args.out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    _heat_map(rank, names, path.with_name("latency_transfer_spearman.png"))
    print(json.dumps({"summary": summary, "amortised_optimizer": amortised["summary"]}, indent=2))


def _measure(decomposition, descendants, selections, name, args) -> dict[str, list[float]]:
    """Every selection timed end to end on ``name``, the teacher (selection 0) in the same turns."""
    target = Target.parse(name)
    runner = target.runner(decomposition)
    calls = [runner.model([descendants[b][d].module for b, d in enumerate(c)]) for c in selections]
    spans = target.time_calls(calls, warmup=5, repeats=args.repeats, rounds=5)
    ms = [statistics.median(s) for s in spans]
    return {"ms": ms, "relative": [m / ms[0] for m in ms]}


def _predict(profiles, keys, proxy, name, k, seed):
    """Every descendant's latency on ``name`` from the proxy's and k of its own (and its frame,
    when k > 0); k = 0 gives the proxy's numbers as they are. ``proxy="auto"``: as ``calibrate``
    without a proxy, the samples spread over ``spread_target`` and the proxy ``choose_proxy``'s
    among the other targets. Also returns the proxy and its held-out MAPE."""
    spread = spread_target(profiles, name) if proxy == "auto" else proxy
    sampled = {
        key: profiles.descendants[key[0]][key[1]].latency_ms[name]
        for key in choose_samples(profiles, spread, k, seed)
    }
    if proxy == "auto":
        proxy, _ = choose_proxy(profiles, sampled, name)
    proxy_ms = {key: profiles.descendants[key[0]][key[1]].latency_ms[proxy] for key in keys}
    predicted = predict_target(proxy_ms, sampled)
    frame = profiles.frame.latency_ms[name if k else proxy]
    errors = held_out_errors(proxy_ms, sampled)
    held_out = 100 * statistics.fmean(map(abs, errors)) if errors else None
    return predicted, frame, {"proxy": proxy, "held_out_mape_percent": held_out}


def _agreement(estimate_ms: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Rank agreement and error of predicted selection latencies, absolute and relative to the
    teacher (selection 0) on each side, which cancels the machine's drift between the runs."""
    relative_estimate, relative_truth = estimate_ms / estimate_ms[0], truth / truth[0]
    return {
        "spearman": spearman(estimate_ms[1:], truth[1:]),
        "mape_percent": float(100 * np.mean(np.abs(estimate_ms[1:] / truth[1:] - 1))),
        "relative_mape_percent": float(
            100 * np.mean(np.abs(relative_estimate[1:] / relative_truth[1:] - 1))
        ),
    }


def _table(bank: Bank, latency: dict[tuple[int, int], float], frame: float, like: str) -> CostTable:
    """The bank's cost table on ``like`` with the latencies replaced."""
    table = bank.cost_table(like)
    grid = np.array(table.latency_ms)
    for (b, d), ms in latency.items():
        grid[b, d] = ms
    return dataclasses.replace(table, latency_ms=grid, frame_latency_ms=frame)


def _correction(
    plain_ms: np.ndarray, frame_ms: float, relative: list[float], n: int
) -> LatencyCorrection:
    """The correction of ``plain_ms`` (selection 0 the teacher; ``frame_ms`` the frame's part)
    fitted on selections 1 to ``n`` as measured relative to the teacher, as a validated build
    fits it."""
    ratios = plain_ms / plain_ms[0]
    return LatencyCorrection.fit(
        ratios[1 : n + 1], relative[1 : n + 1], float(plain_ms[0]), frame_ms
    )


def _kept(
    plain_ms: np.ndarray, frame_ms: float, relative: list[float], n: int
) -> LatencyCorrection:
    """What a validated build keeps from selections 1 to ``n`` (``blockscale.profile``'s
    ``kept_latency_estimate``): the correction or the plain sum, with its residuals."""
    ratios = plain_ms / plain_ms[0]
    records = [
        {"estimated_latency_ratio": e, "measured_latency_ratio": m}
        for e, m in zip(ratios[1 : n + 1], relative[1 : n + 1], strict=True)
    ]
    check = corrected_latency_errors(records, float(plain_ms[0]), frame_ms)
    check["relative_latency_mape_percent"] = 100 * statistics.fmean(
        abs(1 / r - 1) for r in check["plain_latency_residuals"]
    )
    return kept_latency_estimate(check)


def _corrected(
    latency: dict, frame: float, fix: LatencyCorrection, margin: float = 1.0
) -> tuple[dict, float]:
    return {key: margin * fix.scale * ms for key, ms in latency.items()}, margin * fix(frame)


def _picks(
    bank, profiles, keys, decomposition, descendants, args, name, selection_ms, measured
) -> list[dict]:
    """Picks at each budget fraction of the teacher's latency from the k = --select-k
    predictions (fixed proxy, auto proxy, auto proxy under the budget less its held-out MAPE,
    auto proxy through the selection-level correction, and through what a validated build keeps
    with the margin of ``--confidence``) and from the full profile (plain, corrected, and kept
    with the margin), all measured on ``name`` in one pass."""
    fixed, frame, _ = _predict(profiles, keys, args.proxy, name, args.select_k, args.seed)
    auto, auto_frame, chosen = _predict(profiles, keys, "auto", name, args.select_k, args.seed)
    margin = 1 - (chosen["held_out_mape_percent"] or 0.0) / 100
    full = {key: profiles.descendants[key[0]][key[1]].latency_ms[name] for key in keys}
    full_frame = profiles.frame.latency_ms[name]

    def fitted(latency: dict, frame: float) -> LatencyCorrection:
        return _correction(
            selection_ms(latency, frame), frame, measured[name]["relative"], args.correct_on
        )

    def kept(latency: dict, frame: float) -> LatencyCorrection:
        plain = selection_ms(latency, frame)
        return _kept(plain, frame, measured[name]["relative"], args.correct_on)

    def corrected(latency: dict, frame: float) -> tuple[dict, float]:
        return _corrected(latency, frame, fitted(latency, frame))

    def confident(latency: dict, frame: float) -> tuple[dict, float]:
        fix = kept(latency, frame)
        return _corrected(latency, frame, fix, fix.headroom(args.confidence))

    def confident_on_frontier(latency: dict, frame: float) -> tuple[dict, float]:
        """As ``confident``, the margin drawn instead from --correct-on selections of the kept
        estimate's frontier (the kind the solver picks), measured here beside the teacher."""
        fix = kept(latency, frame)
        points = frontier(_table(bank, *_corrected(latency, frame, fix), name))
        spread = np.linspace(0, len(points) - 1, args.correct_on).round().astype(int)
        choices = [tuple([0] * len(descendants))]
        choices += sorted({tuple(points[i].choices) for i in spread})
        timed = _measure(decomposition, descendants, choices, name, args)["relative"]
        teacher_ms = teacher(latency, frame)
        residuals = [
            ratio / (fix(frame + sum(latency[(b, d)] for b, d in enumerate(c))) / teacher_ms)
            for c, ratio in zip(choices[1:], timed[1:], strict=True)
        ]
        margin = dataclasses.replace(fix, residuals=residuals).headroom(args.confidence)
        return _corrected(latency, frame, fix, margin)

    def teacher(latency: dict, frame: float) -> float:
        return frame + sum(latency[(b, 0)] for b in range(len(descendants)))

    def source(latency: dict, frame: float, adjust=None) -> tuple[CostTable, float]:
        """A source's table (its latencies through ``adjust``, if any) and the teacher's latency
        by its own uncorrected numbers, which the budget is a fraction of (the same fraction of
        the teacher as measured is what it meets)."""
        table = _table(bank, *(adjust(latency, frame) if adjust else (latency, frame)), name)
        return table, teacher(latency, frame)

    auto_table, auto_teacher = source(auto, auto_frame)
    sources = {
        "predicted": source(fixed, frame),
        "auto": (auto_table, auto_teacher),
        "auto_margin": (auto_table, margin * auto_teacher),
        "auto_corrected": source(auto, auto_frame, corrected),
        "profiled": source(full, full_frame),
        "profiled_corrected": source(full, full_frame, corrected),
        "auto_confident": source(auto, auto_frame, confident),
        "profiled_confident": source(full, full_frame, confident),
        "auto_confident_frontier": source(auto, auto_frame, confident_on_frontier),
        "profiled_confident_frontier": source(full, full_frame, confident_on_frontier),
    }
    rows, picked = [], set()
    for fraction in FRACTIONS:
        row: dict = {"fraction": fraction, "auto_proxy": chosen["proxy"], "margin": margin}
        for source, (table, teacher_ms) in sources.items():
            try:
                pick = solve(table, Budget(latency_ms=fraction * teacher_ms))
            except InfeasibleBudgetError:
                row[source] = None
                continue
            row[source] = {
                "choices": list(pick.choices),
                "accuracy": estimate(profiles, pick.choices, name)["accuracy"],
            }
            picked.add(tuple(pick.choices))
        rows.append(row)
    unique = [tuple([0] * len(descendants)), *sorted(picked)]
    timed = _measure(decomposition, descendants, unique, name, args)
    ratio = dict(zip(unique, timed["relative"], strict=True))
    for row in rows:
        for source in sources:
            if row[source] is not None:
                r = ratio[tuple(row[source]["choices"])]
                row[source].update(
                    measured_ratio=r,
                    meets_budget=r <= row["fraction"] * 1.02,
                    meets_budget_strictly=r <= row["fraction"],
                )
        for source in sources.keys() - {"profiled"}:
            both = row[source] is not None and row["profiled"] is not None
            row[f"{source}_accuracy_lost_points"] = (
                100 * (row["profiled"]["accuracy"] - row[source]["accuracy"]) if both else None
            )
    return rows


def _loto(bank, profiles, names, measured, selection_ms) -> dict:
    """The scalable predictor, each target held out in turn: per-descendant and per-selection
    agreement with what was measured there."""
    features, probes = descendant_features(bank), probe_keys(bank)
    result = leave_one_target_out(profiles, features, names, probes=probes)
    for name in names:
        others = [n for n in names if n != name]
        model = LatencyPredictor.fit(profile_rows(profiles, features, others, probes))
        predicted = model.predict(TargetSignature.of(profiles, name, probes), features)
        frame = profiles.frame.latency_ms[name]
        truth = np.array(measured[name]["ms"])
        result[name]["selections"] = _agreement(selection_ms(predicted, frame), truth)
    return result


def _amortised(bank, profiles, keys, names, args) -> dict:
    """Nearest known target by probe signature, its exact picks stored per budget fraction,
    against solving exactly on the new target's predicted numbers."""
    probes = probe_keys(bank)

    def signature(name: str) -> np.ndarray:
        return np.log([profiles.descendants[b][d].latency_ms[name] for b, d in probes])

    grid = np.round(np.arange(0.30, 1.0001, 0.01), 2)
    stored = {}
    for name in names:
        table = bank.cost_table(name)
        teacher = table.frame_latency_ms + float(table.latency_ms[:, 0].sum())
        stored[name] = {}
        for f in grid:
            try:
                stored[name][f] = solve(table, Budget(latency_ms=f * teacher)).choices
            except InfeasibleBudgetError:
                stored[name][f] = None
    rows, exact_times, lookup_times = [], [], []
    for name in names:
        if name == args.proxy:
            continue
        predicted, frame, _ = _predict(profiles, keys, args.proxy, name, args.select_k, args.seed)
        start = time.perf_counter()
        table = _table(bank, predicted, frame, name)
        build_seconds = time.perf_counter() - start
        teacher = table.frame_latency_ms + float(table.latency_ms[:, 0].sum())
        nearest = min(
            (n for n in names if n != name),
            key=lambda n: float(np.linalg.norm(signature(n) - signature(name))),
        )
        for f in FRACTIONS:
            budget = Budget(latency_ms=f * teacher)
            start = time.perf_counter()
            try:
                exact = solve(table, budget)
            except InfeasibleBudgetError:
                exact = None
            exact_times.append(build_seconds + time.perf_counter() - start)
            start = time.perf_counter()
            fits = [g for g in grid if g <= f + 1e-9 and stored[nearest][g] is not None]
            guess = stored[nearest][fits[-1]] if fits else None
            lookup_times.append(time.perf_counter() - start)
            row = {"target": name, "nearest": nearest, "fraction": f}
            if exact is not None:
                row["exact_accuracy"] = estimate(profiles, exact.choices, name)["accuracy"]
            if guess is not None:
                ms = frame + sum(predicted[(b, d)] for b, d in enumerate(guess))
                row["amortised_accuracy"] = estimate(profiles, guess, name)["accuracy"]
                row["amortised_fits"] = ms <= budget.latency_ms * (1 + 1e-9)
            rows.append(row)
    both = [r for r in rows if "exact_accuracy" in r and "amortised_accuracy" in r]
    gaps = [100 * (r["exact_accuracy"] - r["amortised_accuracy"]) for r in both]
    return {
        "summary": {
            "exact_ms_per_new_target_query": 1e3 * statistics.median(exact_times),
            "amortised_ms_per_query": 1e3 * statistics.median(lookup_times),
            "median_gap_points": statistics.median(gaps) if gaps else None,
            "max_gap_points": max(gaps) if gaps else None,
            "violations": sum(not r["amortised_fits"] for r in both),
            "queries": len(rows),
        },
        "rows": rows,
    }


def _summary(transfer, picks, predictor, args) -> dict:
    """The headline numbers: medians over the held-out targets."""
    out = {}
    for k in [*(int(k) for k in args.k.split(",")), "measured profile"]:
        rows = [t[k] for t in transfer.values()]
        out[f"k={k}"] = {
            key: statistics.median(r[key] for r in rows)
            for key in ("spearman", "mape_percent", "relative_mape_percent")
        }
    labels = [f"auto {k}" for k in args.k.split(",")]
    labels += ["measured profile, corrected", f"auto {args.select_k}, corrected"]
    for label in labels:
        rows = [t[label] for t in transfer.values()]
        out[label.replace("auto ", "auto k=")] = {
            key: statistics.median(r[key] for r in rows)
            for key in ("spearman", "mape_percent", "relative_mape_percent")
        }
    rows = [r for target_rows in picks.values() for r in target_rows]
    out["selection_on_predicted"] = {"k": args.select_k}
    for source in (
        "predicted",
        "auto",
        "auto_margin",
        "auto_corrected",
        "auto_confident",
        "auto_confident_frontier",
        "profiled",
        "profiled_corrected",
        "profiled_confident",
        "profiled_confident_frontier",
    ):
        lost = [r.get(f"{source}_accuracy_lost_points") for r in rows]
        lost = [v for v in lost if v is not None]
        out["selection_on_predicted"][source] = {
            "meets_budget_percent": _percent(
                [r[source]["meets_budget"] for r in rows if r[source]]
            ),
            "meets_budget_strictly_percent": _percent(
                [r[source]["meets_budget_strictly"] for r in rows if r[source]]
            ),
            "infeasible": sum(r[source] is None for r in rows),
            "median_accuracy_lost_points": statistics.median(lost) if lost else None,
            "max_accuracy_lost_points": max(lost) if lost else None,
        }
    out["predictor_leave_one_target_out"] = {
        "median_descendant_spearman": statistics.median(v["spearman"] for v in predictor.values()),
        "median_descendant_mape_percent": statistics.median(
            v["mape_percent"] for v in predictor.values()
        ),
        "median_selection_mape_percent": statistics.median(
            v["selections"]["mape_percent"] for v in predictor.values()
        ),
    }
    return out


def _percent(flags: list[bool]) -> float | None:
    return 100 * sum(flags) / len(flags) if flags else None


def _heat_map(rank: dict, names: list[str], path: Path) -> None:
    fig = Figure(figsize=(6, 5), dpi=120)
    ax = fig.subplots()
    grid = np.array([[rank[a][b] for b in names] for a in names])
    image = ax.imshow(grid, vmin=min(0.5, grid.min()), vmax=1.0, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("Spearman of block latencies between targets")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
