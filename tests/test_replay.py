import itertools
import json

import pytest
import torch
from nets import tiny_resnet

from blockscale.bank import Bank
from blockscale.derive import derive
from blockscale.errors import TraceError
from blockscale.extract import extract
from blockscale.multi import SwitchCost
from blockscale.profile import BankProfile
from blockscale.replay import (
    JointReplayResult,
    ReplayResult,
    budget_range,
    plot_replay,
    replay,
    replay_joint,
)
from blockscale.runtime import ModelSlot, RuntimeConfig
from blockscale.targets import Target
from blockscale.traces import Trace, TraceStep
from blockscale.types import Budget, DeriveConfig, Profile

SPARSITIES = (0.0, 0.5, 0.75)
SHAPE = (1, 8, 8)
TARGETS = ("torch-1t", "ort-1t")
# Made-up profiles: the frame takes 1 ms, each block 3, 2 or 1 ms by descendant; block 0 loses less
# accuracy than block 1; weights shrink with sparsity, so memory budgets bite too.
DROPS = ((0.0, 0.02, 0.06), (0.0, 0.03, 0.08))
LATENCY = (3.0, 2.0, 1.0)
WEIGHTS = (4000, 2000, 1000)
MIB = 2**20
# latency budgets, then a memory-bound one, an infeasible one (kept model) and a return to the top
BUDGETS = (
    Budget(latency_ms=7.0),
    Budget(latency_ms=6.0),
    Budget(latency_ms=5.0),
    Budget(latency_ms=5.5),
    Budget(latency_ms=2.0),
    Budget(latency_ms=4.0),
    Budget(memory_mb=(400 + 4000 + 1000 + 256) / MIB),
    Budget(latency_ms=3.0, memory_mb=(400 + 4000 + 1000 + 256) / MIB),
    Budget(latency_ms=3.0),
    Budget(),
)


def _profiles() -> BankProfile:
    def entry(block: int, index: int, drop: float, ms: float, weights: int) -> Profile:
        return Profile(block, index, drop, 100, 1000, weights, 256, dict.fromkeys(TARGETS, ms))

    return BankProfile(
        teacher_accuracy=0.9,
        frame=entry(-1, 0, 0.0, 1.0, 400),
        descendants=[
            [entry(b, d, DROPS[b][d], LATENCY[d], WEIGHTS[d]) for d in range(len(SPARSITIES))]
            for b in range(2)
        ],
        targets={name: Target.parse(name).to_dict() for name in TARGETS},
    )


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    d = extract(tiny_resnet(), torch.zeros(1, *SHAPE))
    families = derive(d, DeriveConfig(sparsities=SPARSITIES))
    path = tmp_path_factory.mktemp("replay") / "cam"
    return Bank.write(path, d, families, extra={"profiles": _profiles().to_dict()})


@pytest.fixture(scope="module")
def result(bank):
    trace = Trace(tuple(TraceStep(0.5 * i, b) for i, b in enumerate(BUDGETS)))
    return replay(bank, trace, "torch-1t")


def _loads(bank, choices, blocks):
    """Bytes a switch to ``choices`` reads for ``blocks`` (the teacher's blocks are resident)."""
    return sum(bank.file_bytes(b, choices[b]) for b in blocks if choices[b] != 0)


def test_blockscale_follows_select_and_loads_only_changed_blocks(bank, result):
    live = (0, 0)  # both methods start at the teacher
    assert [s.budget for s in result.steps] == list(BUDGETS)
    assert [s.time_s for s in result.steps] == [0.5 * i for i in range(len(BUDGETS))]
    for step in result.steps:
        response = step.blockscale
        if step.budget == Budget(latency_ms=2.0):
            assert not response.feasible
            assert response.selection.choices == live and response.changed == ()
        else:
            assert response.feasible
            assert response.selection == bank.select(step.budget, "torch-1t")
        choices = response.selection.choices
        changed = tuple(b for b in range(2) if choices[b] != live[b])
        assert response.changed == changed
        assert response.bytes_loaded == _loads(bank, choices, changed)
        assert response.seconds > 0
        live = choices
    assert [s.blockscale.selection.choices for s in result.steps[:3]] == [(0, 0), (1, 0), (1, 1)]


def test_model_level_picks_the_best_uniform_variant_that_fits(bank, result):
    variants = [bank.estimate((k, k), "torch-1t") for k in range(len(SPARSITIES))]
    live = (0, 0)
    for step in result.steps:
        fits = [
            v
            for v in variants
            if (step.budget.latency_ms is None or v.latency_ms <= step.budget.latency_ms)
            and (step.budget.memory_mb is None or v.memory_mb <= step.budget.memory_mb)
        ]
        response = step.model_level
        assert response.feasible == bool(fits)
        if fits:
            assert response.selection == max(fits, key=lambda v: v.accuracy)
        else:
            assert response.selection.choices == live
        choices = response.selection.choices
        assert response.changed == (() if choices == live else (0, 1))
        assert response.bytes_loaded == (_loads(bank, choices, (0, 1)) if choices != live else 0)
        live = choices
    assert [s.model_level.selection.choices[0] for s in result.steps] == [
        0,
        1,
        1,
        1,
        1,
        2,
        1,
        2,
        2,
        0,
    ]


