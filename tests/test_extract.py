import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import HAND_WRITTEN, UntraceableNet, randomise_bn, thin_zoo_model
from torch import nn

from blockscale.errors import BlockPlanError, InputShapeError, UntraceableModelError
from blockscale.extract import compose, extract
from blockscale.models import create_model, list_models

ZOO_BLOCKS = {
    "resnet20": 9,
    "resnet56": 27,
    "resnet18": 8,
    "vgg11_bn": 4,
    "vgg16_bn": 5,
    "mobilenetv2": 17,
}


def _models():
    for name in list_models():
        yield pytest.param((name, lambda name=name: thin_zoo_model(name)), id=name)
    for name, cls in HAND_WRITTEN.items():
        yield pytest.param((name, lambda cls=cls: randomise_bn(cls())), id=name)


@pytest.fixture(scope="module", params=list(_models()))
def decomposed(request):
    name, make = request.param
    torch.manual_seed(0)
    model = make()
    x = torch.randn(1, 3, 16, 16)
    return name, model, extract(model, x)


def test_plan_covers_graph_exactly_once(decomposed):
    _, model, d = decomposed
    traced = torch.fx.symbolic_trace(model)
    all_nodes = {n.name for n in traced.graph.nodes if n.op != "get_attr"}
    covered = [n for b in d.plan.blocks for n in b.nodes] + [
        n for n in d.plan.frame_nodes if n in all_nodes
    ]
    assert len(covered) == len(set(covered)), "a node is in two places"
    assert set(covered) == all_nodes
    modules = [m for b in d.plan.blocks for m in b.modules] + list(d.plan.frame_modules)
    leaf_calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert leaf_calls <= set(modules)


def test_blocks_hold_two_convs_and_chain_shapes(decomposed):
    _, _, d = decomposed
    assert d.plan.num_blocks >= 1
    for info, block in zip(d.plan.blocks, d.blocks, strict=True):
        assert info.num_convs >= 2
        out = block(torch.randn(2, *info.input_shape))
        assert tuple(out.shape[1:]) == info.output_shape


def test_sparsity_zero_composition_is_the_teacher(decomposed):
    _, model, d = decomposed
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        diff = (compose(d, d.blocks)(x) - model(x)).abs().max().item()
    assert diff <= 1e-5


def test_params_add_up(decomposed):
    _, model, d = decomposed
    assert d.plan.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_zoo_granularity_matches_the_paper(name):
    d = extract(thin_zoo_model(name), torch.randn(1, 3, 32, 32))
    assert d.plan.num_blocks == ZOO_BLOCKS[name]


def test_resnet_blocks_are_residual_blocks():
    d = extract(thin_zoo_model("resnet20"), torch.randn(1, 3, 32, 32))
    assert [b.name for b in d.plan.blocks] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert d.plan.blocks[3].input_shape == (4, 32, 32)
    assert d.plan.blocks[3].output_shape == (8, 16, 16)


def test_flat_sequential_is_cut_into_stages():
    d = extract(HAND_WRITTEN["flat-vgg"](), torch.randn(1, 3, 16, 16))
    assert [b.num_convs for b in d.plan.blocks] == [2, 2, 3]
    assert [b.output_shape for b in d.plan.blocks] == [(8, 8, 8), (12, 4, 4), (16, 2, 2)]


def test_extract_leaves_the_teacher_untouched():
    model = thin_zoo_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = extract(model, torch.randn(1, 3, 16, 16))
    compose(d, d.blocks)(torch.randn(2, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert d.blocks[0].get_submodule("layer1.0.conv1") is not model.layer1[0].conv1


def test_named_blocks():
    model = thin_zoo_model("resnet20")
    d = extract(model, torch.randn(1, 3, 16, 16), blocks=["layer2.0", "layer1.1"])
    assert [b.name for b in d.plan.blocks] == ["layer1.1", "layer2.0"]
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(compose(d, d.blocks)(x), model(x), atol=1e-5)


def test_named_block_extends_to_its_single_exit():
    model = HAND_WRITTEN["functional"]()
    d = extract(model, torch.randn(1, 3, 8, 8), blocks=["c1"])
    assert d.plan.blocks[0].modules == ("c1", "c2")  # the residual add closes the block


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (["nope"], "is not a submodule"),
        (["layer1.0.conv2"], "not single-entry"),
        (["layer1", "layer1.0"], "overlap"),
    ],
)
def test_bad_named_blocks(blocks, message):
    with pytest.raises(BlockPlanError, match=message):
        extract(thin_zoo_model("resnet20"), torch.randn(1, 3, 16, 16), blocks=blocks)


def test_untraceable_model_names_the_failing_call():
    with pytest.raises(UntraceableModelError) as err:
        extract(UntraceableNet(), torch.randn(1, 3, 8, 8))
    text = str(err.value)
    assert "if x.sum() > 0" in text
    assert "nets.py" in text
    assert "blocks=" in text  # points to manual blocks


def test_untraceable_model_with_named_blocks():
    model = randomise_bn(UntraceableNet())
    d = extract(model, torch.randn(1, 3, 8, 8), blocks=["body"])
    assert d.plan.frame_kind == "module"
    assert d.plan.blocks[0].input_shape == (8, 8, 8)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(compose(d, d.blocks)(x), model(x))
    assert model.body is not d.blocks[0]


def test_wrong_input_shape_is_a_typed_error():
    with pytest.raises(InputShapeError, match=r"\(1, 1, 16, 16\)"):
        extract(create_model("resnet20"), torch.randn(1, 1, 16, 16))
    with pytest.raises(InputShapeError):
        extract(create_model("resnet20"), [1, 2, 3])


def test_model_without_blocks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(BlockPlanError, match="no block"):
        extract(model, torch.randn(1, 3, 8, 8))


def test_plan_round_trips_through_json():
    from blockscale.types import BlockPlan

    plan = extract(thin_zoo_model("mobilenetv2"), torch.randn(1, 3, 16, 16)).plan
    assert BlockPlan.from_dict(plan.to_dict()) == plan


@settings(max_examples=8, deadline=None)
@given(
    depth=st.integers(1, 4),
    widths=st.lists(st.integers(1, 6), min_size=4, max_size=4),
    residual=st.booleans(),
)
def test_random_chains_compose_exactly(depth, widths, residual):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, widths[0], 1)
            self.body = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(widths[0], widths[1 + i % 3], 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(widths[1 + i % 3], widths[0], 3, padding=1),
                )
                for i in range(depth)
            )

        def forward(self, x):
            x = self.stem(x)
            for layer in self.body:
                x = x + layer(x) if residual else layer(x)
            return x

    model = Chain().eval()
    d = extract(model, torch.randn(1, 2, 6, 6))
    if residual:
        assert d.plan.num_blocks == depth
    x = torch.randn(2, 2, 6, 6)
    assert torch.allclose(compose(d, d.blocks)(x), model(x), atol=1e-6)


def test_a_named_block_that_runs_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return self.body(self.body(self.stem(x)))

    with pytest.raises(BlockPlanError, match="more than once"):
        extract(Twice(), torch.randn(1, 3, 8, 8), blocks=["body"])
