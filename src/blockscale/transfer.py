"""Latency on a target barely measured: predicted from a profiled one, or from what a bank is.

Profiling a bank on a device times every descendant there, which takes long on a slow device
and cannot be done at all on one out of reach. Two ways cover it:

- :func:`calibrate`: time a few descendants on the new target, spread over a profiled proxy
  target's latency range (:func:`choose_samples`), fit ``log target = intercept + slope * log
  proxy`` on them (:class:`ProxyCalibration`) and predict every other descendant. The map is
  increasing, so the proxy's ranking of descendants is kept and selection on the new target
  stays meaningful. Without a proxy named, the one whose calibration predicts the timed samples
  best, each left out in turn, is taken (:func:`choose_proxy`): ranks transfer well within a
  backend and much less across backends, and the samples say which target ranks like this one.
  The bank records the target as predicted (:func:`is_predicted`), with that held-out error.
- :class:`LatencyPredictor`: one ridge regression of log latency on what each descendant is
  (:func:`descendant_features`) and what each target is (:class:`TargetSignature`: its backend,
  threads and the latency of a few fixed probe blocks, :func:`probe_keys`), fitted on the
  targets a bank was profiled on; a new target needs only its probe blocks timed.
  :func:`leave_one_target_out` says how well it transfers.

A selection's latency on a target is the frame's plus its blocks'
(:func:`blockscale.profile.estimate`), so predicted latencies serve ``select`` and ``frontier``
unchanged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .bank import Bank
from .errors import ConfigError, ProfileError
from .profile import (
    BankProfile,
    Key,
    ProfileConfig,
    kept_latency_estimate,
    spearman,
    time_descendants,
    validate,
)
from .targets import BACKENDS, Target

MIN_SLOPE = 0.1  # least slope of a calibration: keeps the map increasing, so the proxy's ranking
# of descendants is never inverted, whatever noise a few samples carry
FEATURES = (
    "log_macs",
    "log_weight_bytes",
    "log_peak_activation_bytes",
    "log_input_elements",
    "log_output_elements",
    "log_input_channels",
    "log_output_channels",
    "kept_channel_fraction",
)
_FAMILIES = tuple(BACKENDS)  # backends, one-hot in a target's features
_FLOOR_MS = 1e-4  # latencies are floored here before their logarithm (a timing clipped to 0 ms)


def _log_ms(ms: Any) -> np.ndarray:
    return np.log(np.maximum(np.asarray(ms, dtype=float), _FLOOR_MS))


# -- what descendants and targets are ----------------------------------------------------------


def descendant_features(bank: Bank) -> dict[Key, np.ndarray]:
    """Per descendant, the columns of :data:`FEATURES`: ``log(1 + x)`` of its MACs, weight bytes
    and peak activation bytes (from the profiles), of its block's input and output elements and
    channels (from the plan), and the fraction of its pruned layers' channels it keeps (1 for
    the teacher's own blocks). Nothing is loaded or run."""
    profiles = bank.profile
    features = {}
    for info, family, infos in zip(
        bank.plan.blocks, profiles.descendants, bank.descendants, strict=True
    ):
        for p, d in zip(family, infos, strict=True):
            original = sum(o for o, _ in d.channels.values())
            kept = sum(k for _, k in d.channels.values()) / original if original else 1.0
            sizes = [
                p.macs,
                p.weight_bytes,
                p.activation_bytes,
                int(np.prod(info.input_shape)),
                int(np.prod(info.output_shape)),
                info.input_shape[0],
                info.output_shape[0],
            ]
            features[p.block, p.index] = np.asarray([*np.log1p(sizes), kept])
    return features


