"""ONNX Runtime composition: a selection run as ONNX, from the frame's pieces and one model per block.

The frame of a graph teacher is exported as pieces cut at its block slots (:mod:`blockscale.export`);
the pieces and the blocks share one namespace of values, and :class:`PieceWiring` says which values
each piece reads and writes and which one enters the next slot. Two designs run a selection, both
following :class:`ComposedSession`:

- :class:`ChainedSession`: one ``InferenceSession`` per piece and per block, run in turn; a swap
  rebuilds only the changed blocks' sessions.
- :class:`MergedSession`: the pieces and the chosen blocks spliced into one ONNX graph with one
  session; a swap re-splices and rebuilds that session.

``benchmarks/ort_compose.py`` measures both on the Fashion-MNIST ResNet-20 (9 blocks) at batch 1 on
one thread: the merged graph runs within 5% of a monolithic export of the same selection, the chain
about 1.55 times slower (every session boundary costs a run's setup and stops ONNX Runtime's layout
optimisations from spanning blocks). A swap of one block takes 8 to 12 ms merged against 2 to 3 ms
chained; of every block, 9 to 15 ms merged against 14 to 20 ms chained. The chain's extra 0.4 ms a
call repays a one-block swap's extra 6 to 9 ms within some 20 inferences, and budgets change far
less often than that, so merged is the :data:`DEFAULT_DESIGN`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx.compose import add_prefix_graph

from .errors import ExportError

BLOCK_INPUT = "x"
BLOCK_OUTPUT = "y"
Design = Literal["chained", "merged"]
DEFAULT_DESIGN: Design = "merged"
_PROVIDERS = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class PieceWiring:
    """Where piece ``index`` of a frame sits among the blocks, as plain data.

    ``inputs`` are the values it reads (the model input, block outputs, values the frame carries
    around blocks); ``outputs`` the values it computes that later parts read; ``feeds`` the value
    that enters slot ``index`` (for the last piece: the model output); ``block_output`` the name
    the slot's result takes (None for the last piece). Shapes are per sample, without the batch.
    """

    index: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    feeds: str
    block_output: str | None
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "feeds": self.feeds,
            "block_output": self.block_output,
            "input_shapes": [list(s) for s in self.input_shapes],
            "output_shapes": [list(s) for s in self.output_shapes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PieceWiring:
        return cls(
            index=int(data["index"]),
            inputs=tuple(str(n) for n in data["inputs"]),
            outputs=tuple(str(n) for n in data["outputs"]),
            feeds=str(data["feeds"]),
            block_output=None if data["block_output"] is None else str(data["block_output"]),
            input_shapes=tuple(tuple(int(d) for d in s) for s in data["input_shapes"]),
            output_shapes=tuple(tuple(int(d) for d in s) for s in data["output_shapes"]),
        )


@dataclass(frozen=True)
class OnnxPiece:
    """A frame piece as ONNX; ``model`` is None for a piece that computes nothing."""

    wiring: PieceWiring
    model: onnx.ModelProto | None


@dataclass(frozen=True)
class OnnxFrame:
    """A frame as ONNX pieces; ``input`` names the model input in the pieces' namespace."""

    input: str
    pieces: tuple[OnnxPiece, ...]

    @property
    def output(self) -> str:
        return self.pieces[-1].wiring.feeds

    @property
    def num_blocks(self) -> int:
        return len(self.pieces) - 1


@dataclass(frozen=True)
class SwapReport:
    """What a swap did: the blocks whose model changed and the seconds it took."""

    blocks: tuple[int, ...]
    seconds: float


class ComposedSession(Protocol):
    """A selection running in ONNX Runtime whose blocks can be swapped while it lives."""

    blocks: list[onnx.ModelProto]

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def swap(self, changes: Mapping[int, onnx.ModelProto]) -> SwapReport: ...


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options for every session blockscale builds: ``threads`` intra-op threads, all graph
    optimisations, sequential execution (latency at batch 1 has no parallel branches to exploit)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


