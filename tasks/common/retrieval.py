"""Retrieval of expert-labelled training templates: the k most similar to a log, by TF-IDF cosine.

One index serves the retrieval baselines (knn_1: the nearest template's label; knn_vote: a
similarity-weighted vote of the k nearest) and, when enabled, the neighbours shown in prompts. It is
built from the training split only, so no test template can be retrieved. Features (`index.features`):
`word`, 1-2 grams of letter tokens (TOKEN_PATTERN: ids, numbers and `<*>` carry no meaning; the default),
or `char`, 3-5 character grams within words; sublinear TF-IDF, cosine (scikit-learn's TfidfVectorizer and
NearestNeighbors, brute force). Measured on the whole test split, 1-NN abnormal-class F1: word 1-2 grams
0.629 BGL / 0.469 Spirit, char 3-5 grams 0.527 / 0.456.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.errors import InputError


@dataclass(frozen=True)
class Neighbour:
    """A labelled training template found for a query: its text, dataset, 0/1 label and cosine similarity."""

    template: str
    dataset: str
    label: int
    similarity: float


INDEX_FILE, INDEX_META = "index.pkl", "index.json"  # in the index stage's folder (models/index)
# Words of letters only: the tokens of the TF-IDF baseline and of the retrieval index.
TOKEN_PATTERN = r"(?u)\b[a-zA-Z][a-zA-Z_]+\b"


# The retriever's features (`index.features`): word 1-2 grams (letters only) or character 3-5 grams within
# word boundaries, which also match `mount:`/`mountd` and path or hex fragments.
FEATURES = {"word": {"analyzer": "word", "token_pattern": TOKEN_PATTERN, "ngram_range": (1, 2)},
            "char": {"analyzer": "char_wb", "ngram_range": (3, 5)}}


class TemplateIndex:
    """TF-IDF over labelled templates (`features`: a key of FEATURES) with brute-force cosine nearest
    neighbours (scikit-learn)."""

    def __init__(self, templates: Sequence[str], labels: Sequence[int], datasets: Sequence[str],
                 features: str = "word") -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.neighbors import NearestNeighbors

        if not len(templates) == len(labels) == len(datasets) or len(templates) == 0:
            raise ValueError("an index needs one label and one dataset per template, and at least one template")
        if features not in FEATURES:
            raise ValueError(f"unknown index features {features!r}; expected one of {sorted(FEATURES)}")
        self.templates = [str(t) for t in templates]
        self.labels = np.asarray(labels, dtype=int)
        self.datasets = [str(d) for d in datasets]
        self.features = features
        self.vectorizer = TfidfVectorizer(**FEATURES[features], lowercase=True, sublinear_tf=True)
        matrix = self.vectorizer.fit_transform(self.templates)
        self.nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(matrix)

    def __len__(self) -> int:
        return len(self.templates)

    def search(self, queries: Sequence[str], k: int, *, exclude_same: bool = False) -> list[list[Neighbour]]:
        """The `k` nearest labelled templates of each query, most similar first.

        `exclude_same` drops a neighbour whose text equals the query after strip (training: an example never
        sees itself as its own neighbour).
        """
        if not queries:
            return []
        extra = 1 if exclude_same else 0
        distances, indices = self.nn.kneighbors(self.vectorizer.transform([str(q) for q in queries]),
                                                n_neighbors=min(len(self), k + extra))
        out = []
        for query, row_d, row_i in zip(queries, distances, indices, strict=True):
            found = [Neighbour(self.templates[i], self.datasets[i], int(self.labels[i]), float(1.0 - d))
                     for d, i in zip(row_d, row_i, strict=True)
                     if not (exclude_same and self.templates[i].strip() == str(query).strip())]
            out.append(found[:k])
        return out

    def prompt_neighbours(self, queries: Sequence[str], k: int) -> list[list[tuple[str, int]]]:
        """What a prompt shows for each query: its `k` nearest (template, 0/1 label) pairs, most similar first
        (tasks.common.prompt renders them); `k` 0 gives empty lists."""
        if k <= 0:
            return [[] for _ in queries]
        return [[(n.template, n.label) for n in found] for found in self.search(queries, k)]

    def vote(self, queries: Sequence[str], k: int) -> np.ndarray:
        """Similarity-weighted share of abnormal labels among the k nearest, in [0, 1], per query."""
        scores = []
        for found in self.search(queries, k):
            weights = np.array([max(n.similarity, 1e-9) for n in found])
            labels = np.array([n.label for n in found], dtype=float)
            scores.append(float((weights * labels).sum() / weights.sum()) if len(found) else 0.0)
        return np.asarray(scores)

    def save(self, path: str | Path) -> None:
        """Pickle the fitted index (vectorizer, neighbours, templates, labels) to `path`."""
        with Path(path).open("wb") as handle:
            pickle.dump(self, handle, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def load(path: str | Path) -> TemplateIndex:
        """An index saved by `save`; InputError naming the file when it is missing or not an index."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "retrieval index not found", hint="run `dvc repro` (the stage that builds it)")
        with path.open("rb") as handle:
            index: Any = pickle.load(handle)  # our own DVC-tracked output
        if not isinstance(index, TemplateIndex):
            raise InputError(path, f"not a retrieval index (found {type(index).__name__})")
        return index
