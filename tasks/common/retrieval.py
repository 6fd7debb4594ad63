"""Retrieval of expert-labelled training templates: the most similar to a log, by TF-IDF cosine.

One index serves the retrieval baselines (knn_1: the nearest template's label; knn_vote: a
similarity-weighted vote of the k nearest) and, when enabled, the neighbours shown in prompts. It is
built from the training split only, so no test template can be retrieved. Features (`index.features`):
`word`, 1-2 grams of letter tokens (TOKEN_PATTERN: ids, numbers and `<*>` carry no meaning), `char`, 3-5
character grams within words, or `word+char`, both L2-normalised blocks side by side; sublinear TF-IDF,
cosine (scikit-learn's TfidfVectorizer, FeatureUnion and NearestNeighbors, brute force). Measured on the
whole test split, 1-NN abnormal-class F1: word 1-2 grams 0.629 BGL / 0.469 Spirit, char 3-5 grams
0.527 / 0.456.

What a prompt shows is the index's own policy, set at build time from params.yaml `index` (k, floor,
same_system, contrastive; see TemplateIndex), so distill, evaluate, the client, detect and the pyfunc model
all show the same neighbours. Measured on the validation fold against the training split (issue 18,
tasks/evaluation/retrieval_quality.py): the old retrieval (word, all systems, no floor) showed every BGL
prompt 3 neighbours, 80% of them from Spirit, most at cosine 0 (a hex or register dump has no word); with
word+char, the same system and a 0.1 floor, the abnormal templates that see a same-label neighbour go from
0.77 to 0.77 BGL / 0.71 to 0.81 Spirit, and to 0.85 / 1.00 when contrastive, at no cost in the nearest
neighbour's agreement (0.92 / 0.85).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.errors import InputError
from tasks.common.prompt import LETTER_WORD


@dataclass(frozen=True)
class Neighbour:
    """A labelled training template found for a query: its text, dataset, 0/1 label and cosine similarity."""

    template: str
    dataset: str
    label: int
    similarity: float


INDEX_FILE, INDEX_META = "index.pkl", "index.json"  # in the index stage's folder (models/index)
# Words of letters only: the tokens of the TF-IDF baseline and of the retrieval index.
TOKEN_PATTERN = LETTER_WORD  # one owner: the verdict rule's first stage uses the same letter words


# The retriever's features (`index.features`): word 1-2 grams (letters only), character 3-5 grams within word
# boundaries (which also match `mount:`/`mountd` and path or hex fragments), or both: the two L2-normalised TF-IDF
# blocks side by side (scikit-learn FeatureUnion), so a cosine weighs words and character grams equally.
FEATURES = {"word": {"analyzer": "word", "token_pattern": TOKEN_PATTERN, "ngram_range": (1, 2)},
            "char": {"analyzer": "char_wb", "ngram_range": (3, 5)}}
WORD_CHAR = "word+char"
FEATURE_CHOICES = (*FEATURES, WORD_CHAR)


def make_vectorizer(features: str) -> Any:
    """An unfitted sublinear TF-IDF vectorizer for `features` (a key of FEATURES or WORD_CHAR); ValueError
    for any other name."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    if features == WORD_CHAR:
        return FeatureUnion([(name, TfidfVectorizer(**FEATURES[name], lowercase=True, sublinear_tf=True))
                             for name in ("word", "char")])
    if features not in FEATURES:
        raise ValueError(f"unknown index features {features!r}; expected one of {list(FEATURE_CHOICES)}")
    return TfidfVectorizer(**FEATURES[features], lowercase=True, sublinear_tf=True)


def system_key(dataset: str | None) -> str:
    """How datasets are compared: case-insensitive, surrounding spaces ignored (`BGL` is `bgl`)."""
    return str(dataset or "").strip().lower()


