"""Profiling: what each descendant costs and loses, and how well the additive estimate holds.

For every descendant: the accuracy drop when it alone replaces its block in the teacher (on a
validation set), MACs and parameters, memory, and batch-1 latency on a target. Memory is the
parameter and buffer bytes plus the peak bytes of activations alive at once while the block runs
in the model at batch 1: its input, its own activations and whatever the model holds around it. A
selection's estimate adds the parts, as LegoDNN does: latencies and weights add up, the activation
peak is the largest block's or the frame's (exact: blocks run one after another), and accuracy
drops add up either in points (LegoDNN) or in log-odds of accuracy (``BankProfile.combine``),
which follows compounding.
:func:`validate` then measures a sample of random selections to report the estimate's error.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ._progress import progress_bar
from .derive import Descendant
from .errors import ConfigError, ProfileError, UntraceableModelError
from .extract import Decomposition, compose, slot_name, trace
from .select import CostTable
from .select import frontier as pareto_frontier
from .targets import Target
from .train import evaluate
from .types import Profile, require_latency


@dataclass(frozen=True)
class ProfileConfig:
    """How profiling measures latency (warm-up runs per round, timed runs in all, spread over
    ``rounds`` round-robin passes) and the evaluation batch size."""

    warmup: int = 5
    repeats: int = 100
    rounds: int = 10
    batch_size: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Combine = Literal["sum", "logit", "fitted"]
_EDGE = 1e-4  # accuracies are clipped to [_EDGE, 1 - _EDGE] before taking log-odds
# the links the interaction fit chooses among: exponents of the error rate (0: its logarithm)
GAMMAS = (-1.0, -0.5, -0.25, 0.0)
_FIT_SELECTIONS = 5000  # random selections the interaction fit predicts per image, then fits
_FIT_HELD_OUT = 1000  # of which this many (at most a fifth) judge the links
_LOGITS_LIMIT = 2**31  # bytes of per-image logits profiling keeps for the fit; above, no fit
_WEIGHT_RIDGE = 0.1  # block weights are pulled toward 1 by this much


def _link(
    combine: Combine, gamma: float | None
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The scale accuracy costs add up on, and its inverse (both act on floats and arrays):
    points, log-odds, or a power of the error rate, ``h(a) = ((1 - a) ** gamma - 1) / -gamma``
    (``-log(1 - a)`` at ``gamma = 0``), whose curvature the interaction fit chooses."""
    if combine == "sum":
        return (lambda a: a), (lambda v: np.maximum(v, 0.0))
    if combine == "logit":

        def logit(a: Any) -> Any:
            a = np.clip(a, _EDGE, 1.0 - _EDGE)
            return np.log(a / (1.0 - a))

        return logit, (lambda v: 1.0 / (1.0 + np.exp(-np.asarray(v, dtype=float))))
    g = 0.0 if gamma is None else gamma
    if g == 0.0:
        return (
            lambda a: -np.log(np.clip(1.0 - np.asarray(a, dtype=float), _EDGE, 1.0)),
            lambda v: np.clip(1.0 - np.exp(-np.asarray(v, dtype=float)), 0, 1),
        )
    return (
        lambda a: (np.clip(1.0 - np.asarray(a, dtype=float), _EDGE, 1.0) ** g - 1.0) / -g,
        lambda v: np.clip(
            1.0 - np.clip(1.0 - g * np.asarray(v, dtype=float), _EDGE, None) ** (1.0 / g), 0, 1
        ),
    )


@dataclass(frozen=True)
class DropCorrection:
    """A monotone map from the summed per-block costs ``s`` to the cost of the whole selection.

    ``g(s) = linear * s + quadratic * max(s, 0) ** 2``, fitted on measured selections: drops compound
    when several blocks are pruned hard, which a plain sum misses. Because ``g`` is increasing, the
    selection that minimises ``s`` under a budget also minimises ``g(s)``: the exact optimum is
    unchanged, only its accuracy estimate improves.
    """

    linear: float = 1.0
    quadratic: float = 0.0

    def __call__(self, summed: float) -> float:
        return self.linear * summed + self.quadratic * max(summed, 0.0) ** 2

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def fit(
        cls, summed: Sequence[float], measured: Sequence[float], upper: float
    ) -> DropCorrection:
        """Least squares through the origin; falls back to linear when the quadratic is not
        increasing on ``[0, upper]``, and to the identity when the fit is not increasing at all."""
        x = np.asarray(summed, dtype=float)
        y = np.asarray(measured, dtype=float)
        if len(x) >= 2 and np.ptp(x) > 0:
            design = np.stack([x, np.maximum(x, 0.0) ** 2], axis=1)
            (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
            if a >= 0 and a + 2 * b * max(upper, 0.0) >= 0:
                return cls(float(a), float(b))
        denominator = float(x @ x)
        a = float(x @ y) / denominator if denominator > 0 else 1.0
        return cls(a, 0.0) if a > 0 else cls()


@dataclass(frozen=True)
class LatencyCorrection:
    """An increasing affine map from a selection's summed latency on one target to what it
    measures there as one model: ``offset_ms + scale * summed``, and how far off it was.

    Each descendant is timed alone, so the sum misses what a compiled backend does across block
    seams: fusions, and layouts a pruned width gets inside the whole graph. Fitted on the
    validated selections (:func:`corrected_latency_errors`); applied as every descendant's
    latency times ``scale`` and the frame's times ``scale`` plus ``offset_ms``, so the estimate
    stays additive and selection stays exact. ``residuals`` are the validated selections'
    measured latency over the estimate, out of sample: :meth:`headroom` turns them into the
    factor a budget is divided by to be met with a given confidence. The identity map with
    residuals is the plain sum's spread, kept when the fit did not beat it.
    """

    offset_ms: float = 0.0
    scale: float = 1.0
    residuals: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "residuals", tuple(float(r) for r in self.residuals))

    def __call__(self, summed_ms: float) -> float:
        return self.offset_ms + self.scale * summed_ms

    def to_dict(self) -> dict[str, Any]:
        return {"offset_ms": self.offset_ms, "scale": self.scale, "residuals": list(self.residuals)}

    def headroom(self, confidence: float) -> float:
        """The factor (at least 1) that the estimate is multiplied by so that a selection the
        estimate puts within a budget meets it as measured in ``confidence`` of the validated
        selections: the least residual that at least that share of them do not exceed."""
        if not 0 < confidence < 1:
            raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
        if not self.residuals:
            raise ProfileError(
                "this latency estimate has no measured selections to draw a margin from",
                hint="validate the bank on the target (build with --validate-samples N)",
            )
        return max(1.0, float(np.quantile(self.residuals, confidence, method="inverted_cdf")))

    @classmethod
    def fit(
        cls,
        estimated: Sequence[float],
        measured: Sequence[float],
        teacher_ms: float,
        frame_ms: float = 0.0,
    ) -> LatencyCorrection:
        """Least squares of ``measured`` on ``estimated``, both ratios to the teacher (timed in
        the same turns, so the machine's drift cancels), turned into ms with the teacher's
        summed latency ``teacher_ms``. Constrained so that the frame's ``frame_ms`` maps to no
        less than 0 (a latency the selector adds up must not be negative): when the plain fit
        breaks that, the best fit with the frame mapped to exactly 0. The identity when the fit
        is not increasing. No residuals: :func:`corrected_latency_errors` adds them."""
        x = np.asarray(estimated, dtype=float)
        y = np.asarray(measured, dtype=float)
        if len(x) < 2 or np.ptp(x) <= 0:
            return cls()
        frame = frame_ms / teacher_ms
        scale, offset = np.polyfit(x, y, 1)
        if offset >= -scale * frame:
            return cls(float(offset) * teacher_ms, float(scale)) if scale > 0 else cls()
        shifted = x - frame
        scale = float(shifted @ y) / float(shifted @ shifted)
        return cls(-scale * frame_ms, scale) if scale > 0 else cls()  # the frame to exactly 0


