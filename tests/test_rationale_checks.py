"""The rationale checks of issue 19 (tasks/evaluation/rationales.py): each fails on a crafted bad rationale and
holds on a good one; the issue's three served examples are caught."""

from __future__ import annotations

import pytest

from tasks.data.teachers import FAILURE_WORDS, keyword_hits, keyword_words, lexicon_rationale
from tasks.evaluation import baselines
from tasks.evaluation.rationales import (
    CHECKS,
    NORMAL_BASIS,
    ShownRationale,
    check_rationale,
    cited_neighbours,
    claims_no_failure_word,
    conclusion,
    evidence_rationale,
    faithfulness_report,
    grounded_rationale,
    named_component,
    quotes,
)

MIDPLANE = "MidplaneSwitchController::clearPort() bll_clear_port failed: R63-M0-L0-U19-A"
TEMPERATURE = "Temperature Over Limit on link card"
POSTQUEUE = "fatal: usage: postqueue -f | postqueue -p | postqueue -s site"
NEAR = ("MidplaneSwitchController::clearPort() bll_clear_port failed: <*>", 1)
GOOD = ('`MidplaneSwitchController` reports "bll_clear_port failed". Lexicon: MMCS boots partitions and drives the '
        'midplane switches. An expert labelled the similar log "MidplaneSwitchController::clearPort() '
        'bll_clear_port failed: <*>" abnormal, so the log is abnormal.')

# The three rationales the served model wrote under an abnormal verdict (issue 19).
ISSUE_EXAMPLES = [
    (MIDPLANE, "bgl", "MidplaneSwitch is the Linux kernel and daemon that loads jobs and forwards their I/O. Core "
     "information: the log reads 'MidplaneSwitchController::clearPort()'. Deduction: it is routine status output "
     "of the MidplaneSwitch without any failure word or sign of a system error, so the log is normal."),
    (TEMPERATURE, "bgl", "Domain knowledge: node, link and service cards carry the chips. Core information: the "
     "log reads \"Temperature Over Limit on link card\", with the failure words 'Temperature' and 'Over'. "
     "Deduction: it is routine status output of the node cards, so the log is normal."),
    (POSTQUEUE, "spirit", "Domain knowledge: postqueue and postqueue are the daemons that send kernel and daemon "
     "messages to syslog. Core information: the log reads \"fatal: usage: postqueue -f\". Deduction: it is "
     "routine status output without any failure word or sign of a system error, so the log is normal."),
]


def test_a_grounded_rationale_that_concludes_its_verdict_passes_every_check():
    checks = check_rationale(GOOD, MIDPLANE, "bgl", [NEAR], 1)
    assert checks.passed and checks.failed() == []
    assert check_rationale(GOOD, MIDPLANE, "bgl", [NEAR], "abnormal") == checks


@pytest.mark.parametrize(("rationale", "neighbours", "verdict", "failed"), [
    (GOOD.replace("so the log is abnormal", "so the log is normal"), [NEAR], 1, "agrees"),
    (GOOD, [NEAR], 0, "agrees"),
    ('`MidplaneSwitchController` reports "bll_clear_port failed".', [], 1, ["agrees"]),  # no conclusion at all
    (GOOD.replace("`MidplaneSwitchController`", "`MidplaneController`"), [NEAR], 1, "component_in_log"),
    (GOOD.replace("bll_clear_port failed\"", "bll_clear_port timed out\""), [NEAR], 1, "quotes_grounded"),
    (GOOD, [], 1, ["quotes_grounded", "cited_neighbour_shown"]),  # cites a neighbour nobody was shown
    (GOOD, [(NEAR[0], 0)], 1, "cited_neighbour_shown"),  # shown, but labelled normal, not abnormal
    (GOOD.replace(". Lexicon", ", without any failure word. Lexicon"), [NEAR], 1, "false_no_failure_word"),
])
def test_each_check_fails_on_a_crafted_bad_rationale(rationale, neighbours, verdict, failed):
    checks = check_rationale(rationale, MIDPLANE, "bgl", neighbours, verdict)
    assert checks.failed() == (failed if isinstance(failed, list) else [failed]), checks
    assert not checks.passed


