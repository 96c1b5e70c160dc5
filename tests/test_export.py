import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from nets import HAND_WRITTEN, UntraceableNet, randomise_bn, thin_zoo_model, tiny_resnet
from torch import fx, nn

from blockscale.bank import Bank
from blockscale.derive import derive
from blockscale.errors import ExportError
from blockscale.export import (
    INDEX,
    MODEL_INPUT,
    MODEL_OUTPUT,
    export_bank,
    export_frame,
    export_onnx,
    export_selection,
    frame_pieces,
    read_export,
)
from blockscale.extract import Decomposition, compose, extract
from blockscale.ort import BLOCK_INPUT, BLOCK_OUTPUT, PieceWiring
from blockscale.types import DeriveConfig

SPARSITIES = (0.0, 0.5)
SHAPE = (3, 16, 16)


class _Carry(nn.Module):
    """TinyResNet's parts with the stem's output carried around both blocks by the frame."""

    def __init__(self, teacher: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.stem, self.head = teacher.stem, teacher.head
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.blocks[1](self.blocks[0](s) + s)
        return self.head((y - s).mean((2, 3)))


class _SlotTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname.startswith("blocks.") or super().is_leaf_module(m, qualname)


def carried_case() -> tuple[nn.Module, Decomposition]:
    """A decomposition whose frame carries a value around its blocks (extract never cuts one)."""
    teacher = tiny_resnet(in_channels=3)
    d = extract(teacher, torch.randn(1, *SHAPE))
    root = _Carry(teacher, d.blocks).eval()
    frame = fx.GraphModule(root, _SlotTracer().trace(root))
    return frame, Decomposition(plan=d.plan, frame=frame, blocks=d.blocks)


def build_case(name: str) -> tuple[nn.Module, Decomposition]:
    """A teacher (or, for "carry", the frame itself) and its decomposition."""
    torch.manual_seed(0)
    if name == "carry":
        return carried_case()
    if name in ("resnet20", "mobilenetv2"):
        model = thin_zoo_model(name)
    else:
        model = randomise_bn(HAND_WRITTEN[name]())
    return model, extract(model, torch.randn(1, *SHAPE))


CASES = ["resnet20", "mobilenetv2", *HAND_WRITTEN, "carry"]


def ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feed)


def mixed(families):
    return [f[i % len(f)].module for i, f in enumerate(families)]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, d = build_case(request.param)
    return model, d, derive(d, DeriveConfig(sparsities=SPARSITIES))


def test_pieces_reproduce_the_frame(case):
    model, d, families = case
    split = frame_pieces(d)
    assert len(split.pieces) == d.plan.num_blocks + 1
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(split.run(x, d.blocks), model(x), atol=1e-6)
        assert torch.allclose(split.run(x, mixed(families)), compose(d, mixed(families))(x))


def test_wiring_is_plain_data_in_execution_order(case):
    _, d, _ = case
    split = frame_pieces(d)
    available = {split.input}
    for piece in split.pieces:
        wiring = piece.wiring
        assert PieceWiring.from_dict(json.loads(json.dumps(wiring.to_dict()))) == wiring
        assert set(wiring.inputs) <= available, "a piece reads a value not computed yet"
        available |= set(wiring.outputs)
        assert wiring.feeds in available
        assert len(wiring.input_shapes) == len(wiring.inputs)
        assert len(wiring.output_shapes) == len(wiring.outputs)
        if wiring.block_output is not None:
            available.add(wiring.block_output)
    assert split.pieces[-1].wiring.block_output is None


def test_carried_values_cross_the_slots():
    _, d = carried_case()
    first, middle, last = (p.wiring for p in frame_pieces(d).pieces)
    stem = first.feeds
    assert stem in first.outputs
    assert stem in middle.inputs and middle.feeds in middle.outputs  # block_0 + stem
    assert stem in last.inputs and first.block_output in middle.inputs


def test_every_piece_and_descendant_matches_torch(case):
    _, d, families = case
    split = frame_pieces(d)
    frame = export_frame(d)
    g = torch.Generator().manual_seed(1)
    for piece, exported in zip(split.pieces, frame.pieces, strict=True):
        assert exported.wiring == piece.wiring
        if not piece.wiring.outputs:
            assert exported.model is None
            continue
        inputs = [torch.randn(2, *s, generator=g) for s in piece.wiring.input_shapes]
        with torch.no_grad():
            expected = piece.module(*inputs)
        got = ort_run(
            exported.model, {n: t.numpy() for n, t in zip(piece.wiring.inputs, inputs, strict=True)}
        )
        for a, b in zip(got, expected, strict=True):
            assert np.abs(a - b.numpy()).max() <= 1e-4
    for info, family in zip(d.plan.blocks, families, strict=True):
        for desc in family:
            model = export_onnx(desc.module, (torch.zeros(1, *info.input_shape),))
            assert [i.name for i in model.graph.input] == [BLOCK_INPUT]
            assert [o.name for o in model.graph.output] == [BLOCK_OUTPUT]
            x = torch.randn(2, *info.input_shape, generator=g)
            with torch.no_grad():
                expected = desc.module(x).numpy()
            assert np.abs(ort_run(model, {BLOCK_INPUT: x.numpy()})[0] - expected).max() <= 1e-4


