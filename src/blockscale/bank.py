"""The bank: the on-disk artifact of a build, readable without running any code from it.

Layout of a bank directory::

    manifest.json        schema version, teacher, plan, derive config, every architecture as data,
                         profiles, the sha256 and size of every weight file, and the sha256 of
                         its own content
    frame.safetensors    weights of the frame
    blocks/bB-dD.safetensors  weights of descendant D of block B

Loading rebuilds every module from the manifest (allow-listed layers and operations only) and the
safetensors weights: no pickle anywhere. Writes go to a temporary directory that is renamed into
place, so an interrupted write never leaves a half-written bank. Every file is checked against its
recorded sha256 before it is parsed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import fx, nn

from ._graph_io import decode_graph_module, encode_graph_module
from ._version import __version__
from .derive import Descendant
from .errors import BankCorruptError, BankError, BankVersionError, BlockscaleError, ProfileError
from .extract import Decomposition, compose, replace_submodules, slot_name
from .profile import BankProfile
from .select import CostTable, Selector, frontier, solve
from .types import BlockPlan, Budget, DeriveConfig, DescendantInfo, Selection

FORMAT = "blockscale-bank"
SCHEMA_VERSION = 2  # 2: the manifest holds its own digest; stored tensors say param or buffer
MANIFEST = "manifest.json"
SELECTOR_BLOCKS = 12  # up to this many blocks, selection answers from a precomputed Pareto set
CHECKSUM_KEY = "manifest_sha256"
FRAME_FILE = "frame.safetensors"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensors(module: nn.Module, skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The module's state as contiguous tensors with their own storage (safetensors needs that)."""
    return {
        k: v.detach().contiguous().clone()
        for k, v in module.state_dict().items()
        if not any(k == s or k.startswith(f"{s}.") for s in skip)
    }


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class FileRecord:
    """A weight file of the bank, with the digest and size it must have."""

    sha256: str
    bytes: int