def probe_keys(bank: Bank | BankProfile) -> list[Key]:
    """The fixed probe blocks: the teacher's own (descendant 0) first, middle and last blocks,
    which a new target times to place itself among the profiled ones."""
    n = bank.plan.num_blocks if isinstance(bank, Bank) else len(bank.descendants)
    return [(b, 0) for b in sorted({0, n // 2, n - 1})]


@dataclass(frozen=True)
class TargetSignature:
    """What a target is, cheap to learn on a new device: its backend, threads and the latency
    (ms) of the probe blocks (:func:`probe_keys`) there."""

    target: str
    backend: str
    threads: int
    probe_ms: tuple[float, ...]

    @classmethod
    def of(cls, bank_profile: BankProfile, target: str, probes: Sequence[Key]) -> TargetSignature:
        """The signature of a target the bank holds latencies on (measured or predicted)."""
        parsed = Target.parse(target)
        try:
            ms = [bank_profile.descendants[b][i].latency_ms[parsed.name] for b, i in probes]
        except (KeyError, IndexError):
            raise ProfileError(
                f"the bank has no latency on {parsed.name} for the probe blocks {list(probes)}",
                hint=f"profile it (blockscale profile BANK --target {parsed.name}), or measure "
                "the probes alone with TargetSignature.measure",
            ) from None
        return cls(parsed.name, parsed.backend, parsed.threads, tuple(map(float, ms)))

    @classmethod
    def measure(
        cls,
        bank: Bank,
        target: str,
        probes: Sequence[Key] | None = None,
        config: ProfileConfig | None = None,
        *,
        progress: bool = True,
    ) -> TargetSignature:
        """Time only the probe blocks (default :func:`probe_keys`) on ``target``, here."""
        parsed = Target.parse(target)
        probes = list(probe_keys(bank) if probes is None else probes)
        _, ms = time_descendants(
            bank.decomposition(),
            bank.load_descendants(),
            parsed,
            config,
            only=set(probes),
            frame=False,
            progress=progress,
        )
        return cls(parsed.name, parsed.backend, parsed.threads, tuple(ms[k] for k in probes))

    def features(self) -> np.ndarray:
        """The backend one-hot (in :data:`blockscale.targets.BACKENDS` order), log threads and
        the probes' log latency."""
        family = [float(self.backend == f) for f in _FAMILIES]
        return np.asarray([*family, np.log(self.threads), *_log_ms(self.probe_ms)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "backend": self.backend,
            "threads": self.threads,
            "probe_ms": list(self.probe_ms),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetSignature:
        return cls(
            str(data["target"]),
            str(data["backend"]),
            int(data["threads"]),
            tuple(float(v) for v in data["probe_ms"]),
        )


# -- calibration from a proxy ------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyCalibration:
    """``target_ms = exp(intercept) * proxy_ms ** slope``, fitted on ``samples`` descendants
    measured on both targets. Fitted on none it is the identity: the proxy's own numbers, and
    so its ranking alone."""

    intercept: float = 0.0
    slope: float = 1.0
    samples: int = 0

    @classmethod
    def fit(cls, proxy_ms: Sequence[float], target_ms: Sequence[float]) -> ProxyCalibration:
        """Least squares of log target on log proxy latency, the slope clamped at
        :data:`MIN_SLOPE`; one sample (or samples of one proxy latency) only shifts, slope 1.
        Pairs with a latency of 0 (clipped timings) say nothing of the ratio and are left out."""
        if len(proxy_ms) != len(target_ms):
            raise ConfigError(
                f"{len(proxy_ms)} proxy latencies against {len(target_ms)} target latencies",
                hint="pass both latencies of every sampled descendant, in the same order",
            )
        pairs = [(p, t) for p, t in zip(proxy_ms, target_ms, strict=True) if p > 0 and t > 0]
        if not pairs:
            return cls()
        x, y = _log_ms([p for p, _ in pairs]), _log_ms([t for _, t in pairs])
        slope = 1.0
        if len(x) >= 2 and np.ptp(x) > 0:
            slope = max(MIN_SLOPE, float(np.polyfit(x, y, 1)[0]))
        return cls(float(np.mean(y - slope * x)), slope, len(x))

    def predict(self, proxy_ms: Any) -> Any:
        """The target latency of proxy latency ``proxy_ms`` (a float, or an array of them)."""
        out = np.exp(self.intercept + self.slope * _log_ms(proxy_ms))
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {"intercept": self.intercept, "slope": self.slope, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProxyCalibration:
        return cls(float(data["intercept"]), float(data["slope"]), int(data["samples"]))


def _proxy_ms(bank_profile: BankProfile, proxy: str) -> dict[Key, float]:
    """Every descendant's latency on ``proxy``; ProfileError when the bank has none there."""
    profiled = ", ".join(bank_profile.targets) or "no target"
    try:
        if proxy not in bank_profile.targets:
            raise KeyError(proxy)
        return {
            (p.block, p.index): p.latency_ms[proxy]
            for family in bank_profile.descendants
            for p in family
        }
    except KeyError:
        raise ProfileError(
            f"the bank was not profiled on the proxy {proxy!r}; it was on {profiled}",
            hint=f"pick one of those as the proxy, or profile it first: blockscale profile BANK "
            f"--target {proxy}",
        ) from None


def choose_samples(bank_profile: BankProfile, proxy: str, k: int, seed: int = 0) -> list[Key]:
    """``k`` distinct descendants spread over the proxy's latency range: all of them sorted by
    proxy latency and cut into ``k`` strata of equal count (quantiles), one drawn from each,
    the same for the same ``seed``."""
    latency = _proxy_ms(bank_profile, proxy)
    if not 0 <= k <= len(latency):
        raise ConfigError(
            f"cannot sample {k} of the bank's {len(latency)} descendants",
            hint=f"pass a sample count between 0 and {len(latency)}",
        )
    order = sorted(latency, key=lambda key: (latency[key], key))
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(len(order)), k) if k else []
    return [order[int(rng.choice(stratum))] for stratum in strata]


def _fit_sampled(proxy_ms: Mapping[Key, float], sampled: Mapping[Key, float]) -> ProxyCalibration:
    missing = set(sampled) - set(proxy_ms)
    if missing:
        raise ConfigError(
            f"sampled descendants {sorted(missing)} have no proxy latency",
            hint="sample only descendants profiled on the proxy",
        )
    keys = sorted(sampled)
    return ProxyCalibration.fit([proxy_ms[k] for k in keys], [sampled[k] for k in keys])


def _apply(
    calibration: ProxyCalibration, proxy_ms: Mapping[Key, float], sampled: Mapping[Key, float]
) -> dict[Key, float]:
    return {key: sampled.get(key, calibration.predict(ms)) for key, ms in proxy_ms.items()}


def is_predicted(bank_profile: BankProfile, target: str) -> bool:
    """Whether ``target``'s latencies were predicted by :func:`calibrate` rather than measured."""
    return "predicted_from" in bank_profile.targets.get(target, {})


def held_out_errors(proxy_ms: Mapping[Key, float], sampled: Mapping[Key, float]) -> list[float]:
    """Per sampled descendant, the relative error (predicted / measured - 1) of the calibration
    fitted on the other samples: how well the proxy predicts descendants it was not fitted on.
    Empty with fewer than three positive samples (two leave one point, which only shifts)."""
    keys = [k for k in sorted(sampled) if sampled[k] > 0 and proxy_ms.get(k, 0) > 0]
    if len(keys) < 3:
        return []
    errors = []
    for key in keys:
        rest = [k for k in keys if k != key]
        fit = ProxyCalibration.fit([proxy_ms[k] for k in rest], [sampled[k] for k in rest])
        errors.append(fit.predict(proxy_ms[key]) / sampled[key] - 1.0)
    return errors


def _measured_targets(bank_profile: BankProfile, target: str) -> list[str]:
    """The bank's targets other than ``target`` whose latencies were measured, not predicted."""
    measured = [
        name
        for name in bank_profile.targets
        if name != target and not is_predicted(bank_profile, name)
    ]
    if not measured:
        raise ProfileError(
            f"the bank has no measured target to predict {target} from",
            hint="profile one first: blockscale profile BANK --target ort-1t",
        )
    return measured


def _mape(errors: Sequence[float]) -> float | None:
    return 100 * statistics.fmean(abs(e) for e in errors) if errors else None


def choose_proxy(
    bank_profile: BankProfile, sampled: Mapping[Key, float], target: str
) -> tuple[str, dict[str, float | None]]:
    """The measured target of the bank that best predicts ``sampled`` (descendant latencies
    measured on ``target``): least held-out MAPE (:func:`held_out_errors`); ties, and too few
    samples to judge, go to the same backend, then the nearest thread count, then the name.
    Returns the proxy and every candidate's held-out MAPE (%, None when not judged)."""
    chosen = Target.parse(target)
    candidates = _measured_targets(bank_profile, chosen.name)
    scores = {
        name: _mape(held_out_errors(_proxy_ms(bank_profile, name), sampled)) for name in candidates
    }

    def rank(name: str) -> tuple[float, bool, float, str]:
        other = Target.parse(name)
        score = scores[name]
        return (
            math.inf if score is None else score,
            other.backend != chosen.backend,
            abs(math.log(other.threads / chosen.threads)),
            name,
        )

    return min(candidates, key=rank), scores


def predict_target(proxy_ms: Mapping[Key, float], sampled: Mapping[Key, float]) -> dict[Key, float]:
    """Every descendant's latency on a target from its latency on the proxy (``proxy_ms``),
    through the :class:`ProxyCalibration` fitted on the ``sampled`` ones (measured on the
    target), which keep their measured value. With no samples: the proxy's numbers."""
    return _apply(_fit_sampled(proxy_ms, sampled), proxy_ms, sampled)


def calibrate(
    bank: Bank,
    proxy: str | None,
    target: str,
    samples: int = 10,
    config: ProfileConfig | None = None,
    *,
    selections: int = 0,
    frontier: int = 0,
    seed: int = 0,
    measure_frame: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Add ``target`` to ``bank``'s profiles, predicted, and save the bank (atomically, as
    ``blockscale profile`` does): ``samples`` descendants (:func:`choose_samples`) and the frame
    (unless not ``measure_frame``; then it is predicted too) are timed on ``target`` here, the
    rest predicted from ``proxy`` through the :class:`ProxyCalibration` fitted on them. With
    ``proxy=None`` the samples are spread over the bank's first measured target of the same
    backend (else its first) and the proxy is then :func:`choose_proxy`'s. With ``selections``,
    that many random selections are then timed there whole, beside the teacher
    (:func:`~blockscale.profile.validate`, latency alone), and the target gets the correction
    and the residuals a validated build keeps, so that it selects at a ``confidence``; with
    ``frontier`` as well, that many selections along the estimate's frontier give the margin.

    Returns how many descendants were measured and predicted, which were sampled, the frame's
    latency, the fit, its in-sample and held-out MAPE (%, None when there is too little to judge)
    and, when the proxy was chosen, every candidate's held-out MAPE; with ``selections``, how the
    summed estimate did on them and the margin at 95% confidence."""
    profiles = bank.profile
    chosen = Target.parse(target)
    if frontier and not selections:
        raise ConfigError(
            f"{frontier} frontier selections were asked for without random ones",
            hint="pass selections=N (--selections N) as well: the frontier's margin is measured "
            "against the estimate those correct",
        )
    if chosen.name == proxy:
        raise ConfigError(
            f"the target {chosen.name} is the proxy itself",
            hint="calibrate a target the bank has no latencies on, from one it has",
        )
    if chosen.name in profiles.targets and not overwrite:
        how = "predicted" if is_predicted(profiles, chosen.name) else "measured"
        raise ConfigError(
            f"the bank already has latencies on {chosen.name} ({how})",
            hint="pass overwrite=True (--overwrite) to replace them",
        )
    spread = proxy if proxy is not None else spread_target(profiles, chosen.name)
    keys = choose_samples(profiles, spread, samples, seed)
    frame_ms, measured = None, {}
    decomposition, descendants = bank.decomposition(), bank.load_descendants()
    if keys or measure_frame:
        frame_ms, measured = time_descendants(
            decomposition,
            descendants,
            chosen,
            config,
            only=set(keys),
            frame=measure_frame,
            progress=progress,
        )
    candidates = None
    if proxy is None:
        proxy, candidates = choose_proxy(profiles, measured, chosen.name)
    proxy_ms = _proxy_ms(profiles, proxy)
    fit = _fit_sampled(proxy_ms, measured)
    latency = _apply(fit, proxy_ms, measured)
    if frame_ms is None:
        frame_ms = fit.predict(profiles.frame.latency_ms[proxy])
    profiles.frame.latency_ms[chosen.name] = frame_ms
    for p in (p for family in profiles.descendants for p in family):
        p.latency_ms[chosen.name] = latency[p.block, p.index]
    held_out = _mape(held_out_errors(proxy_ms, measured))
    profiles.targets[chosen.name] = {
        **chosen.to_dict(),
        "predicted_from": proxy,
        "samples": len(keys),
        "measured_frame": measure_frame,
        "fit": fit.to_dict(),
        "held_out_mape_percent": held_out,
    }
    # a check of earlier latencies, and the correction fitted on it, no longer hold
    profiles.validation.pop(chosen.name, None)
    profiles.latency_corrections.pop(chosen.name, None)
    checked = None
    if selections:
        check = validate(
            profiles,
            decomposition,
            descendants,
            None,
            chosen,
            samples=selections,
            frontier=frontier,
            seed=seed,
            config=config,
            progress=progress,
        )
        profiles.validation[chosen.name] = check
        profiles.latency_corrections[chosen.name] = kept_latency_estimate(check)
        checked = {
            key: check[key]
            for key in (
                "samples",
                "relative_latency_mape_percent",
                "relative_latency_spearman",
                "corrected_latency_mape_percent",
            )
        }
        if "frontier" in check:
            checked["frontier"] = check["frontier"]["samples"]
            checked["frontier_latency_mape_percent"] = check["frontier"]["latency_mape_percent"]
        checked["margin_at_0.95"] = profiles.latency_corrections[chosen.name].headroom(0.95)
    bank.update(profiles=profiles.to_dict())
    in_sample = [fit.predict(proxy_ms[k]) / ms - 1.0 for k, ms in measured.items() if ms > 0]
    return {
        "target": chosen.name,
        "proxy": proxy,
        "measured": len(keys),
        "predicted": len(latency) - len(keys),
        "sampled": [list(k) for k in keys],
        "measured_frame": measure_frame,
        "frame_ms": frame_ms,
        "fit": fit.to_dict(),
        "in_sample_mape_percent": _mape(in_sample),
        "held_out_mape_percent": held_out,
        **({} if candidates is None else {"proxy_candidates": candidates}),
        **({} if checked is None else {"selections": checked}),
    }


def spread_target(bank_profile: BankProfile, target: str) -> str:
    """The measured target over whose latency range :func:`calibrate` spreads the samples when
    no proxy is named: the bank's first of ``target``'s backend, else its first."""
    backend = Target.parse(target).backend
    measured = _measured_targets(bank_profile, Target.parse(target).name)
    same = [n for n in measured if Target.parse(n).backend == backend]
    return (same or measured)[0]


# -- the scalable predictor --------------------------------------------------------------------


class LatencyRow(NamedTuple):
    """One training example of a :class:`LatencyPredictor`: a descendant's features, the
    target's signature, and the latency (ms) measured there."""

    signature: TargetSignature
    features: np.ndarray
    latency_ms: float


def _design(signature: TargetSignature, features: np.ndarray) -> tuple[np.ndarray, float]:
    """A row's regressors and offset. The offset is the target's mean probe log latency, its
    overall speed. The regressors: the descendant's features; the target's backend one-hot, log
    threads and probe log latencies less their mean (its shape, whatever its speed); and the
    products of the two (how that shape changes what each descendant costs). Centring the
    probes keeps a device faster or slower than any fitted from being extrapolated to."""
    probes = _log_ms(signature.probe_ms)
    spread = probes - probes.mean()
    backend_threads = signature.features()[: len(_FAMILIES) + 1]
    x = np.concatenate([features, backend_threads, spread, np.outer(features, spread).ravel()])
    return x, float(probes.mean())


@dataclass(frozen=True)
class LatencyPredictor:
    """Ridge regression (closed form, standardised regressors) of a descendant's log latency on
    a target, less the target's mean probe log latency, on descendant and target features (see
    ``_design``). Predicted relative to its probes, a device's overall speed needs no fitting;
    the shrinkage falls on what a few fitted targets determine poorly, how they differ in
    shape."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    alpha: float = 1.0

    @classmethod
    def fit(cls, rows: Sequence[LatencyRow], alpha: float = 1.0) -> LatencyPredictor:
        """Fitted on ``rows`` (every descendant of every target to learn from)."""
        if not rows:
            raise ConfigError(
                "a latency predictor needs rows to fit",
                hint="pass the profiled latencies of at least one target (profile_rows)",
            )
        if alpha < 0:
            raise ConfigError(
                f"the ridge alpha must not be negative, got {alpha}", hint="pass alpha >= 0"
            )
        designs = [_design(r.signature, np.asarray(r.features, dtype=float)) for r in rows]
        if len({len(x) for x, _ in designs}) > 1:
            raise ConfigError(
                "the rows differ in their number of features or probe blocks",
                hint="describe every descendant by the same features and every target by the "
                "same probes",
            )
        x = np.stack([x for x, _ in designs])
        y = _log_ms([r.latency_ms for r in rows]) - np.asarray([o for _, o in designs])
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0  # a constant column standardises to 0 and gets no weight
        z = (x - mean) / scale
        weights = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
        return cls(
            tuple(map(float, mean)),
            tuple(map(float, scale)),
            tuple(map(float, weights)),
            float(y.mean()),
            float(alpha),
        )

    def predict(
        self, signature: TargetSignature, features: Mapping[Key, np.ndarray]
    ) -> dict[Key, float]:
        """The predicted latency (ms) on the target of ``signature`` of every descendant in
        ``features``."""
        out = {}
        for key, f in features.items():
            x, offset = _design(signature, np.asarray(f, dtype=float))
            if len(x) != len(self.mean):
                raise ConfigError(
                    f"the predictor was fitted on {len(self.mean)} regressors, this descendant "
                    f"and target give {len(x)}",
                    hint="use the features and probe blocks the predictor was fitted with",
                )
            z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
            out[key] = float(np.exp(self.intercept + offset + z @ np.asarray(self.weights)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "intercept": self.intercept,
            "alpha": self.alpha,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyPredictor:
        return cls(
            mean=tuple(map(float, data["mean"])),
            scale=tuple(map(float, data["scale"])),
            weights=tuple(map(float, data["weights"])),
            intercept=float(data["intercept"]),
            alpha=float(data["alpha"]),
        )


def profile_rows(
    bank_profile: BankProfile,
    features: Mapping[Key, np.ndarray],
    targets: Sequence[str],
    probes: Sequence[Key] | None = None,
) -> list[LatencyRow]:
    """Every descendant of ``features`` on every one of ``targets`` (measured there, not
    predicted: a predictor must not learn predictions), from the bank's profiles, each target
    described by its :class:`TargetSignature` on ``probes`` (default :func:`probe_keys`)."""
    probes = list(probe_keys(bank_profile) if probes is None else probes)
    rows = []
    for target in targets:
        signature = TargetSignature.of(bank_profile, target, probes)
        if is_predicted(bank_profile, signature.target):
            raise ConfigError(
                f"{signature.target}'s latencies were predicted, not measured",
                hint="learn from measured targets only (leave out those is_predicted names), "
                f"or measure it: blockscale profile BANK --target {signature.target}",
            )
        try:
            for b, i in sorted(features):
                ms = bank_profile.descendants[b][i].latency_ms[signature.target]
                rows.append(LatencyRow(signature, features[b, i], ms))
        except KeyError:
            raise ProfileError(
                f"descendant {i} of block {b} has no latency on {signature.target}",
                hint=f"profile the whole bank there: blockscale profile BANK --target "
                f"{signature.target}",
            ) from None
    return rows


def leave_one_target_out(
    bank_profile: BankProfile,
    features: Mapping[Key, np.ndarray],
    targets: Sequence[str],
    *,
    probes: Sequence[Key] | None = None,
    alpha: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Per target: a :class:`LatencyPredictor` fitted on the other targets predicts every
    descendant there from its signature alone; its Spearman correlation and MAPE (%) against
    the latencies the bank holds (the probe blocks included, timings of 0 ms left out of the
    MAPE)."""
    if len(targets) < 2:
        raise ConfigError(
            f"leaving one target out needs at least two targets, got {len(targets)}",
            hint="profile the bank on another target first (blockscale profile)",
        )
    probes = list(probe_keys(bank_profile) if probes is None else probes)
    keys = sorted(features)
    results = {}
    for held in targets:
        rest = [t for t in targets if t != held]
        predictor = LatencyPredictor.fit(profile_rows(bank_profile, features, rest, probes), alpha)
        signature = TargetSignature.of(bank_profile, held, probes)
        predicted = predictor.predict(signature, features)
        guess = np.asarray([predicted[k] for k in keys])
        truth = np.asarray(
            [bank_profile.descendants[b][i].latency_ms[signature.target] for b, i in keys]
        )
        timed = truth > 0  # a timing clipped to 0 ms has no relative error
        errors = np.abs(guess - truth)[timed] / truth[timed]
        results[signature.target] = {
            "spearman": spearman(list(guess), list(truth)),
            "mape_percent": float(100 * errors.mean()) if timed.any() else float("nan"),
        }
    return results
