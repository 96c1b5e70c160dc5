import re

import numpy as np
import onnx
import pytest
import torch
from test_export import CASES, SHAPE, SPARSITIES, build_case, ort_run

from blockscale.derive import derive
from blockscale.errors import ExportError
from blockscale.export import MODEL_INPUT, export_frame, export_onnx, export_selection
from blockscale.extract import compose
from blockscale.ort import (
    DEFAULT_DESIGN,
    ChainedSession,
    MergedSession,
    compose_session,
    median_latency,
    merge,
    round_robin_latency,
)
from blockscale.types import DeriveConfig

DESIGNS = [ChainedSession, MergedSession]


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    _, d = build_case(request.param)
    families = derive(d, DeriveConfig(sparsities=SPARSITIES))
    frame = export_frame(d)
    onnx_families = [
        [export_onnx(desc.module, (torch.zeros(1, *info.input_shape),)) for desc in family]
        for info, family in zip(d.plan.blocks, families, strict=True)
    ]
    return d, families, frame, onnx_families, tmp_path_factory.mktemp("ort")


def _selection(num_blocks: int, offset: int = 0) -> list[int]:
    return [(b + offset) % len(SPARSITIES) for b in range(num_blocks)]


def _torch_output(d, families, selection, x):
    blocks = [f[s].module for f, s in zip(families, selection, strict=True)]
    with torch.no_grad():
        return compose(d, blocks)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("design", DESIGNS, ids=lambda c: c.__name__)
def test_composed_sessions_equal_monolithic_export_and_compose(case, design):
    d, families, frame, onnx_families, tmp = case
    selection = _selection(d.plan.num_blocks)
    session = design(frame, [f[s] for f, s in zip(onnx_families, selection, strict=True)])
    blocks = [f[s].module for f, s in zip(families, selection, strict=True)]
    monolithic = export_selection(d, blocks, tmp / f"{design.__name__}.onnx")
    for batch in (1, 3, 1):  # the chain binds its buffers to a batch size, then rebinds
        x = np.random.default_rng(batch).standard_normal((batch, *SHAPE), dtype=np.float32)
        got = session(x)
        assert np.abs(got - _torch_output(d, families, selection, x)).max() <= 1e-4
        assert np.abs(got - ort_run(monolithic, {MODEL_INPUT: x})[0]).max() <= 1e-4


@pytest.mark.parametrize("design", DESIGNS, ids=lambda c: c.__name__)
def test_swap_changes_only_the_swapped_blocks(case, design):
    d, families, frame, onnx_families, _ = case
    selection = _selection(d.plan.num_blocks)
    session = design(frame, [f[s] for f, s in zip(onnx_families, selection, strict=True)])
    x = np.random.default_rng(0).standard_normal((1, *SHAPE), dtype=np.float32)
    session(x)
    before = list(session.blocks)
    stages = [s.session for s in getattr(session, "_stages", [])]
    swapped = d.plan.num_blocks - 1
    selection[swapped] = (selection[swapped] + 1) % len(SPARSITIES)
    report = session.swap({swapped: onnx_families[swapped][selection[swapped]]})
    assert report.blocks == (swapped,) and report.seconds > 0
    assert session.blocks[:swapped] == before[:swapped]
    assert session.blocks[swapped] is onnx_families[swapped][selection[swapped]]
    if stages:  # the chain rebuilt one session, that of the swapped block
        kept = [a is b.session for a, b in zip(stages, session._stages, strict=True)]
        assert kept.count(False) == 1
    assert np.abs(session(x) - _torch_output(d, families, selection, x)).max() <= 1e-4


def test_swapped_builds_a_new_chain_sharing_the_unchanged_sessions(case):
    """The new chain has its own buffers, bound before its first call; the old one runs on."""
    d, families, frame, onnx_families, _ = case
    old_selection = _selection(d.plan.num_blocks)
    chain = ChainedSession(frame, [f[s] for f, s in zip(onnx_families, old_selection, strict=True)])
    x = np.random.default_rng(0).standard_normal((2, *SHAPE), dtype=np.float32)
    before = chain(x)
    new_selection = list(old_selection)
    new_selection[0] = (new_selection[0] + 1) % len(SPARSITIES)
    new = chain.swapped({0: onnx_families[0][new_selection[0]]})
    assert new._shape == x.shape  # bound already
    shared = [a.session is b.session for a, b in zip(chain._stages, new._stages, strict=True)]
    assert shared.count(False) == 1 and not shared[chain._slots[0]]
    assert np.abs(new(x) - _torch_output(d, families, new_selection, x)).max() <= 1e-4
    np.testing.assert_array_equal(chain(x), before)
    assert chain.blocks[0] is onnx_families[0][old_selection[0]]
    with pytest.raises(ExportError, match="not a slot"):
        chain.swapped({d.plan.num_blocks: onnx_families[0][0]})


def test_merged_model_is_one_valid_graph(case):
    _, _, frame, onnx_families, _ = case
    model = merge(frame, [f[0] for f in onnx_families])
    onnx.checker.check_model(model, full_check=True)
    names = [n for node in model.graph.node for n in node.output]
    assert len(names) == len(set(names))
    assert [i.name for i in model.graph.input] == [frame.input]
    assert [o.name for o in model.graph.output] == [frame.output]
    assert all(re.match(r"[pb]\d+/", t.name) for t in model.graph.initializer)


def test_a_block_that_does_not_fit_is_refused(case):
    d, _, frame, onnx_families, _ = case
    blocks = [f[0] for f in onnx_families]
    with pytest.raises(ExportError, match="slots"):
        MergedSession(frame, blocks[:-1])
    renamed = onnx.ModelProto()
    renamed.CopyFrom(blocks[0])
    renamed.graph.input[0].name = "image"
    with pytest.raises(ExportError, match="must map"):
        ChainedSession(frame, [renamed, *blocks[1:]])
    for design in DESIGNS:
        session = design(frame, blocks)
        with pytest.raises(ExportError, match="must map"):
            session.swap({len(blocks) - 1: onnx_families[-1][1], 0: renamed})
        with pytest.raises(ExportError, match="not a slot"):
            session.swap({d.plan.num_blocks: blocks[0]})
        assert session.blocks == blocks  # a refused swap changes nothing


def test_compose_session_builds_the_default_design(case):
    _, _, frame, onnx_families, _ = case
    blocks = [f[0] for f in onnx_families]
    default = {"chained": ChainedSession, "merged": MergedSession}[DEFAULT_DESIGN]
    assert isinstance(compose_session(frame, blocks), default)
    assert isinstance(compose_session(frame, blocks, design="chained"), ChainedSession)


def test_latency_helpers_time_every_callable():
    calls = {"a": 0, "b": 0}

    def tick(name):
        def call():
            calls[name] += 1

        return call

    times = round_robin_latency({"a": tick("a"), "b": tick("b")}, rounds=7, warmup=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 9, "b": 9}
    assert median_latency(lambda: None, rounds=3, warmup=0) >= 0
