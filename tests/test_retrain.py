import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import calibrate_bn, tiny_resnet

from blockscale.data import load_dataset
from blockscale.derive import derive
from blockscale.extract import extract
from blockscale.retrain import FeatureCache, RetrainConfig, retrain
from blockscale.types import DeriveConfig

N = 128
SPARSITIES = (0.0, 0.5, 0.75)
CONFIG = RetrainConfig(epochs=4, lr=1e-2, batch_size=32, val_fraction=0.25, cache="memory")


@pytest.fixture(scope="module")
def setup():
    data = load_dataset("synthetic", "train", n=N, num_classes=4, in_channels=1, size=8)
    teacher = calibrate_bn(tiny_resnet(), data)
    d = extract(teacher, torch.zeros(1, 1, 8, 8))
    assert [b.name for b in d.plan.blocks] == ["res1", "res2"]
    return teacher, d, data


def _families(d):
    return derive(d, DeriveConfig(sparsities=SPARSITIES, round_to=1))


def _run(setup, **changes):
    _, d, data = setup
    families = _families(d)
    report = retrain(d, families, data, _config(**changes), progress=False)
    return families, report


def _config(**changes):
    return RetrainConfig(**{**CONFIG.to_dict(), **changes})


@torch.no_grad()
def _teacher_features(teacher, images):
    """Input and output of each block, computed from the teacher's own modules."""
    x0 = teacher.stem(images)
    y0 = teacher.res1(x0)
    return [(x0, y0), (y0, teacher.res2(y0))]


@torch.no_grad()
def _mse(module, pairs):
    module.eval()
    return torch.nn.functional.mse_loss(module(pairs[0]), pairs[1]).item()


def _images(data, indices):
    return torch.stack([data[int(i)][0] for i in indices])


def _states(families):
    return {d.info.key: copy.deepcopy(d.module.state_dict()) for f in families for d in f}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_retraining_lowers_the_error_of_every_pruned_descendant(setup):
    teacher, d, data = setup
    families = _families(d)
    features = _teacher_features(teacher, _images(data, range(N)))
    whole_before = {x.info.key: _mse(x.module, features[x.info.block]) for f in families for x in f}
    report = retrain(d, families, data, CONFIG, progress=False)

    assert report.samples == N and report.cache == "memory"
    json.dumps(report.to_dict())  # the report is stored in the bank's JSON manifest
    for b, family in enumerate(families):
        for i, desc in enumerate(family):
            before, after = report.val_mse_before[b][i], report.val_mse_after[b][i]
            history, seconds = report.history[b][i], report.epoch_seconds[b][i]
            if desc.info.sparsity == 0:
                assert before == after == pytest.approx(0.0, abs=1e-10)
                assert history == seconds == [] and report.best_epoch[b][i] == 0
                continue
            assert after < before
            assert len(history) == len(seconds) == CONFIG.epochs
            assert all(s > 0 for s in seconds)
            assert after == min(history)
            assert report.best_epoch[b][i] == history.index(after) + 1
            whole_after = _mse(desc.module, features[b])
            assert whole_after < whole_before[desc.info.key]
    per_descendant = sum(s for fam in report.epoch_seconds for per in fam for s in per)
    assert per_descendant <= report.train_seconds


@pytest.mark.parametrize("chain", [0.0, 0.5])
def test_the_best_state_is_kept_not_the_last(setup, chain):
    teacher, _, data = setup
    families, report = _run(setup, lr=0.05, epochs=5, chain=chain)
    # the validation split retrain draws: the first val_fraction of a seeded permutation
    order = torch.randperm(N, generator=torch.Generator().manual_seed(CONFIG.seed))
    val = _teacher_features(teacher, _images(data, order[: round(N * CONFIG.val_fraction)]))
    # with chain, res2's descendants were validated through res1's as they stood that epoch
    for b, family in enumerate(families if chain == 0 else families[:1]):
        for i, desc in enumerate(family[1:], start=1):
            assert _mse(desc.module, val[b]) == pytest.approx(report.val_mse_after[b][i], rel=1e-4)
    histories = [h for fam in report.history for h in fam if h]
    assert any(h.index(min(h)) != len(h) - 1 for h in histories), "every run ended at its best"


