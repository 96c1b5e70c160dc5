import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nets import TinyResNet, tiny_resnet
from torch import fx, nn

from blockscale.bank import Bank
from blockscale.data import load_dataset
from blockscale.derive import derive
from blockscale.errors import ConfigError, ProfileError
from blockscale.extract import compose, extract
from blockscale.profile import (
    GAMMAS,
    BankProfile,
    DropCorrection,
    LatencyCorrection,
    ProfileConfig,
    _link,
    add_target,
    count_macs,
    estimate,
    fit_additive,
    fit_block_weights,
    fit_interactions,
    frontier_choices,
    kept_accuracy_estimate,
    kept_latency_estimate,
    peak_activation_bytes,
    predict_selections,
    profile,
    refit_latency_estimate,
    slot_context_bytes,
    spearman,
    summarize_validation,
    time_descendants,
    validate,
    weight_bytes,
    weighted_accuracy_errors,
)
from blockscale.targets import Target
from blockscale.train import TrainConfig, evaluate, train
from blockscale.types import Budget, DeriveConfig, Profile

FAST = ProfileConfig(warmup=1, repeats=3, batch_size=64)
SPARSITIES = (0.0, 0.5, 0.75)
S = 4 * 8 * 8 * 4  # bytes of one 4x8x8 float32 feature map, the blocks' input and output
H = 8 * 8 * 8 * 4  # bytes of one 8x8x8 feature map, inside an unpruned block
X = 1 * 8 * 8 * 4  # bytes of the model's 1x8x8 input


# -- sizes, MACs and memory of single modules ----------------------------------------------------


def test_count_macs_by_hand():
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),  # 6x4x4 outputs, 2*3*3 MACs each
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3),  # 6x2x2 outputs, (6/3)*3*3 MACs each
        nn.Flatten(),
        nn.Linear(24, 5),  # 5 outputs, 24 MACs each
    )
    assert count_macs(net, (2, 4, 4)) == 96 * 18 + 24 * 18 + 5 * 24


def test_count_macs_of_a_plain_matrix_product():
    assert count_macs(nn.Linear(7, 3, bias=False), (7,)) == 21
    assert count_macs(nn.ReLU(), (3, 8, 8)) == 0


def test_weight_bytes_by_hand():
    assert weight_bytes(nn.Conv2d(2, 3, 3)) == (2 * 3 * 9 + 3) * 4
    # weight, bias, running mean and variance in float32, and an int64 batch counter
    assert weight_bytes(nn.BatchNorm2d(3)) == 4 * 3 * 4 + 8
    assert weight_bytes(nn.Linear(4, 4).half()) == 20 * 2
    a = nn.Linear(4, 4, bias=False)
    tied = nn.Sequential(a, nn.ReLU(), a)  # a tensor shared by two layers counts once
    assert weight_bytes(tied) == 16 * 4


