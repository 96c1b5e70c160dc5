import json

import pytest
import torch
from nets import calibrate_bn, tiny_resnet

import blockscale.pipeline as build_module
from blockscale.bank import Bank
from blockscale.data import load_dataset
from blockscale.derive import derive
from blockscale.errors import BankError
from blockscale.pipeline import BuildConfig, build
from blockscale.profile import GAMMAS, ProfileConfig
from blockscale.retrain import RetrainConfig
from blockscale.types import DeriveConfig

SPARSITIES = (0.0, 0.5)
CONFIG = BuildConfig(
    derive=DeriveConfig(sparsities=SPARSITIES, round_to=1),
    retrain=RetrainConfig(epochs=2, lr=1e-2, batch_size=32, cache="memory"),
    profile=ProfileConfig(warmup=1, repeats=2, batch_size=64),
    retrain_samples=128,
    profile_samples=32,
    validate_samples=2,
    validate_frontier=2,
)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "train", n=160, num_classes=4, in_channels=1, size=8)


def _teacher(data):
    return calibrate_bn(tiny_resnet(), data)


def _build(data, out, config=CONFIG, **kwargs):
    logs = []
    bank = build(_teacher(data), data, out, config, progress=False, log=logs.append, **kwargs)
    return bank, logs


def _work(out):
    return out.with_name(f"{out.name}.build")


def _weights(bank):
    return {
        (d.info.block, d.info.index): d.module.state_dict()
        for family in bank.load_descendants()
        for d in family
    }


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].keys() == wb[key].keys()
        assert all(torch.equal(wa[key][k], wb[key][k]) for k in wa[key]), key


