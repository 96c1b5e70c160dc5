import itertools
import json
import shutil
import threading

import pytest
import torch
from nets import tiny_resnet

from blockscale.bank import Bank
from blockscale.derive import derive
from blockscale.errors import (
    BankError,
    ConfigError,
    ExportError,
    InfeasibleBudgetError,
    InputShapeError,
    ProfileError,
)
from blockscale.export import OnnxExport, export_bank
from blockscale.extract import extract
from blockscale.multi import SwitchCost
from blockscale.ort import ChainedSession
from blockscale.profile import BankProfile
from blockscale.runtime import ModelSlot, MultiRuntime, Runtime, RuntimeConfig, SwitchReport
from blockscale.targets import Target
from blockscale.types import Budget, DeriveConfig, Profile

SPARSITIES = (0.0, 0.5, 0.75)
SHAPE = (1, 8, 8)
# Made-up profiles, so that each budget has one known best selection on both targets: the frame
# takes 1 ms, each block 3, 2 or 1 ms by descendant; block 0 loses less accuracy than block 1.
DROPS = ((0.0, 0.02, 0.06), (0.0, 0.03, 0.08))
LATENCY = (3.0, 2.0, 1.0)
BEST = {  # latency budget (ms) -> the most accurate selection within it
    None: (0, 0),
    6.0: (1, 0),
    5.0: (1, 1),
    4.0: (2, 1),
    3.0: (2, 2),
}
BIG = RuntimeConfig(cache_bytes=2**30)
TARGETS = ("torch-1t", "ort-1t")


def _profiles() -> BankProfile:
    def entry(block: int, index: int, drop: float, ms: float) -> Profile:
        times = dict.fromkeys(TARGETS, ms)
        return Profile(block, index, drop, 100, 1000, 400, 256, times)

    return BankProfile(
        teacher_accuracy=0.9,
        frame=entry(-1, 0, 0.0, 1.0),
        descendants=[
            [entry(b, d, DROPS[b][d], LATENCY[d]) for d in range(len(SPARSITIES))] for b in range(2)
        ],
        targets={name: Target.parse(name).to_dict() for name in TARGETS},
    )


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    d = extract(tiny_resnet(), torch.zeros(1, *SHAPE))
    families = derive(d, DeriveConfig(sparsities=SPARSITIES, round_to=1))
    path = tmp_path_factory.mktemp("runtime") / "bank"
    return Bank.write(path, d, families, extra={"profiles": _profiles().to_dict()})


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def references(bank, x):
    """The output for ``x`` of every selection, composed by the bank."""
    with torch.no_grad():
        return {
            choices: bank.compose(choices)(x)
            for choices in itertools.product(range(len(SPARSITIES)), repeat=2)
        }


def _bytes(bank, keys):
    return sum(bank.file_bytes(b, d) for b, d in keys)


def test_set_budget_follows_select_and_compose(bank, x, references):
    runtime = Runtime(bank, "torch-1t", BIG)
    assert runtime.selection == bank.select(Budget(), "torch-1t")
    for latency, choices in BEST.items():
        budget = Budget(latency_ms=latency)
        report = runtime.set_budget(budget)
        assert report.selection == runtime.selection == bank.select(budget, "torch-1t")
        assert runtime.selection.choices == choices and runtime.budget == budget
        torch.testing.assert_close(runtime(x), references[choices], rtol=0, atol=0)


def test_onnxruntime_target_matches_torch(bank, x, references):
    runtime = Runtime(bank, Target("onnxruntime"), BIG)
    assert runtime.target.name == "ort-1t"
    for choices in [(0, 0), (2, 1), (1, 2)]:
        runtime.set_selection(choices)
        out = runtime(x)
        assert out.shape == references[choices].shape
        assert (out - references[choices]).abs().max() <= 1e-4


