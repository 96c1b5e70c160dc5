"""Model checkpoints as one safetensors file: weights plus the registry name and kwargs, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from blockscale.errors import BlockscaleError, CheckpointError
from blockscale.models._registry import create_model

__all__ = ["FORMAT", "VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT = "blockscale-checkpoint"
VERSION = 1
_FIELDS = ("format", "version", "model", "kwargs", "extra")
_RESAVE = "re-create it with blockscale.models.checkpoint.save_checkpoint"


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model`'s weights and how to rebuild it to `path` atomically, so a crash never leaves half a file."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        reference = create_model(model_name, **model_kwargs)
    _check_fits(reference, tensors, f"model {model_name!r} with kwargs {model_kwargs}", path)
    fields = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "kwargs": model_kwargs,
        "extra": extra or {},
    }
    try:
        metadata = {key: json.dumps(value, sort_keys=True) for key, value in fields.items()}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path}: model_kwargs or extra is not JSON-serializable ({exc})",
            hint="pass only str, int, float, bool, None, lists and dicts in model_kwargs and extra",
        ) from exc
    metadata["sha256"] = json.dumps(_digest(metadata, tensors))
    payload = save_safetensors(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; a checkpoint is shareable
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at `path` via the registry and load its weights (strict), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist",
            hint="check the path; checkpoints end in .safetensors",
        )
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        raw = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (safetensors.SafetensorError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file (truncated or corrupt): {exc}",
            hint=f"copy the file again or {_RESAVE}",
        ) from exc
    fields = _decode_metadata(raw, path)
    if _digest(raw, tensors) != fields.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} does not match its recorded sha256: the file is corrupt",
            hint=f"copy the file again or {_RESAVE}",
        )
    what = f"model {fields['model']!r} with kwargs {fields['kwargs']}"
    try:
        model = create_model(fields["model"], **fields["kwargs"])
    except (BlockscaleError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} names {what}, which cannot be built: {exc}",
            hint="load it with the blockscale version (and registered models) that wrote it",
        ) from exc
    _check_fits(model, tensors, what, path)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, {key: fields[key] for key in _FIELDS}


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """Parse and validate the JSON-encoded header metadata; check the version before trusting the rest."""
    if raw.get("format") != json.dumps(FORMAT):
        raise CheckpointError(
            f"{path} is a safetensors file but not a blockscale checkpoint (no format={FORMAT!r} metadata)",
            hint=f"{_RESAVE}, passing the model's registry name and kwargs",
        )
    try:
        fields = {key: json.loads(value) for key, value in raw.items()}
    except ValueError as exc:
        raise CheckpointError(
            f"checkpoint {path} has unreadable metadata: {exc}",
            hint=f"copy the file again or {_RESAVE}",
        ) from exc
    if fields.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {fields.get('version')!r}; this release reads {VERSION}",
            hint="load it with the blockscale version that wrote it, or upgrade blockscale",
        )
    missing = [key for key in (*_FIELDS, "sha256") if key not in fields]
    malformed = not isinstance(fields.get("model"), str) or not all(
        isinstance(fields.get(key), dict) for key in ("kwargs", "extra")
    )
    if missing or malformed:
        raise CheckpointError(
            f"checkpoint {path} has incomplete metadata (missing or malformed: {missing or 'model/kwargs/extra'})",
            hint=f"copy the file again or {_RESAVE}",
        )
    return fields


def _digest(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """Hash metadata and every tensor's name, dtype, shape and bytes, so any flipped byte is caught."""
    h = hashlib.sha256()
    fields = {key: value for key, value in metadata.items() if key != "sha256"}
    h.update(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_fits(model: nn.Module, tensors: dict[str, Tensor], what: str, path: Path) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or misshapen tensor."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit {what}: {shown}",
            hint="pass the model_name and model_kwargs the model was really built with",
        )