def test_summaries_and_comparison(result):
    ours, theirs = result.summary("blockscale"), result.summary("model_level")
    for summary, method in ((ours, "blockscale"), (theirs, "model_level")):
        responses = result.responses(method)
        assert summary.steps == len(BUDGETS)
        assert summary.bytes_loaded == sum(r.bytes_loaded for r in responses)
        assert summary.switches == sum(bool(r.changed) for r in responses)
        assert summary.switch_seconds == pytest.approx(sum(r.seconds for r in responses))
    assert (ours.infeasible_steps, theirs.infeasible_steps) == (1, 1)  # the 2 ms step
    both = [s for s in result.steps if s.blockscale.feasible and s.model_level.feasible]
    assert ours.mean_accuracy == pytest.approx(
        sum(s.blockscale.selection.accuracy for s in both) / len(both)
    )
    assert ours.mean_accuracy > theirs.mean_accuracy
    comparison = result.comparison()
    assert comparison["bytes_ratio"] == pytest.approx(ours.bytes_loaded / theirs.bytes_loaded)
    assert comparison["bytes_fewer_percent"] == pytest.approx(100 * (1 - comparison["bytes_ratio"]))
    assert comparison["bytes_per_switch_ratio"] == pytest.approx(
        (ours.bytes_loaded / ours.switches) / (theirs.bytes_loaded / theirs.switches)
    )
    assert comparison["accuracy_gain_points"] > 0


def test_json_round_trip_and_plot(result, tmp_path):
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["target"] == "torch-1t" and len(data["steps"]) == len(BUDGETS)
    assert data["steps"][4]["blockscale"]["feasible"] is False
    assert set(data["summary"]) == {"blockscale", "model_level", "comparison"}
    assert ReplayResult.from_dict(data) == result
    path = plot_replay(result, tmp_path / "plots" / "replay.png")
    assert path.stat().st_size > 10_000


def test_a_per_model_trace_is_read_at_the_bank_folder_name(bank):
    trace = Trace(
        (
            TraceStep(0, {"cam": Budget(latency_ms=5.0), "mic": Budget(latency_ms=3.0)}),
            TraceStep(1, {"cam": Budget(latency_ms=4.0), "mic": Budget(latency_ms=3.0)}),
        )
    )
    result = replay(bank, trace, "torch-1t", RuntimeConfig(cache_bytes=2**20))
    assert [s.blockscale.selection.choices for s in result.steps] == [(1, 1), (2, 1)]
    assert result.config.cache_bytes == 2**20
    assert [s.blockscale.selection.choices for s in replay(bank, trace, model="mic").steps] == [
        (2, 2),
        (2, 2),
    ]
    with pytest.raises(TraceError, match=r"per model \(cam, mic\), but none for model 'radar'"):
        replay(bank, trace, model="radar")


def test_onnxruntime_target(bank):
    trace = Trace((TraceStep(0, Budget(latency_ms=5.0)), TraceStep(1, Budget(latency_ms=3.0))))
    result = replay(bank, trace, "ort-1t")
    assert result.target == "ort-1t"
    assert [s.blockscale.selection.choices for s in result.steps] == [(1, 1), (2, 2)]
    assert [s.model_level.selection.choices for s in result.steps] == [(1, 1), (2, 2)]
    # adaptive blocks merge after each switch, off its path; whole models are built merged
    assert all(s.blockscale.background_seconds > 0 for s in result.steps)
    assert all(s.model_level.background_seconds == 0 for s in result.steps)
    summary = result.summary("blockscale")
    assert summary.background_seconds == pytest.approx(
        sum(s.blockscale.background_seconds for s in result.steps)
    )
    ratio = result.comparison()["seconds_with_background_ratio"]
    both = summary.switch_seconds + summary.background_seconds
    assert ratio == pytest.approx(both / result.summary("model_level").switch_seconds)
    assert ReplayResult.from_dict(result.to_dict()).summary("blockscale") == summary
    chained = replay(bank, trace, "ort-1t", RuntimeConfig(cache_bytes=0, design="chained"))
    assert all(s.blockscale.background_seconds == 0 for s in chained.steps)


def test_budget_range_spans_the_least_costs_to_the_teacher(bank):
    low, high = budget_range(bank, "ort-1t")
    every = [bank.estimate(c, "ort-1t") for c in itertools.product(range(3), repeat=2)]
    assert low == Budget(min(s.latency_ms for s in every), min(s.memory_mb for s in every))
    assert high == Budget(7.0, (400 + 2 * 4000 + 256) / MIB)


