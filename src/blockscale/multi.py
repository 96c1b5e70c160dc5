"""Selection over time and across models: switching-aware selection and joint selection.

Both build on ``select``'s additive estimates (accuracy = teacher - summed drops, latency = frame +
blocks, memory = weights + activation peak) and are exact.

**Switching.** A runtime that follows a wobbling budget should not reload blocks for a gain it
cannot see. ``select_switching`` charges every block whose descendant differs from the live
selection (``SwitchCost``: a constant per changed block plus a price per MiB the change loads) and
maximises estimated accuracy minus that charge; a hysteresis margin then keeps the live selection
unless moving beats staying by more than the margin. The charge is separable by block, so it folds
into the drops: the problem is the plain multiple-choice knapsack again, solved exactly by
``select.solve`` on a table whose drops carry the charges (``method="milp"`` solves the binary
program in HiGHS instead; both give the same optimum).

**Several models.** ``select_joint`` (or a reusable ``JointSelector``) picks one selection per model
so that the priority-weighted sum of estimated accuracies is largest while the models' latencies
add up to at most the budget's latency (one frame of every model) and their memories add up to at
most its memory, with optional per-model ``min_accuracy`` and ``max_latency_ms``.

Memory model: a model's memory is what ``CostTable.estimate`` reports for it alone, its weights plus
its own activation peak, and the models' memories add up. The weights of every model stay resident,
and so do their activation buffers: each runtime (an ONNX Runtime session, a torch module with its
own allocator cache) keeps the arena it grew on its first frame, so activation peaks do not share
one arena even when the models run one after another; summing them is also right when the models
run concurrently. It overstates memory only for models run strictly in turn on one shared arena
(there weights + the largest peak would do). One model alone gets exactly ``solve``'s answer.

Joint search: every model's best choice lies in its bank's Pareto set in (accuracy, latency,
memory) (``select.Selector``), as the objective and every constraint are monotone in those three
costs, so the search chooses one Pareto point per model: a multiple-choice knapsack with two
budgets over a few thousand points per 9 x 6 bank. Its LP relaxation (HiGHS, by column generation
from each model's supported points) gives Lagrange multipliers for the two budgets; any multipliers
give the bound ``g + sum of the chosen points' reduced costs`` on every combination, so the search
(numpy arrays of partial combinations, grown a model at a time) drops a partial combination as soon
as that bound passes the best combination found or it can no longer fit, in passes over ever more
of each model's points of least reduced cost. Nothing is cut that could beat or tie the optimum
(bounds carry a margin for rounding), so the search is exact whatever the multipliers; good
multipliers only make it short: about 5 ms for 4 banks of 9 x 6 (benchmarks/joint_selection.py). ``method="milp"`` solves the same problem as one binary
program in HiGHS (x[model][block][descendant], one continuous activation peak per model): a
reference that is slower (tenths of a second) and, in highspy 1.12, may print a debugging line to
stdout when its MIP search restarts.

Numbers: costs sit on ``CostTable``'s grids (2**-32 accuracy, 2**-20 ms, whole bytes), so sums of
latencies, memories and (with priorities that are powers of two, 1 included) drops are exact and the
budgets are compared exactly. With other priorities the weighted sums round (about 1e-16
relative). MILP answers are checked exactly against every limit; one that only meets them within
HiGHS's tolerances is cut off and the program solved again, and HiGHS runs with zero optimality gap
and costs scaled so its pruning tolerance stands for about 1e-13 of accuracy. The search breaks ties
in the objective by lower total latency, then lower total memory, then the earlier models' more
accurate selections (each model's Pareto points in order of drop, latency, memory); the MILP breaks
them as HiGHS finds them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import highspy
import numpy as np

from .errors import ConfigError, InfeasibleBudgetError, InfeasibleMemberError, SolverError
from .select import CostTable, Selector, _infeasible, solve
from .types import Budget, Selection

_MIB = float(2**20)
_LATENCY_STEPS = 2.0**20
# LP and MILP costs are accuracy times this (a power of two, so scaling is exact): HiGHS's absolute
# tolerances (1e-7) then stand for about 1e-13 of accuracy.
_COST_SCALE = 2.0**20
# the search's bounds give way by this much, relative to the magnitudes summed, so that rounding in
# the reduced costs never cuts off a combination that ties the optimum.
_MARGIN = 1e-10
# column generation rounds before the multipliers in hand are used as they are (still valid).
_PRICING_ROUNDS = 25
# the search first takes this many points of least reduced cost per model, then this many times
# more each pass, until a pass has taken every point that could still win.
_WIDTH = 8
_WIDEN = 4
# a search step extends at most about this many prefix-point pairs at once (bounds memory).
_CHUNK = 1 << 17
# multipliers tried per budget when finding each model's supported points (see _supported).
_DIRECTIONS = np.concatenate(([0.0], np.logspace(-2.5, 2.5, 21)))
_MILP_TIME_LIMIT_S = 60.0

Method = Literal["search", "milp"]


@dataclass(frozen=True)
class SwitchCost:
    """What changing the live selection costs, in accuracy (fractions, like ``Profile.accuracy_drop``).

    A candidate selection is charged, for every block whose descendant differs from the live one,
    ``per_block`` plus ``per_mb`` times the MiB that loading the new descendant takes (from the
    bytes table given to ``select_switching``; by default the descendant's weight bytes). Its score
    is its estimated accuracy minus the charge; the live selection is charged nothing.

    ``hysteresis``: when the live selection still fits the budget, it is kept unless the best score
    beats its accuracy by more than this margin (so 0 still keeps it on an exact tie). A budget
    that wobbles then leaves the selection alone until a move is clearly worth it. When the live
    selection no longer fits, the best-scoring selection is taken whatever the margin.
    """

    per_block: float = 0.0
    per_mb: float = 0.0
    hysteresis: float = 0.0

    def __post_init__(self) -> None:
        for name in ("per_block", "per_mb", "hysteresis"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"SwitchCost.{name} must be finite and >= 0, got {value}")


def switch_penalties(
    table: CostTable,
    current: Sequence[int],
    cost: SwitchCost,
    bytes_table: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """The charge for each descendant, shaped like ``table.drop``: 0 for the live ones.

    ``bytes_table[b][d]`` is what choosing descendant ``d`` of block ``b`` loads (bytes; an array
    shaped like ``table.drop`` or one row per block with ``table.sizes`` entries). It defaults to
    the descendants' weight bytes.
    """
    live = _check_choices(table, current)
    real = np.arange(table.drop.shape[1]) < np.array(table.sizes)[:, None]
    if bytes_table is None:
        loads = np.where(real, table.weight_bytes, 0.0)
    else:
        loads = _bytes_array(table, bytes_table, real)
    charge = np.where(real, cost.per_block + cost.per_mb * loads / _MIB, 0.0)
    charge[np.arange(table.num_blocks), np.array(live)] = 0.0
    return charge


def select_switching(
    table: CostTable,
    budget: Budget,
    current: Sequence[int] | None,
    switch_cost: SwitchCost | None = None,
    bytes_table: Sequence[Sequence[float]] | np.ndarray | None = None,
    *,
    method: Method = "search",
) -> Selection:
    """The selection to move to from ``current`` within ``budget``, switching costs considered.

    Maximises estimated accuracy minus the ``switch_cost`` charge (see ``SwitchCost``), then
    applies the hysteresis rule. Without a live selection (``current=None``) nothing is charged
    and the answer is ``solve``'s. The returned Selection carries the plain estimate (accuracy
    without the charge). Raises ``InfeasibleBudgetError`` exactly as ``solve`` does when nothing
    fits. ``method="milp"`` finds the optimum with HiGHS instead of ``select.solve``; on ties the
    two may pick different selections of the same score.
    """
    if method not in ("search", "milp"):
        raise ConfigError(f"method must be 'search' or 'milp', got {method!r}")
    if current is None:
        return solve(table, budget)
    cost = switch_cost or SwitchCost()
    live = _check_choices(table, current)
    stay = table.estimate(live)
    charge = switch_penalties(table, live, cost, bytes_table)
    if method == "search":
        # no move scores more than the plain optimum, charges only lower a move's score: when
        # that optimum is the live selection, or beats it by at most the margin, stay (exact, and
        # it spares building a charged table for the steps of a wobbling budget)
        plain = solve(table, budget)
        if plain.choices == live or (
            _within(stay, budget) and plain.accuracy - stay.accuracy <= cost.hysteresis
        ):
            return stay
    # the charges folded into the drops: exact on the table's grid, so scores compare exactly
    charged = CostTable(
        drop=table.drop + charge,
        latency_ms=table.latency_ms,
        weight_bytes=table.weight_bytes,
        activation_bytes=table.activation_bytes,
        sizes=table.sizes,
        frame_latency_ms=table.frame_latency_ms,
        frame_weight_bytes=table.frame_weight_bytes,
        frame_activation_bytes=table.frame_activation_bytes,
        teacher_accuracy=table.teacher_accuracy,
    )
    if method == "search":
        best = solve(charged, budget).choices
    else:
        lat_cap, mem_cap = _grid_caps(budget)
        found = _block_milp([_Part(table, charged.drop)], lat_cap, mem_cap)
        if found is None:
            solve(table, budget)  # raises the same InfeasibleBudgetError as solve
            raise SolverError("HiGHS found no selection within a budget that solve can meet")
        best = found[0]
    if best != live and _within(stay, budget):
        gain = charged.estimate(best).accuracy - charged.estimate(live).accuracy
        if gain <= cost.hysteresis:
            return stay
    return table.estimate(best)


@dataclass(frozen=True)
class Member:
    """One model of a joint selection: its cost table, its weight in the objective, its own limits.

    ``priority`` multiplies the model's estimated accuracy in the objective (>= 0);
    ``min_accuracy`` and ``max_latency_ms`` bound this model's selection alone, on top of the
    shared budget. ``name`` only labels errors.

    ``accuracy_of`` maps an array of summed table costs (``teacher_accuracy`` minus the table's
    accuracy) to the model's estimated accuracies, for banks whose costs are not points of accuracy
    (log-odds, a fitted correction: see ``Bank.accuracy_of``). It must be non-increasing. The
    objective and ``min_accuracy`` then use those accuracies; the joint search stays exact, as it
    chooses among each bank's Pareto points, but ``method="milp"``, which adds costs over blocks,
    refuses such a member. None: the table's own accuracy (teacher minus summed cost).
    """

    table: CostTable
    priority: float = 1.0
    min_accuracy: float | None = None
    max_latency_ms: float | None = None
    name: str | None = None
    accuracy_of: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.table, CostTable):
            raise ConfigError(f"Member.table must be a CostTable, got {type(self.table).__name__}")
        if not (math.isfinite(self.priority) and self.priority >= 0):
            raise ConfigError(f"Member.priority must be finite and >= 0, got {self.priority}")
        if self.min_accuracy is not None and not math.isfinite(self.min_accuracy):
            raise ConfigError(f"Member.min_accuracy must be finite, got {self.min_accuracy}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"Member.max_latency_ms must be positive, got {self.max_latency_ms}")


ModelSpec = Member


class _Points(NamedTuple):
    """One member's candidate selections: its Pareto points that meet its own limits."""

    choices: np.ndarray  # (points, blocks)
    cost: np.ndarray  # priority x summed drop
    latency: np.ndarray  # ms
    memory: np.ndarray  # bytes
    hints: np.ndarray  # indices of the supported points, where the LP starts