def test_chained_descendants_are_validated_through_their_predecessor(setup):
    """With chain 1, res2's descendant at each level is validated on res1's descendant's output."""
    teacher, d, data = setup
    families = _families(d)
    initial = copy.deepcopy(families)
    report = retrain(d, families, data, _config(chain=1.0, epochs=1), progress=False)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(CONFIG.seed))
    (x0, y0), (_, y1) = _teacher_features(
        teacher, _images(data, order[: round(N * CONFIG.val_fraction)])
    )
    with torch.no_grad():
        for level in (1, 2):
            first, second = (initial[b][level].module.eval() for b in (0, 1))
            assert report.val_mse_before[0][level] == pytest.approx(_mse(first, (x0, y0)), rel=1e-5)
            chained = torch.nn.functional.mse_loss(second(first(x0)), y1).item()
            assert report.val_mse_before[1][level] == pytest.approx(chained, rel=1e-5)


def test_unpruned_descendants_are_untouched(setup):
    _, d, data = setup
    families = _families(d)
    before = _states(families)
    retrain(d, families, data, CONFIG, progress=False)
    after = _states(families)
    for b, family in enumerate(families):
        for desc in family:
            key = desc.info.key
            if not desc.info.pruned:
                assert _same_state(before[key], after[key])
                assert _same_state(after[key], d.blocks[b].state_dict())
            else:
                assert not _same_state(before[key], after[key])


def test_a_level_that_rounding_keeps_whole_is_the_original_block(setup):
    """Hidden width 8 at sparsity 0.5 keeps 4, rounded up to 8: nothing is removed, so the
    descendant is the teacher's block and retraining leaves it so."""
    _, d, data = setup
    families = derive(d, DeriveConfig(sparsities=(0.0, 0.5), round_to=8))
    assert all(desc.info.sparsity == 0.5 and not desc.info.pruned for _, desc in families)
    report = retrain(d, families, data, CONFIG, progress=False)
    for b, (_, desc) in enumerate(families):
        assert _same_state(desc.module.state_dict(), d.blocks[b].state_dict())
        assert report.epoch_seconds[b][1] == []


def test_retraining_is_deterministic_per_seed(setup):
    first, report_a = _run(setup)
    again, report_b = _run(setup)
    other, _ = _run(setup, seed=1)
    a, b, c = _states(first), _states(again), _states(other)
    assert all(_same_state(a[k], b[k]) for k in a)
    assert report_a.val_mse_after == report_b.val_mse_after
    pruned = [x.info.key for f in first for x in f if x.info.sparsity > 0]
    assert all(not _same_state(a[k], c[k]) for k in pruned)


