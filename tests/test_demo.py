import json
from pathlib import Path

import pytest

from blockscale.demo import DEFAULT_TEACHER, run_demo
from blockscale.pipeline import BuildConfig
from blockscale.profile import ProfileConfig
from blockscale.retrain import RetrainConfig
from blockscale.types import DeriveConfig

DATA = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not DATA.is_dir(), reason="Fashion-MNIST is absent (apt-get install dataset-fashion-mnist)"
)
def test_demo_end_to_end_on_a_tiny_budget(tmp_path):
    config = BuildConfig(
        derive=DeriveConfig(sparsities=(0.0, 0.5, 0.9)),
        retrain=RetrainConfig(epochs=1),
        profile=ProfileConfig(warmup=1, repeats=2, rounds=1),
        retrain_samples=64,
        profile_samples=64,
        validate_samples=2,
    )
    summary = run_demo(
        tmp_path,
        teacher=DEFAULT_TEACHER,
        config=config,
        test_images=64,
        progress=False,
        log=lambda text: None,
    )
    assert summary["options"] == 3**9
    assert summary["teacher_test_accuracy"] > 0.8  # the shipped teacher
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo.json").read_text())["bank"] == summary["bank"]
    feasible = [row for row in summary["selections"] if "choices" in row]
    assert feasible and all(row["estimated_latency_ms"] <= row["budget_ms"] for row in feasible)
    assert [u["sparsity"] for u in summary["uniform"]] == [0.0, 0.5, 0.9]
