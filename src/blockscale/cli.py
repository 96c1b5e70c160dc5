"""The ``blockscale`` command line: every stage of the Python API, with tables or ``--json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import BlockscaleError

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
        _err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            _err.print(f"[bold]fix:[/] {exc.hint}", highlight=False)
        raise typer.Exit(2) from None


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


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
        kwargs = {"in_channels": full.in_channels, "num_classes": full.num_classes}
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
    round_to: Annotated[
        int | None, typer.Option(help="Round kept channels up to a multiple of this.")
    ] = None,
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
    round_to: Annotated[
        int | None, typer.Option(help="Round kept channels up to a multiple of this.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Retraining epochs per descendant.")] = 10,
    lr: Annotated[float, typer.Option(help="Retraining learning rate (Adam).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Retraining batch size.")] = 64,
    retrain_samples: Annotated[int, typer.Option(help="Training images for retraining.")] = 10_000,
    profile_samples: Annotated[
        int, typer.Option(help="Held-out training images for accuracy drops.")
    ] = 2_000,
    validate_samples: Annotated[
        int, typer.Option(help="Random selections measured to check the estimate (0: skip).")
    ] = 20,
    target: Annotated[str, typer.Option(help="Latency target, e.g. torch-1t.")] = "torch-1t",
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
                seed=seed,
                cache=cache,
                cache_dtype="float16" if fp16_cache else "float32",
            ),
            profile=ProfileConfig(),
            target=target,
            retrain_samples=retrain_samples,
            profile_samples=profile_samples,
            validate_samples=validate_samples,
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
    for target in profiles.targets:
        table = Table(
            "#",
            "block",
            *[f"s={s:g}" for s in sparsities],
            title=f"accuracy drop (points) / latency (ms) on {target}",
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
            _out.print(
                f"additive estimate on {check['samples']} random selections: accuracy MAE "
                f"{check['accuracy_mae_points']:.2f} points (Spearman "
                f"{check['accuracy_spearman']:.3f}), latency MAPE "
                f"{check['latency_mape_percent']:.1f}% (Spearman {check['latency_spearman']:.3f})"
            )
            if "relative_latency_mape_percent" in check:
                _out.print(
                    f"latency relative to the teacher, timed side by side: MAPE "
                    f"{check['relative_latency_mape_percent']:.1f}% (Spearman "
                    f"{check['relative_latency_spearman']:.3f})"
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


def _budget(latency_ms: float | None, memory_mb: float | None) -> Any:
    from .types import Budget

    try:
        return Budget(latency_ms=latency_ms, memory_mb=memory_mb)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


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
    as_json: JsonOpt = False,
) -> None:
    """The most accurate selection within a latency and memory budget (exact)."""
    from .bank import Bank

    budget = _budget(latency_ms, memory_mb)

    def run() -> Any:
        opened = Bank.open(bank)
        return opened, opened.target(target), opened.select(budget, target)

    opened, used, chosen = _run(run)
    data = {"bank": str(bank), "target": used, "budget": budget.to_dict(), **chosen.to_dict()}

    def render() -> None:
        table = Table("#", "block", "descendant", "sparsity", title=f"selection on {used}")
        for info, d in zip(opened.plan.blocks, chosen.choices, strict=True):
            table.add_row(
                str(info.index), info.name, str(d), f"{opened.derive_config.sparsities[d]:g}"
            )
        _out.print(table)
        _out.print(
            f"estimated accuracy {chosen.accuracy:.2%}, latency {chosen.latency_ms:.3f} ms, "
            f"memory {chosen.memory_mb:.3f} MB"
        )

    _emit(data, as_json, render)


@app.command()
def frontier(
    bank: Annotated[Path, typer.Argument(help="Bank directory.")],
    plot: Annotated[Path | None, typer.Option(help="Write the frontier as a PNG here.")] = None,
    target: Annotated[str | None, typer.Option(help="Target whose latencies to use.")] = None,
    memory_mb: Annotated[
        float | None, typer.Option("--memory-mb", help="Only selections within this memory.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The exact accuracy-latency Pareto frontier of a bank, as a table, JSON or plot."""
    from .bank import Bank
    from .plots import plot_frontier

    def run() -> Any:
        opened = Bank.open(bank)
        used = opened.target(target)
        return opened, used, opened.frontier(used, memory_mb)

    opened, used, points = _run(run)
    if plot is not None:
        plot_frontier(
            points, plot, title=f"{opened.plan.model}: accuracy-latency frontier", target=used
        )
    data = {"bank": str(bank), "target": used, "frontier": [p.to_dict() for p in points]}

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


def main() -> None:
    """Console-script entry point."""
    app()
