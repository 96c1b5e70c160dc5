"""The build pipeline: extract, derive, retrain, profile, validate, and write the bank, resumably.

Each finished stage is saved next to the output as a bank of its own (``OUT.build/derived``,
``OUT.build/retrained``), so an interrupted build resumes from the last finished stage. Stage
checkpoints are ordinary banks: no pickle, verified on reload.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .bank import Bank, check_destination
from .derive import derive
from .errors import BankError, ConfigError
from .extract import extract
from .profile import (
    ProfileConfig,
    kept_accuracy_estimate,
    kept_latency_estimate,
    profile,
    validate,
)
from .retrain import RetrainConfig, retrain
from .targets import Target
from .types import DeriveConfig


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of a build; stored in the bank so a build can be reproduced or resumed.

    ``retrain_samples`` images of the training set feed block retraining and a disjoint
    ``profile_samples`` images measure accuracy drops; ``validate_samples`` random selections check
    the additive estimate (0 skips the check) and fit its correction, kept only when it beats the
    plain estimate by leave-one-out, and ``validate_frontier`` selections along the estimate's
    frontier give the latency margin for selection at a confidence (0: the random selections'
    residuals give it). ``combine`` says how the parts add up: drops in accuracy
    points as LegoDNN (``"sum"``), in log-odds (``"logit"``), or costs fitted to how the drops
    compound on the profiling images (``"fitted"``, :func:`blockscale.profile.fit_interactions`,
    corrected by one weight per block from the validated selections); all are additive, so
    selection stays exact.
    """

    derive: DeriveConfig = field(default_factory=DeriveConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    target: str = "ort-1t"
    retrain_samples: int = 10_000
    profile_samples: int = 2_000
    validate_samples: int = 50
    validate_frontier: int = 10
    combine: str = "fitted"
    seed: int = 0
    blocks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.combine not in ("sum", "logit", "fitted"):
            raise ConfigError(f"combine must be 'sum', 'logit' or 'fitted', got {self.combine!r}")
        if (
            self.retrain_samples < 1
            or self.profile_samples < 1
            or self.validate_samples < 0
            or self.validate_frontier < 0
        ):
            raise ConfigError(
                "retrain_samples and profile_samples must be positive, validate_samples and "
                f"validate_frontier at least 0, got {self.retrain_samples}, "
                f"{self.profile_samples}, {self.validate_samples}, {self.validate_frontier}"
            )
        Target.parse(self.target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        return cls(
            derive=DeriveConfig.from_dict(data["derive"]),
            retrain=RetrainConfig.from_dict(data["retrain"]),
            profile=ProfileConfig(**data["profile"]),
            target=data["target"],
            retrain_samples=int(data["retrain_samples"]),
            profile_samples=int(data["profile_samples"]),
            validate_samples=int(data["validate_samples"]),
            validate_frontier=int(data.get("validate_frontier", 0)),
            combine=data.get("combine", "sum"),
            seed=int(data["seed"]),
            blocks=tuple(data["blocks"]) if data.get("blocks") else None,
        )


def training_subsets(dataset: Dataset, config: BuildConfig) -> tuple[Subset, Subset]:
    """Disjoint, seeded subsets of the training set for retraining and for profiling."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
    n_profile = min(config.profile_samples, len(dataset) // 5)
    n_retrain = min(config.retrain_samples, len(dataset) - n_profile)
    profile_idx = order[:n_profile].tolist()
    retrain_idx = order[n_profile : n_profile + n_retrain].tolist()
    return Subset(dataset, retrain_idx), Subset(dataset, profile_idx)


def _fingerprint(config: BuildConfig, teacher: nn.Module, train_set: Dataset) -> dict[str, Any]:
    """What a saved stage must match to be resumed: the settings, the teacher's weights and the
    size of the training set."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    # compared as JSON: the manifest holds lists where the config holds tuples (sparsities)
    return json.loads(
        json.dumps(
            {
                "config": config.to_dict(),
                "teacher_sha256": digest.hexdigest(),
                "train_images": len(train_set),
            }
        )
    )


def _stage_bank(root: Path, stage: str, fingerprint: dict[str, Any]) -> Bank | None:
    """The saved bank of ``stage`` if it exists, is intact and was made from the same inputs."""
    path = root / stage
    if not path.is_dir():
        return None
    try:
        bank = Bank.open(path)
    except BankError:
        return None
    return bank if bank.manifest.get("build_inputs") == fingerprint else None


def build(
    teacher: nn.Module,
    train_set: Dataset,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    teacher_info: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Bank:
    """Build a bank from ``teacher`` and its training data, resuming an interrupted build."""
    config = config or BuildConfig()
    out = Path(out)
    check_destination(out, overwrite)
    target = Target.parse(config.target)
    work = out.with_name(f"{out.name}.build")
    work.mkdir(parents=True, exist_ok=True)
    retrain_set, profile_set = training_subsets(train_set, config)
    shape = input_shape or tuple(train_set[0][0].shape)
    fingerprint = _fingerprint(config, teacher, train_set)
    extra = {"build": config.to_dict(), "build_inputs": fingerprint}
    timings: dict[str, float] = {}

    def save(path: Path, sections: dict[str, Any]) -> Bank:
        return Bank.write(
            path,
            decomposition,
            families,
            teacher=teacher_info,
            derive_config=config.derive,
            extra={**extra, **sections},
            overwrite=True,
        )

    retrained = _stage_bank(work, "retrained", fingerprint)
    derived = None if retrained else _stage_bank(work, "derived", fingerprint)
    if retrained is not None:
        log(f"resuming from {work / 'retrained'}")
        decomposition = retrained.decomposition(frame=teacher)
        families = retrained.load_descendants()
        report = retrained.manifest["retrain"]
        timings = dict(retrained.manifest["timings"])
    else:
        if derived is not None:
            log(f"resuming from {work / 'derived'}")
            decomposition = derived.decomposition(frame=teacher)
            families = derived.load_descendants()
            timings = dict(derived.manifest["timings"])
        else:
            start = time.perf_counter()
            decomposition = extract(teacher, torch.zeros(1, *shape), config.blocks)
            families = derive(decomposition, config.derive)
            timings["extract_derive"] = time.perf_counter() - start
            save(work / "derived", {"timings": timings})
        start = time.perf_counter()
        report = retrain(
            decomposition, families, retrain_set, config.retrain, progress=progress
        ).to_dict()
        timings["retrain"] = time.perf_counter() - start
        save(work / "retrained", {"retrain": report, "timings": timings})

    start = time.perf_counter()
    profiles = profile(
        decomposition, families, profile_set, target, config.profile, progress=progress
    )
    profiles.combine = config.combine
    if config.combine == "fitted" and profiles.fitted_costs is None:
        log(
            "the profiling images' logits were too many to keep for the interaction fit: "
            "drops combine in log-odds"
        )
        profiles.combine = "logit"
    timings["profile"] = time.perf_counter() - start
    if config.validate_samples:
        start = time.perf_counter()
        profiles.validation[target.name] = validate(
            profiles,
            decomposition,
            families,
            profile_set,
            target,
            samples=config.validate_samples,
            frontier=config.validate_frontier,
            seed=config.seed,
            config=config.profile,
            progress=progress,
        )
        timings["validate"] = time.perf_counter() - start
        check = profiles.validation[target.name]
        # a correction is kept only when it beat the plain estimate out of sample
        profiles = kept_accuracy_estimate(profiles, check)
        profiles.latency_corrections[target.name] = kept_latency_estimate(check)
    bank = save(out, {"retrain": report, "profiles": profiles.to_dict(), "timings": timings})
    shutil.rmtree(work, ignore_errors=True)
    log(f"bank written to {out} ({json.dumps({k: round(v, 1) for k, v in timings.items()})} s)")
    return bank