class Residual(nn.Module):
    def __init__(self, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.expand = nn.Conv2d(2, 4, 1)
        self.project = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(F.relu(self.expand(x)))
        return F.relu(x + y) if self.skip else F.relu(y)


def test_peak_activation_of_a_residual_block_by_hand():
    x, wide = 2 * 4 * 4 * 4, 4 * 4 * 4 * 4  # 128 and 256 bytes
    # live after each step: x | x, expand | x, expand, relu | x, relu, project | x, project, add |
    # add, relu: the input stays alive until the add
    peak = max(x, x + wide, x + 2 * wide, x + wide + x, 3 * x, 2 * x)
    assert peak_activation_bytes(fx.symbolic_trace(Residual()), (2, 4, 4)) == peak == 640
    # without the shortcut the graph is done with the input after the first convolution, but the
    # caller still holds it: x | x, expand | x, expand, relu | x, relu, project | x, project, relu
    assert peak_activation_bytes(fx.symbolic_trace(Residual(skip=False)), (2, 4, 4)) == peak


def test_a_plain_module_is_traced():
    assert peak_activation_bytes(nn.Conv2d(2, 6, 1), (2, 4, 4)) == (2 + 6) * 16 * 4
    assert peak_activation_bytes(Residual(), (2, 4, 4)) == 640


class _Branchy(nn.Module):
    """Control flow on a tensor's value: fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], 1) if x.sum() >= 0 else x


def test_peak_activation_of_an_untraceable_module_is_its_larger_end():
    assert peak_activation_bytes(_Branchy(), (2, 4, 4)) == 2 * 2 * 16 * 4


class _Around(nn.Module):
    """Two residual blocks with the first one's input carried past both (a long skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = fx.symbolic_trace(Residual())
        self.second = fx.symbolic_trace(Residual())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        return self.second(self.first(y)) + y


class _GraphLeaves(fx.Tracer):
    """Keeps graph-module submodules as calls, as a composed model has its blocks."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, fx.GraphModule) or super().is_leaf_module(m, name)


def test_a_graph_submodule_is_swept_inside_with_what_the_caller_holds():
    x = 2 * 4 * 4 * 4
    around = _Around()
    outer = fx.GraphModule(around, _GraphLeaves().trace(around))
    assert [n.op for n in outer.graph.nodes].count("call_module") == 2
    # first: the input x and the relu y around it, then its own 640 (which counts y); second: x,
    # y and second's input (first's output) held, 640 inside counting that input
    assert peak_activation_bytes(outer, (2, 4, 4)) == x + 640 + x


# -- profiling a bank ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bank():
    kw = {"num_classes": 4, "in_channels": 1, "size": 8}
    train_set = load_dataset("synthetic", "train", n=256, **kw)
    val_set = load_dataset("synthetic", "test", n=128, **kw)
    teacher = tiny_resnet()
    train(
        teacher, train_set, val_set, TrainConfig(epochs=3, batch_size=32, lr=0.05), progress=False
    )
    d = extract(teacher, torch.zeros(1, 1, 8, 8))
    families = derive(d, DeriveConfig(sparsities=SPARSITIES, round_to=1))
    profiles = profile(d, families, val_set, Target(), FAST, progress=False)
    return teacher, d, families, val_set, profiles


def test_teacher_accuracy_is_measured(bank):
    teacher, _, _, val_set, profiles = bank
    assert profiles.teacher_accuracy == evaluate(teacher, val_set) > 0.5
    assert profiles.val_samples == len(val_set)


def test_accuracy_drop_is_that_of_the_single_swap(bank):
    _, d, families, val_set, profiles = bank
    drops = []
    for b, family in enumerate(families):
        for desc, p in zip(family, profiles.descendants[b], strict=True):
            assert (p.block, p.index) == (b, desc.info.index)
            if desc.info.sparsity == 0:
                assert p.accuracy_drop == 0.0
                continue
            blocks = list(d.blocks)
            blocks[b] = desc.module
            measured = evaluate(compose(d, blocks), val_set)
            assert p.accuracy_drop == profiles.teacher_accuracy - measured
            drops.append(p.accuracy_drop)
    assert max(drops) > 0.05  # unretrained pruning hurts: the comparison is not vacuous


def test_descendant_sizes(bank):
    _, d, families, _, profiles = bank
    assert slot_context_bytes(d) == [X, X]  # the caller holds the model's input throughout
    for info, family, measured in zip(d.plan.blocks, families, profiles.descendants, strict=True):
        for desc, p in zip(family, measured, strict=True):
            assert p.params == sum(t.numel() for t in desc.module.parameters())
            assert p.params == desc.info.num_params
            assert p.weight_bytes == weight_bytes(desc.module)
            assert p.macs == count_macs(desc.module, info.input_shape)
            assert p.activation_bytes == X + peak_activation_bytes(desc.module, info.input_shape)
            assert p.memory_bytes == p.weight_bytes + p.activation_bytes
        # by hand: conv 4->h and h->4, 3x3 at 8x8, h = 8, 4, 2 hidden channels
        assert [p.macs for p in measured] == [64 * 9 * 4 * h * 2 for h in (8, 4, 2)]
        # peak inside the block: input, and the hidden map twice (the batch norm step); around it
        # the model's input
        assert [p.activation_bytes for p in measured] == [X + S + 2 * H, X + 3 * S, X + 3 * S]
        assert [p.params for p in measured] == sorted((p.params for p in measured), reverse=True)


def test_latency_is_keyed_by_target(bank):
    *_, profiles = bank
    every = [profiles.frame, *(p for fam in profiles.descendants for p in fam)]
    assert all(set(p.latency_ms) == {"torch-1t"} for p in every)
    assert all(p.latency_ms["torch-1t"] > 0 for p in every)
    assert set(profiles.targets) == {"torch-1t"}
    assert profiles.targets["torch-1t"]["name"] == "torch-1t"


def test_frame_profile_excludes_the_blocks(bank):
    teacher, d, _, _, profiles = bank
    frame = profiles.frame
    assert (frame.block, frame.accuracy_drop) == (-1, 0.0)
    own = [teacher.stem, teacher.head]  # all the teacher has outside res1 and res2
    assert (
        frame.params == d.plan.frame_params == sum(p.numel() for m in own for p in m.parameters())
    )
    assert frame.weight_bytes == sum(weight_bytes(m) for m in own)
    assert frame.weight_bytes == weight_bytes(teacher) - weight_bytes(nn.ModuleList(d.blocks))
    assert frame.macs == 64 * 9 * 4 + 4 * 4  # stem conv 1->4 at 8x8, head 4->4
    # the frame's steps: input (1x8x8, held throughout), three stem layers, then each block in
    # and out (4x8x8)
    assert frame.activation_bytes == X + 2 * S


def _profile(block, index, drop, weights, activation, ms):
    return Profile(block, index, drop, 0, 0, weights, activation, {"t": ms})


def test_estimate_adds_the_parts():
    bp = BankProfile(
        teacher_accuracy=0.9,
        frame=_profile(-1, 0, 0.0, 1000, 500, 1.0),
        descendants=[
            [_profile(0, 0, 0.0, 4000, 300, 2.0), _profile(0, 1, 0.02, 2000, 200, 1.5)],
            [_profile(1, 0, 0.0, 8000, 900, 3.0), _profile(1, 1, 0.05, 3000, 400, 2.5)],
        ],
    )
    est = estimate(bp, [1, 0], "t")
    assert est["accuracy"] == pytest.approx(0.9 - 0.02 - 0.0)
    assert est["latency_ms"] == pytest.approx(1.0 + 1.5 + 3.0)
    assert est["memory_mb"] == pytest.approx((1000 + 2000 + 8000 + 900) / 2**20)
    est = estimate(bp, [1, 1], "t")
    assert est["accuracy"] == pytest.approx(0.9 - 0.07)
    assert est["latency_ms"] == pytest.approx(5.0)
    assert est["memory_mb"] == pytest.approx((1000 + 2000 + 3000 + 500) / 2**20)  # frame's peak
    with pytest.raises(ProfileError, match="no latency on target 'other-target' for the frame"):
        estimate(bp, [0, 0], "other-target")


@settings(max_examples=10, deadline=None)
@given(choices=st.tuples(st.integers(0, 2), st.integers(0, 2)))
def test_estimated_memory_is_the_composed_models(bank, choices):
    """Weights add up and the activation peak is the frame's or the largest block's: exact."""
    _, d, families, _, profiles = bank
    composed = compose(d, [families[b][c].module for b, c in enumerate(choices)])
    measured = weight_bytes(composed) + peak_activation_bytes(composed, d.plan.input_shape)
    assert estimate(profiles, list(choices), "torch-1t")["memory_mb"] * 2**20 == measured


class _NoStem(TinyResNet):
    """TinyResNet without its stem: the first block takes the model's input itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.res2(self.res1(x)).mean((2, 3)))


def test_the_models_input_counts_once_around_every_block():
    torch.manual_seed(0)
    d = extract(_NoStem(in_channels=4), torch.zeros(1, 4, 8, 8))
    # the caller holds the 4x8x8 input throughout: around res1 it is res1's own input (counted in
    # res1's peak), around res2 it is held besides
    assert slot_context_bytes(d) == [0, S]
    families = derive(d, DeriveConfig(sparsities=SPARSITIES, round_to=1))
    val_set = load_dataset("synthetic", "test", n=32, num_classes=4, in_channels=4, size=8)
    profiles = profile(d, families, val_set, Target(), FAST, progress=False)
    for choices in itertools.product(range(len(SPARSITIES)), repeat=2):
        composed = compose(d, [families[b][c].module for b, c in enumerate(choices)])
        measured = weight_bytes(composed) + peak_activation_bytes(composed, d.plan.input_shape)
        assert estimate(profiles, list(choices), "torch-1t")["memory_mb"] * 2**20 == measured


def test_estimate_of_the_teacher_is_the_teacher(bank):
    *_, profiles = bank
    est = estimate(profiles, [0, 0], "torch-1t")
    assert est["accuracy"] == profiles.teacher_accuracy
    parts = [profiles.frame, profiles.descendants[0][0], profiles.descendants[1][0]]
    assert est["latency_ms"] == pytest.approx(sum(p.latency_ms["torch-1t"] for p in parts))


def test_validate_records(bank):
    _, d, families, val_set, profiles = bank
    result = validate(
        profiles, d, families, val_set, Target(), samples=4, seed=3, config=FAST, progress=False
    )
    assert result["target"] == "torch-1t" and result["samples"] == 4
    assert len(result["records"]) == 4
    for record in result["records"]:
        assert set(record) == {
            "choices",
            "summed_cost",
            "sum_estimated_accuracy",
            "estimated_accuracy",
            "measured_accuracy",
            "estimated_latency_ms",
            "measured_latency_ms",
            "estimated_latency_ratio",
            "measured_latency_ratio",
        }
        choices = record["choices"]
        assert len(choices) == 2 and all(0 <= c < len(SPARSITIES) for c in choices)
        est = estimate(profiles, choices, "torch-1t")
        assert record["estimated_accuracy"] == est["accuracy"]
        assert record["estimated_latency_ms"] == est["latency_ms"]
        model = compose(d, [families[b][c].module for b, c in enumerate(choices)])
        assert record["measured_accuracy"] == evaluate(model, val_set)
        assert record["measured_latency_ms"] > 0
    mae = (
        100
        * sum(abs(r["estimated_accuracy"] - r["measured_accuracy"]) for r in result["records"])
        / 4
    )
    assert result["accuracy_mae_points"] == pytest.approx(mae)
    assert result["latency_mape_percent"] >= 0 and result["seconds"] > 0
    again = validate(
        profiles, d, families, val_set, Target(), samples=4, seed=3, config=FAST, progress=False
    )
    assert [r["choices"] for r in again["records"]] == [r["choices"] for r in result["records"]]


def test_unpruned_bank_estimates_accuracy_exactly(bank):
    teacher, _, _, val_set, _ = bank
    d = extract(teacher, torch.zeros(1, 1, 8, 8))
    families = derive(d, DeriveConfig(sparsities=(0.0,)))
    profiles = profile(d, families, val_set, Target(), FAST, progress=False)
    assert all(p.accuracy_drop == 0.0 for fam in profiles.descendants for p in fam)
    result = validate(
        profiles, d, families, val_set, Target(), samples=3, config=FAST, progress=False
    )
    assert result["accuracy_mae_points"] == 0.0
    assert all(r["measured_accuracy"] == profiles.teacher_accuracy for r in result["records"])
    assert math.isnan(result["accuracy_spearman"])  # every estimate is the same


def test_summarize_validation_by_hand():
    records = [
        {
            "choices": [0],
            "estimated_accuracy": 0.5,
            "measured_accuracy": 0.4,
            "estimated_latency_ms": 2.0,
            "measured_latency_ms": 1.0,
        },
        {
            "choices": [1],
            "estimated_accuracy": 0.6,
            "measured_accuracy": 0.6,
            "estimated_latency_ms": 4.0,
            "measured_latency_ms": 5.0,
        },
    ]
    summary = summarize_validation(records, "t", 1.5)
    assert summary["accuracy_mae_points"] == pytest.approx(5.0)
    assert summary["latency_mape_percent"] == pytest.approx(60.0)
    assert summary["accuracy_spearman"] == pytest.approx(1.0)
    assert summary["latency_spearman"] == pytest.approx(1.0)
    assert (summary["target"], summary["samples"], summary["seconds"]) == ("t", 2, 1.5)


def test_add_target_keeps_accuracy(bank):
    _, d, families, _, profiles = bank
    copy = BankProfile.from_dict(profiles.to_dict())
    extended = add_target(copy, d, families, Target(threads=2), FAST, progress=False)
    assert set(extended.targets) == {"torch-1t", "torch-2t"}
    old = [profiles.frame, *(p for fam in profiles.descendants for p in fam)]
    new = [extended.frame, *(p for fam in extended.descendants for p in fam)]
    for before, after in zip(old, new, strict=True):
        assert set(after.latency_ms) == {"torch-1t", "torch-2t"}
        assert after.latency_ms["torch-2t"] > 0
        assert after.latency_ms["torch-1t"] == before.latency_ms["torch-1t"]
        assert after.accuracy_drop == before.accuracy_drop
        assert (after.params, after.macs, after.memory_bytes) == (
            before.params,
            before.macs,
            before.memory_bytes,
        )
    assert extended.teacher_accuracy == profiles.teacher_accuracy


def test_onnxruntime_target_adds_up_to_the_teacher(bank):
    _, d, families, _, profiles = bank
    copy = BankProfile.from_dict(profiles.to_dict())
    extended = add_target(copy, d, families, Target("onnxruntime"), FAST, progress=False)
    assert set(extended.targets) == {"torch-1t", "ort-1t"}
    assert extended.targets["ort-1t"]["backend"] == "onnxruntime"
    frame = extended.frame.latency_ms["ort-1t"]
    blocks = [[p.latency_ms["ort-1t"] for p in fam] for fam in extended.descendants]
    assert frame >= 0 and all(ms >= 0 for fam in blocks for ms in fam)
    assert any(ms > 0 for fam in blocks for ms in fam)
    teacher = estimate(extended, [0] * d.plan.num_blocks, "ort-1t")["latency_ms"]
    assert teacher == pytest.approx(frame + sum(fam[0] for fam in blocks))
    # latencies of other targets and every other figure are left as they were
    for before, after in zip(profiles.descendants, extended.descendants, strict=True):
        for p, q in zip(before, after, strict=True):
            assert q.latency_ms["torch-1t"] == p.latency_ms["torch-1t"]
            assert (q.accuracy_drop, q.macs) == (p.accuracy_drop, p.macs)


def test_an_int8_target_times_every_descendant(bank):
    _, d, families, _, profiles = bank
    copy = BankProfile.from_dict(profiles.to_dict())
    extended = add_target(copy, d, families, Target.parse("ortq-1t"), FAST, progress=False)
    assert extended.targets["ortq-1t"]["backend"] == "onnxruntime-int8"
    assert extended.frame.latency_ms["ortq-1t"] >= 0
    blocks = [p.latency_ms["ortq-1t"] for fam in extended.descendants for p in fam]
    assert len(blocks) == sum(len(f) for f in families)
    assert all(ms >= 0 for ms in blocks) and any(ms > 0 for ms in blocks)


@pytest.mark.parametrize("name", ["torch-1t", "ort-1t"])
def test_time_descendants_times_exactly_the_descendants_asked_for(bank, name):
    _, d, families, _, _ = bank
    only = {(0, 1), (1, 0), (1, 2)}
    frame, latency = time_descendants(
        d, families, Target.parse(name), FAST, only=only, frame=False, progress=False
    )
    assert frame is None and set(latency) == only
    assert all(ms >= 0 for ms in latency.values())
    frame, latency = time_descendants(
        d, families, Target.parse(name), FAST, only={(0, 2)}, progress=False
    )
    assert frame is not None and frame >= 0 and set(latency) == {(0, 2)}
    with pytest.raises(ConfigError, match=r"no descendants \[\(9, 0\)\]"):
        time_descendants(d, families, Target(), FAST, only={(9, 0)}, progress=False)


def test_validate_on_onnxruntime_times_selections_against_the_teacher(bank):
    _, d, families, data, profiles = bank
    copy = BankProfile.from_dict(profiles.to_dict())
    extended = add_target(copy, d, families, Target("onnxruntime"), FAST, progress=False)
    result = validate(
        extended, d, families, data, Target("onnxruntime"), samples=3, config=FAST, progress=False
    )
    assert result["target"] == "ort-1t" and len(result["records"]) == 3
    for record in result["records"]:
        assert record["measured_latency_ms"] > 0 and record["measured_latency_ratio"] > 0
        assert record["estimated_latency_ratio"] > 0


def test_bank_profile_round_trip(bank):
    *_, profiles = bank
    data = json.loads(json.dumps(profiles.to_dict()))
    assert BankProfile.from_dict(data) == profiles
    with_validation = BankProfile.from_dict(data)
    with_validation.validation["torch-1t"] = {"accuracy_spearman": float("nan"), "samples": 2}
    text = json.dumps(with_validation.to_dict())
    assert json.dumps(BankProfile.from_dict(json.loads(text)).to_dict()) == text


# -- rank correlation ------------------------------------------------------------------------------


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 3, -1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 8, 27]) == pytest.approx(1.0)  # monotone, not linear
    # ties take the average rank: [0, 1.5, 1.5, 3] against [0, 1, 2, 3]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _reference_ranks(values):
    return [sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]


