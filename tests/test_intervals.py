"""Bootstrap intervals: a hand-computed case, the properties an interval must have, and paired differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks.evaluation.intervals import (
    BootstrapSettings,
    f1_interval,
    macro_f1,
    paired_mean_f1_difference,
    rate_interval,
)

SETTINGS = BootstrapSettings(resamples=4000, confidence=0.95, seed=11)


def test_the_interval_matches_the_exact_bootstrap_distribution_of_a_small_case() -> None:
    # 2 abnormal items (one caught) and 2 normal ones (one false alarm): the stratified bootstrap resamples each
    # class with replacement, so TP ∈ {0,1,2} and FP ∈ {0,1,2} with probabilities 1/4, 1/2, 1/4 each.
    labels, preds = [1, 1, 0, 0], [1, 0, 1, 0]
    exact = []
    for caught, alarms in itertools.product([0, 1, 1, 2], [0, 1, 1, 2]):  # equally likely outcomes
        tp, fn, fp = caught, 2 - caught, alarms
        exact.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    low, high = np.percentile(exact, [2.5, 97.5], method="inverted_cdf")
    assert (low, high) == (0.0, 1.0)
    got = f1_interval(labels, preds, SETTINGS)
    assert got == pytest.approx((low, high))
    # a case with a narrower exact distribution: 4 abnormal (3 caught), 4 normal (none flagged)
    labels, preds = [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]
    draws = [2 * sum(c) / (2 * sum(c) + (4 - sum(c))) for c in itertools.product([1, 1, 1, 0], repeat=4)]
    low, high = np.percentile(draws, [2.5, 97.5], method="inverted_cdf")
    assert (low, high) == (0.4, 1.0)  # P(TP <= 1) = 13/256 > 2.5%, P(TP = 0) = 1/256 < 2.5%
    assert f1_interval(labels, preds, SETTINGS) == pytest.approx((low, high))


def test_a_perfect_classifier_has_the_interval_one_to_one() -> None:
    labels = [1] * 10 + [0] * 90
    assert f1_interval(labels, labels, SETTINGS) == (1.0, 1.0)
    assert f1_interval(labels, labels, SETTINGS, statistic="macro_f1") == (1.0, 1.0)


def test_intervals_widen_as_items_shrink_and_contain_the_point_value() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (2000, 400, 80):
        labels = (rng.random(n) < 0.15).astype(int)
        preds = np.where(rng.random(n) < 0.8, labels, 1 - labels)
        low, high = f1_interval(labels, preds, SETTINGS)
        point = 2 * ((labels == 1) & (preds == 1)).sum() / ((labels == 1).sum() + (preds == 1).sum())
        assert low <= point <= high
        widths.append(high - low)
    assert widths[0] < widths[1] < widths[2]


def test_the_interval_is_seeded_and_stratified() -> None:
    labels = [1] * 7 + [0] * 50
    preds = [1, 1, 1, 0, 0, 1, 0] + [0] * 45 + [1] * 5
    assert f1_interval(labels, preds, SETTINGS) == f1_interval(labels, preds, SETTINGS)
    assert f1_interval([1, 0, 0], [1, 0, 0], SETTINGS) is None  # one abnormal item: no interval can be formed


def test_macro_f1_averages_both_classes_like_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    preds = np.array([1, 0, 1, 1, 0, 0, 0, 0])
    assert float(macro_f1(preds[labels == 1], preds[labels == 0])) == pytest.approx(
        f1_score(labels, preds, average="macro"))


def test_a_false_alarm_rate_interval_brackets_the_rate() -> None:
    flags = [1] * 8 + [0] * 192
    low, high = rate_interval(flags, SETTINGS)
    assert low < 0.04 < high and low >= 0 and high < 0.1
    assert rate_interval([0] * 50, SETTINGS) == (0.0, 0.0)


def test_paired_difference_of_identical_methods_is_exactly_zero() -> None:
    labels = [1] * 12 + [0] * 60
    preds = [1] * 8 + [0] * 4 + [0] * 55 + [1] * 5
    diff = paired_mean_f1_difference({"a": (labels, preds, preds)}, SETTINGS)
    assert diff.difference == 0.0 and diff.interval == (0.0, 0.0)


def test_pairing_narrows_the_interval_of_a_small_gain() -> None:
    rng = np.random.default_rng(5)
    labels = (rng.random(600) < 0.1).astype(int)
    base = np.where(rng.random(600) < 0.85, labels, 1 - labels)
    better = base.copy()
    better[np.flatnonzero((labels == 1) & (base == 0))[:4]] = 1  # catches 4 more anomalies, otherwise the same
    diff = paired_mean_f1_difference({"a": (labels, better, base)}, SETTINGS)
    low, high = diff.interval
    assert diff.difference > 0 and 0 <= low < diff.difference < high
    a_low, a_high = f1_interval(labels, better, SETTINGS)
    assert high - low < (a_high - a_low) / 2, "the paired interval is far narrower than either method's own"


def test_a_mean_over_sets_resamples_each_set() -> None:
    labels = [1] * 10 + [0] * 40
    good, bad = [1] * 10 + [0] * 40, [1] * 5 + [0] * 5 + [0] * 40
    diff = paired_mean_f1_difference({"a": (labels, good, bad), "b": (labels, good, good)}, SETTINGS)
    assert diff.difference == pytest.approx((1.0 - 2 * 5 / 15) / 2)
    assert diff.sets == ("a", "b") and diff.interval[0] > 0