class JointSelector:
    """Joint selection for a fixed set of models, their Pareto sets worked out once.

    Building costs a ``Selector`` per bank (about 0.1 s for 9 blocks of 6; banks shared between
    members, or seen by an earlier JointSelector while still alive, are not built again); each
    ``select`` is then a few milliseconds. Raises ``InfeasibleMemberError`` when a member's own
    limits exclude every selection of its bank.
    """

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = tuple(members)
        if not self.members:
            raise ConfigError("a joint selection needs at least one member")
        self._points = [self._candidates(i, m) for i, m in enumerate(self.members)]

    def select(self, budget: Budget) -> list[Selection]:
        """One selection per member, maximising sum(priority x accuracy) within ``budget``."""
        lat_cap, mem_cap = _grid_caps(budget)
        groups = [_Group(p.cost, p.latency, p.memory) for p in self._points]
        picks = _least_sum(groups, lat_cap, mem_cap, [p.hints for p in self._points])
        if picks is None:
            raise self._infeasible(budget, groups, lat_cap, mem_cap)
        return [
            m.table.estimate(p.choices[i])
            for m, p, i in zip(self.members, self._points, picks, strict=True)
        ]

    def _candidates(self, index: int, member: Member) -> _Points:
        """The member's Pareto points within its own limits, or the error saying which limit fails."""
        choices, drop, latency, memory = _selector(member.table).points
        if member.accuracy_of is None:
            loss, accuracy = drop, member.table.teacher_accuracy - drop
        else:
            accuracy = np.asarray(member.accuracy_of(drop), dtype=np.float64)
            if accuracy.shape != drop.shape or not np.isfinite(accuracy).all():
                raise ConfigError(
                    f"{_label(index, member)}: accuracy_of must map {len(drop)} summed costs to "
                    f"as many finite accuracies, got shape {accuracy.shape}"
                )
            loss = member.table.teacher_accuracy - accuracy
        accurate = np.ones(len(drop), dtype=bool)
        if member.min_accuracy is not None:
            accurate = accuracy >= member.min_accuracy
        fast = np.ones(len(drop), dtype=bool)
        if member.max_latency_ms is not None:
            fast = latency <= member.max_latency_ms
        keep = np.flatnonzero(accurate & fast)
        if not len(keep):
            raise _member_error(index, member, accuracy, latency, memory, accurate, fast)
        cost = member.priority * loss[keep]
        return _Points(
            choices[keep],
            cost,
            latency[keep],
            memory[keep],
            _supported(cost, latency[keep], memory[keep]),
        )

    def _infeasible(
        self, budget: Budget, groups: list[_Group], lat_cap: float, mem_cap: float
    ) -> InfeasibleBudgetError:
        """The error for a budget no joint selection meets: least totals, and what to raise."""
        least_lat = sum(float(g.latency.min()) for g in groups)
        least_mem = sum(float(g.memory.min()) for g in groups)
        by_lat = [_Group(g.latency, g.latency, g.memory) for g in groups]
        by_mem = [_Group(g.memory, g.latency, g.memory) for g in groups]
        fastest = _least_sum(by_lat, math.inf, mem_cap)
        smallest = _least_sum(by_mem, lat_cap, math.inf)
        latency_within = math.inf if fastest is None else _total(groups, fastest, "latency")
        memory_within = math.inf if smallest is None else _total(groups, smallest, "memory")
        if (fastest is not None and latency_within <= lat_cap) or (
            smallest is not None and memory_within <= mem_cap
        ):
            raise SolverError("the joint search missed a selection that meets the budget")
        overall = _least_sum(by_lat, math.inf, math.inf)
        assert overall is not None
        limits = any(
            m.min_accuracy is not None or m.max_latency_ms is not None for m in self.members
        )
        return _infeasible(
            budget,
            least_lat,
            least_mem,
            latency_within,
            memory_within,
            _total(groups, overall, "memory"),
            subject=f"joint selection of the {len(groups)} models",
            scope=f" in total{' with their own limits' if limits else ''}",
        )