def _reference_spearman(a, b):
    ra, rb = _reference_ranks(a), _reference_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-4, 4), st.floats(-1e3, 1e3, allow_nan=False)),
        min_size=2,
        max_size=25,
    )
)
def test_spearman_matches_a_reference(pairs):
    a = [float(x) for x, _ in pairs]  # few distinct values: many ties
    b = [y for _, y in pairs]
    expected = _reference_spearman(a, b)
    got = spearman(a, b)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-9)
        assert spearman(b, a) == pytest.approx(expected, abs=1e-9)


def test_drop_correction_recovers_a_compounding_curve():
    from blockscale.profile import DropCorrection

    summed = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]
    measured = [0.8 * s + 1.5 * s * s for s in summed]
    fit = DropCorrection.fit(summed, measured, upper=0.3)
    assert fit.linear == pytest.approx(0.8) and fit.quadratic == pytest.approx(1.5)
    assert fit(0.25) == pytest.approx(0.8 * 0.25 + 1.5 * 0.0625)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.05, 1.0), st.floats(-0.05, 1.0)), min_size=0, max_size=12))
def test_drop_correction_is_always_increasing(points):
    from blockscale.profile import DropCorrection

    fit = DropCorrection.fit([p[0] for p in points], [p[1] for p in points], upper=1.0)
    grid = np.linspace(-0.05, 1.0, 50)
    values = [fit(x) for x in grid]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