def test_adaptive_switches_as_a_chain_then_publishes_the_merged_session(bank, x, references):
    """A switch builds only the changed block's session into a new chain and serves it; the
    background merge then replaces the chain by one merged session of the same selection."""
    runtime = Runtime(bank, "ort-1t", BIG)
    assert runtime.config.design == "adaptive"
    assert runtime.settle(timeout=60)
    first = runtime._live
    assert isinstance(first.state, ChainedSession) and first.refined
    runtime.set_selection((2, 0))
    chain = runtime._live.state
    shared = [
        a.session is b.session for a, b in zip(first.state._stages, chain._stages, strict=True)
    ]
    assert shared.count(False) == 1 and not shared[chain._slots[0]]
    assert runtime.settle(timeout=60)
    assert runtime._live.state is chain and runtime._live.refined
    assert runtime.refine_seconds > 0
    assert (runtime(x) - references[(2, 0)]).abs().max() <= 1e-4
    merged = Runtime(bank, "ort-1t", RuntimeConfig(cache_bytes=2**30, design="merged"))
    assert merged._live.state is None and merged.settle(timeout=0) and merged.refine_seconds == 0


def test_a_failed_background_merge_is_raised_by_settle(bank, x, references, monkeypatch):
    runtime = Runtime(bank, "ort-1t", BIG)
    runtime.settle(timeout=60)

    def broken(*args, **kwargs):
        raise RuntimeError("no memory left")

    monkeypatch.setattr("blockscale.runtime.MergedSession", broken)
    runtime.set_selection((1, 1))
    with pytest.raises(BankError, match="no memory left"):
        runtime.settle(timeout=60)
    assert (runtime(x) - references[(1, 1)]).abs().max() <= 1e-4  # the chain serves on
    assert runtime.settle(timeout=0)  # raised once


def test_a_switch_changes_only_the_blocks_that_differ(bank):
    runtime = Runtime(bank, "torch-1t", BIG)
    first = runtime.history[0]
    assert first.changed == (0, 1) and first.bytes_loaded == 0  # teacher blocks are resident
    report = runtime.set_budget(Budget(latency_ms=5.0))  # (0, 0) -> (1, 1)
    assert report.changed == (0, 1) and report.cache_hits == 0
    assert report.bytes_loaded == _bytes(bank, [(0, 1), (1, 1)]) > 0
    report = runtime.set_budget(Budget(latency_ms=4.0))  # (1, 1) -> (2, 1)
    assert report.changed == (0,) and report.bytes_loaded == _bytes(bank, [(0, 2)])
    assert report.seconds > 0
    report = runtime.set_budget(Budget(latency_ms=4.5))  # same selection, another budget
    assert (report.changed, report.bytes_loaded) == ((), 0)
    assert runtime.budget == Budget(latency_ms=4.5)
    assert [r.selection.choices for r in runtime.history] == [(0, 0), (1, 1), (2, 1), (2, 1)]
    assert isinstance(runtime.history[-1], SwitchReport)
    assert runtime.history[-1].to_dict()["changed"] == []


def test_switching_back_hits_the_cache_when_it_is_large_enough(bank):
    runtime = Runtime(bank, "torch-1t", BIG)
    runtime.set_selection((1, 1))
    runtime.set_selection((2, 2))
    back = runtime.set_selection((1, 1))
    assert back.changed == (0, 1)
    assert (back.bytes_loaded, back.cache_hits) == (0, 2)
    assert runtime.budget is None


def test_without_a_cache_switching_back_loads_again(bank):
    runtime = Runtime(bank, "torch-1t", RuntimeConfig(cache_bytes=0))
    runtime.set_selection((1, 1))
    runtime.set_selection((2, 1))  # block 1 stays live, so it stays loaded
    assert set(runtime.cached) == {(0, 2), (1, 1)}
    back = runtime.set_selection((1, 1))
    assert back.changed == (0,) and back.bytes_loaded == _bytes(bank, [(0, 1)])
    assert back.cache_hits == 0


def test_load_bytes_is_what_a_switch_would_read(bank, exported):
    runtime = Runtime(bank, "torch-1t", BIG)
    assert runtime.load_bytes((0, 0)) == 0  # the teacher's own block, resident
    assert runtime.load_bytes((0, 1)) == bank.file_bytes(0, 1) > 0
    report = runtime.set_selection((1, 0))
    assert report.bytes_loaded == _bytes(bank, [(0, 1)])
    assert runtime.load_bytes((0, 1)) == 0  # now held
    onnx = Runtime(bank, "ort-1t", BIG, onnx_export=exported)
    assert onnx.load_bytes((1, 2)) == OnnxExport(exported).file_bytes(1, 2) != bank.file_bytes(1, 2)


