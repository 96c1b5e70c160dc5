"""Plots people would rather look at than read: accuracy-latency frontiers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from .types import Selection


def plot_frontier(
    frontier: Sequence[Selection],
    path: str | Path,
    *,
    title: str = "accuracy-latency frontier",
    target: str = "",
    measured: Sequence[tuple[float, float]] = (),
    uniform: Sequence[tuple[float, float]] = (),
    teacher: tuple[float, float] | None = None,
) -> Path:
    """Draw the estimated frontier as a step line, with optional measured and uniform points.

    ``measured`` and ``uniform`` are (latency ms, accuracy) pairs; accuracy is a fraction.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.5), dpi=120)  # no pyplot: no global state, no display needed
    ax = fig.subplots()
    xs = [s.latency_ms for s in frontier]
    ys = [100 * s.accuracy for s in frontier]
    ax.step(xs, ys, where="post", color="tab:blue", linewidth=1.6, label="frontier (estimated)")
    ax.scatter(xs, ys, s=8, color="tab:blue")
    if measured:
        ax.scatter(
            [m[0] for m in measured],
            [100 * m[1] for m in measured],
            marker="x",
            color="tab:red",
            label="selections (measured)",
        )
    if uniform:
        ax.plot(
            [u[0] for u in uniform],
            [100 * u[1] for u in uniform],
            "s--",
            color="tab:gray",
            label="uniform sparsity (measured)",
        )
    if teacher:
        ax.scatter(
            [teacher[0]],
            [100 * teacher[1]],
            marker="*",
            s=120,
            color="gold",
            edgecolor="black",
            zorder=5,
            label="teacher",
        )
    ax.set_xlabel(f"latency (ms){f' on {target}' if target else ''}, batch 1")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
