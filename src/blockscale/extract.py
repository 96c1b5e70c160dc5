"""Block extraction: cut a teacher into single-entry, single-exit blocks and the frame around them.

The teacher is traced with ``torch.fx``. A *cut point* is a position in the graph's execution order
where exactly one value is live, the one just computed; the nodes between two consecutive cut points
form a *segment*, the smallest single-entry, single-exit region. A block is a run of consecutive
segments, so it has one input and one output by construction. The default partition follows the
module hierarchy: the deepest modules (or module-level code) that hold at least two convolutions
become blocks (one per residual block in a ResNet, one per inverted residual in MobileNetV2), and
runs of single-convolution layers are grouped into stages at resolution changes (one per stage in a
VGG). Users may instead name the blocks by module path; that also works for teachers ``torch.fx``
cannot trace, as long as each named block traces on its own.
"""

from __future__ import annotations

import copy
import itertools
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import BlockPlanError, InputShapeError, UntraceableModelError
from .types import BlockInfo, BlockPlan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SLOT_PREFIX = "blocks"


@dataclass
class Decomposition:
    """A teacher cut into blocks: the plan as data, the frame, and each block as a module.

    ``frame`` runs the whole teacher; its block slots hold the teacher's own blocks. Use
    :func:`compose` to run it with other blocks (descendants) in the slots.
    """

    plan: BlockPlan
    frame: nn.Module
    blocks: list[nn.Module]


def slot_name(index: int) -> str:
    """Path, inside a graph frame, of the slot that holds block ``index``."""
    return f"{_SLOT_PREFIX}.{index}"


