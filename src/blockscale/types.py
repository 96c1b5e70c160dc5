"""The plain data that passes between stages, defined once. Each type round-trips through JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import ConfigError, ProfileError

FrameKind = Literal["graph", "module"]


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class BlockInfo:
    """One block of a plan: a single-entry, single-exit part of the teacher with fixed shapes.

    Shapes are per sample (no batch dimension). ``nodes`` are the teacher's fx node names the block
    covers (empty for a block cut by module path from an untraceable teacher).
    """

    index: int
    name: str
    modules: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    num_convs: int
    num_params: int
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockInfo:
        return cls(
            index=int(data["index"]),
            name=str(data["name"]),
            modules=tuple(data["modules"]),
            input_shape=_shape(data["input_shape"]),
            output_shape=_shape(data["output_shape"]),
            num_convs=int(data["num_convs"]),
            num_params=int(data["num_params"]),
            nodes=tuple(data.get("nodes", ())),
        )


@dataclass(frozen=True)
class BlockPlan:
    """How a teacher is cut: its blocks in execution order and the frame around them.

    ``frame_kind`` is ``"graph"`` when the frame is a traced graph (storable as data) and
    ``"module"`` when it is the teacher's own Python code with the blocks swapped in.
    """

    model: str
    input_shape: tuple[int, ...]
    frame_kind: FrameKind
    blocks: tuple[BlockInfo, ...]
    frame_modules: tuple[str, ...]
    frame_params: int
    frame_nodes: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def total_params(self) -> int:
        return self.frame_params + sum(b.num_params for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocks"] = [b.to_dict() for b in self.blocks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockPlan:
        return cls(
            model=str(data["model"]),
            input_shape=_shape(data["input_shape"]),
            frame_kind=data["frame_kind"],
            blocks=tuple(BlockInfo.from_dict(b) for b in data["blocks"]),
            frame_modules=tuple(data["frame_modules"]),
            frame_params=int(data["frame_params"]),
            frame_nodes=tuple(data.get("frame_nodes", ())),
        )


@dataclass(frozen=True)
class DeriveConfig:
    """How descendants are derived from each block.

    ``sparsities`` are fractions of each internal channel group removed (0.0 keeps the original
    block); ``round_to`` rounds every kept channel count up to a multiple (1 or None: exact
    widths); ``importance`` ranks channels (``"l1"``: L1 norm of the group's weights, as LegoDNN).

    Widths default to multiples of 8, which SIMD kernels run in their blocked layouts: ONNX
    Runtime falls back to plain layouts around a block of odd width, so such a descendant runs
    slower inside the whole graph than alone, and the selections' summed latency understates
    what they measure (MobileNetV2 on ort-1t: 25 of 30 random selections more than 5% slower
    than summed with exact widths, none with multiples of 8; docs/benchmarks.md).
    """

    sparsities: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
    round_to: int | None = 8
    importance: Literal["l1", "l2"] = "l1"

    def __post_init__(self) -> None:
        if not self.sparsities:
            raise ConfigError("DeriveConfig.sparsities must name at least one level")
        if any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ConfigError(f"sparsities must lie in [0, 1), got {self.sparsities}")
        if self.sparsities[0] != 0.0 or list(self.sparsities) != sorted(set(self.sparsities)):
            raise ConfigError(
                f"sparsities must start at 0 (the original block) and increase, got "
                f"{self.sparsities}",
                hint="e.g. 0,0.2,0.4,0.6,0.8,0.9",
            )
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to}")
        if self.importance not in ("l1", "l2"):
            raise ConfigError(f"importance must be 'l1' or 'l2', got {self.importance!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeriveConfig:
        return cls(
            sparsities=tuple(float(s) for s in data["sparsities"]),
            round_to=data.get("round_to"),
            importance=data.get("importance", "l1"),
        )


@dataclass(frozen=True)
class DescendantInfo:
    """What a descendant is, as data: its block, sparsity, kept channels and size.

    ``channels`` maps each pruned layer's module path to (original, kept) output channels.
    """

    block: int
    index: int
    sparsity: float
    num_params: int
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"b{self.block}-d{self.index}"

    @property
    def pruned(self) -> bool:
        """Whether any channel was removed. One that removes none (its block has nothing
        internal, or rounding kept every width) is the original block: not retrained, and its
        accuracy is the teacher's."""
        return bool(self.channels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = {k: list(v) for k, v in self.channels.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DescendantInfo:
        return cls(
            block=int(data["block"]),
            index=int(data["index"]),
            sparsity=float(data["sparsity"]),
            num_params=int(data["num_params"]),
            channels={k: (int(v[0]), int(v[1])) for k, v in data.get("channels", {}).items()},
        )


@dataclass(frozen=True)
class Budget:
    """The limits at one moment; ``None`` means unconstrained."""

    latency_ms: float | None = None
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "memory_mb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"Budget.{name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """What one descendant (or the frame, ``block == -1``) costs and loses.

    ``accuracy_drop`` is the teacher's top-1 accuracy minus the accuracy with this descendant alone
    in its block (a fraction, 0.01 = one point). Memory is ``weight_bytes + activation_bytes``:
    the parameter and buffer bytes, plus the peak bytes of activations alive at once while the
    block runs in the model at batch 1 (its input, and what the frame holds around it, included). ``latency_ms`` maps a target name to the median
    batch-1 latency measured there.
    """

    block: int
    index: int
    accuracy_drop: float
    params: int
    macs: int
    weight_bytes: int
    activation_bytes: int
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(
            block=int(data["block"]),
            index=int(data["index"]),
            accuracy_drop=float(data["accuracy_drop"]),
            params=int(data["params"]),
            macs=int(data["macs"]),
            weight_bytes=int(data["weight_bytes"]),
            activation_bytes=int(data["activation_bytes"]),
            latency_ms={str(k): float(v) for k, v in data.get("latency_ms", {}).items()},
        )


def require_latency(parts: Sequence[Profile], target: str) -> None:
    """Raise a :class:`ProfileError` naming the first of ``parts`` (the frame and descendants)
    with no latency on ``target``, and the targets every part has."""
    for p in parts:
        if target not in p.latency_ms:
            common = set.intersection(*(set(q.latency_ms) for q in parts))
            where = "the frame" if p.block == -1 else f"block {p.block} descendant {p.index}"
            raise ProfileError(
                f"no latency on target {target!r} for {where}; targets profiled for every "
                f"block and the frame: {', '.join(sorted(common)) or 'none'}",
                hint=f"profile the bank on {target!r}, or select for a target it was profiled on",
            )


@dataclass(frozen=True)
class Selection:
    """One descendant per block, with the estimated accuracy, latency and memory of the result."""

    choices: tuple[int, ...]
    accuracy: float
    latency_ms: float
    memory_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
