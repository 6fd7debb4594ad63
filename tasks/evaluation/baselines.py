"""The non-LLM baselines of the evaluation table: keyword rules, TF-IDF + logistic regression, and `classical`,
the strongest classical detector built here on training data alone (issue 18, item 1).

The LLM baselines (zero-shot base model, SFT-only adapter) run through tasks.evaluation.inference like the candidate.
keywords and tfidf_lr see exactly the training templates the LLM saw (data/split/train.parquet); `classical` sees
those and the validation fold (every labelled template that is not a test item) and chooses its C and its
threshold per dataset on cross-fitted (out-of-fold) scores of them, never on a test item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.retrieval import TOKEN_PATTERN
from tasks.common.settings import ClassicalSettings
from tasks.data.teachers import FAILURE_WORDS as FAILURE_WORDS
from tasks.data.teachers import keyword_hits as keyword_hits
from tasks.evaluation.calibration import choose_threshold, threshold_interval

# The keyword rule: a template is abnormal when it holds a word of the keyword list. The list has one owner,
# tasks.data.teachers.FAILURE_WORDS (re-exported here), shared with the rationale checks and the teachers.


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


def knn_1_predict(index: Any, templates: Sequence[str], datasets: Sequence[str] | None = None) -> np.ndarray:
    """The label of the nearest labelled training template (tasks.common.retrieval.TemplateIndex), per template;
    normal when none qualifies. `datasets` (one per template) applies the index's same-system filter and
    similarity floor, as the prompts do (never contrastive): measured on the validation fold (issue 18), knn_1
    F1 0.571 BGL / 0.558 Spirit with them against 0.538 / 0.480 without (word+char features)."""
    found = (index.search(list(templates), 1) if datasets is None
             else index.shown(list(templates), list(datasets), 1, contrastive=False))
    return np.array([near[0].label if near else 0 for near in found], dtype=int)


def knn_vote_scores(index: Any, templates: Sequence[str], k: int,
                    datasets: Sequence[str] | None = None) -> np.ndarray:
    """Similarity-weighted share of abnormal labels among the k nearest training templates (0 with none);
    abnormal at >= 0.5. `datasets`: as in `knn_1_predict`."""
    return index.vote(list(templates), k, None if datasets is None else list(datasets))


POOLED = "*"  # the classical model of every training template: the stated default for a system with none


def keyword_column(templates: Sequence[str]) -> np.ndarray:
    """The keyword rule (`keyword_predict`) as one 0/1 feature column, shape (n, 1)."""
    return keyword_predict(list(templates)).reshape(-1, 1).astype(float)


def classical_features(settings: ClassicalSettings) -> Any:
    """Unfitted features of the classical detector: sublinear TF-IDF of word 1..`word_ngram_max` grams (letter
    words, TOKEN_PATTERN) and of character `char_ngrams` grams within word boundaries, beside the keyword flag
    (a scikit-learn FeatureUnion; sparse, one row per template)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion
    from sklearn.preprocessing import FunctionTransformer

    low, high = settings.char_ngrams
    return FeatureUnion([
        ("word", TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN,
                                 ngram_range=(1, settings.word_ngram_max), sublinear_tf=True)),
        ("char", TfidfVectorizer(lowercase=True, analyzer="char_wb", ngram_range=(low, high), sublinear_tf=True)),
        ("keyword", FunctionTransformer(keyword_column)),
    ])


