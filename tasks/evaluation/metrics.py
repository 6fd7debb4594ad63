"""Scoring: every method on every test set, with 95% bootstrap intervals, abnormal = the positive class.

Per set (tasks.evaluation.testdata.EvalSet): abnormal-class precision, recall and F1 (the primary figure),
macro-F1 and support-weighted F1 (what averaged tables such as the paper's Table 2 report), accuracy, the
confusion matrix [[TN, FP], [FN, TP]], and stratified bootstrap intervals of F1 and macro-F1
(tasks.evaluation.intervals). A set with no anomaly by construction reports its false-alarm rate and its
interval instead. LLM methods also report the format-valid rate of the answers the set depends on; an
answer that breaks the format counts as normal and is counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.common.contracts import Metrics, SetMetrics
from tasks.evaluation.intervals import BootstrapSettings, f1_interval, rate_interval
from tasks.evaluation.testdata import EvalData, EvalSet, Key


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], *, valid: Sequence[bool] | None = None,
                   rationale_words: Sequence[int] | None = None) -> SetMetrics:
    """Precision, recall, F1 (abnormal class), macro- and weighted F1, accuracy and the confusion matrix.

    `valid` marks answers that followed the format; invalid ones are already counted as normal in `y_pred`
    and are reported apart (how many, and how many of them hid a real anomaly). Rule baselines pass None.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true_a, y_pred_a = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true_a.shape != y_pred_a.shape:
        raise ValueError(f"{len(y_true_a)} labels but {len(y_pred_a)} predictions")
    n = len(y_true_a)
    out: SetMetrics = {"n": n, "n_abnormal": int(y_true_a.sum())}
    if n:
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true_a, y_pred_a, average="binary", pos_label=1, labels=[0, 1], zero_division=0)
        cm = confusion_matrix(y_true_a, y_pred_a, labels=[0, 1])
        out.update(precision=float(precision), recall=float(recall), f1=float(f1),
                   macro_f1=float(f1_score(y_true_a, y_pred_a, average="macro", labels=[0, 1], zero_division=0)),
                   weighted_f1=float(f1_score(y_true_a, y_pred_a, average="weighted", labels=[0, 1],
                                              zero_division=0)),
                   accuracy=float(accuracy_score(y_true_a, y_pred_a)), confusion_matrix=cm.tolist())
    else:
        out.update(precision=0.0, recall=0.0, f1=0.0, macro_f1=0.0, weighted_f1=0.0, accuracy=0.0,
                   confusion_matrix=[[0, 0], [0, 0]])
    if valid is not None:
        valid_a = np.asarray(valid, dtype=bool)
        out["format_valid_rate"] = float(valid_a.mean()) if len(valid_a) else 1.0
        out["format_invalid"] = int((~valid_a).sum())
        if len(valid_a) == n:
            out["format_invalid_abnormal"] = int(((~valid_a) & (y_true_a == 1)).sum())
        words = np.asarray(rationale_words if rationale_words is not None else [], dtype=float)
        valid_words = words[valid_a] if len(words) == len(valid_a) else words
        out["mean_rationale_words"] = float(valid_words.mean()) if len(valid_words) else 0.0
    else:
        out.update(format_valid_rate=None, format_invalid=None, mean_rationale_words=None)
    return out


@dataclass
class MethodResult:
    """One method's verdict on every (dataset, template) key it answered, and how it was produced.

    A verdict is a dict with `label` (0/1) and, for LLM methods, `valid`, `verdict`, `rationale_words`,
    `rationale`, `completion`; `seconds` is the time spent answering (model loading excluded).
    """

    name: str
    verdicts: dict[Key, dict[str, Any]]
    seconds: float
    engine: str
    is_llm: bool
    notes: list[str] = field(default_factory=list)
    # model calls per template (LLM methods: scoring requests over unique templates; None for the rules)
    model_calls_per_template: float | None = None

    @property
    def templates_per_s(self) -> float:
        """Unique templates classified per second (0 when no time was measured)."""
        return len(self.verdicts) / self.seconds if self.seconds > 0 else 0.0

    def answers(self, eval_set: EvalSet) -> bool:
        """True when the method answered every key the set depends on."""
        return all(key in self.verdicts for keys in eval_set.keys for key in keys)

    def predictions(self, eval_set: EvalSet) -> np.ndarray:
        """0/1 per item: abnormal when any of the item's keys was judged abnormal."""
        return np.asarray([int(any(self.verdicts[key]["label"] for key in keys)) for keys in eval_set.keys],
                          dtype=int)


