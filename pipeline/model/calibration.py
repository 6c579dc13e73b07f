"""What "normal" is for one model version, and whether a drop of images still is (the user's
side: docs/scoring.md, "Flags and drift").

Calibration: the per-image `bits_per_dim` and `ood_score` (pipeline.model.scores) of the
validation split, scored once when the version is registered (or by `flowray models calibrate`).

Flags: an image is flagged when its ood_score is above t_q, the q-quantile of the validation
ood_score (q = 0.95 by default: 5% of validation images are flagged), or is not a number.

The verdict on a drop of n images against m validation images (`verdict`):

    flags        k flagged; one-sided binomial p = P(X >= k), X ~ Bin(n, 1 - q);
                 effect r = (k / n) / (1 - q), the flagged share over the expected one
    KS           two-sample Kolmogorov-Smirnov test of the drop's ood_score against the
                 validation's (`ks_2samp`, asymptotic p; non-finite scores count as +inf);
                 effect D = sup |F_drop - F_validation|
    typicality   z = (mean_drop - mean_val) / sqrt(s_val^2 / m + s_drop^2 / n) of the finite
                 bits/dim, two-sided normal p (Nalisnick et al. 2019, "Detecting
                 out-of-distribution inputs to deep generative models using typicality");
                 effect d = |mean_drop - mean_val| / s_val

    detected     some test has p < 1e-6 and a large effect: r >= 2, D >= 0.2 or d >= 0.5
    suspected    else some test has p < 1e-3 and a small effect: r >= 1.5, D >= 0.1 or d >= 0.2
    none         else

Significance alone would call a million-image drop drifted for a shift nobody cares about; effect
size alone would call a 20-image drop drifted by chance. The KS test uses a uniform sample of at
most DropTally.keep drop scores; counts and means are over every image. A calibration records the
ood_score formula it was made with; one of another formula judges nothing (`Calibration.problem`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

DEFAULT_QUANTILE = 0.95
MAX_VALUES = 20_000  # values of each score kept (past that, a quantile grid)
CALIBRATION_IMAGES = 10_000  # validation images scored by default: t_0.95 to +-0.22% coverage
LEVELS = ("none", "suspected", "detected")
# (p-value below, flag ratio, KS D, typicality d) at least: detected, then suspected.
RULES = {"detected": (1e-6, 2.0, 0.2, 0.5), "suspected": (1e-3, 1.5, 0.1, 0.2)}
SUMMARY_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _kept(values: np.ndarray) -> np.ndarray:
    """The sorted finite `values`, or MAX_VALUES evenly spaced quantiles of them."""
    values = np.sort(values[np.isfinite(values)])
    if len(values) <= MAX_VALUES:
        return values
    positions = (np.arange(MAX_VALUES) + 0.5) / MAX_VALUES * (len(values) - 1)
    return np.interp(positions, np.arange(len(values)), values)  # np.quantile's, of sorted values


@dataclass(frozen=True)
class Calibration:
    """Validation scores of one model version (module docstring); `source` says how they were
    made (data, images, seed, draws)."""

    bits_per_dim: np.ndarray  # sorted finite values (or their quantile grid)
    ood_score: np.ndarray
    count: int  # images scored
    bits_mean: float  # over every finite bits/dim
    bits_std: float
    quantile: float = DEFAULT_QUANTILE  # the default flag quantile
    source: dict[str, Any] = field(default_factory=dict)

    def problem(self) -> str:
        """Why these values cannot judge today's scores ("" when they can): they were made with
        another ood_score formula than the one pipeline.model.scores computes now."""
        from pipeline.model.scores import OOD_SCORE

        made = self.source.get("ood_score", "")
        if made == OOD_SCORE:
            return ""
        return f"was made with ood_score {made or '(unnamed)'}, scoring computes {OOD_SCORE}"

    def threshold(self, quantile: float | None = None) -> float:
        """t_q: the `quantile` (default `self.quantile`) of the validation ood_score."""
        return float(np.quantile(self.ood_score, self.quantile if quantile is None else quantile))

    def tags(self) -> dict[str, str]:
        """Model version tags: the image count, the flag threshold and ood_score quantiles."""
        quantiles = np.quantile(self.ood_score, SUMMARY_QUANTILES)
        return {
            "calibration.count": str(self.count),
            "calibration.quantile": f"{self.quantile:g}",
            "calibration.threshold": f"{self.threshold():.6f}",
            "calibration.bits_mean": f"{self.bits_mean:.6f}",
            **{
                f"calibration.ood_q{round(q * 100):02d}": f"{v:.6f}"
                for q, v in zip(SUMMARY_QUANTILES, quantiles)
            },
        }

    def to_dict(self) -> dict[str, Any]:
        def summary(values: np.ndarray) -> dict[str, Any]:
            quantiles = np.quantile(values, SUMMARY_QUANTILES)
            return {
                "quantiles": {f"{q:g}": float(v) for q, v in zip(SUMMARY_QUANTILES, quantiles)},
                "values": values.tolist(),
            }

        return {
            "count": self.count,
            "quantile": self.quantile,
            "threshold": self.threshold(),
            "bits_mean": self.bits_mean,
            "bits_std": self.bits_std,
            "source": self.source,
            "bits_per_dim": summary(self.bits_per_dim),
            "ood_score": summary(self.ood_score),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            bits_per_dim=np.asarray(data["bits_per_dim"]["values"], dtype=np.float64),
            ood_score=np.asarray(data["ood_score"]["values"], dtype=np.float64),
            count=int(data["count"]),
            bits_mean=float(data["bits_mean"]),
            bits_std=float(data["bits_std"]),
            quantile=float(data["quantile"]),
            source=dict(data.get("source", {})),
        )


def calibrate(
    bits_per_dim: np.ndarray,
    ood_score: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    source: dict[str, Any] | None = None,
) -> Calibration:
    """The calibration of validation scores (per image, same order).

    Raises:
        ValueError: no finite score, or `quantile` outside (0, 1).
    """
    bits = np.asarray(bits_per_dim, dtype=np.float64)
    ood = np.asarray(ood_score, dtype=np.float64)
    finite = bits[np.isfinite(bits)]
    if not 0 < quantile < 1:
        raise ValueError(f"quantile: expected a number in (0, 1), found {quantile}")
    if len(finite) < 2 or not np.isfinite(ood).any():
        raise ValueError(
            f"calibration: expected at least 2 images with finite scores, found {len(finite)} "
            f"of {len(bits)}"
        )
    mean, std = float(finite.mean()), float(finite.std(ddof=1))
    return Calibration(_kept(bits), _kept(ood), len(bits), mean, std, quantile, dict(source or {}))


def calibrate_flow(
    flow: Any,
    rows: Iterable[dict[str, Any]],
    seed: int,
    draws: int,
    limit: int = CALIBRATION_IMAGES,
    batch_size: int = 256,
    source: dict[str, Any] | None = None,
) -> Calibration:
    """Score the first `limit` of `rows` (dicts with `image` uint8 [C, H, W] and `key`, as
    pipeline.data.reader.iter_input yields them) with `score_images` and calibrate on them."""
    from pipeline.model.scores import OOD_SCORE, score_images

    scored: list[dict[str, np.ndarray]] = []
    rows = itertools.islice(rows, limit)
    while batch := list(itertools.islice(rows, batch_size)):
        images = np.stack([row["image"] for row in batch])  # (B, C, H, W) uint8
        scored.append(score_images(flow, images, [str(row["key"]) for row in batch], seed, draws))
    if not scored:
        raise ValueError("calibration: expected images to score, found none")
    bits = np.concatenate([scores["bits_per_dim"] for scores in scored])
    ood = np.concatenate([scores["ood_score"] for scores in scored])
    made = {"seed": seed, "draws": draws, "ood_score": OOD_SCORE, **(source or {})}
    return calibrate(bits, ood, source=made)


class DropTally:
    """A drop's figures for `verdict`, streamed in bounded memory: images, flagged, the sum and
    sum of squares of finite bits/dim (about `center`, for precision), and a uniform sample of
    at most `keep` ood_scores for the KS test (random priorities, the `keep` lowest kept; the
    pool is cut back to `keep` whenever it doubles, so each score is copied O(1) times)."""

    def __init__(self, threshold: float, center: float = 0.0, keep: int = 1_000_000) -> None:
        self.threshold, self.center, self.keep = threshold, center, keep
        self.count = self.flagged = self.finite = 0
        self.total = self.squares = 0.0
        self._rng = np.random.default_rng(0)
        self._pool: list[tuple[np.ndarray, np.ndarray]] = []  # (ood_score, priority) parts
        self._pooled = 0

    def add(self, bits_per_dim: np.ndarray, ood_score: np.ndarray) -> None:
        bits = np.asarray(bits_per_dim, dtype=np.float64)
        ood = np.asarray(ood_score, dtype=np.float64)
        self.count += len(ood)
        self.flagged += int(flags(ood, self.threshold).sum())
        shifted = bits[np.isfinite(bits)] - self.center
        self.finite += len(shifted)
        self.total += float(shifted.sum())
        self.squares += float((shifted**2).sum())
        self._pool.append((np.where(np.isnan(ood), np.inf, ood), self._rng.random(len(ood))))
        self._pooled += len(ood)
        if self._pooled > 2 * self.keep:
            self._cut()

    def _cut(self) -> None:
        sample = np.concatenate([part for part, _ in self._pool] or [np.zeros(0)])
        priority = np.concatenate([part for _, part in self._pool] or [np.zeros(0)])
        if len(sample) > self.keep:
            lowest = np.argpartition(priority, self.keep)[: self.keep]
            sample, priority = sample[lowest], priority[lowest]
        self._pool, self._pooled = [(sample, priority)], len(sample)

    @property
    def sample(self) -> np.ndarray:
        """The ood_scores kept for the KS test (all of them while count <= keep)."""
        self._cut()
        return self._pool[0][0]

    @property
    def bits_mean(self) -> float:
        return self.center + self.total / self.finite if self.finite else math.nan

    @property
    def bits_std(self) -> float:
        if self.finite < 2:
            return math.nan
        mean = self.total / self.finite
        return math.sqrt(max(self.squares - self.finite * mean**2, 0.0) / (self.finite - 1))


def flags(ood_score: np.ndarray, threshold: float) -> np.ndarray:
    """True where ood_score > threshold or is NaN (an unusual image either way)."""
    return ~(np.asarray(ood_score, dtype=np.float64) <= threshold)


@dataclass(frozen=True)
class Drift:
    """The verdict on one drop (module docstring); p-values are one- or two-sided as stated
    there."""

    level: str  # none | suspected | detected
    images: int
    flagged: int
    expected_share: float  # 1 - q
    threshold: float
    flag_p_value: float
    ks_statistic: float
    ks_p_value: float
    bits_mean: float
    validation_bits_mean: float
    typicality_z: float
    typicality_p_value: float
    typicality_effect: float  # |mean difference| / validation std

    @property
    def flagged_share(self) -> float:
        return self.flagged / self.images

    def line(self) -> str:
        """`drift: detected (flagged 41.2% vs 5% expected, p < 1e-9; KS D 0.61, ...)`."""
        return (
            f"drift: {self.level} (flagged {self.flagged_share:.1%} vs "
            f"{self.expected_share * 100:.3g}% expected, {_p(self.flag_p_value)}; KS D "
            f"{self.ks_statistic:.3f}, {_p(self.ks_p_value)}; bits/dim {self.bits_mean:.4f} vs "
            f"{self.validation_bits_mean:.4f}, z {self.typicality_z:.1f}; {self.images:,} images)"
        )

    def metrics(self) -> dict[str, float]:
        """The figures as MLflow metrics `drift_<name>` (drift_level: 0 none, 1 suspected, 2
        detected)."""
        figures = {"level": float(LEVELS.index(self.level)), "flagged_share": self.flagged_share}
        figures |= {f.name: getattr(self, f.name) for f in fields(self)[3:]}  # from expected_share
        return {f"drift_{name}": value for name, value in figures.items()}


def _p(value: float) -> str:
    return "p < 1e-9" if value < 1e-9 else f"p = {value:.2g}"


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Bin(n, p): the pmf terms from k up, in log space, each from the one
    before by the ratio (n - i) / (i + 1) * p / (1 - p); terms more than 40 standard deviations
    past the mean (below e^-800 of the largest) are left out."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    if k <= 0 or k < mean - 40 * sd:
        return 1.0
    if k > n:
        return 0.0
    last = min(n, int(max(k, mean) + 40 * sd) + 10)
    first = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    i = np.arange(k, last, dtype=np.float64)
    steps = np.log((n - i) / (i + 1)) + math.log(p / (1 - p))
    logs = first + np.concatenate([[0.0], np.cumsum(steps)])  # log pmf(k), ..., log pmf(last)
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: D = sup |F_a - F_b| over the pooled points, and its
    asymptotic p-value Q(lambda) = 2 sum_j (-1)^(j-1) exp(-2 j^2 lambda^2), lambda = (sqrt(e) +
    0.12 + 0.11 / sqrt(e)) D, e = n m / (n + m) (Stephens 1970; Numerical Recipes 14.3)."""
    a, b = np.sort(a), np.sort(b)
    pooled = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, pooled, side="right") / len(a)
    cdf_b = np.searchsorted(b, pooled, side="right") / len(b)
    d = float(np.abs(cdf_a - cdf_b).max())
    root = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (root + 0.12 + 0.11 / root) * d
    j = np.arange(1, 101)
    q = 2 * float(np.sum((-1.0) ** (j - 1) * np.exp(-2 * j**2 * lam**2)))
    return d, (min(1.0, max(0.0, q)) if lam > 0.2 else 1.0)