def select_joint(
    members: Sequence[Member], budget: Budget, *, method: Method = "search"
) -> list[Selection]:
    """One selection per member, maximising sum(priority x estimated accuracy) within ``budget``.

    ``budget.latency_ms`` bounds the members' latencies added up (one frame of each) and
    ``budget.memory_mb`` their memories added up (see the module docstring for the memory model);
    each member's ``min_accuracy`` and ``max_latency_ms`` bound its own selection. Raises
    ``InfeasibleMemberError`` when a member's own limits exclude its whole bank, and
    ``InfeasibleBudgetError`` when the budget cannot be met. For many budgets over the same members
    build a ``JointSelector`` once. ``method="milp"`` solves it as one HiGHS binary program instead.
    """
    if method == "search":
        return JointSelector(members).select(budget)
    if method != "milp":
        raise ConfigError(f"method must be 'search' or 'milp', got {method!r}")
    members = tuple(members)
    if not members:
        raise ConfigError("a joint selection needs at least one member")
    mapped = [_label(i, m) for i, m in enumerate(members) if m.accuracy_of is not None]
    if mapped:
        raise ConfigError(
            f"method='milp' adds costs over blocks, but {', '.join(mapped)} maps them through "
            "accuracy_of",
            hint="use method='search', which is exact for such members too",
        )
    parts = []
    for m in members:
        lat_cap = math.inf if m.max_latency_ms is None else _floor_ms(m.max_latency_ms)
        drop = np.where(np.isfinite(m.table.drop), m.table.drop, 0.0)
        parts.append(_Part(m.table, m.priority * drop, lat_cap, m.min_accuracy))
    lat_cap, mem_cap = _grid_caps(budget)
    found = _block_milp(parts, lat_cap, mem_cap)
    if found is None:
        # the search states the reason (a member's own limits, or the least totals) exactly
        JointSelector(members).select(budget)
        raise SolverError("HiGHS found no joint selection where the search finds one")
    return [m.table.estimate(c) for m, c in zip(members, found, strict=True)]