@settings(max_examples=60, deadline=None)
@given(
    offset=st.floats(-0.5, 0.5),
    scale=st.floats(0.2, 3.0),
    ratios=st.lists(st.floats(0.1, 1.5), min_size=2, max_size=20, unique=True),
    teacher_ms=st.floats(0.05, 50.0),
)
def test_latency_correction_recovers_an_affine_map(offset, scale, ratios, teacher_ms):
    from blockscale.profile import LatencyCorrection

    assume(offset >= -scale * 0.5)  # the frame, half the teacher, maps to no less than 0
    measured = [offset + scale * r for r in ratios]
    fit = LatencyCorrection.fit(ratios, measured, teacher_ms, frame_ms=0.5 * teacher_ms)
    assert fit.scale == pytest.approx(scale, rel=1e-6, abs=1e-6)
    assert fit.offset_ms == pytest.approx(offset * teacher_ms, rel=1e-6, abs=1e-6 * teacher_ms)
    # in ms: a selection summed at r times the teacher's sum measures offset + scale * r times it
    assert fit(0.7 * teacher_ms) / teacher_ms == pytest.approx(offset + scale * 0.7, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 1.5), st.floats(0.1, 1.5)), min_size=0, max_size=12))
def test_latency_correction_is_always_increasing(points):
    from blockscale.profile import LatencyCorrection

    fit = LatencyCorrection.fit([p[0] for p in points], [p[1] for p in points], 2.0, 0.1)
    assert fit.scale > 0
    assert fit(0.1) >= -1e-12  # the frame's corrected latency is never negative
    if len({p[0] for p in points}) < 2:
        assert fit == LatencyCorrection()


