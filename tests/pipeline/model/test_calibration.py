"""Calibration, flags and the drift verdict on small samples with known answers."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.model.calibration import (
    MAX_VALUES,
    Calibration,
    DropTally,
    binomial_sf,
    calibrate,
    flags,
    ks_2samp,
    verdict,
)
from pipeline.model.scores import OOD_SCORE

VALIDATION = 10_000


def validation(seed: int = 0) -> Calibration:
    """bits/dim ~ N(3, 0.3), ood_score ~ N(0, 1): 10,000 validation images."""
    rng = np.random.default_rng(seed)
    return calibrate(rng.normal(3, 0.3, VALIDATION), rng.normal(0, 1, VALIDATION))


def tally(calibration: Calibration, bits: np.ndarray, ood: np.ndarray, parts: int = 1):
    drop = DropTally(calibration.threshold(), calibration.bits_mean)
    for b, o in zip(np.array_split(bits, parts), np.array_split(ood, parts)):
        drop.add(b, o)
    return drop


def test_threshold_is_the_95th_percentile_and_flags_are_strictly_above_it() -> None:
    calibration = calibrate(np.full(101, 3.0) + np.arange(101) / 1000, np.arange(101.0))
    assert calibration.threshold() == 95.0  # 0..100: the 95th percentile is 95
    assert calibration.threshold(0.5) == 50.0
    assert calibration.count == 101 and calibration.tags()["calibration.threshold"] == "95.000000"
    found = flags(np.array([94.9, 95.0, 95.1, np.nan, np.inf]), calibration.threshold())
    assert found.tolist() == [False, False, True, True, True]


def test_calibration_round_trips_and_keeps_quantiles_of_a_large_sample() -> None:
    calibration = validation()
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again.threshold() == calibration.threshold()
    assert again.bits_std == calibration.bits_std and again.count == VALIDATION
    values = np.random.default_rng(1).normal(0, 1, 3 * MAX_VALUES)
    large = calibrate(values + 3, values)
    assert len(large.ood_score) == MAX_VALUES and large.count == 3 * MAX_VALUES
    assert abs(large.threshold() - np.quantile(values, 0.95)) < 1e-3


def test_a_known_mixture_flags_its_foreign_share_plus_five_percent_of_the_rest() -> None:
    calibration = validation()
    rng = np.random.default_rng(2)
    n, foreign = 10_000, 1_000  # 10% far out: flagged 10% + 5% of 90% = 14.5%
    ood = np.concatenate([rng.normal(0, 1, n - foreign), rng.normal(20, 1, foreign)])
    bits = np.concatenate([rng.normal(3, 0.3, n - foreign), rng.normal(5, 0.3, foreign)])
    drift = verdict(calibration, tally(calibration, bits, ood, parts=7))
    expected = 0.10 + 0.05 * 0.90
    # binomial error of the drop, plus that of the threshold estimated on 10,000 images
    error = math.sqrt(expected * (1 - expected) / n) + math.sqrt(0.05 * 0.95 / VALIDATION)
    assert abs(drift.flagged_share - expected) < 3 * error
    assert drift.level == "detected"
    assert drift.line().startswith(f"drift: detected (flagged {drift.flagged_share:.1%} vs 5%")
    streamed = tally(calibration, bits, ood, parts=7)
    assert (streamed.count, streamed.flagged) == (n, int((ood > calibration.threshold()).sum()))
    assert streamed.bits_mean == pytest.approx(bits.mean(), abs=1e-12)
    assert streamed.bits_std == pytest.approx(bits.std(ddof=1), rel=1e-9)


def test_an_independent_sample_of_the_same_distribution_says_none() -> None:
    calibration = validation()
    rng = np.random.default_rng(3)
    drop = tally(calibration, rng.normal(3, 0.3, 10_000), rng.normal(0, 1, 10_000))
    drift = verdict(calibration, drop)
    assert drift.level == "none"
    assert abs(drift.flagged_share - 0.05) < 0.01
    assert drift.flag_p_value > 1e-3 and drift.ks_p_value > 1e-3


def test_foreign_images_are_detected_whichever_way_their_likelihood_goes() -> None:
    calibration = validation()
    rng = np.random.default_rng(4)
    # Higher likelihood than the data (Nalisnick et al.): only typicality and KS see it.
    lower = verdict(
        calibration, tally(calibration, rng.normal(1.5, 0.3, 500), rng.normal(-3, 1, 500))
    )
    assert lower.level == "detected" and lower.flagged == 0
    assert lower.typicality_z < -20 and lower.ks_statistic > 0.8
    far = verdict(calibration, tally(calibration, np.full(50, np.inf), np.full(50, np.nan)))
    assert far.level == "detected" and far.flagged_share == 1.0


def test_significance_without_effect_and_effect_without_significance_are_none() -> None:
    calibration = validation()
    rng = np.random.default_rng(5)
    # 200,000 images 0.05 sd off: significant (typicality z about 5) but a negligible effect.
    big = verdict(
        calibration,
        tally(calibration, rng.normal(3.015, 0.3, 200_000), rng.normal(0.05, 1, 200_000)),
    )
    assert big.typicality_p_value < 1e-3 and big.typicality_effect < 0.2
    assert big.level == "none"
    # 10 images, 2 flagged (20%: four times the 5% expected) but p = 0.086.
    ood = np.array([5.0, 5.0] + [0.0] * 8)
    small = verdict(calibration, tally(calibration, np.full(10, 3.0), ood))
    assert small.flag_p_value == pytest.approx(1 - 0.95**10 - 10 * 0.05 * 0.95**9)
    assert small.level == "none"
    # 200 images, 20% flagged: p < 1e-9 and four times the expected share.
    ood = np.r_[np.full(40, 5.0), np.zeros(160)]
    assert verdict(calibration, tally(calibration, np.full(200, 3.0), ood)).level == "detected"


def test_a_moderate_excess_of_flags_is_suspected() -> None:
    calibration = validation()
    # 8% flagged (1.6 times the expected share), the rest spread as validation's below t_0.95
    ood = np.r_[np.full(80, 5.0), stats.norm.ppf((np.arange(920) + 0.5) / 920 * 0.95)]
    drift = verdict(calibration, tally(calibration, np.full(1000, calibration.bits_mean), ood))
    assert 1e-6 < drift.flag_p_value < 1e-3
    assert drift.level == "suspected"


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        (3, 10, 0.05),
        (60, 1000, 0.05),
        (520, 10_000, 0.05),
        (1420, 10_000, 0.05),
        (50_400, 1_000_000, 0.05),
        (7, 7, 0.3),
    ],
)
def test_binomial_tail_matches_scipy(k: int, n: int, p: float) -> None:
    assert binomial_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-8)


def test_binomial_tail_by_hand() -> None:
    assert binomial_sf(1, 2, 0.5) == pytest.approx(0.75)
    assert binomial_sf(0, 5, 0.1) == 1.0 and binomial_sf(6, 5, 0.1) == 0.0


@pytest.mark.parametrize(
    ("n", "m", "shift"), [(50, 60, 0.5), (200, 10_000, 0.2), (10_000, 10_000, 0.05)]
)
def test_ks_statistic_equals_scipy_and_its_p_value_is_close(n: int, m: int, shift: float) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.normal(shift, 1, n), rng.normal(0, 1, m)
    statistic, p_value = ks_2samp(a, b)
    expected = stats.ks_2samp(a, b)
    assert statistic == pytest.approx(expected.statistic, abs=1e-12)
    assert p_value == pytest.approx(expected.pvalue, rel=0.1)
    assert ks_2samp(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))[0] == 1.0


def test_the_ks_sample_is_bounded_and_drawn_from_the_whole_drop() -> None:
    drop = DropTally(threshold=1.0, keep=100)
    for start in range(0, 1000, 250):
        values = np.arange(start, start + 250, dtype=float)
        drop.add(values, values)
    assert len(drop.sample) == 100 and drop.count == 1000
    assert (drop.sample < 500).sum() > 25 and (drop.sample >= 500).sum() > 25


def test_a_calibration_of_another_ood_score_formula_says_so() -> None:
    now = OOD_SCORE
    same = dataclasses.replace(validation(), source={"ood_score": now})
    other = dataclasses.replace(validation(), source={"ood_score": now + "-older"})
    assert same.problem() == ""
    assert (
        other.problem()
        == f"was made with ood_score {now}-older, scoring computes {now or '(unnamed)'}"
    )
