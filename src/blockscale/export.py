"""ONNX export: the frame cut into pieces at its block slots, every descendant, whole selections.

A graph frame calls block ``i`` as the module ``blocks.i`` (:func:`~blockscale.extract.slot_name`).
:func:`frame_pieces` cuts it at those calls into ``n + 1`` pieces: piece ``k`` runs the frame's nodes
between slot ``k - 1`` and slot ``k``. Pieces and blocks share one namespace, the frame's node names:
a piece reads values computed before it (the model input, block outputs, values the frame carries
around blocks) and computes values that later parts read. Its :class:`~blockscale.ort.PieceWiring`
says which, as plain data that ``index.json`` stores next to the ONNX files.

Every export is run in ONNX Runtime against torch on random inputs at batch 1 and 3 (the batch
dimension is dynamic) and fails with :class:`~blockscale.errors.ExportError` past ``ATOL``. Models
are self-contained (weights inline) at opset ``OPSET``.

The default exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``,
deprecated since torch 2.9 but present in 2.13). It exports and checks a ResNet-20 block in about
30 ms, where the ``torch.export``-based one (``exporter="dynamo"``) takes 1 to 2 s (5 s for the
first), mostly rebuilding its operator registry on every call; and it exports selections of frames
that ``torch.export`` cannot capture (data-dependent Python control flow, which tracing fixes to the
branch the example takes). Both give the same ONNX operators for these models.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import operator
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import fx, nn

from ._version import __version__
from .derive import Descendant
from .errors import ExportError
from .extract import Decomposition, compose, slot_name
from .ort import BLOCK_INPUT, BLOCK_OUTPUT, OnnxFrame, OnnxPiece, PieceWiring, inference_session
from .types import BlockPlan

OPSET = 18
ATOL = 1e-4
INDEX = "index.json"
FORMAT = "blockscale-onnx"
SCHEMA_VERSION = 1
MODEL_INPUT = "input"
MODEL_OUTPUT = "output"
Exporter = Literal["torchscript", "dynamo"]
_EXPORT_BATCH = 2  # torch.export specialises a batch of 1 to a constant
_CHECK_BATCHES = (1, 3)
_FILE_NAME = re.compile(r"^(frame/piece-\d+|blocks/b\d+-d\d+)\.onnx$")


@dataclass(frozen=True)
class FramePiece:
    """One piece of a frame as a torch module: ``module(*inputs)`` returns the tuple of its
    outputs. ``examples`` are its inputs' values at batch 1 for a zero model input."""

    wiring: PieceWiring
    module: fx.GraphModule
    examples: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class FrameSplit:
    """A graph frame cut at its block slots; ``input`` names the model input among the values."""

    input: str
    pieces: tuple[FramePiece, ...]

    @property
    def output(self) -> str:
        return self.pieces[-1].wiring.feeds

    def run(self, x: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
        """The frame's output for ``x`` with ``blocks`` in its slots, piece by piece."""
        values = {self.input: x}
        for piece in self.pieces:
            wiring = piece.wiring
            results = piece.module(*(values[name] for name in wiring.inputs))
            values.update(zip(wiring.outputs, results, strict=True))
            if wiring.block_output is not None:
                values[wiring.block_output] = blocks[wiring.index](values[wiring.feeds])
        return values[self.output]


@dataclass(frozen=True)
class OnnxBank:
    """A bank as ONNX: the frame's pieces and every descendant (``descendants[b][d]``)."""

    path: Path
    frame: OnnxFrame
    descendants: tuple[tuple[onnx.ModelProto, ...], ...]

    def blocks(self, selection: Sequence[int]) -> list[onnx.ModelProto]:
        """The block models of ``selection`` (descendant ``selection[b]`` of block ``b``)."""
        return [self.descendants[b][d] for b, d in enumerate(selection)]


def frame_pieces(decomposition: Decomposition) -> FrameSplit:
    """Cut a graph frame at its block slots into ``n + 1`` pieces, with their wiring as data."""
    plan = decomposition.plan
    _require_graph_frame(plan)
    frame = decomposition.frame
    assert isinstance(frame, fx.GraphModule)
    values = _node_values(frame, torch.zeros(1, *plan.input_shape))
    slot_of = {slot_name(i): i for i in range(plan.num_blocks)}
    nodes = list(frame.graph.nodes)
    slots = [n for n in nodes if n.op == "call_module" and n.target in slot_of]
    if [slot_of[n.target] for n in slots] != list(range(plan.num_blocks)):
        raise ExportError(
            f"the frame of {plan.model} does not call each of its {plan.num_blocks} slots once, "
            "in order",
            hint="re-extract the teacher; frames written by blockscale.extract do",
        )
    stage = _stages(nodes, slots)
    result = nodes[-1].args[0]  # the output node's argument
    if not isinstance(result, fx.Node):
        raise ExportError(
            f"{plan.model} returns {type(result).__name__}; ONNX pieces need one output tensor",
            hint="wrap the teacher so that forward returns a single tensor",
        )
    inputs = [n for n in nodes if n.op == "placeholder"]
    pieces = []
    for k in range(plan.num_blocks + 1):
        body = [n for n in nodes if stage.get(n) == 2 * k]
        reads = {a for n in body for a in n.all_input_nodes if a.op != "get_attr"}
        piece_inputs = [n for n in nodes if n in reads and stage[n] != 2 * k]
        piece_outputs = [n for n in body if any(stage[u] != 2 * k for u in n.users)]
        feeds = slots[k].args[0] if k < len(slots) else result
        _check_crossing(values, [*piece_inputs, *piece_outputs, feeds], plan.model)
        wiring = PieceWiring(
            index=k,
            inputs=tuple(n.name for n in piece_inputs),
            outputs=tuple(n.name for n in piece_outputs),
            feeds=feeds.name,
            block_output=slots[k].name if k < len(slots) else None,
            input_shapes=tuple(tuple(values[n.name].shape[1:]) for n in piece_inputs),
            output_shapes=tuple(tuple(values[n.name].shape[1:]) for n in piece_outputs),
        )
        module = _piece_module(frame, body, piece_inputs, piece_outputs)
        examples = tuple(values[n.name] for n in piece_inputs)
        pieces.append(FramePiece(wiring, module, examples))
    return FrameSplit(input=inputs[0].name, pieces=tuple(pieces))


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str] = (BLOCK_INPUT,),
    output_names: Sequence[str] = (BLOCK_OUTPUT,),
    name: str = "module",
    exporter: Exporter = "torchscript",
    atol: float = ATOL,
) -> onnx.ModelProto:
    """``module`` as a self-contained ONNX model with a dynamic batch dimension, checked in ONNX
    Runtime against torch on random inputs: a max abs difference above ``atol`` is an error.

    ``example_inputs`` give the floating-point inputs' shapes (their batch size does not matter).
    """
    args = _random_inputs(example_inputs, _EXPORT_BATCH, seed=0)
    with _eval_mode(module), torch.no_grad():
        try:
            model = _EXPORTERS[exporter](module, args, list(input_names), list(output_names))
            onnx.checker.check_model(model)
        except Exception as exc:  # both exporters raise many kinds; each becomes one clear error
            other = "dynamo" if exporter == "torchscript" else "torchscript"
            raise ExportError(
                f"cannot export {name} to ONNX with the {exporter} exporter: {_first_line(exc)}",
                hint=f"try exporter={other!r}, or cut blocks so that the operation it names is "
                "outside them",
            ) from exc
        difference = _max_difference(model, module, example_inputs, input_names, name)
    if not difference <= atol:
        raise ExportError(
            f"the ONNX export of {name} differs from torch by up to {difference:.3g} "
            f"(more than {atol:g}) on random inputs",
            hint="the module may branch on tensor values or use an operation the exporter "
            "translates inexactly; try the other exporter",
        )
    model.graph.name = re.sub(r"\W+", "_", name)
    return model


