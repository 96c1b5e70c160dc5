"""Exact selection: the most accurate descendant per block within a latency and memory budget.

Estimates follow LegoDNN's additive model: accuracy is the teacher's minus the summed per-block
drops, latency is the frame's plus the blocks', and memory is every weight byte plus the peak of the
activations (blocks run one after another, so activation memory is a maximum, not a sum).

``solve`` answers one budget by branch and bound, from bounds the table works out once (exact
Pareto fronts of every run of trailing blocks); ``Selector`` computes a bank's Pareto set once so
each later query is a few numpy operations; ``frontier`` lists the accuracy-latency trade-offs. All
are exact, and ties go to lower latency, then lower memory, then the lexicographically smallest
choices, so they agree with each other and with brute force.

Costs are rounded on construction to binary grids (2**-32 for accuracy drops, 2**-20 ms for
latencies, whole bytes for memory), far finer than any measurement, so every sum below is exact in
float64 and no result depends on the order in which costs are added.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import InfeasibleBudgetError
from .types import Budget, Profile, Selection, require_latency

_MIB = float(2**20)
_DROP_STEPS = 2.0**32
_LATENCY_STEPS = 2.0**20
_EXACT = 2.0**53
# a table enumerates its leading blocks outright, as the states every solve starts from, while
# their combinations number at most this many; bounds start at the first block after them.
_RAW_STATES = 216
# solve completes this many of the most promising states (when it has more) to find incumbents.
_PROBES = 8
# once a layer keeps more states than this, solve adds a bound pricing latency and weight together
# and dives for better incumbents.
_CROWD = 32
# once a layer keeps at most this many states, solve finishes depth first in plain Python: on so
# few states numpy's per-call overhead costs more than the arithmetic.
_FEW = 32
# stands for "no feasible selection known yet": above every finite bound, below +inf.
_UNKNOWN = float(np.finfo(np.float64).max)
# block size of the sweeps that remove dominated states.
_SWEEP = 128

_Arrays = tuple[np.ndarray, ...]


class _Plain(NamedTuple):
    """The fronts of blocks r.. as plain lists, for the depth-first finish (``_Search._descend``)."""

    lat_keys: list[float]  # the latency front's latencies, ascending
    lat_drops: list[float]  # its drops, after the leading +inf of ``_least``
    lat_gains: list[float]  # its drops negated (ascending), to find the fastest within a drop
    weight_keys: list[float]  # the weight front's weights, ascending
    weight_drops: list[float]  # its drops, after the leading +inf of ``_least``
    floor: float  # floors[r]


class _Derived(NamedTuple):
    """What every query needs from a table, worked out once when the table is made."""

    rows: tuple[_Arrays, ...]  # per block: (drop, latency, weight, activation) of its descendants
    blocks: tuple[_Arrays, ...]  # per block: its (drop, latency, weight) rows and its activations
    least_latency: np.ndarray  # entry r: frame plus the fastest descendant of each block before r
    least_weight: np.ndarray  # entry r: frame plus the lightest descendant of each block before r
    floors: np.ndarray  # entry r: the least activation peak of blocks r.. and the frame
    most_latency: float  # the slowest selection's latency
    most_memory: float  # the largest selection's memory, in bytes
    peaks: np.ndarray  # every activation peak a selection can have, ascending
    start: int  # solve enumerates the blocks before this one outright (see _RAW_STATES)
    head: np.ndarray  # their every combination as a state (see _Search), in lexicographic order
    items: tuple[list[list[float]], ...]  # per block: (drop, latency, weight, activation) rows
    fronts: tuple[tuple[_Arrays, _Arrays], ...]  # entry r - start: blocks r.. by latency, by weight
    plain: tuple[_Plain, ...]  # entry r - start: the same fronts as plain lists
    points: tuple[_Arrays, ...]  # entry r - start: both fronts' points, for _Search._probe


@dataclass(frozen=True, eq=False)
class CostTable:
    """The costs selection needs for one bank on one target, one row per block.

    The arrays have shape ``(blocks, most descendants)``; the first ``sizes[b]`` entries of row ``b``
    are real, the rest +inf. ``drop`` is in accuracy fractions, latencies in ms, memory in bytes.
    Values are validated and rounded to exact grids on construction (see the module docstring).
    """

    drop: np.ndarray
    latency_ms: np.ndarray
    weight_bytes: np.ndarray
    activation_bytes: np.ndarray
    sizes: tuple[int, ...]
    frame_latency_ms: float = 0.0
    frame_weight_bytes: int = 0
    frame_activation_bytes: int = 0
    teacher_accuracy: float = 1.0
    _derived: _Derived = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(k) for k in self.sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"a cost table needs blocks with a descendant each, got sizes {sizes}")
        real = np.arange(max(sizes)) < np.array(sizes)[:, None]
        object.__setattr__(self, "sizes", sizes)
        frame = {
            "drop": self.teacher_accuracy,
            "latency_ms": self.frame_latency_ms,
            "weight_bytes": self.frame_weight_bytes,
            "activation_bytes": self.frame_activation_bytes,
        }
        steps = {"drop": _DROP_STEPS, "latency_ms": _LATENCY_STEPS}
        for name, frame_value in frame.items():
            grid = steps.get(name, 1.0)
            values = np.array(getattr(self, name), dtype=np.float64)
            if values.shape != real.shape:
                raise ValueError(
                    f"CostTable.{name} must have shape {real.shape} for sizes {sizes}, "
                    f"got {values.shape}"
                )
            own = values[real]
            if not (np.isfinite(own).all() and math.isfinite(frame_value)):
                raise ValueError(f"CostTable.{name} holds a value that is not finite")
            if name != "drop" and (own.min() < 0 or frame_value < 0):
                raise ValueError(f"CostTable.{name} holds a negative cost")
            largest = np.abs(np.where(real, values, 0.0)).max(axis=1).sum() + abs(frame_value)
            if largest * grid >= _EXACT:
                raise ValueError(f"CostTable.{name} holds costs too large to add exactly")
            values = np.where(real, np.round(values * grid) / grid, np.inf)
            values.setflags(write=False)
            object.__setattr__(self, name, values)
        object.__setattr__(self, "teacher_accuracy", _snap(self.teacher_accuracy, _DROP_STEPS))
        object.__setattr__(self, "frame_latency_ms", _snap(self.frame_latency_ms, _LATENCY_STEPS))
        object.__setattr__(self, "frame_weight_bytes", round(self.frame_weight_bytes))
        object.__setattr__(self, "frame_activation_bytes", round(self.frame_activation_bytes))
        object.__setattr__(self, "_derived", self._derive(real))

    def _derive(self, real: np.ndarray) -> _Derived:
        """The budget-independent summaries that solve and Selector start from.

        Working out the suffix fronts here, once per bank and target, rather than in every solve is
        most of what makes a solve fast; it about triples the time a table takes to build.
        """
        fa = float(self.frame_activation_bytes)
        rows = tuple(
            (self.drop[b, :k], self.latency_ms[b, :k], self.weight_bytes[b, :k], ac[:k])
            for b, (k, ac) in enumerate(zip(self.sizes, self.activation_bytes, strict=True))
        )
        blocks = tuple((np.stack(row[:3], axis=1), row[3]) for row in rows)
        floors = np.maximum.accumulate(self.activation_bytes.min(axis=1)[::-1])[::-1]
        floors = np.maximum(np.append(floors, 0.0), fa)
        acts = self.activation_bytes[real]
        start = int(np.cumprod(self.sizes, dtype=float).searchsorted(_RAW_STATES, side="right"))
        head = np.array([[0.0, self.frame_latency_ms, self.frame_weight_bytes, fa]])
        for block in blocks[:start]:
            head = _grow(head, *block)
        derived = _Derived(
            rows=rows,
            blocks=blocks,
            least_latency=np.cumsum(np.append(self.frame_latency_ms, self.latency_ms.min(axis=1))),
            least_weight=np.cumsum(
                np.append(self.frame_weight_bytes, self.weight_bytes.min(axis=1))
            ),
            floors=floors,
            most_latency=self.frame_latency_ms
            + float(np.where(real, self.latency_ms, 0.0).max(axis=1).sum()),
            most_memory=self.frame_weight_bytes
            + float(np.where(real, self.weight_bytes, 0.0).max(axis=1).sum())
            + max(fa, float(acts.max())),
            peaks=np.unique(np.append(acts[acts > floors[0]], floors[0])),
            start=start,
            head=head,
            items=tuple(np.column_stack(row).tolist() for row in rows),
            fronts=(),  # these three are built from the fields above, just below
            plain=(),
            points=(),
        )
        # fronts within the costliest selection's caps hold every point any budget can use
        fronts = _suffix_fronts(
            derived, start, derived.most_latency, derived.most_memory, ((1.0, 0.0), (0.0, 1.0))
        )
        assert fronts is not None  # the costliest selection fits its own caps
        plain = tuple(
            _Plain(
                lat[0].tolist(),
                lat[1].tolist(),
                (-lat[1][1:]).tolist(),
                weight[0].tolist(),
                weight[1].tolist(),
                float(floors[r]),
            )
            for r, (lat, weight) in enumerate(fronts, start)
        )
        points = tuple(_points(*layer) for layer in fronts)
        return derived._replace(fronts=tuple(fronts), plain=plain, points=points)

    @classmethod
    def from_lists(
        cls,
        drop: Sequence[Sequence[float]],
        latency_ms: Sequence[Sequence[float]],
        weight_bytes: Sequence[Sequence[float]],
        activation_bytes: Sequence[Sequence[float]],
        *,
        frame_latency_ms: float = 0.0,
        frame_weight_bytes: int = 0,
        frame_activation_bytes: int = 0,
        teacher_accuracy: float = 1.0,
    ) -> CostTable:
        """Build a table from per-block lists (``drop[b][d]``); blocks may differ in length."""
        columns = {
            "drop": drop,
            "latency_ms": latency_ms,
            "weight_bytes": weight_bytes,
            "activation_bytes": activation_bytes,
        }
        sizes = tuple(len(row) for row in drop)
        padded = {}
        for name, rows in columns.items():
            if tuple(len(row) for row in rows) != sizes:
                raise ValueError(
                    f"{name} must list as many blocks and descendants as drop {sizes}, "
                    f"got {tuple(len(row) for row in rows)}"
                )
            padded[name] = np.full((len(sizes), max(sizes, default=0)), np.inf)
            for b, row in enumerate(rows):
                padded[name][b, : len(row)] = row
        return cls(
            **padded,
            sizes=sizes,
            frame_latency_ms=frame_latency_ms,
            frame_weight_bytes=frame_weight_bytes,
            frame_activation_bytes=frame_activation_bytes,
            teacher_accuracy=teacher_accuracy,
        )

    @classmethod
    def from_profiles(
        cls,
        profiles: Sequence[Sequence[Profile]],
        frame: Profile,
        teacher_accuracy: float,
        target: str,
    ) -> CostTable:
        """Collect a bank's costs on ``target`` from its profiles, ``profiles[b][d]``, and its frame's."""
        require_latency([frame, *(p for block in profiles for p in block)], target)
        for b, block in enumerate(profiles):
            for d, p in enumerate(block):
                if (p.block, p.index) != (b, d):
                    raise ValueError(
                        f"profiles[{b}][{d}] is block {p.block} descendant {p.index}; "
                        "pass the profiles ordered by block, then by descendant"
                    )
        return cls.from_lists(
            drop=[[p.accuracy_drop for p in block] for block in profiles],
            latency_ms=[[p.latency_ms[target] for p in block] for block in profiles],
            weight_bytes=[[p.weight_bytes for p in block] for block in profiles],
            activation_bytes=[[p.activation_bytes for p in block] for block in profiles],
            frame_latency_ms=frame.latency_ms[target],
            frame_weight_bytes=frame.weight_bytes,
            frame_activation_bytes=frame.activation_bytes,
            teacher_accuracy=teacher_accuracy,
        )

    @property
    def num_blocks(self) -> int:
        """How many blocks a selection chooses for."""
        return len(self.sizes)

    def estimate(self, choices: Sequence[int]) -> Selection:
        """The additive estimate of one selection: accuracy, latency and memory."""
        picks = tuple(int(c) for c in choices)
        if len(picks) != self.num_blocks or any(
            not 0 <= c < k for c, k in zip(picks, self.sizes, strict=True)
        ):
            raise ValueError(f"choices {picks} must pick one of {self.sizes} descendants per block")
        at = (np.arange(self.num_blocks), np.array(picks))
        peak = max(self.frame_activation_bytes, float(self.activation_bytes[at].max()))
        memory = self.frame_weight_bytes + float(self.weight_bytes[at].sum()) + peak
        return Selection(
            choices=picks,
            accuracy=self.teacher_accuracy - float(self.drop[at].sum()),
            latency_ms=self.frame_latency_ms + float(self.latency_ms[at].sum()),
            memory_mb=memory / _MIB,
        )

    def _caps(self, budget: Budget) -> tuple[float, float]:
        """The budget as totals on the cost grids, clamped to the costliest selection (sums stay exact)."""
        lat, mem = self._derived.most_latency, self._derived.most_memory
        if budget.latency_ms is not None and budget.latency_ms < lat:
            lat = math.floor(budget.latency_ms * _LATENCY_STEPS) / _LATENCY_STEPS
        if budget.memory_mb is not None and budget.memory_mb * _MIB < mem:
            mem = float(math.floor(budget.memory_mb * _MIB))
        return lat, mem


def _snap(value: float, steps: float) -> float:
    """``value`` rounded to the nearest multiple of ``1 / steps``."""
    return round(value * steps) / steps


def solve(table: CostTable, budget: Budget) -> Selection:
    """The most accurate selection within ``budget``, found exactly by branch and bound."""
    lat_cap, mem_cap = table._caps(budget)
    best = _Search(table, lat_cap, mem_cap).run()
    if best is None:
        raise _infeasible(budget, *_limits(table, lat_cap, mem_cap), _fastest_memory(table))
    drop, latency, memory, choices = best
    # the search's sums are exact, so these are the numbers table.estimate(choices) gives
    return Selection(choices, table.teacher_accuracy - drop, latency, memory / _MIB)


def frontier(table: CostTable, memory_mb: float | None = None) -> list[Selection]:
    """The exact accuracy-latency Pareto frontier, by latency, optionally within ``memory_mb``.

    Each point is the selection ``solve`` picks with the point's latency as the budget (ties to
    lower memory, then smaller choices). Without a memory budget it is a Pareto dynamic program in
    latency and drop; with one it is read off a ``Selector``, whose build costs more.
    """
    if memory_mb is not None:
        return Selector(table).frontier(memory_mb)
    state = np.array(
        [[0.0, table.frame_latency_ms, table.frame_weight_bytes, table.frame_activation_bytes]]
    )
    links = []
    for r, block in enumerate(table._derived.blocks):
        state = _grow(state, *block)
        keep = _latency_staircase(state, last=r == table.num_blocks - 1)
        state = state[keep]
        links.append(keep)
    return [table.estimate(c) for c in _trace(links, table.sizes)]


class ParetoPoints(NamedTuple):
    """Selections as arrays: choices (points x blocks), summed drop, latency (ms), memory (bytes)."""

    choices: np.ndarray
    drop: np.ndarray
    latency_ms: np.ndarray
    memory_bytes: np.ndarray


class Selector:
    """A bank's Pareto set in accuracy, latency and memory, computed once for fast re-selection.

    Every budget's best selection lies in that set, so each ``select`` is a mask and an argmax
    over it (microseconds): cheap enough to run on every budget change. The set grows quickly with
    the bank: about 2,000 selections built in under 0.1 s for 9 blocks of 6, but 50,000 in
    seconds for 20 blocks of 6, where ``solve`` (milliseconds per budget) is the better fit.
    """

    def __init__(self, table: CostTable) -> None:
        self.table = table
        choices = np.concatenate([_cap_front(table, cap) for cap in table._derived.peaks])
        choices = choices[np.lexsort(choices.T[::-1])]
        at = (np.arange(table.num_blocks), choices)
        drop = table.drop[at].sum(axis=1)
        latency = table.frame_latency_ms + table.latency_ms[at].sum(axis=1)
        peak = np.maximum(table.activation_bytes[at].max(axis=1), table.frame_activation_bytes)
        memory = table.frame_weight_bytes + table.weight_bytes[at].sum(axis=1) + peak
        kept = _undominated3(drop, latency, memory)
        kept = kept[np.lexsort((memory[kept], latency[kept], drop[kept]))]
        self._choices, self._drop = choices[kept], drop[kept]
        self._latency, self._memory = latency[kept], memory[kept]

    def __len__(self) -> int:
        """How many selections the Pareto set holds."""
        return len(self._drop)

    @property
    def points(self) -> ParetoPoints:
        """The Pareto set itself, in order of summed drop, then latency, then memory."""
        return ParetoPoints(self._choices, self._drop, self._latency, self._memory)

    def select(self, budget: Budget) -> Selection:
        """The most accurate selection within ``budget``; always the same as ``solve``'s."""
        lat_cap, mem_cap = self.table._caps(budget)
        fits = (self._latency <= lat_cap) & (self._memory <= mem_cap)
        first = int(fits.argmax())
        if not fits[first]:
            raise _infeasible(
                budget,
                float(self._latency.min()),
                float(self._memory.min()),
                float(self._latency[self._memory <= mem_cap].min(initial=math.inf)),
                float(self._memory[self._latency <= lat_cap].min(initial=math.inf)),
                float(self._memory[self._latency == self._latency.min()].min()),
            )
        return self._selection(first)

    def frontier(self, memory_mb: float | None = None) -> list[Selection]:
        """The accuracy-latency Pareto frontier, by latency, optionally within ``memory_mb``."""
        _, mem_cap = self.table._caps(Budget(memory_mb=memory_mb))
        inside = np.flatnonzero(self._memory <= mem_cap)
        order = np.lexsort((self._drop[inside], self._latency[inside]))
        kept = inside[order[_staircase(self._drop[inside][order])]]
        return [self._selection(i) for i in kept]

    def _selection(self, i: int) -> Selection:
        """Pareto point ``i`` as a Selection (the same numbers ``table.estimate`` gives: sums are exact)."""
        return Selection(
            choices=tuple(self._choices[i].tolist()),
            accuracy=self.table.teacher_accuracy - float(self._drop[i]),
            latency_ms=float(self._latency[i]),
            memory_mb=float(self._memory[i]) / _MIB,
        )