def test_the_cache_stays_within_its_bound(bank):
    bound = max(bank.file_bytes(b, d) for b in range(2) for d in (1, 2))  # room for one spare
    runtime = Runtime(bank, "torch-1t", RuntimeConfig(cache_bytes=bound))
    order = list(itertools.product(range(len(SPARSITIES)), repeat=2))
    for choices in order + order[::-1]:
        runtime.set_selection(choices)
        live = {(b, d) for b, d in enumerate(choices) if d != 0}
        cached = set(runtime.cached)
        assert live <= cached
        assert _bytes(bank, cached - live) <= bound


def test_an_infeasible_budget_leaves_the_live_model(bank, x, references):
    runtime = Runtime(bank, "torch-1t", BIG, budget=Budget(latency_ms=5.0))
    before = (runtime.selection, runtime.budget, len(runtime.history))
    with pytest.raises(InfeasibleBudgetError) as info:
        runtime.set_budget(Budget(latency_ms=2.0))
    assert info.value.min_latency_ms == pytest.approx(3.0)
    assert (runtime.selection, runtime.budget, len(runtime.history)) == before
    torch.testing.assert_close(runtime(x), references[(1, 1)], rtol=0, atol=0)
    with pytest.raises(InfeasibleBudgetError):
        Runtime(bank, "torch-1t", budget=Budget(latency_ms=2.0))


def test_unknown_target_and_bad_inputs_are_refused(bank):
    with pytest.raises(ProfileError, match=r"not profiled on 'ort-2t'.*torch-1t, ort-1t"):
        Runtime(bank, "ort-2t")
    runtime = Runtime(bank)  # the first profiled target
    assert runtime.target.name == "torch-1t"
    with pytest.raises(InputShapeError, match=r"\(N, 1, 8, 8\), got shape \(1, 8, 8\)"):
        runtime(torch.zeros(*SHAPE))
    with pytest.raises(BankError, match="one descendant per block"):
        runtime.set_selection((0, 3))
    with pytest.raises(BankError):
        runtime.set_selection((0,))
    with pytest.raises(ConfigError):
        RuntimeConfig(cache_bytes=-1)
    with pytest.raises(ConfigError):
        RuntimeConfig(design="parallel")
    with pytest.raises(ConfigError, match="confidence"):
        RuntimeConfig(confidence=1.0)


def test_an_int8_target_is_profiled_not_served(bank, tmp_path):
    shutil.copytree(bank.path, tmp_path / "bank")
    copy = Bank.open(tmp_path / "bank")
    profiles = copy.profile
    for p in [profiles.frame, *(p for fam in profiles.descendants for p in fam)]:
        p.latency_ms["ortq-1t"] = p.latency_ms["ort-1t"]
    profiles.targets["ortq-1t"] = Target.parse("ortq-1t").to_dict()
    copy.update(profiles=profiles.to_dict())
    with pytest.raises(ConfigError, match="profiles latency only") as info:
        Runtime(copy, "ortq-1t")
    assert "ort-1t" in info.value.hint


@pytest.mark.parametrize(
    ("target", "design"),
    [("torch-1t", "merged"), ("ort-1t", "merged"), ("ort-1t", "chained"), ("ort-1t", "adaptive")],
)
def test_calls_during_switches_run_on_one_model(bank, x, references, target, design):
    """Four threads call the runtime while the budget alternates; every output is that of one
    whole selection, never a mix of two (a mix, e.g. (2, 0), has an output of its own)."""
    budgets = [Budget(latency_ms=5.0), Budget(latency_ms=3.0), Budget()]
    live = {BEST[b.latency_ms] for b in budgets}
    tol = 1e-5 if target.startswith("torch") else 1e-4
    runtime = Runtime(bank, target, RuntimeConfig(cache_bytes=2**30, design=design))
    for budget in budgets:  # load and export everything first, so switches are quick
        runtime.set_budget(budget)
    done = threading.Event()
    outputs: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            while not done.is_set():
                outputs.append(runtime(x))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(21):
            runtime.set_budget(budgets[i % len(budgets)])
            done.wait(0.005)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert len(outputs) > 20
    seen = set()
    for out in outputs:
        matches = [c for c in live if (out - references[c]).abs().max() <= tol]
        assert matches, "an output matches no selection that was live"
        seen.update(matches)
    assert len(seen) > 1  # the callers did run across switches
    mixes = [c for c in references if c not in live]
    assert all((references[m] - references[c]).abs().max() > 1e-3 for m in mixes for c in live)