# ---------------------------------------------------------------------------------------------
# the joint search


class _Group(NamedTuple):
    """One model's candidates for the search: cost to minimise, latency (ms), memory (bytes)."""

    cost: np.ndarray
    latency: np.ndarray
    memory: np.ndarray


def _least_sum(
    groups: Sequence[_Group],
    lat_cap: float,
    mem_cap: float,
    hints: Sequence[np.ndarray] | None = None,
) -> tuple[int, ...] | None:
    """One point per group minimising the summed cost with summed latency and memory within the
    caps; ties to lower latency, then memory, then smaller indices (in group order). None if no
    combination fits. Latencies and memories must sit on grids where their sums are exact, and the
    caps on the same grids.

    ``hints`` (per group, indices of points likely on the LP's support) only speed it up.
    """
    k = len(groups)
    least_lat = [float(g.latency.min()) for g in groups]
    least_mem = [float(g.memory.min()) for g in groups]
    if sum(least_lat) > lat_cap or sum(least_mem) > mem_cap:
        return None
    # points that cannot fit even beside the leanest points of the other groups
    kept, parts = [], []
    for i, g in enumerate(groups):
        room_lat = lat_cap - (sum(least_lat) - least_lat[i])
        room_mem = mem_cap - (sum(least_mem) - least_mem[i])
        keep = np.flatnonzero((g.latency <= room_lat) & (g.memory <= room_mem))
        if not len(keep):
            return None
        kept.append(keep)
        parts.append(_Group(g.cost[keep], g.latency[keep], g.memory[keep]))
    starts = None
    if hints is not None:
        starts = [np.flatnonzero(np.isin(keep, h)) for keep, h in zip(kept, hints, strict=True)]
    lam_lat, lam_mem, support = _multipliers(parts, lat_cap, mem_cap, starts)
    if support is None:
        return None  # not even the LP relaxation fits
    found = _Search(parts, lat_cap, mem_cap, lam_lat, lam_mem).run(support)
    if found is None:
        return None
    return tuple(int(kept[i][j]) for i, j in zip(range(k), found, strict=True))