class TemplateIndex:
    """TF-IDF over labelled templates (`features`: a key of FEATURES or `word+char`) with brute-force cosine
    nearest neighbours (scikit-learn), and the policy of what a prompt shows, fixed when the index is built
    (the index stage, `index` in params.yaml) so every reader applies the same one:

    - `k`: neighbours per prompt (0: none);
    - `floor`: a neighbour's cosine similarity is at least this (and above 0), else the prompt shows fewer or
      none; None (an index pickled before the policy existed) shows the k nearest whatever their similarity;
    - `same_system`: neighbours come from the query's own dataset when the index holds labelled templates of
      it (compared by `system_key`); a dataset it does not hold (e.g. Thunderbird) searches all of them;
    - `contrastive`: the nearest abnormal and the nearest normal above the floor first, then the most similar
      others up to k; shown most similar first.
    """

    def __init__(self, templates: Sequence[str], labels: Sequence[int], datasets: Sequence[str],
                 features: str = "word", *, k: int = 3, floor: float | None = None, same_system: bool = False,
                 contrastive: bool = False) -> None:
        from sklearn.neighbors import NearestNeighbors

        if not len(templates) == len(labels) == len(datasets) or len(templates) == 0:
            raise ValueError("an index needs one label and one dataset per template, and at least one template")
        if k < 0 or (floor is not None and not 0 <= floor <= 1):
            raise ValueError(f"index policy out of range: k {k} (>= 0), floor {floor} (in [0, 1] or None)")
        self.templates = [str(t) for t in templates]
        self.labels = np.asarray(labels, dtype=int)
        self.datasets = [str(d) for d in datasets]
        self.features = features
        self.vectorizer = make_vectorizer(features)
        matrix = self.vectorizer.fit_transform(self.templates)
        self.nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(matrix)
        self.k, self.floor, self.same_system, self.contrastive = int(k), floor, bool(same_system), bool(contrastive)

    def __len__(self) -> int:
        return len(self.templates)

    def policy(self) -> dict[str, Any]:
        """The prompt policy this index applies; defaults that reproduce the old behaviour for an index pickled
        before the policy existed (k 3, no floor, all systems, not contrastive: issue 18)."""
        return {"k": int(getattr(self, "k", 3)), "floor": getattr(self, "floor", None),
                "same_system": bool(getattr(self, "same_system", False)),
                "contrastive": bool(getattr(self, "contrastive", False)),
                "features": str(getattr(self, "features", "word"))}

    def search(self, queries: Sequence[str], k: int, *, exclude_same: bool = False) -> list[list[Neighbour]]:
        """The `k` nearest labelled templates of each query over all systems, most similar first, with no
        floor (the retrieval baselines and rationale grounding; prompts use `prompt_neighbours`).

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

    def shown(self, queries: Sequence[str], datasets: Sequence[str | None] | None = None, k: int | None = None,
              *, exclude_same: bool = False, below: float | None = None,
              contrastive: bool | None = None) -> list[list[Neighbour]]:
        """The neighbours a prompt shows for each query under this index's policy (see the class), most similar
        first. `datasets`: the query's system, one per query (None: unknown, all systems). `k` None: the
        index's own. `exclude_same` drops the query's own text; `below` drops neighbours at least this similar
        (training: near-duplicates would leak the label). `contrastive` None: the index's own (False: the plain
        nearest, for the knn baselines' vote). ValueError when `datasets` has another length."""
        policy = self.policy()
        k = policy["k"] if k is None else int(k)
        datasets = [None] * len(queries) if datasets is None else list(datasets)
        if len(datasets) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(datasets)} datasets")
        if k <= 0 or not queries:
            return [[] for _ in queries]
        floor, held = policy["floor"], {system_key(d) for d in self.datasets}
        distances, indices = self.nn.kneighbors(self.vectorizer.transform([str(q) for q in queries]),
                                                n_neighbors=len(self))
        out = []
        for query, dataset, row_d, row_i in zip(queries, datasets, distances, indices, strict=True):
            system = system_key(dataset)
            own = policy["same_system"] and system in held
            found = []
            for d, i in zip(row_d, row_i, strict=True):
                similarity = float(1.0 - d)
                if floor is not None and (similarity < floor or similarity <= 0):
                    break  # sorted by similarity: nothing further qualifies
                if (own and system_key(self.datasets[i]) != system) or (below is not None and similarity >= below) \
                        or (exclude_same and self.templates[i].strip() == str(query).strip()):
                    continue
                found.append(Neighbour(self.templates[i], self.datasets[i], int(self.labels[i]), similarity))
            pick = policy["contrastive"] if contrastive is None else contrastive
            out.append(contrastive_pick(found, k) if pick else found[:k])
        return out

    def prompt_neighbours(self, queries: Sequence[str], datasets: Sequence[str | None] | None = None,
                          k: int | None = None, **options: Any) -> list[list[tuple[str, int]]]:
        """What a prompt shows for each query: (template, 0/1 label) pairs, most similar first, under the
        index's policy (`shown`; tasks.common.prompt renders them); `k` 0 gives empty lists."""
        return [[(n.template, n.label) for n in found] for found in self.shown(queries, datasets, k, **options)]

    def vote(self, queries: Sequence[str], k: int, datasets: Sequence[str | None] | None = None) -> np.ndarray:
        """Similarity-weighted share of abnormal labels among the k nearest, in [0, 1], per query (0 with none).
        `datasets` None: over all systems, no floor; given: under the index's same-system filter and floor
        (`shown`, never contrastive)."""
        scores = []
        found_all = (self.search(queries, k) if datasets is None
                     else self.shown(queries, datasets, k, contrastive=False))
        for found in found_all:
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


def contrastive_pick(found: Sequence[Neighbour], k: int) -> list[Neighbour]:
    """From candidates sorted most similar first: the nearest abnormal and the nearest normal (when present),
    then the most similar others up to `k`; returned most similar first. With k 1, the nearest alone."""
    if k <= 1:
        return list(found[:k])
    first = {}
    for position, n in enumerate(found):
        first.setdefault(n.label, position)
    chosen = sorted(first.values())
    chosen += [p for p in range(len(found)) if p not in chosen][:max(0, k - len(chosen))]
    return [found[p] for p in sorted(chosen)[:k]]
