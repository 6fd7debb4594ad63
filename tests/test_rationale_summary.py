"""The evaluate stage's rationale faithfulness (issue 19 item 3): every explained item of every set, for the
rationales `detect` shows (after the served guard), the model's own on those items and all written, in
metrics.json, eval.md and MLflow's flat metrics."""

from __future__ import annotations

import numpy as np

from tasks.evaluate import rationale_summary
from tasks.evaluation.metrics import MethodResult
from tasks.evaluation.report import flat_metrics, rationale_lines
from tasks.evaluation.testdata import EvalSet

CAUGHT = "ciod: Error creating node map from file <*>"
ARGUES_NORMAL = "RAS KERNEL FATAL data TLB error interrupt"
QUIET = "ciod: LOGIN chdir(<*>) failed: No such file or directory"
UNEXPLAINED = "generating core.<*>"
STORM = "kernel: EXT3-fs error (device <*>)"
NEIGHBOUR = ("ciod: Error reading message prefix on <*>", 1)
VERDICTS = {
    ("bgl", CAUGHT): {"label": 1, "score": 0.9, "rationale": (
        "`ciod` says 'Error creating node map from file', like the similar log \"ciod: Error reading message "
        "prefix\" (labelled abnormal): the job cannot start, so the log is abnormal.")},
    ("bgl", ARGUES_NORMAL): {"label": 1, "score": 0.6, "rationale": (
        "`RAS` reports routine status output of the kernel, so the log is normal.")},  # under an abnormal verdict
    ("bgl", QUIET): {"label": 0, "score": 0.1, "rationale": (  # hidden under detect.rationales: abnormal
        "`ciod` writes routine status output without any failure word, so the log is normal.")},
    ("bgl", UNEXPLAINED): {"label": 0, "score": 0.05},
    ("thunderbird", STORM): {"label": 1, "score": 0.8, "rationale": (
        "`kernel` reports 'EXT3-fs error' on a device, so the log is abnormal.")},
}


def candidate() -> MethodResult:
    return MethodResult("rationanomaly", {k: dict(v) for k, v in VERDICTS.items()}, 1.0, "fake", True)


def one_per_key(name: str, keys: list[tuple[str, str]]) -> EvalSet:
    return EvalSet(name, "template", tuple(t for _, t in keys), np.ones(len(keys), dtype=int),
                   tuple((k,) for k in keys))


SETS = [one_per_key("template_bgl", [k for k in VERDICTS if k[0] == "bgl"]),
        one_per_key("served_bgl2k_lines", [("bgl", CAUGHT), ("bgl", QUIET)]),
        one_per_key("served_thunderbird_templates", [("thunderbird", STORM)]),
        one_per_key("template_bgl_sample", [("bgl", CAUGHT)])]
asked: list[list[tuple[str, str]]] = []


def shown_neighbours(keys):
    asked.append(list(keys))
    return [[NEIGHBOUR] for _ in keys]


def summary(policy: str = "abnormal", threshold: bool = True, neighbours=shown_neighbours):
    return rationale_summary(candidate(), SETS, neighbours, policy, threshold, 3, 42)


def test_every_set_reports_the_shown_rationales_and_all_written():
    r = summary()
    bgl = r["sets"]["template_bgl"]
    assert bgl["all"]["rationales"] == 3 and bgl["shown"]["rationales"] == 2, "the normal-verdict one is not shown"
    assert bgl["shown_model"]["agrees"] == 0.5, "the alert whose rationale argues normal"
    assert bgl["shown"]["replaced_count"] == 1 and bgl["shown"]["replaced"] == 0.5, "the guard replaced that one"
    assert bgl["shown"]["all_pass"] == 1.0, "what a user reads passes every check"
    assert bgl["all"]["false_no_failure_word_count"] == 1 and bgl["shown"]["false_no_failure_word_count"] == 0
    assert r["sets"]["served_thunderbird_templates"]["shown"]["agrees"] == 1.0
    assert r["pooled"]["all"]["rationales"] == 4, "each written rationale once"
    assert "template_bgl_sample" not in r["sets"]
    assert r["policy"] == "abnormal" and r["checks"][0] == "agrees"


def test_citations_are_checked_against_the_neighbours_the_prompt_showed():
    asked.clear()
    assert summary()["sets"]["served_bgl2k_lines"]["shown"]["cited_neighbour_shown"] == 1.0
    assert asked and set(asked[0]) == {k for k, v in VERDICTS.items() if v.get("rationale")}
    bare = summary(neighbours=lambda keys: None)  # prompts without neighbours: the citation was never shown
    assert bare["sets"]["served_bgl2k_lines"]["shown_model"]["cited_neighbour_shown"] == 0.0
    assert bare["sets"]["served_bgl2k_lines"]["shown"]["replaced_count"] == 1, "so the user is not shown it"


def test_what_is_shown_follows_detects_policy():
    for policy, threshold in (("all", True), ("abnormal", False)):  # no threshold: every template is explained
        r = summary(policy, threshold)
        assert r["sets"]["template_bgl"]["shown_model"] == r["sets"]["template_bgl"]["all"]
    assert summary("none")["sets"]["template_bgl"]["shown"]["rationales"] == 0


def test_a_sample_per_verdict_from_bgl2k_and_thunderbird2k_with_the_checks_each_fails():
    examples = summary()["examples"]
    assert [e["log"] for e in examples["served_bgl2k"]["abnormal"]] == [CAUGHT]
    normal = examples["served_bgl2k"]["normal"]
    assert [e["log"] for e in normal] == [QUIET] and not normal[0]["shown"]
    assert normal[0]["failed"] == ["false_no_failure_word"] and normal[0]["source"] == "evidence"
    assert "without any failure word" not in normal[0]["shown_rationale"]
    assert examples["served_thunderbird"]["abnormal"][0]["failed"] == []
    assert examples["served_thunderbird"]["abnormal"][0]["source"] == "model"


def test_the_report_and_mlflow_carry_the_figures():
    metrics = {"methods": {}, "rationales": summary()}
    text = "\n".join(rationale_lines(metrics))
    assert "| BGL templates | shown | 2 | 1.000 |" in text and "| BGL templates | shown_model | 2 | 0.500 |" in text
    assert "| 1 (0.500) |" in text, "how many the guard replaced"
    assert "fails false_no_failure_word" in text and "detect.rationales: abnormal" in text
    assert "shown instead (evidence)" in text
    flat = flat_metrics(metrics)
    assert flat["rationales.template_bgl.shown_model.agrees"] == 0.5
    assert flat["rationales.template_bgl.shown.replaced"] == 0.5
    assert flat["rationales.pooled.all.false_no_failure_word_count"] == 1.0


def test_the_model_card_states_the_faithfulness_users_get():
    from tasks.release.model_card import faithfulness_lines

    metrics = {"methods": {}, "rationales": summary()}
    (line,) = faithfulness_lines(metrics, compact=True)
    assert "Over the 3 rationales `detect` shows" in line and "concludes its verdict 1.000" in line
    assert "replaced by the evidence rationale for 1 of them (33.3%)" in line
    assert "| BGL templates | shown_model | 2 | 0.500 |" in "\n".join(faithfulness_lines(metrics, compact=False))