class _Search:
    """Branch and bound over the groups with the Lagrangian bound (see the module docstring).

    Prefixes grow a group at a time as numpy arrays (breadth first, in chunks), groups with fewer
    points first; passes over ever more points per group tighten the incumbent before the pass
    that takes every point that could still win.
    """

    def __init__(
        self,
        groups: Sequence[_Group],
        lat_cap: float,
        mem_cap: float,
        lam_lat: float,
        lam_mem: float,
    ) -> None:
        self.groups, self.lat_cap, self.mem_cap = groups, lat_cap, mem_cap
        values = [g.cost + lam_lat * g.latency + lam_mem * g.memory for g in groups]
        floors = [float(v.min()) for v in values]
        self.reduced = [v - f for v, f in zip(values, floors, strict=True)]
        self.bound = sum(floors)  # the Lagrangian bound g on every combination's cost
        scale = 1.0 + sum(float(np.abs(v).max()) for v in values)
        if lam_lat > 0:
            self.bound -= lam_lat * lat_cap
            scale += lam_lat * lat_cap
        if lam_mem > 0:
            self.bound -= lam_mem * mem_cap
            scale += lam_mem * mem_cap
        self.margin = _MARGIN * scale
        # the incumbent's key: (cost, latency, memory, picks in group order)
        self.best: tuple[float, float, float, tuple[int, ...]] | None = None

    def gap(self) -> float:
        """How much reduced cost a combination may carry and still beat or tie the incumbent."""
        if self.best is None:
            return math.inf
        return self.best[0] - self.bound + self.margin

    def offer(self, picks: Sequence[int]) -> None:
        """Take ``picks`` as the incumbent if it fits and beats it."""
        k = range(len(self.groups))
        lat = sum(float(self.groups[i].latency[picks[i]]) for i in k)
        mem = sum(float(self.groups[i].memory[picks[i]]) for i in k)
        if lat <= self.lat_cap and mem <= self.mem_cap:
            cost = sum(float(self.groups[i].cost[picks[i]]) for i in k)
            key = (cost, lat, mem, tuple(int(p) for p in picks))
            if self.best is None or key < self.best:
                self.best = key

    def run(self, support: list[np.ndarray]) -> tuple[int, ...] | None:
        """The best combination's picks, or None if none fits."""
        k = len(self.groups)
        # incumbents to start from: the Lagrangian minimisers, and roundings of the LP's solution
        self.offer([int(r.argmin()) for r in self.reduced])
        options = [s[:3] for s in support]
        if math.prod(len(o) for o in options) <= 64:
            for combo in np.stack(np.meshgrid(*options, indexing="ij"), -1).reshape(-1, k):
                self.offer(combo.tolist())
        ranked = [np.argsort(r, kind="stable") for r in self.reduced]
        width = _WIDTH
        while True:
            # a pass takes each group's ``width`` points of least reduced cost (all of them when
            # not many more lie within the gap): the best combination found tightens the gap for
            # the next, wider pass, and a pass that took every point within the gap has seen
            # every combination that could beat or tie the incumbent
            gap = self.gap()
            counts = [int(np.count_nonzero(r <= gap)) for r in self.reduced]
            taken = [c if c <= _WIDEN * width else width for c in counts]
            self._pass([ranked[i][: taken[i]] for i in range(k)])
            if taken == counts:
                return None if self.best is None else self.best[3]
            width *= _WIDEN

    def _pass(self, points: list[np.ndarray]) -> None:
        """Search every combination of ``points`` (per group, ascending reduced cost)."""
        k = len(self.groups)
        self.order = sorted(range(k), key=lambda i: (len(points[i]), i))
        self.levels = []
        for i in self.order:
            at = points[i]
            g = self.groups[i]
            self.levels.append((self.reduced[i][at], g.cost[at], g.latency[at], g.memory[at], at))
        least = [(float(g.latency.min()), float(g.memory.min())) for g in self.groups]
        ordered = [least[i] for i in self.order]
        self.rest_lat = [sum(a for a, _ in ordered[j:]) for j in range(k + 1)]
        self.rest_mem = [sum(b for _, b in ordered[j:]) for j in range(k + 1)]
        zero = np.zeros(1)
        self._expand(0, zero, zero, zero, zero, np.zeros((1, 0), dtype=np.int64))

    def _expand(
        self,
        j: int,
        spent: np.ndarray,
        cost: np.ndarray,
        lat: np.ndarray,
        mem: np.ndarray,
        picks: np.ndarray,
    ) -> None:
        """Extend prefixes of ``j`` groups (in search order; arrays, one row each) by the next
        group's points, keeping those whose bound can still beat or tie the incumbent and that
        can still fit; whole combinations update the incumbent. Prefixes go in chunks, so a loose
        gap costs time, not memory, and each chunk's incumbent tightens the next chunk's gap.
        """
        if j == len(self.order):
            self._settle(cost, lat, mem, picks)
            return
        reduced, costs, lats, mems, at = self.levels[j]
        step = max(1, _CHUNK // max(1, len(reduced)))
        for lo in range(0, len(spent), step):
            part = slice(lo, lo + step)
            cut = reduced.searchsorted(self.gap() - spent[part], side="right")
            total = int(cut.sum())
            if total == 0:
                continue
            rows = np.repeat(np.arange(len(cut)), cut)
            cols = np.arange(total) - np.repeat(np.cumsum(cut) - cut, cut)
            time = lat[part][rows] + lats[cols]
            space = mem[part][rows] + mems[cols]
            fits = np.flatnonzero(
                (time + self.rest_lat[j + 1] <= self.lat_cap)
                & (space + self.rest_mem[j + 1] <= self.mem_cap)
            )
            if not len(fits):
                continue
            rows, cols = rows[fits], cols[fits]
            self._expand(
                j + 1,
                spent[part][rows] + reduced[cols],
                cost[part][rows] + costs[cols],
                time[fits],
                space[fits],
                np.column_stack((picks[part][rows], at[cols])),
            )

    def _settle(
        self, cost: np.ndarray, lat: np.ndarray, mem: np.ndarray, picks: np.ndarray
    ) -> None:
        """Take the best of these whole combinations as the incumbent if it beats it."""
        tied = np.flatnonzero(cost == cost.min())
        if len(tied) > 1:
            # picks in group order, so ties go to the smaller choices as in offer()
            columns = [picks[tied, self.order.index(i)] for i in reversed(range(len(self.order)))]
            tied = tied[np.lexsort((*columns, mem[tied], lat[tied]))]
        best = int(tied[0])
        in_order = [0] * len(self.order)
        for column, i in enumerate(self.order):
            in_order[i] = int(picks[best, column])
        key = (float(cost[best]), float(lat[best]), float(mem[best]), tuple(in_order))
        if self.best is None or key < self.best:
            self.best = key


def _multipliers(
    groups: Sequence[_Group],
    lat_cap: float,
    mem_cap: float,
    starts: Sequence[np.ndarray] | None,
) -> tuple[float, float, list[np.ndarray] | None]:
    """Lagrange multipliers of the two budgets from the LP relaxation, and the LP's support.

    Column generation: the LP starts from each group's hinted points and its leanest ones, and adds
    every group's best point at the current multipliers until none prices in. An infeasible
    restricted LP is retried with every point; an infeasible full LP means nothing fits (support
    None). Whatever HiGHS returns, the multipliers are clipped to >= 0, which keeps the bound valid.
    """
    k = len(groups)
    use_lat, use_mem = math.isfinite(lat_cap), math.isfinite(mem_cap)
    if not (use_lat or use_mem):
        return 0.0, 0.0, [np.array([int(g.cost.argmin())]) for g in groups]
    columns = []
    for i, g in enumerate(groups):
        base = [int(g.cost.argmin()), int(g.latency.argmin()), int(g.memory.argmin())]
        extra = starts[i] if starts is not None else np.empty(0, dtype=int)
        columns.append(np.unique(np.concatenate((base, extra)).astype(int)))
    full = False
    lam_lat = lam_mem = 0.0
    support: list[np.ndarray] | None = None
    for _ in range(_PRICING_ROUNDS):
        status, duals, values = _solve_lp(groups, columns, lat_cap, mem_cap)
        if status == highspy.HighsModelStatus.kInfeasible:
            if full:
                return 0.0, 0.0, None
            columns = [np.arange(len(g.cost)) for g in groups]
            full = True
            continue
        if status != highspy.HighsModelStatus.kOptimal:
            break
        lam_lat = max(0.0, -duals[k]) / _COST_SCALE if use_lat else 0.0
        lam_mem = max(0.0, -duals[-1]) / _COST_SCALE / _MIB if use_mem else 0.0
        at = 0
        support = []
        for cols in columns:
            x = values[at : at + len(cols)]
            support.append(cols[np.argsort(-x, kind="stable")[: int((x > 1e-9).sum()) or 1]])
            at += len(cols)
        added = False
        for i, g in enumerate(groups):
            priced = (g.cost + lam_lat * g.latency + lam_mem * g.memory) * _COST_SCALE
            best = int(priced.argmin())
            tolerance = 1e-9 * (1.0 + abs(duals[i]))
            if priced[best] < duals[i] - tolerance and best not in set(columns[i].tolist()):
                columns[i] = np.append(columns[i], best)
                added = True
        if not added:
            break
    if support is None:
        # HiGHS gave no usable LP answer: multipliers of 0 still bound the search exactly
        support = [np.array([int(g.cost.argmin())]) for g in groups]
    return lam_lat, lam_mem, support


def _solve_lp(
    groups: Sequence[_Group], columns: list[np.ndarray], lat_cap: float, mem_cap: float
) -> tuple[highspy.HighsModelStatus, list[float], np.ndarray]:
    """Solve the LP relaxation over ``columns``; its status, row duals and column values.

    Rows: one per group (its columns sum to 1), then latency (ms) and memory (MiB) where capped.
    """
    k = len(groups)
    cost = np.concatenate([g.cost[c] for g, c in zip(groups, columns, strict=True)])
    lat = np.concatenate([g.latency[c] for g, c in zip(groups, columns, strict=True)])
    mem = np.concatenate([g.memory[c] for g, c in zip(groups, columns, strict=True)]) / _MIB
    owner = np.repeat(np.arange(k), [len(c) for c in columns])
    rows_index = [owner]
    rows_value = [np.ones(len(cost))]
    upper = [1.0] * k
    if math.isfinite(lat_cap):
        rows_index.append(np.full(len(cost), len(upper)))
        rows_value.append(lat)
        upper.append(lat_cap)
    if math.isfinite(mem_cap):
        rows_index.append(np.full(len(cost), len(upper)))
        rows_value.append(mem)
        upper.append(mem_cap / _MIB)
    per_column = len(rows_index)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), len(upper)
    lp.col_cost_ = cost * _COST_SCALE
    lp.col_lower_ = np.zeros(len(cost))
    lp.col_upper_ = np.ones(len(cost))
    lp.row_lower_ = np.array([1.0] * k + [-highspy.kHighsInf] * (len(upper) - k))
    lp.row_upper_ = np.array(upper)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, per_column * len(cost) + 1, per_column, dtype=np.int32)
    lp.a_matrix_.index_ = np.stack(rows_index, axis=1).ravel().astype(np.int32)
    lp.a_matrix_.value_ = np.stack(rows_value, axis=1).ravel()
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = len(cost), len(upper)
    h = _highs({"presolve": "off", "simplex_strategy": 4})
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    solution = h.getSolution()
    duals = list(solution.row_dual)
    if len(upper) == k + 1:  # one cap only: keep the layout (group rows, latency, memory)
        duals = [*duals, 0.0] if math.isfinite(lat_cap) else [*duals[:k], 0.0, duals[k]]
    elif len(upper) == k:
        duals = [*duals, 0.0, 0.0]
    return status, duals, np.array(solution.col_value)


