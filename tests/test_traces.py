import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockscale.errors import ConfigError, TraceError
from blockscale.traces import (
    GENERATORS,
    Trace,
    TraceStep,
    phone,
    random_walk,
    read_trace,
    steps,
    write_trace,
)
from blockscale.types import Budget

LOW = Budget(latency_ms=1.5, memory_mb=0.25)
HIGH = Budget(latency_ms=4.0, memory_mb=1.0)

limits = st.none() | st.floats(min_value=1e-9, max_value=1e9, allow_nan=False)
budgets = st.builds(Budget, latency_ms=limits, memory_mb=limits)
times = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=6, unique=True
).map(sorted)
names = st.text(st.characters(whitelist_categories=("L", "Nd")), min_size=1, max_size=8)


@st.composite
def traces(draw) -> Trace:
    stamps = draw(times)
    models = draw(st.none() | st.lists(names, min_size=1, max_size=3, unique=True))
    if models is None:
        return Trace(tuple(TraceStep(t, draw(budgets)) for t in stamps))
    return Trace(tuple(TraceStep(t, {m: draw(budgets) for m in models}) for t in stamps))


@settings(max_examples=60, deadline=None)
@given(trace=traces(), suffix=st.sampled_from([".csv", ".json"]))
def test_files_round_trip(tmp_path_factory, trace, suffix):
    path = tmp_path_factory.mktemp("trace") / f"t{suffix}"
    assert read_trace(write_trace(trace, path)) == trace


def test_a_hand_written_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "time_s, memory_mb, model, latency_ms\n0, 1.0, cam, 2.5\n0, , mic, 1\n\n2.5, 0.5, mic, \n"
        "2.5, 0.5, cam, 2\n"
    )
    trace = read_trace(path)
    assert trace.models == ("cam", "mic")
    assert trace.budgets("cam") == (Budget(2.5, 1.0), Budget(2.0, 0.5))
    assert trace.budgets("mic") == (Budget(1.0, None), Budget(None, 0.5))
    assert [s.time_s for s in trace.steps] == [0.0, 2.5]
    shared = tmp_path / "s.csv"
    shared.write_text("time_s,latency_ms\n0,3\n1,2\n")
    assert read_trace(shared).budgets("anything") == (Budget(3.0), Budget(2.0))


def test_a_per_model_trace_needs_the_model_named(tmp_path):
    trace = Trace((TraceStep(0, {"cam": Budget(2.0)}),))
    assert trace.budgets("cam") == (Budget(2.0),)
    with pytest.raises(TraceError, match=r"per model \(cam\), but none for model 'mic'"):
        trace.budgets("mic")
    with pytest.raises(TraceError, match="none for no model"):
        trace.budgets()


CSV_HEADER = "time_s,latency_ms,memory_mb\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (CSV_HEADER + "0,2,1\n1,fast,1\n", 3, "latency_ms 'fast' is not a number"),
        (CSV_HEADER + "0,2,1\n1,2\n", 3, "2 fields, but the header names 3"),
        (CSV_HEADER + "0,2,1\n0,1,1\n", 3, "does not come after the step before"),
        (CSV_HEADER + "0,-2,1\n", 2, "Budget.latency_ms must be positive"),
        (CSV_HEADER + "0,2,nan\n", 2, "memory_mb must be a finite number"),
        (CSV_HEADER + ",2,1\n", 2, "time_s is empty"),
        ("time_s,latency\n0,2\n", 1, "unknown column 'latency'"),
        ("latency_ms\n2\n", 1, "no time_s column"),
        ("time_s,time_s\n0,0\n", 1, "'time_s' appears twice"),
        ("time_s,latency_ms,model\n0,2,a\n0,2,a\n", 3, "model 'a' appears twice"),
        ("time_s,latency_ms,model\n0,2,a\n1,2,\n", 3, "the model cell is empty"),
        ("time_s,latency_ms,model\n0,2,a\n0,2,b\n1,2,a\n", 4, "the first step ['a', 'b']"),
    ],
)
def test_a_malformed_csv_names_the_line(tmp_path, text, line, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert info.value.line == line
    assert f"{path}: line {line}: " in info.value.message
    assert message in info.value.message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": [{"time_s": 0, "latency_ms": 1}, {"time_s": 1, "latency_ms": 0}]}, "steps[1]"),
        ({"steps": [{"time_s": 0, "latency": 1}]}, "steps[0]: unknown key(s) ['latency']"),
        ({"steps": [{"latency_ms": 1}]}, "steps[0]: time_s is missing"),
        ({"steps": [{"time_s": True}]}, "time_s must be a finite number"),
        (
            {"steps": [{"time_s": 0, "latency_ms": 1}, {"time_s": 1, "models": {"a": {}}}]},
            "steps[1]: a trace's steps are all shared budgets or all per model",
        ),
        ({"steps": [{"time_s": 0, "models": {"a": {"memory_mb": "1"}}}]}, "models['a']: memory_mb"),
        ({"steps": []}, "at least one step"),
        ({"steps": [], "format": "other"}, "format is 'other'"),
        ({"steps": [], "version": 2}, "trace version 2"),
        ([1, 2], 'a list of "steps"'),
    ],
)
def test_a_malformed_json_names_the_step(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TraceError, match=str(path)) as info:
        read_trace(path)
    assert message in info.value.message