def export_frame(decomposition: Decomposition, *, exporter: Exporter = "torchscript") -> OnnxFrame:
    """The frame's pieces as checked ONNX models (a piece that computes nothing has none)."""
    split = frame_pieces(decomposition)
    pieces = []
    for piece in split.pieces:
        wiring = piece.wiring
        model = None
        if wiring.outputs:
            model = export_onnx(
                piece.module,
                piece.examples,
                input_names=wiring.inputs,
                output_names=wiring.outputs,
                name=f"{decomposition.plan.model} frame piece {wiring.index}",
                exporter=exporter,
            )
        pieces.append(OnnxPiece(wiring, model))
    return OnnxFrame(input=split.input, pieces=tuple(pieces))


def export_bank(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    out_dir: str | os.PathLike,
    *,
    exporter: Exporter = "torchscript",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> OnnxBank:
    """Write the frame's pieces and every descendant as ONNX files plus ``index.json`` (wiring,
    io names, shapes, sha256 per file) to ``out_dir``, atomically.

    For a bank: ``export_bank(bank.decomposition(), bank.load_descendants(), out_dir)``.
    ``progress(done, total)`` is called after each exported model.
    """
    out = Path(out_dir)
    check_destination(out, overwrite)
    _require_graph_frame(decomposition.plan)
    families = descendants
    plan = decomposition.plan
    total = 1 + sum(len(f) for f in families)
    frame = export_frame(decomposition, exporter=exporter)
    if progress is not None:
        progress(1, total)
    models: list[tuple[onnx.ModelProto, ...]] = []
    for info, family in zip(plan.blocks, families, strict=True):
        example = (torch.zeros(1, *info.input_shape),)
        models.append(())
        for d in family:
            name = f"{plan.model} descendant {d.info.key}"
            models[-1] += (export_onnx(d.module, example, name=name, exporter=exporter),)
            if progress is not None:
                progress(1 + sum(len(m) for m in models), total)
    files, index = _layout(plan, frame, families, models, exporter)
    _write_dir(out, files, index)
    return OnnxBank(path=out, frame=frame, descendants=tuple(models))


def _layout(
    plan: BlockPlan,
    frame: OnnxFrame,
    families: Sequence[Sequence[Descendant]],
    models: Sequence[Sequence[onnx.ModelProto]],
    exporter: Exporter,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of an exported bank, by relative path, and its index."""
    files: dict[str, bytes] = {}
    pieces = []
    for piece in frame.pieces:
        file = None
        if piece.model is not None:
            file = f"frame/piece-{piece.wiring.index}.onnx"
            files[file] = piece.model.SerializeToString()
        pieces.append({"wiring": piece.wiring.to_dict(), "file": file})
    blocks = []
    for info, family, family_models in zip(plan.blocks, families, models, strict=True):
        entries = []
        for d, model in zip(family, family_models, strict=True):
            file = f"blocks/{d.info.key}.onnx"
            files[file] = model.SerializeToString()
            entries.append(
                {
                    "key": d.info.key,
                    "sparsity": d.info.sparsity,
                    "file": file,
                    "input_shape": list(info.input_shape),
                    "output_shape": list(info.output_shape),
                }
            )
        blocks.append(entries)
    index = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "blockscale_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "onnx_version": onnx.__version__,
        "exporter": exporter,
        "opset": OPSET,
        "model": plan.model,
        "input": frame.input,
        "output": frame.output,
        "input_shape": list(plan.input_shape),
        "block_input": BLOCK_INPUT,
        "block_output": BLOCK_OUTPUT,
        "pieces": pieces,
        "blocks": blocks,
        "files": {
            f: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for f, data in files.items()
        },
    }
    return files, index


class OnnxExport:
    """An exported bank opened for reading: the index and the frame read and checked now, each
    descendant read (and checked against its sha256) only when :meth:`descendant` asks for it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = root = Path(path)
        try:
            index = json.loads((root / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise ExportError(
                f"{root} holds no readable {INDEX}: {exc}",
                hint="export the bank with `blockscale export BANK --format onnx --out DIR`",
            ) from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ExportError(f"{root / INDEX} is not a blockscale ONNX index")
        if index.get("schema_version") != SCHEMA_VERSION:
            raise ExportError(
                f"{root} has ONNX index version {index.get('schema_version')}; this blockscale "
                f"reads version {SCHEMA_VERSION}",
                hint="export the bank again with this version of blockscale",
            )
        self.index = index
        with self._mangled():
            self.model = str(index["model"])
            self.sizes = tuple(len(family) for family in index["blocks"])
            pieces = tuple(
                OnnxPiece(
                    PieceWiring.from_dict(p["wiring"]), self._load(p["file"]) if p["file"] else None
                )
                for p in index["pieces"]
            )
            self.frame = OnnxFrame(input=str(index["input"]), pieces=pieces)

    @contextlib.contextmanager
    def _mangled(self) -> Iterator[None]:
        """Turn a malformed index into an ExportError naming it."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ExportError(
                f"{self.path / INDEX} is missing or mangles {exc}", hint="export the bank again"
            ) from exc

    def _record(self, block: int, index: int) -> dict[str, Any]:
        if not (0 <= block < len(self.sizes) and 0 <= index < self.sizes[block]):
            raise ExportError(
                f"the export at {self.path} has no descendant {index} of block {block}",
                hint=f"its blocks have {list(self.sizes)} descendants",
            )
        with self._mangled():
            return self.index["files"][self.index["blocks"][block][index]["file"]]

    def descendant(self, block: int, index: int) -> onnx.ModelProto:
        """Descendant ``index`` of block ``block``, read and checked now."""
        self._record(block, index)
        with self._mangled():
            return self._load(self.index["blocks"][block][index]["file"])

    def file_bytes(self, block: int, index: int) -> int:
        """The size of that descendant's file: what reading it costs."""
        with self._mangled():
            return int(self._record(block, index)["bytes"])

    def _load(self, name: str) -> onnx.ModelProto:
        record = self.index["files"].get(name) if _FILE_NAME.match(name) else None
        if record is None:
            raise ExportError(
                f"{self.path / INDEX} names a file {name!r} that an export never holds"
            )
        try:
            data = (self.path / name).read_bytes()
        except OSError as exc:
            raise ExportError(f"cannot read {self.path / name}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ExportError(
                f"{self.path / name} does not match its recorded sha256: it was altered or "
                "truncated",
                hint="export the bank again",
            )
        return onnx.load_model_from_string(data)


def read_export(path: str | os.PathLike) -> OnnxBank:
    """An exported bank read back whole, every file checked against its sha256 in ``index.json``."""
    export = OnnxExport(path)
    descendants = tuple(
        tuple(export.descendant(b, d) for d in range(size)) for b, size in enumerate(export.sizes)
    )
    return OnnxBank(export.path, export.frame, descendants)


def export_selection(
    decomposition: Decomposition,
    blocks: Sequence[nn.Module],
    path: str | os.PathLike,
    *,
    exporter: Exporter = "torchscript",
) -> onnx.ModelProto:
    """Write ``compose(decomposition, blocks)`` as one checked, deployable ONNX model to ``path``
    (input ``"input"``, output ``"output"``); works for frames of either kind."""
    plan = decomposition.plan
    model = export_onnx(
        compose(decomposition, blocks),
        (torch.zeros(1, *plan.input_shape),),
        input_names=(MODEL_INPUT,),
        output_names=(MODEL_OUTPUT,),
        name=f"{plan.model} selection",
        exporter=exporter,
    )
    _write_file(Path(path), model.SerializeToString())
    return model


def _require_graph_frame(plan: BlockPlan) -> None:
    if plan.frame_kind != "graph":
        raise ExportError(
            f"the frame of {plan.model} is the teacher's own Python code (torch.fx cannot trace "
            "it), so it cannot be cut into ONNX pieces",
            hint="export whole selections instead: export_selection, or "
            "`blockscale export BANK --selection ... --format onnx --out model.onnx`",
        )


def _stages(nodes: list[fx.Node], slots: list[fx.Node]) -> dict[fx.Node, int]:
    """Where each value is computed: -1 the model input, ``2k`` piece ``k``, ``2k + 1`` slot ``k``,
    ``2n + 1`` the output node. Constants (``get_attr``) have no stage: pieces copy them."""
    stage: dict[fx.Node, int] = {}
    passed = 0  # slots passed so far
    for node in nodes:
        if node.op == "placeholder":
            stage[node] = -1
        elif node.op == "output":
            stage[node] = 2 * len(slots) + 1
        elif passed < len(slots) and node is slots[passed]:
            stage[node] = 2 * passed + 1
            passed += 1
        elif node.op != "get_attr":
            stage[node] = 2 * passed
    return stage


class _Recorder(fx.Interpreter):
    """Runs a graph module and keeps the value of every node, by node name."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n.name] = result = super().run_node(n)
        return result


def _node_values(frame: fx.GraphModule, x: torch.Tensor) -> dict[str, Any]:
    recorder = _Recorder(frame)
    with torch.no_grad():
        recorder.run(x)
    return recorder.values


def _check_crossing(values: dict[str, Any], nodes: Sequence[fx.Node], model: str) -> None:
    """Values that cross a block slot travel between ONNX models: floating-point tensors only."""
    for node in nodes:
        value = values[node.name]
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise ExportError(
                f"the value {node.name!r} of {model}'s frame crosses a block slot but is "
                f"{type(value).__name__}, not a floating-point tensor",
                hint="compute it where it is used, or export whole selections (export_selection)",
            )


def _piece_module(
    frame: fx.GraphModule, body: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]
) -> fx.GraphModule:
    """The frame nodes ``body`` as a module taking ``inputs`` and returning ``outputs`` (a tuple)."""
    graph = fx.Graph()
    env = {node: graph.placeholder(node.name) for node in inputs}
    parts: dict[str, Any] = {}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a get_attr: each piece that reads a constant holds its own reference
            env[a] = graph.get_attr(a.target)
            parts[a.target] = operator.attrgetter(a.target)(frame)
        return env[a]

    for node in body:
        env[node] = graph.node_copy(node, arg)
        if node.op == "call_module":
            parts[node.target] = frame.get_submodule(node.target)
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(parts, graph, class_name="FramePiece").eval()


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the duration, then every submodule's own mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _torchscript_export(
    module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str]
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # chosen knowingly; see the module doc
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamic_axes={name: {0: "batch"} for name in [*inputs, *outputs]},
        )
    return onnx.load_model_from_string(buffer.getvalue())


def _dynamo_export(
    module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str]
) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=inputs,
        output_names=outputs,
        opset_version=OPSET,
        dynamic_shapes=tuple({0: batch} for _ in args),
        verbose=False,
    )
    return program.model_proto


_EXPORTERS = {"torchscript": _torchscript_export, "dynamo": _dynamo_export}


def _random_inputs(
    examples: Sequence[torch.Tensor], batch: int, seed: int
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn((batch, *t.shape[1:]), generator=generator, dtype=t.dtype) for t in examples
    )


def _max_difference(
    model: onnx.ModelProto,
    module: nn.Module,
    examples: Sequence[torch.Tensor],
    input_names: Sequence[str],
    name: str,
) -> float:
    """Largest absolute difference between ONNX Runtime and torch over the check batches."""
    checks = []
    for batch in _CHECK_BATCHES:
        inputs = _random_inputs(examples, batch, seed=batch)
        expected = module(*inputs)
        feed = {n: t.numpy() for n, t in zip(input_names, inputs, strict=True)}
        checks.append((batch, feed, expected if isinstance(expected, tuple) else (expected,)))
    try:
        session = inference_session(model)
        results = [session.run(None, feed) for _, feed, _ in checks]
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise ExportError(
            f"the ONNX export of {name} does not run in ONNX Runtime: {_first_line(exc)}",
            hint="the exporter may have fixed a size that varies, such as the batch; try the "
            "other exporter",
        ) from exc
    worst = 0.0
    for (batch, _, expected), got in zip(checks, results, strict=True):
        for a, b in zip(got, expected, strict=True):
            if a.shape != tuple(b.shape):
                raise ExportError(
                    f"the ONNX export of {name} gives shape {a.shape} where torch gives "
                    f"{tuple(b.shape)} (batch {batch})",
                    hint="the exporter fixed a size that varies, such as the batch; try the "
                    "other exporter",
                )
            diff = float(np.abs(a - b.numpy()).max())
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
    return worst


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless it is free, or ``overwrite`` and it is an earlier export or empty."""
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(
            f"{out} already exists",
            hint="choose another path, or pass overwrite=True (--overwrite) to replace it",
        )
    if not (out.is_dir() and ((out / INDEX).is_file() or not any(out.iterdir()))):
        raise ExportError(
            f"{out} exists and is not an ONNX export, so overwrite will not delete it",
            hint="choose another path",
        )


def _write_dir(out: Path, files: dict[str, bytes], index: dict[str, Any]) -> None:
    """Write ``files`` and the index into a temporary folder, then rename it to ``out``: a reader
    sees the old folder or the complete new one, never a half-written one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; an export is shareable
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / "export")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "export", out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
