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