def test_json_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"steps": [\n  {"time_s": 0,}\n]}\n')
    with pytest.raises(TraceError, match=r"line 2: not valid JSON") as info:
        read_trace(path)
    assert info.value.line == 2


def test_unreadable_files(tmp_path):
    with pytest.raises(TraceError, match=r"\.csv or \.json, not \.txt"):
        read_trace(tmp_path / "t.txt")
    with pytest.raises(TraceError, match="no trace at"):
        read_trace(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text(CSV_HEADER)
    with pytest.raises(TraceError, match="holds no steps"):
        read_trace(empty)
    with pytest.raises(TraceError, match=r"\.csv or \.json"):
        write_trace(Trace((TraceStep(0, Budget()),)), tmp_path / "t")


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("seed", [0, 7])
def test_generators_stay_in_range_and_repeat_per_seed(kind, seed):
    make = GENERATORS[kind]
    trace = make(LOW, HIGH, 150, seed=seed, interval_s=0.5)
    assert len(trace) == 150
    assert [s.time_s for s in trace.steps] == [0.5 * i for i in range(150)]
    for name in ("latency_ms", "memory_mb"):
        values = [getattr(b, name) for b in trace.budgets()]
        assert getattr(LOW, name) <= min(values) < max(values) <= getattr(HIGH, name)
    assert make(LOW, HIGH, 150, seed=seed, interval_s=0.5) == trace
    assert make(LOW, HIGH, 150, seed=seed + 1, interval_s=0.5) != trace


def test_generators_leave_an_unset_dimension_unconstrained():
    for make in GENERATORS.values():
        trace = make(Budget(latency_ms=1.0), Budget(latency_ms=2.0), 20, seed=1)
        assert all(b.memory_mb is None and 1.0 <= b.latency_ms <= 2.0 for b in trace.budgets())


def test_steps_hold_each_level():
    trace = steps(LOW, HIGH, 40, seed=3, hold=8, levels=3)
    values = [b.latency_ms for b in trace.budgets()]
    assert all(len(set(values[i : i + 8])) == 1 for i in range(0, 40, 8))
    assert set(values) <= {1.5, 2.75, 4.0}


def test_random_walk_moves_in_small_steps():
    values = [b.latency_ms for b in random_walk(LOW, HIGH, 200, seed=2, sigma=0.02).budgets()]
    span = HIGH.latency_ms - LOW.latency_ms
    assert max(abs(a - b) for a, b in itertools.pairwise(values)) < 0.15 * span


def test_phone_budget_drops_when_an_app_starts_and_recovers():
    values = [b.latency_ms for b in phone(LOW, HIGH, 300, seed=4, apps=2).budgets()]
    assert values[0] == HIGH.latency_ms  # every app stopped at first
    drop = next(i for i, v in enumerate(values) if v < HIGH.latency_ms)
    assert any(v == HIGH.latency_ms for v in values[drop:])  # back once the apps stop


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: steps(LOW, HIGH, 0), "at least one step"),
        (lambda: steps(HIGH, LOW, 5), "is above high"),
        (lambda: steps(Budget(1.0), Budget(2.0, 1.0), 5), "both set memory_mb"),
        (lambda: steps(LOW, HIGH, 5, levels=1), "levels >= 2"),
        (lambda: random_walk(LOW, HIGH, 5, sigma=0), "sigma > 0"),
        (lambda: phone(LOW, HIGH, 5, apps=0), "apps >= 1"),
        (lambda: phone(LOW, HIGH, 5, interval_s=0), "interval_s must be positive"),
    ],
)
def test_generator_settings_are_checked(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
