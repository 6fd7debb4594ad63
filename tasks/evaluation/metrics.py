"""Scoring: precision, recall, F1 and the confusion matrix per method and test set (abnormal = positive).

Each unique template is classified once per method; verdicts are mapped onto sessions (a session is abnormal
if any of its templates is). Session sets are also scored on the unseen-only subset (training templates
removed). An unparseable answer counts as normal and is also counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.common.contracts import SetMetrics
from tasks.evaluation.testdata import SESSION_SETS, EvalData, unseen_only


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], *, valid: Sequence[bool] | None = None,
                   rationale_words: Sequence[int] | None = None) -> SetMetrics:
    """Precision, recall, F1 and the confusion matrix with abnormal (1) as the positive class.

    `valid` marks answers that followed the format; invalid ones are already counted as normal in `y_pred`
    and are reported apart (how many, and how many of them hid a real anomaly). Rule baselines pass None.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

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
                   accuracy=float(accuracy_score(y_true_a, y_pred_a)), confusion_matrix=cm.tolist())
    else:
        out.update(precision=0.0, recall=0.0, f1=0.0, accuracy=0.0, confusion_matrix=[[0, 0], [0, 0]])
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
    """One method's verdict on every unique (dataset, template), and how it was produced."""

    name: str
    verdicts: dict[tuple[str, str], dict[str, Any]]  # label, valid (None for rules), rationale_words, ...
    seconds: float
    engine: str
    is_llm: bool
    notes: list[str] = field(default_factory=list)

    @property
    def templates_per_s(self) -> float:
        """Unique templates classified per second of generation (0 when no time was measured)."""
        return len(self.verdicts) / self.seconds if self.seconds > 0 else 0.0

def score(result: MethodResult, data: EvalData) -> dict[str, SetMetrics]:
    """Metrics of one method on every test set (template, session, session unseen-only)."""
    speed = {"templates_per_s": round(result.templates_per_s, 4)}
    blocks: dict[str, SetMetrics] = {}
    for dataset, frame in data.templates.items():
        got = [result.verdicts[(dataset, t)] for t in frame["template"]]
        blocks[f"template_{dataset}"] = {**_metrics(frame["label"].tolist(), got, result.is_llm), **speed}
    for name, sessions in data.sessions.items():
        prompt_dataset = SESSION_SETS[name][2]
        for suffix, subset in (("", sessions), ("_unseen", unseen_only(sessions, data.seen))):
            unique = sorted({t for s in subset for t in s["templates"]})
            got = {t: result.verdicts[(prompt_dataset, t)] for t in unique}
            y_pred = [int(any(got[t]["label"] for t in s["templates"])) for s in subset]
            block = binary_metrics([s["label"] for s in subset], y_pred)
            template_stats = _metrics([0] * len(unique), list(got.values()), result.is_llm)
            for key in ("format_valid_rate", "format_invalid", "mean_rationale_words"):
                block[key] = template_stats[key]
            blocks[f"session_{name}{suffix}"] = {**block, "n_templates": len(unique), **speed}
    return blocks

def _metrics(labels: list[int], verdicts: list[dict[str, Any]], is_llm: bool) -> SetMetrics:
    return binary_metrics(labels, [v["label"] for v in verdicts],
                          valid=[bool(v["valid"]) for v in verdicts] if is_llm else None,
                          rationale_words=[int(v["rationale_words"] or 0) for v in verdicts] if is_llm else None)
