"""The ``blockscale`` command line: every stage of the Python API, with tables or ``--json``."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import BlockscaleError, ConfigError, ExportError

app = typer.Typer(
    name="blockscale",
    help="Block-grained scaling of deep neural networks for mobile and edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console()
_err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Zoo model name (see `list-models`).")
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="Teacher checkpoint (.safetensors) from `train`."),
]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="Data set that fixes input shape and classes.")
]
ShapeOpt = Annotated[
    str | None,
    typer.Option("--input-shape", help="Per-sample input shape C,H,W (overrides the data set's)."),
]
BlocksOpt = Annotated[
    str | None,
    typer.Option("--blocks", help="Comma-separated module paths to use as blocks (default: auto)."),
]
SparsitiesOpt = Annotated[
    str,
    typer.Option("--sparsities", help="Comma-separated channel sparsities; 0 keeps the original."),
]
ConfidenceOpt = Annotated[
    float | None,
    typer.Option(
        help="Select under the latency margin validation measured, so the pick meets the "
        "budget as measured this often (e.g. 0.95); default: the plain estimate.",
    ),
]
RoundToOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Round kept channels up to a multiple of this (8: the widths SIMD kernels run "
        "blocked; 1: exact widths).",
    ),
]


def _emit(data: Any, as_json: bool, render: Any) -> None:
    """Print ``data`` as JSON or through ``render`` (a function drawing tables)."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        render()


def _run(fn: Any) -> Any:
    """Call ``fn``; a blockscale error becomes a one-paragraph message and exit status 2."""
    try:
        return fn()
    except BlockscaleError as exc:
        # escaped: messages hold brackets (blockscale[tflite], blocks=[...]) that rich would eat
        _err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            _err.print(f"[bold]fix:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


def _model_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as keyword arguments; a value is read as JSON (numbers, booleans)
    where it parses, else kept as text."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise typer.BadParameter(f"--model-arg takes KEY=VALUE, got {item!r}")
        if key.strip() in ("in_channels", "num_classes"):
            raise typer.BadParameter(f"{key.strip()} is fixed by the data set (--dataset)")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            args[key.strip()] = value
    return args


def _block_names(text: str | None) -> tuple[str, ...] | None:
    """``--blocks a,b`` as module paths; None means: cut automatically."""
    return tuple(b.strip() for b in text.split(",") if b.strip()) if text else None


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"--input-shape must look like 3,32,32, got {text!r}") from None


def _teacher(
    model: str | None, checkpoint: Path | None, dataset: str, input_shape: str | None
) -> tuple[Any, tuple[int, ...], dict[str, Any]]:
    """The teacher module, its per-sample input shape, and a description for the bank."""
    from .models import create_model, load_checkpoint

    shapes = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
    classes = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
    if checkpoint is not None:
        net, meta = load_checkpoint(checkpoint)
        extra = meta.get("extra", {})
        dataset = extra.get("dataset", dataset)
        description = {
            "name": meta["model"],
            "kwargs": meta["kwargs"],
            "checkpoint": str(checkpoint),
            **extra,
        }
        if model is not None and model != meta["model"]:
            raise BlockscaleError(
                f"--model {model} contradicts the checkpoint, which holds {meta['model']}",
                hint="drop --model when you pass --checkpoint",
            )
    elif model is not None:
        kwargs = {
            "in_channels": (_shape(input_shape) or shapes.get(dataset, (3,)))[0],
            "num_classes": classes.get(dataset, 10),
        }
        net = create_model(model, **kwargs)
        description = {"name": model, "kwargs": kwargs, "dataset": dataset, "trained": False}
        _err.print(
            f"[yellow]note:[/] {model} has random weights; pass --checkpoint for a trained teacher"
        )
    else:
        raise typer.BadParameter("pass --model NAME or --checkpoint FILE")
    shape = _shape(input_shape) or description.get("input_shape") or shapes.get(dataset)
    if shape is None:
        raise typer.BadParameter(f"no known input shape for {dataset!r}; pass --input-shape C,H,W")
    return net.eval(), tuple(shape), description


@app.command("list-models")
def list_models_cmd(as_json: JsonOpt = False) -> None:
    """List the model zoo."""
    from .models import list_models

    names = list_models()
    _emit(names, as_json, lambda: _out.print("\n".join(names)))


@app.command("list-datasets")
def list_datasets_cmd(as_json: JsonOpt = False) -> None:
    """List the built-in data sets."""
    from .data import list_datasets

    sets = list_datasets()

    def render() -> None:
        table = Table("name", "description")
        for name, text in sets.items():
            table.add_row(name, text)
        _out.print(table)

    _emit(sets, as_json, render)


@app.command()
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model name.")] = "resnet20",
    dataset: DatasetOpt = "fashion-mnist",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")] = Path(
        "teacher.safetensors"
    ),
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle schedule).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    limit: Annotated[
        int | None, typer.Option(help="Train on at most this many images (quick runs).")
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--model-arg",
            help="A model argument KEY=VALUE, e.g. width_mult=0.5 (repeat for several); "
            "stored in the checkpoint.",
        ),
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the data set.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a teacher from the zoo and save it as a safetensors checkpoint."""
    from .data import load_dataset, subset
    from .models import create_model, save_checkpoint
    from .train import TrainConfig
    from .train import train as train_model

    def run() -> dict[str, Any]:
        full = load_dataset(dataset, "train", root=data_root, augment=True)
        test_set = load_dataset(dataset, "test", root=data_root)
        train_set = subset(full, limit, seed=seed) if limit is not None else full
        kwargs = {
            **_model_args(model_arg or ()),
            "in_channels": full.in_channels,
            "num_classes": full.num_classes,
        }
        net = create_model(model, **kwargs)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        result = train_model(net, train_set, test_set, config, progress=not as_json)
        extra = {
            "dataset": dataset,
            "input_shape": [full.in_channels, *full.input_size],
            "test_accuracy": result.test_accuracy,
            "train": config.to_dict(),
            "train_images": len(train_set),
            "seconds": round(result.seconds, 1),
        }
        save_checkpoint(net, out, model_name=model, model_kwargs=kwargs, extra=extra)
        return {"model": model, "checkpoint": str(out), **extra, "history": result.history}

    summary = _run(run)

    def render() -> None:
        _out.print(
            f"{model} on {dataset}: test accuracy {summary['test_accuracy']:.2%} "
            f"after {epochs} epochs in {summary['seconds']:.0f} s -> {out}"
        )

    _emit(summary, as_json, render)


@app.command("inspect-model")
def inspect_model(
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    input_shape: ShapeOpt = None,
    blocks: BlocksOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cut a model into blocks and print the plan."""
    import torch

    from .extract import extract

    def run() -> Any:
        net, shape, _ = _teacher(model, checkpoint, dataset, input_shape)
        names = _block_names(blocks)
        return extract(net, torch.randn(1, *shape), names).plan

    plan = _run(run)

    def render() -> None:
        table = Table(
            "#", "block", "convs", "params", "input", "output", title=f"{plan.model}: block plan"
        )
        for b in plan.blocks:
            table.add_row(
                str(b.index),
                b.name,
                str(b.num_convs),
                f"{b.num_params:,}",
                "x".join(map(str, b.input_shape)),
                "x".join(map(str, b.output_shape)),
            )
        _out.print(table)
        share = plan.frame_params / max(plan.total_params, 1)
        _out.print(
            f"{plan.num_blocks} blocks; frame ({plan.frame_kind}): {plan.frame_params:,} params "
            f"({share:.1%}), {len(plan.frame_modules)} layers"
        )

    _emit(plan.to_dict(), as_json, render)


