"""Targets: where latency is measured. A target names a backend, its thread count and the machine.

Backends: ``torch`` (eager), ``onnxruntime`` (``ort-Nt``: the selection exported to ONNX and
spliced into one graph, as :mod:`blockscale.ort` deploys it), ``onnxruntime-int8`` (``ortq-Nt``:
the same with every part quantised to int8 weights by :func:`blockscale.ort.quantize_int8`, for
the latency of an int8 deployment; profiled only, not served) and ``tflite`` (LiteRT with its
XNNPACK delegate, the optional ``blockscale[tflite]`` extra; see :mod:`blockscale.tflite`). Latency is measured at batch 1 after a
warm-up, as the median of repeated runs in round-robin turns: the median resists the outliers of a
shared, noisy machine, and the turns spread its drift over every model alike.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from torch import nn

from . import tflite
from .errors import BlockscaleError
from .export import OPSET, export_frame, export_onnx
from .extract import Decomposition, compose
from .ort import (
    BLOCK_INPUT,
    BLOCK_OUTPUT,
    MergedSession,
    OnnxFrame,
    OnnxPiece,
    inference_session,
    quantize_int8,
)

_NAME = re.compile(r"^(?P<backend>[a-z]+(?:-[a-z0-9]+)*)-(?P<threads>\d+)t$")
# backend -> the short name targets are written with
BACKENDS = {"torch": "torch", "onnxruntime": "ort", "onnxruntime-int8": "ortq", "tflite": "tflite"}
_BY_NAME = {short: backend for backend, short in BACKENDS.items()} | {b: b for b in BACKENDS}


def machine() -> str:
    """A short description of this machine: CPU model (or architecture) and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


class Runner(Protocol):
    """Builds ready-to-time batch-1 calls of selections of one decomposition on one target."""

    def model(self, blocks: Sequence[nn.Module]) -> Callable[[], object]:
        """A call running ``compose(decomposition, blocks)`` once on a fixed random input."""
        ...

    def block(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], object]:
        """A call running one block alone once on a fixed random input of its shape."""
        ...

    def idle(self, input_shape: Sequence[int]) -> Callable[[], object]:
        """A call doing nothing but what :meth:`block` pays per call on an input of that shape
        (passing the input in, the output out), to subtract from a block's time."""
        ...


