"""Targets: where latency is measured. A target names a backend, its thread count and the machine.

Latency is measured at batch 1 after a warm-up, as the median of repeated runs: the median resists
the outliers that a shared, noisy machine produces.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import BlockscaleError

_NAME = re.compile(r"^(?P<backend>[a-z]+)-(?P<threads>\d+)t$")
BACKENDS = ("torch",)


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


@dataclass(frozen=True)
class Target:
    """A place to run: backend and threads; ``name`` is e.g. ``torch-1t``."""

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
        return f"{self.backend}-{self.threads}t"

    @classmethod
    def parse(cls, name: str) -> Target:
        """``torch-2t`` -> Target("torch", 2)."""
        match = _NAME.match(name.strip().lower())
        if not match:
            raise BlockscaleError(
                f"cannot read the target {name!r}",
                hint="write targets as BACKEND-Nt, e.g. torch-1t or torch-2t",
            )
        return cls(match["backend"], int(match["threads"]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "machine": machine()}

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
