"""Evaluation metrics on hand-made predictions, checked against scikit-learn; answers that break the format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from tasks.evaluation.baselines import FAILURE_WORDS, fit_tfidf_lr, keyword_hits, keyword_predict, tfidf_lr_predict
from tasks.evaluation.inference import cut_at_stop, to_prediction
from tasks.evaluation.intervals import BootstrapSettings
from tasks.evaluation.metrics import MethodResult, binary_metrics, score
from tasks.evaluation.testdata import EvalData, cap_sessions, cap_stratified, unseen_only

Y_TRUE = [1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
Y_PRED = [1, 0, 1, 0, 1, 0, 0, 1, 0, 1]


def test_precision_recall_f1_and_confusion_match_scikit_learn() -> None:
    m = binary_metrics(Y_TRUE, Y_PRED)
    assert m["precision"] == pytest.approx(precision_score(Y_TRUE, Y_PRED)) == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(recall_score(Y_TRUE, Y_PRED)) == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED)) == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == confusion_matrix(Y_TRUE, Y_PRED).tolist() == [[4, 2], [1, 3]]
    assert (m["n"], m["n_abnormal"]) == (10, 4)
    assert m["format_valid_rate"] is None  # a rule baseline has no answer format


def test_no_predicted_anomaly_gives_zero_precision_not_an_error() -> None:
    m = binary_metrics([1, 0, 0], [0, 0, 0])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert binary_metrics([], [])["n"] == 0


COMPLETIONS = {
    "valid abnormal": ("<think>RAS KERNEL FATAL: a machine check</think><answer>abnormal</answer>", 1, True),
    "valid normal, odd casing": ("<think>routine info</think><answer> Normal </answer>", 0, True),
    "empty string": ("", 0, False),
    "garbage": ("The log is abnormal!!! ¿¿ \x00", 0, False),
    "missing think": ("<answer>abnormal</answer>", 0, False),
    "missing answer tags": ("<think>looks bad</think> abnormal", 0, False),
    "repeated answer": ("<think>x</think><answer>abnormal</answer><answer>normal</answer>", 0, False),
    "answer outside vocabulary": ("<think>x</think><answer>maybe</answer>", 0, False),
}


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_any_model_output_reads_as_a_verdict_without_raising(case: str) -> None:
    completion, label, valid = COMPLETIONS[case]
    p = to_prediction("ciod: failed to read message prefix", "bgl", completion)
    assert (p.label, p.valid) == (label, valid)
    assert p.rationale_words == (len(p.rationale.split()) if valid else 0)


def test_none_completion_is_an_invalid_normal() -> None:
    p = to_prediction("x", "bgl", None)  # type: ignore[arg-type]
    assert (p.label, p.valid, p.completion) == (0, False, "")


def test_unparseable_answers_count_as_normal_and_are_reported_apart() -> None:
    texts = [COMPLETIONS[c][0] for c in COMPLETIONS]
    preds = [to_prediction(f"t{i}", "bgl", t) for i, t in enumerate(texts)]
    y_true = [1, 0, 1, 1, 0, 1, 0, 0]
    m = binary_metrics(y_true, [p.label for p in preds], valid=[p.valid for p in preds],
                       rationale_words=[p.rationale_words for p in preds])
    assert m["format_invalid"] == 6
    assert m["format_valid_rate"] == pytest.approx(2 / 8)
    # three true anomalies got unreadable answers: counted as normal (missed), and counted apart
    assert m["format_invalid_abnormal"] == 3
    assert m["recall"] == pytest.approx(recall_score(y_true, [p.label for p in preds])) == pytest.approx(1 / 4)
    assert m["mean_rationale_words"] == pytest.approx((6 + 2) / 2)


def test_generation_is_cut_after_the_answer_like_a_stop_string() -> None:
    assert cut_at_stop("<think>a</think><answer>normal</answer>\nmore text") == \
        "<think>a</think><answer>normal</answer>"
    assert cut_at_stop("no end") == "no end"


def _data() -> EvalData:
    train = pd.DataFrame({"dataset": ["bgl", "bgl"], "template": ["seen normal", "seen abnormal"], "label": [0, 1]})
    test = {"bgl": pd.DataFrame({"dataset": ["bgl"] * 3, "template": ["a", "b", "c"], "label": [1, 0, 0]})}
    sessions = {
        "bgl2k": [
            {"id": "0", "templates": ["a", "seen normal", "b"], "line_labels": [1, 0, 0], "label": 1},
            {"id": "1", "templates": ["seen abnormal", "b"], "line_labels": [1, 0], "label": 1},
            {"id": "2", "templates": ["seen normal"], "line_labels": [0], "label": 0},
        ],
        "hdfs": [
            {"id": "blk_1", "templates": ["x", "y"], "line_labels": None, "label": 1},
            {"id": "blk_2", "templates": ["y", "seen normal"], "line_labels": None, "label": 0},
        ],
    }
    return EvalData(train=train, templates=test, sessions=sessions, seen={"seen normal", "seen abnormal"})


def test_unseen_only_drops_training_templates_and_relabels_windows() -> None:
    data = _data()
    windows = unseen_only(data.sessions["bgl2k"], data.seen)
    # window 1 loses its only abnormal line (a seen template) and becomes normal; window 2 is empty and dropped
    assert [(w["id"], w["templates"], w["label"]) for w in windows] == [("0", ["a", "b"], 1), ("1", ["b"], 0)]
    # sessions without line labels are kept only when no template was seen
    assert [s["id"] for s in unseen_only(data.sessions["hdfs"], data.seen)] == ["blk_1"]


BOOTSTRAP = BootstrapSettings(resamples=1000, confidence=0.95, seed=7)


def keys_of(data: EvalData) -> list[tuple[str, str]]:
    return list(dict.fromkeys(k for s in data.sets() for k in s.unique_keys()))


def test_session_is_abnormal_when_any_of_its_templates_is() -> None:
    data = _data()
    verdicts = {item: {"label": int(item[1] in {"a", "x", "seen abnormal"}), "valid": True, "rationale_words": 3}
                for item in keys_of(data)}
    verdicts[("bgl", "b")]["valid"] = False  # an unreadable answer on a template used in sessions
    blocks = score(MethodResult("m", verdicts, 1.0, "test", True), data.sets(), BOOTSTRAP)
    assert blocks["template_bgl"]["f1"] == 1.0
    assert blocks["session_bgl2k"]["confusion_matrix"] == [[1, 0], [0, 2]]
    assert blocks["session_bgl2k"]["format_invalid"] == 1
    assert blocks["session_bgl2k_unseen"]["n"] == 2
    assert blocks["session_hdfs"]["confusion_matrix"] == [[1, 0], [0, 1]]
    assert blocks["session_hdfs_unseen"]["n"] == 1
    assert set(blocks) == {"template_bgl", "session_bgl2k", "session_bgl2k_unseen", "session_hdfs",
                           "session_hdfs_unseen"}


def test_items_are_classified_once_per_dataset_and_template() -> None:
    items = keys_of(_data())
    assert len(items) == len(set(items))
    assert ("bgl", "b") in items and ("hdfs", "y") in items and ("bgl", "seen normal") in items


def test_cap_is_seeded_and_keeps_the_label_mix() -> None:
    frame = pd.DataFrame({"template": [f"t{i}" for i in range(100)], "label": [1] * 20 + [0] * 80})
    a, b = cap_stratified(frame, 10, seed=1), cap_stratified(frame, 10, seed=1)
    assert a.equals(b) and len(a) == 10 and int(a["label"].sum()) == 2
    assert cap_stratified(frame, None, seed=1) is frame
    sessions = [{"id": str(i), "label": int(i < 5), "templates": []} for i in range(20)]
    assert sum(s["label"] for s in cap_sessions(sessions, 4, seed=0)) == 1
    rare = pd.DataFrame({"template": [f"t{i}" for i in range(100)], "label": [1] * 3 + [0] * 97})
    small = cap_stratified(rare, 4, seed=1)
    assert len(small) == 4 and int(small["label"].sum()) == 1  # a small cap still keeps an anomaly


def test_keyword_rules_are_a_transparent_word_list() -> None:
    assert "fail" in FAILURE_WORDS
    assert keyword_hits("ciod: Failed to read message prefix on control stream") == ["fail"]
    assert keyword_hits("instruction cache parity error corrected") == ["err"]
    assert keyword_predict(["generating core.<*>", "kernel panic", ""]).tolist() == [0, 1, 0]


def test_tfidf_logistic_regression_learns_from_training_templates(mirror: Path) -> None:
    frame = pd.read_csv(mirror / "logprompt/templates_bgl.csv", keep_default_na=False)
    model = fit_tfidf_lr(frame["log"], frame["label"])
    predicted = tfidf_lr_predict(model, frame["log"])
    assert f1_score(frame["label"], predicted) > 0.5  # fits its own training data
    with pytest.raises(ValueError, match="both labels"):
        fit_tfidf_lr(["a", "b"], [0, 0])
    assert isinstance(predicted, np.ndarray)
