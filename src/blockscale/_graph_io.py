"""Safe, pickle-free serialization of ``torch.fx`` graph modules as JSON plus a flat state dict.

A bank from a stranger must not be able to run code. So a graph is stored as data: its nodes, with
``call_function`` targets named and resolved only against an allow-list (pure tensor operations from
``torch``, ``torch.nn.functional``, ``operator`` and ``math``), ``call_method`` names checked against
public ``torch.Tensor`` attributes, and every layer described by its ``torch.nn`` class name and
constructor arguments. Weights travel separately (safetensors).
"""

from __future__ import annotations

import builtins
import inspect
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import GraphFormatError

FORMAT = "blockscale-fx"
VERSION = 1

_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.nn.functional": F,
    "operator": operator,
    "math": math,
    "builtins": builtins,
}
_BUILTINS = frozenset({"getattr", "len", "min", "max", "abs", "int", "float"})
_TORCH_DENIED = frozenset({"from_file", "save", "load", "set_default_device", "set_default_dtype"})
_OPERATOR_DENIED = frozenset({"attrgetter", "itemgetter", "methodcaller", "call"})
_TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "layout"})
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_SKIPPED_INIT_ARGS = frozenset({"device", "dtype", "self"})


def _is_allowed(namespace: str, name: str, fn: Any) -> bool:
    """Whether ``namespace.name`` is a pure operation a stored graph may call."""
    if name.startswith("_") or not callable(fn) or isinstance(fn, type):
        return False
    if namespace == "builtins":
        return name in _BUILTINS
    if namespace == "operator":
        return name not in _OPERATOR_DENIED
    if namespace == "torch":
        if name in _TORCH_DENIED:
            return False
        is_native = getattr(torch._C._VariableFunctions, name, None) is fn
        is_functional = name in getattr(torch.functional, "__all__", ())
        return is_native or is_functional
    return True


def function_name(fn: Callable) -> str:
    """The allow-listed qualified name of ``fn``, or :class:`GraphFormatError` when it has none."""
    name = getattr(fn, "__name__", None)
    if name is not None:
        for namespace, module in _NAMESPACES.items():
            if getattr(module, name, None) is fn and _is_allowed(namespace, name, fn):
                return f"{namespace}.{name}"
    raise GraphFormatError(
        f"the function {fn!r} cannot be stored as data: it is not a pure torch, "
        "torch.nn.functional, operator or math function",
        hint="express that step with torch functions, or move it into the frame outside every block",
    )


def resolve_function(qualified: str) -> Callable:
    """The function a stored ``call_function`` node names, checked against the allow-list."""
    namespace, _, name = qualified.rpartition(".")
    module = _NAMESPACES.get(namespace)
    fn = getattr(module, name, None) if module is not None else None
    if fn is None or not _is_allowed(namespace, name, fn):
        raise GraphFormatError(
            f"stored graph calls {qualified!r}, which is not an allowed operation",
            hint="the bank was not written by blockscale or was tampered with; rebuild it",
        )
    return fn


def _check_method(name: str, args: tuple) -> str:
    """A tensor method name, called on a value the graph computed (never on a literal)."""
    if (
        not isinstance(name, str)
        or name.startswith("_")
        or not hasattr(torch.Tensor, name)
        or not args
        or not isinstance(args[0], fx.Node)
    ):
        raise GraphFormatError(
            f"stored graph calls the method {name!r} in a way that is not allowed",
            hint="the bank was not written by blockscale or was tampered with; rebuild it",
        )
    return name


def _check_builtin_call(qualified: str, args: tuple, kwargs: dict) -> None:
    """Builtins take no keywords (``min(..., key=eval)``), and ``getattr`` reads only the tensor
    attributes ``torch.fx`` traces (``x.shape``): never a dunder that leads out of the graph."""
    if not qualified.startswith("builtins."):
        return
    allowed_getattr = (
        len(args) == 2 and isinstance(args[0], fx.Node) and args[1] in _TENSOR_ATTRIBUTES
    )
    if kwargs or (qualified == "builtins.getattr" and not allowed_getattr):
        raise GraphFormatError(
            f"stored graph calls {qualified} with arguments {args!r} {kwargs!r}, "
            "which is not allowed",
            hint="the bank was not written by blockscale or was tampered with; rebuild it",
        )