def test_latency_correction_that_would_push_the_frame_below_zero_is_the_constrained_optimum():
    from blockscale.profile import LatencyCorrection

    ratios = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    measured = [1.3 * r - 0.3 for r in ratios]  # the plain fit maps a frame of 0.1 to -0.17
    fit = LatencyCorrection.fit(ratios, measured, teacher_ms=2.0, frame_ms=0.2)
    assert fit(0.2) == pytest.approx(0.0, abs=1e-12)

    def loss(scale: float) -> float:  # squared error in ratio space, the frame mapped to 0
        return sum((scale * (r - 0.1) - m) ** 2 for r, m in zip(ratios, measured, strict=True))

    grid = np.linspace(0.5, 2.0, 3001)
    assert loss(fit.scale) <= min(loss(g) for g in grid) + 1e-12


def test_latency_correction_leave_one_out_on_affine_data():
    from blockscale.profile import corrected_latency_errors

    records = [
        {"estimated_latency_ratio": r, "measured_latency_ratio": 1.2 * r - 0.15}
        for r in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    ]
    result = corrected_latency_errors(records, teacher_ms=2.0, frame_ms=1.0)
    assert result["corrected_latency_mape_percent"] == pytest.approx(0.0, abs=1e-9)
    assert result["corrected_latency_spearman"] == pytest.approx(1.0)
    fix = result["latency_correction"]
    assert {k: fix[k] for k in ("offset_ms", "scale")} == pytest.approx(
        {"offset_ms": -0.3, "scale": 1.2}
    )
    assert fix["residuals"] == pytest.approx([1.0] * 6)  # every held-out one predicted exactly
    plain = [(1.2 * r - 0.15) / r for r in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert result["plain_latency_residuals"] == pytest.approx(plain)


@settings(max_examples=80, deadline=None)
@given(
    residuals=st.lists(st.floats(0.5, 2.0), min_size=1, max_size=60),
    confidence=st.floats(0.01, 0.99),
)
def test_the_headroom_covers_the_confidence_of_the_residuals(residuals, confidence):
    from blockscale.profile import LatencyCorrection

    margin = LatencyCorrection(residuals=residuals).headroom(confidence)
    assert margin >= 1.0
    assert margin == 1.0 or margin in residuals  # rounded up to a residual, never interpolated
    # an estimate raised by the margin covers at least that share of what was measured
    assert sum(r <= margin for r in residuals) >= confidence * len(residuals) - 1e-9
    # and no smaller margin above 1 does
    below = [r for r in residuals if 1.0 < r < margin]
    assert all(sum(x <= r for x in residuals) < confidence * len(residuals) for r in below)


def test_a_headroom_needs_residuals_and_a_confidence_in_range():
    from blockscale.profile import LatencyCorrection

    with pytest.raises(ProfileError, match="no measured selections"):
        LatencyCorrection().headroom(0.95)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="confidence"):
            LatencyCorrection(residuals=(1.1,)).headroom(bad)
    fix = LatencyCorrection(0.1, 1.2, [1.05, 1.2])
    assert LatencyCorrection(**json.loads(json.dumps(fix.to_dict()))) == fix