def _fail(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} must not run")

    return fail


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted build."""
    out = tmp_path_factory.mktemp("reference") / "bank"
    bank, logs = _build(data, out)
    return out, bank, logs


def test_full_build_writes_a_profiled_bank(data, reference):
    out, _, logs = reference
    opened = Bank.open(out)
    assert opened.plan.num_blocks == 2
    assert opened.derive_config.sparsities == SPARSITIES
    profiles = opened.profile
    assert [len(f) for f in profiles.descendants] == [2, 2]
    assert all(p.latency_ms["ort-1t"] >= 0 for f in profiles.descendants for p in f)
    assert [f[0].accuracy_drop for f in profiles.descendants] == [0.0, 0.0]
    assert profiles.val_samples == 32
    assert profiles.validation["ort-1t"]["samples"] == 2
    # the default estimate: costs fitted to the per-image interaction model, never negative
    assert profiles.combine == "fitted" and profiles.gamma in GAMMAS
    assert [len(f) for f in profiles.fitted_costs] == [2, 2]
    assert all(f[0] == 0.0 and f[1] >= 0.0 for f in profiles.fitted_costs)
    check = profiles.validation["ort-1t"]
    helped = check["weighted_accuracy_mae_points"] < check["accuracy_mae_points"]
    assert (
        (profiles.block_weights == check["block_weights"])
        if helped
        else (profiles.block_weights is None and profiles.costs() == profiles.base_costs())
    )
    # the latency correction likewise, kept only when it beat the plain sum out of sample;
    # either way with the residuals of the frontier selections measured after the random ones,
    # which a confidence draws its margin on
    fitted = check["corrected_latency_mape_percent"] < check["relative_latency_mape_percent"]
    kept = profiles.latency_corrections["ort-1t"]
    if fitted:
        fix = check["latency_correction"]
        assert (kept.offset_ms, kept.scale) == (fix["offset_ms"], fix["scale"])
    else:
        assert (kept.offset_ms, kept.scale) == (0.0, 1.0)
    assert 1 <= check["frontier"]["samples"] <= 2  # the frontier may be shorter
    assert list(kept.residuals) == check["frontier"]["latency_residuals"]
    assert kept.headroom(0.95) >= 1.0
    report = opened.manifest["retrain"]
    assert report["samples"] == 128 and report["cache"] == "memory"
    assert len(report["val_mse_after"]) == 2
    assert all(
        after <= before
        for f_after, f_before in zip(report["val_mse_after"], report["val_mse_before"], strict=True)
        for after, before in zip(f_after, f_before, strict=True)
    )
    assert set(opened.manifest["timings"]) == {"extract_derive", "retrain", "profile", "validate"}
    assert BuildConfig.from_dict(opened.manifest["build"]) == CONFIG
    assert not _work(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["bank"]
    assert logs[-1].startswith(f"bank written to {out}")
    assert not any("resuming" in line for line in logs)


def test_build_retrains_the_pruned_descendants(data, reference):
    _, bank, _ = reference
    d = build_module.extract(_teacher(data), torch.zeros(1, 1, 8, 8))
    fresh = derive(d, CONFIG.derive)
    stored = _weights(bank)
    for family in fresh:
        for desc in family:
            state = desc.module.state_dict()
            same = all(
                torch.equal(state[k], stored[desc.info.block, desc.info.index][k]) for k in state
            )
            assert same == (desc.info.sparsity == 0)


def test_resume_after_a_failed_profile(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    monkeypatch.setattr(build_module, "profile", _fail("profile"))
    with pytest.raises(RuntimeError, match="profile must not run"):
        _build(data, out)
    assert (_work(out) / "retrained").is_dir()
    assert Bank.open(_work(out) / "retrained").manifest["retrain"]["samples"] == 128
    assert not out.exists()

    monkeypatch.undo()
    for stage in ("extract", "derive", "retrain"):
        monkeypatch.setattr(build_module, stage, _fail(stage))
    bank, logs = _build(data, out)
    assert f"resuming from {_work(out) / 'retrained'}" in logs
    assert not _work(out).exists()
    _assert_same_weights(bank, reference[1])
    resumed, original = Bank.open(out), Bank.open(reference[0])
    for key in ("val_mse_before", "val_mse_after", "history", "best_epoch"):
        assert resumed.manifest["retrain"][key] == original.manifest["retrain"][key]
    drops = [[p.accuracy_drop for p in f] for f in resumed.profile.descendants]
    assert drops == [[p.accuracy_drop for p in f] for f in original.profile.descendants]


def test_resume_after_a_failed_retrain(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    monkeypatch.setattr(build_module, "retrain", _fail("retrain"))
    with pytest.raises(RuntimeError, match="retrain must not run"):
        _build(data, out)
    assert (_work(out) / "derived").is_dir()
    assert not (_work(out) / "retrained").exists()
    assert not out.exists()

    monkeypatch.undo()
    monkeypatch.setattr(build_module, "extract", _fail("extract"))
    monkeypatch.setattr(build_module, "derive", _fail("derive"))
    bank, logs = _build(data, out)
    assert f"resuming from {_work(out) / 'derived'}" in logs
    assert not _work(out).exists()
    _assert_same_weights(bank, reference[1])


def test_a_changed_config_does_not_resume_a_stale_stage(data, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    monkeypatch.setattr(build_module, "profile", _fail("profile"))
    with pytest.raises(RuntimeError):
        _build(data, out)
    assert (_work(out) / "retrained").is_dir()
    monkeypatch.undo()

    calls = []
    original = build_module.retrain

    def spy(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "retrain", spy)
    changed = BuildConfig(
        **{**vars(CONFIG), "retrain": RetrainConfig(**{**CONFIG.retrain.to_dict(), "epochs": 1})}
    )
    _, logs = _build(data, out, changed)
    assert calls == [changed.retrain]
    assert not any("resuming" in line for line in logs)
    manifest = Bank.open(out).manifest
    assert manifest["build"] == json.loads(json.dumps(changed.to_dict()))
    assert all(len(h) == 1 for f in manifest["retrain"]["history"] for h in f[1:])
    assert not _work(out).exists()


def test_an_existing_output_is_kept_unless_overwritten(data, tmp_path):
    out = tmp_path / "bank"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BankError, match="already exists"):
        _build(data, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert not _work(out).exists()

    with pytest.raises(BankError, match="not a bank"):
        _build(data, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"

    (out / "keep.txt").unlink()
    quick = BuildConfig(**{**vars(CONFIG), "validate_samples": 0})
    _build(data, out, overwrite=True)
    bank, _ = _build(data, out, quick, overwrite=True)
    assert Bank.open(out).profile.validation == {}
    assert "validate" not in bank.manifest["timings"]


@pytest.mark.parametrize("combine", ["sum", "logit", "fitted"])
def test_bank_select_is_the_best_estimate_within_budget(reference, tmp_path, combine):
    import itertools
    import shutil

    from blockscale.errors import InfeasibleBudgetError
    from blockscale.profile import estimate
    from blockscale.types import Budget

    _, bank, _ = reference
    copy = tmp_path / "bank"
    shutil.copytree(bank.path, copy)
    opened = Bank.open(copy)
    profiles = opened.profile
    profiles.combine = combine
    opened.update(profiles=profiles.to_dict())
    target = opened.target()
    every = [
        (choices, estimate(profiles, choices, target))
        for choices in itertools.product(*(range(len(f)) for f in opened.descendants))
    ]
    latencies = sorted({e["latency_ms"] for _, e in every})
    budgets = [(a + b) / 2 for a, b in itertools.pairwise(latencies)]
    for budget_ms in [latencies[0] / 2, *budgets[:: max(1, len(budgets) // 7)]]:
        fits = [e["accuracy"] for _, e in every if e["latency_ms"] <= budget_ms]
        try:
            chosen = opened.select(Budget(latency_ms=budget_ms), target)
        except InfeasibleBudgetError:
            assert not fits
            continue
        assert chosen.accuracy == pytest.approx(max(fits), abs=1e-6)
        assert opened.estimate(chosen.choices, target) == chosen


def test_another_teacher_does_not_resume_a_stale_stage(data, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    monkeypatch.setattr(build_module, "profile", _fail("profile"))
    with pytest.raises(RuntimeError):
        _build(data, out)
    monkeypatch.undo()
    other = calibrate_bn(tiny_resnet(seed=7), data)
    logs = []
    bank = build(other, data, out, CONFIG, progress=False, log=logs.append)
    assert not any("resuming" in line for line in logs)
    frame = bank.load_frame()
    expected = other.state_dict()
    rebuilt = {k: v for k, v in frame.state_dict().items() if k in expected}
    assert rebuilt and all(torch.equal(v, expected[k]) for k, v in rebuilt.items())


@pytest.mark.parametrize(
    "change",
    [
        {"combine": "Logit"},
        {"validate_samples": -1},
        {"validate_frontier": -1},
        {"profile_samples": 0},
        {"target": "cuda"},
    ],
)
def test_bad_build_settings_fail_before_any_work(change):
    from blockscale.errors import BlockscaleError

    with pytest.raises(BlockscaleError):
        BuildConfig(**{**vars(CONFIG), **change})


def test_a_build_config_stored_before_frontier_validation_reads_as_without_it():
    stored = json.loads(json.dumps(CONFIG.to_dict()))
    del stored["validate_frontier"]
    assert BuildConfig.from_dict(stored) == BuildConfig(**{**vars(CONFIG), "validate_frontier": 0})
