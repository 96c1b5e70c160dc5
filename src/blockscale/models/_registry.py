"""Model registry (timm style): models register by name so checkpoints and the CLI can rebuild them."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from blockscale.errors import ConfigError, UnknownModelError

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register a model constructor under its function name so `create_model` can build it by name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(
            f"a model named {name!r} is already registered; give the function another name"
        )
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Return the registered model names, sorted, so users and error messages can show the choices."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with `kwargs`; the one way checkpoints and the CLI make models."""
    try:
        fn = _MODELS[name]
    except KeyError:
        known = list_models()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use one of the known names"
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(known)}", hint=hint
        ) from None
    accepted = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [] if takes_any else sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name} takes no argument {', '.join(map(repr, unknown))}",
            hint=f"its arguments: {', '.join(accepted)}",
        )
    return fn(**kwargs)


def init_weights(model: nn.Module) -> None:
    """Apply standard Kaiming init in place, so every zoo model starts from the same recipe."""
    if any(p.is_meta for p in model.parameters()):
        return  # meta tensors hold no values, and random init on meta imports torch._dynamo (seconds)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
