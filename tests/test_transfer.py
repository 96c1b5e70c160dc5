import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import tiny_resnet

from blockscale import transfer
from blockscale.bank import Bank
from blockscale.derive import derive
from blockscale.errors import ConfigError, ProfileError
from blockscale.extract import extract
from blockscale.profile import BankProfile, ProfileConfig, time_descendants
from blockscale.targets import BACKENDS, Target
from blockscale.transfer import (
    FEATURES,
    MIN_SLOPE,
    LatencyPredictor,
    ProxyCalibration,
    TargetSignature,
    calibrate,
    choose_samples,
    descendant_features,
    is_predicted,
    leave_one_target_out,
    predict_target,
    probe_keys,
    profile_rows,
)
from blockscale.types import Budget, DeriveConfig, Profile

FAST = ProfileConfig(warmup=1, repeats=3, rounds=1)


def _bank_profile(latency: dict[str, list[list[float]]], frame: dict[str, float]) -> BankProfile:
    """Profiles whose descendant (b, d) takes ``latency[target][b][d]`` ms on each target."""
    blocks = len(next(iter(latency.values())))
    sizes = [len(f) for f in next(iter(latency.values()))]

    def entry(b: int, d: int) -> Profile:
        times = {t: ms[b][d] for t, ms in latency.items()}
        return Profile(b, d, 0.01 * d, 100, 1000, 400, 256, times)

    return BankProfile(
        teacher_accuracy=0.9,
        frame=Profile(-1, 0, 0.0, 10, 10, 10, 10, dict(frame)),
        descendants=[[entry(b, d) for d in range(sizes[b])] for b in range(blocks)],
        targets={t: Target.parse(t).to_dict() for t in latency},
    )


# -- the proxy calibration -----------------------------------------------------------------------


def test_calibration_recovers_a_log_linear_law_from_noiseless_samples():
    proxy = [0.2, 0.5, 1.0, 3.0, 7.5]
    target = [math.exp(0.3) * p**0.8 for p in proxy]
    fit = ProxyCalibration.fit(proxy, target)
    assert (fit.intercept, fit.slope, fit.samples) == pytest.approx((0.3, 0.8, 5), abs=1e-9)
    assert fit.predict(2.0) == pytest.approx(math.exp(0.3) * 2.0**0.8)
    assert fit.predict(np.array([1.0, 4.0])) == pytest.approx(
        [math.exp(0.3), math.exp(0.3) * 4.0**0.8]
    )
    assert ProxyCalibration.from_dict(fit.to_dict()) == fit


def test_calibration_without_samples_is_the_identity_and_with_one_a_shift():
    assert ProxyCalibration.fit([], []) == ProxyCalibration(0.0, 1.0, 0)
    assert ProxyCalibration.fit([], []).predict(3.5) == pytest.approx(3.5)
    one = ProxyCalibration.fit([2.0], [6.0])
    assert one.slope == 1.0 and one.samples == 1
    assert one.predict(1.0) == pytest.approx(3.0)
    same = ProxyCalibration.fit([2.0, 2.0], [4.0, 16.0])  # one proxy latency: shift only
    assert same.slope == 1.0 and same.predict(2.0) == pytest.approx(8.0)
    with pytest.raises(ConfigError, match="2 proxy latencies against 1"):
        ProxyCalibration.fit([1.0, 2.0], [1.0])


def test_calibration_leaves_out_latencies_clipped_to_zero():
    fit = ProxyCalibration.fit([1.0, 2.0, 4.0, 3.0], [2.0, 4.0, 8.0, 0.0])
    assert (fit.slope, fit.samples) == pytest.approx((1.0, 3))
    assert fit.predict(3.0) == pytest.approx(6.0)
    assert ProxyCalibration.fit([0.0], [1.0]) == ProxyCalibration()


