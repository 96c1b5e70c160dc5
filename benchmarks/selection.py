"""Selection speed: blockscale's exact solver against LegoDNN's binary ILP, side by side in one run.

Random banks shaped like a pruned CIFAR ResNet (9 blocks x 6 descendants at sparsities 0-0.9:
accuracy drops grow with sparsity, latency and weights shrink, activation peaks shrink with the
pruned inner width) and random budgets between each bank's cheapest and costliest selection.
Timed per query:

- ``solve``: blockscale's branch and bound, from the cost table alone (the table's one-time build
  per bank, which works out the bounds every solve starts from, is timed apart);
- ``Selector.select``: a query on a Selector (its one-time build per bank is timed apart);
- LegoDNN's formulation: binary x[b][d], one descendant per block, minimise the summed drop
  subject to the latency and memory budgets, built with PuLP and solved by CBC on every query, as
  LegoDNN does. Memory is modelled exactly (weights plus the activation peak, via a continuous
  A >= every chosen activation), so both solve the same problem and their optima must agree;
- the same ILP solved by HiGHS (highspy), the MILP solver blockscale's design names.

Each ILP answer is judged by the exact estimate of the selection it returns: agree, suboptimal,
missed a selection, over budget (a tolerance artefact) or better than solve (a bug in solve).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pulp

from blockscale._provenance import command, provenance
from blockscale.errors import InfeasibleBudgetError
from blockscale.select import CostTable, Selector, solve
from blockscale.types import Budget, Selection

SPARSITIES = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.9])
MIB = 2**20


def make_bank(rng: np.random.Generator) -> CostTable:
    """A random 9 x 6 bank: three stages of three residual blocks, widths 16/32/64 at 32/16/8 px."""
    width = np.repeat([16, 32, 64], 3)[:, None] * rng.choice([1, 2])
    side = np.repeat([32, 16, 8], 3)[:, None]
    kept = 1 - SPARSITIES
    sensitivity = rng.uniform(0.005, 0.06, (9, 1))
    drop = sensitivity * SPARSITIES**1.5 * rng.uniform(0.7, 1.3, (9, 6))
    drop += rng.normal(0, 0.001, (9, 6)) * (SPARSITIES > 0)
    macs = 18 * width**2 * side**2
    speed = rng.uniform(0.5, 2.0, (9, 1))  # GMAC/s differs per block (memory-bound layers)
    latency = 0.02 + macs / 1e9 / speed * kept * rng.uniform(0.85, 1.15, (9, 6))
    return CostTable(
        drop=drop,
        latency_ms=latency,
        weight_bytes=np.round(4 * (18 * width**2 * kept + 4 * width)),
        activation_bytes=np.round(4 * width * side**2 * (2 + kept)),
        sizes=(6,) * 9,
        frame_latency_ms=float(rng.uniform(0.03, 0.1)),
        frame_weight_bytes=4 * (27 * 16 + 64 * 10),
        frame_activation_bytes=4 * 19 * 32 * 32,
        teacher_accuracy=0.92,
    )


def random_budget(table: CostTable, rng: np.random.Generator) -> Budget:
    """A budget uniformly between the cheapest and the costliest selection in each cost."""
    lat, weight, act = table.latency_ms, table.weight_bytes, table.activation_bytes
    fa = table.frame_activation_bytes
    latency = rng.uniform(lat.min(1).sum(), lat.max(1).sum()) + table.frame_latency_ms
    memory = rng.uniform(
        weight.min(1).sum() + max(fa, act.min(1).max()), weight.max(1).sum() + max(fa, act.max())
    )
    return Budget(float(latency), float(memory + table.frame_weight_bytes) / MIB)


def legodnn_ilp(table: CostTable, budget: Budget, solver: pulp.LpSolver) -> tuple[int, ...] | None:
    """Build LegoDNN's binary ILP for this budget and solve it; the choices, or None if infeasible."""
    blocks = range(table.num_blocks)
    options = [range(k) for k in table.sizes]
    problem = pulp.LpProblem("selection", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{b}_{d}", cat="Binary") for d in options[b]] for b in blocks]
    peak = pulp.LpVariable("peak_mb", lowBound=table.frame_activation_bytes / MIB)
    # objective in accuracy points (x100) so CBC's tolerances sit far below the differences
    problem += pulp.lpSum(
        100 * float(table.drop[b, d]) * x[b][d] for b in blocks for d in options[b]
    )
    for b in blocks:
        problem += pulp.lpSum(x[b]) == 1
        problem += peak >= pulp.lpSum(
            float(table.activation_bytes[b, d]) / MIB * x[b][d] for d in options[b]
        )
    problem += (
        table.frame_latency_ms
        + pulp.lpSum(float(table.latency_ms[b, d]) * x[b][d] for b in blocks for d in options[b])
        <= budget.latency_ms
    )
    problem += (
        table.frame_weight_bytes / MIB
        + pulp.lpSum(
            float(table.weight_bytes[b, d]) / MIB * x[b][d] for b in blocks for d in options[b]
        )
        + peak
        <= budget.memory_mb
    )
    status = problem.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        return None
    return tuple(max(options[b], key=lambda d, b=b: x[b][d].value()) for b in blocks)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls, and the last call's result (None when infeasible)."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            result = fn()
        except InfeasibleBudgetError:
            result = None
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, 90th percentile and max, in ms."""
    ms = np.array(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "max_ms": float(ms.max()),
    }


def verdict(
    table: CostTable, budget: Budget, ours: Selection | None, ilp: tuple[int, ...] | None
) -> str:
    """How an ILP answer compares with ``solve``'s, judged by the table's exact estimates."""
    if ilp is None:
        return "agree" if ours is None else "missed a selection"
    found = table.estimate(ilp)
    if found.latency_ms > budget.latency_ms or found.memory_mb > budget.memory_mb:
        return "over budget"
    if ours is None or found.accuracy > ours.accuracy:
        return "better than solve"
    return "agree" if found.accuracy == ours.accuracy else "suboptimal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20, help="random banks")
    parser.add_argument("--queries", type=int, default=10, help="random budgets per bank")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per query (median)")
    parser.add_argument("--ilp-repeats", type=int, default=1, help="timed ILP builds+solves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/selection.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    solvers = {"cbc": pulp.PULP_CBC_CMD(msg=False), "highs": pulp.HiGHS(msg=False)}
    solvers = {name: solver for name, solver in solvers.items() if solver.available()}
    times: dict[str, list[float]] = {
        name: [] for name in ["solve", "select", "table", "build", *solvers]
    }
    verdicts = {name: Counter() for name in solvers}
    disagreements, selector_mismatches, infeasible, queries = [], 0, 0, 0
    for instance in range(args.instances):
        table = make_bank(rng)
        # a fresh table from the same costs: validation, rounding and the bounds solve starts from
        seconds, _ = timed(partial(dataclasses.replace, table), args.repeats)
        times["table"].append(seconds)
        start = time.perf_counter()
        selector = Selector(table)
        times["build"].append(time.perf_counter() - start)
        for _ in range(args.queries):
            budget = random_budget(table, rng)
            queries += 1
            seconds, ours = timed(partial(solve, table, budget), args.repeats)
            times["solve"].append(seconds)
            seconds, indexed = timed(partial(selector.select, budget), args.repeats)
            times["select"].append(seconds)
            selector_mismatches += indexed != ours
            infeasible += ours is None
            for name, solver in solvers.items():
                seconds, ilp = timed(partial(legodnn_ilp, table, budget, solver), args.ilp_repeats)
                times[name].append(seconds)
                outcome = verdict(table, budget, ours, ilp)
                verdicts[name][outcome] += 1
                if outcome != "agree":
                    disagreements.append(
                        {
                            "solver": name,
                            "instance": instance,
                            "budget": budget.to_dict(),
                            "verdict": outcome,
                            "solve": None if ours is None else ours.to_dict(),
                            "ilp": None if ilp is None else table.estimate(ilp).to_dict(),
                        }
                    )
    stats = {name: summary(seconds) for name, seconds in times.items()}
    result = {
        "command": command("benchmarks/selection.py", args),
        **provenance(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "numpy": np.__version__,
        "pulp": pulp.__version__,
        "args": vars(args),
        "queries": queries,
        "infeasible_queries": infeasible,
        "selector_mismatches": selector_mismatches,
        "ilp_verdicts": {name: dict(counts) for name, counts in verdicts.items()},
        "disagreements": disagreements,
        "timings": stats,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    """The result as Markdown tables, with the run's context underneath."""
    s = result["timings"]
    solve_ms = s["solve"]["median_ms"]
    rows = {
        "solve": "blockscale `solve` (branch and bound) | per query",
        "select": "blockscale `Selector.select` | per query, after the build",
        "table": "blockscale `CostTable` build | once per bank",
        "build": "blockscale `Selector(table)` build | once per bank",
        "cbc": "LegoDNN's ILP, PuLP + CBC | per query, build + solve",
        "highs": "the same ILP, PuLP + HiGHS | per query, build + solve",
    }
    lines = [
        "| method | timed | median | p90 | max | median / `solve`'s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in rows.items():
        if name in s:
            t = s[name]
            lines.append(
                f"| {label} | {_ms(t['median_ms'])} | {_ms(t['p90_ms'])} | {_ms(t['max_ms'])} "
                f"| {t['median_ms'] / solve_ms:.3g}x |"
            )
    kinds = ["agree", "suboptimal", "missed a selection", "over budget", "better than solve"]
    lines += ["", "| ILP solver | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for name, counts in result["ilp_verdicts"].items():
        lines.append(f"| {name} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |")
    lines += [
        "",
        f"{result['queries']} random budgets over {result['args']['instances']} random 9 x 6 banks "
        f"({result['infeasible_queries']} infeasible); `Selector.select` differed from `solve` "
        f"{result['selector_mismatches']} times. ILP answers are judged by the exact estimate of "
        "the selection they return.",
        f"Machine: {result['machine']} ({result['platform']}), Python {result['python']}, "
        f"numpy {result['numpy']}, PuLP {result['pulp']} (bundled CBC; HiGHS via highspy); load "
        f"average {', '.join(f'{x:.2f}' for x in result['load_average'])}. "
        f"`{result['command']}`",
    ]
    return "\n".join(lines)


def _ms(value: float) -> str:
    """Milliseconds, shown in µs below one."""
    return f"{value * 1e3:.1f} µs" if value < 1 else f"{value:.2f} ms"


if __name__ == "__main__":
    main()