# -- switching-aware budgets -------------------------------------------------------------------


def test_hysteresis_keeps_a_live_selection_that_still_fits(bank):
    sticky = RuntimeConfig(cache_bytes=2**30, switch_cost=SwitchCost(hysteresis=0.05))
    eager = RuntimeConfig(cache_bytes=2**30, switch_cost=SwitchCost())
    for config, back in [(sticky, (1, 0)), (eager, (0, 0))]:
        runtime = Runtime(bank, "torch-1t", config)
        assert runtime.set_budget(Budget(latency_ms=6.0)).selection.choices == (1, 0)  # must move
        report = runtime.set_budget(Budget(latency_ms=7.0))  # the teacher fits again: +0.02
        assert report.selection.choices == back
        assert report.selection == bank.estimate(back, "torch-1t")


def test_switch_charges_count_only_what_would_be_loaded(bank):
    """From (2, 2), a budget of 5 ms is best met by (1, 1) (two loads unless cached), or by (2, 0)
    at 0.01 less (its one change is to a resident teacher block). A high price per MiB picks
    (1, 1) when the cache holds it and (2, 0) when it must be read again."""
    cost = SwitchCost(per_mb=1000.0)
    for cache, expected in [(2**30, (1, 1)), (0, (2, 0))]:
        runtime = Runtime(bank, "torch-1t", RuntimeConfig(cache_bytes=cache, switch_cost=cost))
        runtime.set_selection((1, 1))
        runtime.set_selection((2, 2))
        report = runtime.set_budget(Budget(latency_ms=5.0))
        assert report.selection.choices == expected
        assert report.bytes_loaded == 0
    plain = Runtime(bank, "torch-1t", RuntimeConfig(cache_bytes=0))
    plain.set_selection((2, 2))
    assert plain.set_budget(Budget(latency_ms=5.0)).selection.choices == (1, 1)


def test_switch_cost_round_trips_in_the_config():
    config = RuntimeConfig(cache_bytes=5, switch_cost=SwitchCost(0.01, 0.002, 0.003))
    assert RuntimeConfig.from_dict(config.to_dict()) == config
    assert RuntimeConfig.from_dict(RuntimeConfig().to_dict()) == RuntimeConfig()


# -- several models ----------------------------------------------------------------------------


def _joint_best(bank, budget, priorities):
    """The best (choices_a, choices_b) by brute force over every pair of selections."""
    options = [bank.estimate(c, "torch-1t") for c in itertools.product(range(3), repeat=2)]
    fits = [
        (a, b)
        for a in options
        for b in options
        if budget.latency_ms is None or a.latency_ms + b.latency_ms <= budget.latency_ms
    ]
    return max(fits, key=lambda p: priorities[0] * p[0].accuracy + priorities[1] * p[1].accuracy)


@pytest.mark.parametrize("priorities", [(1.0, 1.0), (1.0, 3.0), (3.0, 1.0)])
def test_multi_runtime_splits_one_budget_as_brute_force_does(bank, x, references, priorities):
    slots = [
        ModelSlot(bank, "torch-1t", priority=p, name=n)
        for p, n in zip(priorities, "ab", strict=True)
    ]
    multi = MultiRuntime(slots, BIG)
    assert multi.names == ("a", "b")
    assert all(s.choices == (0, 0) for s in multi.selections.values())
    for latency in (14.0, 12.0, 11.0, 9.0, 7.0, 6.0):
        budget = Budget(latency_ms=latency)
        report = multi.set_budget(budget)
        best = _joint_best(bank, budget, priorities)
        objective = sum(
            p * multi.selections[n].accuracy for p, n in zip(priorities, "ab", strict=True)
        )
        assert objective == pytest.approx(
            sum(p * s.accuracy for p, s in zip(priorities, best, strict=True)), abs=1e-12
        )
        assert sum(s.latency_ms for s in multi.selections.values()) <= latency
        assert multi.budget == budget and set(report.reports) == {"a", "b"}
        assert report.bytes_loaded == sum(r.bytes_loaded for r in report.reports.values())
        for name in "ab":
            choices = multi.selections[name].choices
            torch.testing.assert_close(multi(name, x), references[choices], rtol=0, atol=0)
    assert tuple(report.to_dict()["models"]["a"]["selection"]["choices"]) == (
        multi.selections["a"].choices
    )