def test_a_switch_cost_applies_to_both_methods_alike(bank):
    """A wobble between 7 ms and 6 ms: at 6 both methods must leave the teacher, at 7 the teacher
    fits again for a gain of 0.02 (blocks) or 0.05 (whole models: level 1 loses 0.02 + 0.03).
    A hysteresis of 0.03 keeps the blocks where they are but lets the model level return; one of
    0.1 keeps both."""
    wobble = (Budget(latency_ms=7.0), Budget(latency_ms=6.0)) * 4
    trace = Trace(tuple(TraceStep(float(i), b) for i, b in enumerate(wobble)))
    free = replay(bank, trace, "torch-1t")
    assert free.summary("blockscale").switches == free.summary("model_level").switches == 7
    some = replay(
        bank, trace, "torch-1t", RuntimeConfig(0, switch_cost=SwitchCost(hysteresis=0.03))
    )
    assert some.summary("blockscale").switches == 1
    assert some.summary("model_level").switches == 7
    assert [s.blockscale.selection.choices for s in some.steps[1:]] == [(1, 0)] * 7
    sticky = replay(
        bank, trace, "torch-1t", RuntimeConfig(0, switch_cost=SwitchCost(hysteresis=0.1))
    )
    assert sticky.summary("blockscale").switches == sticky.summary("model_level").switches == 1
    assert sticky.summary("model_level").bytes_loaded == _loads(bank, (1, 1), (0, 1))
    again = ReplayResult.from_dict(json.loads(json.dumps(sticky.to_dict())))
    assert again.config == sticky.config
    paper = replay(
        bank,
        trace,
        "torch-1t",
        RuntimeConfig(0, switch_cost=SwitchCost(hysteresis=0.1)),
        model_level_cost=SwitchCost(),
    )
    assert paper.summary("blockscale").switches == 1
    assert paper.summary("model_level").switches == 7


def test_a_joint_replay_splits_each_shared_budget_exactly(bank, tmp_path):
    """Two models of the same bank, the second weighted twice; at every step each method's
    choice is checked against brute force over its own options."""
    slots = [ModelSlot(bank, "torch-1t", name="a"), ModelSlot(bank, "torch-1t", 2.0, name="b")]
    budgets = [Budget(latency_ms=t) for t in (14.0, 12.0, 11.0, 9.0, 5.0, 8.0, 14.0)]
    trace = Trace(tuple(TraceStep(float(i), b) for i, b in enumerate(budgets)))
    result = replay_joint(slots, trace)
    selections = [bank.estimate(c, "torch-1t") for c in itertools.product(range(3), repeat=2)]
    uniform = [bank.estimate((k, k), "torch-1t") for k in range(3)]

    def best(options, budget):
        fits = [
            (x, y) for x in options for y in options
            if x.latency_ms + y.latency_ms <= budget.latency_ms
        ]  # fmt: skip
        return max((x.accuracy + 2 * y.accuracy for x, y in fits), default=None)

    live = {"a": (0, 0), "b": (0, 0)}
    for step in result.steps:
        for method, options in (("blockscale", selections), ("model_level", uniform)):
            responses = getattr(step, method)
            expected = best(options, step.budget)
            if expected is None:  # 5 ms: nothing fits two models; both keep what they had
                assert not any(r.feasible for r in responses.values())
                continue
            got = responses["a"].selection.accuracy + 2 * responses["b"].selection.accuracy
            assert got == pytest.approx(expected, abs=1e-12)
            assert sum(r.selection.latency_ms for r in responses.values()) <= step.budget.latency_ms
        for name, r in step.blockscale.items():
            changed = tuple(b for b in range(2) if r.selection.choices[b] != live[name][b])
            assert r.changed == changed
            assert r.bytes_loaded == _loads(bank, r.selection.choices, changed)
            live[name] = r.selection.choices
    summary = result.summary("blockscale")
    assert summary.steps == 7 and summary.infeasible_steps == 1
    assert summary.bytes_loaded == sum(
        r.bytes_loaded for s in result.steps for r in s.blockscale.values()
    )
    met = [s for s in result.steps if s.blockscale["a"].feasible]
    assert summary.mean_accuracy == pytest.approx(
        sum((s.blockscale["a"].selection.accuracy + 2 * s.blockscale["b"].selection.accuracy) / 3
            for s in met) / len(met)
    )  # fmt: skip
    combined = result.combined()
    assert combined.model == "a + b" and combined.steps[0].blockscale.selection.choices == (
        *result.steps[0].blockscale["a"].selection.choices,
        *result.steps[0].blockscale["b"].selection.choices,
    )
    assert plot_replay(combined, tmp_path / "joint.png").stat().st_size > 10_000
    again = JointReplayResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.to_dict() == result.to_dict()
    with pytest.raises(TraceError, match="one shared budget per step"):
        replay_joint(slots, Trace((TraceStep(0.0, {"a": Budget(), "b": Budget()}),)))
