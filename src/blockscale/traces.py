"""Resource traces: the budgets a device gives its models over time, read from files or generated.

A :class:`Trace` is a sequence of :class:`TraceStep`: a time in seconds (strictly increasing) and the
budget that holds from then until the next step, either one :class:`~blockscale.types.Budget` shared
by every model or one per model by name (the same names at every step).

Files (the suffix picks the format):

* CSV: a header naming ``time_s`` and any of ``latency_ms``, ``memory_mb`` and ``model``, then one
  row per step or, with a ``model`` column, one row per model and step (a step's rows consecutive,
  at the same time). An empty cell, or a column left out, means no limit.
* JSON: ``{"format": "blockscale-trace", "version": 1, "steps": [...]}`` where a step is
  ``{"time_s": 0.0, "latency_ms": 2.5, "memory_mb": 0.9}`` (shared) or
  ``{"time_s": 0.0, "models": {"resnet20": {"latency_ms": 2.5, "memory_mb": 0.9}}}``; ``null``, or
  a key left out, means no limit.

A malformed file raises :class:`~blockscale.errors.TraceError` naming the file, the line (CSV, and
JSON syntax) or the step (JSON), and the problem.

The generators (:func:`steps`, :func:`random_walk`, :func:`phone`) are seeded and space their steps
evenly. Each draws a level in [0, 1] per step for latency and for memory, and maps it linearly onto
that dimension's span from ``low`` (level 0, the tightest budget) to ``high`` (level 1); a dimension
that both ``low`` and ``high`` leave None stays unconstrained. ``blockscale.replay.budget_range``
gives a bank's span.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, TraceError
from .types import Budget

FORMAT = "blockscale-trace"
VERSION = 1
_LIMITS = ("latency_ms", "memory_mb")
_COLUMNS = ("time_s", *_LIMITS, "model")
_SUFFIXES = (".csv", ".json")


@dataclass(frozen=True)
class TraceStep:
    """The budget from ``time_s`` until the next step: one shared by every model, or one per model
    (a mapping from model name to budget, copied)."""

    time_s: float
    budgets: Budget | Mapping[str, Budget]

    def __post_init__(self) -> None:
        if isinstance(self.time_s, bool) or not math.isfinite(self.time_s):
            raise TraceError(f"a step's time_s must be a finite number, got {self.time_s!r}")
        object.__setattr__(self, "time_s", float(self.time_s))
        if isinstance(self.budgets, Budget):
            return
        budgets = dict(self.budgets)
        if not budgets:
            raise TraceError("a per-model step must name at least one model")
        for name, budget in budgets.items():
            if not isinstance(name, str) or not name:
                raise TraceError(f"a model name must be a non-empty string, got {name!r}")
            if not isinstance(budget, Budget):
                raise TraceError(f"model {name!r} has {budget!r} for a budget, not a Budget")
        object.__setattr__(self, "budgets", budgets)

    @property
    def models(self) -> tuple[str, ...] | None:
        """The model names this step gives budgets to; None when its budget is shared."""
        return None if isinstance(self.budgets, Budget) else tuple(self.budgets)

    def budget(self, model: str | None = None) -> Budget:
        """The budget of ``model``: the shared one, or its own entry (KeyError when it has none)."""
        if isinstance(self.budgets, Budget):
            return self.budgets
        if model is None:
            raise KeyError(model)
        return self.budgets[model]

    def to_dict(self) -> dict[str, Any]:
        if isinstance(self.budgets, Budget):
            return {"time_s": self.time_s, **self.budgets.to_dict()}
        return {"time_s": self.time_s, "models": {k: b.to_dict() for k, b in self.budgets.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> TraceStep:
        """A step from its JSON form; :class:`TraceError` says what is wrong with it."""
        if not isinstance(data, dict):
            raise TraceError(f"a step must be an object, got {_kind(data)}")
        unknown = set(data) - {"time_s", "models", *_LIMITS}
        if unknown:
            raise TraceError(
                f"unknown key(s) {sorted(unknown)}",
                hint="a step has time_s and either latency_ms/memory_mb or models",
            )
        time_s = _number(data.get("time_s"), "time_s")
        if time_s is None:
            raise TraceError("time_s is missing")
        if "models" not in data:
            return cls(time_s, _budget({k: data.get(k) for k in _LIMITS}))
        if set(data) & set(_LIMITS):
            raise TraceError("a step has either its own latency_ms/memory_mb or models, not both")
        models = data["models"]
        if not isinstance(models, dict):
            raise TraceError(f"models must be an object of budgets by name, got {_kind(models)}")
        budgets = {}
        for name, entry in models.items():
            if not isinstance(entry, dict) or set(entry) - set(_LIMITS):
                raise TraceError(
                    f"models[{name!r}] must be an object with latency_ms and/or memory_mb"
                )
            try:
                budgets[name] = _budget({k: entry.get(k) for k in _LIMITS})
            except TraceError as exc:
                raise TraceError(f"models[{name!r}]: {exc.message}") from None
        return cls(time_s, budgets)


@dataclass(frozen=True)
class Trace:
    """Budgets over time: at least one step, times strictly increasing, and every step shared or
    every step per model with the same names."""

    steps: tuple[TraceStep, ...]

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if not steps:
            raise TraceError("a trace needs at least one step")
        for i in range(1, len(steps)):
            problem = _follows(steps[0], steps[i - 1], steps[i])
            if problem:
                raise TraceError(f"step {i}: {problem}")
        object.__setattr__(self, "steps", steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def models(self) -> tuple[str, ...] | None:
        """The model names of a per-model trace; None when its budgets are shared."""
        return self.steps[0].models

    def budgets(self, model: str | None = None) -> tuple[Budget, ...]:
        """Each step's budget for ``model``: the shared budget, or that model's own entry (a
        per-model trace needs ``model`` to be one of its names)."""
        names = self.models
        if names is not None and model not in names:
            asked = "no model" if model is None else f"model {model!r}"
            raise TraceError(
                f"the trace gives budgets per model ({', '.join(names)}), but none for {asked}",
                hint="name the model as the trace does (a bank's folder name), or give the "
                "trace one shared budget per step",
            )
        return tuple(s.budget(model) for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Any) -> Trace:
        """A trace from its JSON form; :class:`TraceError` names the step at fault."""
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise TraceError(
                'a trace must be an object with a list of "steps"',
                hint='e.g. {"steps": [{"time_s": 0, "latency_ms": 2.5, "memory_mb": 1.0}]}',
            )
        unknown = set(data) - {"format", "version", "steps"}
        if unknown:
            raise TraceError(f"unknown key(s) {sorted(unknown)} in the trace")
        if data.get("format", FORMAT) != FORMAT:
            raise TraceError(f"format is {data['format']!r}, not {FORMAT!r}")
        version = data.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
            raise TraceError(
                f"trace version {version!r} is not one this blockscale reads (1 to {VERSION})"
            )
        steps = []
        for i, entry in enumerate(data["steps"]):
            try:
                step = TraceStep.from_dict(entry)
            except TraceError as exc:
                raise TraceError(f"steps[{i}]: {exc.message}", hint=exc.hint) from None
            problem = _follows(steps[0], steps[-1], step) if steps else None
            if problem:
                raise TraceError(f"steps[{i}]: {problem}")
            steps.append(step)
        return cls(tuple(steps))


def _follows(first: TraceStep, previous: TraceStep, step: TraceStep) -> str | None:
    """What is wrong with ``step`` coming after ``previous`` in a trace that starts at ``first``."""
    if not step.time_s > previous.time_s:
        return f"time_s {step.time_s:g} does not come after the step before ({previous.time_s:g})"
    if (first.models is None) != (step.models is None):
        return "a trace's steps are all shared budgets or all per model, not a mix"
    if first.models is not None and set(step.models or ()) != set(first.models):
        return (
            f"the step names models {sorted(step.models)}, the first step {sorted(first.models)}: "
            "every step gives a budget to the same models"
        )
    return None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: Any, what: str) -> float | None:
    """``value`` as a finite float; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _budget(values: Mapping[str, Any]) -> Budget:
    """A budget from its limits (numbers or None), with the problem as a :class:`TraceError`."""
    limits = {k: _number(v, k) for k, v in values.items()}
    try:
        return Budget(**limits)
    except ConfigError as exc:
        raise TraceError(exc.message) from None