def test_a_decreasing_law_is_clamped_to_the_least_slope():
    fit = ProxyCalibration.fit([1.0, 2.0, 4.0], [4.0, 2.0, 1.0])
    assert fit.slope == MIN_SLOPE
    assert fit.predict(1.0) < fit.predict(4.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3)), min_size=0, max_size=12),
    st.lists(st.floats(0.0, 1e4), min_size=2, max_size=20),
)
def test_calibration_never_inverts_the_proxy_ranking(samples, queries):
    fit = ProxyCalibration.fit([p for p, _ in samples], [t for _, t in samples])
    queries = sorted(queries)
    predicted = fit.predict(np.asarray(queries))
    assert np.all(np.diff(predicted) >= 0)
    assert fit.slope >= MIN_SLOPE


def test_predict_target_keeps_the_sampled_values_and_follows_the_law():
    proxy = {(0, d): 1.0 + d for d in range(4)} | {(1, d): 0.5 * (1 + d) for d in range(4)}
    law = {k: 2.0 * ms**1.5 for k, ms in proxy.items()}
    sampled = {(0, 0): law[0, 0], (0, 3): law[0, 3], (1, 1): law[1, 1]}
    predicted = predict_target(proxy, sampled)
    assert set(predicted) == set(proxy)
    for key, ms in predicted.items():
        assert ms == pytest.approx(law[key])
    noisy = {**sampled, (1, 1): 99.0}
    assert predict_target(proxy, noisy)[1, 1] == 99.0
    assert predict_target(proxy, {}) == pytest.approx(proxy)
    with pytest.raises(ConfigError, match="no proxy latency"):
        predict_target(proxy, {(5, 0): 1.0})


def test_held_out_errors_are_those_of_fits_on_the_other_samples():
    proxy = {(0, d): 1.0 + d for d in range(5)}
    law = {k: 2.0 * ms**1.5 for k, ms in proxy.items()}
    assert transfer.held_out_errors(proxy, law) == pytest.approx([0.0] * 5, abs=1e-9)
    assert transfer.held_out_errors(proxy, {(0, 0): 1.0, (0, 1): 2.0}) == []  # two: a shift
    off = {**law, (0, 2): 3 * law[0, 2]}
    errors = transfer.held_out_errors(proxy, off)
    rest = [k for k in sorted(off) if k != (0, 2)]
    alone = ProxyCalibration.fit([proxy[k] for k in rest], [off[k] for k in rest])
    assert errors[2] == pytest.approx(alone.predict(proxy[0, 2]) / off[0, 2] - 1)
    assert errors[2] == pytest.approx(-2 / 3)  # fitted on the law, the tripled one is a third
    assert all(abs(e) > 0.1 for e in errors)  # and it spoils every fit it is in


def _ranked_like(ms: list[float], order: list[int]) -> list[float]:
    """``ms`` rearranged so that descendant ``order[i]`` takes the i-th smallest."""
    ranked = sorted(ms)
    out = [0.0] * len(ms)
    for rank, d in enumerate(order):
        out[d] = ranked[rank]
    return out


def test_the_chosen_proxy_is_the_target_that_predicts_the_samples_best():
    truth = [0.5, 0.9, 1.4, 2.2, 3.1, 4.0]  # on the new target, torch-2t
    latency = {
        "ort-1t": [_ranked_like([2 * v for v in truth], [0, 1, 2, 3, 4, 5])],  # same ranking
        "torch-1t": [_ranked_like(truth, [5, 1, 3, 0, 4, 2])],  # same backend, scrambled
        "ortq-1t": [[v**0.5 for v in truth]],
    }
    profiles = _bank_profile(latency, dict.fromkeys(latency, 1.0))
    profiles.targets["ortq-1t"]["predicted_from"] = "ort-1t"  # predicted: never a proxy
    sampled = {(0, d): truth[d] for d in range(6)}
    proxy, scores = transfer.choose_proxy(profiles, sampled, "torch-2t")
    assert proxy == "ort-1t" and set(scores) == {"ort-1t", "torch-1t"}
    assert scores["ort-1t"] == pytest.approx(0.0, abs=1e-9)
    assert scores["torch-1t"] > 10
    # too few samples to judge: the same backend, then the nearest thread count
    few = {(0, 0): truth[0], (0, 5): truth[5]}
    assert transfer.choose_proxy(profiles, few, "torch-2t") == (
        "torch-1t",
        {"ort-1t": None, "torch-1t": None},
    )
    assert transfer.choose_proxy(profiles, few, "ort-4t")[0] == "ort-1t"
    with pytest.raises(ProfileError, match="no measured target to predict ort-1t"):
        transfer.choose_proxy(_bank_profile({"ort-1t": [[1.0]]}, {"ort-1t": 1.0}), {}, "ort-1t")