def _supported(cost: np.ndarray, lat: np.ndarray, mem: np.ndarray) -> np.ndarray:
    """Indices of points that minimise cost + a * latency + b * memory for some of a grid of
    multipliers (a, b >= 0), scaled to the spans of the costs: where an LP relaxation's solution
    usually lies. A start for column generation, so missing some costs only time.
    """
    span = float(np.ptp(cost)) or 1.0
    a = _DIRECTIONS * span / (float(np.ptp(lat)) or 1.0)
    b = _DIRECTIONS * span / (float(np.ptp(mem)) or 1.0)
    values = cost + a[:, None, None] * lat + b[None, :, None] * mem
    return np.unique(values.argmin(axis=2))


# ---------------------------------------------------------------------------------------------
# the binary program (HiGHS)


class _Part(NamedTuple):
    """One model of the binary program: its table, its objective per descendant (accuracy units,
    shaped like the table's drop, minimised), its own latency cap and minimum accuracy."""

    table: CostTable
    cost: np.ndarray
    max_latency_ms: float = math.inf
    min_accuracy: float | None = None


def _block_milp(
    parts: Sequence[_Part], lat_cap: float, mem_cap: float
) -> list[tuple[int, ...]] | None:
    """Minimise the summed costs with HiGHS: binary x[part][block][descendant], one per block, a
    continuous activation peak per part (>= the frame's and every chosen descendant's), the summed
    latency within ``lat_cap`` and the summed weights and peaks within ``mem_cap`` (bytes), and
    each part's own latency cap and accuracy floor. The choices per part, or None if nothing fits.

    Every answer is checked exactly; one that meets the limits only within HiGHS's tolerances is
    cut off (no-good cut) and the program solved again.
    """
    cost, lower, upper, integer = [], [], [], []
    rows: list[tuple[float, float, np.ndarray, np.ndarray]] = []
    lat_index, lat_value, mem_index, mem_value = [], [], [], []
    frame_lat = frame_mem = 0.0
    slots = []  # per part, per block: the column indices of its descendants
    n = 0
    for part in parts:
        t = part.table
        blocks = []
        for b, k in enumerate(t.sizes):
            at = np.arange(n, n + k)
            n += k
            blocks.append(at)
            cost.append(part.cost[b, :k] * _COST_SCALE)
            lower.append(np.zeros(k))
            upper.append(np.ones(k))
            integer.append(np.ones(k, dtype=bool))
            rows.append((1.0, 1.0, at, np.ones(k)))
            lat_index.append(at)
            lat_value.append(t.latency_ms[b, :k])
            mem_index.append(at)
            mem_value.append(t.weight_bytes[b, :k] / _MIB)
        peak = n
        n += 1
        cost.append(np.zeros(1))
        lower.append(np.array([t.frame_activation_bytes / _MIB]))
        upper.append(np.array([highspy.kHighsInf]))
        integer.append(np.zeros(1, dtype=bool))
        for b, at in enumerate(blocks):
            k = t.sizes[b]
            rows.append(
                (
                    -highspy.kHighsInf,
                    0.0,
                    np.append(at, peak),
                    np.append(t.activation_bytes[b, :k] / _MIB, -1.0),
                )
            )
        mem_index.append(np.array([peak]))
        mem_value.append(np.ones(1))
        mine = np.concatenate(blocks)
        if math.isfinite(part.max_latency_ms):
            rows.append(
                (
                    -highspy.kHighsInf,
                    part.max_latency_ms - t.frame_latency_ms,
                    mine,
                    np.concatenate([t.latency_ms[b, :k] for b, k in enumerate(t.sizes)]),
                )
            )
        if part.min_accuracy is not None:
            rows.append(
                (
                    -highspy.kHighsInf,
                    t.teacher_accuracy - part.min_accuracy,
                    mine,
                    np.concatenate([t.drop[b, :k] for b, k in enumerate(t.sizes)]),
                )
            )
        frame_lat += t.frame_latency_ms
        frame_mem += t.frame_weight_bytes
        slots.append(blocks)
    if math.isfinite(lat_cap):
        rows.append(
            (
                -highspy.kHighsInf,
                lat_cap - frame_lat,
                np.concatenate(lat_index),
                np.concatenate(lat_value),
            )
        )
    if math.isfinite(mem_cap):
        rows.append(
            (
                -highspy.kHighsInf,
                (mem_cap - frame_mem) / _MIB,
                np.concatenate(mem_index),
                np.concatenate(mem_value),
            )
        )
    h = _highs(
        {
            "mip_rel_gap": 0.0,
            "mip_abs_gap": 0.0,
            "mip_feasibility_tolerance": 1e-7,
            "time_limit": _MILP_TIME_LIMIT_S,
        }
    )
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, len(rows)
    lp.col_cost_ = np.concatenate(cost)
    lp.col_lower_ = np.concatenate(lower)
    lp.col_upper_ = np.concatenate(upper)
    lp.row_lower_ = np.array([r[0] for r in rows])
    lp.row_upper_ = np.array([r[1] for r in rows])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.cumsum([0] + [len(r[2]) for r in rows]).astype(np.int32)
    lp.a_matrix_.index_ = np.concatenate([r[2] for r in rows]).astype(np.int32)
    lp.a_matrix_.value_ = np.concatenate([r[3] for r in rows])
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, len(rows)
    lp.integrality_ = [
        highspy.HighsVarType.kInteger if flag else highspy.HighsVarType.kContinuous
        for flag in np.concatenate(integer)
    ]
    h.passModel(lp)
    while True:
        h.run()
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return None
        if status != highspy.HighsModelStatus.kOptimal:
            raise SolverError(
                f"HiGHS stopped without a proven optimum: {h.modelStatusToString(status)}",
                hint="a time limit on a large joint problem: use method='search'",
            )
        x = np.array(h.getSolution().col_value)
        found = [tuple(int(x[at].argmax()) for at in blocks) for blocks in slots]
        if _meets(parts, found, lat_cap, mem_cap):
            return found
        chosen = np.array(
            [blocks[b][c] for blocks, f in zip(slots, found, strict=True) for b, c in enumerate(f)]
        )
        h.addRow(
            -highspy.kHighsInf,
            len(chosen) - 1.0,
            len(chosen),
            chosen.astype(np.int32),
            np.ones(len(chosen)),
        )