@app.command()
def derive(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bank directory to write.")],
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    input_shape: ShapeOpt = None,
    blocks: BlocksOpt = None,
    sparsities: SparsitiesOpt = "0,0.2,0.4,0.6,0.8,0.9",
    round_to: RoundToOpt = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bank.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Extract blocks and derive pruned descendants of each, writing a bank (no retraining)."""
    import torch

    from ._progress import progress_bar
    from .bank import Bank
    from .derive import derive as derive_descendants
    from .extract import extract
    from .types import DeriveConfig

    def run() -> Bank:
        config = DeriveConfig(sparsities=_floats(sparsities, "--sparsities"), round_to=round_to)
        net, shape, description = _teacher(model, checkpoint, dataset, input_shape)
        names = _block_names(blocks)
        decomposition = extract(net, torch.randn(1, *shape), names)
        total = decomposition.plan.num_blocks * len(config.sparsities)
        with progress_bar("derive", total, enabled=not as_json) as advance:
            families = derive_descendants(decomposition, config, progress=lambda done, n: advance())
        return Bank.write(
            out,
            decomposition,
            families,
            teacher=description,
            derive_config=config,
            overwrite=overwrite,
        )

    _show_bank(_run(run), as_json)


def _bank_summary(bank: Any) -> dict[str, Any]:
    k = [len(f) for f in bank.descendants]
    options = 1
    for n in k:
        options *= n
    return {
        "path": str(bank.path),
        "teacher": bank.manifest.get("teacher", {}),
        "plan": bank.plan.to_dict(),
        "sparsities": list(bank.derive_config.sparsities),
        "options": options,
        "bytes": sum(r.bytes for r in bank.files.values()),
        "descendants": [
            [{**d.to_dict(), "bytes": bank.file_bytes(d.block, d.index)} for d in family]
            for family in bank.descendants
        ],
    }


@app.command()
def build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bank directory to write.")],
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the data set.")] = None,
    blocks: BlocksOpt = None,
    sparsities: SparsitiesOpt = "0,0.2,0.4,0.6,0.8,0.9",
    round_to: RoundToOpt = 8,
    epochs: Annotated[int, typer.Option(help="Retraining epochs per descendant.")] = 10,
    lr: Annotated[float, typer.Option(help="Retraining learning rate (Adam).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Retraining batch size.")] = 64,
    chain: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of each batch a descendant sees through the previous block's descendant "
            "at its level (0: the teacher's input alone, as LegoDNN).",
        ),
    ] = 0.5,
    retrain_samples: Annotated[int, typer.Option(help="Training images for retraining.")] = 10_000,
    profile_samples: Annotated[
        int, typer.Option(help="Held-out training images for accuracy drops.")
    ] = 2_000,
    validate_samples: Annotated[
        int, typer.Option(help="Random selections measured to check the estimate (0: skip).")
    ] = 20,
    validate_frontier: Annotated[
        int,
        typer.Option(
            min=0,
            help="Selections along the estimate's frontier measured after them, for the margin "
            "of select --confidence (0: the random selections give it).",
        ),
    ] = 10,
    target: Annotated[
        str, typer.Option(help="Latency target: ort-Nt (ONNX Runtime), torch-Nt or tflite-Nt.")
    ] = "ort-1t",
    cache: Annotated[str, typer.Option(help="Feature cache: auto, memory, disk or none.")] = "auto",
    fp16_cache: Annotated[bool, typer.Option(help="Cache features as float16.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bank.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a bank: extract, derive, retrain, profile, validate; resumes an interrupted build."""
    from .data import load_dataset
    from .pipeline import BuildConfig
    from .pipeline import build as build_bank
    from .profile import ProfileConfig
    from .retrain import RetrainConfig
    from .types import DeriveConfig

    def run() -> Any:
        chosen = checkpoint
        if chosen is None and model is not None:
            shipped = Path("checkpoints") / f"{model}-{dataset}.safetensors"
            if not shipped.is_file():
                raise BlockscaleError(
                    f"no trained {model} teacher for {dataset}",
                    hint=f"train one: blockscale train --model {model} --dataset {dataset} "
                    f"--out {shipped}, or pass --checkpoint",
                )
            chosen = shipped
        net, shape, description = _teacher(model if checkpoint else None, chosen, dataset, None)
        config = BuildConfig(
            derive=DeriveConfig(sparsities=_floats(sparsities, "--sparsities"), round_to=round_to),
            retrain=RetrainConfig(
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                chain=chain,
                seed=seed,
                cache=cache,
                cache_dtype="float16" if fp16_cache else "float32",
            ),
            profile=ProfileConfig(),
            target=target,
            retrain_samples=retrain_samples,
            profile_samples=profile_samples,
            validate_samples=validate_samples,
            validate_frontier=validate_frontier,
            seed=seed,
            blocks=_block_names(blocks),
        )
        train_set = load_dataset(description.get("dataset", dataset), "train", root=data_root)
        log = (lambda text: None) if as_json else _err.print
        return build_bank(
            net,
            train_set,
            out,
            config,
            teacher_info=description,
            input_shape=shape,
            overwrite=overwrite,
            progress=not as_json,
            log=log,
        )

    _show_bank(_run(run), as_json)


def _show_profile(bank: Any) -> None:
    """Tables of accuracy drop and latency per descendant, and the estimate's validation."""
    profiles = bank.profile
    sparsities = bank.derive_config.sparsities
    for target, record in profiles.targets.items():
        source = (
            f" (predicted from {record['predicted_from']}, {record['samples']} samples)"
            if "predicted_from" in record
            else ""
        )
        table = Table(
            "#",
            "block",
            *[f"s={s:g}" for s in sparsities],
            title=f"accuracy drop (points) / latency (ms) on {target}{source}",
        )
        for info, family in zip(bank.plan.blocks, profiles.descendants, strict=True):
            cells = [
                f"{100 * p.accuracy_drop:.1f}/{p.latency_ms.get(target, float('nan')):.2f}"
                for p in family
            ]
            table.add_row(str(info.index), info.name, *cells)
        _out.print(table)
        frame_ms = profiles.frame.latency_ms.get(target, float("nan"))
        _out.print(
            f"teacher accuracy {profiles.teacher_accuracy:.2%} on {profiles.val_samples} held-out "
            f"images; frame {frame_ms:.2f} ms"
        )
        check = profiles.validation.get(target)
        if check:
            # a Spearman correlation of too few or tied selections is NaN, stored as None;
            # a target checked for latency alone (calibrate --selections) has no accuracy
            accuracy = (
                f"accuracy MAE {check['accuracy_mae_points']:.2f} points (Spearman "
                f"{_or_dash(check['accuracy_spearman'], '{:.3f}')}), "
                if "accuracy_mae_points" in check
                else ""
            )
            _out.print(
                f"additive estimate on {check['samples']} random selections: {accuracy}latency "
                f"MAPE {check['latency_mape_percent']:.1f}% (Spearman "
                f"{_or_dash(check['latency_spearman'], '{:.3f}')})"
            )
            if "relative_latency_mape_percent" in check:
                _out.print(
                    f"latency relative to the teacher, timed side by side: MAPE "
                    f"{check['relative_latency_mape_percent']:.1f}% (Spearman "
                    f"{_or_dash(check['relative_latency_spearman'], '{:.3f}')})"
                )
            if "frontier" in check:
                at = check["frontier"]
                over = (
                    f", accuracy overestimated by {at['accuracy_overestimate_points']:.2f} points"
                    if "accuracy_overestimate_points" in at
                    else ""
                )
                _out.print(
                    f"on {at['samples']} selections along the frontier: latency MAPE "
                    f"{at['latency_mape_percent']:.1f}% (the estimate kept){over}"
                )
            fix = profiles.latency_corrections.get(target)
            if fix and (fix.offset_ms, fix.scale) != (0.0, 1.0):
                _out.print(
                    f"latency corrected to {fix.offset_ms:+.3f} ms + {fix.scale:.3f} x the sum "
                    f"(leave-one-out MAPE {check['corrected_latency_mape_percent']:.1f}%)"
                )
            if fix and fix.residuals:
                _out.print(
                    f"latency margin for --confidence 0.95: x{fix.headroom(0.95):.3f} "
                    f"(from {len(fix.residuals)} measured selections"
                    f"{' along the frontier' if 'frontier' in check else ''})"
                )


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _show_bank(bank: Any, as_json: bool) -> None:
    summary = _bank_summary(bank)

    def render() -> None:
        sparsities = bank.derive_config.sparsities
        table = Table(
            "#",
            "block",
            "in->out",
            *[f"s={s:g}" for s in sparsities],
            "KiB",
            title=f"bank {bank.path} ({bank.plan.model})",
            caption="parameters of each descendant; KiB: the block's weights on disk",
        )
        for info, family in zip(bank.plan.blocks, summary["descendants"], strict=True):
            shapes = f"{_dims(info.input_shape)}->{_dims(info.output_shape)}"
            cells = [_count(d["num_params"]) for d in family]
            size = sum(d["bytes"] for d in family) / 1024
            table.add_row(str(info.index), info.name, shapes, *cells, f"{size:,.0f}")
        _out.print(table)
        _out.print(
            f"{bank.plan.num_blocks} blocks x {len(sparsities)} descendants = "
            f"{summary['options']:,} models; {summary['bytes'] / 2**20:.2f} MiB on disk"
        )
        if "profiles" in bank.manifest:
            _show_profile(bank)

    _emit(summary, as_json, render)


@app.command()
def inspect(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a bank's blocks, descendants and sizes (every file is verified first)."""
    from .bank import Bank

    _show_bank(_run(lambda: Bank.open(bank)), as_json)


@app.command()
def bench(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for bench.json and plots.")
    ] = Path("bench-out"),
    models: Annotated[
        str, typer.Option(help="Zoo models, comma-separated; each needs a teacher checkpoint.")
    ] = "resnet20,vgg11_bn,mobilenetv2",
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny subsets and one epoch: a few minutes.")
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs for the bank and every baseline alike.")
    ] = None,
    train_images: Annotated[
        int | None, typer.Option(help="Training images for the bank and every baseline alike.")
    ] = None,
    validate_samples: Annotated[
        int | None,
        typer.Option(help="Random selections the build measures to fit its corrections (0: none)."),
    ] = None,
    round_to: Annotated[
        int | None,
        typer.Option(min=1, help="Round kept widths up to a multiple of this, bank and baselines."),
    ] = None,
    target: Annotated[str | None, typer.Option(help="Target latency is measured on.")] = None,
    checkpoints: Annotated[
        Path, typer.Option(help="Folder of MODEL-DATASET.safetensors teachers.")
    ] = Path("checkpoints"),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate blockscale against model-level baselines (uniform scaling, L1 compression,
    distillation): options, training time, and measured accuracy at every latency and memory
    budget, side by side in one run."""
    from dataclasses import replace as with_

    from .bench import ALL_METHODS, BenchConfig, run_bench

    names = tuple(m.strip() for m in models.split(",") if m.strip())

    def run() -> dict[str, Any]:
        config = BenchConfig.quick(names) if quick else BenchConfig(models=names)
        changes: dict[str, Any] = {"checkpoints": str(checkpoints)}
        for name, value in (
            ("epochs", epochs),
            ("train_images", train_images),
            ("validate_samples", validate_samples),
            ("round_to", round_to),
            ("target", target),
        ):
            if value is not None:
                changes[name] = value
        log = (lambda text: None) if as_json else _err.print
        return run_bench(with_(config, **changes), out, progress=not as_json, log=log)

    result = _run(run)

    def render() -> None:
        for model, goals in zip(result["models"], result["goals"], strict=True):
            table = Table(
                "budget",
                *ALL_METHODS,
                title=f"{model['model']}: measured test accuracy (teacher "
                f"{model['teacher']['test_accuracy']:.2%}); {model['options']['blockscale']:,} "
                f"options against {model['levels']} per baseline",
            )
            for row in model["budgets"]:
                table.add_row(
                    f"{row['kind']} {row['fraction']:.0%}",
                    *(
                        "-" if row[m] is None else f"{row[m]['test_accuracy']:.2%}"
                        for m in ALL_METHODS
                    ),
                )
            _out.print(table)
            ratios = ", ".join(
                f"{m} {goals['training_ratio'][m]:.2f}x" for m in goals["training_ratio"]
            )
            _out.print(f"bank training time against each family (equal epochs): {ratios}")
        _out.print(f"results: {out / 'bench.json'}; plots: {out}/bench-MODEL.png")

    _emit(result, as_json, render)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")] = Path(
        "demo-out"
    ),
    teacher: Annotated[
        Path, typer.Option(help="Teacher checkpoint; trained quickly when absent.")
    ] = Path("checkpoints/resnet20-fashion-mnist.safetensors"),
    as_json: JsonOpt = False,
) -> None:
    """Run the built-in demo: ResNet-20 on Fashion-MNIST, from teacher to bank to selections."""
    from .demo import run_demo

    log = (lambda text: None) if as_json else _err.print
    summary = _run(lambda: run_demo(out, teacher=teacher, progress=not as_json, log=log))

    def render() -> None:
        from .bank import Bank

        _show_bank(Bank.open(summary["bank"]), as_json=False)
        table = Table(
            "budget ms",
            "est. acc",
            "test acc",
            "est. ms",
            "measured ms",
            "MB",
            "choices",
            title=f"selections on {summary['target']} (test accuracy on "
            f"{summary['test_images']} images; teacher {summary['teacher_test_accuracy']:.2%}, "
            f"{summary['teacher_latency_ms']:.2f} ms)",
        )
        for row in summary["selections"]:
            if "choices" not in row:
                table.add_row(f"{row['budget_ms']:.2f}", "infeasible", "", "", "", "", "")
                continue
            table.add_row(
                f"{row['budget_ms']:.2f}",
                f"{row['estimated_accuracy']:.2%}",
                f"{row['measured_accuracy']:.2%}",
                f"{row['estimated_latency_ms']:.2f}",
                f"{row['measured_latency_ms']:.2f}",
                f"{row['memory_mb']:.2f}",
                "".join(map(str, row["choices"])),
            )
        _out.print(table)
        uniform = Table(
            "uniform sparsity",
            "test acc",
            "measured ms",
            title="model-level scaling: one sparsity in every block (measured)",
        )
        for row in summary["uniform"]:
            uniform.add_row(
                f"{row['sparsity']:g}",
                f"{row['measured_accuracy']:.2%}",
                f"{row['measured_latency_ms']:.2f}",
            )
        _out.print(uniform)
        _out.print(
            f"frontier plot: {summary['frontier_plot']}; summary: {out / 'demo.json'}; "
            f"{summary['seconds']:.0f} s in all"
        )

    _emit(summary, as_json, render)


@app.command("profile")
def profile_cmd(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    target: Annotated[str, typer.Option(help="Target to measure, e.g. torch-2t.")],
    repeats: Annotated[int, typer.Option(help="Timed runs per module (median).")] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed runs before each round.")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Measure a bank's latencies on another target and add them (nothing is retrained)."""
    from .bank import Bank
    from .profile import ProfileConfig, add_target
    from .targets import Target

    def run() -> Any:
        opened = Bank.open(bank)
        chosen = Target.parse(target)
        profiles = add_target(
            opened.profile,
            opened.decomposition(),
            opened.load_descendants(),
            chosen,
            ProfileConfig(repeats=repeats, warmup=warmup),
            progress=not as_json,
        )
        opened.update(profiles=profiles.to_dict())
        return opened

    opened = _run(run)
    _show_bank(opened, as_json)


@app.command()
def calibrate(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    target: Annotated[str, typer.Option(help="The target to predict, e.g. ortq-2t.")],
    proxy: Annotated[
        str,
        typer.Option(
            help="A target the bank was profiled on, e.g. ort-1t; 'auto': the one that predicts "
            "the timed samples best, each left out in turn."
        ),
    ] = "auto",
    samples: Annotated[int, typer.Option(help="Descendants to time on the target.")] = 10,
    selections: Annotated[
        int,
        typer.Option(
            min=0,
            help="Random selections then timed whole there, to correct the estimate and give "
            "select --confidence its margin (0: none).",
        ),
    ] = 0,
    frontier: Annotated[
        int,
        typer.Option(
            min=0,
            help="With --selections, selections along the estimate's frontier timed too: the "
            "kind select picks, whose residuals then give the margin (0: the random ones').",
        ),
    ] = 0,
    repeats: Annotated[int, typer.Option(help="Timed runs per module (median).")] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed runs before each round.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the sampled descendants.")] = 0,
    measure_frame: Annotated[
        bool,
        typer.Option(
            "--measure-frame/--no-measure-frame",
            help="Time the frame on the target (else predict it from the proxy's).",
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the target's latencies if the bank has them.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a target's latencies from a few descendants timed there, the rest predicted from a
    profiled proxy target (nothing is retrained)."""
    from .bank import Bank
    from .profile import ProfileConfig
    from .transfer import calibrate as calibrate_bank

    def run() -> Any:
        return calibrate_bank(
            Bank.open(bank),
            None if proxy == "auto" else proxy,
            target,
            samples,
            ProfileConfig(repeats=repeats, warmup=warmup),
            selections=selections,
            frontier=frontier,
            seed=seed,
            measure_frame=measure_frame,
            overwrite=overwrite,
            progress=not as_json,
        )

    summary = _run(run)

    def render() -> None:
        fit = summary["fit"]
        mape, held_out = summary["in_sample_mape_percent"], summary["held_out_mape_percent"]
        if "proxy_candidates" in summary:
            scores = ", ".join(
                f"{name} {'n/a' if v is None else f'{v:.1f}%'}"
                for name, v in summary["proxy_candidates"].items()
            )
            _out.print(f"proxy {summary['proxy']} (held-out MAPE of each candidate: {scores})")
        _out.print(
            f"{summary['target']}: measured {summary['measured']} descendants, predicted "
            f"{summary['predicted']} from {summary['proxy']}; frame "
            f"{'measured' if summary['measured_frame'] else 'predicted'} "
            f"({summary['frame_ms']:.3f} ms)"
        )
        _out.print(
            f"fit: log ms = {fit['intercept']:.3f} + {fit['slope']:.3f} x log proxy ms; "
            f"in-sample MAPE {'n/a' if mape is None else f'{mape:.1f}%'}, held out "
            f"{'n/a' if held_out is None else f'{held_out:.1f}%'}"
        )
        if "selections" in summary:
            check = summary["selections"]
            source = (
                f"from {check['frontier']} on the frontier, off by "
                f"{check['frontier_latency_mape_percent']:.1f}% there"
                if "frontier" in check
                else "from the random ones"
            )
            _out.print(
                f"{check['samples']} selections timed whole: summed estimate off by "
                f"{check['relative_latency_mape_percent']:.1f}% (MAPE); margin for "
                f"--confidence 0.95: x{check['margin_at_0.95']:.3f} ({source})"
            )

    _emit(summary, as_json, render)


def _budget(latency_ms: float | None, memory_mb: float | None) -> Any:
    from .types import Budget

    try:
        return Budget(latency_ms=latency_ms, memory_mb=memory_mb)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _selection_table(opened: Any, choices: Any, title: str) -> Table:
    """One row per block: the descendant a selection picks and its sparsity."""
    table = Table("#", "block", "descendant", "sparsity", title=title)
    for info, d in zip(opened.plan.blocks, choices, strict=True):
        table.add_row(str(info.index), info.name, str(d), f"{opened.derive_config.sparsities[d]:g}")
    return table


def _estimates(chosen: Any) -> str:
    return (
        f"estimated accuracy {chosen.accuracy:.2%}, latency {chosen.latency_ms:.3f} ms, "
        f"memory {chosen.memory_mb:.3f} MB"
    )


@app.command()
def select(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    latency_ms: Annotated[
        float | None, typer.Option("--latency-ms", help="Latency budget in ms (batch 1).")
    ] = None,
    memory_mb: Annotated[
        float | None,
        typer.Option("--memory-mb", help="Memory budget in MB (weights + peak activations)."),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Target whose latencies to use (default: the bank's first).")
    ] = None,
    confidence: ConfidenceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The most accurate selection within a latency and memory budget (exact)."""
    from .bank import Bank

    budget = _budget(latency_ms, memory_mb)

    def run() -> Any:
        opened = Bank.open(bank)
        return opened, opened.target(target), opened.select(budget, target, confidence)

    opened, used, chosen = _run(run)
    data = {
        "bank": str(bank),
        "target": used,
        "budget": budget.to_dict(),
        "confidence": confidence,
        **chosen.to_dict(),
    }

    def render() -> None:
        _out.print(_selection_table(opened, chosen.choices, f"selection on {used}"))
        _out.print(_estimates(chosen))

    _emit(data, as_json, render)


@app.command()
def frontier(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    plot: Annotated[Path | None, typer.Option(help="Write the frontier as a PNG here.")] = None,
    target: Annotated[str | None, typer.Option(help="Target whose latencies to use.")] = None,
    memory_mb: Annotated[
        float | None, typer.Option("--memory-mb", help="Only selections within this memory.")
    ] = None,
    confidence: ConfidenceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The exact accuracy-latency Pareto frontier of a bank, as a table, JSON or plot (with
    --confidence, latency with the margin that meets a budget that often)."""
    from .bank import Bank
    from .plots import plot_frontier

    def run() -> Any:
        opened = Bank.open(bank)
        used = opened.target(target)
        return opened, used, opened.frontier(used, memory_mb, confidence)

    opened, used, points = _run(run)
    if plot is not None:
        plot_frontier(
            points, plot, title=f"{opened.plan.model}: accuracy-latency frontier", target=used
        )
    data = {
        "bank": str(bank),
        "target": used,
        "confidence": confidence,
        "frontier": [p.to_dict() for p in points],
    }

    def render() -> None:
        table = Table(
            "latency ms",
            "accuracy",
            "memory MB",
            "choices",
            title=f"{len(points)} Pareto-optimal selections on {used}",
        )
        for p in points:
            table.add_row(
                f"{p.latency_ms:.3f}",
                f"{p.accuracy:.2%}",
                f"{p.memory_mb:.3f}",
                "".join(map(str, p.choices)),
            )
        _out.print(table)
        if plot is not None:
            _out.print(f"plot written to {plot}")

    _emit(data, as_json, render)


_FORMATS = ("onnx", "tflite")
_EXPORTERS = ("torchscript", "dynamo")
_INDEX = re.compile(r"[+-]?[0-9]+")


def _parse_selection(text: str, opened: Any) -> tuple[int, ...]:
    """``--selection`` as one descendant index per block: ``0,3,1,...``, or the digits that
    `frontier` prints (``031...``) when every block has at most 10 descendants."""
    blocks = opened.plan.blocks
    sizes = [len(family) for family in opened.descendants]
    sparsities = opened.derive_config.sparsities
    text = text.strip()
    compact = "," not in text and len(blocks) > 1 and len(text) == len(blocks) and max(sizes) <= 10
    parts = list(text) if compact else [p.strip() for p in text.split(",")]
    example = ",".join("0" * len(blocks))
    if len(parts) != len(blocks):
        raise ConfigError(
            f"--selection names {len(parts)} descendant(s), but the bank has {len(blocks)} "
            "blocks: give one descendant index per block, in block order",
            hint=f"for example --selection {example} (the teacher's own blocks); "
            f"`blockscale inspect {opened.path}` lists each block's descendants",
        )
    choices = []
    for info, k, part in zip(blocks, sizes, parts, strict=True):
        index = int(part) if _INDEX.fullmatch(part) else None
        if index is None or not 0 <= index < k:
            problem = (
                f"{part!r} is not a descendant index"
                if index is None
                else f"descendant {index} does not exist"
            )
            levels = ", ".join(f"{d}: sparsity {s:g}" for d, s in enumerate(sparsities[:k]))
            raise ConfigError(
                f"--selection: {problem} for block {info.index} ({info.name}), which has "
                f"{k} descendants (0..{k - 1})",
                hint=f"pick an integer from 0 to {k - 1} for each block ({levels})",
            )
        choices.append(index)
    return tuple(choices)


def _graph_only(opened: Any, what: str) -> None:
    """The command line rebuilds graph frames only: a module frame needs the teacher's class."""
    if opened.plan.frame_kind != "graph":
        raise ExportError(
            f"cannot {what}: this bank's frame is Python code of class "
            f"{opened.manifest['frame'].get('class')} (torch.fx could not trace the teacher), "
            "which a bank does not carry and the command line cannot rebuild",
            hint="export from Python with the teacher as the frame: "
            "blockscale.export.export_selection(bank.decomposition(frame=teacher), blocks, "
            "'model.onnx')",
        )


def _folder_size(root: Path) -> tuple[int, int]:
    """How many files a folder holds (recursively) and their bytes."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@app.command("export")
def export_cmd(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx, or tflite (whole selections only).")
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for a whole bank (default: BANK-onnx); the model file for a selection.",
        ),
    ] = None,
    selection: Annotated[
        str | None,
        typer.Option(
            "--selection", "-s", help="One descendant index per block, e.g. 0,2,1,... (one model)."
        ),
    ] = None,
    latency_ms: Annotated[
        float | None,
        typer.Option("--latency-ms", help="Export the selection `select` picks for this budget."),
    ] = None,
    memory_mb: Annotated[
        float | None, typer.Option("--memory-mb", help="Memory budget in MB for that selection.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="Target whose latencies to select and estimate with (default: first)."),
    ] = None,
    exporter: Annotated[
        str, typer.Option(help="ONNX exporter: torchscript (fast) or dynamo (torch.export).")
    ] = "torchscript",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a bank to ONNX (frame pieces, every descendant), or one selection as one model."""
    fmt = fmt.lower()
    if fmt not in _FORMATS:
        raise typer.BadParameter(f"--format must be onnx or tflite, got {fmt!r}")
    if exporter not in _EXPORTERS:
        raise typer.BadParameter(f"--exporter must be torchscript or dynamo, got {exporter!r}")
    by_budget = latency_ms is not None or memory_mb is not None
    budget = _budget(latency_ms, memory_mb) if by_budget else None
    if selection is not None and by_budget:
        raise typer.BadParameter(
            "pass --selection or a budget (--latency-ms/--memory-mb), not both"
        )
    if selection is None and not by_budget:
        _run(lambda: _check_whole_bank(fmt, out, target))
        _export_bank(bank, out, exporter, overwrite, as_json)
        return

    def run() -> dict[str, Any]:
        import torch

        from . import tflite
        from .bank import Bank
        from .export import export_selection
        from .extract import compose

        if out is None:
            raise ConfigError(
                "a selection is exported as one model file: pass --out",
                hint=f"e.g. --out model.{fmt}",
            )
        suffix = out.suffix.lower().lstrip(".")
        if suffix in _FORMATS and suffix != fmt:
            raise ConfigError(
                f"--out {out} names a .{suffix} file, but --format is {fmt}",
                hint=f"pass --format {suffix}, or an --out ending in .{fmt}",
            )
        if out.is_dir():
            raise ExportError(
                f"{out} is a folder; a selection is exported as one model file",
                hint=f"pass a file path such as {out / f'model.{fmt}'}",
            )
        if out.exists() and not overwrite:
            raise ExportError(
                f"{out} already exists", hint="choose another path, or pass --overwrite"
            )
        if fmt == "tflite" and not tflite.available():
            raise ExportError(
                "cannot export to TFLite: the TFLite extra is not installed",
                hint=tflite.INSTALL_HINT,
            )
        opened = Bank.open(bank)
        used = None
        if by_budget:
            assert budget is not None
            used = opened.target(target)
            chosen = opened.select(budget, used)
            choices = chosen.choices
        else:
            assert selection is not None
            choices = _parse_selection(selection, opened)
            chosen = None
            if target is not None or "profiles" in opened.manifest:
                used = opened.target(target)
                chosen = opened.estimate(choices, used)
        _graph_only(opened, "export a selection from the command line")
        decomposition = opened.decomposition()
        blocks = [opened.load_descendant(b, d) for b, d in enumerate(choices)]
        if fmt == "onnx":
            export_selection(decomposition, blocks, out, exporter=exporter)
        else:
            example = torch.zeros(1, *opened.plan.input_shape)
            name = f"{opened.plan.model} selection {','.join(map(str, choices))}"
            tflite.export_tflite(compose(decomposition, blocks).eval(), example, out, name=name)
        data: dict[str, Any] = {
            "bank": str(bank),
            "format": fmt,
            "path": str(out),
            "bytes": out.stat().st_size,
            "choices": list(choices),
            "sparsities": [opened.derive_config.sparsities[d] for d in choices],
            "budget": budget.to_dict() if budget is not None else None,
            "target": used,
        }
        if chosen is not None:
            data.update(
                accuracy=chosen.accuracy, latency_ms=chosen.latency_ms, memory_mb=chosen.memory_mb
            )
        return {"opened": opened, "chosen": chosen, **data}

    result = _run(run)
    opened, chosen = result.pop("opened"), result.pop("chosen")

    def render() -> None:
        how = "picked for the budget" if by_budget else "given"
        on = f" on {result['target']}" if result["target"] else ""
        _out.print(_selection_table(opened, result["choices"], f"exported selection ({how}){on}"))
        if chosen is not None:
            _out.print(_estimates(chosen))
        _out.print(
            f"wrote {result['path']}: one {fmt.upper() if fmt == 'onnx' else 'TFLite'} model, "
            f"{result['bytes'] / 1024:,.1f} KiB (selection {','.join(map(str, result['choices']))})"
        )

    _emit(result, as_json, render)


def _check_whole_bank(fmt: str, out: Path | None, target: str | None) -> None:
    if fmt != "onnx":
        raise ConfigError(
            "TFLite exports whole selections only: pass --selection 0,1,... or a budget "
            "(--latency-ms/--memory-mb) and --out model.tflite",
            hint="or export the whole bank as ONNX: --format onnx",
        )
    if out is not None and out.suffix.lower() in (".onnx", ".tflite"):
        raise ConfigError(
            f"a whole-bank export writes a folder, not {out}",
            hint="pass --selection or a budget (--latency-ms) to export one model, or a folder "
            "as --out",
        )
    if target is not None:
        raise ConfigError(
            "--target chooses the latencies of a budget or a selection's estimates; a whole-bank "
            "export uses neither",
            hint="drop --target, or pass --latency-ms with it",
        )


def _export_bank(
    bank: Path, out: Path | None, exporter: str, overwrite: bool, as_json: bool
) -> None:
    """Every frame piece and descendant of ``bank`` as ONNX, with index.json, in a folder."""
    from ._progress import progress_bar
    from .bank import Bank
    from .export import check_destination, export_bank

    def run() -> dict[str, Any]:
        opened = Bank.open(bank)
        _graph_only(opened, "cut the frame into ONNX pieces")
        named = bank if bank.name else bank.resolve()
        folder = out if out is not None else named.with_name(f"{named.name}-onnx")
        check_destination(folder, overwrite)  # before minutes of exporting, not after
        decomposition = opened.decomposition()
        families = opened.load_descendants()
        total = 1 + sum(len(f) for f in families)
        done_before = 0
        with progress_bar("export", total, enabled=not as_json) as advance:

            def step(done: int, _total: int) -> None:
                nonlocal done_before
                advance(done - done_before)
                done_before = done

            exported = export_bank(
                decomposition,
                families,
                folder,
                exporter=exporter,  # type: ignore[arg-type]
                overwrite=overwrite,
                progress=step,
            )
        files, size = _folder_size(folder)
        return {
            "bank": str(bank),
            "format": "onnx",
            "exporter": exporter,
            "path": str(folder),
            "files": files,
            "bytes": size,
            "frame_pieces": sum(p.model is not None for p in exported.frame.pieces),
            "descendants": sum(len(f) for f in exported.descendants),
        }

    summary = _run(run)

    def render() -> None:
        _out.print(
            f"wrote {summary['frame_pieces']} frame pieces and {summary['descendants']} "
            f"descendants as ONNX, with index.json, to {summary['path']}: {summary['files']} "
            f"files, {summary['bytes'] / 2**20:.2f} MiB"
        )

    _emit(summary, as_json, render)


@app.command("replay")
def replay_cmd(
    banks: Annotated[
        list[Path],
        typer.Argument(help="Bank directories; several share each step's budget (joint)."),
    ],
    trace: Annotated[
        Path,
        typer.Option("--trace", "-t", help="Trace file (.csv or .json), e.g. from `trace`."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for replay.json and replay.png.")
    ],
    target: Annotated[
        str | None, typer.Option(help="Target to run on (default: each bank's first).")
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option(help="Several banks: their weights in the objective, e.g. 1,2 (default 1)."),
    ] = None,
    cache_mb: Annotated[
        float,
        typer.Option(
            "--cache-mb",
            help="MiB of loaded descendants the block-grained runtime keeps beyond the live ones "
            "(0: none, as the model level keeps none).",
        ),
    ] = 0.0,
    onnx_dir: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            help="The bank's ONNX export (from `export`): ONNX Runtime targets read descendants "
            "from it instead of exporting them at switch time (one bank only).",
        ),
    ] = None,
    per_mb: Annotated[
        float,
        typer.Option(
            "--per-mb",
            help="Switching cost: accuracy (a fraction, e.g. 0.002) given up per MiB a switch "
            "loads; applied to both methods alike.",
        ),
    ] = 0.0,
    per_block: Annotated[
        float, typer.Option("--per-block", help="Switching cost: accuracy per changed block.")
    ] = 0.0,
    hysteresis: Annotated[
        float,
        typer.Option(
            help="Keep the live model while it fits unless a move gains more accuracy than this."
        ),
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Replay a resource trace: switch blocks as the budget changes, against model-level scaling
    (one whole model per sparsity level, reloaded on every switch), both run for real. With
    several banks, each step's budget is shared: the runtime selects jointly, the model level
    takes the best combination of whole models."""
    from .bank import Bank
    from .multi import SwitchCost
    from .replay import METHODS, plot_replay, replay, replay_joint
    from .runtime import ModelSlot, RuntimeConfig
    from .traces import read_trace

    weights = _floats(priority, "--priority") if priority is not None else [1.0] * len(banks)
    if len(weights) != len(banks):
        raise typer.BadParameter(f"--priority takes one weight per bank ({len(banks)})")

    def run() -> dict[str, Any]:
        cost = SwitchCost(per_block=per_block, per_mb=per_mb, hysteresis=hysteresis)
        config = RuntimeConfig(
            cache_bytes=round(cache_mb * 2**20),
            switch_cost=None if cost == SwitchCost() or len(banks) > 1 else cost,
        )
        budgets = read_trace(trace)
        opened = [Bank.open(b) for b in banks]
        if len(opened) == 1:
            result = replay(opened[0], budgets, target, config, onnx_export=onnx_dir)
            shown = result
        else:
            if onnx_dir is not None:
                raise ConfigError(
                    "--onnx names one bank's export; a joint replay exports as it goes",
                    hint="drop --onnx, or replay one bank",
                )
            if per_block or per_mb:
                raise ConfigError(
                    "a joint replay takes --hysteresis only, not --per-mb or --per-block",
                    hint="drop --per-mb/--per-block, or replay one bank",
                )
            slots = [ModelSlot(b, target, p) for b, p in zip(opened, weights, strict=True)]
            result = replay_joint(slots, budgets, config, hysteresis=hysteresis)
            shown = result.combined()
        out.mkdir(parents=True, exist_ok=True)
        data = result.to_dict()
        (out / "replay.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        plot = plot_replay(shown, out / "replay.png")
        return {
            "bank": ", ".join(map(str, banks)),
            "trace": str(trace),
            "target": shown.target,
            "steps": len(result.steps),
            "json": str(out / "replay.json"),
            "plot": str(plot),
            "summary": data["summary"],
        }

    summary = _run(run)

    def render() -> None:
        sides = [summary["summary"][m] for m in METHODS]
        ratio = summary["summary"]["comparison"]
        table = Table(
            "",
            "blocks",
            "whole models",
            "blocks / whole",
            title=f"replay of {summary['steps']} steps on {summary['target']}",
            caption="accuracy: estimated, averaged over the steps both methods met",
        )

        def row(label: str, key: str, fmt: Any, note: str = "") -> None:
            table.add_row(label, *(_or_dash(s[key], fmt) for s in sides), note)

        row("steps not met", "infeasible_steps", "{:d}")
        row("switches", "switches", "{:d}")
        row("blocks changed", "blocks_changed", "{:d}")
        kib = [s["bytes_loaded"] / 1024 for s in sides]
        table.add_row(
            "KiB loaded",
            *(f"{k:,.1f}" for k in kib),
            f"{_or_dash(ratio['bytes_ratio'], '{:.3f}')} "
            f"({_or_dash(ratio['bytes_fewer_percent'], '{:.1f}')}% fewer)",
        )
        row(
            "switch s, total",
            "switch_seconds",
            "{:.4f}",
            _or_dash(ratio["switch_seconds_ratio"], "{:.3f}"),
        )
        row(
            "switch s, median",
            "median_switch_seconds",
            "{:.4f}",
            _or_dash(ratio["median_switch_seconds_ratio"], "{:.3f}"),
        )
        if any(s["background_seconds"] for s in sides):
            row(
                "+ background merge s",
                "background_seconds",
                "{:.4f}",
                _or_dash(ratio["seconds_with_background_ratio"], "{:.3f} with it"),
            )
        table.add_row(
            "mean accuracy",
            *(_or_dash(s["mean_accuracy"], "{:.2%}") for s in sides),
            f"{_or_dash(ratio['accuracy_gain_points'], '{:+.2f}')} points",
        )
        _out.print(table)
        _out.print(f"per-step record: {summary['json']}; timeline: {summary['plot']}")

    _emit(summary, as_json, render)


def _or_dash(value: Any, fmt: str) -> str:
    """``value`` formatted, or a dash where it is undefined (None in the JSON: NaN)."""
    return "-" if value is None else fmt.format(value)


def _span(text: str | None, what: str) -> tuple[float, float] | None:
    """``--latency-ms LO,HI`` as a pair."""
    if text is None:
        return None
    values = _floats(text, what)
    if len(values) != 2:
        raise typer.BadParameter(f"{what} takes LO,HI (two numbers), got {text!r}")
    return values[0], values[1]


@app.command("trace")
def trace_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Trace file to write (.csv or .json).")],
    kind: Annotated[
        str, typer.Option(help="Generator: steps, random-walk, or phone (apps starting/stopping).")
    ] = "phone",
    bank: Annotated[
        list[Path] | None,
        typer.Option(
            help="Span budgets over this bank's range: fastest and smallest to teacher. Repeat it "
            "for a budget shared by several banks (their ranges add up)."
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Target whose latencies span the range (with --bank).")
    ] = None,
    latency_ms: Annotated[
        str | None,
        typer.Option("--latency-ms", help="Latency span LO,HI in ms (overrides --bank)."),
    ] = None,
    memory_mb: Annotated[
        str | None, typer.Option("--memory-mb", help="Memory span LO,HI in MB (overrides --bank).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Number of steps.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    interval_s: Annotated[float, typer.Option(help="Seconds between steps.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Generate a resource trace (budgets over time) for `replay`."""
    from .bank import Bank
    from .replay import budget_range
    from .traces import GENERATORS, write_trace
    from .types import Budget

    if kind not in GENERATORS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(GENERATORS)}, got {kind!r}")
    latency, memory = _span(latency_ms, "--latency-ms"), _span(memory_mb, "--memory-mb")
    if not bank and latency is None and memory is None:
        raise typer.BadParameter("pass --bank, or a span with --latency-ms and/or --memory-mb")

    def run() -> dict[str, Any]:
        if not bank and target is not None:
            raise ConfigError(
                "--target picks whose latencies span a bank's range", hint="pass --bank with it"
            )
        low, high = (
            budget_range([Bank.open(b) for b in bank], target) if bank else (Budget(), Budget())
        )
        if latency is not None:
            low, high = replace(low, latency_ms=latency[0]), replace(high, latency_ms=latency[1])
        if memory is not None:
            low, high = replace(low, memory_mb=memory[0]), replace(high, memory_mb=memory[1])
        generated = GENERATORS[kind](low, high, steps, seed=seed, interval_s=interval_s)
        path = write_trace(generated, out)
        return {
            "path": str(path),
            "kind": kind,
            "steps": len(generated),
            "seed": seed,
            "low": low.to_dict(),
            "high": high.to_dict(),
        }

    summary = _run(run)

    def render() -> None:
        spans = [
            f"{name} {summary['low'][key]:.4g} to {summary['high'][key]:.4g} {unit}"
            for name, key, unit in (("latency", "latency_ms", "ms"), ("memory", "memory_mb", "MB"))
            if summary["low"][key] is not None
        ]
        _out.print(
            f"wrote {summary['steps']} steps of a {kind} trace (seed {seed}) to {summary['path']}: "
            f"{'; '.join(spans)}"
        )

    _emit(summary, as_json, render)


def main() -> None:
    """Console-script entry point."""
    app()
