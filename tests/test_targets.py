import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from blockscale.errors import BlockscaleError
from blockscale.targets import Target, machine


@pytest.mark.parametrize("threads", [1, 2, 16])
@pytest.mark.parametrize(
    ("backend", "short"),
    [
        ("torch", "torch"),
        ("onnxruntime", "ort"),
        ("onnxruntime-int8", "ortq"),
        ("tflite", "tflite"),
    ],
)
def test_parse_round_trip(backend, short, threads):
    target = Target(backend, threads)
    assert target.name == f"{short}-{threads}t"
    assert Target.parse(target.name) == target
    assert Target.parse(f"{backend}-{threads}t") == target


def test_parse_forgives_case_and_spaces():
    assert Target.parse("  Torch-2T ") == Target("torch", 2)
    assert Target() == Target.parse("torch-1t")


@pytest.mark.parametrize(
    "name",
    ["", "torch", "torch-t", "torch-2", "torch2t", "torch--2t", "torch-2t-x", "2t", "t-1.5t"],
)
def test_unreadable_names(name):
    with pytest.raises(BlockscaleError, match="cannot read the target") as info:
        Target.parse(name)
    assert "BACKEND-Nt" in info.value.hint


@pytest.mark.parametrize("name", ["cuda-1t", "tvm-2t", "onnx-1t"])
def test_unknown_backends(name):
    with pytest.raises(BlockscaleError, match="unknown backend") as info:
        Target.parse(name)
    assert "torch" in info.value.hint and "ort" in info.value.hint


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Target.parse("torch-0t"),
        lambda: Target(threads=0),
        lambda: Target(threads=-2),
        lambda: Target(backend="tvm"),
    ],
)
def test_bad_targets(bad):
    with pytest.raises(BlockscaleError):
        bad()


def test_to_dict():
    data = Target("torch", 2).to_dict()
    assert data["name"] == "torch-2t"
    assert (data["backend"], data["threads"]) == ("torch", 2)
    assert data["machine"] == machine() and "cores" in data["machine"]
    json.dumps(data)


class Spy(nn.Module):
    """Records the thread count torch runs with and whether it is in inference mode."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fail = fail
        self.seen: list[tuple[int, bool, tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled(), x.shape))
        if self.fail:
            raise RuntimeError("broken")
        return self.conv(x)


def test_latency_runs_on_the_target_threads_and_restores_them():
    before = torch.get_num_threads()
    spy = Spy().train()
    ms = Target("torch", before + 1).latency_ms(spy, (2, 6, 6), warmup=2, repeats=5)
    assert ms > 0
    assert len(spy.seen) == 7
    assert set(spy.seen) == {(before + 1, True, torch.Size([1, 2, 6, 6]))}
    assert not spy.training  # measured in eval mode
    assert torch.get_num_threads() == before


def test_thread_count_is_restored_after_a_failure():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="broken"):
        Target("torch", before + 2).latency_ms(Spy(fail=True), (2, 4, 4), warmup=1, repeats=1)
    assert torch.get_num_threads() == before


def test_latency_grows_with_work():
    small = nn.Conv2d(4, 4, 1)
    large = nn.Sequential(*(nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)))
    target = Target()
    fast = target.latency_ms(small, (4, 8, 8), warmup=2, repeats=9)
    slow = target.latency_ms(large, (64, 32, 32), warmup=2, repeats=9)
    assert 0 < fast < slow


def test_slot_samples_fit_inside_the_whole_run():
    from torch import nn

    from blockscale.targets import Target

    inner = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), inner, nn.Conv2d(3, 3, 1))
    whole, slot = Target().samples_ms(model, (3, 16, 16), [inner], warmup=2, repeats=7)
    assert len(whole) == len(slot) == 7
    assert all(0 < s < w for s, w in zip(slot, whole, strict=True))


def test_time_calls_takes_turns_and_counts():
    log: list[str] = []
    calls = [lambda: log.append("a"), lambda: log.append("b")]
    spans = Target().time_calls(calls, warmup=1, repeats=6, rounds=3)
    assert [len(s) for s in spans] == [6, 6]
    assert all(ms >= 0 for span in spans for ms in span)
    # three turns, each: a once to warm up and twice timed, then b likewise
    assert "".join(log) == "aaabbb" * 3


def _decomposition():
    from nets import tiny_resnet

    from blockscale.extract import extract

    torch.manual_seed(0)
    return extract(tiny_resnet(), torch.zeros(1, 1, 8, 8))


def _array(result) -> np.ndarray:
    """A runner call's result as an array: torch returns a tensor, ONNX Runtime a list."""
    if isinstance(result, list):
        (result,) = result
    return result.detach().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_runners_run_the_composed_selection(backend):
    from blockscale.extract import compose

    d = _decomposition()
    runner = Target(backend).runner(d)
    x = torch.as_tensor(runner.x)
    with torch.inference_mode():
        expected = compose(d, d.blocks)(x).numpy()
        got = _array(runner.model(d.blocks)())
        assert got == pytest.approx(expected, abs=1e-4)
        for info, block in zip(d.plan.blocks, d.blocks, strict=True):
            assert _array(runner.block(block, info.input_shape)()).shape == (1, *info.output_shape)
            assert _array(runner.idle(info.input_shape)()).shape == (1, *info.input_shape)


def test_ortq_names_the_int8_backend():
    assert Target.parse("ortq-2t").name == "ortq-2t"
    assert Target.parse("ORTQ-1t") == Target("onnxruntime-int8", 1)


def test_a_quantised_conv_block_has_int8_weights_and_runs_close_to_float():
    from blockscale.export import export_onnx
    from blockscale.ort import inference_session, quantize_int8

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1))
    x = torch.randn(1, 4, 8, 8)
    model = export_onnx(block.eval(), (x,), name="convs")
    quantised = quantize_int8(model)
    kinds = {t.data_type for t in quantised.graph.initializer}
    assert kinds & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    assert not {t.data_type for t in model.graph.initializer} & {onnx.TensorProto.INT8}
    feed = {"x": x.numpy()}
    (floats,) = inference_session(model).run(None, feed)
    (ints,) = inference_session(quantised).run(None, feed)
    scale = np.abs(floats).max()
    assert np.abs(ints - floats).max() < 0.1 * scale  # int8 rounding, far from unrelated output
    assert np.corrcoef(ints.ravel(), floats.ravel())[0, 1] > 0.99


def test_a_model_the_quantiser_cannot_read_is_a_typed_error():
    from blockscale.errors import ExportError
    from blockscale.ort import quantize_int8

    broken = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [], [])
    )
    with pytest.raises(ExportError, match="quantise") as info:
        quantize_int8(broken)
    assert "ort-Nt" in info.value.hint


def test_the_int8_runner_runs_the_composed_selection_close_to_float():
    from blockscale.extract import compose

    d = _decomposition()
    runner = Target.parse("ortq-1t").runner(d)
    x = torch.as_tensor(runner.x)
    with torch.inference_mode():
        expected = compose(d, d.blocks)(x).numpy()
    got = _array(runner.model(d.blocks)())
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 0.2 * np.abs(expected).max() + 1e-3


def test_tflite_target_without_the_extra_says_what_to_install(monkeypatch):
    from blockscale import tflite

    monkeypatch.setattr(tflite, "available", lambda: False)
    target = Target.parse("tflite-1t")
    with pytest.raises(BlockscaleError, match="TFLite extra") as info:
        target.runner(_decomposition())
    assert "blockscale[tflite]" in info.value.hint
