import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from blockscale._graph_io import (
    decode_arg,
    decode_graph_module,
    decode_layer,
    encode_arg,
    encode_graph_module,
    encode_layer,
    function_name,
    resolve_function,
)
from blockscale.errors import GraphFormatError

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.sampled_from([torch.float32, torch.int64, Ellipsis]),
)
args = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
        st.tuples(inner, inner, inner).map(lambda t: slice(*t)),
    ),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(args)
def test_arguments_round_trip(value):
    import json

    decoded = decode_arg(json.loads(json.dumps(encode_arg(value))))
    assert decoded == value and type(decoded) is type(value)


def test_infinite_floats_round_trip():
    assert decode_arg(encode_arg(float("inf"))) == math.inf
    assert math.isnan(decode_arg(encode_arg(float("nan"))))


LAYERS = [
    nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),
    nn.Conv2d(4, 4, (1, 3), padding="same", padding_mode="reflect"),
    nn.Conv1d(3, 5, 2),
    nn.BatchNorm2d(7, eps=1e-3, momentum=0.2),
    nn.BatchNorm1d(7, affine=False),
    nn.Linear(3, 4, bias=False),
    nn.ReLU(inplace=True),
    nn.ReLU6(),
    nn.LeakyReLU(0.3),
    nn.Hardswish(),
    nn.SiLU(),
    nn.GELU(approximate="tanh"),
    nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    nn.AvgPool2d(2),
    nn.AdaptiveAvgPool2d((2, 1)),
    nn.Flatten(1),
    nn.Dropout(0.3),
    nn.Identity(),
    nn.GroupNorm(2, 8),
    nn.LayerNorm([4, 4]),
    nn.Upsample(scale_factor=2.0, mode="nearest"),
    nn.Softmax(dim=1),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda m: type(m).__name__)
def test_layers_round_trip(layer):
    rebuilt = decode_layer(encode_layer(layer))
    assert type(rebuilt) is type(layer)
    assert repr(rebuilt) == repr(layer)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in layer.state_dict().items()
    }


def test_custom_layers_are_refused():
    class Custom(nn.Linear):
        pass

    with pytest.raises(GraphFormatError, match=r"not a built-in torch\.nn layer"):
        encode_layer(Custom(2, 2))
    for spec in ({"type": "Sequential", "config": {}}, {"type": "Module", "config": {}}):
        with pytest.raises(GraphFormatError):
            decode_layer(spec)
    with pytest.raises(GraphFormatError, match="unknown arguments"):
        decode_layer({"type": "ReLU", "config": {"evil": True}})


@pytest.mark.parametrize(
    "fn", [operator.add, operator.getitem, torch.cat, torch.flatten, F.relu, torch.split, math.sqrt]
)
def test_pure_functions_resolve(fn):
    assert resolve_function(function_name(fn)) is fn


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "builtins.__import__",
        "torch.load",
        "torch.save",
        "torch.from_file",
        "torch.hub",
        "operator.methodcaller",
        "torch._C",
        "subprocess.run",
    ],
)
def test_dangerous_names_are_refused(name):
    with pytest.raises(GraphFormatError):
        resolve_function(name)


def test_unknown_functions_cannot_be_stored():
    with pytest.raises(GraphFormatError, match="cannot be stored"):
        function_name(print)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.scale = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))) * self.scale
        a, b = torch.split(y, [3, 3], dim=1)
        y = torch.cat([b, a], 1).mean((2, 3))
        z = y.view(y.shape[0], -1)
        return self.fc(torch.cat([z, z.clamp(min=0.0)], dim=1))


def test_graph_module_round_trip():
    gm = fx.symbolic_trace(Net().eval())
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    rebuilt = decode_graph_module(encode_graph_module(gm), state).eval()
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(rebuilt(x), gm(x))
    assert rebuilt.state_dict().keys() == gm.state_dict().keys()


