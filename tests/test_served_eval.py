"""The served path measured on labelled raw logs: detect's own code, a fake endpoint answering from a fixed table.

Figures are checked against values computed by hand; the first field of every line (the ground truth) is
checked never to reach drain3 or any prompt, including lines whose header does not parse and alert lines
with an empty message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from drain3 import TemplateMiner

from tasks.common.prompt import format_completion, prompt_messages, scoring_messages
from tasks.common.settings import load_settings
from tasks.evaluation.inference import InferenceRun, ScoreRun, to_prediction
from tasks.evaluation.intervals import BootstrapSettings
from tasks.evaluation.metrics import MethodResult, score
from tasks.evaluation.served import (
    InProcessClassifier,
    detect_log,
    expert_labels,
    merge_placeholder_runs,
    read_labelled_log,
    served_sets,
)

REPO = Path(__file__).resolve().parents[1]
HEAD = "2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL"
# The first field is the answer: unique words here, so a leak would be found in any text.
BGL = [
    f"- 1117838570 {HEAD} INFO instruction cache parity error corrected",           # 1 normal, judged normal
    f"TAGDTLB 1117838571 {HEAD} FATAL data TLB error interrupt",                    # 2 alert, caught
    f"TAGREAD 1117838572 {HEAD} FATAL ciod: failed to read message prefix on control stream",  # 3 alert, caught
    f"- 1117838573 {HEAD} INFO generating core.2210",                               # 4 normal
    f"TAGMNTF 1117838574 {HEAD} FATAL",                                             # 5 alert, empty message: missed
    "TAGPANIC this line has no header at all",                                      # 6 alert, no header: missed
    f"- 1117838576 {HEAD} INFO instruction cache parity error corrected",           # 7 normal
    f"- 1117838577 {HEAD} INFO ciod: failed to read message prefix on control stream",  # 8 normal tag, judged abnormal
    f"- 1117838578 {HEAD} INFO generating core.2211",                               # 9 normal
    f"TAGDTLB 1117838579 {HEAD} FATAL data TLB error interrupt",                    # 10 alert, caught
]
THUNDER = [
    "- 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 crond(pam_unix)[2915]: session closed for user root",
    "- 1131566462 2005.11.09 dn228 Nov 9 12:01:02 dn228/dn228 crond(pam_unix)[2916]: session opened for user root",
    "- 1131566463 2005.11.09 dn229 Nov 9 12:01:03 dn229/dn229 kernel: disk sda failed",
    "- 1131566464 2005.11.09 dn230 Nov 9 12:01:04 dn230/dn230 kernel: disk sda failed",
    # a template the experts corrected to abnormal on Spirit (issue 18 item 7: 819 of Thunderbird_2k's lines)
    "- 1131566465 2005.11.09 tbird-admin1 Nov 9 12:01:05 local@tbird-admin1 /apps/x86_64/system/ganglia-3.0.1/"
    "sbin/gmetad[1682]: data_thread() got not answer from any [Thunderbird_A8] datasource",
    "- 1131566466 2005.11.09 tbird-admin1 Nov 9 12:01:06 local@tbird-admin1 /apps/x86_64/system/ganglia-3.0.1/"
    "sbin/gmetad[1682]: data_thread() got not answer from any [Thunderbird_B8] datasource",
]
# The correct stage's output: `correction` says which labels are the experts' decisions.
CORRECTED = pd.DataFrame({"dataset": ["bgl"] * 4 + ["spirit"], "label": [0, 1, 1, 0, 1],
                          "correction": ["none", "exact", "none", "none", "exact"], "template": [
    "instruction cache parity error corrected", "data TLB error interrupt",
    "ciod: failed to read message prefix on <*>", "generating <*>",
    "data_thread() got not answer from any <*> <*> datasource"]})
ABNORMAL_WHEN = re.compile(r"TLB error|failed to read|sda failed|data_thread")  # the fixed answer table
TAGS = re.compile(r"TAG[A-Z]+")


class TableEngine:
    """A fake endpoint behind the engine interface: answers from ABNORMAL_WHEN, builds (and keeps) each prompt."""

    name = "table"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def score(self, templates, datasets, adapter_dir=None, neighbours=None):
        """The verdict score the table gives: 0.9 for its abnormal templates, 0.1 for the rest."""
        for template, dataset in zip(templates, datasets, strict=True):
            self.prompts.append("\n".join(m["content"] for m in scoring_messages(template, dataset)))
        return ScoreRun([0.9 if ABNORMAL_WHEN.search(t) else 0.1 for t in templates], self.name, 0.01)

    def classify(self, templates, datasets, adapter_dir=None, neighbours=None, verdicts=None):
        """A rationale for the verdict it is given (the table's own answer when none is)."""
        completions = []
        given = verdicts if verdicts is not None else [None] * len(templates)
        for template, dataset, verdict in zip(templates, datasets, given, strict=True):
            self.prompts.append("\n".join(m["content"] for m in prompt_messages(template, dataset, verdict=verdict)))
            label = int(bool(ABNORMAL_WHEN.search(template))) if verdict is None else int(verdict == "abnormal")
            completions.append(format_completion(f"the log reads {template}.", label))
        predictions = [to_prediction(t, d, c) for t, d, c in zip(templates, datasets, completions, strict=True)]
        return InferenceRun(predictions, self.name, "candidate", 0.01)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mined: list[str] = []
    original = TemplateMiner.add_log_message

    def spy(self, content):
        mined.append(content)
        return original(self, content)

    monkeypatch.setattr(TemplateMiner, "add_log_message", spy)
    (tmp_path / "bgl.log").write_text("\n".join(BGL) + "\n")
    (tmp_path / "thunder.log").write_text("\n".join(THUNDER) + "\n")
    engine = TableEngine()
    classifier = InProcessClassifier(engine, None, "candidate")
    settings = load_settings(REPO / "params.yaml").detect
    bgl = detect_log(read_labelled_log("bgl2k", tmp_path / "bgl.log", "bgl"), settings, classifier)
    thunder = detect_log(read_labelled_log("thunderbird", tmp_path / "thunder.log", "thunderbird"), settings,
                         classifier)
    sets, info = served_sets(bgl, thunder, CORRECTED, {"instruction cache parity error corrected"}, window_lines=4)
    verdicts = {key: {"label": int(v.verdict == "abnormal"), "valid": v.valid, "rationale_words": 3}
                for key, v in classifier.answers.items()}
    blocks = score(MethodResult("candidate", verdicts, 1.0, "table", True), sets,
                   BootstrapSettings(resamples=1000, confidence=0.95, seed=1))
    return blocks, info, engine, mined


def test_line_window_and_false_alarm_figures_equal_hand_computed_values(served) -> None:
    blocks, info, _, _ = served
    lines = blocks["served_bgl2k_lines"]  # alerts: 2,3,5,6,10 (5); judged abnormal: 2,3,8,10 → TP 3, FP 1, FN 2
    assert (lines["n"], lines["n_abnormal"]) == (10, 5)
    assert lines["confusion_matrix"] == [[4, 1], [2, 3]]
    assert lines["precision"] == pytest.approx(3 / 4) and lines["recall"] == pytest.approx(3 / 5)
    assert lines["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    windows = blocks["served_bgl2k_windows"]  # [1-4] alert & flagged, [5-8] alert & flagged (8), [9-10] alert & flagged
    assert windows["confusion_matrix"] == [[0, 0], [0, 3]] and windows["f1"] == 1.0
    corrected = blocks["served_bgl2k_lines_corrected"]  # matched: 1,2,3,4,7,8,9,10; labels 0,1,1,0,0,1,0,1
    assert corrected["n"] == 8 and corrected["n_abnormal"] == 4
    assert corrected["confusion_matrix"] == [[4, 0], [0, 4]]  # line 8 is abnormal by the experts' template label
    # the flagged data_thread lines match the experts' abnormal Spirit template: anomalies, not false alarms
    assert blocks["served_thunderbird_lines"]["false_alarm_rate"] == pytest.approx(2 / 4)
    assert blocks["served_thunderbird_templates"]["false_alarm_rate"] == pytest.approx(1 / 3)
    thunder = info["thunderbird"]
    assert (thunder["expert_abnormal_templates"], thunder["expert_abnormal_lines"]) == (1, 2)
    assert (thunder["false_alarm_templates"], thunder["false_alarm_lines"]) == (3, 4)
    assert thunder["expert_labelled"] == [{
        "template": "data_thread() got not answer from any <*> datasource", "lines": 2, "label": "abnormal",
        "expert_template": "data_thread() got not answer from any <*> <*> datasource", "expert_dataset": "spirit",
        "matched": "exact"}]
    assert info["bgl2k"]["matched_lines"] == 8 and info["bgl2k"]["matched_lines_of_training_templates"] == 2
    assert info["thunderbird"]["alert_lines"] == 0
    assert info["thunderbird"]["largest_template_lines"] == 2  # `disk sda failed` twice


def test_the_first_field_never_reaches_drain3_or_any_prompt(served) -> None:
    _, _, engine, mined = served
    assert set(mined) == {  # every distinct message (identical contents are memoised), and nothing else
        "instruction cache parity error corrected", "data TLB error interrupt",
        "ciod: failed to read message prefix on control stream", "generating core.2210", "generating core.2211",
        "(empty message)", "this line has no header at all", "session closed for user root",
        "session opened for user root", "disk sda failed",
        "data_thread() got not answer from any [Thunderbird_A8] datasource",
        "data_thread() got not answer from any [Thunderbird_B8] datasource"}
    assert engine.prompts, "the endpoint was asked"
    for text in [*mined, *engine.prompts]:
        assert not TAGS.search(text), text
        assert not re.search(r"(^|\s)- 1117838", text), text


def test_a_version_without_a_threshold_is_judged_by_its_answer_word_as_it_is_served() -> None:
    """No validation fold, no threshold registered: serving reads the word the rationale ends in, so the
    evaluation of the served path must too, whatever the score says (review of issue 14)."""

    class ScoresEverythingAbnormal(TableEngine):
        def score(self, templates, datasets, adapter_dir=None, neighbours=None):
            return ScoreRun([0.99] * len(templates), self.name, 0.01)

    items = [("bgl", "data TLB error interrupt"), ("bgl", "generating <*>")]
    unscored = InProcessClassifier(ScoresEverythingAbnormal(), None, "candidate", threshold=None,
                                   rationales="abnormal").classify(items)
    assert [v.verdict for v in unscored] == ["abnormal", "normal"]
    assert all(v.rationale for v in unscored)  # the verdict needs the rationale: every template gets one
    scored = InProcessClassifier(ScoresEverythingAbnormal(), None, "candidate", threshold=0.5,
                                 rationales="none").classify(items)
    assert [v.verdict for v in scored] == ["abnormal", "abnormal"] and not any(v.rationale for v in scored)


def test_the_rationale_shown_with_an_alert_is_written_for_the_scored_verdict() -> None:
    """Issue 19, one verdict one reason: the explain prompt carries the verdict the score gave, so a template the
    table itself would call normal is explained as abnormal when its score flags it (before, the rationale was a
    second answer that argued `normal` under 150 of 190 alerts)."""

    class ScoresEverythingAbnormal(TableEngine):
        def score(self, templates, datasets, adapter_dir=None, neighbours=None):
            return ScoreRun([0.99] * len(templates), self.name, 0.01)

    engine = ScoresEverythingAbnormal()
    answers = InProcessClassifier(engine, None, "candidate", threshold=0.5, rationales="abnormal").classify(
        [("bgl", "generating <*>")])
    assert answers[0].verdict == "abnormal" and answers[0].answer == "abnormal"
    assert "The verdict is abnormal. Explain why." in engine.prompts[-1]
    # the endpoint client's guard: what is shown concludes the verdict, whoever wrote it
    assert answers[0].rationale_source in ("model", "evidence") and "log is abnormal" in answers[0].rationale


def test_the_evaluations_served_path_applies_the_verdict_rules() -> None:
    """The same rules as the endpoint client (tasks.detection.verdicts.apply_verdict_rules): everything is scored
    abnormal; a template whose nearest shown neighbour of its own system is not abnormal stays an alert only with
    a failure word; one whose nearest is abnormal keeps its alert; a template the index holds labelled normal is normal;
    without an index (None) the rules are off."""
    from tasks.common.retrieval import Neighbour

    class ScoresEverythingAbnormal(TableEngine):
        def score(self, templates, datasets, adapter_dir=None, neighbours=None):
            return ScoreRun([0.99] * len(templates), self.name, 0.01)

    items = [("thunderbird", "kernel: Linux version <*>"), ("thunderbird", "disk <*> failed"),
             ("bgl", "kernel: Linux version <*>"), ("bgl", "ciod: generated <*> core files"),
             ("bgl", "ciod: LOGIN chdir failed"), ("bgl", "node card status <*>")]
    shown = [[Neighbour("kernel panic", "bgl", 1, 0.4)], [],
             [Neighbour("kernel panic", "bgl", 1, 0.4)], [Neighbour("ciod: generated <*> core files", "bgl", 0, 1.0)],
             [Neighbour("ciod: LOGIN chdir failed", "bgl", 0, 1.0)],
             # an abnormal neighbour is shown, but the nearest one is normal: no evidence
             [Neighbour("node card fault <*>", "bgl", 1, 0.5), Neighbour("node card status ok", "bgl", 0, 0.8)]]
    for found, expected in ((shown, ["normal", "abnormal", "abnormal", "normal", "normal", "normal"]),
                            (None, ["abnormal"] * 6)):
        answers = InProcessClassifier(ScoresEverythingAbnormal(), None, "candidate", threshold=0.5,
                                      rationales="none", found=lambda batch, found=found: found).classify(items)
        assert [a.verdict for a in answers] == expected, found
        assert [a.no_evidence_rule for a in answers] == ([True, False, False, False, False, True] if found
                                                         else [False] * 6)
        assert [a.labelled_template for a in answers] == ([False, False, False, True, True, False] if found
                                                          else [False] * 6)


def test_a_mined_template_takes_the_experts_label_by_the_correct_stages_matching() -> None:
    mined = ["data_thread() got not answer from any <*> datasource", "Connection From <*>",
             "session closed for user root", "disk <*> failed", "kernel: <*> <*> ready"]
    corrected = pd.DataFrame([
        ("spirit", "data_thread() got not answer from any <*> <*> datasource", 1, "exact"),  # placeholders merged
        ("spirit", "connection from <*>", 0, "normalized"),       # same normalised form: the experts say normal
        ("bgl", "session closed for user root", 1, "none"),        # a list label, not an expert decision
        ("spirit", "disk <*> failed", 1, "exact"), ("bgl", "disk <*> failed", 0, "review"),  # experts disagree
        ("spirit", "kernel: <*> ready", 1, "exact"),
    ], columns=["dataset", "template", "label", "correction"])
    found = expert_labels(mined, corrected)
    assert sorted(found) == [0, 1, 3, 4]
    assert found[0] == {"label": 1, "template": "data_thread() got not answer from any <*> <*> datasource",
                        "dataset": "spirit", "matched": "exact"}
    assert (found[1]["label"], found[1]["matched"]) == (0, "normalized")
    assert found[3]["label"] is None and len(found[3]["conflict"]) == 2  # neither label is taken
    assert found[4]["label"] == 1
    assert merge_placeholder_runs("a <*><*>  <*> b <*>") == "a <*> b <*>"
