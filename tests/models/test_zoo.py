"""Model zoo: registry behaviour, fx traceability, output shapes and the block structure extraction needs."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blockscale.errors import ConfigError, UnknownModelError
from blockscale.models import (
    BasicBlock,
    InvertedResidual,
    create_model,
    list_models,
    register_model,
)

THIN = {
    "resnet20": {"width": 4},
    "resnet56": {"width": 2},
    "resnet18": {"width": 4},
    "vgg11_bn": {"width_mult": 1 / 32},
    "vgg16_bn": {"width_mult": 1 / 32},
    "mobilenetv2": {"width_mult": 0.25},
}
# name -> (blocks, convs, parameters at full width with 10 classes)
EXPECTED = {
    "resnet20": (9, 21, 272_474),
    "resnet56": (27, 57, 855_770),
    "resnet18": (8, 20, 11_173_962),
    "vgg11_bn": (5, 8, 9_228_362),
    "vgg16_bn": (5, 13, 14_724_042),
    "mobilenetv2": (17, 52, 2_236_682),
}


def thin(name: str, **kwargs: object) -> nn.Module:
    """Build a thin, eval-mode version of a zoo model so tests stay fast."""
    return create_model(name, **THIN.get(name, {}), **kwargs).eval()


def blocks_of(model: nn.Module) -> list[str]:
    """Module paths of the blocks the design cuts: BasicBlocks, InvertedResiduals or VGG stages."""
    if hasattr(model, "features"):
        return [f"features.{i}" for i in range(len(model.features))]
    return [n for n, m in model.named_modules() if isinstance(m, BasicBlock | InvertedResidual)]


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(EXPECTED) <= set(names)


def test_unknown_model_lists_names_and_suggests_closest() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("resnet21")
    message = str(info.value)
    assert all(name in message for name in list_models())
    assert "did you mean 'resnet20'" in message
    assert isinstance(info.value, KeyError)


def test_unknown_argument_is_named_with_the_ones_the_model_takes() -> None:
    with pytest.raises(ConfigError, match=r"resnet20 takes no argument 'widht'") as info:
        create_model("resnet20", widht=4)
    assert "width" in info.value.hint


def test_register_model_rejects_duplicate_names() -> None:
    def resnet20() -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet20)


@pytest.mark.parametrize("name", list_models())
def test_traced_output_equals_eager(name: str) -> None:
    model = thin(name)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    model = thin(name, in_channels=in_channels, num_classes=7)
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(sorted(THIN)),
    in_channels=st.integers(1, 4),
    num_classes=st.integers(1, 20),
    size=st.integers(8, 33),
)
def test_any_channels_classes_and_size(
    name: str, in_channels: int, num_classes: int, size: int
) -> None:
    model = thin(name, in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, size, size))
    assert out.shape == (1, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_and_layer_counts(name: str) -> None:
    n_blocks, n_convs, n_params = EXPECTED[name]
    with torch.device("meta"):
        model = create_model(name)
    assert len(blocks_of(model)) == n_blocks
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    ("name", "paths"),
    [
        ("resnet20", [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]),
        ("resnet18", [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in range(2)]),
        ("mobilenetv2", [f"layers.{i}" for i in range(17)]),
        ("vgg11_bn", [f"features.{i}" for i in range(5)]),
    ],
)
def test_block_module_paths(name: str, paths: list[str]) -> None:
    assert blocks_of(thin(name)) == paths


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_basic_block_ends_in_relu_after_add(name: str) -> None:
    model = thin(name)
    for path in blocks_of(model):
        block = model.get_submodule(path)
        graph = torch.fx.symbolic_trace(block).graph
        last = next(iter(reversed(graph.nodes))).args[0]
        assert last.target is torch.nn.functional.relu
        assert last.args[0].target in {torch.add, operator.add}
        has_projection = len(block.shortcut) > 0
        assert has_projection == (
            block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv2.out_channels
        )


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg16_bn"])
def test_vgg_stages_end_in_ceil_mode_pool(name: str) -> None:
    model = thin(name)
    for stage in model.features:
        assert isinstance(stage, nn.Sequential)
        assert isinstance(stage[-1], nn.MaxPool2d) and stage[-1].ceil_mode


def test_mobilenetv2_residuals_at_full_width() -> None:
    with torch.device("meta"):
        model = create_model("mobilenetv2")
    assert sum(block.use_residual for block in model.layers) == 10
    strides = [block.conv[-5].stride[0] for block in model.layers]
    assert strides.count(2) == 3


def test_kaiming_init_statistics() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20")
    conv = model.layer3[0].conv2
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
