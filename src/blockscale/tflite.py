"""TFLite (LiteRT): torch modules converted to ``.tflite`` flatbuffers, run and timed in LiteRT.

An optional extra, ``pip install 'blockscale[tflite]'``: ``litert-torch`` converts (through
``torch.export``, without TensorFlow) and ``ai-edge-litert`` runs the models (its interpreter applies
the XNNPACK CPU delegate by default, as on a phone). Both are imported only by the calls that need
them, so this module always imports and :func:`available` says whether the extra is there.

Layout: litert-torch keeps the module's NCHW inputs and outputs (it moves to NHWC inside the graph),
so a converted model takes and returns the same arrays as torch. Shapes are fixed at conversion:
a model converted at batch 1 runs at batch 1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import BlockscaleError, ExportError, InputShapeError

ATOL = 1e-4
INSTALL_HINT = "pip install 'blockscale[tflite]' (ai-edge-litert and litert-torch; no TensorFlow)"
_MODULES = ("litert_torch", "ai_edge_litert")
_CHECK_SEEDS = (1, 2)


def available() -> bool:
    """Whether the TFLite extra is installed (found without importing it, which takes seconds)."""
    return all(importlib.util.find_spec(name) is not None for name in _MODULES)


def convert_tflite(
    module: nn.Module,
    example_input: torch.Tensor,
    *,
    name: str | None = None,
    atol: float = ATOL,
) -> bytes:
    """``module`` as a ``.tflite`` flatbuffer for inputs shaped like ``example_input`` (batch 1),
    checked in LiteRT against torch on random inputs: a max abs difference above ``atol`` is an
    error, so a model that converts but computes something else never reaches a bank."""
    name = name or type(module).__name__
    if example_input.dim() < 1 or example_input.shape[0] != 1:
        raise InputShapeError(
            f"TFLite conversion of {name} needs a batch-1 example input, got shape "
            f"{tuple(example_input.shape)}",
            hint="pass example_input[:1]; LiteRT models have fixed shapes and run at batch 1",
        )
    _require_extra(ExportError, f"cannot convert {name} to TFLite")
    import litert_torch

    with _eval_mode(module), _quiet_converter():
        with torch.no_grad():
            output = module(example_input)
        if not isinstance(output, torch.Tensor):
            raise ExportError(
                f"{name} returns {type(output).__name__}; TFLite models here need one output "
                "tensor",
                hint="wrap the module so that forward returns a single tensor",
            )
        try:
            data = litert_torch.convert(module, (example_input,)).model_content()
        except Exception as exc:  # torch.export, jax and MLIR lowering raise many kinds
            raise ExportError(
                f"cannot convert {name} to TFLite: {_first_line(exc)}",
                hint="cut blocks so that the operation it names is outside them, or use the ONNX "
                "backend (onnxruntime targets)",
            ) from exc
        difference = _max_difference(data, module, example_input, name)
    if not difference <= atol:
        raise ExportError(
            f"the TFLite conversion of {name} differs from torch by up to {difference:.3g} "
            f"(more than {atol:g}) on random inputs",
            hint="the module may branch on tensor values or use an operation LiteRT computes "
            "inexactly; use the ONNX backend for it",
        )
    return data


def export_tflite(
    module: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    atol: float = ATOL,
) -> Path:
    """Convert ``module`` with :func:`convert_tflite` and write the checked flatbuffer to ``path``
    (nothing is written when conversion or the check fails); returns the path."""
    data = convert_tflite(module, example_input, name=name, atol=atol)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


class TFLiteModel:
    """A ``.tflite`` model (file or bytes) loaded into the LiteRT interpreter with ``threads``
    threads; ``model(x)`` runs one float input array to one output array."""

    def __init__(self, source: str | os.PathLike | bytes, *, threads: int = 1) -> None:
        if threads < 1:
            raise BlockscaleError(f"a TFLite model needs at least one thread, got {threads}")
        _require_extra(BlockscaleError, "cannot load a TFLite model")
        from ai_edge_litert.interpreter import Interpreter

        content = source if isinstance(source, bytes) else Path(source).read_bytes()
        what = "the given bytes" if isinstance(source, bytes) else str(source)
        try:
            interpreter = Interpreter(model_content=content, num_threads=threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BlockscaleError(
                f"cannot load {what} as a TFLite model: {_first_line(exc)}",
                hint="export it again with blockscale.tflite.export_tflite",
            ) from exc
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BlockscaleError(
                f"{what} has {len(inputs)} inputs and {len(outputs)} outputs; blockscale runs "
                "TFLite models with one of each",
                hint="convert a module whose forward takes one tensor and returns one tensor",
            )
        self.threads = threads
        self._interpreter = interpreter
        self._input: dict[str, Any] = inputs[0]
        self._output: dict[str, Any] = outputs[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape, batch included."""
        return tuple(int(n) for n in self._input["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The model's output shape, batch included."""
        return tuple(int(n) for n in self._output["shape"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run the model on ``x`` (shape :attr:`input_shape`); returns a copy of the output."""
        if tuple(x.shape) != self.input_shape:
            raise InputShapeError(
                f"this TFLite model takes inputs of shape {self.input_shape}, got {tuple(x.shape)}",
                hint="TFLite models have fixed shapes; convert the module again for this shape",
            )
        self._interpreter.set_tensor(
            self._input["index"], x.astype(self._input["dtype"], copy=False)
        )
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"])


def _require_extra(error: type[BlockscaleError], what: str) -> None:
    if not available():
        missing = [name for name in _MODULES if importlib.util.find_spec(name) is None]
        raise error(
            f"{what}: the TFLite extra is not installed ({', '.join(missing)} missing)",
            hint=INSTALL_HINT,
        )


def _max_difference(data: bytes, module: nn.Module, example: torch.Tensor, name: str) -> float:
    """Largest absolute difference between LiteRT and torch on seeded random inputs."""
    try:
        model = TFLiteModel(data)
    except BlockscaleError as exc:
        raise ExportError(
            f"the TFLite conversion of {name} does not load: {exc.message}", hint=exc.hint
        ) from exc
    worst = 0.0
    for seed in _CHECK_SEEDS:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(example.shape, generator=generator, dtype=example.dtype)
        with torch.no_grad():
            expected = module(x)
        got = model(x.numpy())
        if got.shape != tuple(expected.shape):
            raise ExportError(
                f"the TFLite conversion of {name} gives shape {got.shape} where torch gives "
                f"{tuple(expected.shape)}",
                hint="the converter changed the layout; use the ONNX backend for this module",
            )
        diff = float(np.abs(got - expected.numpy()).max())
        worst = max(worst, diff if np.isfinite(diff) else np.inf)
    return worst


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """Hide litert-torch's progress lines and the deprecation warnings of its torch internals."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    os.environ[key] = "n"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
