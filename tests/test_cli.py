import json

import pytest
from typer.testing import CliRunner

from blockscale.bank import Bank
from blockscale.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_list_models_json():
    result = invoke("list-models", "--json")
    assert result.exit_code == 0
    assert "resnet20" in json.loads(result.stdout)


def test_inspect_model_json():
    result = invoke("inspect-model", "-m", "resnet20", "--dataset", "cifar10", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert len(plan["blocks"]) == 9
    assert plan["input_shape"] == [3, 32, 32]


def test_inspect_model_table_with_named_blocks():
    result = invoke(
        "inspect-model",
        "-m",
        "vgg11_bn",
        "--input-shape",
        "3,16,16",
        "--blocks",
        "features.2,features.4",
    )
    assert result.exit_code == 0, result.output
    assert "features.2" in result.stdout and "features.4" in result.stdout
    assert "2 blocks" in result.stdout


def test_derive_then_inspect(tmp_path):
    out = tmp_path / "bank"
    result = invoke(
        "derive",
        "-m",
        "resnet20",
        "--input-shape",
        "3,16,16",
        "--sparsities",
        "0,0.5",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["options"] == 2**9
    assert Bank.open(out).derive_config.sparsities == (0.0, 0.5)
    table = invoke("inspect", out)
    assert table.exit_code == 0 and "512 models" in table.stdout


def test_derive_refuses_to_overwrite(tmp_path):
    out = tmp_path / "bank"
    args = (
        "derive",
        "-m",
        "resnet20",
        "--input-shape",
        "3,16,16",
        "--sparsities",
        "0,0.5",
        "--out",
        out,
    )
    assert invoke(*args).exit_code == 0
    result = invoke(*args)
    assert result.exit_code == 2
    assert "already exists" in result.output and "--overwrite" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "/nonexistent/bank"), "no bank at"),
        (("inspect-model", "-m", "resnet2O"), "did you mean 'resnet20'"),
        (("inspect-model", "-m", "resnet20", "--blocks", "layer9"), "is not a submodule"),
        (("inspect-model", "-m", "resnet20", "--input-shape", "3,8"), "does not accept an input"),
        (("inspect-model", "--checkpoint", "/nonexistent.safetensors"), "does not exist"),
    ],
)
def test_errors_are_one_message_and_a_fix(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_sparsities_are_a_usage_error(tmp_path):
    result = invoke("derive", "-m", "resnet20", "--sparsities", "0,1.5", "--out", tmp_path / "b")
    assert result.exit_code != 0
    assert "sparsities" in result.output


def test_train_writes_a_checkpoint(tmp_path):
    out = tmp_path / "teacher.safetensors"
    result = invoke(
        "train",
        "-m",
        "resnet20",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--batch-size",
        "32",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    inspected = invoke("inspect-model", "--checkpoint", out, "--json")
    assert inspected.exit_code == 0, inspected.output


@pytest.fixture(scope="module")
def built_bank(tmp_path_factory):
    """A synthetic-data teacher trained by `train`, built into a bank by `build`."""
    root = tmp_path_factory.mktemp("cli")
    teacher = root / "teacher.safetensors"
    trained = invoke(
        "train",
        "-m",
        "resnet20",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--batch-size",
        "32",
        "--out",
        teacher,
        "--json",
    )
    assert trained.exit_code == 0, trained.output
    out = root / "bank"
    result = invoke(
        "build",
        "--checkpoint",
        teacher,
        "--out",
        out,
        "--sparsities",
        "0,0.5,0.8",
        "--epochs",
        "1",
        "--retrain-samples",
        "48",
        "--profile-samples",
        "32",
        "--validate-samples",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_build_writes_a_profiled_bank(built_bank):
    out, summary = built_bank
    assert summary["options"] == 3**9
    bank = Bank.open(out)
    assert set(bank.profile.targets) == {"torch-1t"}
    assert bank.manifest["profiles"]["validation"]["torch-1t"]["samples"] == 2
    assert not out.with_name("bank.build").exists()


def test_select_and_frontier(built_bank, tmp_path):
    out, _ = built_bank
    front = invoke("frontier", out, "--plot", tmp_path / "f.png", "--json")
    assert front.exit_code == 0, front.output
    points = json.loads(front.stdout)["frontier"]
    assert (tmp_path / "f.png").stat().st_size > 1000
    latencies = [p["latency_ms"] for p in points]
    assert latencies == sorted(latencies)
    budget = latencies[len(latencies) // 2]
    chosen = invoke("select", out, "--latency-ms", budget, "--json")
    assert chosen.exit_code == 0, chosen.output
    data = json.loads(chosen.stdout)
    assert data["latency_ms"] <= budget
    best = max(p["accuracy"] for p in points if p["latency_ms"] <= budget)
    assert data["accuracy"] == pytest.approx(best)
    table = invoke("select", out, "--latency-ms", budget)
    assert "estimated accuracy" in table.stdout


def test_select_reports_an_infeasible_budget(built_bank):
    out, _ = built_bank
    result = invoke("select", out, "--latency-ms", "0.0001")
    assert result.exit_code == 2
    assert "fastest selection" in result.output and "raise" in result.output


def test_select_on_an_unprofiled_target(built_bank):
    out, _ = built_bank
    result = invoke("select", out, "--latency-ms", "5", "--target", "torch-2t")
    assert result.exit_code == 2
    assert "blockscale profile" in result.output


def test_profile_adds_a_target(built_bank, tmp_path):
    import shutil

    out, _ = built_bank
    copy = tmp_path / "bank"
    shutil.copytree(out, copy)
    result = invoke(
        "profile", copy, "--target", "torch-2t", "--repeats", "2", "--warmup", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    bank = Bank.open(copy)
    assert set(bank.profile.targets) == {"torch-1t", "torch-2t"}
    assert invoke("select", copy, "--latency-ms", "1000", "--target", "torch-2t").exit_code == 0


def test_build_needs_a_trained_teacher(tmp_path):
    result = invoke("build", "-m", "vgg16_bn", "--out", tmp_path / "b")
    assert result.exit_code == 2
    assert "blockscale train --model vgg16_bn" in result.output