def _staircase(values: np.ndarray) -> np.ndarray:
    """Mask of the values below every earlier one (the Pareto staircase of points sorted by key)."""
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    keep[1:] = values[1:] < np.minimum.accumulate(values)[:-1]
    return keep


def _latency_staircase(state: np.ndarray, last: bool) -> np.ndarray:
    """Indices of the states (rows in lexicographic order) no other beats in latency and drop.

    Of states equal in both, earlier layers keep those no other of the group makes redundant (see
    ``_undominated4``), in lexicographic order; the last layer keeps the one of least memory, then
    the earliest, and lists them by latency.
    """
    drop, lat, weight, peak = state.T
    order = np.lexsort((weight + peak, drop, lat) if last else (peak, weight, drop, lat))
    drop, lat = drop[order], lat[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (lat[1:] != lat[:-1]) | (drop[1:] != drop[:-1])
    starts = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    before = np.append(np.inf, np.minimum.accumulate(drop)[:-1])
    keep = drop < before[starts]
    if last:
        return order[keep & first]
    for group in np.unique(starts[keep & ~first]):
        members = np.flatnonzero(starts == group)
        members = members[np.argsort(order[members])]
        keep[members] = _undominated4(state[order[members]])
    return np.sort(order[keep])


def _trace(links: list[np.ndarray], sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """The choices of every final state, following each layer's kept flat indices back."""
    state = np.arange(len(links[-1]))
    columns = []
    for keep, k in zip(reversed(links), reversed(sizes), strict=True):
        state, choice = np.divmod(keep[state], k)
        columns.append(choice)
    return [tuple(row) for row in np.stack(columns[::-1], axis=1).tolist()]


class _Search:
    """Branch and bound over the blocks in order for one budget.

    States are prefixes (the first r blocks chosen) as rows (drop, latency, weight, peak), kept in
    lexicographic order of their choices; latency and weight include the frame's, and the peak
    starts at the frame's activations. A state survives while a lower bound on its best
    completion's drop is at most the drop of a feasible selection found so far (the incumbent),
    and while no other state is as good in every cost. Bounds come from exact Pareto fronts of the
    remaining blocks in drop against latency, against weight and, once states crowd, against a
    priced sum of the two; incumbents from completing promising states with front points and,
    when crowded, from diving greedily down the best bounds.

    The layers are numpy arrays while they are wide; once one keeps at most ``_FEW`` states, each
    is finished depth first in plain Python with the same bounds (see ``_descend``).
    """

    def __init__(self, table: CostTable, lat_cap: float, mem_cap: float) -> None:
        self.table, self.lat_cap, self.mem_cap = table, lat_cap, mem_cap
        self.priced: tuple[float, float, int, list[tuple[_Arrays, ...]]] | None = None
        self.best = (_UNKNOWN, _UNKNOWN)  # the incumbent's (drop, latency)
        # the best selection the depth-first finish has reached: (drop, latency, memory, choices)
        self.leaf: tuple[float, float, float, tuple[int, ...]] | None = None
        self.seen: set[tuple[int, tuple[float, ...]]] = set()  # (r, child) pairs it searched

    def run(self) -> tuple[float, float, float, tuple[int, ...]] | None:
        """The best selection as (drop, latency, memory in bytes, choices); None if none fits."""
        derived = self.table._derived
        n, r, state = self.table.num_blocks, derived.start, derived.head
        links = []  # per layer from the start: the rows it kept of those grown into it
        while True:
            bound = self._bound(state, r)
            if r < n and (r == derived.start or len(state) > _PROBES):
                self._probe(state, bound, r)
            keep = self._promising(state, bound, r).nonzero()[0]
            if len(keep) > _CROWD and r < n:
                # crowded: tighten the bounds and the incumbent before the costly dominance sweep
                if self.priced is None:
                    self._price_from(r)
                    bound = self._bound(state, r)
                at = keep[bound[keep].argmin()]
                if bound[at] < self.best[0]:
                    self._dive(state[at], r)
                keep = keep[self._promising(state[keep], bound[keep], r)]
            if len(keep) > 1 and (r == n or len(keep) > _FEW):
                keep = keep[_undominated4(state[keep])]
            state, bound = state[keep], bound[keep]
            links.append(keep)
            if r == n or len(state) <= _FEW:
                break
            state = _grow(state, *derived.blocks[r])
            r += 1
        if r < n:
            # in lexicographic order, so that a state met again is never reached by smaller choices
            for at, (least, *row) in enumerate(zip(bound.tolist(), *state.T.tolist(), strict=True)):
                if least <= self.best[0]:
                    self._descend(r, tuple(row), list(self._choices(links, at)))
            return self.leaf
        if not len(state):
            return None
        drop, lat, weight, peak = state.T
        memory = weight + peak
        at = int(np.lexsort((memory, lat, drop))[0])
        return float(drop[at]), float(lat[at]), float(memory[at]), self._choices(links, at)

    def _choices(self, links: list[np.ndarray], at: int) -> tuple[int, ...]:
        """The choices of row ``at`` of the last layer, following each layer's kept rows back.

        A grown row is its parent's row times the block's size plus the choice; the first layer's
        rows number every combination of the leading blocks the same way.
        """
        start, sizes = self.table._derived.start, self.table.sizes
        choices = []
        for layer in range(len(links) - 1, -1, -1):
            at = int(links[layer][at])
            for b in range(start - 1, -1, -1) if layer == 0 else (start + layer - 1,):
                at, choice = divmod(at, sizes[b])
                choices.append(choice)
        return tuple(reversed(choices))

    def _descend(self, r: int, state: tuple[float, ...], prefix: list[int]) -> None:
        """Search the completions of one state of layer ``r`` depth first, in plain Python.

        Children are visited in order of their choices and bounded as a layer's states are, by the
        latency and weight fronts of the blocks after them. A child whose bound ties the
        incumbent's drop is kept only while it may still beat the best selection reached so far on
        the tie-breaks: (bound, least latency at that drop, least memory, choices so far) orders
        below every completion's key, so a child whose key is above the best's has no completion
        ahead of it. Leaves compare exact keys. A state met before was searched already, from
        smaller choices and against an incumbent no better, so it is skipped; its peak counts as at
        least the activation floor of the blocks after it, which every completion reaches anyway.
        """
        derived = self.table._derived
        drop, lat, weight, peak = state
        lat_keys, lat_drops, lat_gains, weight_keys, weight_drops, floor = derived.plain[
            r + 1 - derived.start
        ]
        last = r + 1 == self.table.num_blocks
        for choice, (c_drop, c_lat, c_weight, c_act) in enumerate(derived.items[r]):
            child_lat, child_weight = lat + c_lat, weight + c_weight
            top = c_act if c_act > peak else peak
            top = top if top > floor else floor
            spare_ms, spare_bytes = self.lat_cap - child_lat, self.mem_cap - child_weight - top
            if spare_ms < 0 or spare_bytes < 0:
                continue
            total = drop + c_drop
            least = lat_drops[bisect_right(lat_keys, spare_ms)]
            by_weight = weight_drops[bisect_right(weight_keys, spare_bytes)]
            bound = total + (least if least > by_weight else by_weight)
            if bound > self.best[0]:
                continue
            if last or (bound == self.best[0] and self.leaf is not None):
                fastest = lat_keys[bisect_left(lat_gains, total - bound)]
                memory = child_weight + top + weight_keys[0]
                key = (bound, child_lat + fastest, memory, (*prefix, choice))
                if self.leaf is not None and key > self.leaf:
                    continue
                if last:
                    self.leaf = key
                    self.best = min(self.best, key[:2])
                    continue
            child = (total, child_lat, child_weight, top)
            if (r, child) in self.seen:
                continue
            self.seen.add((r, child))
            prefix.append(choice)
            self._descend(r + 1, child, prefix)
            prefix.pop()

    def _fronts(self, r: int) -> tuple[_Arrays, ...]:
        """The fronts of blocks r.. : latency, weight, then the priced ones if any."""
        derived = self.table._derived
        here = derived.fronts[r - derived.start]
        if self.priced is not None and r >= self.priced[2]:
            here = (*here, *self.priced[3][r - self.priced[2]])
        return here

    def _bound(self, state: np.ndarray, r: int) -> np.ndarray:
        """A lower bound on the drop of each state's best feasible completion (+inf: none)."""
        drop, lat, weight, peak = state.T
        spare_ms = self.lat_cap - lat
        spare_bytes = self.mem_cap - weight - np.maximum(peak, self.table._derived.floors[r])
        here = self._fronts(r)
        bound = np.maximum(_least(here[0], spare_ms), _least(here[1], spare_bytes))
        if len(here) > 2:
            price, slack = self.priced[0], self.priced[1]
            bound = np.maximum(bound, _least(here[2], spare_ms + price * spare_bytes + slack))
        return drop + bound

    def _price_from(self, r: int) -> None:
        """Add fronts priced in latency plus weight for blocks r.. (their rounding gets slack)."""
        derived = self.table._derived
        price = _price(self.table, self.lat_cap, self.mem_cap)
        slack = 1e-9 * (derived.most_latency + price * derived.most_memory)
        fronts = _suffix_fronts(derived, r, self.lat_cap + slack, self.mem_cap, ((1.0, price),))
        if fronts is not None:
            self.priced = (price, slack, r, fronts)

    def _probe(self, state: np.ndarray, bound: np.ndarray, r: int) -> None:
        """Improve the incumbent by completing the most promising states with front points."""
        if len(bound) > _PROBES:
            state = state[np.argpartition(bound, _PROBES)[:_PROBES]]
        drop, lat, weight, peak = (column[:, None] for column in state.T)
        derived = self.table._derived
        points = [derived.points[r - derived.start]]
        if self.priced is not None and r >= self.priced[2]:
            points.append(_points(*self.priced[3][r - self.priced[2]]))
        for f_drop, f_lat, f_weight, f_peak in points:
            time = lat + f_lat
            fits = (time <= self.lat_cap) & (
                weight + f_weight + np.maximum(peak, f_peak) <= self.mem_cap
            )
            total = np.where(fits, drop + f_drop, np.inf)
            at = divmod(int(total.argmin()), total.shape[1])
            if fits[at]:
                self.best = min(self.best, (float(total[at]), float(time[at])))

    def _dive(self, state: np.ndarray, r: int) -> None:
        """Improve the incumbent by completing one state, each block the choice of least bound."""
        for layer in range(r, self.table.num_blocks):
            children = _grow(state[None], *self.table._derived.blocks[layer])
            bound = self._bound(children, layer + 1)
            if bound.min() == np.inf:
                return
            state = children[bound.argmin()]
        self.best = min(self.best, (float(state[0]), float(state[1])))

    def _promising(self, state: np.ndarray, bound: np.ndarray, r: int) -> np.ndarray:
        """Mask of states that may still lead to a selection at least as good as the incumbent.

        Ties with the incumbent's drop must also be able to match its latency.
        """
        fits = bound <= self.best[0]
        tied = (bound == self.best[0]).nonzero()[0]
        if len(tied) > 1 and self.best[0] < _UNKNOWN:
            drop, lat = state[tied, 0], state[tied, 1]
            fastest = lat + _fastest(self._fronts(r)[0], self.best[0] - drop)
            fits[tied[fastest > self.best[1]]] = False
        return fits


def _grow(state: np.ndarray, costs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Every state extended by every descendant of the next block, in lexicographic order."""
    grown = np.empty((len(state), len(act), 4))
    np.add(state[:, None, :3], costs, out=grown[:, :, :3])
    np.maximum(state[:, None, 3:], act[:, None], out=grown[:, :, 3:])
    return grown.reshape(-1, 4)


def _price(table: CostTable, lat_cap: float, mem_cap: float) -> float:
    """Milliseconds per byte that trade latency against weight well for this budget.

    The ratio of the Lagrange multipliers of the two budgets that give the bank's best Lagrangian
    bound, searched on a log-spaced grid.
    """
    real = np.isfinite(table.drop)
    span = [np.ptp(a[real]) or 1.0 for a in (table.drop, table.latency_ms, table.weight_bytes)]
    grid = np.logspace(-3, 3, 25)
    per_ms = (grid * span[0] / span[1])[:, None, None, None]
    per_byte = (grid * span[0] / span[2])[None, :, None, None]
    costs = table.drop + per_ms * table.latency_ms + per_byte * table.weight_bytes
    least = np.where(real, costs, np.inf).min(axis=3).sum(axis=2)
    room_ms = lat_cap - table.frame_latency_ms
    room_bytes = mem_cap - table.frame_weight_bytes - table._derived.floors[0]
    value = least - per_ms[..., 0, 0] * room_ms - per_byte[..., 0, 0] * room_bytes
    i, j = np.unravel_index(value.argmax(), value.shape)
    return float(per_byte[0, j, 0, 0] / per_ms[i, 0, 0, 0])


def _suffix_fronts(
    derived: _Derived,
    start: int,
    lat_cap: float,
    mem_cap: float,
    prices: tuple[tuple[float, float], ...],
) -> list[tuple[_Arrays, ...]] | None:
    """For each r >= start and each (a, b) in ``prices``, the Pareto front of blocks r.. in
    (a * latency + b * weight, drop).

    A front is (key, drop, latency, weight, peak) sorted by key, each point one selection of the
    remaining blocks; ``drop`` has an extra +inf in front (see ``_least``). Points that cannot fit
    the caps even after the cheapest earlier blocks are left out. None when nothing fits.
    """
    zero = np.zeros(1)
    current = [(zero, np.array([np.inf, 0.0]), zero, zero, zero)] * len(prices)
    fronts = [tuple(current)]
    for r in range(len(derived.rows) - 1, start - 1, -1):
        dr, la, wt, ac = derived.rows[r]
        spare_ms = lat_cap - derived.least_latency[r]
        spare_bytes = mem_cap - derived.floors[0] - derived.least_weight[r]
        for i, (a, b) in enumerate(prices):
            key = la if b == 0 else wt if a == 0 else a * la + b * wt
            limit = (
                spare_ms if b == 0 else spare_bytes if a == 0 else a * spare_ms + b * spare_bytes
            )
            current[i] = _extend(current[i], dr, la, wt, ac, key, limit)
            if len(current[i][0]) == 0:
                return None
        fronts.append(tuple(current))
    return fronts[::-1]


def _extend(
    front: _Arrays,
    dr: np.ndarray,
    la: np.ndarray,
    wt: np.ndarray,
    ac: np.ndarray,
    costs: np.ndarray,
    limit: float,
) -> _Arrays:
    """The front with one more leading block whose key costs are ``costs``, keys within ``limit``."""
    key, drop, lat, weight, peak = front
    keys = (costs[:, None] + key).ravel()
    order = keys.argsort(kind="stable")
    keys = keys[order]
    order = order[: keys.searchsorted(limit, side="right")]
    drops = (dr[:, None] + drop[1:]).ravel()[order]
    keep = _staircase(drops)
    choice, rest = np.divmod(order[keep], len(key))
    kept_drops = np.empty(len(choice) + 1)
    kept_drops[0] = np.inf
    kept_drops[1:] = drops[keep]
    return (
        keys[: len(order)][keep],
        kept_drops,
        la[choice] + lat[rest],
        wt[choice] + weight[rest],
        np.maximum(ac[choice], peak[rest]),
    )


def _points(*fronts: _Arrays) -> _Arrays:
    """Every point of ``fronts`` as columns (drop, latency, weight, peak), to complete states with."""
    parts = ((front[1][1:], *front[2:]) for front in fronts)
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _least(front: _Arrays, room: np.ndarray) -> np.ndarray:
    """The least drop on ``front`` with key within each ``room`` (+inf where nothing fits)."""
    return front[1][front[0].searchsorted(room, side="right")]


def _fastest(front: _Arrays, spare: np.ndarray) -> np.ndarray:
    """The least latency on a latency front among points whose drop is within each ``spare``."""
    at = (-front[1][1:]).searchsorted(-spare, side="left")
    return np.append(front[2], np.inf)[at]


def _undominated4(state: np.ndarray) -> np.ndarray:
    """Mask of the states (rows in lexicographic order of choices) no other state makes redundant.

    A state is redundant when another is no worse in all four costs and either better in drop,
    latency or weight or earlier; a lower peak alone does not count, as later blocks may hide it.
    Every such rival sorts before it by (drop, latency, weight, peak, position), so a sweep in that
    order, after dropping repeats, checks each state only against the states kept before it.
    """
    n = len(state)
    order = np.lexsort(state.T[::-1])
    ranked = state[order]
    keep = np.zeros(n, dtype=bool)
    keep[0] = True
    keep[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
    for lo in range(0, n, _SWEEP):
        fresh = keep[lo : lo + _SWEEP].nonzero()[0] + lo
        part, at = ranked[fresh], order[fresh]
        rivals = np.concatenate((keep[:lo].nonzero()[0], fresh))
        rows = ranked[rivals]
        covers = (rows[:, None, :] <= part).all(axis=2)
        ahead = (rows[:, None, :3] < part[:, :3]).any(axis=2) | (order[rivals][:, None] < at)
        keep[fresh] = ~(covers & ahead).any(axis=0)
    mask = np.empty(n, dtype=bool)
    mask[order] = keep
    return mask


def _undominated3(first: np.ndarray, second: np.ndarray, third: np.ndarray) -> np.ndarray:
    """Ascending indices of the points no other point matches or beats in all three costs.

    Of points equal in all three the earliest stays. Points are swept in order of ``first``, a
    block at a time, against the staircase of (second, third) pairs kept so far.
    """
    order = np.lexsort((third, second, first))
    second, third = second[order], third[order]
    keep = np.empty(len(order), dtype=bool)
    stair_s = stair_t = np.empty(0)
    for lo in range(0, len(order), _SWEEP):
        s, t = second[lo : lo + _SWEEP], third[lo : lo + _SWEEP]
        hit = np.triu((s[:, None] <= s) & (t[:, None] <= t), 1).any(axis=0)
        if len(stair_s):
            at = np.searchsorted(stair_s, s, side="right") - 1
            hit |= (at >= 0) & (stair_t[at] <= t)
        keep[lo : lo + len(s)] = ~hit
        stair_s = np.concatenate((stair_s, s[~hit]))
        stair_t = np.concatenate((stair_t, t[~hit]))
        step = np.lexsort((stair_t, stair_s))
        stair_s, stair_t = stair_s[step], stair_t[step]
        step = _staircase(stair_t)
        stair_s, stair_t = stair_s[step], stair_t[step]
    return np.sort(order[keep])


def _cap_front(table: CostTable, cap: float) -> np.ndarray:
    """Choices (rows) of the selections within activation ``cap`` that none such beats in all costs.

    The costs are drop, latency and weight; with the peak capped, memory is weight plus the cap.
    """
    drop, lat = np.zeros(1), np.zeros(1)
    weight = np.zeros(1)
    links = []
    for dr, la, wt, ac in table._derived.rows:
        allowed = np.flatnonzero(ac <= cap)
        drop = (drop[:, None] + dr[allowed]).ravel()
        lat = (lat[:, None] + la[allowed]).ravel()
        weight = (weight[:, None] + wt[allowed]).ravel()
        keep = _undominated3(drop, lat, weight)
        drop, lat, weight = drop[keep], lat[keep], weight[keep]
        links.append((keep, allowed))
    state = np.arange(len(drop))
    columns = []
    for keep, allowed in reversed(links):
        state, choice = np.divmod(keep[state], len(allowed))
        columns.append(allowed[choice])
    return np.stack(columns[::-1], axis=1)


def _limits(table: CostTable, lat_cap: float, mem_cap: float) -> tuple[float, float, float, float]:
    """Exact least latency (ms) and memory (bytes) of any selection, then of any within the other cap.

    For each possible activation peak, a Pareto staircase in (latency, weight) of the selections
    within that peak holds every answer.
    """
    least = [math.inf] * 4
    for cap in table._derived.peaks:
        lat = np.full(1, table.frame_latency_ms)
        weight = np.full(1, float(table.frame_weight_bytes))
        for _, la, wt, ac in table._derived.rows:
            allowed = ac <= cap
            lat = (lat[:, None] + la[allowed]).ravel()
            weight = (weight[:, None] + wt[allowed]).ravel()
            order = np.lexsort((weight, lat))
            order = order[_staircase(weight[order])]
            lat, weight = lat[order], weight[order]
        memory = weight + cap
        found = (
            lat[0],
            memory[-1],
            lat[memory <= mem_cap].min(initial=math.inf),
            memory[lat <= lat_cap].min(initial=math.inf),
        )
        least = [min(a, float(b)) for a, b in zip(least, found, strict=True)]
    return least[0], least[1], least[2], least[3]


def _fastest_memory(table: CostTable) -> float:
    """The memory (bytes) of a selection of least latency: the fastest descendant of each block,
    the smallest among equally fast ones."""
    choices = [
        int(np.lexsort((table.weight_bytes[b, :k], table.latency_ms[b, :k]))[0])
        for b, k in enumerate(table.sizes)
    ]
    return table.estimate(choices).memory_mb * _MIB


def _infeasible(
    budget: Budget,
    least_latency: float,
    least_memory: float,
    latency_within: float,
    memory_within: float,
    fastest_memory: float,
    *,
    subject: str = "selection",
    scope: str = "",
) -> InfeasibleBudgetError:
    """The error for a budget no selection meets: the least costs, and which budget to raise.

    ``latency_within`` is the least latency within the memory budget and ``memory_within`` the
    least memory within the latency budget; when neither is finite both budgets must rise, to the
    costs of one selection (the fastest, whose memory is ``fastest_memory``): the least latency
    and the least memory alone may belong to different selections.
    """
    asked = []
    if budget.latency_ms is not None:
        asked.append(f"latency <= {budget.latency_ms:g} ms")
    if budget.memory_mb is not None:
        asked.append(f"memory <= {budget.memory_mb:g} MB")
    options = []
    if math.isfinite(latency_within):
        options.append(f"latency_ms to at least {_ceil(latency_within)}")
    if math.isfinite(memory_within):
        options.append(f"memory_mb to at least {_ceil(memory_within / _MIB)}")
    hint = "raise " + (
        " or ".join(options)
        if options
        else f"both latency_ms to at least {_ceil(least_latency)} "
        f"and memory_mb to at least {_ceil(fastest_memory / _MIB)}"
    )
    return InfeasibleBudgetError(
        f"no {subject} meets {' and '.join(asked)}{scope}: the fastest selection takes "
        f"{least_latency:.4f} ms and the smallest needs {least_memory / _MIB:.4f} MB",
        min_latency_ms=least_latency,
        min_memory_mb=least_memory / _MIB,
        hint=hint,
    )


def _ceil(value: float) -> str:
    """``value`` rounded up to four decimals, so a budget raised to it suffices."""
    text = f"{math.ceil(value * 1e4) / 1e4:.4f}"
    while float(text) < value:
        text = f"{float(text) + 1e-4:.4f}"
    return text