def _meets(
    parts: Sequence[_Part], found: list[tuple[int, ...]], lat_cap: float, mem_cap: float
) -> bool:
    """Whether the choices meet every limit, exactly."""
    estimates = [p.table.estimate(c) for p, c in zip(parts, found, strict=True)]
    for p, e in zip(parts, estimates, strict=True):
        if e.latency_ms > p.max_latency_ms:
            return False
        if p.min_accuracy is not None and e.accuracy < p.min_accuracy:
            return False
    latency = sum(e.latency_ms for e in estimates)
    memory = sum(e.memory_mb * _MIB for e in estimates)
    return latency <= lat_cap and memory <= mem_cap


def _highs(options: dict[str, object]) -> highspy.Highs:
    """A silent HiGHS instance with ``options`` set."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    for name, value in options.items():
        h.setOptionValue(name, value)
    return h


# ---------------------------------------------------------------------------------------------
# helpers

_SELECTORS: weakref.WeakKeyDictionary[CostTable, Selector] = weakref.WeakKeyDictionary()


def _selector(table: CostTable) -> Selector:
    """The table's Selector, built once while the table lives (tables are immutable)."""
    selector = _SELECTORS.get(table)
    if selector is None:
        selector = _SELECTORS[table] = Selector(table)
    return selector


