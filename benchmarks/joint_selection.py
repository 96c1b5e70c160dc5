"""Joint selection speed: several models sharing one latency and memory budget.

Random sets of banks shaped like pruned CIFAR ResNets (``make_bank`` from ``selection.py``: 9 blocks
x 6 descendants each), random priorities (0.5, 1 or 2 per model) and random shared budgets: each
model's share drawn between its cheapest and its costliest selection, as ``selection.py`` draws a
single model's budget, and the shares added up. Timed per budget:

- ``JointSelector.select``: blockscale's exact joint search (LP multipliers from HiGHS, then a
  Lagrangian-bounded search over the models' Pareto points); its one-time build per set of banks
  (one ``Selector`` per bank) is timed apart;
- ``select_joint(method="milp")``: the same problem as one binary program in HiGHS
  (x[model][block][descendant] plus a continuous activation peak per model), on the first few
  budgets, as a reference. Each answer is judged by the exact estimates of the selections returned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

import highspy
import numpy as np
from selection import make_bank, random_budget

from blockscale._provenance import command, provenance
from blockscale.errors import InfeasibleBudgetError
from blockscale.multi import JointSelector, Member, select_joint
from blockscale.types import Budget, Selection


def shared_budget(tables, rng: np.random.Generator) -> Budget:
    """Per-model budgets as in ``selection.py``, added up into one shared budget."""
    shares = [random_budget(t, rng) for t in tables]
    return Budget(
        sum(b.latency_ms for b in shares),
        sum(b.memory_mb for b in shares),
    )


def objective(members: list[Member], found: list[Selection] | None) -> float | None:
    if found is None:
        return None
    return sum(m.priority * s.accuracy for m, s in zip(members, found, strict=True))


def timed(fn, repeats: int):
    """Median seconds of ``repeats`` calls, and the last result (None when infeasible)."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            result = fn()
        except InfeasibleBudgetError:
            result = None
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def verdict(members, budget, ours, milp) -> str:
    if milp is None:
        return "agree" if ours is None else "missed a selection"
    if sum(s.latency_ms for s in milp) > budget.latency_ms or (
        sum(s.memory_mb for s in milp) > budget.memory_mb
    ):
        return "over budget"
    if ours is None or objective(members, milp) > objective(members, ours) + 1e-9:
        return "better than the search"
    if objective(members, milp) < objective(members, ours) - 1e-9:
        return "suboptimal"
    return "agree"


def summary(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "max_ms": float(ms.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4, help="banks sharing the budget")
    parser.add_argument("--instances", type=int, default=10, help="random sets of banks")
    parser.add_argument("--queries", type=int, default=5, help="random budgets per set")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per budget (median)")
    parser.add_argument(
        "--milp-queries", type=int, default=50, help="budgets also given to the MILP"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", default="benchmarks/results/joint_selection.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    times: dict[str, list[float]] = {"select": [], "build": [], "milp": []}
    verdicts: Counter[str] = Counter()
    infeasible = queries = 0
    for _ in range(args.instances):
        tables = [make_bank(rng) for _ in range(args.models)]
        members = [Member(t, priority=float(rng.choice([0.5, 1.0, 2.0]))) for t in tables]
        start = time.perf_counter()
        selector = JointSelector(members)
        times["build"].append(time.perf_counter() - start)
        for _ in range(args.queries):
            budget = shared_budget(tables, rng)
            seconds, ours = timed(partial(selector.select, budget), args.repeats)
            times["select"].append(seconds)
            infeasible += ours is None
            if queries < args.milp_queries:
                seconds, milp = timed(partial(select_joint, members, budget, method="milp"), 1)
                times["milp"].append(seconds)
                verdicts[verdict(members, budget, ours, milp)] += 1
            queries += 1
    result = {
        "command": command("benchmarks/joint_selection.py", args),
        **provenance(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "numpy": np.__version__,
        "highspy": f"{highspy.HIGHS_VERSION_MAJOR}.{highspy.HIGHS_VERSION_MINOR}."
        f"{highspy.HIGHS_VERSION_PATCH}",
        "args": vars(args),
        "queries": queries,
        "infeasible_queries": infeasible,
        "milp_verdicts": dict(verdicts),
        "timings": {name: summary(s) for name, s in times.items() if s},
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    s = result["timings"]
    a = result["args"]
    rows = {
        "select": "`JointSelector.select` (exact search) | per budget",
        "build": f"`JointSelector({a['models']} members)` build | once per set of banks",
        "milp": "`select_joint(method='milp')` (HiGHS MILP) | per budget, build + solve",
    }
    lines = ["| method | timed | median | p90 | max |", "| --- | --- | ---: | ---: | ---: |"]
    for name, label in rows.items():
        if name in s:
            t = s[name]
            lines.append(
                f"| {label} | {t['median_ms']:.2f} ms | {t['p90_ms']:.2f} ms | {t['max_ms']:.2f} ms |"
            )
    lines += [
        "",
        f"{result['queries']} random shared budgets over {a['instances']} random sets of "
        f"{a['models']} banks (9 blocks x 6 descendants each; {result['infeasible_queries']} "
        f"budgets infeasible). MILP answers on the first {a['milp_queries']} budgets, judged by "
        f"exact estimates: {result['milp_verdicts']}.",
        f"Machine: {result['machine']} ({result['platform']}), Python {result['python']}, numpy "
        f"{result['numpy']}, HiGHS {result['highspy']}, OMP_NUM_THREADS="
        f"{result['omp_num_threads']}; load average "
        f"{', '.join(f'{x:.2f}' for x in result['load_average'])}. `{result['command']}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