def _between(values) -> float:
    """Midway between the two middle distinct values: a budget no selection sits on, so the
    float32 cost table and a float64 brute force agree on what fits."""
    ordered = sorted(set(values))
    middle = len(ordered) // 2
    return (ordered[middle - 1] + ordered[middle]) / 2


def test_latency_correction_maps_estimates_and_selection(bank, tmp_path):
    from blockscale.profile import LatencyCorrection

    _, d, families, _, profiles = bank
    name = next(iter(profiles.targets))
    fix = LatencyCorrection(offset_ms=0.01, scale=1.3)
    corrected = dataclasses.replace(profiles, latency_corrections={name: fix})
    every = list(itertools.product(*(range(len(f)) for f in families)))
    for choices in every:
        plain = estimate(profiles, choices, name)
        assert estimate(corrected, choices, name)["latency_ms"] == pytest.approx(
            fix(plain["latency_ms"])
        )
    restored = BankProfile.from_dict(json.loads(json.dumps(corrected.to_dict())))
    assert restored.latency_corrections == {name: fix}
    # the bank selects on the corrected numbers: optimal among what fits them, by brute force
    opened = Bank.write(tmp_path / "bank", d, families, extra={"profiles": restored.to_dict()})
    budget = Budget(
        latency_ms=_between(fix(estimate(profiles, c, name)["latency_ms"]) for c in every)
    )
    pick = opened.select(budget)
    fits = [c for c in every if estimate(corrected, c, name)["latency_ms"] <= budget.latency_ms]
    expected = estimate(corrected, pick.choices, name)["latency_ms"]
    assert pick.latency_ms == pytest.approx(expected, rel=1e-5)  # the table holds float32
    assert pick.latency_ms <= budget.latency_ms + 1e-9
    assert pick.accuracy == pytest.approx(
        max(estimate(corrected, c, name)["accuracy"] for c in fits)
    )
    # a correction that would make a part negative is refused with the fix, not a bad table
    broken = LatencyCorrection(offset_ms=-1.0 - profiles.frame.latency_ms[name], scale=1.0)
    with pytest.raises(ProfileError, match="measure the target again"):
        dataclasses.replace(profiles, latency_corrections={name: broken}).latencies(name)
    # measuring the target again drops the correction fitted on its earlier latencies
    again = add_target(restored, d, families, Target.parse(name), FAST, progress=False)
    assert name not in again.latency_corrections and name not in again.validation


def test_corrected_errors_are_reported(bank):
    _, d, families, val_set, profiles = bank
    result = validate(
        profiles, d, families, val_set, Target(), samples=5, seed=1, config=FAST, progress=False
    )
    assert result["corrected_accuracy_mae_points"] >= 0
    assert set(result["correction"]) == {"linear", "quadratic"}
    assert result["corrected_latency_mape_percent"] >= 0
    assert set(result["latency_correction"]) == {"offset_ms", "scale", "residuals"}
    assert len(result["latency_correction"]["residuals"]) == 5
    assert len(result["plain_latency_residuals"]) == 5


def test_selection_at_a_confidence_meets_the_raised_estimate(bank, tmp_path):
    """Under a confidence, the exact pick among selections whose estimate times the margin fits
    (brute force), reported at its plain estimate; without validated selections, a named error."""
    from blockscale.profile import LatencyCorrection

    _, d, families, _, profiles = bank
    name = next(iter(profiles.targets))
    fix = LatencyCorrection(0.005, 1.1, [0.97, 1.02, 1.08, 1.15, 1.3])
    guarded = dataclasses.replace(profiles, latency_corrections={name: fix})
    margin = fix.headroom(0.75)
    assert margin == 1.15
    frame, latency = guarded.latencies(name, 0.75)
    plain_frame, plain = guarded.latencies(name)
    assert frame == pytest.approx(margin * plain_frame)
    assert np.allclose(latency, margin * np.array(plain))
    opened = Bank.write(tmp_path / "bank", d, families, extra={"profiles": guarded.to_dict()})
    every = list(itertools.product(*(range(len(f)) for f in families)))
    budget = Budget(
        latency_ms=margin * _between(estimate(guarded, c, name)["latency_ms"] for c in every)
    )
    pick = opened.select(budget, confidence=0.75)
    fits = [
        c for c in every if margin * estimate(guarded, c, name)["latency_ms"] <= budget.latency_ms
    ]
    assert pick.accuracy == pytest.approx(max(estimate(guarded, c, name)["accuracy"] for c in fits))
    assert pick.latency_ms == pytest.approx(
        estimate(guarded, pick.choices, name)["latency_ms"], rel=1e-5
    )
    assert opened.select(budget).accuracy >= pick.accuracy
    frontier = opened.frontier(confidence=0.75)
    assert min(p.latency_ms for p in frontier) == pytest.approx(
        margin * min(estimate(guarded, c, name)["latency_ms"] for c in every), rel=1e-5
    )
    with pytest.raises(ProfileError, match="no validated selections"):
        profiles.latencies(name, 0.95)


