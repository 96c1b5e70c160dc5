import json
from pathlib import Path

import pytest
from nets import thin_zoo_model
from typer.testing import CliRunner

from blockscale.baselines import METHODS
from blockscale.bench import ALL_METHODS, CONFIDENT, BenchConfig, _seconds_to_quality
from blockscale.cli import app
from blockscale.errors import ConfigError
from blockscale.models import save_checkpoint

DATA = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not DATA.is_dir(), reason="Fashion-MNIST is absent (apt-get install dataset-fashion-mnist)"
)
def test_quick_bench_runs_every_method_and_writes_its_results(tmp_path):
    """The whole evaluation on a thin ResNet-20 and tiny subsets, through the CLI."""
    teacher = thin_zoo_model("resnet20", in_channels=1)
    save_checkpoint(
        teacher,
        tmp_path / "resnet20-fashion-mnist.safetensors",
        model_name="resnet20",
        model_kwargs={"in_channels": 1, "num_classes": 10, "width": 4},
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["bench", "--quick", "--models", "resnet20", "--checkpoints", str(tmp_path),
         "--validate-samples", "3", "--round-to", "1", "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads((out / "bench.json").read_text())
    (model,) = data["models"]
    assert model["options"] == {
        "blockscale": 3**9,
        "uniform": 3,
        "compression": 3,
        "distillation": 3,
    }
    assert len(model["budgets"]) == 6  # three latency and three memory budgets
    for row in model["budgets"]:
        for method in METHODS:  # every family holds the teacher, which fits at 100%
            pick = row[method]
            assert pick is None or (pick["meets_budget"] and 0 <= pick["test_accuracy"] <= 1)
        if row["fraction"] == 1.0:
            assert all(row[m] is not None for m in ALL_METHODS)
        pick = row["blockscale"]
        if row["kind"] == "memory" and pick is not None:  # the memory estimate is exact
            assert pick["memory_mb"] == pytest.approx(pick["estimate"]["memory_mb"])
            assert pick["meets_budget"]
            assert row[CONFIDENT] == pick  # the latency margin leaves memory budgets alone
        confident = row[CONFIDENT]
        if row["kind"] == "latency" and confident is not None:  # never slower by its estimate
            assert confident["estimate"]["latency_ms"] <= pick["estimate"]["latency_ms"] + 1e-9
    # the build validated 3 random selections and kept a latency correction only if it helped,
    # else the plain sum; either with the residuals of the frontier selections measured after
    check = model["validation"]
    assert check["samples"] == 3 and "records" not in check
    assert check["frontier"]["samples"] >= 1 and "records" not in check["frontier"]
    helped = check["corrected_latency_mape_percent"] < check["relative_latency_mape_percent"]
    kept = model["latency_correction"]
    fit = check["latency_correction"] if helped else {"offset_ms": 0.0, "scale": 1.0}
    assert kept == {
        "offset_ms": fit["offset_ms"],
        "scale": fit["scale"],
        "residuals": check["frontier"]["latency_residuals"],
    }
    assert {"bytes_ratio", "switch_seconds_ratio"} <= set(model["switching"])
    assert not any(key.startswith("accuracy") for key in model["switching"])  # estimates only
    training = model["training"]
    assert training["blockscale"]["seconds"] > 0
    for method in METHODS:
        assert [m["sparsity"] for m in model["families"][method]] == [0.5, 0.9]
        assert training[method]["ratio"] == pytest.approx(
            training["blockscale"]["seconds"] / training[method]["seconds"]
        )
    assert set(data["goals"][0]) >= {"at_least_best_baseline_everywhere", "training_ratio"}
    assert (out / "bench-resnet20.png").stat().st_size > 10_000


def test_a_missing_teacher_names_the_command_that_trains_it(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--quick", "--models", "vgg11_bn", "--checkpoints", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "blockscale train --model vgg11_bn --dataset fashion-mnist" in " ".join(
        result.output.split()
    )


def test_time_to_quality_stops_where_accuracy_settles():
    history = [
        {"seconds": 0.0, "val_accuracy": 0.1},
        {"seconds": 1.0, "val_accuracy": 0.80},
        {"seconds": 2.0, "val_accuracy": 0.897},
        {"seconds": 3.0, "val_accuracy": 0.90},
    ]
    assert _seconds_to_quality(history) == 2.0
    assert _seconds_to_quality(history[:1]) == 0.0
    with pytest.raises(ConfigError, match="start at 0"):
        BenchConfig(sparsities=(0.5, 0.9))
    with pytest.raises(ConfigError, match="fractions"):
        BenchConfig(fractions=(0.0, 1.0))