def test_export_selection_writes_one_deployable_model(case, tmp_path):
    _, d, families = case
    path = tmp_path / "model.onnx"
    model = export_selection(d, mixed(families), path)
    assert path.read_bytes() == model.SerializeToString()
    assert not [p for p in tmp_path.iterdir() if p != path]
    loaded = onnx.load(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    x = torch.randn(4, *SHAPE)  # the batch dimension is dynamic
    with torch.no_grad():
        expected = compose(d, mixed(families))(x).numpy()
    assert np.abs(ort_run(loaded, {MODEL_INPUT: x.numpy()})[0] - expected).max() <= 1e-4
    assert [o.name for o in loaded.graph.output] == [MODEL_OUTPUT]


def test_module_frames_export_only_whole_selections(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(UntraceableNet())
    d = extract(model, torch.randn(1, *SHAPE), blocks=["body"])
    assert d.plan.frame_kind == "module"
    with pytest.raises(ExportError, match="cannot be cut") as info:
        frame_pieces(d)
    assert "export_selection" in info.value.hint
    families = derive(d, DeriveConfig(sparsities=SPARSITIES))
    with pytest.raises(ExportError, match="cannot be cut"):
        export_bank(d, families, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    model = export_selection(d, [families[0][1].module], tmp_path / "model.onnx")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = compose(d, [families[0][1].module])(x).numpy()
    assert np.abs(ort_run(model, {MODEL_INPUT: x.numpy()})[0] - expected).max() <= 1e-4


class _Unsupported(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1)[0]


class _TwoFaced(nn.Module):
    """Computes something else while being exported: the check must catch the difference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if torch.onnx.is_in_onnx_export() else x


def test_export_failures_are_export_errors():
    with pytest.raises(ExportError, match=r"cannot export unsupported.*cummax") as info:
        export_onnx(_Unsupported(), (torch.zeros(1, 4, 3),), name="unsupported")
    assert info.value.hint
    with pytest.raises(ExportError, match="two-faced differs from torch by up to 1"):
        export_onnx(_TwoFaced(), (torch.zeros(1, 4, 3),), name="two-faced")


def test_export_leaves_the_module_mode_alone():
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    block[1].eval()
    export_onnx(block, (torch.zeros(1, *SHAPE),))
    assert block.training and block[0].training and not block[1].training


def test_dynamo_exporter_gives_the_same_block():
    _, d = build_case("functional")
    example = (torch.zeros(1, *d.plan.blocks[0].input_shape),)
    dynamo = export_onnx(d.blocks[0], example, exporter="dynamo")
    torchscript = export_onnx(d.blocks[0], example)
    x = np.random.default_rng(0).standard_normal((2, *SHAPE), dtype=np.float32)
    a, b = ort_run(dynamo, {BLOCK_INPUT: x})[0], ort_run(torchscript, {BLOCK_INPUT: x})[0]
    assert np.abs(a - b).max() <= 1e-4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = thin_zoo_model("resnet20")
    d = extract(model, torch.randn(1, *SHAPE))
    families = derive(d, DeriveConfig(sparsities=SPARSITIES))
    return d, families, tmp_path_factory.mktemp("export")


def test_export_bank_indexes_every_file(small):
    d, families, root = small
    out = root / "onnx"
    calls = []
    exported = export_bank(d, families, out, progress=lambda done, total: calls.append(done))
    assert calls == list(range(1, 2 + len(SPARSITIES) * d.plan.num_blocks))
    index = json.loads((out / INDEX).read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*.onnx")}
    assert set(index["files"]) == files
    for name, record in index["files"].items():
        data = (out / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert [[e["key"] for e in fam] for fam in index["blocks"]] == [
        [desc.info.key for desc in fam] for fam in families
    ]
    assert index["blocks"][0][0]["input_shape"] == list(d.plan.blocks[0].input_shape)
    back = read_export(out)
    assert back.frame == exported.frame
    assert back.descendants == exported.descendants


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_bank_is_atomic(small, monkeypatch):
    d, families, root = small
    out = root / "atomic"
    export_bank(d, families, out)
    before = _contents(out)
    with pytest.raises(ExportError, match="already exists"):
        export_bank(d, families, out)

    real_write = Path.write_bytes
    written = []

    def flaky_write(path, data):
        written.append(path)
        if len(written) == 5:
            raise OSError("disk full")
        return real_write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", flaky_write)
        with pytest.raises(OSError, match="disk full"):
            export_bank(d, families, out, overwrite=True)
        with pytest.raises(OSError, match="disk full"):
            written.clear()
            export_bank(d, families, root / "fresh")
    assert _contents(out) == before
    assert sorted(p.name for p in root.iterdir() if "atomic" in p.name or "fresh" in p.name) == [
        "atomic"
    ]
    export_bank(d, families, out, overwrite=True)
    assert _contents(out).keys() == before.keys()


def test_read_export_detects_altered_files(small):
    d, families, root = small
    out = root / "altered"
    export_bank(d, families, out)
    target = out / "blocks" / "b0-d1.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        read_export(out)
    index = json.loads((out / INDEX).read_text())
    index["pieces"][0]["file"] = "../../etc/passwd"
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(ExportError, match="never holds"):
        read_export(out)
    del index["pieces"]
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(ExportError, match="mangles 'pieces'"):
        read_export(out)


def test_export_bank_reads_a_bank(small):
    d, families, root = small
    bank = Bank.write(root / "bank", d, families)
    exported = export_bank(bank.decomposition(), bank.load_descendants(), root / "from-bank")
    assert len(exported.descendants) == d.plan.num_blocks
    assert all(len(f) == len(SPARSITIES) for f in exported.descendants)
    with pytest.raises(ExportError, match="not an ONNX export"):
        export_bank(d, families, root / "bank", overwrite=True)