def test_every_cache_mode_trains_alike(setup):
    _, reference = _run(setup, cache="memory")
    _, disk = _run(setup, cache="disk")
    _, rerun = _run(setup, cache="none")
    _, half = _run(setup, cache="memory", cache_dtype="float16")
    assert (disk.cache, rerun.cache, half.cache) == ("disk", "none", "memory")
    assert disk.cache_bytes == reference.cache_bytes > 0
    assert half.cache_bytes == reference.cache_bytes // 2
    assert rerun.cache_bytes == 0
    expected = np.array(reference.val_mse_after)
    np.testing.assert_allclose(disk.val_mse_after, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(rerun.val_mse_after, expected, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(half.val_mse_after, expected, rtol=0.05, atol=1e-4)


def test_auto_cache_follows_the_memory_limit(setup):
    _, roomy = _run(setup, cache="auto")
    _, tight = _run(setup, cache="auto", memory_limit_mb=0)
    assert (roomy.cache, tight.cache) == ("memory", "disk")


@pytest.fixture
def spy_cache(monkeypatch, tmp_path):
    """Temporary folders go under tmp_path; records the arrays of every cache retrain builds."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    built = []
    original = FeatureCache.build.__func__

    def build(cls, *args, **kwargs):
        cache = original(cls, *args, **kwargs)
        built.append(
            [
                (type(a), Path(a.filename) if isinstance(a, np.memmap) else None)
                for a in cache._arrays
            ]
        )
        for _, path in built[-1]:
            assert path is None or path.is_file()
        return cache

    monkeypatch.setattr(FeatureCache, "build", classmethod(build))
    return built


@pytest.mark.parametrize("changes", [{"cache": "disk"}, {"cache": "auto", "memory_limit_mb": 0}])
def test_disk_cache_is_memory_mapped_and_removed(setup, spy_cache, tmp_path, changes):
    _run(setup, **changes)
    (arrays,) = spy_cache
    assert len(arrays) == 3  # res1 input, res1 output = res2 input, res2 output
    assert all(kind is np.memmap and path.suffix == ".npy" for kind, path in arrays)
    assert all(path.is_relative_to(tmp_path) for _, path in arrays)
    assert not any(path.exists() for _, path in arrays)
    assert list(tmp_path.glob("blockscale-*")) == []


def test_memory_cache_leaves_no_folder_behind(setup, spy_cache, tmp_path):
    _run(setup, cache="auto")
    (arrays,) = spy_cache
    assert all(kind is torch.Tensor for kind, _ in arrays)
    assert list(tmp_path.glob("blockscale-*")) == []


def test_disk_cache_in_a_given_folder_is_used_then_removed(setup, spy_cache, tmp_path):
    folder = tmp_path / "features"
    _, report = _run(setup, cache="disk", cache_dir=str(folder))
    assert report.cache == "disk"
    paths = [path for _, path in spy_cache[-1]]
    assert len(paths) == 3 and all(p.parent.parent == folder for p in paths)
    assert folder.is_dir() and not any(folder.iterdir())  # its own subfolder was removed


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        ("memory", [N]),  # one pass over the data set, in one batch of up to 256
        ("none", [32] * (1 + CONFIG.epochs * 3)),  # validation once, then 3 batches per epoch
    ],
)
def test_how_often_the_teacher_runs(setup, cache, expected):
    _, d, _ = setup
    frame_calls, h1 = _count_calls(d.frame)
    block_calls, h2 = _count_calls(d.blocks[0])
    try:
        _run(setup, cache=cache)
    finally:
        h1.remove()
        h2.remove()
    assert frame_calls == block_calls == expected


def test_feature_cache_runs_the_teacher_once_per_batch(setup):
    _, d, data = setup
    frame_calls, handle = _count_calls(d.frame)
    try:
        cache = FeatureCache.build(d, data, batch_size=48, mode="memory", progress=False)
    finally:
        handle.remove()
    assert frame_calls == [48, 48, 32]
    assert len(cache) == N


@pytest.mark.parametrize(
    ("mode", "dtype", "atol"),
    [("memory", "float32", 1e-6), ("disk", "float32", 1e-6), ("memory", "float16", 1e-2)],
)
def test_feature_cache_pairs_are_the_teacher_features(setup, tmp_path, mode, dtype, atol):
    teacher, d, data = setup
    cache = FeatureCache.build(
        d, data, batch_size=50, mode=mode, dtype=dtype, directory=tmp_path, progress=False
    )
    per_sample = 4 * 8 * 8 * (2 if dtype == "float16" else 4)  # every block maps 4x8x8 -> 4x8x8
    naive = 2 * 2 * per_sample * N  # an input and an output per block
    assert cache.nbytes == 3 * per_sample * N < naive  # res1's output is res2's input
    index = torch.tensor([17, 0, 101, 17, 5, 127])  # unsorted, with a repeat
    expected = _teacher_features(teacher, _images(data, index))
    for b in range(2):
        x, y = cache.pair(b, index)
        assert x.dtype == y.dtype == torch.float32
        torch.testing.assert_close(x, expected[b][0], atol=atol, rtol=1e-3)
        torch.testing.assert_close(y, expected[b][1], atol=atol, rtol=1e-3)
    if mode == "disk":
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"feature-{i}.npy" for i in range(3)]


def test_without_validation_the_last_state_is_kept(setup):
    families, report = _run(setup, val_fraction=0.0, epochs=2)
    assert all(math.isnan(v) for fam in report.val_mse_before for v in fam)
    assert all(h == [] for fam in report.history for h in fam)
    original = _families(setup[1])
    for family, untrained in zip(families, original, strict=True):
        assert _same_state(family[0].module.state_dict(), untrained[0].module.state_dict())
        assert not _same_state(family[1].module.state_dict(), untrained[1].module.state_dict())


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"lr": -1e-3},
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"cache": "gpu"},
        {"cache_dtype": "bfloat16"},
        {"chain": -0.1},
        {"chain": 1.5},
    ],
)
def test_bad_retrain_config(bad):
    with pytest.raises(ValueError):
        RetrainConfig(**bad)


def _rows_of(x, features):
    """Whether every sample of ``x`` is one of ``features``' samples."""
    if len(x) == 0:
        return True
    exact = "donot_use_mm_for_euclid_dist"
    distances = torch.cdist(x.flatten(1), features.flatten(1), compute_mode=exact)
    return bool((distances.min(1).values < 1e-4).all())


@pytest.mark.parametrize(
    ("chain", "cache"), [(0.0, "memory"), (0.5, "memory"), (1.0, "memory"), (0.5, "none")]
)
def test_chained_retraining_feeds_the_previous_blocks_descendant(setup, chain, cache):
    """With chain c, the first c of each batch reaches a descendant of res2 through the
    descendant of res1 at its level, in the same step; the rest is the teacher's input."""
    teacher, d, data = setup
    families = _families(d)
    features = _teacher_features(teacher, _images(data, range(N)))
    seen: dict[tuple[int, int], list[torch.Tensor]] = {}

    def record(key, kind):
        def hook(module, args, out):
            if module.training:
                seen.setdefault((key, kind), []).append(args[0] if kind == "in" else out)

        return hook

    for b, family in enumerate(families):
        for level, x in enumerate(family):
            x.module.register_forward_hook(record((b, level), "in"))
            x.module.register_forward_hook(record((b, level), "out"))
    retrain(d, families, data, _config(chain=chain, cache=cache, epochs=1), progress=False)
    for level in (1, 2):
        ins, ups = seen[(1, level), "in"], seen[(0, level), "out"]
        assert len(ins) == len(ups) > 0
        for x, up in zip(ins, ups, strict=True):
            k = round(len(x) * chain)
            assert torch.equal(x[:k], up[:k].detach())
            if k < len(x):
                assert not torch.allclose(x[k:], up[k:])
            assert _rows_of(x[k:], features[1][0])
        # the first block has no predecessor: it always sees the teacher's input
        assert all(_rows_of(x, features[0][0]) for x in seen[(0, level), "in"])


def test_retrain_config_round_trip():
    config = RetrainConfig(epochs=3, cache="disk", cache_dtype="float16", cache_dir="/x", chain=0.5)
    assert RetrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_cached_features_survive_in_place_glue():
    """A frame applying ReLU(inplace=True) between blocks must not alter cached block outputs."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    from blockscale.extract import extract
    from blockscale.retrain import FeatureCache

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.b1, self.b2 = nn.Conv2d(1, 4, 3, padding=1), Block(), Block()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.b2(self.act(self.b1(self.stem(x))))).mean((2, 3))

    torch.manual_seed(0)
    d = extract(Net().eval(), torch.zeros(1, 1, 8, 8), blocks=["b1", "b2"])
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    cache = FeatureCache.build(d, data, mode="memory", progress=False)
    for block in (0, 1):
        x, y = cache.pair(block, torch.arange(8))
        with torch.no_grad():
            assert torch.allclose(d.blocks[block](x), y, atol=1e-6)
    assert cache.pair(0, torch.arange(8))[1].min() < 0  # the pre-ReLU output was kept