def test_choose_samples_is_deterministic_distinct_and_spread():
    latency = {"torch-1t": [[float(10 * b + d) for d in range(5)] for b in range(4)]}
    profiles = _bank_profile(latency, {"torch-1t": 1.0})
    picks = choose_samples(profiles, "torch-1t", 4, seed=3)
    assert picks == choose_samples(profiles, "torch-1t", 4, seed=3)
    assert len(set(picks)) == 4
    # one from each quarter of the latency range (20 descendants, 5 a stratum)
    strata = sorted(latency["torch-1t"][b][d] // 10 for b, d in picks)
    assert strata == [0, 1, 2, 3]
    seeds = {tuple(choose_samples(profiles, "torch-1t", 4, seed=s)) for s in range(5)}
    assert len(seeds) > 1
    assert choose_samples(profiles, "torch-1t", 0) == []
    assert sorted(choose_samples(profiles, "torch-1t", 20)) == [
        (b, d) for b in range(4) for d in range(5)
    ]
    for bad in (-1, 21):
        with pytest.raises(ConfigError, match="between 0 and 20"):
            choose_samples(profiles, "torch-1t", bad)
    with pytest.raises(ProfileError, match="not profiled on the proxy 'ort-1t'"):
        choose_samples(profiles, "ort-1t", 2)


# -- the latency predictor -----------------------------------------------------------------------


# two targets a backend, so that every held-out target's backend is among the fitted ones (the
# one-hot of a backend never fitted carries no weight); per target an offset and a slope of the
# log latency in what a descendant is (a faster device gains more on the bigger descendants)
TARGETS = {
    "torch-1t": (0.0, 1.0),
    "torch-2t": (-0.5, 0.9),
    "ort-1t": (-0.8, 1.1),
    "ort-2t": (-1.2, 0.8),
    "ortq-1t": (-1.5, 1.2),
    "ortq-2t": (-1.9, 0.95),
}
PROBES = [(0, 0), (2, 0), (4, 0)]


def _synthetic(seed: int = 0):
    """Descendants whose log latency on target t is ``offset_t + slope_t * (law . features)``."""
    rng = np.random.default_rng(seed)
    blocks, per_block = 5, 8
    features = {
        (b, d): rng.uniform(0.0, 3.0, len(FEATURES))
        for b in range(blocks)
        for d in range(per_block)
    }
    law = rng.uniform(0.0, 0.4, len(FEATURES))
    latency = {
        t: [
            [float(np.exp(c + s * (features[b, d] @ law) - 2.0)) for d in range(per_block)]
            for b in range(blocks)
        ]
        for t, (c, s) in TARGETS.items()
    }
    return _bank_profile(latency, dict.fromkeys(TARGETS, 1.0)), features


def test_the_predictor_transfers_to_a_held_out_target():
    profiles, features = _synthetic()
    results = leave_one_target_out(profiles, features, list(TARGETS), probes=PROBES)
    assert set(results) == set(TARGETS)
    for held, result in results.items():
        assert result["mape_percent"] < 6.0, (held, result)
        assert result["spearman"] > 0.99, (held, result)
    assert np.mean([r["mape_percent"] for r in results.values()]) < 3.0
    with pytest.raises(ConfigError, match="at least two targets"):
        leave_one_target_out(profiles, features, ["torch-1t"], probes=PROBES)


def test_the_predictor_round_trips_and_needs_only_the_probes():
    profiles, features = _synthetic(1)
    rows = profile_rows(profiles, features, ["torch-1t", "ort-1t", "ortq-1t", "ortq-2t"], PROBES)
    assert len(rows) == 4 * len(features)
    fitted = LatencyPredictor.fit(rows)
    again = LatencyPredictor.from_dict(fitted.to_dict())
    assert again == fitted
    # a new target whose profiles hold nothing but its probe blocks' latency
    truth = {
        (p.block, p.index): p.latency_ms["torch-2t"] for fam in profiles.descendants for p in fam
    }
    for fam in profiles.descendants:
        for p in fam:
            if (p.block, p.index) not in PROBES:
                del p.latency_ms["torch-2t"]
    signature = TargetSignature.of(profiles, "torch-2t", PROBES)
    assert signature == TargetSignature.from_dict(signature.to_dict())
    assert (signature.backend, signature.threads) == ("torch", 2)
    assert signature.probe_ms == tuple(truth[k] for k in PROBES)
    predicted = again.predict(signature, features)
    assert set(predicted) == set(features)
    errors = [abs(predicted[k] - truth[k]) / truth[k] for k in features]
    assert max(errors) < 0.1
    with pytest.raises(ProfileError, match="probe blocks"):
        TargetSignature.of(profiles, "tflite-1t", PROBES)
    with pytest.raises(ConfigError, match="fitted on"):
        again.predict(TargetSignature.of(profiles, "torch-2t", [(0, 0)]), features)
    with pytest.raises(ConfigError, match="rows to fit"):
        LatencyPredictor.fit([])
    with pytest.raises(ProfileError, match="no latency on torch-2t"):
        profile_rows(profiles, features, ["torch-2t"], PROBES)
    profiles.targets["ort-2t"]["predicted_from"] = "ort-1t"
    with pytest.raises(ConfigError, match="ort-2t's latencies were predicted"):
        profile_rows(profiles, features, ["ort-1t", "ort-2t"], PROBES)


def test_a_target_signature_is_its_backend_threads_and_probe_latency():
    signature = TargetSignature("ortq-2t", "onnxruntime-int8", 2, (0.5, 2.0))
    x = signature.features()
    assert list(x[: len(BACKENDS)]) == [float(b == "onnxruntime-int8") for b in BACKENDS]
    assert x[len(BACKENDS) :] == pytest.approx([math.log(2), math.log(0.5), math.log(2.0)])


# -- a small bank ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A two-block bank with made-up latencies on torch-1t (3, 2, 1 ms by descendant)."""
    latency = {"torch-1t": [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]}
    profiles = _bank_profile(latency, {"torch-1t": 1.0})
    d = extract(tiny_resnet(), torch.zeros(1, 1, 8, 8))
    families = derive(d, DeriveConfig(sparsities=(0.0, 0.5, 0.75), round_to=1))
    path = tmp_path_factory.mktemp("transfer") / "bank"
    Bank.write(path, d, families, extra={"profiles": profiles.to_dict()})
    return path


def test_descendant_features_and_probes_of_a_bank(bank):
    opened = Bank.open(bank)
    features = descendant_features(opened)
    assert set(features) == {(b, d) for b in range(2) for d in range(3)}
    assert all(f.shape == (len(FEATURES),) and np.isfinite(f).all() for f in features.values())
    kept = [features[0, d][FEATURES.index("kept_channel_fraction")] for d in range(3)]
    assert kept[0] == 1.0 and kept[0] > kept[1] > kept[2]
    macs = features[0, 1][FEATURES.index("log_macs")]
    assert macs == pytest.approx(math.log1p(opened.profile.descendants[0][1].macs))
    channels = features[0, 0][FEATURES.index("log_input_channels")]
    assert channels == pytest.approx(math.log1p(opened.plan.blocks[0].input_shape[0]))
    elements = features[0, 0][FEATURES.index("log_input_elements")]
    assert elements == pytest.approx(math.log1p(int(np.prod(opened.plan.blocks[0].input_shape))))
    assert probe_keys(opened) == probe_keys(opened.profile) == [(0, 0), (1, 0)]
    five, _ = _synthetic()
    assert probe_keys(five) == [(0, 0), (2, 0), (4, 0)]


def test_a_signature_is_measured_on_the_probe_blocks_alone(bank, monkeypatch):
    asked = []

    def spy(*args, **kwargs):
        asked.append((kwargs["only"], kwargs["frame"]))
        return time_descendants(*args, **kwargs)

    monkeypatch.setattr(transfer, "time_descendants", spy)
    signature = TargetSignature.measure(Bank.open(bank), "torch-1t", config=FAST, progress=False)
    assert asked == [({(0, 0), (1, 0)}, False)]
    assert (signature.target, signature.backend, signature.threads) == ("torch-1t", "torch", 1)
    assert len(signature.probe_ms) == 2 and all(ms >= 0 for ms in signature.probe_ms)


def test_calibrate_fills_every_descendant_and_marks_the_target(bank, tmp_path):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")
    summary = calibrate(opened, "torch-1t", "torch-2t", samples=3, config=FAST, progress=False)
    assert (summary["measured"], summary["predicted"]) == (3, 3)
    assert summary["in_sample_mape_percent"] is not None
    profiles = Bank.open(tmp_path / "bank").profile
    assert is_predicted(profiles, "torch-2t") and not is_predicted(profiles, "torch-1t")
    record = profiles.targets["torch-2t"]
    assert (record["predicted_from"], record["samples"], record["threads"]) == ("torch-1t", 3, 2)
    assert ProxyCalibration.from_dict(record["fit"]).samples == 3
    everything = [profiles.frame, *(p for fam in profiles.descendants for p in fam)]
    assert all(p.latency_ms["torch-2t"] >= 0 for p in everything)
    big = sum(max(p.latency_ms["torch-2t"] for p in fam) for fam in profiles.descendants)
    budget = Budget(latency_ms=profiles.frame.latency_ms["torch-2t"] + big + 1.0)
    assert opened.select(budget, "torch-2t").choices == (0, 0)


def test_calibrate_with_selections_gives_the_target_a_margin(bank, tmp_path):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")
    calibrate(opened, "torch-1t", "torch-2t", 2, FAST, progress=False)
    with pytest.raises(ProfileError, match="no validated selections"):
        opened.select(Budget(latency_ms=1e3), "torch-2t", confidence=0.95)
    summary = calibrate(
        opened, "torch-1t", "torch-2t", 2, FAST, selections=4, overwrite=True, progress=False
    )
    check = opened.profile.validation["torch-2t"]
    assert check["samples"] == summary["selections"]["samples"] == 4
    assert "accuracy_mae_points" not in check  # latency alone: no images
    assert all(set(r) >= {"choices", "measured_latency_ratio"} for r in check["records"])
    kept = opened.profile.latency_corrections["torch-2t"]
    assert len(kept.residuals) == 4
    assert summary["selections"]["margin_at_0.95"] == kept.headroom(0.95) >= 1.0
    again = Bank.open(tmp_path / "bank")  # stored with the bank
    assert again.profile.latency_corrections["torch-2t"] == kept
    pick = again.select(Budget(latency_ms=1e3), "torch-2t", confidence=0.95)
    assert pick.choices == (0, 0)
    # with frontier selections as well, the margin is theirs
    summary = calibrate(
        again,
        "torch-1t",
        "torch-2t",
        2,
        FAST,
        selections=4,
        frontier=2,
        overwrite=True,
        progress=False,
    )
    at = again.profile.validation["torch-2t"]["frontier"]
    assert summary["selections"]["frontier"] == at["samples"] == len(at["records"])
    assert 1 <= at["samples"] <= 2  # the frontier may be shorter
    kept = again.profile.latency_corrections["torch-2t"]
    assert list(kept.residuals) == at["latency_residuals"]
    assert summary["selections"]["margin_at_0.95"] == kept.headroom(0.95)


def test_calibrate_frontier_needs_random_selections(bank, tmp_path):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")
    with pytest.raises(ConfigError, match="without random ones"):
        calibrate(opened, "torch-1t", "torch-2t", 2, FAST, frontier=2, progress=False)
    assert "torch-2t" not in Bank.open(tmp_path / "bank").profile.targets  # nothing written


def test_calibrate_without_timing_the_frame_predicts_it(bank, tmp_path):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")
    summary = calibrate(
        opened, "torch-1t", "ort-1t", samples=1, config=FAST, measure_frame=False, progress=False
    )
    fit = ProxyCalibration.from_dict(summary["fit"])
    assert fit.slope == 1.0 and summary["measured_frame"] is False
    assert opened.profile.frame.latency_ms["ort-1t"] == pytest.approx(fit.predict(1.0))


def test_calibrate_without_samples_keeps_the_proxy_numbers_and_times_nothing(
    bank, tmp_path, monkeypatch
):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")

    def refuse(*args, **kwargs):
        raise AssertionError("nothing should be timed")

    monkeypatch.setattr(transfer, "time_descendants", refuse)
    summary = calibrate(opened, "torch-1t", "ort-2t", 0, measure_frame=False, progress=False)
    assert (summary["measured"], summary["predicted"]) == (0, 6)
    assert summary["in_sample_mape_percent"] is None
    profiles = opened.profile
    for p in [profiles.frame, *(p for fam in profiles.descendants for p in fam)]:
        assert p.latency_ms["ort-2t"] == pytest.approx(p.latency_ms["torch-1t"])


def test_calibrate_without_a_proxy_chooses_one_and_records_its_held_out_error(bank, tmp_path):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")
    calibrate(opened, "torch-1t", "ort-1t", 0, measure_frame=False, progress=False)
    summary = calibrate(opened, None, "torch-2t", samples=4, config=FAST, progress=False)
    # ort-1t was predicted, so torch-1t is the one candidate; samples spread over it
    assert summary["proxy"] == "torch-1t" and set(summary["proxy_candidates"]) == {"torch-1t"}
    assert summary["held_out_mape_percent"] == summary["proxy_candidates"]["torch-1t"]
    record = opened.profile.targets["torch-2t"]
    assert record["predicted_from"] == "torch-1t"
    assert record["held_out_mape_percent"] == summary["held_out_mape_percent"]
    named = calibrate(opened, "torch-1t", "ort-2t", 2, FAST, progress=False)
    assert "proxy_candidates" not in named and named["held_out_mape_percent"] is None


def test_calibrate_refuses_what_it_cannot_do(bank, tmp_path):
    shutil.copytree(bank, tmp_path / "bank")
    opened = Bank.open(tmp_path / "bank")
    with pytest.raises(ProfileError, match="proxy 'ort-1t'") as info:
        calibrate(opened, "ort-1t", "torch-2t", samples=1, config=FAST, progress=False)
    assert "blockscale profile" in info.value.hint
    with pytest.raises(ConfigError, match="is the proxy itself"):
        calibrate(opened, "torch-1t", "torch-1t", samples=1, config=FAST, progress=False)
    calibrate(opened, "torch-1t", "torch-2t", 0, FAST, measure_frame=False, progress=False)
    with pytest.raises(ConfigError, match="already has latencies on torch-2t") as info:
        calibrate(opened, "torch-1t", "torch-2t", samples=1, config=FAST, progress=False)
    assert "overwrite" in info.value.hint
    again = calibrate(
        opened, "torch-1t", "torch-2t", 2, FAST, measure_frame=False, overwrite=True, progress=False
    )
    assert again["measured"] == 2 and opened.profile.targets["torch-2t"]["samples"] == 2
