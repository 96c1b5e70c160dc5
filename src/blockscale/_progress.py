"""Progress bars for long steps, drawn on stderr so JSON on stdout stays clean."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)

Advance = Callable[..., None]


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[Advance]:
    """Yield ``advance(n=1, **fields)``; ``fields`` (e.g. ``loss=0.3``) are shown after the bar."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=_console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: float | str) -> None:
            status = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
            progress.update(task, advance=n, **({"status": status} if fields else {}))

        yield advance
