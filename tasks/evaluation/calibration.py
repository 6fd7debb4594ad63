"""Choosing the verdict threshold on the validation fold, and applying it.

The verdict score (tasks.common.prompt.verdict_score) is P(abnormal) of the answer word's first token; the
threshold that turns it into a verdict is chosen on the validation fold carved from the training templates
(split.validation_fraction: seeded, stratified, never the test split) to maximise abnormal-class F1
(LM-BFF and calibration studies: a small model's label-word probability beats its parsed answer when the
threshold is fitted to held-out data). The threshold is stored with the model and applied everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tasks.common.prompt import ABNORMAL, FIRST_STAGE_SCORE, scored_verdict


@dataclass(frozen=True)
class Calibration:
    """A fitted threshold and how it did on the validation fold (`n` items, `abnormal` of them anomalies)."""

    threshold: float
    n: int
    abnormal: int
    average_precision: float
    f1: float
    precision: float
    recall: float
    missing_scores: int  # validation items with no score (counted as normal)
    # percentile interval of the same choice over stratified bootstrap resamples (`threshold_interval`); None
    # when not computed (issue 18 item 5: the threshold rests on a few validation anomalies, so show its spread)
    threshold_ci: list[float] | None = None

    def to_dict(self) -> dict[str, float | int]:
        """As plain data (calibration.json, registry tags)."""
        return asdict(self)


MISSING_SCORE = -1.0  # below every probability: no threshold in [0, 1] flags it, as `scored_verdict` never does


def as_scores(scores: Sequence[float | None]) -> np.ndarray:
    """Scores as floats, a missing score (no answer word among the top tokens) as MISSING_SCORE: never flagged."""
    return np.asarray([MISSING_SCORE if s is None else float(s) for s in scores], dtype=float)


def choose_threshold(labels: Sequence[int], scores: Sequence[float | None]) -> Calibration:
    """The threshold maximising abnormal-class F1 on (labels, scores); ties go to the highest threshold (fewer
    alarms). Raises ValueError when the labels hold no anomaly (nothing to calibrate on).

    >>> choose_threshold([0, 0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8, 0.2]).threshold
    0.35
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    truth, values = np.asarray(labels, dtype=int), as_scores(scores)
    if truth.sum() == 0:
        raise ValueError("the validation fold holds no anomaly: no threshold can be chosen")
    precision, recall, thresholds = precision_recall_curve(truth, values)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    # a threshold must be a probability above 0: a missing score (MISSING_SCORE) and a template the first stage
    # called normal (FIRST_STAGE_SCORE 0.0) are never flagged; 0 was chosen once by a 4-step smoke model
    f1[thresholds <= FIRST_STAGE_SCORE] = -1.0
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    return Calibration(threshold=float(thresholds[best]), n=len(truth), abnormal=int(truth.sum()),
                       average_precision=float(average_precision_score(truth, values)), f1=float(f1[best]),
                       precision=float(precision[best]), recall=float(recall[best]),
                       missing_scores=sum(s is None for s in scores))


def apply_threshold(scores: Sequence[float | None], threshold: float) -> np.ndarray:
    """0/1 verdicts by `tasks.common.prompt.scored_verdict`, the rule every served path applies."""
    return np.asarray([int(scored_verdict(s, threshold) == ABNORMAL) for s in scores], dtype=int)


def threshold_interval(labels: Sequence[int] | np.ndarray, scores: Sequence[float | None] | np.ndarray,
                       resamples: int, confidence: float, seed: int) -> list[float] | None:
    """Percentile interval of the F1-maximising threshold (`choose_threshold`) over stratified bootstrap resamples
    of (labels, scores); None without resamples or with fewer than 2 items of a class."""
    truth, values = np.asarray(labels, dtype=int), as_scores(list(scores))
    pos, neg = np.flatnonzero(truth == 1), np.flatnonzero(truth == 0)
    if resamples == 0 or len(pos) < 2 or len(neg) < 2:
        return None
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        chosen.append(choose_threshold(truth[idx], values[idx]).threshold)
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(chosen, tail)), float(np.percentile(chosen, 100 - tail))]