# -- files ---------------------------------------------------------------------------------------


def read_trace(path: str | Path) -> Trace:
    """The trace in a ``.csv`` or ``.json`` file; :class:`TraceError` names the line at fault."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"no trace at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read the trace {path}: {exc}") from None
    try:
        return _read_csv(text) if suffix == ".csv" else _read_json(text)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc.message}", line=exc.line, hint=exc.hint) from None


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` as CSV or JSON, by the suffix of ``path``; returns the path."""
    path = Path(path)
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        path.write_text(json.dumps(trace.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    per_model = trace.models is not None
    writer.writerow(_COLUMNS if per_model else _COLUMNS[:-1])
    for step in trace.steps:
        if isinstance(step.budgets, Budget):
            writer.writerow([repr(step.time_s), *_cells(step.budgets)])
        else:
            for name, budget in step.budgets.items():
                writer.writerow([repr(step.time_s), *_cells(budget), name])
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise TraceError(
            f"{path}: a trace file is .csv or .json, not {suffix or 'a file without a suffix'}",
            hint="name the file trace.csv or trace.json",
        )
    return suffix


def _cells(budget: Budget) -> list[str]:
    return ["" if v is None else repr(v) for v in (budget.latency_ms, budget.memory_mb)]


def _read_json(text: str) -> Trace:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(
            f"line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})", line=exc.lineno
        ) from None
    return Trace.from_dict(data)


def _read_csv(text: str) -> Trace:
    rows = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    # (line, time, model or None, budget) per row, then grouped into steps
    entries: list[tuple[int, float, str | None, Budget]] = []
    for row in rows:
        line = rows.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = _header(row, line)
            continue
        if len(row) != len(header):
            raise TraceError(
                f"line {line}: {len(row)} fields, but the header names {len(header)} "
                f"({','.join(header)})",
                line=line,
            )
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        try:
            time_s = _cell(cells["time_s"], "time_s")
            if time_s is None:
                raise TraceError("time_s is empty")
            budget = _budget({k: _cell(cells.get(k, ""), k) for k in _LIMITS})
            model = cells.get("model")
            if model == "":
                raise TraceError(
                    "the model cell is empty: every row of a per-model trace names one"
                )
        except TraceError as exc:
            raise TraceError(f"line {line}: {exc.message}", line=line, hint=exc.hint) from None
        entries.append((line, time_s, model, budget))
    if not entries:
        raise TraceError("the file holds no steps", hint="write a header and one row per step")
    steps: list[TraceStep] = []
    for line, step in _steps(entries):
        problem = _follows(steps[0], steps[-1], step) if steps else None
        if problem:
            raise TraceError(f"line {line}: {problem}", line=line)
        steps.append(step)
    return Trace(tuple(steps))


def _header(row: list[str], line: int) -> list[str]:
    names = [c.strip() for c in row]
    known = f"the columns are {', '.join(_COLUMNS)} (model only for per-model budgets)"
    for name in names:
        if name not in _COLUMNS:
            raise TraceError(f"line {line}: unknown column {name!r}", line=line, hint=known)
        if names.count(name) > 1:
            raise TraceError(f"line {line}: column {name!r} appears twice", line=line)
    if "time_s" not in names:
        raise TraceError(f"line {line}: the header has no time_s column", line=line, hint=known)
    return names


def _cell(text: str, what: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{what} {text!r} is not a number") from None
    return _number(value, what)


def _steps(
    entries: list[tuple[int, float, str | None, Budget]],
) -> list[tuple[int, TraceStep]]:
    """Rows as steps, each with the line of its first row: a shared row is a step; per-model
    rows of one step are consecutive and share its time."""
    if entries[0][2] is None:
        return [(line, TraceStep(time_s, budget)) for line, time_s, _, budget in entries]
    steps = []
    start = 0
    while start < len(entries):
        end = start
        budgets: dict[str, Budget] = {}
        while end < len(entries) and entries[end][1] == entries[start][1]:
            line, _, model, budget = entries[end]
            assert model is not None
            if model in budgets:
                raise TraceError(
                    f"line {line}: model {model!r} appears twice at time_s {entries[start][1]:g}",
                    line=line,
                )
            budgets[model] = budget
            end += 1
        steps.append((entries[start][0], TraceStep(entries[start][1], budgets)))
        start = end
    return steps


# -- generators ----------------------------------------------------------------------------------


def steps(
    low: Budget,
    high: Budget,
    n: int,
    *,
    seed: int = 0,
    hold: int = 10,
    levels: int = 5,
    interval_s: float = 1.0,
) -> Trace:
    """Piecewise-constant budgets: every ``hold`` steps, latency and memory each jump to one of
    ``levels`` evenly spaced levels of their spans, drawn at random."""
    _check_generator(n, interval_s)
    if hold < 1 or levels < 2:
        raise ConfigError(f"steps needs hold >= 1 and levels >= 2, got {hold} and {levels}")
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, levels)
    draws = grid[rng.integers(levels, size=(math.ceil(n / hold), 2))]
    return _trace(low, high, np.repeat(draws, hold, axis=0)[:n], interval_s)


def random_walk(
    low: Budget,
    high: Budget,
    n: int,
    *,
    seed: int = 0,
    sigma: float = 0.1,
    interval_s: float = 1.0,
) -> Trace:
    """Budgets that wander: latency's and memory's levels each start anywhere and take Gaussian
    steps of standard deviation ``sigma``, reflected at 0 and 1."""
    _check_generator(n, interval_s)
    if not sigma > 0:
        raise ConfigError(f"random_walk needs sigma > 0, got {sigma}")
    rng = np.random.default_rng(seed)
    moves = np.vstack([rng.uniform(size=(1, 2)), rng.normal(0.0, sigma, size=(n - 1, 2))])
    folded = np.cumsum(moves, axis=0) % 2.0  # reflect at 0 and 1: fold onto [0, 2), mirror (1, 2)
    return _trace(low, high, np.where(folded > 1.0, 2.0 - folded, folded), interval_s)


def phone(
    low: Budget,
    high: Budget,
    n: int,
    *,
    seed: int = 0,
    apps: int = 4,
    mean_on_s: float = 30.0,
    mean_off_s: float = 60.0,
    interval_s: float = 1.0,
) -> Trace:
    """A phone's other apps starting and stopping around the DNN.

    Each app holds a random share (0.1 to 0.5) of the CPU and of memory while it runs; runs and
    pauses last ``mean_on_s`` and ``mean_off_s`` on average (geometric). The DNN's level is one
    minus the shares of the apps running (at least 0), so its budget drops when an app starts and
    recovers when it stops. Every app is stopped at the first step.
    """
    _check_generator(n, interval_s)
    if apps < 1 or not (mean_on_s > 0 and mean_off_s > 0):
        raise ConfigError(
            f"phone needs apps >= 1 and positive mean times, got {apps}, {mean_on_s}, {mean_off_s}"
        )
    rng = np.random.default_rng(seed)
    shares = rng.uniform(0.1, 0.5, size=(apps, 2))
    flip = np.array([min(1.0, interval_s / mean_off_s), min(1.0, interval_s / mean_on_s)])
    running = np.zeros(apps, dtype=bool)
    level = np.empty((n, 2))
    for i in range(n):
        if i:
            running ^= rng.uniform(size=apps) < flip[running.astype(int)]
        level[i] = np.clip(1.0 - shares[running].sum(axis=0), 0.0, 1.0)
    return _trace(low, high, level, interval_s)


GENERATORS: dict[str, Callable[..., Trace]] = {
    "steps": steps,
    "random-walk": random_walk,
    "phone": phone,
}


def _check_generator(n: int, interval_s: float) -> None:
    if n < 1:
        raise ConfigError(f"a trace needs at least one step, got n={n}")
    if not interval_s > 0:
        raise ConfigError(f"interval_s must be positive, got {interval_s}")


def _trace(low: Budget, high: Budget, level: np.ndarray, interval_s: float) -> Trace:
    """A step every ``interval_s`` whose budget sits at ``level[i]`` (latency, memory) of the span
    from ``low`` to ``high``."""
    spans = []
    for j, name in enumerate(_LIMITS):
        lo, hi = getattr(low, name), getattr(high, name)
        if (lo is None) != (hi is None):
            raise ConfigError(
                f"low and high must both set {name} or both leave it None, got {lo} and {hi}"
            )
        if lo is not None and hi is not None:
            if lo > hi:
                raise ConfigError(f"low {name} {lo} is above high {name} {hi}")
            spans.append((j, name, lo, hi))
    return Trace(
        tuple(
            TraceStep(
                i * interval_s,
                Budget(
                    **{name: min(hi, lo + float(u[j]) * (hi - lo)) for j, name, lo, hi in spans}
                ),
            )
            for i, u in enumerate(level)
        )
    )
