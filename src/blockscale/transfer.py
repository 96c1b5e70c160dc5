"""Latency on a target barely measured: predicted from a profiled one, or from what a bank is.

Profiling a bank on a device times every descendant there, which takes long on a slow device
and cannot be done at all on one out of reach. Two ways cover it:

- :func:`calibrate`: time a few descendants on the new target, spread over a profiled proxy
  target's latency range, fit ``log target = intercept + slope * log proxy`` on them
  (:class:`ProxyCalibration`) and predict every other descendant. The map is increasing, so the
  proxy's ranking of descendants is kept, and selection on the new target stays meaningful.
- :class:`LatencyPredictor`: a ridge regression of log latency on what each descendant is
  (:func:`descendant_features`) and what each target is (its backend, threads and the latency of
  a few probe blocks, :func:`probe_keys`), fitted on the targets a bank was profiled on; a new
  target needs only its probe blocks timed. :func:`leave_one_target_out` says how well it
  transfers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .bank import Bank
from .errors import ConfigError, ProfileError
from .profile import BankProfile, Key, ProfileConfig, spearman, time_descendants
from .targets import BACKENDS, Target

MIN_SLOPE = 0.1  # least slope of a calibration: keeps the map increasing, so the proxy's
# ranking of descendants is never inverted
FEATURES = (
    "log_macs",
    "log_weight_bytes",
    "log_peak_activation_bytes",
    "log_input_elements",
    "log_output_elements",
    "log_kept_channels",
)
FAMILIES = tuple(BACKENDS.values())  # the backends' short names, one-hot in target features
_FLOOR_MS = 1e-4  # latencies are floored here before their logarithm (a clipped 0 ms)


def _log_ms(ms: Any) -> Any:
    return np.log(np.maximum(np.asarray(ms, dtype=float), _FLOOR_MS))


def descendant_features(bank: Bank) -> dict[Key, np.ndarray]:
    """What each descendant is, as the columns of :data:`FEATURES`, all ``log(1 + x)``: MACs at
    the block's input shape, weight bytes, peak activation bytes, the block's input and output
    elements, and the fraction of channels kept (from the pruned layers' recorded channels, else
    ``1 - sparsity``). Read from the bank's profiles and plan; no module is loaded."""
    profiles = bank.profile
    features = {}
    for info, family, infos in zip(
        bank.plan.blocks, profiles.descendants, bank.descendants, strict=True
    ):
        for p, d in zip(family, infos, strict=True):
            kept = (
                sum(k for _, k in d.channels.values()) / sum(o for o, _ in d.channels.values())
                if d.channels
                else 1.0 - d.sparsity
            )
            raw = [
                p.macs,
                p.weight_bytes,
                p.activation_bytes,
                int(np.prod(info.input_shape)),
                int(np.prod(info.output_shape)),
                kept,
            ]
            features[p.block, p.index] = np.log1p(np.asarray(raw, dtype=float))
    return features


