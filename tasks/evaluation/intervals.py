"""Bootstrap confidence intervals for classification figures, stratified by label, seeded.

A test set of 707 templates holds 45 anomalies: one more or one fewer caught moves abnormal-class F1 by a
few points, so every F1 is reported with a 95% interval. Method: scipy.stats.bootstrap (percentile
method) with the abnormal and the normal items resampled separately (stratified by label: every resample
keeps the set's class counts), `resamples` times, seeded. Percentile rather than BCa: BCa is undefined
when the bootstrap distribution is degenerate (a perfect classifier), whose interval must read [1, 1].

Paired differences (candidate − champion, candidate − best baseline) resample the same items for both
methods (each item's two predictions move together), one stratified resampling per test set; a mean over
several sets resamples each set independently (issue 13).

Predictions are 0/1 arrays aligned with the labels (1 = abnormal). Intervals are (low, high) floats, or
None when a class has fewer than 2 items (no interval can be formed: the report says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are drawn: `resamples` (>= 1,000 for a stable 95% interval), `confidence`, `seed`."""

    resamples: int
    confidence: float
    seed: int


def _split(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The predictions on the abnormal items and on the normal items."""
    truth, pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if truth.shape != pred.shape:
        raise ValueError(f"{len(truth)} labels but {len(pred)} predictions")
    return pred[truth == 1], pred[truth == 0]


def f1_abnormal(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """Abnormal-class F1 from the predictions on abnormal items (`pos`) and on normal items (`neg`).

    >>> float(f1_abnormal(np.array([1, 1, 0]), np.array([0, 1, 0, 0])))
    0.6666666666666666
    """
    tp = pos.sum(axis=axis)
    fn = pos.shape[axis] - tp
    fp = neg.sum(axis=axis)
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def f1_normal(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """Normal-class F1 from the same predictions (normal is then the positive class)."""
    tn = neg.shape[axis] - neg.sum(axis=axis)
    fp_normal = pos.shape[axis] - pos.sum(axis=axis)  # abnormal items called normal
    fn_normal = neg.sum(axis=axis)  # normal items called abnormal
    return 2 * tn / np.maximum(2 * tn + fp_normal + fn_normal, 1)


def macro_f1(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """The unweighted mean of the two classes' F1 (scikit-learn's average='macro')."""
    return (f1_abnormal(pos, neg, axis) + f1_normal(pos, neg, axis)) / 2


def _interval(samples: tuple[np.ndarray, ...], statistic: object, settings: BootstrapSettings,
              ) -> tuple[float, float]:
    result = bootstrap(samples, statistic, n_resamples=settings.resamples, confidence_level=settings.confidence,
                       method="percentile", random_state=settings.seed, vectorized=True, axis=-1)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _enough(*groups: np.ndarray) -> bool:
    return all(group.shape[-1] >= 2 for group in groups)


def f1_interval(y_true: Sequence[int], y_pred: Sequence[int], settings: BootstrapSettings,
                statistic: str = "f1") -> tuple[float, float] | None:
    """Interval of abnormal-class F1 (`statistic="f1"`) or macro-F1 (`"macro_f1"`) over the items."""
    pos, neg = _split(y_true, y_pred)
    if not _enough(pos, neg):
        return None
    function = {"f1": f1_abnormal, "macro_f1": macro_f1}[statistic]
    return _interval((pos, neg), function, settings)


def rate_interval(flags: Sequence[int], settings: BootstrapSettings) -> tuple[float, float] | None:
    """Interval of a rate over items (e.g. the false-alarm rate: 1 = flagged); None under 2 items."""
    values = np.asarray(flags, dtype=float)
    if values.shape[-1] < 2:
        return None
    return _interval((values,), lambda x, axis=-1: x.mean(axis=axis), settings)


@dataclass(frozen=True)
class PairedDifference:
    """Mean abnormal-class F1 of method A minus method B over the same items (sets), with its interval."""

    difference: float
    interval: tuple[float, float] | None
    sets: tuple[str, ...]


def paired_mean_f1_difference(sets: dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
                              settings: BootstrapSettings) -> PairedDifference:
    """Mean over sets of F1(A) − F1(B), from `{set: (labels, predictions of A, predictions of B)}`.

    Each set is resampled stratified by label with both methods' predictions moving together (paired), the
    sets independently of each other. The interval is None when a set has fewer than 2 items of a class.
    """
    samples: list[np.ndarray] = []
    for labels, pred_a, pred_b in sets.values():
        pos_a, neg_a = _split(labels, pred_a)
        pos_b, neg_b = _split(labels, pred_b)
        samples += [np.vstack([pos_a, pos_b]), np.vstack([neg_a, neg_b])]

    def statistic(*groups: np.ndarray, axis: int = -1) -> np.ndarray:
        diffs = [f1_abnormal(pos[0], neg[0], axis) - f1_abnormal(pos[1], neg[1], axis)
                 for pos, neg in zip(groups[::2], groups[1::2], strict=True)]
        return np.mean(diffs, axis=0)

    observed = float(statistic(*samples))
    interval = _interval(tuple(samples), statistic, settings) if samples and _enough(*samples) else None
    return PairedDifference(observed, interval, tuple(sets))
