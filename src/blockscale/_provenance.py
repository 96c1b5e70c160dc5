"""Where, when and with what a result was measured, and the command that reruns it: the header
of every result file that ``blockscale bench`` and the scripts in ``benchmarks/`` write."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
from collections.abc import Collection
from datetime import date
from typing import Any

import torch

from .targets import machine


def provenance() -> dict[str, Any]:
    """The machine, the Python, torch and ONNX Runtime versions, and today's date."""
    try:
        onnxruntime = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        onnxruntime = None
    return {
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime,
        "date": date.today().isoformat(),
    }


def command(script: str, args: argparse.Namespace, skip: Collection[str] = ("out_json",)) -> str:
    """The command line that reruns ``script`` with ``args``: every option spelled out (a flag
    that is off, an option that is None and those in ``skip`` left out; a list as the option
    repeated), so a later change of a default does not change what the recorded command means;
    ``OMP_NUM_THREADS`` in front when it is set."""
    threads = os.environ.get("OMP_NUM_THREADS")
    words = [f"OMP_NUM_THREADS={threads}"] if threads else []
    words += ["python", script]
    for name, value in vars(args).items():
        if name in skip or value is False or value is None:
            continue
        option = f"--{name.replace('_', '-')}"
        if value is True:
            words.append(option)
        elif isinstance(value, list | tuple):
            words += [word for item in value for word in (option, str(item))]
        else:
            words += [option, str(value)]
    return " ".join(words)