def item_scores(result: MethodResult, eval_set: EvalSet) -> np.ndarray:
    """Per item, the highest verdict score among its keys (an item is as abnormal as its most abnormal key); a
    missing score (no answer word among the top tokens) counts as 0."""
    return np.asarray([max(result.verdicts[key]["score"] or 0.0 for key in keys) for keys in eval_set.keys],
                      dtype=float)


def set_metrics(result: MethodResult, eval_set: EvalSet, bootstrap: BootstrapSettings) -> SetMetrics:
    """The figures of one method on one set, with intervals (see the module docstring)."""
    y_pred = result.predictions(eval_set)
    answers = [result.verdicts[key] for key in eval_set.unique_keys()]
    block = binary_metrics(eval_set.labels, y_pred)
    written = [a for a in answers if a.get("valid") is not None]  # answers with a written (format-checked) part
    if result.is_llm and written:
        valid = np.asarray([bool(a["valid"]) for a in written], dtype=bool)
        words = np.asarray([int(a.get("rationale_words") or 0) for a in written], dtype=float)
        block.update(format_valid_rate=float(valid.mean()), format_invalid=int((~valid).sum()),
                     mean_rationale_words=float(words[valid].mean()) if valid.any() else 0.0)
        if eval_set.family == "template" and len(written) == len(answers):
            block["format_invalid_abnormal"] = int(((~valid) & (eval_set.labels == 1)).sum())
        compared = [a for a in written if a["valid"] and "answer_label" in a]
        if compared:  # how often the scored verdict overrules the word the rationale ended in
            block["disagreement_rate"] = sum(a["answer_label"] != a["label"] for a in compared) / len(compared)
    else:
        block.update(format_valid_rate=None, format_invalid=None, mean_rationale_words=None)
    if answers and any(a.get("score") is not None for a in answers) and eval_set.labels.any():
        from sklearn.metrics import average_precision_score

        block["average_precision"] = float(average_precision_score(eval_set.labels, item_scores(result, eval_set)))
    block["n_templates"] = len(answers)
    def as_list(interval: tuple[float, float] | None) -> list[float] | None:
        return list(interval) if interval else None  # JSON's shape, so metrics.json reads back equal

    if eval_set.positives_expected:
        block["f1_ci"] = as_list(f1_interval(eval_set.labels, y_pred, bootstrap))
        block["macro_f1_ci"] = as_list(f1_interval(eval_set.labels, y_pred, bootstrap, statistic="macro_f1"))
    else:
        block["false_alarm_rate"] = float(y_pred.mean()) if len(y_pred) else 0.0
        block["false_alarm_rate_ci"] = as_list(rate_interval(y_pred, bootstrap))
    return block


def score(result: MethodResult, sets: Sequence[EvalSet], bootstrap: BootstrapSettings) -> dict[str, SetMetrics]:
    """Metrics of one method on every set it answered (a method that skipped a set has no entry for it)."""
    speed = round(result.templates_per_s, 4)
    return {s.name: {**set_metrics(result, s, bootstrap), "templates_per_s": speed}
            for s in sets if result.answers(s)}


@dataclass
class Evaluation:
    """One evaluation: metrics.json's content, the data, every method's verdicts and every scored set."""

    metrics: Metrics
    data: EvalData
    results: dict[str, MethodResult]
    sets: list[EvalSet]