class Bank:
    """A bank on disk: open it with :meth:`Bank.open`, write one with :meth:`Bank.write`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.plan = BlockPlan.from_dict(manifest["plan"])
        self.derive_config = DeriveConfig.from_dict(manifest["derive"])
        self.descendants: list[list[DescendantInfo]] = [
            [DescendantInfo.from_dict(d["info"]) for d in family]
            for family in manifest["descendants"]
        ]
        self._selectors: dict[tuple[str, float | None], Selector] = {}
        self._tables: dict[tuple[str, float | None], CostTable] = {}
        self._parsed: BankProfile | None = None
        self.files = {
            _checked_name(name): FileRecord(str(rec["sha256"]), int(rec["bytes"]))
            for name, rec in manifest["files"].items()
        }

    @property
    def profile(self) -> BankProfile:
        """The bank's profiles; :class:`ProfileError` when the bank was never profiled."""
        data = self.manifest.get("profiles")
        if not data:
            raise ProfileError(
                f"the bank at {self.path} has no profiles",
                hint="build it with `blockscale build` (derive alone does not profile)",
            )
        return BankProfile.from_dict(data)

    def _profile(self) -> BankProfile:
        """The profiles parsed once, for reading only (:attr:`profile` gives a copy to change)."""
        if self._parsed is None:
            self._parsed = self.profile
        return self._parsed

    def target(self, target: str | None = None) -> str:
        """``target`` checked against the profiled ones, or the first profiled target."""
        targets = list(self._profile().targets)
        if target is None:
            return targets[0]
        if target not in targets:
            raise ProfileError(
                f"the bank was not profiled on {target!r}; it was on {', '.join(targets)}",
                hint=f"measure it: blockscale profile {self.path} --target {target}, or predict "
                f"it from a few timings there: blockscale calibrate {self.path} --proxy "
                f"{targets[0]} --target {target}",
            )
        return target

    def cost_table(self, target: str | None = None, confidence: float | None = None) -> CostTable:
        """Every descendant's cost (:meth:`BankProfile.costs`: its drop on the profile's scale, or
        its fitted cost, block weights applied), latency on ``target`` (through its
        :class:`~blockscale.profile.LatencyCorrection`, if validation fitted one, and with a
        ``confidence`` its margin: :meth:`BankProfile.latencies`), weights and activations, for
        selection; built once per target and confidence and kept."""
        name = self.target(target)
        key = (name, confidence)
        if key not in self._tables:
            profile = self._profile()
            frame_ms, latency = profile.latencies(name, confidence)
            costs = [
                [
                    dataclasses.replace(p, accuracy_drop=c, latency_ms={name: ms})
                    for p, c, ms in zip(fam, cs, mss, strict=True)
                ]
                for fam, cs, mss in zip(profile.descendants, profile.costs(), latency, strict=True)
            ]
            frame = dataclasses.replace(profile.frame, latency_ms={name: frame_ms})
            self._tables[key] = CostTable.from_profiles(
                costs, frame, profile.teacher_accuracy, name
            )
        return self._tables[key]

    def accuracy_of(self, summed: np.ndarray) -> np.ndarray:
        """The estimated accuracies of selections whose :meth:`cost_table` costs add up to
        ``summed``, through the bank's combination and fitted correction (non-increasing), as
        :meth:`estimate` and :meth:`select` report them."""
        profile = self._profile()
        values = np.asarray(summed, dtype=np.float64)
        return np.array([profile.accuracy(float(s)) for s in values.ravel()]).reshape(values.shape)

    def _corrected(self, selection: Selection) -> Selection:
        """``selection`` with its accuracy mapped from summed costs (log-odds or points) through
        the bank's fitted correction, if it has one."""
        profile = self._profile()
        summed = profile.teacher_accuracy - selection.accuracy
        return dataclasses.replace(selection, accuracy=profile.accuracy(summed))

    def estimate(self, choices: Sequence[int], target: str | None = None) -> Selection:
        """The estimates of the selection ``choices`` on ``target``, as :meth:`select` reports
        them."""
        return self._corrected(self.cost_table(target).estimate(choices))

    def selector(self, target: str | None = None, confidence: float | None = None) -> Selector:
        """The bank's precomputed Pareto set on ``target`` (at ``confidence``: see
        :meth:`select`), built once and kept."""
        key = (self.target(target), confidence)
        if key not in self._selectors:
            self._selectors[key] = Selector(self.cost_table(*key))
        return self._selectors[key]

    def select(
        self, budget: Budget, target: str | None = None, confidence: float | None = None
    ) -> Selection:
        """The most accurate selection within ``budget`` on ``target`` (exact).

        With a ``confidence`` (e.g. 0.95), the latency estimate is raised by the margin that
        validation measured (:meth:`BankProfile.latencies`), so that the pick meets the budget
        as measured that often rather than about half the time; the selection still reports
        the plain estimate, the likeliest latency. Banks of up to ``SELECTOR_BLOCKS`` blocks
        answer from their precomputed Pareto set (microseconds a query once built); larger
        ones, whose sets grow too big, by branch and bound.
        """
        if self.plan.num_blocks <= SELECTOR_BLOCKS:
            chosen = self.selector(target, confidence).select(budget)
        else:
            chosen = solve(self.cost_table(target, confidence), budget)
        if confidence is not None:
            return self.estimate(chosen.choices, target)
        return self._corrected(chosen)

    def frontier(
        self,
        target: str | None = None,
        memory_mb: float | None = None,
        confidence: float | None = None,
    ) -> list[Selection]:
        """The exact accuracy-latency Pareto frontier on ``target`` (latency with the margin of
        ``confidence``, as :meth:`select`)."""
        table = self.cost_table(target, confidence)
        return [self._corrected(s) for s in frontier(table, memory_mb)]

    # -- writing -----------------------------------------------------------------------------

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        decomposition: Decomposition,
        descendants: Sequence[Sequence[Descendant]],
        *,
        teacher: dict[str, Any] | None = None,
        derive_config: DeriveConfig | None = None,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Bank:
        """Write a bank atomically and return it opened.

        ``teacher`` describes the teacher (name, constructor arguments, data set, accuracy);
        ``extra`` holds further stage results (profiles), stored under their own keys.
        """
        path = Path(path)
        plan = decomposition.plan
        if len(descendants) != plan.num_blocks:
            raise BankError(
                f"got descendants for {len(descendants)} blocks, plan has {plan.num_blocks}"
            )
        check_destination(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a bank is shareable
        try:
            manifest = cls._write_contents(
                tmp, decomposition, descendants, teacher, derive_config, extra
            )
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, manifest)

    @staticmethod
    def _write_contents(
        root: Path,
        decomposition: Decomposition,
        descendants: Sequence[Sequence[Descendant]],
        teacher: dict[str, Any] | None,
        derive_config: DeriveConfig | None,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        plan = decomposition.plan
        files: dict[str, dict[str, Any]] = {}

        def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
            data = save_safetensors(tensors)
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            files[name] = {"sha256": _sha256(data), "bytes": len(data)}

        if plan.frame_kind == "graph":
            slots = frozenset(slot_name(i) for i in range(plan.num_blocks))
            assert isinstance(decomposition.frame, fx.GraphModule)
            frame = {
                "kind": "graph",
                "graph": encode_graph_module(decomposition.frame, slots=slots),
                "file": FRAME_FILE,
            }
            save(FRAME_FILE, _tensors(decomposition.frame, skip=sorted(slots)))
        else:
            frame = {
                "kind": "module",
                "class": _class_path(decomposition.frame),
                "file": FRAME_FILE,
            }
            save(FRAME_FILE, _tensors(decomposition.frame, skip=[b.name for b in plan.blocks]))

        families = []
        for info, family in zip(plan.blocks, descendants, strict=True):
            entries = []
            for d in family:
                if d.info.block != info.index:
                    raise BankError(f"descendant {d.info.key} is filed under block {info.index}")
                if not isinstance(d.module, fx.GraphModule):
                    raise BankError(f"descendant {d.info.key} is not a torch.fx GraphModule")
                name = f"blocks/{d.info.key}.safetensors"
                save(name, _tensors(d.module))
                entries.append(
                    {"info": d.info.to_dict(), "graph": encode_graph_module(d.module), "file": name}
                )
            families.append(entries)

        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "blockscale_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "teacher": teacher or {},
            "plan": plan.to_dict(),
            "derive": (derive_config or _config_of(descendants)).to_dict(),
            "frame": frame,
            "descendants": families,
            "files": files,
            **(extra or {}),
        }
        _write_manifest(root, manifest)
        return manifest

    def update(self, **sections: Any) -> None:
        """Replace top-level manifest sections (e.g. ``profiles``) atomically; weights untouched."""
        reserved = {"format", "schema_version", "plan", "frame", "descendants", "files"}
        clash = reserved & set(sections)
        if clash:
            raise BankError(f"cannot overwrite the bank's {sorted(clash)} sections")
        manifest = {**self.manifest, **sections}
        _write_manifest(self.path, manifest)
        self.manifest = manifest
        self._selectors.clear()  # profiles may have changed
        self._tables.clear()
        self._parsed = None

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Bank:
        """Open a bank; with ``verify`` every weight file is checked against its sha256 now."""
        path = Path(path)
        if not path.is_dir():
            raise BankError(
                f"no bank at {path}",
                hint="write one with `blockscale derive --out PATH` (or blockscale.Bank.write)",
            )
        try:
            manifest = json.loads(_read(path / MANIFEST))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankCorruptError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BankCorruptError(f"{path / MANIFEST} is not a blockscale bank manifest")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BankVersionError(
                f"{path} has bank schema version {version}; this blockscale reads version "
                f"{SCHEMA_VERSION}",
                hint="rebuild the bank with this version of blockscale",
            )
        recorded = manifest.pop(CHECKSUM_KEY, None)
        if recorded != _manifest_digest(manifest):
            raise BankCorruptError(
                f"{path / MANIFEST} does not match its own {CHECKSUM_KEY}: the manifest was altered",
                hint="rebuild the bank, or restore it from a trusted copy",
            )
        try:
            bank = cls(path, manifest)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise BankCorruptError(f"{path / MANIFEST} is missing or mangles {exc}") from exc
        if verify:
            for name in bank.files:
                bank._read_weights(name)
        return bank

    def _read_weights(self, name: str) -> dict[str, torch.Tensor]:
        """A weight file's tensors, after checking its size and sha256 against the manifest."""
        record = self.files.get(name)
        if record is None:
            raise BankCorruptError(f"{self.path / name} is not listed in the bank's manifest")
        target = self.path / name
        try:
            size = target.stat().st_size if target.is_file() else -1
        except OSError:
            size = -1
        if size >= 0 and size != record.bytes:
            raise BankCorruptError(
                f"{target} has {size} bytes, the manifest records {record.bytes}: "
                "it is truncated or was replaced",
                hint="rebuild the bank, or restore it from a trusted copy",
            )
        data = _read(target)
        if len(data) != record.bytes:
            raise BankCorruptError(
                f"{self.path / name} has {len(data)} bytes, the manifest records {record.bytes}: "
                "it is truncated or was replaced",
                hint="rebuild the bank, or restore it from a trusted copy",
            )
        if _sha256(data) != record.sha256:
            raise BankCorruptError(
                f"{self.path / name} does not match its recorded sha256: it was altered",
                hint="rebuild the bank, or restore it from a trusted copy",
            )
        try:
            return load_safetensors(data)
        except (safetensors.SafetensorError, ValueError) as exc:
            raise BankCorruptError(f"{self.path / name} is not a safetensors file: {exc}") from exc

    def load_descendant(self, block: int, index: int) -> fx.GraphModule:
        """Rebuild descendant ``index`` of ``block`` from its stored graph and verified weights."""
        try:
            if block < 0 or index < 0:
                raise IndexError(block if block < 0 else index)
            entry = self.manifest["descendants"][block][index]
        except (IndexError, KeyError, TypeError):
            raise BankError(
                f"the bank has no descendant {index} of block {block}",
                hint=f"blocks are 0..{self.plan.num_blocks - 1}; "
                f"descendants 0..{len(self.derive_config.sparsities) - 1}",
            ) from None
        state = self._read_weights(entry["file"])
        return _decode(entry["graph"], state, f"descendant b{block}-d{index}", "Descendant")

    def load_frame(self, frame: nn.Module | None = None) -> nn.Module:
        """The frame with the teacher's own blocks (sparsity 0 descendants) in its slots.

        A bank cut from a teacher ``torch.fx`` cannot trace stores its frame as weights only: pass
        ``frame``, an instance of the teacher's class, and its weights are replaced by the bank's.
        """
        spec = self.manifest["frame"]
        state = self._read_weights(spec["file"])
        originals = [
            self.load_descendant(b, self._original_index()) for b in range(self.plan.num_blocks)
        ]
        if spec["kind"] == "graph":
            slots = {slot_name(i): m for i, m in enumerate(originals)}
            return _decode(spec["graph"], state, "frame", f"{self.plan.model}Frame", slots=slots)
        if frame is None or _class_path(frame) != spec["class"]:
            raise BankError(
                f"this bank's frame is Python code of class {spec['class']}, which a bank cannot "
                "carry safely",
                hint=f"pass frame=<an instance of {spec['class']}> (e.g. the teacher) to load it",
            )
        names = [b.name for b in self.plan.blocks]
        frame = copy.deepcopy(frame)  # the bank's weights go into a copy, never the caller's model
        rebuilt = replace_submodules(frame, dict(zip(names, originals, strict=True)))
        result = rebuilt.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not any(k.startswith(f"{n}.") for n in names)]
        if missing or result.unexpected_keys:
            raise BankError(
                f"the frame given does not fit the bank (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]})",
                hint=f"pass an instance of {spec['class']} built with the teacher's arguments",
            )
        return rebuilt

    def _original_index(self) -> int:
        try:
            return list(self.derive_config.sparsities).index(0.0)
        except ValueError:
            raise BankError(
                "this bank holds no sparsity-0 descendants, so it cannot rebuild the teacher"
            ) from None

    def decomposition(self, frame: nn.Module | None = None) -> Decomposition:
        """The bank's teacher as a :class:`Decomposition` (frame plus original blocks)."""
        loaded = self.load_frame(frame)
        if self.plan.frame_kind == "graph":
            blocks = [loaded.get_submodule(slot_name(i)) for i in range(self.plan.num_blocks)]
        else:
            blocks = [loaded.get_submodule(b.name) for b in self.plan.blocks]
        return Decomposition(plan=self.plan, frame=loaded, blocks=blocks)

    def compose(self, selection: Sequence[int], frame: nn.Module | None = None) -> nn.Module:
        """A runnable model with descendant ``selection[b]`` in block ``b``."""
        if len(selection) != self.plan.num_blocks:
            raise BankError(
                f"a selection names one descendant per block ({self.plan.num_blocks}), "
                f"got {len(selection)}"
            )
        parts = [self.load_descendant(b, int(d)) for b, d in enumerate(selection)]
        return compose(self.decomposition(frame), parts).eval()

    def load_descendants(self) -> list[list[Descendant]]:
        """Every descendant of every block, rebuilt."""
        return [
            [
                Descendant(info=info, module=self.load_descendant(info.block, info.index))
                for info in fam
            ]
            for fam in self.descendants
        ]

    def file_bytes(self, block: int, index: int) -> int:
        """Size on disk of a descendant's weights (what a switch to it loads)."""
        return self.files[self.manifest["descendants"][block][index]["file"]].bytes