def _logistic(c: float, seed: int) -> Any:
    """Class-balanced L2 logistic regression. liblinear: on these ~600 x 24,000 sparse rows it fits in 0.02-0.09 s
    against 0.9-1.6 s for lbfgs (measured here, 2 busy cores), which keeps the cross-fitting cheap."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=float(c), class_weight="balanced", solver="liblinear", max_iter=5000,
                              random_state=seed)


@dataclass
class ClassicalFit:
    """One scope's classical detector (`scope`: a dataset, or POOLED), chosen on out-of-fold scores.

    `c` maximises the out-of-fold average precision over `settings.C` (threshold-free, steadier than the
    best F1 on a few dozen anomalies); `threshold` maximises out-of-fold abnormal-class F1 at that C
    (tasks.evaluation.calibration.choose_threshold, ties to the higher threshold). Its spread:
    `threshold_ci`, the percentile interval of the same choice over stratified bootstrap resamples of the
    out-of-fold scores; `fold_thresholds`, the choice on each fold's held-out scores alone. `oof` holds the
    out-of-fold figures at the chosen threshold (`average_precision`, `precision`, `recall`, `f1`).
    """

    scope: str
    n: int
    abnormal: int
    folds: int
    c: float
    threshold: float
    threshold_ci: list[float] | None
    fold_thresholds: list[float]
    oof: dict[str, float]
    average_precision_by_c: dict[str, float]
    seconds: float
    model: Any = field(default=None, repr=False)  # the pipeline refitted on every template of the scope

    def to_dict(self) -> dict[str, Any]:
        """The fit as plain data (metrics.json `classical`), without the model."""
        return {k: v for k, v in asdict(self).items() if k != "model"}

    def scores(self, templates: Sequence[str]) -> np.ndarray:
        """P(abnormal) per template from the refitted model."""
        return np.asarray(self.model.predict_proba(list(templates))[:, 1], dtype=float)


def fit_classical_scope(scope: str, templates: Sequence[str], labels: Sequence[int], settings: ClassicalSettings,
                        *, confidence: float, seed: int) -> ClassicalFit:
    """Cross-fit C and the threshold on `templates` (one scope's labelled training templates), then refit.

    Folds: StratifiedKFold(settings.folds, shuffled, seeded), fewer when the scope holds fewer anomalies (at
    least 2). The features are fitted inside each fold, so a held-out template never shapes its own score.
    Raises ValueError when the scope lacks 2 templates of each label.
    """
    import time

    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline

    started = time.perf_counter()
    texts, y = np.asarray(list(templates), dtype=object), np.asarray(labels, dtype=int)
    folds = min(settings.folds, int(y.sum()), int((y == 0).sum()))
    if folds < 2:
        raise ValueError(f"{scope}: the classical detector needs 2 templates of each label, found "
                         f"{int(y.sum())} abnormal and {int((y == 0).sum())} normal")
    oof = np.zeros((len(settings.C), len(y)))
    held_out = []
    for fit_idx, out_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, y):
        features = classical_features(settings)
        x_fit = features.fit_transform(texts[fit_idx].tolist())
        x_out = features.transform(texts[out_idx].tolist())
        for i, c in enumerate(settings.C):
            oof[i, out_idx] = _logistic(c, seed).fit(x_fit, y[fit_idx]).predict_proba(x_out)[:, 1]
        held_out.append(out_idx)
    ap = [float(average_precision_score(y, row)) for row in oof]
    best = int(np.argmax(ap))  # the first (smallest, most regularised) C among equals
    scores = oof[best]
    calibration = choose_threshold(y, scores)
    model = make_pipeline(classical_features(settings), _logistic(settings.C[best], seed))
    model.fit(texts.tolist(), y)
    return ClassicalFit(
        scope=scope, n=len(y), abnormal=int(y.sum()), folds=folds, c=float(settings.C[best]),
        threshold=calibration.threshold,
        threshold_ci=threshold_interval(y, scores, settings.threshold_resamples, confidence, seed),
        fold_thresholds=[choose_threshold(y[idx], scores[idx]).threshold for idx in held_out if y[idx].any()],
        oof={"average_precision": calibration.average_precision, "precision": calibration.precision,
             "recall": calibration.recall, "f1": calibration.f1},
        average_precision_by_c={f"{c:g}": a for c, a in zip(settings.C, ap, strict=True)},
        seconds=round(time.perf_counter() - started, 2), model=model)


@dataclass
class ClassicalDetector:
    """Per-dataset classical fits, and the POOLED fit that answers for a dataset without its own."""

    fits: dict[str, ClassicalFit]

    def fit_for(self, dataset: str) -> ClassicalFit:
        """The dataset's own fit, else the pooled one."""
        return self.fits.get(dataset) or self.fits[POOLED]

    def scores(self, keys: Sequence[tuple[str, str]]) -> np.ndarray:
        """P(abnormal) per (dataset, template) key, each from its dataset's model."""
        out = np.zeros(len(keys))
        for dataset in dict.fromkeys(d for d, _ in keys):
            idx = [i for i, (d, _) in enumerate(keys) if d == dataset]
            out[idx] = self.fit_for(dataset).scores([keys[i][1] for i in idx])
        return out

    def predict(self, keys: Sequence[tuple[str, str]]) -> np.ndarray:
        """0/1 per key: its score against its dataset's cross-fitted threshold (abnormal at or above it)."""
        scores = self.scores(keys)
        thresholds = np.asarray([self.fit_for(d).threshold for d, _ in keys], dtype=float)
        return (scores >= thresholds).astype(int) if len(keys) else np.array([], dtype=int)


def fit_classical(training: pd.DataFrame, settings: ClassicalSettings, *, confidence: float,
                  seed: int) -> ClassicalDetector:
    """The classical detector of `training` (dataset, template, label: every labelled template that is not a test
    item): one fit per dataset with 2+ templates of each label, and the POOLED fit over all of them."""
    fits: dict[str, ClassicalFit] = {}
    for dataset, part in training.groupby("dataset", sort=True):
        if part["label"].sum() >= 2 and (part["label"] == 0).sum() >= 2:
            fits[str(dataset)] = fit_classical_scope(str(dataset), part["template"], part["label"], settings,
                                                     confidence=confidence, seed=seed)
    fits[POOLED] = fit_classical_scope(POOLED, training["template"], training["label"], settings,
                                       confidence=confidence, seed=seed)
    return ClassicalDetector(fits)
