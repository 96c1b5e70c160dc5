import json
import re
import shutil

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


def test_train_passes_model_arguments_into_the_checkpoint(tmp_path):
    from blockscale.models import load_checkpoint

    out = tmp_path / "narrow.safetensors"
    common = ("train", "-m", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--limit", "32")
    result = invoke(*common, "--model-arg", "width=4", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(out)
    assert meta["kwargs"]["width"] == 4
    assert model.conv1.out_channels == 4
    for bad, message in [
        ("widht=4", "takes no argument 'widht'"),
        ("width", "KEY=VALUE"),
        ("num_classes=3", "fixed by the data set"),
    ]:
        refused = invoke(*common, "--model-arg", bad, "--out", tmp_path / "x.safetensors")
        assert refused.exit_code == 2 and message in refused.output, refused.output


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
        "--validate-frontier",
        "3",
        "--chain",
        "0.25",
        "--json",
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_build_writes_a_profiled_bank(built_bank):
    out, summary = built_bank
    assert summary["options"] == 3**9
    bank = Bank.open(out)
    assert set(bank.profile.targets) == {"ort-1t"}
    check = bank.manifest["profiles"]["validation"]["ort-1t"]
    assert check["samples"] == 2 and 1 <= check["frontier"]["samples"] <= 3
    assert bank.manifest["build"]["retrain"]["chain"] == 0.25
    assert bank.manifest["build"]["validate_frontier"] == 3
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


def test_select_at_a_confidence_leaves_the_validated_margin(built_bank):
    out, _ = built_bank
    margin = Bank.open(out).profile.latency_corrections["ort-1t"].headroom(0.95)
    front = invoke("frontier", out, "--confidence", "0.95", "--json")
    assert front.exit_code == 0, front.output
    latencies = [p["latency_ms"] for p in json.loads(front.stdout)["frontier"]]
    budget = latencies[len(latencies) // 2]
    chosen = invoke("select", out, "--latency-ms", budget, "--confidence", "0.95", "--json")
    assert chosen.exit_code == 0, chosen.output
    data = json.loads(chosen.stdout)
    assert data["confidence"] == 0.95
    assert data["latency_ms"] * margin <= budget * (1 + 1e-5)  # the plain estimate (float32)
    shown = " ".join(invoke("inspect", out).stdout.split())
    assert "latency margin for --confidence 0.95" in shown
    assert "measured selections along the frontier)" in shown  # the build measured them
    assert re.search(r"on [123] selections along the frontier: latency MAPE", shown)
    assert "accuracy overestimated by" in shown
    bad = invoke("select", out, "--latency-ms", budget, "--confidence", "1.5")
    assert bad.exit_code == 2 and "confidence must lie in (0, 1)" in bad.output


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
    assert "blockscale calibrate" in result.output and "--proxy ort-1t" in result.output


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
    assert set(bank.profile.targets) == {"ort-1t", "torch-2t"}
    assert invoke("select", copy, "--latency-ms", "1000", "--target", "torch-2t").exit_code == 0


def test_build_needs_a_trained_teacher(tmp_path):
    result = invoke("build", "-m", "vgg16_bn", "--out", tmp_path / "b")
    assert result.exit_code == 2
    assert "blockscale train --model vgg16_bn" in result.output


# -- export ----------------------------------------------------------------------------------


def _choices_arg(choices):
    return ",".join(map(str, choices))


def test_export_whole_bank_to_onnx(built_bank):
    out, _ = built_bank
    result = invoke("export", out, "--format", "onnx", "--json")  # default folder: BANK-onnx
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    folder = out.with_name("bank-onnx")
    assert summary["path"] == str(folder) and summary["format"] == "onnx"
    index = json.loads((folder / "index.json").read_text())
    assert summary["descendants"] == sum(len(family) for family in index["blocks"]) == 9 * 3
    for name, record in index["files"].items():
        assert (folder / name).stat().st_size == record["bytes"]
    on_disk = [p for p in folder.rglob("*") if p.is_file()]
    assert summary["files"] == len(index["files"]) + 1 == len(on_disk)
    assert summary["bytes"] == sum(p.stat().st_size for p in on_disk)
    again = invoke("export", out)
    assert again.exit_code == 2
    assert "already exists" in again.output and "--overwrite" in again.output
    replaced = invoke("export", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    text = " ".join(replaced.stdout.split())  # rich wraps long lines
    assert "index.json" in text and f"{len(on_disk)} files" in text


def test_export_selection_to_onnx_matches_torch(built_bank, tmp_path):
    import onnxruntime as ort
    import torch

    out, _ = built_bank
    bank = Bank.open(out)
    choices = [b % 3 for b in range(bank.plan.num_blocks)]
    path = tmp_path / "model.onnx"
    result = invoke("export", out, "--selection", _choices_arg(choices), "--out", path)
    assert result.exit_code == 0, result.output
    assert "estimated accuracy" in result.stdout and str(path) in result.stdout
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, *bank.plan.input_shape, generator=torch.Generator().manual_seed(0))
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = bank.compose(choices)(x).numpy()
    assert abs(got - expected).max() <= 1e-4
    # the digits `frontier` prints name the same selection; an existing file needs --overwrite
    compact = invoke("export", out, "-s", "".join(map(str, choices)), "-o", path, "--json")
    assert compact.exit_code == 2 and "--overwrite" in compact.output
    compact = invoke(
        "export", out, "-s", "".join(map(str, choices)), "-o", path, "--overwrite", "--json"
    )
    assert compact.exit_code == 0, compact.output
    assert json.loads(compact.stdout)["choices"] == choices


def test_export_by_budget_picks_what_select_picks(built_bank, tmp_path):
    out, _ = built_bank
    front = json.loads(invoke("frontier", out, "--json").stdout)["frontier"]
    budget = front[len(front) // 2]["latency_ms"]
    selected = invoke("select", out, "--latency-ms", budget, "--json")
    assert selected.exit_code == 0, selected.output
    path = tmp_path / "budget.onnx"
    result = invoke("export", out, "--latency-ms", budget, "--out", path, "--json")
    assert result.exit_code == 0, result.output
    exported, chosen = json.loads(result.stdout), json.loads(selected.stdout)
    assert exported["choices"] == chosen["choices"]
    assert exported["latency_ms"] == pytest.approx(chosen["latency_ms"])
    assert exported["budget"]["latency_ms"] == budget and exported["target"] == "ort-1t"
    assert path.stat().st_size == exported["bytes"]


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ("0,1,2", "names 3 descendant(s), but the bank has 9 blocks"),
        ("0,0,0,0,0,0,0,0,3", "descendant 3 does not exist for block 8 (layer3.2), which has 3"),
        ("0,0,-1,0,0,0,0,0,0", "descendant -1 does not exist for block 2"),
        ("0,0,0,x,0,0,0,0,0", "'x' is not a descendant index for block 3 (layer2.0)"),
        ("0,0,0,0,1.5,0,0,0,0", "'1.5' is not a descendant index for block 4"),
    ],
)
def test_export_rejects_a_bad_selection(built_bank, tmp_path, selection, message):
    out, _ = built_bank
    result = invoke("export", out, "--selection", selection, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--format", "tflite"), "TFLite exports whole selections only"),
        (("--format", "tflite", "--out", "m.tflite"), "TFLite exports whole selections only"),
        (("--selection", "0,0,0,0,0,0,0,0,0"), "pass --out"),
        (("-s", "0,0,0,0,0,0,0,0,0", "--out", "m.tflite"), "pass --format tflite"),
        (("--out", "model.onnx"), "a whole-bank export writes a folder"),
    ],
)
def test_export_usage_errors(built_bank, args, message):
    out, _ = built_bank
    result = invoke("export", out, *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_export_tflite_without_the_extra(built_bank, tmp_path, monkeypatch):
    monkeypatch.setattr("blockscale.tflite.available", lambda: False)
    out, _ = built_bank
    path = tmp_path / "m.tflite"
    result = invoke("export", out, "-s", "0,0,0,0,0,0,0,0,0", "-f", "tflite", "-o", path)
    assert result.exit_code == 2
    assert "blockscale[tflite]" in result.output and not path.exists()


def test_export_tflite_converts_the_composed_selection(built_bank, tmp_path, monkeypatch):
    """The CLI's side of a TFLite export (the conversion itself is tested in test_tflite.py)."""
    import torch

    out, _ = built_bank
    bank = Bank.open(out)
    choices = [2, 1, 0, 2, 1, 0, 2, 1, 0]
    calls = []

    def fake_export(module, example, path, *, name=None):
        calls.append((module, example))
        path.write_bytes(b"TFL3")
        return path

    monkeypatch.setattr("blockscale.tflite.available", lambda: True)
    monkeypatch.setattr("blockscale.tflite.export_tflite", fake_export)
    path = tmp_path / "m.tflite"
    result = invoke(
        "export", out, "-s", _choices_arg(choices), "-f", "tflite", "-o", path, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "tflite" and path.read_bytes() == b"TFL3"
    ((module, example),) = calls
    assert tuple(example.shape) == (1, *bank.plan.input_shape)
    x = torch.randn(2, *bank.plan.input_shape)
    with torch.no_grad():
        assert torch.equal(module(x), bank.compose(choices)(x))


def test_export_of_an_untraceable_teacher_bank_is_a_clear_error(tmp_path):
    import torch
    from nets import UntraceableNet

    from blockscale.derive import derive
    from blockscale.extract import extract
    from blockscale.types import DeriveConfig

    d = extract(UntraceableNet(), torch.randn(1, 3, 8, 8), blocks=["body"])
    Bank.write(tmp_path / "bank", d, derive(d, DeriveConfig(sparsities=(0.0, 0.5))))
    for args in ((), ("-s", "1", "-o", tmp_path / "m.onnx")):
        result = invoke("export", tmp_path / "bank", *args)
        assert result.exit_code == 2
        text = " ".join(result.output.split())
        assert "UntraceableNet" in text and "export_selection" in text


@pytest.fixture(scope="module")
def tiny_bank(tmp_path_factory):
    """A two-block bank with made-up profiles on torch-1t: blocks of 3, 2 or 1 ms, frame 1 ms."""
    import torch
    from nets import tiny_resnet

    from blockscale.derive import derive
    from blockscale.extract import extract
    from blockscale.profile import BankProfile
    from blockscale.targets import Target
    from blockscale.types import DeriveConfig, Profile

    def entry(block, index, drop, ms):
        return Profile(block, index, drop, 100, 1000, 400 * 2**-index, 256, {"torch-1t": ms})

    profiles = BankProfile(
        teacher_accuracy=0.9,
        frame=entry(-1, 0, 0.0, 1.0),
        descendants=[
            [entry(b, d, 0.02 * d * (b + 1), 3.0 - d) for d in range(3)] for b in range(2)
        ],
        targets={"torch-1t": Target.parse("torch-1t").to_dict()},
    )
    d = extract(tiny_resnet(), torch.zeros(1, 1, 8, 8))
    families = derive(d, DeriveConfig(sparsities=(0.0, 0.5, 0.75)))
    path = tmp_path_factory.mktemp("replay") / "bank"
    Bank.write(path, d, families, extra={"profiles": profiles.to_dict()})
    return path


def test_trace_then_replay(tiny_bank, tmp_path):
    from blockscale.replay import budget_range
    from blockscale.traces import read_trace

    trace = tmp_path / "trace.csv"
    made = invoke(
        "trace", "--kind", "random-walk", "--bank", tiny_bank, "--steps", 12, "--seed", 3,
        "--out", trace, "--json",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    summary = json.loads(made.stdout)
    low, high = budget_range(Bank.open(tiny_bank))
    assert (summary["low"], summary["high"]) == (low.to_dict(), high.to_dict())
    assert len(read_trace(trace)) == summary["steps"] == 12
    out = tmp_path / "replay"
    result = invoke("replay", tiny_bank, "--trace", trace, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 12 and data["target"] == "torch-1t"
    assert set(data["summary"]) == {"blockscale", "model_level", "comparison"}
    record = json.loads((out / "replay.json").read_text())
    assert len(record["steps"]) == 12 and record["summary"] == data["summary"]
    assert (out / "replay.png").stat().st_size > 10_000
    table = invoke("replay", tiny_bank, "-t", trace, "-o", out, "--cache-mb", "1")
    assert table.exit_code == 0, table.output
    assert "KiB loaded" in table.stdout and "mean accuracy" in table.stdout
    sticky = invoke(
        "replay", tiny_bank, "-t", trace, "-o", tmp_path / "sticky", "--hysteresis", 1, "--json"
    )
    assert sticky.exit_code == 0, sticky.output
    kept = json.loads(sticky.stdout)["summary"]
    # a margin larger than any gain: a method moves only when its live model stops fitting
    assert kept["blockscale"]["switches"] <= data["summary"]["blockscale"]["switches"]
    assert kept["model_level"]["switches"] <= data["summary"]["model_level"]["switches"]
    stored = json.loads((tmp_path / "sticky" / "replay.json").read_text())
    assert stored["config"]["switch_cost"] == {"per_block": 0.0, "per_mb": 0.0, "hysteresis": 1.0}
    bad = invoke("replay", tiny_bank, "-t", trace, "-o", tmp_path / "bad", "--per-mb", -1)
    assert bad.exit_code != 0 and "per_mb must be finite and >= 0" in " ".join(bad.output.split())


def test_trace_then_replay_of_two_banks_sharing_the_budget(tiny_bank, tmp_path):
    from blockscale.replay import budget_range

    other = tmp_path / "cam"
    shutil.copytree(tiny_bank, other)
    trace = tmp_path / "shared.json"
    made = invoke(
        "trace", "--kind", "steps", "--bank", tiny_bank, "--bank", other, "--steps", 8,
        "--out", trace, "--json",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    _, high = budget_range(Bank.open(tiny_bank))
    assert json.loads(made.stdout)["high"]["latency_ms"] == pytest.approx(2 * high.latency_ms)
    out = tmp_path / "joint"
    result = invoke(
        "replay", tiny_bank, other, "-t", trace, "-o", out, "--priority", "1,2", "--json"
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "replay.json").read_text())
    assert record["priorities"] == {"bank": 1.0, "cam": 2.0}
    assert len(record["steps"]) == 8 and set(record["steps"][0]["blockscale"]) == {"bank", "cam"}
    assert json.loads(result.stdout)["summary"] == record["summary"]
    assert (out / "replay.png").stat().st_size > 10_000
    wrong = invoke("replay", tiny_bank, other, "-t", trace, "-o", out, "--priority", "1")
    assert wrong.exit_code != 0 and "one weight per bank" in wrong.output
    priced = invoke("replay", tiny_bank, other, "-t", trace, "-o", out, "--per-mb", "0.1")
    assert priced.exit_code != 0 and "--hysteresis only" in " ".join(priced.output.split())


def test_trace_with_explicit_spans(tmp_path):
    from blockscale.traces import read_trace

    path = tmp_path / "t.json"
    result = invoke("trace", "--kind", "steps", "--latency-ms", "1,2", "--steps", 5, "-o", path)
    assert result.exit_code == 0, result.output
    assert "latency 1 to 2 ms" in " ".join(result.stdout.split())
    budgets = read_trace(path).budgets()
    assert len(budgets) == 5 and all(b.memory_mb is None for b in budgets)


def test_replay_of_a_malformed_trace_is_a_clear_error(tiny_bank, tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text("time_s,latency_ms\n0,2\n1,-3\n")
    result = invoke("replay", tiny_bank, "--trace", trace, "--out", tmp_path / "out")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "line 3: Budget.latency_ms must be positive" in text
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--kind", "sine", "--latency-ms", "1,2"), "--kind must be one of"),
        (("--latency-ms", "1"), "takes LO,HI"),
        ((), "pass --bank"),
        (("--latency-ms", "2,1"), "is above high"),
        (("--latency-ms", "1,2", "--target", "ort-1t"), "pass --bank with it"),
    ],
)
def test_trace_usage_errors(tmp_path, args, message):
    result = invoke("trace", "--out", tmp_path / "t.csv", *args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())


def test_calibrate_adds_a_predicted_target(tiny_bank, tmp_path):
    copy = tmp_path / "bank"
    shutil.copytree(tiny_bank, copy)
    args = ("--proxy", "torch-1t", "--samples", "2", "--repeats", "2", "--warmup", "1")
    result = invoke("calibrate", copy, *args, "--target", "torch-2t", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["measured"], summary["predicted"]) == (2, 4)
    assert summary["fit"]["samples"] == 2
    assert Bank.open(copy).profile.targets["torch-2t"]["predicted_from"] == "torch-1t"
    shown = invoke("calibrate", copy, *args, "--target", "ort-1t", "--no-measure-frame")
    assert shown.exit_code == 0, shown.output
    assert "measured 2 descendants, predicted 4" in shown.stdout and "MAPE" in shown.stdout
    assert "frame predicted" in shown.stdout
    inspected = invoke("inspect", copy)
    assert inspected.exit_code == 0, inspected.output
    assert "predicted from torch-1t, 2 samples" in " ".join(inspected.stdout.split())
    assert invoke("select", copy, "--latency-ms", "1000", "--target", "torch-2t").exit_code == 0
    checked = invoke(
        "calibrate", copy, *args, "--target", "torch-2t", "--overwrite", "--selections", "3"
    )
    assert checked.exit_code == 0, checked.output
    assert "3 selections timed whole" in checked.stdout and "--confidence 0.95" in checked.stdout
    assert "from the random ones" in checked.stdout
    framed = invoke(
        "calibrate",
        copy,
        *args,
        "--target",
        "torch-2t",
        "--overwrite",
        "--selections",
        "3",
        "--frontier",
        "2",
    )
    assert framed.exit_code == 0, framed.output
    assert re.search(r"from [12] on the frontier", " ".join(framed.stdout.split()))
    confident = ("--latency-ms", "1000", "--target", "torch-2t", "--confidence", "0.95")
    assert invoke("select", copy, *confident).exit_code == 0
    assert "latency margin for --confidence 0.95" in invoke("inspect", copy).stdout


def test_calibrate_chooses_the_proxy_by_default(tiny_bank, tmp_path):
    copy = tmp_path / "bank"
    shutil.copytree(tiny_bank, copy)
    args = ("--target", "torch-2t", "--samples", "3", "--repeats", "2", "--warmup", "1")
    result = invoke("calibrate", copy, *args)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert "proxy torch-1t (held-out MAPE of each candidate: torch-1t" in shown
    assert "held out" in shown
    assert Bank.open(copy).profile.targets["torch-2t"]["predicted_from"] == "torch-1t"


def test_calibrate_from_an_unprofiled_proxy_is_a_clear_error(tiny_bank):
    result = invoke("calibrate", tiny_bank, "--proxy", "ort-2t", "--target", "torch-2t")
    assert result.exit_code == 2
    assert "not profiled on the proxy 'ort-2t'" in result.output
    assert "blockscale profile" in result.output and "Traceback" not in result.output