def test_the_issue_examples_are_caught():
    caught = [check_rationale(r, log, dataset, [], 1).failed() for log, dataset, r in ISSUE_EXAMPLES]
    assert caught[0] == ["agrees", "false_no_failure_word", "consistent"]  # "routine status output" under an alert
    assert caught[1] == ["agrees", "consistent"]
    assert caught[2] == ["agrees", "false_no_failure_word", "consistent"]
    # Under the verdict it concludes, a "no failure word" claim on a log that says `fatal` still fails.
    assert check_rationale(ISSUE_EXAMPLES[2][2], POSTQUEUE, "spirit", [], 0).failed() == ["false_no_failure_word"]


def test_a_no_failure_word_claim_is_true_on_a_log_without_a_keyword():
    rationale = "`ACPI` reports its interpreter, without any failure word, so the log is normal."
    assert check_rationale(rationale, "ACPI: Interpreter enabled", "spirit", [], 0).passed


def test_the_conclusion_is_the_last_verdict_phrase_and_a_not_flips_it():
    assert conclusion("Normal operation would look different; so the log is abnormal.") == "abnormal"
    assert conclusion("it looks abnormal at first, but the log is normal") == "normal"
    assert conclusion("the log is not normal") == "abnormal"
    assert conclusion("an anomaly in the torus network") == "abnormal"
    assert conclusion("routine output") is None


def test_the_named_component_is_the_first_backquoted_token_else_the_lexicon_reading():
    assert named_component("`ciod` and `rts`: ...") == "ciod"
    assert named_component("no backquotes") is None
    old_style = "Domain knowledge: ciod is the control and I/O daemon. Deduction: ..., so the log is abnormal."
    assert check_rationale(old_style, "ciod: Error reading message prefix", "bgl", [], 1).component_in_log
    assert not check_rationale(old_style, "EDRAM bank error", "bgl", [], 1).component_in_log


def test_an_apostrophe_inside_a_word_opens_no_quote():
    assert quotes("the log's own words 'failed' and the node's card") == ["failed"]
    assert quotes('it says "can\'t connect" here') == ["can't connect"]


def test_cited_neighbours_are_read_with_their_label():
    text = 'an expert labelled the similar log "ciod: Error <*>" abnormal; the neighbour "x y z" was normal'
    assert cited_neighbours(text) == [("ciod: Error <*>", "abnormal"), ("x y z", "normal")]


def test_the_keyword_list_has_one_owner():
    assert baselines.FAILURE_WORDS is FAILURE_WORDS and baselines.keyword_hits is keyword_hits
    assert keyword_words("bll_clear_port failed: ERRORS, can't") == ["failed", "ERRORS", "can't"]


def test_faithfulness_report_gives_shares_and_counts():
    items = [(GOOD, MIDPLANE, "bgl", [NEAR], 1), *[(r, log, d, [], 1) for log, d, r in ISSUE_EXAMPLES],
             ("", MIDPLANE, "bgl", [], 1)]  # no rationale: not counted
    report = faithfulness_report(items)
    assert report["rationales"] == 4
    assert report["agrees"] == 0.25 and report["agrees_count"] == 1
    assert report["false_no_failure_word_count"] == 2 and report["false_no_failure_word"] == 0.5
    assert report["all_pass"] == 0.25
    assert set(CHECKS) <= set(report)
    assert faithfulness_report([])["rationales"] == 0


@pytest.mark.parametrize(("log", "dataset"), [(MIDPLANE, "bgl"), (TEMPERATURE, "bgl"), (POSTQUEUE, "spirit")])
@pytest.mark.parametrize("label", [0, 1])
def test_the_lexicon_teachers_rationale_for_each_issue_example_passes(log, dataset, label):
    neighbours = [(NEAR[0], label), ("ciod: Error loading <*>", 1 - label)]
    rationale = lexicon_rationale(log, label, dataset, neighbours)
    checks = check_rationale(rationale, log, dataset, neighbours, label)
    assert checks.passed, (checks, rationale)
    assert named_component(rationale) in log and cited_neighbours(rationale)[0][1] == ("normal", "abnormal")[label]
    assert not claims_no_failure_word(rationale)
    assert 35 <= len(rationale.split()) <= 80