@dataclass
class BankProfile:
    """Profiles of a whole bank: teacher accuracy, the frame, every descendant, and targets.

    How a selection's accuracy is estimated from its parts (``combine``): its descendants' drops
    added in points (``"sum"``, LegoDNN) or in log-odds (``"logit"``), or the costs the
    interaction fit gave every descendant (``"fitted"``, ``fitted_costs`` on the link of exponent
    ``gamma``; see :func:`fit_interactions`), scaled per block by ``block_weights`` when
    validation fitted them. Every way is additive, so selection stays exact. Latency on a target
    is the sum of its parts, mapped by the target's :class:`LatencyCorrection` when validation
    fitted one (:meth:`latencies`).
    """

    teacher_accuracy: float
    frame: Profile
    descendants: list[list[Profile]]
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    val_samples: int = 0
    correction: DropCorrection | None = None
    combine: Combine = "sum"
    fitted_costs: list[list[float]] | None = None
    gamma: float | None = None
    block_weights: list[float] | None = None
    latency_corrections: dict[str, LatencyCorrection] = field(default_factory=dict)

    def latencies(
        self, target: str, confidence: float | None = None
    ) -> tuple[float, list[list[float]]]:
        """The frame's and every descendant's latency on ``target`` (ms), through the target's
        :class:`LatencyCorrection` if it has one; with a ``confidence``, times its
        :meth:`~LatencyCorrection.headroom`, so that selections within a budget meet it as
        measured that often."""
        require_latency([self.frame, *(p for family in self.descendants for p in family)], target)
        fix = self.latency_corrections.get(target, LatencyCorrection())
        if confidence is not None:
            if not fix.residuals and self.validation.get(target, {}).get("records"):
                fix = refit_latency_estimate(self, target)  # a bank from before residuals
            if not fix.residuals:
                raise ProfileError(
                    f"no validated selections on {target!r} to draw a latency margin from",
                    hint="validate the bank there (build with --validate-samples N), or select "
                    "without a confidence",
                )
            margin = fix.headroom(confidence)
            fix = LatencyCorrection(margin * fix.offset_ms, margin * fix.scale)
        frame_ms = fix(self.frame.latency_ms[target])
        if frame_ms < 0 or fix.scale <= 0:
            raise ProfileError(
                f"the latency correction of target {target!r} ({fix}) maps the frame or a "
                "descendant below 0 ms",
                hint=f"measure the target again (blockscale profile BANK --target {target}), "
                "which drops the correction",
            )
        return frame_ms, [
            [fix.scale * p.latency_ms[target] for p in family] for family in self.descendants
        ]

    def _link(self) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        return _link(self.combine, self.gamma)

    def cost(self, drop: float) -> float:
        """The additive cost of an accuracy drop of ``drop`` from the teacher on this profile's
        scale: points (``"sum"``), log-odds (``"logit"``) or the fitted link (``"fitted"``)."""
        h, _ = self._link()
        return float(h(self.teacher_accuracy) - h(self.teacher_accuracy - drop))

    def base_costs(self) -> list[list[float]]:
        """Every descendant's cost before block weights: fitted, or its own drop's."""
        if self.combine == "fitted":
            if self.fitted_costs is None:
                raise ProfileError(
                    "this profile combines fitted costs but holds none",
                    hint="profile the bank again, or build with combine='logit'",
                )
            return [list(map(float, fam)) for fam in self.fitted_costs]
        return [[self.cost(p.accuracy_drop) for p in fam] for fam in self.descendants]

    def costs(self) -> list[list[float]]:
        """Every descendant's additive cost for selection, block weights applied."""
        weights = self.block_weights or [1.0] * len(self.descendants)
        return [[w * c for c in fam] for w, fam in zip(weights, self.base_costs(), strict=True)]

    def cost_of(self, accuracy: float) -> float:
        """The summed cost that a selection measured at ``accuracy`` has (inverse of accuracy)."""
        h, _ = self._link()
        return float(h(self.teacher_accuracy) - h(accuracy))

    def accuracy(self, summed_cost: float, correction: DropCorrection | None = None) -> float:
        """Estimated accuracy of a selection whose descendants' costs add up to ``summed_cost``,
        through ``correction`` (default: the bank's own, if any)."""
        correction = correction or self.correction
        cost = correction(summed_cost) if correction else summed_cost
        h, inverse = self._link()
        return float(inverse(h(self.teacher_accuracy) - cost))

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_accuracy": self.teacher_accuracy,
            "val_samples": self.val_samples,
            "frame": self.frame.to_dict(),
            "descendants": [[p.to_dict() for p in family] for family in self.descendants],
            "targets": self.targets,
            "validation": self.validation,
            "correction": self.correction.to_dict() if self.correction else None,
            "combine": self.combine,
            "fitted_costs": self.fitted_costs,
            "gamma": self.gamma,
            "block_weights": self.block_weights,
            "latency_corrections": {t: c.to_dict() for t, c in self.latency_corrections.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BankProfile:
        return cls(
            teacher_accuracy=float(data["teacher_accuracy"]),
            frame=Profile.from_dict(data["frame"]),
            descendants=[[Profile.from_dict(p) for p in fam] for fam in data["descendants"]],
            targets=dict(data.get("targets", {})),
            validation=dict(data.get("validation", {})),
            val_samples=int(data.get("val_samples", 0)),
            correction=DropCorrection(**data["correction"]) if data.get("correction") else None,
            combine=data.get("combine", "sum"),
            fitted_costs=data.get("fitted_costs"),
            gamma=data.get("gamma"),
            block_weights=data.get("block_weights"),
            latency_corrections={
                t: LatencyCorrection(**c) for t, c in data.get("latency_corrections", {}).items()
            },
        )


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one batch-1 forward pass (convolutions and matrix products)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops() // 2)


def peak_activation_bytes(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Peak bytes of activations alive at once in a batch-1 pass, the input included.

    Exact for every module ``torch.fx`` traces: a liveness sweep over its graph in which the input
    stays alive throughout (the caller holds it) and a submodule that is itself a graph module (a
    composed model's blocks) is swept in turn, with what the outer graph holds added to its own
    peak. For a module fx cannot trace, the larger of the input and output: a lower bound.
    """
    x = torch.zeros(1, *input_shape)
    try:
        graph_module = module if isinstance(module, fx.GraphModule) else trace(module)
    except UntraceableModelError:
        with torch.no_grad():
            out = module.eval()(x)
        return max(_nbytes(x), _nbytes(out))
    return _sweep(graph_module, (x,))[0]


def _sweep(module: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> tuple[int, dict[str, int]]:
    """The liveness sweep of :func:`peak_activation_bytes` over one graph given its inputs: the
    peak, and for each submodule call the bytes the graph holds around it (its inputs excluded)."""
    with torch.no_grad():
        ShapeProp(module.eval()).propagate(*args)
    nodes = [n for n in module.graph.nodes if n.op not in ("get_attr", "output")]
    pos = {n: i for i, n in enumerate(nodes)}
    end = {
        n: len(nodes)
        if n.op == "placeholder"
        else max((pos.get(u, len(nodes)) for u in n.users), default=pos[n])
        for n in nodes
    }
    sizes = {n: _meta_bytes(n) for n in nodes}
    peak, around = 0, {}
    for i, node in enumerate(nodes):
        held = sum(sizes[n] for n in nodes[:i] if end[n] >= i)
        peak = max(peak, held + sizes[node])
        if node.op != "call_module":
            continue
        around[node.target] = held - sum(sizes[a] for a in node.all_input_nodes if a in sizes)
        inner = module.get_submodule(node.target)
        if isinstance(inner, fx.GraphModule) and all(
            isinstance(a, fx.Node) and "tensor_meta" in a.meta for a in node.args
        ):
            examples = tuple(
                torch.zeros(a.meta["tensor_meta"].shape, dtype=a.meta["tensor_meta"].dtype)
                for a in node.args
            )
            peak = max(peak, around[node.target] + _sweep(inner, examples)[0])
    return peak, around


def slot_context_bytes(decomposition: Decomposition) -> list[int]:
    """Per block, the activation bytes the model holds while the block runs besides the block's
    own: the model's input, which the caller holds throughout, unless it is the block's input (a
    block is single-entry, so nothing else of the frame's lives across it). Zeros for a frame fx
    cannot trace, whose estimate is then a lower bound."""
    frame = _frame_alone(decomposition)
    if not isinstance(frame, fx.GraphModule):
        return [0] * decomposition.plan.num_blocks
    x = torch.zeros(1, *decomposition.plan.input_shape)
    _, around = _sweep(frame, (x,))
    return [around.get(slot_name(b), 0) for b in range(decomposition.plan.num_blocks)]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _meta_bytes(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    metas = (
        [meta]
        if isinstance(meta, TensorMetadata)
        else meta
        if isinstance(meta, list | tuple)
        else []
    )
    total = 0
    for m in metas:
        shape = getattr(m, "shape", None)
        if shape is not None:
            total += int(np.prod(shape)) * torch.empty((), dtype=m.dtype).element_size()
    return total


class _Replay(nn.Module):
    """Stands in for a block when timing the frame alone: returns a fixed tensor at no cost."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("output", output, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


def _frame_alone(decomposition: Decomposition) -> nn.Module:
    shapes = [b.output_shape for b in decomposition.plan.blocks]
    return compose(decomposition, [_Replay(torch.zeros(1, *s)) for s in shapes])


def profile(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    val_set: Dataset,
    target: Target | None = None,
    config: ProfileConfig | None = None,
    *,
    progress: bool = True,
) -> BankProfile:
    """Measure every descendant: accuracy drop alone in the teacher, size, MACs, latency."""
    target = target or Target()
    config = config or ProfileConfig()
    plan = decomposition.plan
    teacher = compose(decomposition, decomposition.blocks)
    context = slot_context_bytes(decomposition)
    total = sum(len(f) for f in descendants) + 2
    with progress_bar("profile accuracy and size", total, enabled=progress) as advance:
        teacher_logits, labels = _logits(teacher, val_set, config.batch_size)
        teacher_accuracy = float((teacher_logits.argmax(1) == labels).mean())
        frame_module = _frame_alone(decomposition)
        frame = Profile(
            block=-1,
            index=0,
            accuracy_drop=0.0,
            params=plan.frame_params,
            macs=count_macs(frame_module, plan.input_shape),
            weight_bytes=weight_bytes(decomposition.frame)
            - sum(weight_bytes(b) for b in decomposition.blocks),
            activation_bytes=_frame_activation(decomposition),
            latency_ms={},
        )
        advance()
        families = []
        logits: list[list[np.ndarray | None]] = []
        keep = _logits_bytes(teacher_logits, descendants) <= _LOGITS_LIMIT
        for info, family in zip(plan.blocks, descendants, strict=True):
            profiles = []
            logits.append([])
            for d in family:
                blocks = list(decomposition.blocks)
                blocks[info.index] = d.module
                if not d.info.pruned:
                    accuracy, changed = teacher_accuracy, None
                else:
                    changed, _ = _logits(compose(decomposition, blocks), val_set, config.batch_size)
                    accuracy = float((changed.argmax(1) == labels).mean())
                logits[-1].append(changed if keep else None)
                profiles.append(
                    Profile(
                        block=info.index,
                        index=d.info.index,
                        accuracy_drop=teacher_accuracy - accuracy,
                        params=sum(p.numel() for p in d.module.parameters()),
                        macs=count_macs(d.module, info.input_shape),
                        weight_bytes=weight_bytes(d.module),
                        activation_bytes=context[info.index]
                        + peak_activation_bytes(d.module, info.input_shape),
                        latency_ms={},
                    )
                )
                advance(block=info.index)
            families.append(profiles)
        advance()
    gamma, fitted = None, None
    if keep:
        gamma, fitted, _ = fit_interactions(teacher_logits, logits, labels)
    profiles = BankProfile(
        teacher_accuracy=teacher_accuracy,
        frame=frame,
        descendants=families,
        val_samples=len(val_set),
        fitted_costs=fitted,
        gamma=gamma,
    )
    return add_target(profiles, decomposition, descendants, target, config, progress=progress)


@torch.no_grad()
def _logits(model: nn.Module, dataset: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s logits (float32) for every item of ``dataset``, in order, and the labels."""
    model.eval()
    outputs, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        outputs.append(model(images).float().numpy())
        labels.append(np.asarray(targets))
    return np.concatenate(outputs), np.concatenate(labels)


def _logits_bytes(teacher: np.ndarray, descendants: Sequence[Sequence[Descendant]]) -> int:
    """What keeping every pruned descendant's logits for the interaction fit takes."""
    pruned = sum(d.info.pruned for family in descendants for d in family)
    return teacher.nbytes * pruned


def fit_interactions(
    teacher_logits: np.ndarray,
    logits: Sequence[Sequence[np.ndarray | None]],
    labels: np.ndarray,
    *,
    selections: int = _FIT_SELECTIONS,
    seed: int = 0,
) -> tuple[float, list[list[float]], dict[float, float]]:
    """Additive costs per descendant that follow how drops compound, from each descendant's
    logits alone in the teacher (``logits[b][d]``; None for the teacher's own block).

    Per image, a selection's logits are predicted as the teacher's plus each chosen descendant's
    change to them, which sees what a sum of accuracy drops misses: an image that two small
    changes flip and neither flips alone. The predicted accuracies of ``selections`` uniformly
    random selections are fitted by one cost per descendant, by least squares on each link of
    ``GAMMAS``; the link whose fit predicts held-out selections best is kept, refitted on all of
    them, and its costs are clamped at 0 (a pruned block does not gain accuracy, and an exact
    optimiser would exploit a negative cost). No selection is measured for this.

    Returns the link's exponent, ``costs[b][d]`` (0 for the teacher's own blocks), and each
    link's mean absolute error (accuracy) on the held-out selections.
    """
    teacher = teacher_logits.astype(np.float32)
    sizes = [len(fam) for fam in logits]
    rng = np.random.default_rng(seed)
    choices = np.stack([rng.integers(0, k, selections) for k in sizes], axis=1)
    predicted = predict_selections(teacher, logits, labels, choices)
    accuracy = float((teacher.argmax(1) == labels).mean())
    fixed = [[x is None for x in fam] for fam in logits]
    return fit_additive(choices, predicted, accuracy, fixed)


def predict_selections(
    teacher_logits: np.ndarray,
    logits: Sequence[Sequence[np.ndarray | None]],
    labels: np.ndarray,
    choices: np.ndarray,
) -> np.ndarray:
    """Each selection's accuracy (rows of ``choices``) as the per-image model predicts it: the
    teacher's logits plus every chosen descendant's change to them, then the arg-max."""
    teacher = teacher_logits.astype(np.float32)
    deltas = [
        [None if x is None else x.astype(np.float32) - teacher for x in fam] for fam in logits
    ]
    predicted = np.empty(len(choices))
    for i, picks in enumerate(choices):
        z = teacher.copy()
        for b, d in enumerate(picks):
            if deltas[b][d] is not None:
                z += deltas[b][d]
        predicted[i] = (z.argmax(1) == labels).mean()
    return predicted


def fit_additive(
    choices: np.ndarray,
    accuracies: np.ndarray,
    teacher_accuracy: float,
    fixed: Sequence[Sequence[bool]],
) -> tuple[float, list[list[float]], dict[float, float]]:
    """One cost per descendant (0 where ``fixed``) whose sums, on the link of each exponent of
    ``GAMMAS``, best fit the selections' ``accuracies`` by least squares; the link that predicts
    the held-out selections best is kept and refitted on all, its costs clamped at 0. Returns
    the exponent, the costs and each link's held-out mean absolute error."""
    columns = [(b, d) for b, fam in enumerate(fixed) for d, f in enumerate(fam) if not f]
    index = {key: j for j, key in enumerate(columns)}
    design = np.zeros((len(choices), len(columns)))
    for i, picks in enumerate(choices):
        for b, d in enumerate(picks):
            if (b, d) in index:
                design[i, index[b, d]] = 1.0
    cut = min(_FIT_HELD_OUT, len(choices) // 5)
    train, held = slice(cut, None), slice(0, cut)
    errors = {}
    for gamma in GAMMAS:
        h, inverse = _link("fitted", gamma)
        target = h(teacher_accuracy) - h(accuracies)
        fit, *_ = np.linalg.lstsq(design[train], target[train], rcond=None)
        estimate = inverse(h(teacher_accuracy) - design[held] @ fit)
        errors[gamma] = float(np.abs(estimate - accuracies[held]).mean())
    gamma = min(GAMMAS, key=lambda g: errors[g])
    h, _ = _link("fitted", gamma)
    fit, *_ = np.linalg.lstsq(design, h(teacher_accuracy) - h(accuracies), rcond=None)
    costs = [[0.0] * len(fam) for fam in fixed]
    for (b, d), value in zip(columns, fit, strict=True):
        costs[b][d] = max(float(value), 0.0)
    return gamma, costs, errors


def _frame_activation(decomposition: Decomposition) -> int:
    """Peak activation bytes of the frame, with each block seen as one step (input and output)."""
    return peak_activation_bytes(_frame_alone(decomposition), decomposition.plan.input_shape)


Key = tuple[int, int]  # (block, index) of a descendant


def add_target(
    bank_profile: BankProfile,
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    target: Target,
    config: ProfileConfig | None = None,
    *,
    progress: bool = True,
) -> BankProfile:
    """Measure latency on ``target`` and add it to the profiles (nothing is retrained); see
    :func:`time_descendants` for how. A validation of the target's earlier latencies, and the
    correction fitted on it, no longer hold and are dropped."""
    frame_ms, latency = time_descendants(
        decomposition, descendants, target, config, progress=progress
    )
    assert frame_ms is not None
    bank_profile.validation.pop(target.name, None)
    bank_profile.latency_corrections.pop(target.name, None)
    bank_profile.frame.latency_ms[target.name] = frame_ms
    for family, profiles in zip(descendants, bank_profile.descendants, strict=True):
        for d, p in zip(family, profiles, strict=True):
            p.latency_ms[target.name] = latency[d.info.block, d.info.index]
    bank_profile.targets[target.name] = target.to_dict()
    return bank_profile


def time_descendants(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    target: Target,
    config: ProfileConfig | None = None,
    *,
    only: set[Key] | None = None,
    frame: bool = True,
    progress: bool = True,
) -> tuple[float | None, dict[Key, float]]:
    """The frame's latency on ``target`` (None without ``frame``) and that of each descendant
    whose (block, index) is in ``only`` (default: every one), in ms.

    In torch eager each descendant is timed in its
    block's slot of the teacher (its own span, read by hooks), under the conditions it meets in a
    selection; a compiled backend (ONNX Runtime) runs a selection as one optimised graph with no
    seams to time at, so there each descendant is timed alone (see ``_alone_latency``).
    """
    config = config or ProfileConfig()
    every = {(d.info.block, d.info.index) for family in descendants for d in family}
    wanted = every if only is None else set(only)
    if wanted - every:
        raise ConfigError(
            f"no descendants {sorted(wanted - every)} in this bank",
            hint="name descendants as (block, index) pairs of the bank's families",
        )
    measure = _slot_latency if target.backend == "torch" else _alone_latency
    frame_ms, latency = measure(decomposition, descendants, target, config, wanted, frame, progress)
    return (frame_ms if frame else None), {key: latency[key] for key in wanted}


def _slot_latency(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    target: Target,
    config: ProfileConfig,
    wanted: set[Key],
    frame: bool,
    progress: bool,
) -> tuple[float, dict[Key, float]]:
    """Torch eager: each wanted descendant's own time in its slot (forward hooks), the frame's
    as the teacher's minus its blocks'. The teacher runs when the frame or an unpruned
    descendant is wanted."""
    plan = decomposition.plan
    runs = []
    unpruned = {(d.info.block, d.info.index) for f in descendants for d in f if not d.info.pruned}
    if frame or wanted & unpruned:
        runs.append(
            (compose(decomposition, decomposition.blocks), list(decomposition.blocks), None)
        )
    for info, family in zip(plan.blocks, descendants, strict=True):
        for d in family:
            if d.info.pruned and (info.index, d.info.index) in wanted:
                blocks = list(decomposition.blocks)
                blocks[info.index] = d.module
                runs.append(
                    (compose(decomposition, blocks), [d.module], (info.index, d.info.index))
                )
    # Round-robin: every module's samples spread over the whole measurement, so a machine whose
    # speed drifts (shared, throttled) shifts all of them alike instead of some more than others.
    rounds = max(1, min(config.rounds, config.repeats))
    per_round = max(1, config.repeats // rounds)
    samples: list[list[list[float]]] = [[[] for _ in range(len(slots) + 1)] for _, slots, _ in runs]
    with progress_bar(f"latency on {target.name}", rounds * len(runs), enabled=progress) as advance:
        for _ in range(rounds):
            for r, (model, slots, _) in enumerate(runs):
                taken = target.samples_ms(
                    model, plan.input_shape, slots, warmup=config.warmup, repeats=per_round
                )
                for store, new in zip(samples[r], taken, strict=True):
                    store.extend(new)
                advance()
    median = statistics.median
    latency = {key: median(samples[r][1]) for r, (_, _, key) in enumerate(runs) if key}
    if not runs or runs[0][2] is not None:  # the teacher did not run
        return 0.0, latency
    whole, *inside = (median(s) for s in samples[0])
    for key in wanted & unpruned:
        latency[key] = inside[key[0]]
    return max(0.0, whole - sum(inside)), latency


def _alone_latency(
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    target: Target,
    config: ProfileConfig,
    wanted: set[Key],
    frame: bool,
    progress: bool,
) -> tuple[float, dict[Key, float]]:
    """A compiled backend: every wanted descendant timed alone in its own session, less what a
    session doing nothing costs per call on the same input; the frame's latency is the teacher's
    (one optimised graph) minus its blocks'. All timed round-robin in one pass.

    A compiled selection has no seams to time a slot at, and differences of whole-teacher timings
    are too noisy for blocks this small; timed alone, a descendant keeps its own optimisations and
    only loses those that span block boundaries, which the frame's share absorbs.
    """
    plan = decomposition.plan
    teacher = {
        (info.index, family[0].info.index)
        for info, family in zip(plan.blocks, descendants, strict=True)
    }
    timed = wanted | teacher if frame else wanted
    chosen = [
        (info, d)
        for info, family in zip(plan.blocks, descendants, strict=True)
        for d in family
        if (info.index, d.info.index) in timed
    ]
    with progress_bar(f"compile for {target.name}", 1, enabled=progress) as advance:
        runner = target.runner(decomposition)
        advance()
    shapes = sorted({info.input_shape for info, _ in chosen})
    total = int(frame) + len(shapes) + len(chosen)
    with progress_bar(f"build {target.name} sessions", total, enabled=progress) as advance:
        calls = [runner.model(decomposition.blocks)] if frame else []
        for shape in shapes:
            calls.append(runner.idle(shape))
            advance()
        for info, d in chosen:
            calls.append(runner.block(d.module, info.input_shape))
            advance()
    with progress_bar(f"latency on {target.name}", 1, enabled=progress) as advance:
        spans = target.time_calls(
            calls, warmup=config.warmup, repeats=config.repeats, rounds=config.rounds
        )
        advance()
    medians = iter(statistics.median(s) for s in spans)
    whole = next(medians) if frame else 0.0
    idle = {shape: next(medians) for shape in shapes}
    latency = {
        (info.index, d.info.index): max(0.0, next(medians) - idle[info.input_shape])
        for info, d in chosen
    }
    if not frame:
        return 0.0, latency
    return max(0.0, whole - sum(latency[key] for key in teacher)), latency


def estimate(bank_profile: BankProfile, choices: Sequence[int], target: str) -> dict[str, float]:
    """The additive estimate of a selection: accuracy, latency (ms) and memory (MB)."""
    parts = [bank_profile.descendants[b][d] for b, d in enumerate(choices)]
    costs = bank_profile.costs()
    frame = bank_profile.frame
    frame_ms, latency = bank_profile.latencies(target)
    activation = max([frame.activation_bytes, *(p.activation_bytes for p in parts)])
    weights = frame.weight_bytes + sum(p.weight_bytes for p in parts)
    return {
        "accuracy": bank_profile.accuracy(sum(costs[b][d] for b, d in enumerate(choices))),
        "latency_ms": frame_ms + sum(latency[b][d] for b, d in enumerate(choices)),
        "memory_mb": (weights + activation) / 2**20,
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def validate(
    bank_profile: BankProfile,
    decomposition: Decomposition,
    descendants: Sequence[Sequence[Descendant]],
    val_set: Dataset | None,
    target: Target,
    *,
    samples: int = 20,
    frontier: int = 0,
    seed: int = 0,
    config: ProfileConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure random selections end to end and compare them with the additive estimate.

    Returns the accuracy MAE (points) and Spearman correlation, the latency MAPE (%) and Spearman
    correlation, the corrections fitted on them with their leave-one-out errors, and every
    measured selection. Latency is estimated by the plain sum (any correction the target has is
    left out), which the latency correction is fitted to. Without a ``val_set``, latency alone:
    what a target added later (``calibrate``) is checked and corrected on, with no images.

    With ``frontier``, that many selections spread along the estimate's accuracy-latency
    frontier are then measured too (under ``"frontier"``): the kind selection picks, whose
    latency the estimate understates more often than a random selection's, since the solver
    seeks out what looks fast. They are out of sample for the corrections fitted on the random
    ones, and their residuals are what :func:`kept_latency_estimate` draws a margin from.
    """
    if samples < 1:
        raise ConfigError(f"validate needs at least one sample, got {samples}")
    if frontier < 0:
        raise ConfigError(f"validate's frontier must be at least 0, got {frontier}")
    config = config or ProfileConfig()
    rng = random.Random(seed)
    plan = decomposition.plan
    runner = target.runner(decomposition)
    teacher = runner.model(decomposition.blocks)
    summed = dataclasses.replace(bank_profile, latency_corrections={})
    teacher_estimate = estimate(summed, [0] * plan.num_blocks, target.name)["latency_ms"]
    costs = bank_profile.costs()

    def measure(choices: list[int]) -> dict[str, Any]:
        blocks = [descendants[b][d].module for b, d in enumerate(choices)]
        est = estimate(summed, choices, target.name)
        mine, reference = target.time_calls(
            [runner.model(blocks), teacher],
            warmup=config.warmup,
            repeats=config.repeats,
            rounds=config.rounds,
        )
        measured = statistics.median(mine)
        record = {
            "choices": choices,
            "estimated_latency_ms": est["latency_ms"],
            "estimated_latency_ratio": est["latency_ms"] / teacher_estimate,
            # the ratio to the teacher, timed in the same turns, cancels the drift of a
            # machine whose speed changed since the profile was measured
            "measured_latency_ms": measured,
            "measured_latency_ratio": measured / statistics.median(reference),
        }
        if val_set is not None:
            drops = [bank_profile.descendants[b][d].accuracy_drop for b, d in enumerate(choices)]
            record.update(
                summed_cost=sum(costs[b][d] for b, d in enumerate(choices)),
                sum_estimated_accuracy=bank_profile.teacher_accuracy - sum(drops),
                estimated_accuracy=est["accuracy"],
                measured_accuracy=evaluate(
                    compose(decomposition, blocks), val_set, batch_size=config.batch_size
                ),
            )
        return record

    start = time.perf_counter()
    with progress_bar("validate estimates", samples, enabled=progress) as advance:
        records = []
        for _ in range(samples):
            records.append(measure([rng.randrange(len(f)) for f in descendants]))
            advance()
    summary = summarize_validation(records, target.name, time.perf_counter() - start)
    if val_set is not None:
        summary.update(corrected_accuracy_errors(records, bank_profile))
        summary.update(weighted_accuracy_errors(records, bank_profile))
    frame_ms = summed.frame.latency_ms[target.name]
    summary.update(corrected_latency_errors(records, teacher_estimate, frame_ms))
    if frontier:
        # the frontier of the estimate selection will use: with the accuracy correction kept
        kept_accuracy = kept_accuracy_estimate(summed, summary) if val_set is not None else summed
        points = frontier_choices(kept_accuracy, target.name, frontier)
        with progress_bar("validate the frontier", len(points), enabled=progress) as advance:
            picked = []
            for choices in points:
                record = measure(choices)
                if val_set is not None:
                    kept_est = estimate(kept_accuracy, choices, target.name)["accuracy"]
                    record["kept_estimated_accuracy"] = kept_est
                picked.append(record)
                advance()
        kept = kept_latency_estimate(summary)
        summary["frontier"] = frontier_errors(picked, kept, teacher_estimate)
    return summary


def frontier_choices(bank_profile: BankProfile, target: str, count: int) -> list[list[int]]:
    """``count`` selections (fewer if the frontier is shorter) evenly spaced by rank along the
    accuracy-latency frontier of ``bank_profile``'s estimate on ``target``. An increasing
    affine latency correction leaves the frontier as it is, so the plain sum's is the one."""
    latency = [[p.latency_ms[target] for p in family] for family in bank_profile.descendants]
    unused = [[0] * len(family) for family in latency]  # memory plays no part in this frontier
    table = CostTable.from_lists(
        bank_profile.costs(),
        latency,
        unused,
        unused,
        frame_latency_ms=bank_profile.frame.latency_ms[target],
    )
    points = [list(s.choices) for s in pareto_frontier(table)]
    ranks = np.unique(np.linspace(0, len(points) - 1, min(count, len(points))).round())
    return [points[int(r)] for r in ranks]


def frontier_errors(
    records: Sequence[dict[str, Any]], kept: LatencyCorrection, teacher_ms: float
) -> dict[str, Any]:
    """How the estimate that validation keeps (``kept``, fitted on random selections; ms, with
    the teacher's summed latency ``teacher_ms``) did on measured frontier selections: their
    residuals (measured over estimated latency, relative to the teacher), its relative latency
    MAPE and, when the records carry accuracy, the signed error there of the accuracy estimate
    kept (``kept_estimated_accuracy``)."""
    offset = kept.offset_ms / teacher_ms
    residuals = [
        r["measured_latency_ratio"] / (offset + kept.scale * r["estimated_latency_ratio"])
        for r in records
    ]
    summary: dict[str, Any] = {
        "samples": len(records),
        "latency_residuals": residuals,
        "latency_mape_percent": 100 * statistics.fmean(abs(1 - 1 / q) for q in residuals),
    }
    if records and "measured_accuracy" in records[0]:
        summary["accuracy_overestimate_points"] = 100 * statistics.fmean(
            r["kept_estimated_accuracy"] - r["measured_accuracy"] for r in records
        )
    summary["records"] = list(records)
    return summary


def corrected_latency_errors(
    records: Sequence[dict[str, Any]], teacher_ms: float, frame_ms: float = 0.0
) -> dict[str, Any]:
    """MAPE and Spearman of the :class:`LatencyCorrection` on latency relative to the teacher,
    by leave-one-out, and the correction fitted on all ``records`` (``teacher_ms`` and
    ``frame_ms``: the teacher's summed latency and the frame's on the target) with the
    leave-one-out residuals; and the plain sum's residuals (nothing fitted, so in sample is out
    of sample)."""
    est = [r["estimated_latency_ratio"] for r in records]
    real = [r["measured_latency_ratio"] for r in records]
    frame = frame_ms / teacher_ms
    predictions = []
    for i in range(len(records)):
        rest_est, rest_real = est[:i] + est[i + 1 :], real[:i] + real[i + 1 :]
        predictions.append(LatencyCorrection.fit(rest_est, rest_real, 1.0, frame)(est[i]))
    fit = LatencyCorrection.fit(est, real, teacher_ms, frame_ms)
    residuals = [m / p for p, m in zip(predictions, real, strict=True)]
    return {
        "latency_correction": dataclasses.replace(fit, residuals=residuals).to_dict(),
        "plain_latency_residuals": [m / e for e, m in zip(est, real, strict=True)],
        "corrected_latency_mape_percent": 100
        * statistics.fmean(abs(p - m) / m for p, m in zip(predictions, real, strict=True)),
        "corrected_latency_spearman": spearman(predictions, real),
    }


def kept_accuracy_estimate(bank_profile: BankProfile, check: dict[str, Any]) -> BankProfile:
    """``bank_profile`` with the accuracy correction that validation keeps, from
    :func:`validate`'s summary ``check``: for fitted costs the block weights, else the drop
    correction, each only when it beat the plain estimate out of sample."""
    if bank_profile.combine == "fitted":
        if check["weighted_accuracy_mae_points"] < check["accuracy_mae_points"]:
            return dataclasses.replace(bank_profile, block_weights=check["block_weights"])
    elif check["corrected_accuracy_mae_points"] < check["accuracy_mae_points"]:
        return dataclasses.replace(bank_profile, correction=DropCorrection(**check["correction"]))
    return bank_profile


def without_records(check: dict[str, Any]) -> dict[str, Any]:
    """A :func:`validate` summary without its measured selections (at the frontier too), for
    reports."""
    summary = {key: value for key, value in check.items() if key != "records"}
    if "frontier" in summary:
        summary["frontier"] = without_records(summary["frontier"])
    return summary


def kept_latency_estimate(check: dict[str, Any]) -> LatencyCorrection:
    """What validation keeps for a target's latency, from :func:`validate`'s summary: the
    fitted correction when it beat the plain sum out of sample, else the plain sum (the
    identity); with the residuals of the measured frontier selections when there are any (what
    the margin must cover), else the random selections' of the one kept."""
    if check["corrected_latency_mape_percent"] < check["relative_latency_mape_percent"]:
        kept = LatencyCorrection(**check["latency_correction"])
    else:
        kept = LatencyCorrection(residuals=check["plain_latency_residuals"])
    at_frontier = check.get("frontier", {}).get("latency_residuals")
    return dataclasses.replace(kept, residuals=at_frontier) if at_frontier else kept


def refit_latency_estimate(bank_profile: BankProfile, target: str) -> LatencyCorrection:
    """:func:`kept_latency_estimate` fitted again on the selections that validation stored for
    ``target``: the same correction, with the residuals a bank written before they were kept
    lacks, without measuring anything again."""
    records = bank_profile.validation[target]["records"]
    summed = dataclasses.replace(bank_profile, latency_corrections={})
    teacher_ms = estimate(summed, [0] * len(summed.descendants), target)["latency_ms"]
    check = {
        **_ratio_errors(records),
        **corrected_latency_errors(records, teacher_ms, summed.frame.latency_ms[target]),
    }
    at_frontier = bank_profile.validation[target].get("frontier", {}).get("records")
    if at_frontier:
        check["frontier"] = frontier_errors(at_frontier, kept_latency_estimate(check), teacher_ms)
    return kept_latency_estimate(check)


def fit_block_weights(
    records: Sequence[dict[str, Any]], bank_profile: BankProfile, ridge: float = _WEIGHT_RIDGE
) -> list[float]:
    """One weight per block on the descendants' costs, fitted to measured selections: ridge
    regression toward 1 of each selection's measured cost (``cost_of`` its accuracy) on its
    blocks' costs. Still additive, so selection stays exact; it corrects blocks whose drops,
    measured alone, over- or understate what they lose among other pruned blocks."""
    base = bank_profile.base_costs()
    x = np.array([[base[b][d] for b, d in enumerate(r["choices"])] for r in records])
    y = np.array([bank_profile.cost_of(r["measured_accuracy"]) for r in records])
    n = x.shape[1]
    weights = np.linalg.solve(x.T @ x + ridge * np.eye(n), x.T @ y + ridge * np.ones(n))
    return [float(w) for w in weights]


def weighted_accuracy_errors(
    records: Sequence[dict[str, Any]], bank_profile: BankProfile
) -> dict[str, Any]:
    """Accuracy MAE and Spearman of block weights (:func:`fit_block_weights`) by leave-one-out,
    and the weights fitted on all records."""
    base = bank_profile.base_costs()
    unweighted = dataclasses.replace(bank_profile, block_weights=None, correction=None)
    predictions = []
    for i, record in enumerate(records):
        weights = fit_block_weights([r for j, r in enumerate(records) if j != i], unweighted)
        picks = enumerate(zip(weights, record["choices"], strict=True))
        summed = sum(w * base[b][d] for b, (w, d) in picks)
        predictions.append(unweighted.accuracy(summed))
    real = [r["measured_accuracy"] for r in records]
    return {
        "block_weights": fit_block_weights(records, unweighted),
        "weighted_accuracy_mae_points": 100
        * statistics.fmean(abs(p - m) for p, m in zip(predictions, real, strict=True)),
        "weighted_accuracy_spearman": spearman(predictions, real),
    }


def corrected_accuracy_errors(
    records: Sequence[dict[str, Any]], bank_profile: BankProfile
) -> dict[str, Any]:
    """Accuracy MAE and Spearman of the fitted :class:`DropCorrection`, by leave-one-out, and
    the correction fitted on all records."""
    upper = sum(max(family) for family in bank_profile.costs())
    summed = [r["summed_cost"] for r in records]
    measured = [bank_profile.cost_of(r["measured_accuracy"]) for r in records]
    predictions = []
    for i in range(len(records)):
        rest = [j for j in range(len(records)) if j != i]
        fit = DropCorrection.fit([summed[j] for j in rest], [measured[j] for j in rest], upper)
        predictions.append(bank_profile.accuracy(summed[i], fit))
    real = [r["measured_accuracy"] for r in records]
    return {
        "combine": bank_profile.combine,
        "correction": DropCorrection.fit(summed, measured, upper).to_dict(),
        "corrected_accuracy_mae_points": 100
        * statistics.fmean(abs(p - m) for p, m in zip(predictions, real, strict=True)),
        "corrected_accuracy_spearman": spearman(predictions, real),
    }


def _paper_sum_errors(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy MAE and Spearman of LegoDNN's plain sum of drops, when the records carry it."""
    if not records or "sum_estimated_accuracy" not in records[0]:
        return {}
    est = [r["sum_estimated_accuracy"] for r in records]
    real = [r["measured_accuracy"] for r in records]
    return {
        "sum_accuracy_mae_points": 100
        * statistics.fmean(abs(e - m) for e, m in zip(est, real, strict=True)),
        "sum_accuracy_spearman": spearman(est, real),
    }


def _ratio_errors(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """MAPE and Spearman of latency relative to the teacher, when the records carry ratios."""
    if not records or "measured_latency_ratio" not in records[0]:
        return {}
    est = [r["estimated_latency_ratio"] for r in records]
    real = [r["measured_latency_ratio"] for r in records]
    return {
        "relative_latency_mape_percent": 100
        * statistics.fmean(abs(e - m) / m for e, m in zip(est, real, strict=True)),
        "relative_latency_spearman": spearman(est, real),
    }


def summarize_validation(
    records: list[dict[str, Any]], target: str, seconds: float
) -> dict[str, Any]:
    """Error statistics of estimated against measured latency, and accuracy when the records
    carry it."""
    est_lat = [r["estimated_latency_ms"] for r in records]
    real_lat = [r["measured_latency_ms"] for r in records]
    accuracy = {}
    if records and "measured_accuracy" in records[0]:
        est_acc = [r["estimated_accuracy"] for r in records]
        real_acc = [r["measured_accuracy"] for r in records]
        accuracy = {
            "accuracy_mae_points": 100
            * statistics.fmean(abs(e - m) for e, m in zip(est_acc, real_acc, strict=True)),
            "accuracy_spearman": spearman(est_acc, real_acc),
            **_paper_sum_errors(records),
        }
    return {
        "target": target,
        "samples": len(records),
        **accuracy,
        "latency_mape_percent": 100
        * statistics.fmean(abs(e - m) / m for e, m in zip(est_lat, real_lat, strict=True)),
        "latency_spearman": spearman(est_lat, real_lat),
        **_ratio_errors(records),
        "seconds": seconds,
        "records": records,
    }