def extract(
    model: nn.Module,
    example_input: torch.Tensor,
    blocks: Sequence[str] | None = None,
    *,
    min_convs: int = 2,
) -> Decomposition:
    """Cut ``model`` into blocks, automatically or at the module paths named in ``blocks``.

    ``example_input`` is one batch (usually of size 1) of the shape the model takes. The teacher is
    copied; it is never modified.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise InputShapeError(
            f"example_input must be a batched tensor, got {_describe(example_input)}",
            hint="pass e.g. torch.randn(1, 3, 32, 32) for a 3-channel 32x32 model",
        )
    teacher = copy.deepcopy(model).eval()
    _check_runs(teacher, example_input)
    try:
        gm = trace(teacher)
    except UntraceableModelError:
        if not blocks:
            raise
        return _extract_modules(teacher, example_input, list(blocks))
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    graph = _Graph(gm, min_convs)
    regions = graph.named_regions(list(blocks)) if blocks else graph.auto_regions()
    if not regions:
        raise BlockPlanError(
            f"found no block with at least {min_convs} convolutions in {type(model).__name__}",
            hint="name the blocks by module path (blocks=[...] / --blocks), or lower min_convs",
        )
    return graph.decompose(regions, type(model).__name__, tuple(example_input.shape[1:]))


def compose(decomposition: Decomposition, blocks: Sequence[nn.Module]) -> nn.Module:
    """A runnable model: the decomposition's frame with ``blocks`` in its slots (frame shared)."""
    if len(blocks) != len(decomposition.blocks):
        raise BlockPlanError(
            f"compose needs {len(decomposition.blocks)} blocks, got {len(blocks)}",
            hint="pass exactly one module per block of the plan, in order",
        )
    if decomposition.plan.frame_kind == "graph":
        frame = decomposition.frame
        assert isinstance(frame, fx.GraphModule)
        parts: dict[str, object] = {}
        for node in frame.graph.nodes:
            if node.op == "call_module" and not node.target.startswith(f"{_SLOT_PREFIX}."):
                parts[node.target] = frame.get_submodule(node.target)
            elif node.op == "get_attr":
                parts[node.target] = _get_attr(frame, node.target)
        for i, block in enumerate(blocks):
            parts[slot_name(i)] = block
        return fx.GraphModule(parts, copy.deepcopy(frame.graph), class_name="Composed")
    names = [b.name for b in decomposition.plan.blocks]
    return replace_submodules(decomposition.frame, dict(zip(names, blocks, strict=True)))


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _check_runs(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run the model once so a wrong input shape fails here, with a clear message."""
    try:
        with torch.no_grad():
            model(example_input)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(
            f"{type(model).__name__} does not accept an input of shape "
            f"{tuple(example_input.shape)}: {first}",
            hint="pass an example input with the batch, channel and spatial sizes the model takes",
        ) from exc


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and blockscale: the user's failing call."""
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(__file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((torch_dir, own_dir))
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}(): {(f.line or '').strip()}"


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a failure becomes :class:`UntraceableModelError`."""
    try:
        tracer = fx.Tracer()
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; each becomes one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}{_user_frame(exc)}: {first}",
            hint="name the blocks by module path (blocks=['layer1.0', ...] in Python, --blocks on "
            "the command line); each named block must trace on its own, the rest may be any code",
        ) from exc
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UntraceableModelError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; blockscale needs one",
            hint="wrap the model in a module whose forward takes a single tensor",
        )
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _get_attr(module: nn.Module, path: str) -> object:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _num_params(modules: Sequence[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


class _Graph:
    """The traced teacher with its cut points, segments and module scopes."""

    def __init__(self, gm: fx.GraphModule, min_convs: int) -> None:
        self.gm = gm
        self.min_convs = min_convs
        self.nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.cuts = self._cut_points()
        # segment k spans node positions (cuts[k], cuts[k + 1]]
        self.segments = list(zip(self.cuts[:-1], self.cuts[1:], strict=True))

    def _is_conv(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), _CONVS)

    def _cut_points(self) -> list[int]:
        """Positions after which exactly one tensor, the one just computed, is live."""
        n = len(self.nodes)
        last_use = {}
        for node in self.nodes:
            uses = [self.pos.get(u, n) for u in node.users]
            last_use[node] = max(uses, default=self.pos[node])
        live_delta = [0] * (n + 1)
        for node in self.nodes:
            start, end = self.pos[node], last_use[node]
            if end > start:
                live_delta[start] += 1
                live_delta[end] -= 1
        cuts, live = [], 0
        for i, node in enumerate(self.nodes):
            live += live_delta[i]
            produced_here = last_use[node] > i
            if live == 1 and produced_here and _shape_of(node) is not None:
                cuts.append(i)
        return cuts

    def _scope(self, lo: int, hi: int) -> tuple[str, ...]:
        """Common module-path prefix of the nodes at positions (lo, hi]."""
        prefix: list[str] | None = None
        for node in self.nodes[lo + 1 : hi + 1]:
            stack = list(node.meta.get("nn_module_stack", {}).keys())
            if prefix is None:
                prefix = stack
            else:
                k = 0
                while k < min(len(prefix), len(stack)) and prefix[k] == stack[k]:
                    k += 1
                prefix = prefix[:k]
        return tuple(prefix or ())

    def _convs(self, lo: int, hi: int) -> int:
        return sum(self._is_conv(n) for n in self.nodes[lo + 1 : hi + 1])

    def auto_regions(self) -> list[tuple[int, int]]:
        """The default partition, as (entry, exit) node positions."""
        scopes = [self._scope(lo, hi) for lo, hi in self.segments]
        convs = [self._convs(lo, hi) for lo, hi in self.segments]
        regions: list[tuple[int, int]] = []

        def flush(pending: list[int]) -> None:
            if pending and sum(convs[k] for k in pending) >= self.min_convs:
                regions.extend(self._stages(pending, convs))
            pending.clear()

        def visit(seg_ids: list[int], depth: int) -> None:
            runs: list[tuple[str | None, list[int]]] = []
            for s in seg_ids:
                key = scopes[s][depth] if len(scopes[s]) > depth else None
                if runs and runs[-1][0] == key:
                    runs[-1][1].append(s)
                else:
                    runs.append((key, [s]))
            heavy = [sum(convs[s] for s in run) >= self.min_convs for _, run in runs]
            if not any(h and key is not None for (key, _), h in zip(runs, heavy, strict=True)):
                flush(list(seg_ids))  # no child module qualifies: the whole scope is one stage run
                return
            pending: list[int] = []
            for (key, run), is_heavy in zip(runs, heavy, strict=True):
                if not is_heavy:
                    pending.extend(run)
                    continue
                flush(pending)
                if key is None:
                    regions.extend(self._stages(run, convs))
                else:
                    visit(run, depth + 1)
            flush(pending)

        visit(list(range(len(self.segments))), 0)
        return regions

    def _stages(self, seg_ids: list[int], convs: list[int]) -> list[tuple[int, int]]:
        """Split consecutive segments into stages, merging pieces with too few convs.

        A piece ends at a resolution change or where a segment that holds enough convs on its own
        (a residual unit written at module level) begins.
        Trailing segments that change the tensor's rank (a flatten and classifier head) are left to
        the frame: blocks map feature maps to feature maps.
        """
        rank = len(_shape_of(self.nodes[self.segments[seg_ids[0]][0]]) or ())
        seg_ids = list(seg_ids)
        while (
            len(seg_ids) > 1 and len(_shape_of(self.nodes[self.segments[seg_ids[-1]][1]])) != rank
        ):
            seg_ids.pop()
        pieces: list[list[int]] = [[]]
        for s in seg_ids:
            if convs[s] >= self.min_convs and any(convs[p] for p in pieces[-1]):
                pieces.append([])  # a segment with enough convs (a residual unit) stands alone
            pieces[-1].append(s)
            lo, hi = self.segments[s]
            before, after = _shape_of(self.nodes[lo]), _shape_of(self.nodes[hi])
            if before and after and len(before) > 2 and before[2:] != after[2:]:
                pieces.append([])
        pieces = [p for p in pieces if p]
        merged: list[list[int]] = []
        for piece in pieces:
            if merged and sum(convs[s] for s in merged[-1]) < self.min_convs:
                merged[-1].extend(piece)
            else:
                merged.append(piece)
        if len(merged) > 1 and sum(convs[s] for s in merged[-1]) < self.min_convs:
            merged[-2].extend(merged.pop())
        return [(self.segments[p[0]][0], self.segments[p[-1]][1]) for p in merged]

    def named_regions(self, names: list[str]) -> list[tuple[int, int]]:
        """Regions for blocks named by module path, each extended to the next cut point."""
        cut_set = set(self.cuts)
        regions = []
        for name in names:
            try:
                self.gm.get_submodule(name)
            except AttributeError:
                raise BlockPlanError(
                    f"{name!r} is not a submodule of the model",
                    hint="use paths as printed by model.named_modules(), e.g. 'layer1.0'",
                ) from None
            positions = [
                i
                for i, node in enumerate(self.nodes)
                if name in node.meta.get("nn_module_stack", {})
            ]
            if not positions:
                raise BlockPlanError(f"module {name!r} is never called in forward")
            again = f"{name}@"  # fx marks the second and later calls of a module as name@1, ...
            if any(
                k.startswith(again) for n in self.nodes for k in n.meta.get("nn_module_stack", {})
            ):
                raise BlockPlanError(
                    f"block {name!r} runs more than once per forward; a block must run once",
                    hint="name a module that runs exactly once",
                )
            entry = positions[0] - 1
            if entry not in cut_set:
                live = self._live_into(positions[0])
                raise BlockPlanError(
                    f"block {name!r} is not single-entry: {len(live)} values flow into it "
                    f"({', '.join(live[:4])})",
                    hint="name a larger module that contains every input of this one",
                )
            exit_ = next((c for c in self.cuts if c >= positions[-1]), None)
            if exit_ is None or self.nodes[exit_].op == "placeholder":
                raise BlockPlanError(f"block {name!r} has no single exit before the output")
            regions.append((entry, exit_))
        regions.sort()
        for (a_lo, a_hi), (b_lo, b_hi) in itertools.pairwise(regions):
            if b_lo < a_hi:
                raise BlockPlanError(
                    "named blocks overlap: "
                    f"{self._region_name(a_lo, a_hi)!r} and {self._region_name(b_lo, b_hi)!r}",
                    hint="name disjoint modules; a module and its parent cannot both be blocks",
                )
        return regions

    def _live_into(self, position: int) -> list[str]:
        return [
            n.name
            for n in self.nodes[:position]
            if any(self.pos.get(u, len(self.nodes)) >= position for u in n.users)
        ]

    def _region_name(self, lo: int, hi: int) -> str:
        """The shallowest module that is exactly the region, else ``first..last`` children."""
        body = set(self.nodes[lo + 1 : hi + 1])
        scope = self._scope(lo, hi)
        for path in scope:
            owned = {n for n in self.nodes if path in n.meta.get("nn_module_stack", {})}
            if owned == body:
                return path
        depth = len(scope)
        ends = []
        for node in (self.nodes[lo + 1], self.nodes[hi]):
            stack = list(node.meta.get("nn_module_stack", {}))
            ends.append(stack[depth] if len(stack) > depth else node.name)
        return ends[0] if ends[0] == ends[1] else f"{ends[0]}..{ends[1]}"

    def decompose(
        self, regions: list[tuple[int, int]], model_name: str, input_shape: tuple[int, ...]
    ) -> Decomposition:
        """Build block graph modules and the frame graph with one slot per region."""
        gm = self.gm
        inside: dict[fx.Node, int] = {}
        for b, (lo, hi) in enumerate(regions):
            for node in self.nodes[lo + 1 : hi + 1]:
                inside[node] = b
        block_modules, infos = [], []
        for b, (lo, hi) in enumerate(regions):
            body = self.nodes[lo + 1 : hi + 1]
            block = _subgraph_module(gm, self.nodes[lo], body, self.nodes[hi])
            mods = tuple(dict.fromkeys(n.target for n in body if n.op == "call_module"))
            infos.append(
                BlockInfo(
                    index=b,
                    name=self._region_name(lo, hi),
                    modules=mods,
                    input_shape=_shape_of(self.nodes[lo])[1:],
                    output_shape=_shape_of(self.nodes[hi])[1:],
                    num_convs=self._convs(lo, hi),
                    num_params=_num_params([block]),
                    nodes=tuple(n.name for n in body),
                )
            )
            block_modules.append(block)

        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        exits = {self.nodes[hi]: (b, self.nodes[lo]) for b, (lo, hi) in enumerate(regions)}
        parts: dict[str, object] = {}
        frame_nodes = []
        for node in gm.graph.nodes:
            if node in exits:
                b, entry = exits[node]
                env[node] = graph.call_module(slot_name(b), (env[entry],))
                env[node].name = f"block_{b}"
                parts[slot_name(b)] = block_modules[b]
            elif node in inside or (node.op == "get_attr" and not _used_outside(node, inside)):
                continue
            else:
                env[node] = graph.node_copy(node, lambda a: env[a])
                frame_nodes.append(node.name)
                if node.op == "call_module":
                    parts[node.target] = gm.get_submodule(node.target)
                elif node.op == "get_attr":
                    parts[node.target] = _get_attr(gm, node.target)
        frame = fx.GraphModule(parts, graph, class_name=f"{model_name}Frame")
        frame_mods = tuple(t for t in parts if not t.startswith(f"{_SLOT_PREFIX}."))
        own = [m for t, m in parts.items() if isinstance(m, nn.Module) and t in frame_mods]
        frame_params = _num_params(own) + sum(
            m.numel() for t, m in parts.items() if isinstance(m, torch.Tensor)
        )
        plan = BlockPlan(
            model=model_name,
            input_shape=input_shape,
            frame_kind="graph",
            blocks=tuple(infos),
            frame_modules=frame_mods,
            frame_params=frame_params,
            frame_nodes=tuple(frame_nodes),
        )
        return Decomposition(plan=plan, frame=frame, blocks=block_modules)


def _used_outside(node: fx.Node, inside: dict[fx.Node, int]) -> bool:
    return any(u not in inside for u in node.users)


def _subgraph_module(
    gm: fx.GraphModule, entry: fx.Node, body: list[fx.Node], exit_: fx.Node
) -> fx.GraphModule:
    """The nodes ``body`` as a standalone module taking the value of ``entry``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {entry: graph.placeholder("x")}
    parts: dict[str, object] = {}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise BlockPlanError(f"value {a.name!r} enters a block other than by its input")
            env[a] = graph.get_attr(a.target)
            parts[a.target] = _get_attr(gm, a.target)
        return env[a]

    for node in body:
        env[node] = graph.node_copy(node, arg)
        if node.op == "call_module":
            parts[node.target] = gm.get_submodule(node.target)
    graph.output(env[exit_])
    return fx.GraphModule(parts, graph, class_name="Block")


def replace_submodules(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``root`` with submodules replaced; ``root`` itself is left untouched."""
    new_root = copy.copy(root)
    new_root._modules = dict(root._modules)
    for path, module in replacements.items():
        parent = new_root
        *parents, leaf = path.split(".")
        for part in parents:
            child = copy.copy(parent._modules[part])
            child._modules = dict(child._modules)
            parent._modules[part] = child
            parent = child
        parent._modules[leaf] = module
    return new_root


def _extract_modules(
    teacher: nn.Module, example_input: torch.Tensor, names: list[str]
) -> Decomposition:
    """Blocks cut by module path from a teacher fx cannot trace: each block is traced alone."""
    modules: dict[str, nn.Module] = dict(teacher.named_modules())
    for name in names:
        if name not in modules or not name:
            raise BlockPlanError(
                f"{name!r} is not a submodule of {type(teacher).__name__}",
                hint="use paths as printed by model.named_modules(), e.g. 'layer1.0'",
            )
    for a in names:
        for b in names:
            if a != b and b.startswith(f"{a}."):
                raise BlockPlanError(
                    f"named blocks overlap: {a!r} contains {b!r}",
                    hint="name disjoint modules; a module and its parent cannot both be blocks",
                )
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    calls: dict[str, int] = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, output: object) -> None:
            calls[name] += 1
            if len(args) != 1 or not isinstance(args[0], torch.Tensor):
                raise BlockPlanError(f"block {name!r} must take exactly one tensor input")
            if not isinstance(output, torch.Tensor):
                raise BlockPlanError(f"block {name!r} must return exactly one tensor")
            shapes[name] = (tuple(args[0].shape[1:]), tuple(output.shape[1:]))

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            teacher(example_input)
    finally:
        for h in handles:
            h.remove()
    order = sorted(names, key=lambda n: list(shapes).index(n) if n in shapes else len(shapes))
    blocks, infos = [], []
    for index, name in enumerate(order):
        if calls[name] != 1:
            raise BlockPlanError(
                f"block {name!r} is called {calls[name]} times per forward; a block must run once",
                hint="name a module that runs exactly once",
            )
        try:
            block = trace(modules[name])
        except UntraceableModelError as exc:
            raise UntraceableModelError(
                f"named block {name!r} cannot be traced on its own: {exc.message}",
                hint="name smaller blocks whose forward has no data-dependent Python control flow",
            ) from exc
        with torch.no_grad():
            ShapeProp(block).propagate(torch.zeros(1, *shapes[name][0]))
        blocks.append(block)
        infos.append(
            BlockInfo(
                index=index,
                name=name,
                modules=tuple(
                    f"{name}.{n.target}" for n in block.graph.nodes if n.op == "call_module"
                ),
                input_shape=shapes[name][0],
                output_shape=shapes[name][1],
                num_convs=sum(isinstance(m, _CONVS) for m in block.modules()),
                num_params=_num_params([block]),
            )
        )
    frame = replace_submodules(teacher, dict(zip(order, blocks, strict=True)))
    block_params = {id(p) for b in blocks for p in b.parameters()}
    frame_params = sum(p.numel() for p in frame.parameters() if id(p) not in block_params)
    frame_mods = tuple(
        path
        for path, m in frame.named_modules()
        if path and not any(path == n or path.startswith(f"{n}.") for n in order) and not m._modules
    )
    plan = BlockPlan(
        model=type(teacher).__name__,
        input_shape=tuple(example_input.shape[1:]),
        frame_kind="module",
        blocks=tuple(infos),
        frame_modules=frame_mods,
        frame_params=frame_params,
    )
    return Decomposition(plan=plan, frame=frame, blocks=blocks)