def _check_choices(table: CostTable, choices: Sequence[int]) -> tuple[int, ...]:
    """``choices`` as a tuple of ints, validated against the table (ValueError otherwise)."""
    return table.estimate(choices).choices


def _bytes_array(
    table: CostTable, bytes_table: Sequence[Sequence[float]] | np.ndarray, real: np.ndarray
) -> np.ndarray:
    """A bytes table as an array shaped like ``table.drop`` (0 in the padding), validated."""
    if isinstance(bytes_table, np.ndarray) and bytes_table.shape == real.shape:
        loads = np.array(bytes_table, dtype=np.float64)
    else:
        rows = [list(row) for row in bytes_table]
        if tuple(len(row) for row in rows) != table.sizes:
            raise ValueError(
                f"bytes_table must list {table.sizes} descendants per block, "
                f"got {tuple(len(row) for row in rows)}"
            )
        loads = np.zeros(real.shape)
        for b, row in enumerate(rows):
            loads[b, : len(row)] = row
    loads = np.where(real, loads, 0.0)
    if not np.isfinite(loads).all() or loads.min() < 0:
        raise ValueError("bytes_table must hold finite, non-negative byte counts")
    return loads


def _grid_caps(budget: Budget) -> tuple[float, float]:
    """The budget on the cost grids (latency on 2**-20 ms, memory in whole bytes); inf if unset."""
    lat = math.inf if budget.latency_ms is None else _floor_ms(budget.latency_ms)
    mem = math.inf if budget.memory_mb is None else float(math.floor(budget.memory_mb * _MIB))
    return lat, mem


def _floor_ms(value: float) -> float:
    """``value`` rounded down to the latency grid: a grid sum is within it iff within ``value``."""
    return math.floor(value * _LATENCY_STEPS) / _LATENCY_STEPS


def _within(selection: Selection, budget: Budget) -> bool:
    return (budget.latency_ms is None or selection.latency_ms <= budget.latency_ms) and (
        budget.memory_mb is None or selection.memory_mb <= budget.memory_mb
    )


def _total(groups: Sequence[_Group], picks: Sequence[int], field: str) -> float:
    return sum(float(getattr(g, field)[i]) for g, i in zip(groups, picks, strict=True))


def _label(index: int, member: Member) -> str:
    return f"member {index}" + (f" ({member.name!r})" if member.name else "")


def _member_error(
    index: int,
    member: Member,
    accuracy: np.ndarray,
    latency: np.ndarray,
    memory: np.ndarray,
    accurate: np.ndarray,
    fast: np.ndarray,
) -> InfeasibleMemberError:
    """Why no selection of a member's bank meets its own limits, and which limit to move."""
    who = _label(index, member)
    least_lat = float(latency[accurate].min()) if accurate.any() else None
    least_mem = float(memory[accurate].min()) / _MIB if accurate.any() else None
    if not accurate.any():
        best = float(accuracy.max())
        message = (
            f"{who}: no selection reaches min_accuracy {member.min_accuracy:g}; "
            f"the most accurate reaches {best:.6f}"
        )
        hint = f"lower min_accuracy to at most {_floor(best)}"
    elif not fast.any():
        message = (
            f"{who}: no selection runs within max_latency_ms {member.max_latency_ms:g}; "
            f"the fastest takes {float(latency.min()):.4f} ms"
        )
        hint = f"raise max_latency_ms to at least {_ceil(float(latency.min()))}"
    else:
        best = float(accuracy[fast].max())
        message = (
            f"{who}: no selection reaches min_accuracy {member.min_accuracy:g} within "
            f"max_latency_ms {member.max_latency_ms:g}: the most accurate within it reaches "
            f"{best:.6f}, and the fastest that reaches it takes {least_lat:.4f} ms"
        )
        hint = (
            f"lower min_accuracy to at most {_floor(best)} "
            f"or raise max_latency_ms to at least {_ceil(least_lat)}"
        )
    return InfeasibleMemberError(
        message, member=index, min_latency_ms=least_lat, min_memory_mb=least_mem, hint=hint
    )


def _ceil(value: float) -> str:
    """``value`` rounded up to four decimals, so a limit raised to it suffices."""
    text = f"{math.ceil(value * 1e4) / 1e4:.4f}"
    while float(text) < value:
        text = f"{float(text) + 1e-4:.4f}"
    return text


def _floor(value: float) -> str:
    """``value`` rounded down to six decimals, so a minimum lowered to it is met."""
    text = f"{math.floor(value * 1e6) / 1e6:.6f}"
    while float(text) > value:
        text = f"{float(text) - 1e-6:.6f}"
    return text
