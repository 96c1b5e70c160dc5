"""Descendant derivation: shape-preserving structured pruning of each block.

Each descendant removes a fraction of every *internal* channel group of its block, ranked by the L1
norm of the group's weights (LegoDNN's filter pruning). torch-pruning's dependency graph finds the
coupled channels (residual adds, depthwise convolutions, concatenations). To keep the block's input
and output widths, the block is traced between two batch-norm *sentinels*: every channel group that
reaches the block's input or output is coupled to a sentinel, and such groups are left whole, as are
groups through grouped (not depthwise) convolutions, whose channels would have to go evenly per group.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from .errors import PruningError
from .extract import Decomposition
from .types import DeriveConfig, DescendantInfo

_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_SENTINELS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass
class Descendant:
    """A pruned copy of one block that fits the block's slot, with its description as data."""

    info: DescendantInfo
    module: nn.Module


class _Bracketed(nn.Module):
    """The block between two sentinels, so boundary channels show up in dependency groups."""

    def __init__(self, block: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.pre = _sentinel(in_shape)
        self.block = block
        self.post = _sentinel(out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.block(self.pre(x)))


def _sentinel(shape: Sequence[int]) -> nn.Module:
    rank = len(shape) + 1
    if rank not in _SENTINELS:
        raise PruningError(
            f"blocks must carry tensors of rank 2 to 5 across their boundary, got shape {shape}",
            hint="cut blocks between convolutional feature maps",
        )
    return _SENTINELS[rank](int(shape[0]))


def _is_grouped(module: nn.Module) -> bool:
    """A grouped (not depthwise) convolution: channels must go evenly per group, so keep it whole."""
    groups = getattr(module, "groups", 1)
    return isinstance(module, _ROOT_TYPES[:3]) and 1 < groups < module.in_channels


def _kept(channels: int, sparsity: float, round_to: int | None) -> int:
    """Channels kept when removing ``sparsity`` of ``channels``: at least one, rounded up."""
    keep = max(1, channels - math.floor(channels * sparsity + 1e-9))
    if round_to:
        keep = min(channels, math.ceil(keep / round_to) * round_to)
    return keep


def _importance(kind: str) -> Callable:
    p = 1 if kind == "l1" else 2
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)


def prune_block(
    block: nn.Module,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    sparsity: float,
    *,
    round_to: int | None = None,
    importance: str = "l1",
    name: str = "block",
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """A pruned copy of ``block`` with the same input and output shapes.

    Returns the copy and, for every pruned layer, its (original, kept) output channels.
    """
    pruned = copy.deepcopy(block).eval()
    if sparsity == 0.0:
        return pruned, {}
    wrapper = _Bracketed(pruned, input_shape, output_shape).eval()
    example = torch.randn(1, *input_shape)
    try:
        with warnings.catch_warnings():
            # parameters used outside layers (a learnt per-channel scale) are pruned along their
            # last non-singleton dimension, the channel dimension of an (1, C, 1, 1) scale
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(wrapper, example_inputs=example)
    except Exception as exc:  # torch-pruning raises many kinds on graphs it cannot follow
        raise PruningError(
            f"torch-pruning cannot follow the dependencies of block {name!r}: {exc}",
            hint="cut this block differently (name blocks by module path) or leave it unpruned",
        ) from exc
    sentinels = {wrapper.pre, wrapper.post}
    paths = {m: p for p, m in pruned.named_modules()}
    scorer = _importance(importance)
    roots = []
    for group in graph.get_all_groups(
        ignored_layers=list(sentinels), root_module_types=_ROOT_TYPES
    ):
        if any(m in sentinels or _is_grouped(m) for m in (dep.target.module for dep, _ in group)):
            continue
        roots.append((group[0].dep.target.module, group[0].dep.handler))
    channels: dict[str, tuple[int, int]] = {}
    for module, handler in roots:
        pruner = graph.get_pruner_of_module(module)
        n = pruner.get_out_channels(module)
        keep = _kept(n, sparsity, round_to)
        if keep >= n:
            continue
        group = graph.get_pruning_group(module, handler, list(range(n)))
        scores = scorer(group)
        if scores is None:
            continue
        drop = torch.argsort(scores)[: n - keep].tolist()
        group = graph.get_pruning_group(module, handler, sorted(drop))
        if not graph.check_pruning_group(group):
            continue
        group.prune()
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in paths:
                path = paths[dep.target.module]
                if isinstance(dep.target.module, _ROOT_TYPES):
                    channels[path] = (n, keep)
    _check_shapes(pruned, input_shape, output_shape, name, sparsity)
    return pruned, channels


def _check_shapes(
    module: nn.Module,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    name: str,
    sparsity: float,
) -> None:
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *input_shape))
    except RuntimeError as exc:
        raise PruningError(
            f"pruning block {name!r} at sparsity {sparsity} broke it: {str(exc).splitlines()[0]}",
            hint="the block hard-codes a channel count torch-pruning cannot see; cut blocks around it",
        ) from exc
    if tuple(out.shape[1:]) != tuple(output_shape):
        raise PruningError(
            f"pruning block {name!r} at sparsity {sparsity} changed its output shape from "
            f"{tuple(output_shape)} to {tuple(out.shape[1:])}",
            hint="cut blocks so that their boundary layers are convolutions or normalisations",
        )


def derive(
    decomposition: Decomposition,
    config: DeriveConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Descendant]]:
    """Every block's descendants, one per sparsity level of ``config``, in block order.

    ``progress(done, total)`` is called after each descendant, for progress bars.
    """
    config = config or DeriveConfig()
    plan = decomposition.plan
    total = plan.num_blocks * len(config.sparsities)
    result: list[list[Descendant]] = []
    done = 0
    for info, block in zip(plan.blocks, decomposition.blocks, strict=True):
        family = []
        for index, sparsity in enumerate(config.sparsities):
            module, channels = prune_block(
                block,
                info.input_shape,
                info.output_shape,
                sparsity,
                round_to=config.round_to,
                importance=config.importance,
                name=info.name,
            )
            params = sum(p.numel() for p in module.parameters())
            family.append(
                Descendant(
                    info=DescendantInfo(
                        block=info.index,
                        index=index,
                        sparsity=sparsity,
                        num_params=params,
                        channels=channels,
                    ),
                    module=module,
                )
            )
            done += 1
            if progress is not None:
                progress(done, total)
        result.append(family)
    return result