def _decode(
    graph: dict, state: dict[str, torch.Tensor], what: str, class_name: str, **kw: Any
) -> fx.GraphModule:
    try:
        return decode_graph_module(graph, state, class_name=class_name, **kw).eval()
    except BlockscaleError as exc:
        raise BankCorruptError(f"{what} cannot be rebuilt: {exc.message}", hint=exc.hint) from exc


def _config_of(descendants: Sequence[Sequence[Descendant]]) -> DeriveConfig:
    """The levels of descendants written without their config; widths as they are (no rounding
    is claimed that the caller did not name)."""
    return DeriveConfig(sparsities=tuple(d.info.sparsity for d in descendants[0]), round_to=None)


_FILE_NAME = re.compile(r"^(frame|blocks/b\d+-d\d+)\.safetensors$")


def _checked_name(name: str) -> str:
    """A weight file name as the bank writes it: nothing that could point outside the bank."""
    if not isinstance(name, str) or not _FILE_NAME.match(name):
        raise BankCorruptError(
            f"the manifest lists a weight file named {name!r}, which a bank never holds",
            hint="the bank was not written by blockscale or was tampered with; rebuild it",
        )
    return name


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content in canonical JSON (key order and spacing do not count)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return _sha256(canonical.encode())


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so it is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BankCorruptError(
            f"{path} is missing from the bank",
            hint="rebuild the bank, or restore it from a trusted copy",
        ) from None
    except OSError as exc:
        raise BankError(f"cannot read {path}: {exc}") from exc


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json, holding its own content digest, through a temporary file and a
    rename: one atomic step, so an interrupted update leaves the old manifest whole."""
    body = json_safe({k: v for k, v in manifest.items() if k != CHECKSUM_KEY})
    data = json.dumps({**body, CHECKSUM_KEY: _manifest_digest(body)}, indent=1, allow_nan=False)
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_bytes((data + "\n").encode())
    os.replace(tmp, root / MANIFEST)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is replaced only once ``src`` is complete."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.rename(dst, old / "bank")
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old / "bank", dst)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse to write a bank over anything but a bank (with ``overwrite``) or an empty folder."""
    if not path.exists():
        return
    if not overwrite:
        raise BankError(
            f"{path} already exists",
            hint="choose another path, or pass overwrite=True (--overwrite) to replace it",
        )
    if not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
        raise BankError(
            f"{path} exists and is not a bank, so overwrite will not delete it",
            hint="choose another path for the bank",
        )