def probe_keys(bank: Bank) -> list[Key]:
    """The teacher descendants (index 0) of the first, middle and last blocks: what a new
    target times to place itself among the profiled ones."""
    n = bank.plan.num_blocks
    return [(b, 0) for b in sorted({0, n // 2, n - 1})]


@dataclass(frozen=True)
class ProxyCalibration:
    """``target_ms = exp(intercept) * proxy_ms ** slope``, fitted on ``samples`` descendants
    measured on both targets; the identity (the proxy's own numbers) when fitted on none."""

    intercept: float = 0.0
    slope: float = 1.0
    samples: int = 0

    @classmethod
    def fit(cls, proxy_ms: Sequence[float], target_ms: Sequence[float]) -> ProxyCalibration:
        """Least squares of log target on log proxy, the slope clamped at :data:`MIN_SLOPE`;
        one sample (or samples of one proxy latency) only shifts, with slope 1."""
        if len(proxy_ms) != len(target_ms):
            raise ConfigError(
                f"{len(proxy_ms)} proxy latencies against {len(target_ms)} target latencies",
                hint="pass both latencies of every sampled descendant, in the same order",
            )
        if not proxy_ms:
            return cls()
        x, y = _log_ms(proxy_ms), _log_ms(target_ms)
        slope = 1.0
        if len(x) >= 2 and np.ptp(x) > 0:
            slope = max(MIN_SLOPE, float(np.polyfit(x, y, 1)[0]))
        return cls(float(np.mean(y - slope * x)), slope, len(x))

    def predict(self, ms: Any) -> Any:
        """The target latency of proxy latency ``ms`` (a float, or an array of them)."""
        out = np.exp(self.intercept + self.slope * _log_ms(ms))
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyCalibration:
        return cls(float(data["intercept"]), float(data["slope"]), int(data["samples"]))


def _proxy_ms(profiles: BankProfile, proxy: str) -> dict[Key, float]:
    """Every descendant's latency on ``proxy``; ProfileError when it was not profiled there."""
    try:
        return {
            (p.block, p.index): p.latency_ms[proxy] for fam in profiles.descendants for p in fam
        }
    except KeyError:
        raise ProfileError(
            f"the bank was not profiled on the proxy {proxy!r}; it was on "
            f"{', '.join(profiles.targets) or 'no target'}",
            hint=f"profile it first (blockscale profile BANK --target {proxy}) or pick a "
            "profiled proxy",
        ) from None


def choose_samples(profiles: BankProfile, proxy: str, k: int, seed: int = 0) -> list[Key]:
    """``k`` distinct descendants spread over the proxy's latency range: the descendants sorted
    by proxy latency, cut into ``k`` strata of equal count (quantiles), one drawn from each
    (deterministic per ``seed``)."""
    latency = _proxy_ms(profiles, proxy)
    if not 0 <= k <= len(latency):
        raise ConfigError(
            f"cannot sample {k} of the bank's {len(latency)} descendants",
            hint=f"pass a sample count between 0 and {len(latency)}",
        )
    order = sorted(latency, key=lambda key: (latency[key], key))
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(len(order)), k) if k else []
    return [order[int(rng.choice(stratum))] for stratum in strata]


def _predict(
    calibration: ProxyCalibration, proxy_ms: dict[Key, float], sampled: dict[Key, float]
) -> dict[Key, float]:
    return {key: sampled.get(key, calibration.predict(ms)) for key, ms in proxy_ms.items()}


def _fit_sampled(proxy_ms: dict[Key, float], sampled: dict[Key, float]) -> ProxyCalibration:
    missing = set(sampled) - set(proxy_ms)
    if missing:
        raise ConfigError(
            f"sampled descendants {sorted(missing)} have no proxy latency",
            hint="sample only descendants profiled on the proxy",
        )
    keys = sorted(sampled)
    return ProxyCalibration.fit([proxy_ms[k] for k in keys], [sampled[k] for k in keys])


def predict_target(proxy_ms: dict[Key, float], sampled: dict[Key, float]) -> dict[Key, float]:
    """Every descendant's latency on a target from its proxy latency, through the
    :class:`ProxyCalibration` fitted on the ``sampled`` ones, which keep their measured value."""
    return _predict(_fit_sampled(proxy_ms, sampled), proxy_ms, sampled)


def is_predicted(profiles: BankProfile, target: str) -> bool:
    """Whether ``target``'s latencies were predicted by :func:`calibrate` rather than measured."""
    return "predicted_from" in profiles.targets.get(target, {})


def calibrate(
    bank: Bank,
    proxy: str,
    target: str,
    samples: int = 10,
    config: ProfileConfig | None = None,
    *,
    seed: int = 0,
    measure_frame: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Add ``target`` to ``bank``'s profiles from ``samples`` descendants timed there and the
    rest predicted from ``proxy`` (:class:`ProxyCalibration`), and save the bank.

    The frame is timed too, unless ``measure_frame`` is false (then predicted from the proxy's
    frame). Returns what was measured, the fit and its in-sample MAPE (%).
    """
    profiles = bank.profile
    proxy_ms = _proxy_ms(profiles, proxy)
    chosen = Target.parse(target)
    if chosen.name == Target.parse(proxy).name:
        raise ConfigError(
            f"the target {target!r} is the proxy itself",
            hint="calibrate a target the bank was not profiled on, from a profiled proxy",
        )
    if chosen.name in profiles.targets and not overwrite:
        raise ConfigError(
            f"the bank already has latencies on {chosen.name}",
            hint="pass overwrite=True (--overwrite) to replace them",
        )
    keys = choose_samples(profiles, proxy, samples, seed)
    frame_ms, measured = None, {}
    if keys or measure_frame:
        frame_ms, measured = time_descendants(
            bank.decomposition(),
            bank.load_descendants(),
            chosen,
            config,
            only=set(keys),
            frame=measure_frame,
            progress=progress,
        )
    calibration = _fit_sampled(proxy_ms, measured)
    latency = _predict(calibration, proxy_ms, measured)
    if frame_ms is None:
        frame_ms = calibration.predict(profiles.frame.latency_ms[proxy])
    profiles.frame.latency_ms[chosen.name] = frame_ms
    for p in (p for fam in profiles.descendants for p in fam):
        p.latency_ms[chosen.name] = latency[p.block, p.index]
    fit = calibration.to_dict()
    profiles.targets[chosen.name] = {
        **chosen.to_dict(),
        "predicted_from": proxy,
        "samples": len(keys),
        "measured_frame": measure_frame,
        "fit": fit,
    }
    profiles.validation.pop(chosen.name, None)  # a check of earlier latencies no longer holds
    bank.update(profiles=profiles.to_dict())
    errors = [
        abs(calibration.predict(proxy_ms[k]) - ms) / ms for k, ms in measured.items() if ms > 0
    ]
    return {
        "target": chosen.name,
        "proxy": proxy,
        "measured": len(keys),
        "predicted": len(latency) - len(keys),
        "measured_frame": measure_frame,
        "frame_ms": frame_ms,
        "sampled": [list(k) for k in keys],
        "fit": fit,
        "in_sample_mape_percent": 100 * statistics.fmean(errors) if errors else None,
    }


def _probe_ms(profiles: BankProfile, target: str, probes: Sequence[Key]) -> np.ndarray:
    """The log latency of ``target`` on each probe block; ProfileError when one is missing."""
    try:
        return _log_ms([profiles.descendants[b][i].latency_ms[target] for b, i in probes])
    except (KeyError, IndexError):
        raise ProfileError(
            f"{target!r} has no latency on the probe blocks {list(probes)}",
            hint="time them there: profile.time_descendants(..., only=set(probes))",
        ) from None


def _target_features(target: str, probe_log_ms: np.ndarray) -> np.ndarray:
    """One-hot backend family, log threads and the probe blocks' log latency."""
    parsed = Target.parse(target)
    family = [float(BACKENDS[parsed.backend] == f) for f in FAMILIES]
    return np.asarray([*family, np.log(parsed.threads), *probe_log_ms])


def _rows(
    profiles: BankProfile, features: dict[Key, np.ndarray], target: str, probes: Sequence[Key]
) -> tuple[list[Key], np.ndarray]:
    """The keys and design rows of every descendant in ``features`` on ``target``: descendant
    features, target features, and the descendant features times the mean probe log latency."""
    probe = _probe_ms(profiles, target, probes)
    own = _target_features(target, probe)
    keys = sorted(features)
    rows = [np.concatenate([features[k], own, features[k] * probe.mean()]) for k in keys]
    return keys, np.asarray(rows)


def _profiled_ms(profiles: BankProfile, keys: Sequence[Key], target: str) -> np.ndarray:
    """The profiled latency of each of ``keys`` on ``target``."""
    try:
        return np.asarray([profiles.descendants[b][i].latency_ms[target] for b, i in keys])
    except KeyError:
        raise ProfileError(
            f"the bank was not profiled on {target!r}",
            hint=f"profile it: blockscale profile BANK --target {target}",
        ) from None


@dataclass(frozen=True)
class LatencyPredictor:
    """Ridge regression of log latency on descendant and target features (standardised),
    fitted on profiled targets, predicting a target from its probe blocks' latency alone."""

    probes: tuple[Key, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    alpha: float = 1.0

    @classmethod
    def fit(
        cls,
        profiles: BankProfile,
        features: dict[Key, np.ndarray],
        targets: Sequence[str],
        probes: Sequence[Key],
        alpha: float = 1.0,
    ) -> LatencyPredictor:
        """Fitted on every descendant of ``features`` on every one of ``targets``."""
        if not targets:
            raise ConfigError("a latency predictor needs at least one profiled target")
        if alpha < 0:
            raise ConfigError(f"the ridge alpha must not be negative, got {alpha}")
        xs, ys = [], []
        for target in targets:
            keys, rows = _rows(profiles, features, target, probes)
            xs.append(rows)
            ys.append(_log_ms(_profiled_ms(profiles, keys, target)))
        x, y = np.concatenate(xs), np.concatenate(ys)
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0  # a constant column standardises to 0 and gets no weight
        z = (x - mean) / scale
        weights = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
        return cls(
            tuple((int(b), int(i)) for b, i in probes),
            tuple(map(float, mean)),
            tuple(map(float, scale)),
            tuple(map(float, weights)),
            float(y.mean()),
            float(alpha),
        )

    def predict_target(
        self,
        profiles: BankProfile,
        features: dict[Key, np.ndarray],
        target: str,
        probes: Sequence[Key],
    ) -> dict[Key, float]:
        """Every descendant's predicted latency (ms) on ``target``; ``profiles`` need hold only
        its probe blocks' latency there."""
        if tuple((int(b), int(i)) for b, i in probes) != self.probes:
            raise ConfigError(
                f"the predictor was fitted on probes {list(self.probes)}, got {list(probes)}",
                hint="pass the probe blocks it was fitted with",
            )
        keys, rows = _rows(profiles, features, target, probes)
        z = (rows - np.asarray(self.mean)) / np.asarray(self.scale)
        out = np.exp(self.intercept + z @ np.asarray(self.weights))
        return {k: float(v) for k, v in zip(keys, out, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "probes": [list(p) for p in self.probes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyPredictor:
        return cls(
            probes=tuple((int(b), int(i)) for b, i in data["probes"]),
            mean=tuple(map(float, data["mean"])),
            scale=tuple(map(float, data["scale"])),
            weights=tuple(map(float, data["weights"])),
            intercept=float(data["intercept"]),
            alpha=float(data.get("alpha", 1.0)),
        )


def leave_one_target_out(
    profiles: BankProfile,
    features: dict[Key, np.ndarray],
    targets: Sequence[str],
    probes: Sequence[Key],
) -> dict[str, dict[str, float]]:
    """Per target: a :class:`LatencyPredictor` fitted on the others predicts it from its probe
    blocks; the Spearman correlation and MAPE (%) against its profiled latencies."""
    if len(targets) < 2:
        raise ConfigError(
            f"leaving one target out needs at least two targets, got {len(targets)}",
            hint="profile the bank on another target first",
        )
    results = {}
    for held in targets:
        rest = [t for t in targets if t != held]
        predicted = LatencyPredictor.fit(profiles, features, rest, probes).predict_target(
            profiles, features, held, probes
        )
        keys = sorted(predicted)
        real = _profiled_ms(profiles, keys, held)
        guess = np.asarray([predicted[k] for k in keys])
        timed = real > 0  # a latency clipped to 0 has no relative error
        results[held] = {
            "spearman": spearman(list(guess), list(real)),
            "mape_percent": float(100 * np.mean(np.abs(guess[timed] - real[timed]) / real[timed])),
        }
    return results
