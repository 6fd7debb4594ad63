"""Multi-annotator review: majority with a senior tie-break, kappa as scikit-learn and statsmodels compute it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from tasks.common.errors import InputError
from tasks.correct import parse_corrections
from tasks.data.review import INSTRUCTION, agreement, load_reviews, resolve_reviews, review_folder


def write_reviews(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def fleiss_by_hand(ratings: list[list[int]], categories: int = 2) -> float:
    """Fleiss (1971) from its definition, to check the library call against."""
    n = len(ratings[0])
    counts = np.array([[row.count(c) for c in range(categories)] for row in ratings], dtype=float)
    p_i = ((counts * (counts - 1)).sum(axis=1)) / (n * (n - 1))
    p_j = counts.sum(axis=0) / counts.sum()
    p_bar, p_e = p_i.mean(), (p_j**2).sum()
    return float((p_bar - p_e) / (1 - p_e))


def test_cohen_kappa_for_two_annotators_matches_scikit_learn():
    alice = [1, 1, 0, 0, 1, 0]
    bob = [1, 0, 0, 0, 1, 1]
    templates = [f"t{i}" for i in range(6)]
    kappa, method, used = agreement({"alice": dict(zip(templates, alice, strict=True)),
                                     "bob": dict(zip(templates, bob, strict=True))})
    assert method == "cohen" and used == 6
    assert kappa == pytest.approx(cohen_kappa_score(alice, bob)) == pytest.approx(1 / 3)  # p_o 4/6, p_e 1/2


def test_fleiss_kappa_for_three_annotators_matches_statsmodels():
    ratings = [[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]  # templates × annotators
    labels = {name: {f"t{i}": row[j] for i, row in enumerate(ratings)} for j, name in enumerate("abc")}
    kappa, method, used = agreement(labels)
    table, _ = aggregate_raters(np.array(ratings), n_cat=2)
    assert method == "fleiss" and used == 5
    assert kappa == pytest.approx(fleiss_kappa(table, method="fleiss")) == pytest.approx(fleiss_by_hand(ratings))


def test_kappa_uses_only_templates_every_annotator_labelled(tmp_path: Path):
    folder = write_reviews(tmp_path / "reviews", {
        "a.csv": "template,label\nx,abnormal\ny,normal\nonly a,abnormal\n",
        "b.csv": "template,label\nx,abnormal\ny,abnormal\n",
    })
    result = review_folder(folder, senior="a")
    assert result.kappa_templates == 2
    assert result.kappa == pytest.approx(cohen_kappa_score([1, 0], [1, 1]))


def test_majority_wins_and_the_senior_breaks_ties(tmp_path: Path):
    folder = write_reviews(tmp_path / "reviews", {
        "senior.csv": "template,label,category\nlink down,normal,\ndisk gone,abnormal,hardware failure\n",
        "ann.csv": "template,label,category,note\nlink down,abnormal,network issue,flaps\ndisk gone,normal,,\n",
        "bob.csv": "template,label,category\nlink down,abnormal,Network Issue\n",
        "README.md": "ignored",
    })
    result = review_folder(folder, senior="senior", original_labels={"link down": 0})
    records = {r["input"]: r for r in result.records}
    assert records["link down"]["rectified"] == "abnormal" and records["link down"]["resolved_by"] == "majority"
    assert records["link down"]["category"] == "network issue"
    assert records["link down"]["label"] == "normal" and records["link down"]["notes"] == ["ann: flaps"]
    assert records["disk gone"]["rectified"] == "abnormal" and records["disk gone"]["resolved_by"] == "senior"
    assert records["disk gone"]["category"] == "hardware failure"
    assert "label" not in records["disk gone"], "original label unknown: not invented"
    assert result.kappa_method == "fleiss" and result.kappa_templates == 1  # only "link down" has all three
    assert result.annotators == ["ann", "bob", "senior"]


def test_a_tie_the_senior_did_not_vote_on_stays_unresolved(tmp_path: Path):
    folder = write_reviews(tmp_path / "reviews", {
        "a.csv": "template,label\nfan stopped,abnormal\n",
        "b.csv": "template,label\nfan stopped,normal\n",
    })
    result = review_folder(folder, senior="chief")
    assert result.records == []
    assert result.unresolved[0]["template"] == "fan stopped"
    assert "chief" in result.notes[0]


def test_resolution_is_a_corrections_file_in_the_patch_format(tmp_path: Path):
    folder = write_reviews(tmp_path / "reviews", {"a.csv": "template,label\nx,1\ny,0\n"})
    result = review_folder(folder, senior="a")
    assert all(r["instruction"] == INSTRUCTION for r in result.records)
    corrections = parse_corrections([(r, None) for r in result.records], folder, "review")
    assert [(c.template, c.rectified) for c in corrections] == [("x", 1), ("y", 0)]
    assert result.kappa is None and result.kappa_method is None  # one annotator: no agreement to measure


@pytest.mark.parametrize(("text", "pattern"), [
    ("template,label\nok line,normal\nbad line,broken\n", r"a\.csv:3 field 'label': unknown label 'broken'"),
    ("template,label,category\nx,abnormal,cosmic rays\n", r"a\.csv:2 field 'category': unknown category"),
    ("log,label\nx,abnormal\n", r"a\.csv:1 field 'template': missing column"),
    ("template,label\nx,abnormal\nx,normal\n", r"a\.csv:3 field 'label': template labelled twice"),
])
def test_bad_review_files_name_file_line_and_field(tmp_path: Path, text: str, pattern: str):
    folder = write_reviews(tmp_path / "reviews", {"a.csv": text})
    with pytest.raises(InputError, match=pattern):
        load_reviews(folder)


def test_an_empty_review_folder_means_no_review(tmp_path: Path):
    folder = write_reviews(tmp_path / "reviews", {"README.md": "how to review"})
    assert review_folder(folder, senior="senior") is None
    assert resolve_reviews({}, "senior").records == []