def test_missing_or_extra_weights_are_errors():
    gm = fx.symbolic_trace(Net().eval())
    data = encode_graph_module(gm)
    state = dict(gm.state_dict())
    with pytest.raises(GraphFormatError, match="missing"):
        decode_graph_module(data, {k: v for k, v in state.items() if k != "conv.weight"})
    with pytest.raises(GraphFormatError, match="unexpected"):
        decode_graph_module(data, {**state, "extra": torch.zeros(1)})
    with pytest.raises(GraphFormatError, match="do not fit"):
        decode_graph_module(data, {**state, "conv.weight": torch.zeros(1)})


def _tiny():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()))
    return encode_graph_module(gm), {k: v.clone() for k, v in gm.state_dict().items()}


def _splice(data, nodes):
    """Insert nodes before the output, which then returns the last of them."""
    out = data["nodes"].pop()
    data["nodes"].extend(nodes)
    out["args"] = {"tuple": [{"node": nodes[-1]["name"]}]}
    data["nodes"].append(out)
    return data


def _call(name, target, *args, op="call_function", **kwargs):
    node = {"name": name, "op": op, "target": target, "args": {"tuple": list(args)}}
    if kwargs:
        node["kwargs"] = {"dict": kwargs}
    return node


def test_the_getattr_escape_is_refused():
    """x.__class__.__repr__.__globals__['__builtins__']['eval'] would reach any code."""
    data, state = _tiny()
    last = data["nodes"][-2]["name"]
    chain = [
        _call("a", "builtins.getattr", {"node": last}, "__class__"),
        _call("b", "builtins.getattr", {"node": "a"}, "__repr__"),
        _call("c", "builtins.getattr", {"node": "b"}, "__globals__"),
    ]
    with pytest.raises(GraphFormatError, match="getattr"):
        decode_graph_module(_splice(data, chain), state)


def test_builtins_take_no_keywords():
    data, state = _tiny()
    last = data["nodes"][-2]["name"]
    node = _call("m", "builtins.max", [{"node": last}, "1"], key={"node": last})
    with pytest.raises(GraphFormatError, match="not allowed"):
        decode_graph_module(_splice(data, [node]), state)


def test_methods_are_called_on_graph_values_only():
    data, state = _tiny()
    node = _call("f", "split", "a,b", ",", op="call_method")
    with pytest.raises(GraphFormatError, match="not allowed"):
        decode_graph_module(_splice(data, [node]), state)


def test_shape_reads_still_round_trip():
    class Reshape(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1).sum(1)

    gm = fx.symbolic_trace(Reshape())
    rebuilt = decode_graph_module(encode_graph_module(gm), {})
    x = torch.randn(3, 2, 2)
    assert torch.equal(rebuilt(x), gm(x))


def test_a_huge_stored_layer_allocates_nothing():
    data, state = _tiny()
    data["layers"]["0"]["config"]["out_channels"] = 10**7  # 40 MB of weights it does not have
    with pytest.raises(GraphFormatError, match="do not fit"):
        decode_graph_module(data, state)


def test_buffers_and_frozen_parameters_keep_their_kind():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("offset", torch.randn(1, 3, 1, 1))
            self.scale = nn.Parameter(torch.randn(1, 3, 1, 1), requires_grad=False)
            self.gain = nn.Parameter(torch.randn(1, 3, 1, 1))

        def forward(self, x):
            return (x + self.offset) * self.scale * self.gain

    gm = fx.symbolic_trace(Scaled())
    rebuilt = decode_graph_module(encode_graph_module(gm), dict(gm.state_dict()))
    assert "offset" in dict(rebuilt.named_buffers())
    params = dict(rebuilt.named_parameters())
    assert not params["scale"].requires_grad and params["gain"].requires_grad
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(rebuilt(x), gm(x))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d["nodes"][-1].pop("args"),
        lambda d: d["layers"].update({"a..b": d["layers"]["0"]}),
        lambda d: d.update(nodes="nonsense"),
    ],
)
def test_malformed_graphs_are_typed_errors(mangle):
    data, state = _tiny()
    mangle(data)
    with pytest.raises(GraphFormatError):
        decode_graph_module(data, state)
