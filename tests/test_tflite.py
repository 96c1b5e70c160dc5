import numpy as np
import pytest
import torch
from nets import conv_bn, thin_zoo_model
from torch import nn

from blockscale import tflite
from blockscale.errors import BlockscaleError, ExportError, InputShapeError

needs_extra = pytest.mark.skipif(
    not tflite.available(), reason="TFLite extra not installed: pip install 'blockscale[tflite]'"
)
SHAPE = (3, 32, 32)


class _Residual(nn.Module):
    """A small residual conv block, the kind of block a bank holds."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8, stride=2), nn.Conv2d(8, 8, 3, padding=1))
        self.skip = nn.Conv2d(3, 8, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class _Svd(nn.Module):
    """Singular values: an operation litert-torch has no lowering for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x)


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


def _max_diff(model: tflite.TFLiteModel, module: nn.Module, seed: int) -> float:
    x = torch.randn(model.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(x).numpy()
    got = model(x.numpy())
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@pytest.fixture(scope="module")
def block() -> nn.Module:
    return _Residual().eval()


@pytest.fixture(scope="module")
def block_bytes(block: nn.Module) -> bytes:
    return tflite.convert_tflite(block, torch.randn(1, *SHAPE))


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tflite, "_MODULES", (*tflite._MODULES, "blockscale_no_such_module"))
    assert not tflite.available()
    with pytest.raises(ExportError, match="TFLite extra is not installed") as info:
        tflite.convert_tflite(_Residual(), torch.randn(1, *SHAPE))
    assert info.value.hint == tflite.INSTALL_HINT
    with pytest.raises(BlockscaleError, match="blockscale_no_such_module missing"):
        tflite.TFLiteModel(b"")


def test_batch_other_than_one_is_rejected_before_converting() -> None:
    with pytest.raises(InputShapeError, match="batch-1"):
        tflite.convert_tflite(_Residual(), torch.randn(2, *SHAPE))


@needs_extra
def test_block_matches_torch_in_nchw(block: nn.Module, block_bytes: bytes) -> None:
    model = tflite.TFLiteModel(block_bytes)
    assert model.input_shape == (1, *SHAPE)
    assert model.output_shape == (1, 8, 16, 16)  # NCHW kept at the model's boundary
    assert max(_max_diff(model, block, seed) for seed in range(3)) <= 1e-4


@needs_extra
def test_zoo_model_exports_to_a_file_that_matches_torch(tmp_path) -> None:
    net = thin_zoo_model("resnet20")
    path = tflite.export_tflite(net, torch.randn(1, *SHAPE), tmp_path / "sub" / "resnet20.tflite")
    assert path.is_file()
    model = tflite.TFLiteModel(path, threads=2)
    assert model.output_shape == (1, 10)
    assert max(_max_diff(model, net, seed) for seed in range(3)) <= 1e-4
    assert not net.training


@needs_extra
def test_tflite_target_times_a_block(block_bytes: bytes) -> None:
    from blockscale.targets import Target

    model = tflite.TFLiteModel(block_bytes)
    x = np.zeros((1, *SHAPE), np.float32)
    (samples,) = Target("tflite").time_calls([lambda: model(x)], warmup=2, repeats=7, rounds=1)
    assert len(samples) == 7 and all(s > 0 for s in samples)


@needs_extra
def test_model_checks_its_input_and_source(block_bytes: bytes) -> None:
    with pytest.raises(InputShapeError):
        tflite.TFLiteModel(block_bytes)(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(BlockscaleError, match="cannot load the given bytes"):
        tflite.TFLiteModel(b"not a flatbuffer")
    with pytest.raises(BlockscaleError, match="at least one thread"):
        tflite.TFLiteModel(block_bytes, threads=0)


@needs_extra
def test_rejected_module_raises_export_error_and_writes_nothing(tmp_path) -> None:
    path = tmp_path / "svd.tflite"
    with pytest.raises(ExportError, match="cannot convert _Svd to TFLite") as info:
        tflite.export_tflite(_Svd(), torch.randn(1, 3, 4, 4), path)
    assert "ONNX backend" in (info.value.hint or "")
    assert not path.exists()


@needs_extra
def test_tuple_output_is_rejected() -> None:
    with pytest.raises(ExportError, match="returns tuple"):
        tflite.convert_tflite(_Pair(), torch.randn(1, *SHAPE))


@needs_extra
def test_tflite_target_profiles_a_bank() -> None:
    from nets import tiny_resnet

    from blockscale.derive import derive
    from blockscale.extract import compose, extract
    from blockscale.profile import BankProfile, Profile, ProfileConfig, add_target
    from blockscale.targets import Target
    from blockscale.types import DeriveConfig

    torch.manual_seed(0)
    d = extract(tiny_resnet().eval(), torch.zeros(1, 1, 8, 8))
    families = derive(d, DeriveConfig(sparsities=(0.0, 0.5)))
    runner = Target("tflite").runner(d)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        expected = compose(d, d.blocks)(x).numpy()
    model = tflite.TFLiteModel(tflite.convert_tflite(compose(d, d.blocks), x))
    assert np.abs(model(x.numpy()) - expected).max() <= tflite.ATOL
    runner.model(d.blocks)()

    def empty(block: int, index: int) -> Profile:
        return Profile(block, index, 0.0, 0, 0, 0, 0, {})

    profiles = BankProfile(
        teacher_accuracy=1.0,
        frame=empty(-1, 0),
        descendants=[[empty(b, i) for i in range(len(f))] for b, f in enumerate(families)],
    )
    add_target(
        profiles, d, families, Target("tflite"), ProfileConfig(warmup=1, repeats=3), progress=False
    )
    assert "tflite-1t" in profiles.targets
    assert all(p.latency_ms["tflite-1t"] >= 0 for f in profiles.descendants for p in f)