def test_an_error_worded_normal_log_gets_its_benign_reason_with_its_source():
    rationale = lexicon_rationale("<*> to=<*>, relay=<*>, status=deferred (host <*> said: 451 try again)", 0, "spirit")
    assert "queue" in rationale and "source: Postfix" in rationale and rationale.endswith("So the log is normal.")
    noted = lexicon_rationale(MIDPLANE, 0, "bgl", note="the experts corrected its label from abnormal to normal")
    assert "the experts corrected its label" in noted
    assert check_rationale(noted, MIDPLANE, "bgl", [], 0).passed


def test_a_benign_reason_is_given_only_where_its_source_applies():
    assert "refused the credentials" in lexicon_rationale("Failed password for root from <*> port <*>", 0, "spirit")
    chown = lexicon_rationale("chown: `nobody.nobody': invalid user", 0, "spirit")  # no login: chown's argument
    assert "refused the credentials" not in chown and "the experts label this message normal" in chown


# ---------------------------------------------------------------- the served guard (issue 19 item 1)


@pytest.mark.parametrize("log, dataset, rationale", ISSUE_EXAMPLES)
def test_the_guard_never_shows_the_issue_examples_and_its_evidence_rationale_passes(log, dataset, rationale):
    shown = grounded_rationale(rationale, log, dataset, [NEAR], "abnormal")
    assert shown.source == "evidence" and "agrees" in shown.failed
    assert check_rationale(shown.text, log, dataset, [NEAR], "abnormal").passed
    assert conclusion(shown.text) == "abnormal"


def test_the_guard_shows_a_rationale_that_passes_every_check_as_written():
    shown = grounded_rationale(GOOD, MIDPLANE, "bgl", [NEAR], 1)
    assert shown == ShownRationale(GOOD, "model")


def test_an_empty_rationale_is_replaced_too():
    shown = grounded_rationale("", MIDPLANE, "bgl", [], "abnormal")
    assert shown.source == "evidence" and shown.text.endswith("So the log is abnormal.")


def test_a_served_normal_verdict_on_an_error_worded_log_gives_the_score_not_an_expert_label():
    """No expert saw a served log: without a documented benign reason the evidence rationale says the version
    scored it below its threshold; the teacher (training, expert labels) keeps the experts' label."""
    text = evidence_rationale(TEMPERATURE, "bgl", [], "normal")
    assert NORMAL_BASIS in text and "experts label" not in text and conclusion(text) == "normal"
    assert "experts label this message normal" in lexicon_rationale(TEMPERATURE, 0, "bgl")


def test_the_evidence_rationale_cites_only_labelled_shown_neighbours_with_their_label():
    text = evidence_rationale(MIDPLANE, "bgl", [NEAR, "unlabelled neighbour text"], 1)
    assert cited_neighbours(text) and all(label == "abnormal" for _, label in cited_neighbours(text))
    assert check_rationale(text, MIDPLANE, "bgl", [NEAR], 1).cited_neighbour_shown
    bare = evidence_rationale(MIDPLANE, "bgl", ["unlabelled neighbour text"], 1)
    assert not cited_neighbours(bare), "a neighbour without a label is not cited"


def test_a_rationale_that_argues_the_other_verdict_is_inconsistent():
    """The default candidate's alerts (2026-12-06): "routine status output ... So the log is abnormal." concludes
    the verdict yet argues the other one; the check catches both directions, and the teacher never does it."""
    both_ways = ("Domain knowledge: the log names `ciod`. Core information: the log reads 'ciod: Error loading'. "
                 "Deduction: it is routine status output of `ciod`, with no sign of a system error. So the log is "
                 "abnormal.")
    checks = check_rationale(both_ways, "ciod: Error loading <*>", "bgl", [], "abnormal")
    assert checks.agrees and not checks.consistent and checks.failed() == ["consistent"]
    assert not check_rationale('`ciod` "Error" signals a software exception. So the log is normal.',
                               "ciod: Error loading <*>", "bgl", [], "normal").consistent
    assert check_rationale('`ciod` says "signals abnormally". So the log is normal.', "ciod signals abnormally", "bgl",
                           [], "normal").consistent, "a word boundary: 'signals abnormally' argues nothing"
    for label in (0, 1):
        assert check_rationale(lexicon_rationale(MIDPLANE, label, "bgl", [NEAR]), MIDPLANE, "bgl", [NEAR],
                               label).consistent
    assert grounded_rationale(both_ways, "ciod: Error loading <*>", "bgl", [], "abnormal").source == "evidence"