def encode_arg(value: Any) -> Any:
    """Encode an fx argument (nodes, scalars, containers, slices, dtypes) as JSON-able data."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [encode_arg(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode_arg(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): encode_arg(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [encode_arg(value.start), encode_arg(value.stop), encode_arg(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise GraphFormatError(
        f"the argument {value!r} of type {type(value).__name__} cannot be stored as data",
        hint="pass plain numbers, tuples, slices or tensors produced inside the graph",
    )


def decode_arg(data: Any, env: dict[str, fx.Node] | None = None) -> Any:
    """Inverse of :func:`encode_arg`; node references are looked up in ``env``."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode_arg(v, env) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise GraphFormatError(f"malformed stored argument {data!r}")
    ((tag, payload),) = data.items()
    if tag == "node":
        if env is None or payload not in env:
            raise GraphFormatError(f"stored graph refers to an unknown node {payload!r}")
        return env[payload]
    if tag == "float":
        return float(payload)
    if tag == "tuple":
        return tuple(decode_arg(v, env) for v in payload)
    if tag == "dict":
        return {k: decode_arg(v, env) for k, v in payload.items()}
    if tag == "slice":
        return slice(*(decode_arg(v, env) for v in payload))
    if tag in ("dtype", "memory_format"):
        value = getattr(torch, str(payload), None)
        if not isinstance(value, torch.dtype | torch.memory_format):
            raise GraphFormatError(f"unknown stored {tag} {payload!r}")
        return value
    if tag == "device":
        return torch.device(str(payload))
    if tag == "ellipsis":
        return Ellipsis
    raise GraphFormatError(f"unknown stored argument tag {tag!r}")


def _is_layer_class(cls: object) -> bool:
    """A concrete torch.nn layer class: not a container and not the Module base itself."""
    return (
        isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and cls is not nn.Module
        and not issubclass(cls, _CONTAINERS)
    )


def _layer_class(name: str) -> type[nn.Module]:
    cls = getattr(nn, name, None) if not name.startswith("_") else None
    if not _is_layer_class(cls):
        raise GraphFormatError(
            f"stored layer type {name!r} is not a torch.nn layer",
            hint="the bank was not written by blockscale or was tampered with; rebuild it",
        )
    return cls


def encode_layer(module: nn.Module, path: str = "") -> dict[str, Any]:
    """Describe a leaf ``torch.nn`` layer by class name and constructor arguments."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls or not _is_layer_class(cls):
        raise GraphFormatError(
            f"layer {path or cls.__name__!r} of type {cls.__module__}.{cls.__qualname__} is not a "
            "built-in torch.nn layer, so it cannot be stored as data",
            hint="let torch.fx trace through it (do not register it as a leaf module)",
        )
    config: dict[str, Any] = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in _SKIPPED_INIT_ARGS:
            continue
        if name == "bias" and name not in module.__constants__:
            config["bias"] = getattr(module, "bias", None) is not None
        elif hasattr(module, name):
            config[name] = encode_arg(getattr(module, name))
    spec = {"type": cls.__name__, "config": config}
    rebuilt = decode_layer(spec)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != expected:
        raise GraphFormatError(
            f"layer {path or cls.__name__!r} ({cls.__name__}) cannot be rebuilt from its constructor "
            "arguments",
            hint="use standard torch.nn layers inside blocks and the frame",
        )
    return spec


def decode_layer(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a layer from :func:`encode_layer`'s description (weights are loaded separately)."""
    cls = _layer_class(str(spec.get("type")))
    config = {k: decode_arg(v) for k, v in dict(spec.get("config", {})).items()}
    allowed = set(inspect.signature(cls.__init__).parameters) - _SKIPPED_INIT_ARGS
    unknown = set(config) - allowed
    if unknown:
        raise GraphFormatError(f"stored {cls.__name__} has unknown arguments {sorted(unknown)}")
    try:
        return cls(**config)
    except (TypeError, ValueError) as exc:
        raise GraphFormatError(f"stored {cls.__name__} cannot be built: {exc}") from exc


def _describe_attr(
    params: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor], path: str
) -> dict[str, Any]:
    """A tensor the graph reads, as data: parameter (trainable or not) or buffer."""
    if path in params:
        return {"name": path, "kind": "parameter", "requires_grad": params[path].requires_grad}
    if path in buffers:
        return {"name": path, "kind": "buffer", "requires_grad": False}
    raise GraphFormatError(
        f"the graph reads {path!r}, a tensor that is neither a parameter nor a buffer, so it "
        "would not be saved",
        hint="register the tensor with register_buffer (or make it a parameter)",
    )


