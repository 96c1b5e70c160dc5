import dataclasses
import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockscale.multi as multi
from blockscale.errors import (
    ConfigError,
    InfeasibleBudgetError,
    InfeasibleMemberError,
)
from blockscale.multi import (
    JointSelector,
    Member,
    SwitchCost,
    select_joint,
    select_switching,
    switch_penalties,
)
from blockscale.select import CostTable, Selector, solve
from blockscale.types import Budget

MIB = 2**20
TOL = 1e-9  # objective comparisons: costs round to 2**-32 grids, weighted sums to ~1e-16

drops = st.one_of(st.floats(-0.02, 0.4), st.sampled_from([0.0, 0.0, 0.01, 0.1]))
latencies = st.one_of(st.floats(0.0, 4.0), st.sampled_from([0.0, 0.5, 1.0, 1.0]))
sizes = st.one_of(st.integers(0, 3 * MIB), st.sampled_from([0, MIB // 2, MIB, MIB]))
# a budget as a fraction of the way from the least to the most each cost can be (None: no limit)
fractions = st.tuples(st.none() | st.floats(-0.1, 1.1), st.none() | st.floats(-0.1, 1.1))


@st.composite
def tables(draw, max_blocks=4):
    blocks = draw(st.lists(st.integers(1, 3), min_size=1, max_size=max_blocks))

    def rows(values):
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


def everything(table):
    return [table.estimate(c) for c in itertools.product(*(range(k) for k in table.sizes))]


def limit(fraction, values):
    if fraction is None:
        return None
    return max(1e-6, min(values) + fraction * (max(values) - min(values)))


def within(selection, budget):
    return (budget.latency_ms is None or selection.latency_ms <= budget.latency_ms) and (
        budget.memory_mb is None or selection.memory_mb <= budget.memory_mb
    )


# ---------------------------------------------------------------------------------------------
# switching


def charge(current, cost, loads, choices):
    """The brute-force switching charge of ``choices`` (in accuracy)."""
    return sum(
        cost.per_block + cost.per_mb * loads[b][c] / MIB
        for b, c in enumerate(choices)
        if c != current[b]
    )


@settings(max_examples=150, deadline=None)
@given(
    tables(),
    fractions,
    st.data(),
    st.sampled_from([0.0, 0.0, 0.002, 0.05]),
    st.sampled_from([0.0, 0.0, 0.001, 0.03]),
    st.sampled_from([0.0, 0.0, 0.004, 0.05]),
    st.booleans(),
    st.sampled_from(["search", "milp"]),
)
def test_switching_matches_brute_force(
    table, shares, data, per_block, per_mb, hysteresis, own_bytes, method
):
    selections = everything(table)
    current = data.draw(st.sampled_from(selections)).choices
    cost = SwitchCost(per_block, per_mb, hysteresis)
    loads = [
        [int(w) for w in row[:k]] for row, k in zip(table.weight_bytes, table.sizes, strict=True)
    ]
    bytes_table = None
    if own_bytes:
        bytes_table = [data.draw(st.lists(sizes, min_size=k, max_size=k)) for k in table.sizes]
        loads = bytes_table
    budget = Budget(
        limit(shares[0], [s.latency_ms for s in selections]),
        limit(shares[1], [s.memory_mb for s in selections]),
    )
    fits = [s for s in selections if within(s, budget)]
    if not fits:
        with pytest.raises(InfeasibleBudgetError) as caught:
            select_switching(table, budget, current, cost, bytes_table, method=method)
        with pytest.raises(InfeasibleBudgetError) as plain:
            solve(table, budget)
        assert str(caught.value) == str(plain.value)
        return
    found = select_switching(table, budget, current, cost, bytes_table, method=method)
    assert found == table.estimate(found.choices)
    assert within(found, budget)

    def score(s):
        return s.accuracy - charge(current, cost, loads, s.choices)

    best = max(score(s) for s in fits)
    stay = table.estimate(current)
    if within(stay, budget):
        gain = best - stay.accuracy
        if gain < hysteresis - TOL:
            assert found == stay
            return
        if gain > hysteresis + TOL:
            assert found != stay
        else:  # on the threshold (up to the grids' rounding) either answer is right
            assert found == stay or math.isclose(score(found), best, abs_tol=TOL)
            return
    assert math.isclose(score(found), best, abs_tol=TOL)


@settings(max_examples=100, deadline=None)
@given(tables(), fractions, st.data())
def test_switching_without_costs_reaches_solve(table, shares, data):
    selections = everything(table)
    current = data.draw(st.sampled_from(selections)).choices
    budget = Budget(
        limit(shares[0], [s.latency_ms for s in selections]),
        limit(shares[1], [s.memory_mb for s in selections]),
    )
    try:
        expected = solve(table, budget)
    except InfeasibleBudgetError:
        with pytest.raises(InfeasibleBudgetError):
            select_switching(table, budget, current, SwitchCost())
        return
    assert select_switching(table, budget, None) == expected
    found = select_switching(table, budget, current, SwitchCost())
    assert found.accuracy == expected.accuracy
    # on a tie with the live selection it stays put
    stay = table.estimate(current)
    if within(stay, budget) and stay.accuracy == expected.accuracy:
        assert found == stay


def bank():
    """Two blocks; descendant 1 of each is lighter, faster and a little less accurate."""
    return CostTable.from_lists(
        drop=[[0.0, 0.004, 0.03], [0.0, 0.006, 0.05]],
        latency_ms=[[2.0, 1.0, 0.5], [2.0, 1.0, 0.5]],
        weight_bytes=[[4 * MIB, 2 * MIB, MIB], [4 * MIB, 2 * MIB, MIB]],
        activation_bytes=[[MIB, MIB, MIB], [MIB, MIB, MIB]],
        teacher_accuracy=0.875,
    )


@pytest.mark.parametrize("method", ["search", "milp"])
def test_hysteresis_keeps_the_live_selection_for_small_gains(method):
    table = bank()
    wide = Budget(latency_ms=10.0)
    # from (1, 1), moving to (0, 0) gains 0.01 accuracy
    assert select_switching(table, wide, (1, 1), SwitchCost(), method=method).choices == (0, 0)
    keep = SwitchCost(hysteresis=0.0101)
    assert select_switching(table, wide, (1, 1), keep, method=method).choices == (1, 1)
    move = SwitchCost(hysteresis=0.0099)
    assert select_switching(table, wide, (1, 1), move, method=method).choices == (0, 0)
    # a charge per changed block: only the block that gains more than its charge moves
    per_block = SwitchCost(per_block=0.005)
    assert select_switching(table, wide, (1, 1), per_block, method=method).choices == (1, 0)
    # a price per MiB loaded: loading 4 MiB for 0.006 is too dear at 0.002 per MiB
    per_mb = SwitchCost(per_mb=0.002)
    assert select_switching(table, wide, (1, 1), per_mb, method=method).choices == (1, 1)
    cheap = [[MIB / 4] * 3, [MIB / 4] * 3]
    assert select_switching(table, wide, (1, 1), per_mb, cheap, method=method).choices == (0, 0)


@pytest.mark.parametrize("method", ["search", "milp"])
def test_an_infeasible_live_selection_moves_whatever_the_hysteresis(method):
    table = bank()
    tight = Budget(latency_ms=2.5)  # (0, 0) takes 4 ms
    dear = SwitchCost(per_block=1.0, hysteresis=1.0)
    # changing one block is charged least: of (0, 2) and (2, 0), the more accurate
    assert select_switching(table, tight, (0, 0), dear, method=method).choices == (2, 0)
    assert select_switching(table, tight, (0, 0), SwitchCost(), method=method).choices == (1, 1)


def test_switch_penalties_charge_changed_blocks_only():
    table = bank()
    charges = switch_penalties(table, (0, 2), SwitchCost(per_block=0.01, per_mb=0.001))
    assert charges.shape == table.drop.shape
    assert charges[0].tolist() == pytest.approx([0.0, 0.01 + 0.002, 0.01 + 0.001])
    assert charges[1].tolist() == pytest.approx([0.01 + 0.004, 0.01 + 0.002, 0.0])


def test_switching_refuses_bad_inputs():
    table = bank()
    with pytest.raises(ConfigError, match="per_block"):
        SwitchCost(per_block=-0.1)
    with pytest.raises(ConfigError, match="hysteresis"):
        SwitchCost(hysteresis=math.nan)
    with pytest.raises(ValueError, match="one of"):
        select_switching(table, Budget(), (0, 3), SwitchCost())
    with pytest.raises(ValueError, match="bytes_table"):
        select_switching(table, Budget(), (0, 0), SwitchCost(), [[1, 2], [1, 2]])
    with pytest.raises(ConfigError, match="method"):
        select_switching(table, Budget(), (0, 0), SwitchCost(), method="greedy")


# ---------------------------------------------------------------------------------------------
# joint selection


@st.composite
def members(draw):
    out = []
    count = draw(st.sampled_from([1, 2, 3, 3]))
    for table in draw(st.lists(tables(max_blocks=3), min_size=count, max_size=count)):
        selections = everything(table)
        accuracies = [s.accuracy for s in selections]
        latencies_ = [s.latency_ms for s in selections]
        min_accuracy = draw(st.none() | st.floats(-0.1, 1.1))
        max_latency = draw(st.none() | st.floats(-0.1, 1.1))
        out.append(
            Member(
                table,
                priority=draw(st.sampled_from([1.0, 1.0, 2.0, 0.5, 0.3, 0.0])),
                min_accuracy=None
                if min_accuracy is None
                else min(accuracies) + min_accuracy * (max(accuracies) - min(accuracies)),
                max_latency_ms=limit(max_latency, latencies_),
            )
        )
    return out


def allowed(member):
    """A member's selections that meet its own limits."""
    return [
        s
        for s in everything(member.table)
        if (member.min_accuracy is None or s.accuracy >= member.min_accuracy)
        and (member.max_latency_ms is None or s.latency_ms <= member.max_latency_ms)
    ]


def joint_brute_force(group, budget):
    """The best objective over every combination (None if none fits), by numpy broadcasting."""
    options = [allowed(m) for m in group]
    grids = np.meshgrid(*[np.arange(len(o)) for o in options], indexing="ij")
    value = sum(
        m.priority * np.array([s.accuracy for s in o])[g]
        for m, o, g in zip(group, options, grids, strict=True)
    )
    lat = sum(np.array([s.latency_ms for s in o])[g] for o, g in zip(options, grids, strict=True))
    mem = sum(np.array([s.memory_mb for s in o])[g] for o, g in zip(options, grids, strict=True))
    fits = np.ones(value.shape, dtype=bool)
    if budget.latency_ms is not None:
        fits &= lat <= budget.latency_ms
    if budget.memory_mb is not None:
        fits &= mem <= budget.memory_mb
    return float(value[fits].max()) if fits.any() else None


def objective(group, found):
    return sum(m.priority * s.accuracy for m, s in zip(group, found, strict=True))


def check_joint(group, budget, found):
    assert len(found) == len(group)
    for m, s in zip(group, found, strict=True):
        assert s == m.table.estimate(s.choices)
        assert m.min_accuracy is None or s.accuracy >= m.min_accuracy
        assert m.max_latency_ms is None or s.latency_ms <= m.max_latency_ms
    assert budget.latency_ms is None or sum(s.latency_ms for s in found) <= budget.latency_ms
    assert budget.memory_mb is None or sum(s.memory_mb for s in found) <= budget.memory_mb


def joint_budget(group, shares):
    """A shared budget between the least and the most the members' allowed selections need."""
    options = [allowed(m) for m in group]
    least = [
        sum(min(getattr(s, c) for s in o) for o in options) for c in ("latency_ms", "memory_mb")
    ]
    most = [
        sum(max(getattr(s, c) for s in o) for o in options) for c in ("latency_ms", "memory_mb")
    ]
    return Budget(*(limit(f, [a, b]) for f, a, b in zip(shares, least, most, strict=True)))


@settings(max_examples=200, deadline=None)
@given(
    members(),
    fractions,
    st.sampled_from([1, 8, 10**6]),
    st.sampled_from([1, 1 << 17]),
    st.sampled_from([0, 25, 25]),
)
def test_joint_search_matches_brute_force(group, shares, width, chunk, rounds):
    with pytest.MonkeyPatch.context() as patch:
        # one point per group per pass or all at once; prefixes one by one or together; LP
        # multipliers or none at all (the search must stay exact whatever bounds it gets)
        patch.setattr(multi, "_WIDTH", width)
        patch.setattr(multi, "_CHUNK", chunk)
        patch.setattr(multi, "_PRICING_ROUNDS", rounds)
        check_joint_against_brute_force(group, shares, "search")


@settings(max_examples=40, deadline=None)
@given(members(), fractions)
def test_joint_milp_matches_brute_force(group, shares):
    check_joint_against_brute_force(group, shares, "milp")


def check_joint_against_brute_force(group, shares, method):
    empty = [i for i, m in enumerate(group) if not allowed(m)]
    if empty:
        with pytest.raises(InfeasibleMemberError) as caught:
            select_joint(group, Budget(), method=method)
        assert caught.value.member == empty[0]
        return
    budget = joint_budget(group, shares)
    expected = joint_brute_force(group, budget)
    if expected is None:
        with pytest.raises(InfeasibleBudgetError) as caught:
            select_joint(group, budget, method=method)
        assert not isinstance(caught.value, InfeasibleMemberError)
        options = [allowed(m) for m in group]
        assert caught.value.min_latency_ms == sum(min(s.latency_ms for s in o) for o in options)
        assert caught.value.min_memory_mb == sum(min(s.memory_mb for s in o) for o in options)
        check_hint(group, budget, caught.value.hint)
        return
    found = select_joint(group, budget, method=method)
    check_joint(group, budget, found)
    assert math.isclose(objective(group, found), expected, abs_tol=TOL)


def check_hint(group, budget, hint):
    """Raising a budget as the hint says makes it feasible."""
    raise_latency = re.search(r"latency_ms to at least ([\d.]+)", hint)
    raise_memory = re.search(r"memory_mb to at least ([\d.]+)", hint)
    assert raise_latency or raise_memory
    if "both" in hint:
        raised = Budget(float(raise_latency.group(1)), float(raise_memory.group(1)))
        assert joint_brute_force(group, raised) is not None
        return
    if raise_latency:
        raised = Budget(float(raise_latency.group(1)), budget.memory_mb)
        assert joint_brute_force(group, raised) is not None
    if raise_memory:
        raised = Budget(budget.latency_ms, float(raise_memory.group(1)))
        assert joint_brute_force(group, raised) is not None


@settings(max_examples=100, deadline=None)
@given(tables(), fractions)
def test_one_member_gets_solves_answer(table, shares):
    selections = everything(table)
    budget = Budget(
        limit(shares[0], [s.latency_ms for s in selections]),
        limit(shares[1], [s.memory_mb for s in selections]),
    )
    try:
        expected = solve(table, budget)
    except InfeasibleBudgetError as error:
        with pytest.raises(InfeasibleBudgetError) as caught:
            select_joint([Member(table)], budget)
        assert caught.value.min_latency_ms == error.min_latency_ms
        assert caught.value.min_memory_mb == error.min_memory_mb
        return
    # the same selection: ties go to lower latency, then memory, then smaller choices, as in solve
    # (Pareto points are ordered by their choices)
    (found,) = select_joint([Member(table)], budget)
    assert (found.accuracy, found.latency_ms, found.memory_mb) == (
        expected.accuracy,
        expected.latency_ms,
        expected.memory_mb,
    )


def realistic(seed):
    """A 9-block, 6-descendant bank shaped like a pruned CIFAR ResNet (as in test_select)."""
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


def test_joint_search_agrees_with_milp_on_realistic_banks(capfd):
    group = [
        Member(realistic(0), priority=2.0),
        Member(realistic(1), min_accuracy=0.9),
        Member(realistic(2), max_latency_ms=0.3),
    ]
    selector = JointSelector(group)
    points = selector._points  # each member's Pareto points within its own limits
    least = [sum(float(getattr(p, c).min()) for p in points) for c in ("latency", "memory")]
    most = [sum(float(getattr(p, c).max()) for p in points) for c in ("latency", "memory")]
    rng = np.random.default_rng(0)
    for _ in range(3):
        share = rng.uniform(0.2, 0.7, 2).tolist()
        budget = Budget(
            least[0] + share[0] * (most[0] - least[0]),
            (least[1] + share[1] * (most[1] - least[1])) / MIB,
        )
        capfd.readouterr()
        try:
            found = selector.select(budget)
        except InfeasibleBudgetError:
            with pytest.raises(InfeasibleBudgetError):
                select_joint(group, budget, method="milp")
            continue
        assert capfd.readouterr().out == ""  # the search prints nothing (HiGHS's MIP may)
        check_joint(group, budget, found)
        reference = select_joint(group, budget, method="milp")
        check_joint(group, budget, reference)
        assert math.isclose(objective(group, found), objective(group, reference), abs_tol=TOL)


def test_one_realistic_member_matches_selector():
    table = realistic(3)
    selector, joint = Selector(table), JointSelector([Member(table)])
    rng = np.random.default_rng(1)
    lowest = selector.select(Budget()).latency_ms
    for _ in range(30):
        budget = Budget(float(rng.uniform(0.3, 1.0)) * lowest, float(rng.uniform(0.1, 0.6)))
        try:
            expected = selector.select(budget)
        except InfeasibleBudgetError:
            with pytest.raises(InfeasibleBudgetError):
                joint.select(budget)
            continue
        assert joint.select(budget) == [expected]


def test_priorities_decide_who_gets_the_budget():
    table = CostTable.from_lists(
        drop=[[0.0, 0.1]], latency_ms=[[2.0, 1.0]], weight_bytes=[[0, 0]], activation_bytes=[[0, 0]]
    )
    budget = Budget(latency_ms=3.0)  # only one of the two models can run its full-size block
    first, second = select_joint([Member(table, 2.0), Member(table)], budget)
    assert (first.choices, second.choices) == ((0,), (1,))
    first, second = select_joint([Member(table), Member(table, priority=2.0)], budget)
    assert (first.choices, second.choices) == ((1,), (0,))
    # a minimum accuracy overrides the priorities
    first, second = select_joint([Member(table, 2.0), Member(table, min_accuracy=1.0)], budget)
    assert (first.choices, second.choices) == ((1,), (0,))


def test_joint_memory_adds_every_models_weights_and_peak():
    table = CostTable.from_lists(
        drop=[[0.0]],
        latency_ms=[[1.0]],
        weight_bytes=[[MIB]],
        activation_bytes=[[2 * MIB]],
        frame_activation_bytes=MIB,
    )
    found = select_joint([Member(table), Member(table)], Budget(memory_mb=6.0))
    assert [s.memory_mb for s in found] == [3.0, 3.0]
    with pytest.raises(InfeasibleBudgetError, match=r"smallest needs 6\.0000 MB") as caught:
        select_joint([Member(table), Member(table)], Budget(memory_mb=5.9))
    assert caught.value.hint == "raise memory_mb to at least 6.0000"


def test_member_limits_that_no_selection_meets_are_named():
    table = bank()  # accuracy 0.795 to 0.875, latency 1.0 to 4.0 ms
    with pytest.raises(
        InfeasibleMemberError, match=r"member 1 \('det'\): .*min_accuracy 0\.9;"
    ) as c:
        JointSelector([Member(table), Member(table, min_accuracy=0.9, name="det")])
    assert c.value.member == 1
    assert c.value.min_latency_ms is None
    assert c.value.hint == "lower min_accuracy to at most 0.875000"
    with pytest.raises(InfeasibleMemberError, match=r"max_latency_ms 0\.5") as c:
        select_joint([Member(table, max_latency_ms=0.5)], Budget())
    assert c.value.hint == "raise max_latency_ms to at least 1.0000"
    with pytest.raises(InfeasibleMemberError) as c:
        select_joint([Member(table, min_accuracy=0.875, max_latency_ms=3.0)], Budget())
    assert c.value.min_latency_ms == 4.0
    assert re.fullmatch(
        r"lower min_accuracy to at most 0\.87\d+ or raise max_latency_ms to at least 4\.0000",
        c.value.hint,
    )


def test_members_are_validated():
    table = bank()
    with pytest.raises(ConfigError, match="priority"):
        Member(table, priority=-1.0)
    with pytest.raises(ConfigError, match="max_latency_ms"):
        Member(table, max_latency_ms=0.0)
    with pytest.raises(ConfigError, match="CostTable"):
        Member("bank")
    with pytest.raises(ConfigError, match="at least one"):
        select_joint([], Budget())
    with pytest.raises(ConfigError, match="method"):
        select_joint([Member(table)], Budget(), method="greedy")


def squash(summed):
    """A non-linear, decreasing map from summed costs to accuracy, like a log-odds bank's."""
    return 1.0 / (1.0 + np.exp(8.0 * np.asarray(summed, dtype=float) - 2.2))


@settings(max_examples=150, deadline=None)
@given(members(), fractions)
def test_joint_search_on_mapped_accuracies_matches_brute_force(group, shares):
    # the same limits as the unmapped group: a threshold maps through the decreasing map
    mapped = [
        dataclasses.replace(
            m,
            accuracy_of=squash,
            min_accuracy=None
            if m.min_accuracy is None
            else float(squash(m.table.teacher_accuracy - m.min_accuracy)),
        )
        for m in group
    ]
    if any(not allowed(m) for m in group):
        with pytest.raises(InfeasibleMemberError):
            select_joint(mapped, Budget())
        return
    budget = joint_budget(group, shares)
    options = [allowed(m) for m in group]

    def value(m, s):
        return m.priority * float(squash(m.table.teacher_accuracy - s.accuracy))

    fits = [combo for combo in itertools.product(*options) if within_all(combo, budget)]
    if not fits:
        with pytest.raises(InfeasibleBudgetError):
            select_joint(mapped, budget)
        return
    expected = max(sum(value(m, s) for m, s in zip(group, c, strict=True)) for c in fits)
    found = select_joint(mapped, budget)
    check_joint(group, budget, found)
    assert math.isclose(
        sum(value(m, s) for m, s in zip(group, found, strict=True)), expected, abs_tol=TOL
    )


def within_all(combo, budget):
    return (
        budget.latency_ms is None or sum(s.latency_ms for s in combo) <= budget.latency_ms
    ) and (budget.memory_mb is None or sum(s.memory_mb for s in combo) <= budget.memory_mb)


def test_milp_refuses_mapped_accuracies_and_bad_maps_are_named():
    table = bank()
    with pytest.raises(ConfigError, match="accuracy_of") as caught:
        select_joint([Member(table, accuracy_of=squash)], Budget(), method="milp")
    assert "search" in caught.value.hint
    with pytest.raises(ConfigError, match="finite accuracies"):
        select_joint([Member(table, accuracy_of=lambda s: np.zeros(1))], Budget())
