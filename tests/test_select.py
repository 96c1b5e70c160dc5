import dataclasses
import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockscale.select as select_module
from blockscale.errors import InfeasibleBudgetError, ProfileError
from blockscale.select import CostTable, Selector, frontier, solve
from blockscale.types import Budget, Profile

MIB = 2**20

# Costs mix free floats with a few repeated values, so ties (and all-equal banks) come up often.
drops = st.one_of(st.floats(-0.02, 0.5), st.sampled_from([0.0, 0.0, 0.01, 0.1, -0.01]))
latencies = st.one_of(st.floats(0.0, 4.0), st.sampled_from([0.0, 0.5, 1.0, 1.0]))
sizes = st.one_of(st.integers(0, 3 * MIB), st.sampled_from([0, MIB // 2, MIB, MIB]))


@st.composite
def tables(draw):
    blocks = draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    flat = draw(st.booleans())  # every descendant of every block costs the same

    def rows(values):
        if flat:
            value = draw(values)
            return [[value] * k for k in blocks]
        return [draw(st.lists(values, min_size=k, max_size=k)) for k in blocks]

    return CostTable.from_lists(
        rows(drops),
        rows(latencies),
        rows(sizes),
        rows(sizes),
        frame_latency_ms=draw(latencies),
        frame_weight_bytes=draw(sizes),
        frame_activation_bytes=draw(sizes),
        teacher_accuracy=draw(st.floats(0.5, 1.0)),
    )


# A budget as a fraction of the way from the least to the most each cost can be (None: no limit).
budgets = st.tuples(st.none() | st.floats(-0.1, 1.1), st.none() | st.floats(-0.1, 1.1))


def everything(table):
    """Every selection's estimate: the brute-force oracle."""
    return [table.estimate(c) for c in itertools.product(*(range(k) for k in table.sizes))]


def resolve(fractions, selections):
    """The Budget that ``fractions`` (see ``budgets``) stands for among these selections."""
    limits = []
    for fraction, cost in zip(fractions, ("latency_ms", "memory_mb"), strict=True):
        values = [getattr(s, cost) for s in selections]
        if fraction is None:
            limits.append(None)
        else:
            limits.append(max(1e-6, min(values) + fraction * (max(values) - min(values))))
    return Budget(*limits)


def within(selection, budget):
    return (budget.latency_ms is None or selection.latency_ms <= budget.latency_ms) and (
        budget.memory_mb is None or selection.memory_mb <= budget.memory_mb
    )


def best(selections, budget):
    """Most accurate within the budget; ties to lower latency, lower memory, smaller choices."""
    fits = [s for s in selections if within(s, budget)]
    return min(
        fits, key=lambda s: (-s.accuracy, s.latency_ms, s.memory_mb, s.choices), default=None
    )


def pareto(selections, memory_mb=None):
    """The accuracy-latency frontier by brute force, one selection (as solve would pick) per point."""
    fits = [s for s in selections if memory_mb is None or s.memory_mb <= memory_mb]
    out = []
    for s in sorted(fits, key=lambda s: (s.latency_ms, -s.accuracy, s.memory_mb, s.choices)):
        if not out or s.accuracy > out[-1].accuracy:
            out.append(s)
    return out


def check_answer(table, budget, found, expected):
    assert found == expected
    assert within(found, budget)
    assert found == table.estimate(found.choices)


def check_infeasible(error, selections):
    assert error.min_latency_ms == min(s.latency_ms for s in selections)
    assert error.min_memory_mb == min(s.memory_mb for s in selections)


@settings(max_examples=200, deadline=None)
@given(
    tables(),
    st.lists(budgets, min_size=1, max_size=3),
    st.sampled_from([0, 6, 1296]),
    st.sampled_from([0, 32]),
    st.sampled_from([-1, 0, 8, 10**6]),
)
def test_solve_and_selector_match_brute_force(table, queries, raw_states, crowd, few):
    selections = everything(table)
    selector = Selector(table)
    with pytest.MonkeyPatch.context() as patch:
        # bounds from the first block or later; priced bounds and dives always or when crowded;
        # the depth-first finish never, once a layer is empty, on few states, or from the start
        patch.setattr(select_module, "_RAW_STATES", raw_states)
        patch.setattr(select_module, "_CROWD", crowd)
        patch.setattr(select_module, "_FEW", few)
        table = dataclasses.replace(table)  # works out the table's start under these settings
        for budget in (resolve(q, selections) for q in queries):
            expected = best(selections, budget)
            for pick in (solve, lambda t, b: selector.select(b)):
                if expected is None:
                    with pytest.raises(InfeasibleBudgetError) as caught:
                        pick(table, budget)
                    check_infeasible(caught.value, selections)
                else:
                    found = pick(table, budget)
                    assert math.isclose(found.accuracy, expected.accuracy, abs_tol=1e-12)
                    check_answer(table, budget, found, expected)


@settings(max_examples=200, deadline=None)
@given(tables(), st.none() | st.floats(-0.1, 1.1))
def test_frontier_matches_brute_force(table, fraction):
    selections = everything(table)
    selector = Selector(table)
    memory_mb = resolve((None, fraction), selections).memory_mb
    for limit in {None, memory_mb}:
        points = frontier(table, limit)
        assert points == pareto(selections, limit)
        assert selector.frontier(limit) == points
        for point in points:
            if point.latency_ms > 0:  # a budget must be positive
                assert solve(table, Budget(point.latency_ms, limit)) == point


@settings(max_examples=200, deadline=None)
@given(tables(), st.tuples(st.none() | st.floats(-0.2, 0.5), st.none() | st.floats(-0.2, 0.5)))
def test_infeasible_budget_hint_names_enough(table, fractions):
    selections = everything(table)
    budget = resolve(fractions, selections)
    if best(selections, budget) is not None:
        return
    for pick in (solve, lambda t, b: Selector(t).select(b)):
        with pytest.raises(InfeasibleBudgetError) as caught:
            pick(table, budget)
        hint = caught.value.hint
        raise_latency = re.search(r"latency_ms to at least ([\d.]+)", hint)
        raise_memory = re.search(r"memory_mb to at least ([\d.]+)", hint)
        fast_enough = any(within(s, Budget(memory_mb=budget.memory_mb)) for s in selections)
        small_enough = any(within(s, Budget(latency_ms=budget.latency_ms)) for s in selections)
        if fast_enough or small_enough:
            assert bool(raise_latency) == fast_enough
            assert bool(raise_memory) == small_enough
        else:
            assert "both" in hint and raise_latency and raise_memory
            raised = Budget(float(raise_latency.group(1)), float(raise_memory.group(1)))
            assert best(selections, raised) is not None  # raising both as told lets one in
        if raise_latency and fast_enough:
            solve(table, Budget(float(raise_latency.group(1)), budget.memory_mb))
        if raise_memory and small_enough:
            solve(table, Budget(budget.latency_ms, float(raise_memory.group(1))))


@settings(max_examples=200, deadline=None)
@given(tables(), budgets, st.booleans())
def test_dives_and_priced_fronts_find_feasible_selections(table, fractions, priced):
    # the incumbent heuristics that large banks lean on, each checked on its own
    selections = everything(table)
    budget = resolve(fractions, selections)
    lat_cap, mem_cap = table._caps(budget)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(select_module, "_RAW_STATES", 0)
        table = dataclasses.replace(table)
    search = select_module._Search(table, lat_cap, mem_cap)
    if priced:
        search._price_from(0)
    root = table._derived.head
    search._dive(root[0], 0)
    found = [
        (table.teacher_accuracy - s.accuracy, s.latency_ms) for s in selections if within(s, budget)
    ]
    if search.best[0] < select_module._UNKNOWN:
        assert search.best in found
    if priced and search.priced is not None and found:
        assert search._bound(root, 0)[0] <= min(found)[0]


def realistic(seed):
    """A 9-block, 6-descendant bank shaped like a pruned CIFAR ResNet."""
    rng = np.random.default_rng(seed)
    sparsity = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.9])
    width = np.repeat([16, 32, 64], 3)[:, None]
    side = np.repeat([32, 16, 8], 3)[:, None]
    kept = 1 - sparsity
    return CostTable(
        drop=rng.uniform(0.005, 0.06, (9, 1)) * sparsity**1.5 * rng.uniform(0.7, 1.3, (9, 6)),
        latency_ms=0.02 + 18 * width**2 * side**2 / 1e9 * kept * rng.uniform(0.8, 1.2, (9, 6)),
        weight_bytes=np.round(72 * width**2 * kept + 64 * width),
        activation_bytes=np.round(4 * width * side**2 * (2 + kept)),
        sizes=(6,) * 9,
        frame_latency_ms=0.05,
        frame_weight_bytes=4 * (3 * 9 * 16 + 64 * 10),
        frame_activation_bytes=4 * 19 * 32 * 32,
        teacher_accuracy=0.92,
    )


@pytest.mark.parametrize("seed", range(3))
def test_solve_agrees_with_selector_on_realistic_banks(seed):
    table = realistic(seed)
    selector = Selector(table)
    points = selector.frontier()
    assert [p.latency_ms for p in points] == sorted({p.latency_ms for p in points})
    assert [p.accuracy for p in points] == sorted({p.accuracy for p in points})
    rng = np.random.default_rng(seed)
    lowest = selector.select(Budget()).latency_ms
    for _ in range(30):
        budget = Budget(float(rng.uniform(0.3, 1.0)) * lowest, float(rng.uniform(0.1, 0.6)))
        try:
            expected = selector.select(budget)
        except InfeasibleBudgetError as error:
            with pytest.raises(InfeasibleBudgetError) as caught:
                solve(table, budget)
            assert str(caught.value) == str(error)
        else:
            assert solve(table, budget) == expected


def test_unconstrained_picks_most_accurate_then_fastest():
    table = CostTable.from_lists(
        drop=[[0.0, 0.0, 0.1], [0.02, 0.0]],
        latency_ms=[[3.0, 2.0, 1.0], [1.0, 1.0]],
        weight_bytes=[[4, 4, 1], [2, 1]],
        activation_bytes=[[1, 1, 1], [1, 1]],
        teacher_accuracy=0.9,
    )
    assert solve(table, Budget()).choices == (1, 1)
    assert solve(table, Budget(latency_ms=2.5)).choices == (2, 1)


@pytest.mark.parametrize("few", [-1, 32, 10**6])
def test_ties_on_a_bank_too_large_to_enumerate(few):
    # 6**12 selections: every drop ties, so latency decides, then the first choices; both the
    # numpy layers and the depth-first finish must cut the ties short to answer at all
    latency = np.random.default_rng(0).choice([1.0, 2.0, 3.0], (12, 6))
    equal = np.full((12, 6), MIB)
    table = CostTable(np.zeros((12, 6)), latency, equal, equal, sizes=(6,) * 12)
    flat = CostTable(np.zeros((12, 6)), np.ones((12, 6)), equal, equal, sizes=(6,) * 12)
    fastest = tuple(int(np.flatnonzero(row == row.min())[0]) for row in latency)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(select_module, "_FEW", few)
        assert solve(table, Budget()).choices == fastest
        assert solve(table, Budget(latency.min(axis=1).sum(), 13.0)).choices == fastest
        assert solve(flat, Budget(12.0, 13.0)).choices == (0,) * 12
        with pytest.raises(InfeasibleBudgetError):
            solve(table, Budget(latency.min(axis=1).sum() - 0.5))


def test_activation_memory_is_a_peak_not_a_sum():
    table = CostTable.from_lists(
        drop=[[0.0], [0.0]],
        latency_ms=[[1.0], [1.0]],
        weight_bytes=[[MIB], [MIB]],
        activation_bytes=[[3 * MIB], [MIB]],
        frame_weight_bytes=MIB,
        frame_activation_bytes=2 * MIB,
    )
    assert table.estimate((0, 0)).memory_mb == 6.0
    assert solve(table, Budget(memory_mb=6.0)).choices == (0, 0)
    with pytest.raises(InfeasibleBudgetError, match=r"smallest needs 6\.0000 MB") as caught:
        solve(table, Budget(latency_ms=1.0, memory_mb=5.5))
    assert caught.value.min_latency_ms == 2.0
    assert caught.value.min_memory_mb == 6.0
    assert "raise both" in caught.value.hint


def test_budget_too_tight_together_names_both_ways_out():
    table = CostTable.from_lists(
        drop=[[0.0, 0.0]],
        latency_ms=[[1.0, 3.0]],
        weight_bytes=[[2 * MIB, MIB]],
        activation_bytes=[[0, 0]],
    )
    with pytest.raises(InfeasibleBudgetError) as caught:
        solve(table, Budget(latency_ms=2.0, memory_mb=1.5))
    assert caught.value.min_latency_ms == 1.0
    assert caught.value.min_memory_mb == 1.0
    assert (
        caught.value.hint == "raise latency_ms to at least 3.0000 or memory_mb to at least 2.0000"
    )


def test_costs_land_on_exact_grids():
    table = CostTable.from_lists([[0.1, 0.2]], [[0.3, 0.7]], [[1.4, 2.6]], [[0, 0]])
    assert table.drop[0, 0] * 2**32 == round(0.1 * 2**32)
    assert table.weight_bytes[0].tolist() == [1.0, 3.0]
    assert not table.drop.flags.writeable


def profiles_for(latency):
    frame = Profile(-1, 0, 0.0, 10, 100, 400, 800, {"cpu": 0.5, **latency})
    blocks = [
        [
            Profile(b, d, 0.01 * d, 5, 50, 200 - 50 * d, 300, {"cpu": 1.0 - 0.2 * d})
            for d in range(3)
        ]
        for b in range(2)
    ]
    return blocks, frame


def test_from_profiles_reads_the_target():
    blocks, frame = profiles_for({})
    table = CostTable.from_profiles(blocks, frame, teacher_accuracy=0.9, target="cpu")
    estimate = table.estimate((2, 1))
    assert estimate.latency_ms == pytest.approx(0.5 + 0.6 + 0.8)
    assert estimate.accuracy == pytest.approx(0.9 - 0.03)
    assert estimate.memory_mb == (400 + 100 + 150 + 800) / MIB


def test_missing_target_names_it_and_the_targets_available():
    blocks, frame = profiles_for({"onnx": 0.2})
    with pytest.raises(ProfileError, match=r"'onnx' for block 0 descendant 0;.*: cpu\n"):
        CostTable.from_profiles(blocks, frame, teacher_accuracy=0.9, target="onnx")


def test_from_profiles_wants_them_in_order():
    blocks, frame = profiles_for({})
    blocks[0].reverse()
    with pytest.raises(ValueError, match="ordered by block"):
        CostTable.from_profiles(blocks, frame, teacher_accuracy=0.9, target="cpu")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (([[0.0]], [[math.nan]], [[0]], [[0]]), "not finite"),
        (([[0.0]], [[-1.0]], [[0]], [[0]]), "negative"),
        (([[0.0, 0.1]], [[1.0]], [[0]], [[0]]), "as many"),
        (([], [], [], []), "a descendant each"),
        (([[1e7]], [[1.0]], [[0]], [[0]]), "too large"),
    ],
)
def test_bad_tables_are_refused(columns, message):
    with pytest.raises(ValueError, match=message):
        CostTable.from_lists(*columns)


def test_estimate_refuses_bad_choices():
    table = CostTable.from_lists([[0.0, 0.1]], [[1.0, 0.5]], [[2, 1]], [[1, 1]])
    with pytest.raises(ValueError, match="one of"):
        table.estimate((2,))
    with pytest.raises(ValueError, match="one of"):
        table.estimate((0, 0))
