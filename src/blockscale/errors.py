"""Typed errors: each names the problem and the fix, so users never read a stack trace from torch."""

from __future__ import annotations


class BlockscaleError(Exception):
    """Base of every error blockscale raises on purpose.

    ``hint`` says how to fix the problem; it is appended to the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\n  fix: {hint}" if hint else message)


class ConfigError(BlockscaleError, ValueError):
    """A setting out of its range (an epoch count of 0, a sparsity of 1.5, a negative budget)."""


class UnknownModelError(BlockscaleError, KeyError):
    """A model name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return Exception.__str__(self)


class DatasetNotFoundError(BlockscaleError, FileNotFoundError):
    """A data set whose files cannot be found locally or fetched."""


class DatasetFormatError(BlockscaleError, ValueError):
    """A data file that exists but is not what its format promises."""


class InputShapeError(BlockscaleError, ValueError):
    """An example input whose shape the model does not accept."""


class UntraceableModelError(BlockscaleError):
    """A model that ``torch.fx`` cannot trace symbolically."""


class BlockPlanError(BlockscaleError, ValueError):
    """Blocks that cannot be cut as asked (not single-entry, single-exit, overlapping, unknown)."""


class PruningError(BlockscaleError):
    """A block that cannot be pruned into a shape-preserving descendant."""


class GraphFormatError(BlockscaleError, ValueError):
    """A serialized graph that names an operation or layer outside the safe allow-list."""


class BankError(BlockscaleError):
    """A bank that cannot be written or read."""


class BankCorruptError(BankError):
    """A bank file that is missing, truncated or does not match its recorded sha256."""


class BankVersionError(BankError):
    """A bank written with a schema version this release cannot read."""


class CheckpointError(BlockscaleError):
    """A checkpoint that cannot be read or does not fit the model."""


class InfeasibleBudgetError(BlockscaleError, ValueError):
    """A budget that no selection meets; carries the smallest latency and memory achievable."""

    def __init__(
        self,
        message: str,
        *,
        min_latency_ms: float | None = None,
        min_memory_mb: float | None = None,
        hint: str | None = None,
    ) -> None:
        self.min_latency_ms = min_latency_ms
        self.min_memory_mb = min_memory_mb
        super().__init__(message, hint)


class InfeasibleMemberError(InfeasibleBudgetError):
    """One model of a joint selection whose own limits (``min_accuracy``, ``max_latency_ms``) no
    selection of its bank meets, whatever the shared budget; ``member`` is its position.

    ``min_latency_ms`` and ``min_memory_mb`` are the least that model's selections reaching its
    ``min_accuracy`` need (None when none reaches it).
    """

    def __init__(
        self,
        message: str,
        *,
        member: int,
        min_latency_ms: float | None = None,
        min_memory_mb: float | None = None,
        hint: str | None = None,
    ) -> None:
        self.member = member
        super().__init__(
            message, min_latency_ms=min_latency_ms, min_memory_mb=min_memory_mb, hint=hint
        )


class SolverError(BlockscaleError):
    """An optimiser that stopped without an answer it can vouch for (a time limit, numerical trouble)."""


class ProfileError(BlockscaleError):
    """A bank that lacks the profiles a step needs (for instance latency on the asked target)."""


class ExportError(BlockscaleError):
    """A model or frame that cannot be exported to ONNX, whose export disagrees with torch, or an ONNX
    model that does not fit the slot it is put in."""


class TraceError(BlockscaleError, ValueError):
    """A resource trace that cannot be read or does not hold what a trace must (``line``: the line
    of the file at fault, when there is one)."""

    def __init__(self, message: str, *, line: int | None = None, hint: str | None = None) -> None:
        self.line = line
        super().__init__(message, hint)