@dataclass(frozen=True)
class Target:
    """A place to run: backend and threads; ``name`` is e.g. ``torch-1t`` or ``ort-2t``."""

    backend: str = "torch"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BlockscaleError(
                f"unknown backend {self.backend!r}",
                hint=f"use one of: {', '.join(BACKENDS)}",
            )
        if self.threads < 1:
            raise BlockscaleError(f"a target needs at least one thread, got {self.threads}")

    @property
    def name(self) -> str:
        return f"{BACKENDS[self.backend]}-{self.threads}t"

    @classmethod
    def parse(cls, name: str) -> Target:
        """``torch-2t`` -> Target("torch", 2); ``ort-1t`` -> Target("onnxruntime", 1)."""
        match = _NAME.match(name.strip().lower())
        if not match:
            raise BlockscaleError(
                f"cannot read the target {name!r}",
                hint="write targets as BACKEND-Nt, e.g. torch-1t or ort-2t",
            )
        if match["backend"] not in _BY_NAME:
            raise BlockscaleError(
                f"unknown backend {match['backend']!r} in the target {name!r}",
                hint=f"use one of: {', '.join(sorted(_BY_NAME))}",
            )
        return cls(_BY_NAME[match["backend"]], int(match["threads"]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "machine": machine()}

    def runner(self, decomposition: Decomposition) -> Runner:
        """What builds timed calls of ``decomposition``'s selections on this target."""
        if self.backend == "torch":
            return _TorchRunner(decomposition)
        if self.backend == "tflite":
            return _TFLiteRunner(decomposition, self.threads)
        return _OrtRunner(decomposition, self.threads, quantize=self.backend == "onnxruntime-int8")

    def time_calls(
        self,
        calls: Sequence[Callable[[], object]],
        *,
        warmup: int = 5,
        repeats: int = 30,
        rounds: int = 5,
    ) -> list[list[float]]:
        """Timings in ms of every call, ``repeats`` each, taken in ``rounds`` round-robin turns
        (each turn warms a call up, then times a share of its repeats)."""
        rounds = max(1, min(rounds, repeats))
        per_round = max(1, repeats // rounds)
        spans: list[list[float]] = [[] for _ in calls]
        clock = time.perf_counter
        with _threads(self.threads), torch.inference_mode():
            for _ in range(rounds):
                for call, span in zip(calls, spans, strict=True):
                    for _ in range(warmup):
                        call()
                    for _ in range(per_round):
                        start = clock()
                        call()
                        span.append((clock() - start) * 1e3)
        return spans

    def samples_ms(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        slots: Sequence[nn.Module] = (),
        *,
        warmup: int = 10,
        repeats: int = 30,
    ) -> list[list[float]]:
        """Raw batch-1 timings in ms: of the whole ``model`` first, then of each of ``slots``.

        A slot is timed inside the whole model, rather than alone, so it runs under the conditions
        it will meet in any selection (caches shared with the rest), and the parts add up.
        """
        x = torch.randn(1, *input_shape)
        starts: dict[int, float] = {}
        spans: list[list[float]] = [[] for _ in range(len(slots) + 1)]

        def before(i: int):
            return lambda module, args: starts.__setitem__(i, time.perf_counter())

        def after(i: int):
            return lambda module, args, out: spans[i].append(time.perf_counter() - starts[i])

        handles = []
        for i, slot in enumerate(slots, start=1):
            handles.append(slot.register_forward_pre_hook(before(i)))
            handles.append(slot.register_forward_hook(after(i)))
        model.eval()
        try:
            with _threads(self.threads), torch.inference_mode():
                for _ in range(warmup):
                    model(x)
                for span in spans:
                    span.clear()
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    spans[0].append(time.perf_counter() - start)
        finally:
            for handle in handles:
                handle.remove()
        return [[t * 1e3 for t in span] for span in spans]

    def latency_ms(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        *,
        warmup: int = 10,
        repeats: int = 30,
    ) -> float:
        """Median batch-1 latency of ``module`` in milliseconds on this target."""
        (whole,) = self.samples_ms(module, input_shape, warmup=warmup, repeats=repeats)
        return statistics.median(whole)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _TorchRunner:
    """Torch eager: the composed module itself (the frame is shared, nothing is copied)."""

    def __init__(self, decomposition: Decomposition) -> None:
        self.decomposition = decomposition
        self.x = torch.randn(1, *decomposition.plan.input_shape)

    def model(self, blocks: Sequence[nn.Module]) -> Callable[[], object]:
        module = compose(self.decomposition, blocks).eval()
        return lambda: module(self.x)

    def block(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], object]:
        module.eval()
        x = torch.randn(1, *input_shape)
        return lambda: module(x)

    def idle(self, input_shape: Sequence[int]) -> Callable[[], object]:
        return self.block(nn.Identity(), input_shape)


class _OrtRunner:
    """ONNX Runtime: the frame exported once as pieces, each block once, spliced per selection
    into one graph (:class:`blockscale.ort.MergedSession`, the deployed design); with
    ``quantize`` every piece and block is quantised to int8 once exported."""

    def __init__(
        self, decomposition: Decomposition, threads: int, *, quantize: bool = False
    ) -> None:
        self.decomposition = decomposition
        self.threads = threads
        self.quantize = quantize
        frame = export_frame(decomposition)
        if quantize:
            frame = OnnxFrame(
                frame.input,
                tuple(
                    OnnxPiece(p.wiring, None if p.model is None else quantize_int8(p.model))
                    for p in frame.pieces
                ),
            )
        self.frame = frame
        self.x = np.random.default_rng(0).standard_normal(
            (1, *decomposition.plan.input_shape), dtype=np.float32
        )
        self._models: dict[
            int, tuple[nn.Module, onnx.ModelProto]
        ] = {}  # id(module) -> (module, ONNX model)

    def export(self, module: nn.Module, input_shape: Sequence[int]) -> onnx.ModelProto:
        """``module`` exported (and checked) once, then reused."""
        key = id(module)
        if key not in self._models:
            example = (torch.zeros(1, *input_shape),)
            model = export_onnx(module, example, name=type(module).__name__)
            self._models[key] = (module, quantize_int8(model) if self.quantize else model)
        return self._models[key][1]

    def model(self, blocks: Sequence[nn.Module]) -> Callable[[], object]:
        shapes = [b.input_shape for b in self.decomposition.plan.blocks]
        models = [self.export(m, s) for m, s in zip(blocks, shapes, strict=True)]
        session = MergedSession(self.frame, models, threads=self.threads)
        return lambda: session(self.x)

    def block(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], object]:
        return self._session(self.export(module, input_shape), input_shape)

    def idle(self, input_shape: Sequence[int]) -> Callable[[], object]:
        value = onnx.helper.make_tensor_value_info(
            BLOCK_INPUT, onnx.TensorProto.FLOAT, [1, *input_shape]
        )
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", [BLOCK_INPUT], [BLOCK_OUTPUT])],
            "idle",
            [value],
            [onnx.helper.make_tensor_value_info(BLOCK_OUTPUT, onnx.TensorProto.FLOAT, None)],
        )
        opset = [onnx.helper.make_opsetid("", OPSET)]
        return self._session(onnx.helper.make_model(graph, opset_imports=opset), input_shape)

    def _session(self, model: onnx.ModelProto, input_shape: Sequence[int]) -> Callable[[], object]:
        session = inference_session(model, self.threads)
        feed = {
            BLOCK_INPUT: np.random.default_rng(1).standard_normal(
                (1, *input_shape), dtype=np.float32
            )
        }
        return lambda: session.run(None, feed)


class _TFLiteRunner:
    """TFLite (LiteRT): every selection and block converted at batch 1 (seconds each) and run in
    the interpreter."""

    def __init__(self, decomposition: Decomposition, threads: int) -> None:
        if not tflite.available():
            raise BlockscaleError(
                "the tflite target needs the TFLite extra, which is not installed",
                hint=tflite.INSTALL_HINT,
            )
        self.decomposition = decomposition
        self.threads = threads

    def model(self, blocks: Sequence[nn.Module]) -> Callable[[], object]:
        module = compose(self.decomposition, blocks)
        return self.block(module, self.decomposition.plan.input_shape)

    def block(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], object]:
        x = torch.randn(1, *input_shape)
        name = type(module).__name__
        model = tflite.TFLiteModel(
            tflite.convert_tflite(module, x, name=name), threads=self.threads
        )
        array = x.numpy()
        return lambda: model(array)

    def idle(self, input_shape: Sequence[int]) -> Callable[[], object]:
        return self.block(nn.Identity(), input_shape)