def verdict(calibration: Calibration, drop: DropTally, quantile: float | None = None) -> Drift:
    """The drop's verdict against `calibration`, flags at its `quantile` (module docstring).

    Raises:
        ValueError: an empty drop.
    """
    q = calibration.quantile if quantile is None else quantile
    threshold = calibration.threshold(q)
    if drop.count == 0:
        raise ValueError("drift: expected a drop of at least one image, found none")
    expected = round(1.0 - q, 12)  # 0.05, not 0.050000000000000044
    flag_p = binomial_sf(drop.flagged, drop.count, expected)
    ks_d, ks_p = ks_2samp(drop.sample, calibration.ood_score)
    m, s_val = calibration.count, calibration.bits_std
    difference = drop.bits_mean - calibration.bits_mean
    drop_var = drop.bits_std**2 / drop.finite if drop.finite > 1 else 0.0
    z = difference / math.sqrt(s_val**2 / m + drop_var)
    typicality_p = math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else math.nan
    effect = abs(difference) / s_val
    ratio = drop.flagged / drop.count / expected
    level = "none"
    for name, (alpha, min_ratio, min_d, min_effect) in RULES.items():
        if (
            (flag_p < alpha and ratio >= min_ratio)
            or (ks_p < alpha and ks_d >= min_d)
            or (typicality_p < alpha and effect >= min_effect)
        ):
            level = name
            break
    return Drift(
        level,
        drop.count,
        drop.flagged,
        expected,
        threshold,
        flag_p,
        ks_d,
        ks_p,
        drop.bits_mean,
        calibration.bits_mean,
        z,
        typicality_p,
        effect,
    )
