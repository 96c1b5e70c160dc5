import json
import math
import os
import shutil

import pytest
import torch
from nets import UntraceableNet, randomise_bn, thin_zoo_model

from blockscale.bank import MANIFEST, Bank
from blockscale.derive import derive
from blockscale.errors import BankCorruptError, BankError, BankVersionError
from blockscale.extract import compose, extract
from blockscale.types import DeriveConfig

SPARSITIES = (0.0, 0.4, 0.8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = thin_zoo_model("mobilenetv2")
    d = extract(model, torch.randn(1, 3, 16, 16))
    families = derive(d, DeriveConfig(sparsities=SPARSITIES))
    path = tmp_path_factory.mktemp("banks") / "mbv2"
    bank = Bank.write(path, d, families, teacher={"name": "mobilenetv2", "kwargs": {}})
    return model, d, families, bank


def _all_files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_round_trip_is_bit_exact(built):
    _, d, families, bank = built
    opened = Bank.open(bank.path)
    assert opened.plan == d.plan
    assert opened.derive_config.sparsities == SPARSITIES
    for family in families:
        for desc in family:
            loaded = opened.load_descendant(desc.info.block, desc.info.index)
            original, rebuilt = desc.module.state_dict(), loaded.state_dict()
            assert original.keys() == rebuilt.keys()
            assert all(torch.equal(original[k], rebuilt[k]) for k in original)
            assert opened.descendants[desc.info.block][desc.info.index] == desc.info


def test_loaded_compositions_equal_the_originals(built):
    model, d, families, bank = built
    opened = Bank.open(bank.path)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(opened.compose([0] * d.plan.num_blocks)(x), model(x))
        selection = [i % len(SPARSITIES) for i in range(d.plan.num_blocks)]
        expected = compose(d, [f[s].module for f, s in zip(families, selection, strict=True)])
        assert torch.equal(opened.compose(selection)(x), expected(x))


def test_manifest_holds_architectures_and_digests(built):
    _, _, _, bank = built
    manifest = json.loads((bank.path / MANIFEST).read_text())
    assert manifest["schema_version"] == 2
    assert manifest["teacher"]["name"] == "mobilenetv2"
    assert manifest["frame"]["graph"]["nodes"]
    assert set(manifest["files"]) == {
        f for f in _all_files(bank.path) if f.endswith(".safetensors")
    }
    assert all(len(rec["sha256"]) == 64 for rec in manifest["files"].values())
    assert not any(f.endswith((".pt", ".pth", ".pkl")) for f in _all_files(bank.path))


def test_every_flipped_byte_is_detected(built, tmp_path):
    _, _, _, bank = built
    for name in _all_files(bank.path):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(bank.path, copy)
        target = copy / name
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(BankCorruptError, match=name.split("/")[-1]):
            Bank.open(copy)


def test_truncated_and_missing_files(built, tmp_path):
    _, _, _, bank = built
    shutil.copytree(bank.path, tmp_path / "b")
    weights = tmp_path / "b" / "blocks" / "b1-d1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(BankCorruptError, match="truncated"):
        Bank.open(tmp_path / "b")
    opened = Bank.open(tmp_path / "b", verify=False)
    opened.load_descendant(0, 0)
    with pytest.raises(BankCorruptError, match="b1-d1"):
        opened.load_descendant(1, 1)
    weights.unlink()
    with pytest.raises(BankCorruptError, match="missing"):
        Bank.open(tmp_path / "b")


def test_tampered_graph_cannot_run_code(built, tmp_path):
    _, _, _, bank = built
    shutil.copytree(bank.path, tmp_path / "b")
    path = tmp_path / "b"
    manifest = json.loads((path / MANIFEST).read_text())
    node = next(n for n in manifest["frame"]["graph"]["nodes"] if n["op"] == "call_function")
    node["target"] = "os.system"
    from blockscale.bank import _write_manifest

    _write_manifest(path, manifest)  # an attacker can recompute the manifest checksum
    with pytest.raises(BankCorruptError, match=r"os\.system"):
        Bank.open(path).load_frame()


def test_future_schema_is_refused(built, tmp_path):
    _, _, _, bank = built
    shutil.copytree(bank.path, tmp_path / "b")
    from blockscale.bank import _write_manifest

    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    _write_manifest(tmp_path / "b", {**manifest, "schema_version": 99})
    with pytest.raises(BankVersionError, match="99"):
        Bank.open(tmp_path / "b")


def test_existing_bank_is_not_overwritten_by_default(built):
    _, d, families, bank = built
    with pytest.raises(BankError, match="already exists"):
        Bank.write(bank.path, d, families)


def test_failed_write_leaves_nothing_behind(built, tmp_path, monkeypatch):
    _, d, families, _ = built
    import blockscale.bank as bank_module

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bank_module, "_write_manifest", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        Bank.write(tmp_path / "new", d, families)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(built, tmp_path):
    _, d, families, _ = built
    first = Bank.write(tmp_path / "bank", d, families, teacher={"run": 1})
    second = Bank.write(tmp_path / "bank", d, families, teacher={"run": 2}, overwrite=True)
    assert first.path == second.path
    assert Bank.open(tmp_path / "bank").manifest["teacher"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


def test_update_adds_sections_verifiably(built, tmp_path):
    _, d, families, _ = built
    bank = Bank.write(tmp_path / "bank", d, families)
    bank.update(profiles={"note": "measured"})
    assert Bank.open(tmp_path / "bank").manifest["profiles"] == {"note": "measured"}
    with pytest.raises(BankError):
        bank.update(files={})


def test_untraceable_teacher_bank_needs_its_frame(tmp_path):
    model = randomise_bn(UntraceableNet())
    d = extract(model, torch.randn(1, 3, 8, 8), blocks=["body"])
    families = derive(d, DeriveConfig(sparsities=(0.0, 0.5)))
    bank = Bank.write(tmp_path / "bank", d, families)
    with pytest.raises(BankError, match="UntraceableNet"):
        bank.compose([1])
    x = torch.randn(2, 3, 8, 8)
    fresh = UntraceableNet()  # other weights: the bank's frame weights replace them
    assert torch.equal(bank.compose([0], frame=fresh)(x), model(x))
    expected = compose(d, [families[0][1].module])(x)
    assert torch.equal(bank.compose([1], frame=fresh)(x), expected)


def test_zoo_bank_round_trip(tmp_path):
    model = thin_zoo_model("resnet20")
    d = extract(model, torch.randn(1, 3, 16, 16))
    families = derive(d, DeriveConfig(sparsities=(0.0, 0.6)))
    bank = Bank.write(tmp_path / "bank", d, families)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(Bank.open(bank.path).compose([0] * 9)(x), model(x))


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/dev/zero", "blocks/../../x.safetensors"]
)
def test_weight_files_outside_the_bank_are_refused(built, tmp_path, name):
    from blockscale.bank import _write_manifest

    _, _, _, bank = built
    shutil.copytree(bank.path, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    record = manifest["files"].pop("frame.safetensors")
    manifest["files"][name] = record
    manifest["frame"]["file"] = name
    _write_manifest(tmp_path / "b", manifest)
    with pytest.raises(BankCorruptError, match="never holds"):
        Bank.open(tmp_path / "b", verify=False)


def test_overwrite_never_deletes_a_folder_that_is_not_a_bank(built, tmp_path):
    _, d, families, _ = built
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BankError, match="not a bank"):
        Bank.write(precious, d, families, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_banks_are_readable_by_others(built, tmp_path):
    import stat

    _, d, families, _ = built
    old = os.umask(0o022)
    try:
        bank = Bank.write(tmp_path / "bank", d, families)
    finally:
        os.umask(old)
    assert stat.S_IMODE(bank.path.stat().st_mode) == 0o755


def test_manifest_is_standard_json_even_with_nan(built, tmp_path):
    _, d, families, _ = built
    bank = Bank.write(tmp_path / "bank", d, families, extra={"profiles": {"spearman": math.nan}})
    text = (bank.path / MANIFEST).read_text()
    assert "NaN" not in text
    assert json.loads(text)["profiles"] == {"spearman": None}
    assert Bank.open(bank.path).manifest["profiles"] == {"spearman": None}


def test_negative_indices_are_refused(built):
    _, _, _, bank = built
    with pytest.raises(BankError, match="no descendant"):
        bank.load_descendant(0, -1)