def test_multi_runtime_hysteresis_limits_and_errors(bank):
    slots = [ModelSlot(bank, "torch-1t", name="a"), ModelSlot(bank, "torch-1t", name="b")]
    sticky = MultiRuntime(slots, BIG, budget=Budget(latency_ms=11.0), hysteresis=0.1)
    before = sticky.selections
    assert sum(s.latency_ms for s in before.values()) <= 11.0
    report = sticky.set_budget(Budget(latency_ms=14.0))  # everything fits, the gain is small
    assert sticky.selections == before and not any(report.changed.values())
    eager = MultiRuntime(slots, BIG, budget=Budget(latency_ms=11.0))
    eager.set_budget(Budget(latency_ms=14.0))
    assert all(s.choices == (0, 0) for s in eager.selections.values())
    with pytest.raises(InfeasibleBudgetError) as caught:
        eager.set_budget(Budget(latency_ms=5.0))
    assert caught.value.min_latency_ms == pytest.approx(6.0)
    assert eager.budget == Budget(latency_ms=14.0)
    limited = [ModelSlot(bank, "torch-1t", name="a", min_accuracy=0.9), slots[1]]
    fair = MultiRuntime(limited, BIG, budget=Budget(latency_ms=11.0))
    assert fair.selections["a"].choices == (0, 0)
    assert fair.selections["b"].latency_ms <= 4.0
    with pytest.raises(ConfigError, match="names must differ"):
        MultiRuntime([slots[0], slots[0]])
    with pytest.raises(ConfigError, match="no model named 'c'"):
        fair["c"]
    with pytest.raises(ConfigError, match="at least one"):
        MultiRuntime([])


# -- reading a bank's ONNX export ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(bank, tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime-onnx") / "bank-onnx"
    export_bank(bank.decomposition(), bank.load_descendants(), path)
    return path


def test_an_onnx_export_is_read_instead_of_exporting(bank, exported, x, references):
    export = OnnxExport(exported)
    runtime = Runtime(bank, "ort-1t", BIG, onnx_export=exported)
    for choices in [(1, 2), (2, 1), (0, 0), (1, 2)]:
        report = runtime.set_selection(choices)
        assert (runtime(x) - references[choices]).abs().max() <= 1e-4
        fresh = [(b, choices[b]) for b in report.changed if choices[b] != 0]
        if report.cache_hits == 0:
            assert report.bytes_loaded == sum(export.file_bytes(*k) for k in fresh)
    assert runtime.history[-1].bytes_loaded == 0  # (1, 2) again: from the cache
    with pytest.raises(ConfigError, match="onnxruntime targets"):
        Runtime(bank, "torch-1t", onnx_export=exported)


def test_a_foreign_or_altered_export_is_refused(bank, exported, tmp_path, x, references):
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    index = json.loads((other / "index.json").read_text())
    index["model"] = "vgg11"
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="not of this bank"):
        Runtime(bank, "ort-1t", onnx_export=other)
    altered = tmp_path / "altered"
    shutil.copytree(exported, altered)
    name = json.loads((altered / "index.json").read_text())["blocks"][1][2]["file"]
    data = bytearray((altered / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (altered / name).write_bytes(bytes(data))
    runtime = Runtime(bank, "ort-1t", onnx_export=altered)
    with pytest.raises(ExportError, match="sha256"):
        runtime.set_selection((0, 2))
    assert runtime.selection.choices == (0, 0)
    assert (runtime(x) - references[(0, 0)]).abs().max() <= 1e-4


def test_multi_runtime_settles_every_model(bank, x, references):
    slots = [ModelSlot(bank, "ort-1t", name="a"), ModelSlot(bank, "torch-1t", name="b")]
    multi = MultiRuntime(slots, BIG)
    multi.set_budget(Budget(latency_ms=9.0))
    assert multi.settle(timeout=60)
    a = multi["a"]
    assert a._live.refined and a.refine_seconds > 0
    assert multi["b"].refine_seconds == 0  # torch has nothing to merge
    for name in "ab":
        out = multi(name, x) - references[multi.selections[name].choices]
        assert out.abs().max() <= 1e-4