def encode_graph_module(gm: fx.GraphModule, *, slots: frozenset[str] = frozenset()) -> dict:
    """Describe ``gm`` as JSON-able data; ``slots`` are call_module targets filled in at load time."""
    nodes: list[dict[str, Any]] = []
    layers: dict[str, dict] = {}
    attrs: list[dict[str, Any]] = []
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "placeholder":
            entry["target"] = str(node.target)
        elif node.op == "get_attr":
            entry["target"] = str(node.target)
            if all(a["name"] != node.target for a in attrs):
                attrs.append(_describe_attr(params, buffers, str(node.target)))
        elif node.op == "call_module":
            entry["target"] = str(node.target)
            if node.target not in slots and node.target not in layers:
                layers[node.target] = encode_layer(gm.get_submodule(node.target), node.target)
        elif node.op == "call_function":
            entry["target"] = function_name(node.target)
            _check_builtin_call(entry["target"], tuple(node.args), dict(node.kwargs))
        elif node.op == "call_method":
            entry["target"] = _check_method(node.target, tuple(node.args))
        if node.op != "placeholder" or node.args:
            entry["args"] = encode_arg(tuple(node.args))
        if node.kwargs:
            entry["kwargs"] = encode_arg(dict(node.kwargs))
        nodes.append(entry)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "layers": layers, "attrs": attrs}


def _install(root: nn.Module, path: str, value: nn.Module | torch.Tensor) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        child = root._modules.get(part)
        if child is None:
            child = nn.Module()
            root.add_module(part, child)
        root = child
    if isinstance(value, nn.Module):
        root.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        root.register_parameter(leaf, value)
    else:
        root.register_buffer(leaf, value)


def decode_graph_module(
    data: dict,
    state: dict[str, torch.Tensor],
    *,
    slots: dict[str, nn.Module] | None = None,
    class_name: str = "GraphModule",
) -> fx.GraphModule:
    """Rebuild a graph module from :func:`encode_graph_module`'s data and its state dict.

    Layers are first built without memory (on the meta device) and take their tensors from the
    state dict, which must hold exactly the module's parameters and buffers: a missing, surplus or
    misshapen tensor is an error, never a silently random weight or a huge allocation.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        found = (data.get("format"), data.get("version")) if isinstance(data, dict) else data
        raise GraphFormatError(
            f"stored graph has format and version {found!r}; this release reads {FORMAT!r} "
            f"version {VERSION}"
        )
    try:
        return _decode(data, state, slots or {}, class_name)
    except GraphFormatError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        raise GraphFormatError(f"stored graph is malformed: {type(exc).__name__}: {exc}") from exc


def _decode(
    data: dict, state: dict[str, torch.Tensor], slots: dict[str, nn.Module], class_name: str
) -> fx.GraphModule:
    root = nn.Module()
    layers = data.get("layers", {})
    with torch.device("meta"):
        for path, spec in layers.items():
            _install(root, path, decode_layer(spec))
    for path, module in slots.items():
        _install(root, path, module)
    for attr in data.get("attrs", []):
        name = str(attr["name"])
        if name not in state:
            raise GraphFormatError(f"stored graph reads the tensor {name!r}, which has no weights")
        tensor = state[name]
        if attr.get("kind") == "parameter":
            _install(root, name, nn.Parameter(tensor, requires_grad=bool(attr["requires_grad"])))
        else:
            _install(root, name, tensor)

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data.get("nodes", []):
        op, name = entry.get("op"), entry.get("name")
        args = decode_arg(entry.get("args", {"tuple": []}), env)
        kwargs = decode_arg(entry.get("kwargs", {"dict": {}}), env)
        if op == "placeholder":
            node = graph.placeholder(str(entry["target"]))
        elif op == "output":
            node = graph.output(args[0])
        elif op == "get_attr":
            node = graph.get_attr(str(entry["target"]))
        elif op == "call_module":
            target = str(entry["target"])
            if target not in layers and target not in slots:
                raise GraphFormatError(f"stored graph calls an undeclared layer {target!r}")
            node = graph.call_module(target, args, kwargs)
        elif op == "call_function":
            qualified = str(entry["target"])
            fn = resolve_function(qualified)
            _check_builtin_call(qualified, args, kwargs)
            node = graph.call_function(fn, args, kwargs)
        elif op == "call_method":
            node = graph.call_method(_check_method(entry["target"], args), args, kwargs)
        else:
            raise GraphFormatError(f"stored graph has a node of unknown kind {op!r}")
        node.name = str(name)
        env[str(name)] = node
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=class_name)
    own = {k: v for k, v in state.items() if not any(k.startswith(f"{s}.") for s in slots)}
    try:
        result = gm.load_state_dict(own, strict=False, assign=True)
    except RuntimeError as exc:
        raise GraphFormatError(f"stored weights do not fit the stored graph: {exc}") from exc
    missing = [k for k in result.missing_keys if not any(k.startswith(f"{s}.") for s in slots)]
    unfilled = [n for n, t in (*gm.named_parameters(), *gm.named_buffers()) if t.is_meta]
    if missing or result.unexpected_keys or unfilled:
        raise GraphFormatError(
            "stored weights do not fit the stored graph "
            f"(missing {(missing or unfilled)[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return gm
