"""The non-LLM baselines of the evaluation table: keyword rules and TF-IDF + logistic regression.

The LLM baselines (zero-shot base model, SFT-only adapter) run through tasks.evaluation.inference like the candidate.
Both baselines here see exactly the training templates the LLM saw (data/split/train.parquet).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.common.retrieval import TOKEN_PATTERN

# A transparent rule set: a template is abnormal when it contains any of these words (case-insensitive,
# at word starts, so "failed"/"failure" match "fail"). Chosen from the words operators grep for,
# not tuned on the test set; it is meant to show what naive rules catch and what they miss.
FAILURE_WORDS: tuple[str, ...] = (
    "abort", "alert", "cannot", "can't", "corrupt", "crash", "critical", "denied", "died", "down",
    "err", "exception", "fail", "fatal", "fault", "halt", "illegal", "invalid", "kill", "lost",
    "panic", "refused", "severe", "timed out", "timeout", "unable", "unavailable", "unreachable",
    "violation", "warn",
)
_KEYWORD_RE = re.compile(r"(?<![A-Za-z])(" + "|".join(re.escape(w) for w in FAILURE_WORDS) + ")", re.IGNORECASE)


def keyword_hits(template: str) -> list[str]:
    """The failure words found in a template (lower-cased), in order."""
    return [m.group(1).lower() for m in _KEYWORD_RE.finditer(template or "")]


def keyword_predict(templates: Sequence[str]) -> np.ndarray:
    """1 (abnormal) for every template containing a failure word, else 0."""
    return np.array([1 if keyword_hits(t) else 0 for t in templates], dtype=int)


def fit_tfidf_lr(templates: Sequence[str], labels: Sequence[int], *, ngram_max: int = 2, c: float = 1.0,
                 seed: int = 42) -> Any:
    """TF-IDF over word tokens (placeholders and hex dropped) + class-balanced logistic regression.

    Balanced class weights because training keeps few abnormal templates (paper: 15%); without them
    the model learns to say "normal".
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    y = np.asarray(labels, dtype=int)
    if len(set(y.tolist())) < 2:
        raise ValueError("TF-IDF + LR needs training templates of both labels")
    vectorizer = TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN,
                                 ngram_range=(1, int(ngram_max)), sublinear_tf=True)
    model = LogisticRegression(C=float(c), class_weight="balanced", max_iter=2000, random_state=seed)
    pipeline = make_pipeline(vectorizer, model)
    pipeline.fit(list(templates), y)
    return pipeline


def tfidf_lr_scores(model: Any, templates: Sequence[str]) -> np.ndarray:
    """P(abnormal) of a fitted TF-IDF + logistic regression pipeline, one per template."""
    return np.asarray(model.predict_proba(list(templates))[:, 1], dtype=float)


def tfidf_lr_predict(model: Any, templates: Sequence[str]) -> np.ndarray:
    """0/1 verdicts of a fitted TF-IDF + logistic regression pipeline, one per template."""
    return np.asarray(model.predict(list(templates)), dtype=int)


def knn_1_predict(index: Any, templates: Sequence[str]) -> np.ndarray:
    """The label of the nearest labelled training template (tasks.common.retrieval.TemplateIndex), per template."""
    return np.array([found[0].label if found else 0 for found in index.search(list(templates), 1)], dtype=int)


def knn_vote_scores(index: Any, templates: Sequence[str], k: int) -> np.ndarray:
    """Similarity-weighted share of abnormal labels among the k nearest training templates; abnormal at >= 0.5."""
    return index.vote(list(templates), k)