def test_a_bank_without_residuals_draws_its_margin_from_its_stored_selections(bank):
    from blockscale.profile import LatencyCorrection, kept_latency_estimate, refit_latency_estimate

    _, d, families, val_set, profiles = bank
    target = Target()
    check = validate(
        profiles, d, families, val_set, target, samples=6, seed=2, config=FAST, progress=False
    )
    kept = kept_latency_estimate(check)
    assert len(kept.residuals) == 6
    # as a bank written before residuals were kept stored it: the map alone, if one was fitted
    fitted = (kept.offset_ms, kept.scale) != (0.0, 1.0)
    before = dataclasses.replace(
        profiles,
        validation={target.name: check},
        latency_corrections={target.name: LatencyCorrection(kept.offset_ms, kept.scale)}
        if fitted
        else {},
    )
    again = refit_latency_estimate(before, target.name)
    assert again.offset_ms == pytest.approx(kept.offset_ms)
    assert again.scale == pytest.approx(kept.scale)
    assert again.residuals == pytest.approx(kept.residuals)
    frame_ms, _ = before.latencies(target.name, 0.9)
    plain_frame = profiles.frame.latency_ms[target.name]
    assert frame_ms == pytest.approx(kept.headroom(0.9) * kept(plain_frame))


def test_logit_costs_compound_and_stay_additive(bank):
    _, _, _, _, profiles = bank
    logit = dataclasses.replace(profiles, combine="logit", correction=None)
    t = logit.teacher_accuracy
    assert logit.cost(0.0) == 0.0
    # two drops of 10 points each in log-odds: more than 20 points together
    two = 2 * logit.cost(0.1)
    assert logit.accuracy(two) < t - 0.2 + 1e-9 or t < 0.3
    assert logit.accuracy(logit.cost(0.1)) == pytest.approx(t - 0.1)
    assert logit.cost_of(logit.accuracy(0.37)) == pytest.approx(0.37)
    assert _link("logit", None)[0](0.5) == 0.0
    plain = dataclasses.replace(profiles, combine="sum", correction=None)
    assert plain.accuracy(plain.cost(0.05) * 2) == pytest.approx(max(0.0, t - 0.1))


@pytest.mark.parametrize(
    ("combine", "gamma"), [("sum", None), ("logit", None), *(("fitted", g) for g in GAMMAS)]
)
def test_every_link_is_increasing_and_inverts(combine, gamma):
    h, inverse = _link(combine, gamma)
    accuracies = np.linspace(0.05, 0.95, 19)
    values = h(accuracies)
    assert np.all(np.diff(values) > 0)
    np.testing.assert_allclose(inverse(values), accuracies, atol=1e-9)


