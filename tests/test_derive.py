from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import HAND_WRITTEN, randomise_bn, thin_zoo_model
from torch import nn

from blockscale.derive import _kept, derive, prune_block
from blockscale.extract import compose, extract
from blockscale.models import create_model, list_models
from blockscale.types import DeriveConfig


def _cases():
    for name in list_models():
        yield pytest.param(lambda name=name: thin_zoo_model(name), id=name)
    for name, cls in HAND_WRITTEN.items():
        yield pytest.param(lambda cls=cls: randomise_bn(cls()), id=name)


@pytest.fixture(scope="module", params=list(_cases()))
def derived(request):
    torch.manual_seed(0)
    model = request.param()
    d = extract(model, torch.randn(1, 3, 16, 16))
    return model, d, derive(d, DeriveConfig(sparsities=(0.0, 0.5, 0.9), round_to=1))


def test_every_descendant_keeps_the_block_shapes(derived):
    _, d, families = derived
    for info, family in zip(d.plan.blocks, families, strict=True):
        assert [x.info.sparsity for x in family] == [0.0, 0.5, 0.9]
        for desc in family:
            out = desc.module(torch.randn(2, *info.input_shape))
            assert tuple(out.shape[1:]) == info.output_shape


def test_descendants_shrink_with_sparsity(derived):
    _, _, families = derived
    shrunk = 0
    for family in families:
        params = [x.info.num_params for x in family]
        assert params == sorted(params, reverse=True)
        shrunk += params[-1] < params[0]
    assert shrunk >= max(1, len(families) - 1)  # at most one block may have nothing internal


def test_sparsity_zero_descendants_compose_the_teacher(derived):
    model, d, families = derived
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        diff = (compose(d, [f[0].module for f in families])(x) - model(x)).abs().max().item()
    assert diff <= 1e-5


def test_any_mix_of_descendants_runs(derived):
    _, d, families = derived
    mix = [f[i % 3].module for i, f in enumerate(families)]
    out = compose(d, mix)(torch.randn(2, 3, 16, 16))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_pruning_keeps_the_strongest_filters():
    block = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        block[0].weight.copy_(
            torch.tensor([1.0, 5.0, 0.1, 3.0]).view(4, 1, 1, 1).repeat(1, 2, 1, 1)
        )
        block[2].weight.fill_(1.0)
    gm = torch.fx.symbolic_trace(block)
    pruned, channels = prune_block(gm, (2, 3, 3), (2, 3, 3), 0.5)
    kept = pruned.get_submodule("0").weight[:, 0, 0, 0].tolist()
    assert kept == [5.0, 3.0]
    assert channels == {"0": (4, 2)}
    assert pruned.get_submodule("2").in_channels == 2


@pytest.mark.parametrize("round_to", [None, 4])
def test_round_to_rounds_kept_channels_up(round_to):
    d = extract(create_model("resnet20").eval(), torch.randn(1, 3, 16, 16))
    config = DeriveConfig(sparsities=(0.0, 0.7))
    config = config if round_to is None else replace(config, round_to=round_to)
    multiple = round_to or 8  # the default
    pruned = 0
    for family in derive(d, config):
        for original, kept in family[1].info.channels.values():
            assert kept % multiple == 0 or kept == original
            pruned += kept < original
    assert pruned > 0


def test_a_stored_config_without_round_to_keeps_exact_widths():
    """Banks written before widths were rounded by default must derive as they did."""
    assert DeriveConfig.from_dict({"sparsities": [0.0, 0.5]}).round_to is None
    assert DeriveConfig.from_dict(DeriveConfig().to_dict()).round_to == 8


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 512),
    sparsity=st.floats(0, 0.99),
    round_to=st.sampled_from([None, 1, 4, 8]),
)
def test_kept_channel_count(channels, sparsity, round_to):
    keep = _kept(channels, sparsity, round_to)
    assert 1 <= keep <= channels
    if round_to:
        assert keep % round_to == 0 or keep == channels
    else:
        assert keep >= channels * (1 - sparsity) - 1e-6


def test_derive_reports_progress():
    d = extract(thin_zoo_model("resnet20"), torch.randn(1, 3, 16, 16))
    calls = []
    derive(d, DeriveConfig(sparsities=(0.0, 0.5)), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 18) for i in range(1, 19)]


@pytest.mark.parametrize("bad", [(), (0.0, 1.0), (0.5, 0.5), (-0.1,)])
def test_bad_sparsities(bad):
    with pytest.raises(ValueError):
        DeriveConfig(sparsities=bad)