# what quantize_dynamic raises on a model it cannot quantise: its own ValueError, TypeError,
# RuntimeError (NotImplementedError among them) and asserts, and onnx's shape inference errors
_QUANTISER_ERRORS = (
    ValueError,
    TypeError,
    RuntimeError,
    AssertionError,
    onnx.shape_inference.InferenceError,
)


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with int8 weights (QInt8, ONNX Runtime's choice for CPUs) and activations
    quantised to uint8 at run time (``quantize_dynamic``), as an int8 deployment runs it; the
    quantiser works on files, so it runs in a temporary directory."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="blockscale-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(model, out, weight_type=QuantType.QInt8)
            return onnx.load(out)
        except _QUANTISER_ERRORS as exc:
            raise ExportError(
                f"ONNX Runtime could not quantise {model.graph.name or 'the model'} to int8: {exc}",
                hint="profile this bank on ort-Nt (float) instead of ortq-Nt",
            ) from exc


def inference_session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    """A CPU session for ``model`` with :func:`session_options`."""
    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=list(_PROVIDERS)
    )


class _Stage:
    """One session of a chain, reading and writing values by their names in the chain. Immutable,
    so that chains built from one another share their unchanged stages."""

    __slots__ = ("feeds", "names", "results", "session")

    def __init__(
        self,
        model: onnx.ModelProto,
        feeds: Mapping[str, str],
        results: Mapping[str, str],
        threads: int,
    ) -> None:
        self.session = inference_session(model, threads)
        self.feeds = tuple(feeds.items())  # (session input, chain value)
        self.names = list(results)  # session outputs
        self.results = tuple(results.values())  # the chain values they become

    def run(self, values: dict[str, np.ndarray]) -> None:
        outs = self.session.run(self.names, {name: values[value] for name, value in self.feeds})
        values.update(zip(self.results, outs, strict=True))

    def bind(self, buffers: Mapping[str, np.ndarray]) -> ort.IOBinding:
        """A binding of the session's inputs and outputs to ``buffers`` of those values."""
        binding = self.session.io_binding()
        for name, value in self.feeds:
            binding.bind_cpu_input(name, buffers[value])
        for name, value in zip(self.names, self.results, strict=True):
            out = buffers[value]
            binding.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        return binding