def _noisy_logits(seed, blocks=2, levels=3, images=2000, classes=5):
    """A teacher's logits and, per block, descendants that add ever more noise to them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    teacher = rng.normal(0, 1, (images, classes)).astype(np.float32)
    teacher[np.arange(images), labels] += 2.5
    logits = [
        [None] + [teacher + rng.normal(0, 0.3 * d, teacher.shape) for d in range(1, levels)]
        for _ in range(blocks)
    ]
    return teacher, logits, labels


def test_the_per_image_model_adds_each_descendants_change_to_the_logits():
    teacher, logits, labels = _noisy_logits(0)
    choices = np.array(list(itertools.product(range(3), repeat=2)))
    predicted = predict_selections(teacher, logits, labels, choices)
    for picks, value in zip(choices, predicted, strict=True):
        z = teacher.astype(np.float64)
        for b, d in enumerate(picks):
            if d:
                z = z + logits[b][d] - teacher
        assert value == pytest.approx((z.argmax(1) == labels).mean(), abs=1e-3)
    assert predicted[0] == (teacher.argmax(1) == labels).mean()  # (0, 0): the teacher


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(GAMMAS), st.integers(0, 2**31))
def test_an_exactly_additive_accuracy_is_recovered_with_its_link(gamma, seed):
    rng = np.random.default_rng(seed)
    fixed = [[True, False, False, False] for _ in range(4)]
    truth = [[0.0, *sorted(rng.uniform(0.01, 0.4, 3))] for _ in fixed]
    choices = rng.integers(0, 4, (400, 4))
    h, inverse = _link("fitted", gamma)
    teacher = 0.92
    accuracies = inverse(h(teacher) - np.array([sum(truth[b][d] for b, d in enumerate(c))
                                                for c in choices]))  # fmt: skip
    found, costs, errors = fit_additive(choices, accuracies, teacher, fixed)
    assert found == gamma and errors[gamma] < 1e-9
    np.testing.assert_allclose(costs, truth, atol=1e-7)


def test_a_descendant_that_changes_nothing_costs_little():
    teacher, logits, labels = _noisy_logits(2)
    logits[1][1] = teacher.copy()
    gamma, costs, errors = fit_interactions(teacher, logits, labels, selections=400)
    assert gamma in GAMMAS and errors[gamma] == min(errors.values())
    assert all(c[0] == 0.0 for c in costs) and all(v >= 0 for c in costs for v in c)
    # least squares spreads what the links cannot follow over every column: little, not nothing
    assert costs[1][1] < 0.1 * costs[1][2] and costs[1][1] < 0.2 * costs[0][1]


def test_block_weights_recover_blocks_that_lose_more_among_others(bank):
    _, _, _, _, profiles = bank
    plain = dataclasses.replace(profiles, combine="logit", correction=None, block_weights=None)
    base = plain.base_costs()
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 1.5, len(base))
    records = []
    for _ in range(60):
        choices = [int(rng.integers(len(f))) for f in base]
        summed = sum(w * base[b][d] for b, (w, d) in enumerate(zip(truth, choices, strict=True)))
        records.append({"choices": choices, "measured_accuracy": plain.accuracy(summed)})
    weights = fit_block_weights(records, plain)
    np.testing.assert_allclose(weights, truth, atol=0.05)
    report = weighted_accuracy_errors(records, plain)
    assert report["weighted_accuracy_mae_points"] < 0.1
    weighted = dataclasses.replace(plain, block_weights=weights)
    assert weighted.costs()[0][1] == pytest.approx(weights[0] * base[0][1])


def _pareto(points):
    """The (cost, latency) pairs no other pair beats in both, by brute force."""
    return {p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)}


@pytest.mark.parametrize("count", [1, 2, 3, 100])
def test_frontier_choices_lie_on_the_pareto_frontier_and_spread_along_it(bank, count):
    _, _, families, _, profiles = bank
    costs = profiles.costs()

    def point(choices):
        return (
            round(sum(costs[b][d] for b, d in enumerate(choices)), 6),
            round(estimate(profiles, list(choices), "torch-1t")["latency_ms"], 6),
        )

    every = {point(c) for c in itertools.product(*(range(len(f)) for f in families))}
    best = _pareto(every)
    picked = frontier_choices(profiles, "torch-1t", count)
    assert len(picked) == min(count, len(best))
    assert {point(c) for c in picked} <= best
    if count >= len(best):
        assert {point(c) for c in picked} == best
    if count > 1:  # both ends: the fastest and the most accurate
        latencies = [point(c)[1] for c in picked]
        assert min(latencies) == min(p[1] for p in best)
        assert max(latencies) == max(p[1] for p in best)


def test_validate_measures_the_frontier_and_draws_the_margin_from_it(bank):
    _, d, families, val_set, profiles = bank
    check = validate(
        profiles, d, families, val_set, Target(), samples=5, frontier=3, config=FAST, progress=False
    )
    assert check["samples"] == len(check["records"]) == 5  # the random ones alone
    at = check["frontier"]
    assert at["samples"] == len(at["records"]) == len(at["latency_residuals"]) == 3
    without = {k: v for k, v in check.items() if k != "frontier"}
    # the frontier of the estimate as selection will use it: with the accuracy correction kept
    kept_accuracy = kept_accuracy_estimate(profiles, without)
    assert [r["choices"] for r in at["records"]] == frontier_choices(kept_accuracy, "torch-1t", 3)
    kept_est = [
        estimate(kept_accuracy, r["choices"], "torch-1t")["accuracy"] for r in at["records"]
    ]
    assert [r["kept_estimated_accuracy"] for r in at["records"]] == kept_est
    assert at["accuracy_overestimate_points"] == pytest.approx(
        100
        * np.mean(
            [e - r["measured_accuracy"] for e, r in zip(kept_est, at["records"], strict=True)]
        )
    )
    random_kept = kept_latency_estimate(without)
    teacher_ms = estimate(profiles, [0, 0], "torch-1t")["latency_ms"]
    for record, residual in zip(at["records"], at["latency_residuals"], strict=True):
        corrected = random_kept(record["estimated_latency_ms"]) / teacher_ms
        assert residual == pytest.approx(record["measured_latency_ratio"] / corrected)
        assert "measured_accuracy" in record
    kept = kept_latency_estimate(check)
    assert (kept.offset_ms, kept.scale) == (random_kept.offset_ms, random_kept.scale)
    assert kept.residuals == tuple(at["latency_residuals"])
    assert len(random_kept.residuals) == 5
    # a bank that kept the map alone gets the same margin back from its stored selections
    before = dataclasses.replace(
        profiles,
        validation={"torch-1t": check},
        latency_corrections={"torch-1t": LatencyCorrection(kept.offset_ms, kept.scale)},
    )
    assert refit_latency_estimate(before, "torch-1t").residuals == pytest.approx(kept.residuals)


def test_validate_rejects_a_negative_frontier(bank):
    _, d, families, val_set, profiles = bank
    with pytest.raises(ConfigError, match="frontier"):
        validate(profiles, d, families, val_set, Target(), frontier=-1, progress=False)


@pytest.mark.parametrize("combine", ["fitted", "sum"])
@pytest.mark.parametrize("helped", [True, False])
def test_the_accuracy_correction_is_kept_only_when_it_helped(bank, combine, helped):
    *_, profiles = bank
    plain = dataclasses.replace(profiles, combine=combine, block_weights=None, correction=None)
    check = {
        "accuracy_mae_points": 1.0,
        "weighted_accuracy_mae_points": 0.5 if helped else 1.5,
        "corrected_accuracy_mae_points": 0.5 if helped else 1.5,
        "block_weights": [0.5, 2.0],
        "correction": {"linear": 2.0, "quadratic": 0.1},
    }
    kept = kept_accuracy_estimate(plain, check)
    if not helped:
        assert kept is plain
    elif combine == "fitted":
        assert kept.block_weights == [0.5, 2.0] and kept.correction is None
    else:
        assert kept.correction == DropCorrection(2.0, 0.1) and kept.block_weights is None
    assert plain.block_weights is None and plain.correction is None  # not changed in place