class ChainedSession:
    """A selection as one ONNX Runtime session per frame piece and per block, run in turn.

    Every session's inputs and outputs are bound to buffers shaped for the last batch size seen
    (IO binding), so a call copies the input in, runs the sessions and copies the output out, with
    no allocation or name lookup between sessions. A swap rebuilds only the changed blocks'
    sessions, in place (:meth:`swap`) or into a new chain that shares the others' sessions with
    this one (:meth:`swapped`). Not safe to call from several threads at once (the buffers are
    shared); two chains that share sessions may run at once (a session runs concurrent calls).
    """

    def __init__(
        self, frame: OnnxFrame, blocks: Sequence[onnx.ModelProto], *, threads: int = 1
    ) -> None:
        _check_count(frame, blocks)
        _check_changes(frame, dict(enumerate(blocks)))
        self.frame = frame
        self.threads = threads
        self.blocks = list(blocks)
        self._stages: list[_Stage] = []
        self._slots: dict[int, int] = {}  # block index -> position of its stage
        for piece in frame.pieces:
            wiring = piece.wiring
            if piece.model is not None:
                names = {n: n for n in wiring.inputs}
                self._stages.append(
                    _Stage(piece.model, names, {n: n for n in wiring.outputs}, threads)
                )
            if wiring.block_output is not None:
                self._slots[wiring.index] = len(self._stages)
                self._stages.append(self._block_stage(wiring.index))
        self._unbind()

    def _unbind(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._bindings: list[ort.IOBinding] = []
        self._shape: tuple[int, ...] | None = None  # the input shape the buffers are for

    def _block_stage(self, index: int) -> _Stage:
        wiring = self.frame.pieces[index].wiring
        assert wiring.block_output is not None
        return _Stage(
            self.blocks[index],
            {BLOCK_INPUT: wiring.feeds},
            {BLOCK_OUTPUT: wiring.block_output},
            self.threads,
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape != self._shape:
            return self._bind(x)
        np.copyto(self._buffers[self.frame.input], x)
        for stage, binding in zip(self._stages, self._bindings, strict=True):
            stage.session.run_with_iobinding(binding)
        return self._buffers[self.frame.output].copy()

    def _bind(self, x: np.ndarray) -> np.ndarray:
        """Run ``x`` through the chain unbound, then bind every stage to buffers of the shapes
        its values had."""
        values = {self.frame.input: x}
        for stage in self._stages:
            stage.run(values)
        self._bind_buffers({name: (v.shape, v.dtype) for name, v in values.items()}, x.shape)
        return values[self.frame.output]

    def _bind_buffers(
        self, layout: Mapping[str, tuple[tuple[int, ...], Any]], shape: tuple[int, ...]
    ) -> None:
        self._buffers = {name: np.empty(s, dtype) for name, (s, dtype) in layout.items()}
        self._bindings = [stage.bind(self._buffers) for stage in self._stages]
        self._shape = shape

    def swap(self, changes: Mapping[int, onnx.ModelProto]) -> SwapReport:
        """Put ``changes[b]`` into block ``b``, rebuilding only those blocks' sessions."""
        start = time.perf_counter()
        _check_changes(self.frame, changes)
        for index, model in changes.items():
            self.blocks[index] = model
            self._stages[self._slots[index]] = self._block_stage(index)
        if self._shape is not None:  # a descendant's output has its block's shape
            self._bindings = [stage.bind(self._buffers) for stage in self._stages]
        return SwapReport(tuple(sorted(changes)), time.perf_counter() - start)

    def swapped(self, changes: Mapping[int, onnx.ModelProto]) -> ChainedSession:
        """A new chain with ``changes[b]`` in block ``b``: only those blocks' sessions are built,
        the others are this chain's own, and its buffers are bound for the batch shape this one
        was last called with. This chain is left as it was, so it can serve until the new one is
        published."""
        _check_changes(self.frame, changes)
        chain = object.__new__(ChainedSession)
        chain.frame = self.frame
        chain.threads = self.threads
        chain.blocks = list(self.blocks)
        chain._stages = list(self._stages)
        chain._slots = self._slots
        chain._unbind()
        for index, model in changes.items():
            chain.blocks[index] = model
            chain._stages[self._slots[index]] = chain._block_stage(index)
        if self._shape is not None:
            layout = {name: (b.shape, b.dtype) for name, b in self._buffers.items()}
            chain._bind_buffers(layout, self._shape)
        return chain


class MergedSession:
    """A selection spliced into one ONNX graph run by one session; :attr:`model` is deployable.

    The frame's pieces are prefixed once; a swap re-prefixes only the changed blocks, splices and
    builds a new session.
    """

    def __init__(
        self, frame: OnnxFrame, blocks: Sequence[onnx.ModelProto], *, threads: int = 1
    ) -> None:
        _check_count(frame, blocks)
        _check_changes(frame, dict(enumerate(blocks)))
        self.frame = frame
        self.threads = threads
        self.blocks = list(blocks)
        self._pieces = [_prefixed_piece(p) for p in frame.pieces]
        self._parts = [_prefixed_block(frame, i, b) for i, b in enumerate(blocks)]
        self._build()

    def _build(self) -> None:
        self.model = _splice(self.frame, self._pieces, self._parts, self.blocks)
        self._session = inference_session(self.model, self.threads)
        self._run = self._session.run
        self._output = [self.frame.output]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._output, {self.frame.input: x})[0]

    def swap(self, changes: Mapping[int, onnx.ModelProto]) -> SwapReport:
        """Put ``changes[b]`` into block ``b``, then splice and build the one session again."""
        start = time.perf_counter()
        _check_changes(self.frame, changes)
        for index, model in changes.items():
            self.blocks[index] = model
            self._parts[index] = _prefixed_block(self.frame, index, model)
        self._build()
        return SwapReport(tuple(sorted(changes)), time.perf_counter() - start)


def merge(frame: OnnxFrame, blocks: Sequence[onnx.ModelProto]) -> onnx.ModelProto:
    """One ONNX model: the frame's pieces with ``blocks`` spliced into its slots, checked."""
    _check_count(frame, blocks)
    pieces = [_prefixed_piece(p) for p in frame.pieces]
    parts = [_prefixed_block(frame, i, b) for i, b in enumerate(blocks)]
    return _splice(frame, pieces, parts, blocks)


def compose_session(
    frame: OnnxFrame,
    blocks: Sequence[onnx.ModelProto],
    *,
    design: Design = DEFAULT_DESIGN,
    threads: int = 1,
) -> ComposedSession:
    """A live selection in ONNX Runtime, built with ``design``."""
    cls = {"chained": ChainedSession, "merged": MergedSession}[design]
    return cls(frame, blocks, threads=threads)


def _check_count(frame: OnnxFrame, blocks: Sequence[onnx.ModelProto]) -> None:
    if len(blocks) != frame.num_blocks:
        raise ExportError(
            f"the frame has {frame.num_blocks} slots, got {len(blocks)} block models",
            hint="pass one ONNX model per block, in block order",
        )


def _check_changes(frame: OnnxFrame, changes: Mapping[int, onnx.ModelProto]) -> None:
    """Refuse a swap before it starts, so that a bad change never leaves half a swap done."""
    for index, model in changes.items():
        if not 0 <= index < frame.num_blocks:
            raise ExportError(
                f"block {index} is not a slot of the frame (0..{frame.num_blocks - 1})"
            )
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        if inputs != [BLOCK_INPUT] or outputs != [BLOCK_OUTPUT]:
            raise ExportError(
                f"a block model must map {BLOCK_INPUT!r} to {BLOCK_OUTPUT!r}; the one for block "
                f"{index} maps {inputs} to {outputs}",
                hint="export blocks with blockscale.export.export_onnx (its default names)",
            )


def _prefixed_piece(piece: OnnxPiece) -> onnx.GraphProto | None:
    """The piece's graph with its inner names prefixed; its inputs and outputs keep their names."""
    if piece.model is None:
        return None
    return add_prefix_graph(
        piece.model.graph, f"p{piece.wiring.index}/", rename_inputs=False, rename_outputs=False
    )


def _prefixed_block(frame: OnnxFrame, index: int, model: onnx.ModelProto) -> onnx.GraphProto:
    """The block's graph with inner names prefixed and its input and output named as in the
    frame's namespace."""
    wiring = frame.pieces[index].wiring
    assert wiring.block_output is not None
    return add_prefix_graph(
        model.graph,
        f"b{index}/",
        rename_inputs=False,
        rename_outputs=False,
        name_map={BLOCK_INPUT: wiring.feeds, BLOCK_OUTPUT: wiring.block_output},
    )


def _splice(
    frame: OnnxFrame,
    pieces: Sequence[onnx.GraphProto | None],
    blocks: Sequence[onnx.GraphProto],
    models: Sequence[onnx.ModelProto],
) -> onnx.ModelProto:
    """Pieces and blocks (already prefixed), in execution order, as one checked model."""
    graphs: list[onnx.GraphProto] = []
    for index, piece in enumerate(pieces):
        if piece is not None:
            graphs.append(piece)
        if index < len(blocks):
            graphs.append(blocks[index])
    inputs = {v.name: v for g in graphs for v in g.input}
    outputs = {v.name: v for g in graphs for v in g.output}
    graph = onnx.helper.make_graph(
        nodes=[n for g in graphs for n in g.node],
        name="blockscale_selection",
        inputs=[inputs[frame.input]],
        outputs=[outputs[frame.output]],
        initializer=[t for g in graphs for t in g.initializer],
        value_info=[v for g in graphs for v in g.value_info],
    )
    sources = [p.model for p in frame.pieces if p.model is not None] + list(models)
    opsets: dict[str, int] = {}
    for source in sources:
        for opset in source.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        ir_version=max(s.ir_version for s in sources),
        producer_name="blockscale",
    )
    onnx.checker.check_model(model)
    return model


def round_robin_latency(
    fns: Mapping[str, Callable[[], object]], *, rounds: int = 200, warmup: int = 20
) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns (one call of each per round, in a
    rotating order) so that drift of a shared machine affects all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_latency(fn: Callable[[], object], *, rounds: int = 200, warmup: int = 20) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls (e.g. ``lambda: session(x)``)."""
    return round_robin_latency({"fn": fn}, rounds=rounds, warmup=warmup)["fn"]
