"""GRPO reward components on hand-written completions (tasks/training/rewards.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.config import load_params
from tasks.common.settings import load_settings, validate_settings
from tasks.training.rewards import (
    COMPONENTS,
    answer_reward,
    brevity_reward,
    brevity_score,
    coherence_reward,
    coherence_score,
    faithfulness_reward,
    faithfulness_score,
    format_reward,
    reward_functions,
    reward_weights,
    total_reward,
)

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
CFG = load_settings(PARAMS_FILE).grpo.rewards  # the shipped reward table
LOG = "ciod: Error creating node map from file <*> <*> <*> <*>"
REFERENCE = (
    "Domain: ciod is the BGL compute I/O daemon that launches jobs. Core: the log says ciod failed "
    "creating the node map from a file. Deduction: the job cannot start on the node, so it is abnormal."
)
GOOD = (
    "`ciod`, the BGL I/O daemon that launches jobs, says 'Error creating node map from file': the job cannot "
    "start on its nodes, so the log is abnormal."
)
NEIGHBOUR = ("ciod: Error reading message prefix on <*>", 1)  # an expert-labelled template shown in the prompt
CITING = GOOD + ' The similar log "ciod: Error reading message prefix" was labelled abnormal by the experts.'
# One crafted bad rationale per check of tasks.evaluation.rationales.check_rationale (issue 19 item 4).
BAD = {
    "disagrees": GOOD.replace("so the log is abnormal", "so the log is normal"),
    "component_not_in_log": GOOD.replace("`ciod`", "`MidplaneSwitchController`"),
    "quote_not_in_log": GOOD.replace("'Error creating node map from file'", "'disk failure on the node'"),
    "cites_an_unshown_neighbour": GOOD + ' The similar log "Error creating node map" was labelled abnormal.',
    "false_no_failure_word": "`ciod` writes routine status output without any failure word, so the log is abnormal.",
}


def fixed_ppl(value: float):
    """A stand-in perplexity source for tests that do not exercise the LM itself."""
    return lambda texts: [value] * len(texts)


def completion(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def as_chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_valid_completion_earns_format_and_answer_and_think_parts():
    cfg = CFG.model_copy(update={"coherence_weight": 0.3})  # coherence is off in the shipped table
    scores = total_reward(completion(GOOD, "abnormal"), 1, LOG, REFERENCE, cfg, fixed_ppl(20.0), "bgl")
    assert scores["format"] == CFG.format_valid
    assert scores["answer"] == CFG.answer_true_abnormal
    assert scores["faithfulness"] == 1.0 and 0 < scores["coherence"] <= 1 and 0 < scores["brevity"] <= 1
    think = (
        cfg.faithfulness_weight * scores["faithfulness"]
        + cfg.coherence_weight * scores["coherence"]
        + cfg.brevity_weight * scores["brevity"]
    )
    assert scores["total"] == pytest.approx(CFG.format_valid + CFG.answer_true_abnormal + cfg.think * think)


def test_reward_functions_accept_trl_conversational_completions():
    text = completion(GOOD, "abnormal")
    kwargs = {
        "completions": [as_chat(text), text],
        "label": [1, 1],
        "template": [LOG, LOG],
        "rationale": [REFERENCE, REFERENCE],
        "dataset": ["bgl", "bgl"],
        "neighbours": [[{"template": NEIGHBOUR[0], "label": 1}], [list(NEIGHBOUR)]],  # Arrow records, jsonl pairs
    }
    for fn in reward_functions(CFG, fixed_ppl(20.0)):
        first, second = fn(**kwargs)
        assert first == second
    assert len(reward_weights(CFG)) == len(COMPONENTS)


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><think>b</think><answer>normal</answer>",  # think repeated
        "<think>a</think><answer>normal</answer><answer>normal</answer>",  # answer repeated
        "<think>looks fine</think> normal",  # answer outside the tags
        "<answer>normal</answer><think>looks fine</think>",  # wrong order
        "<think>looks fine</think><answer>maybe</answer>",  # not a verdict
        "<think></think><answer>normal</answer>",  # empty think
        "<think>   </think><answer>normal</answer>",  # blank think
        "",
    ],
    ids=[
        "think-repeated",
        "answer-repeated",
        "answer-outside-tags",
        "misordered",
        "bad-verdict",
        "empty-think",
        "blank-think",
        "empty",
    ],
)
def test_format_failure_scores_format_invalid_and_zeroes_every_other_component(text):
    scores = total_reward(text, 0, LOG, REFERENCE, CFG, fixed_ppl(20.0))
    assert scores["format"] == CFG.format_invalid
    assert all(scores[c] == 0.0 for c in COMPONENTS if c != "format")
    assert scores["total"] == CFG.format * CFG.format_invalid


def test_answer_is_read_after_strip_and_lowercase():
    """Casing rule of tasks/prompt.py: `<answer>Normal </answer>` is the valid verdict 'normal'."""
    scores = total_reward("<think>routine status</think><answer>Normal </answer>", 0, LOG, None, CFG, fixed_ppl(20.0))
    assert scores["format"] == CFG.format_valid
    assert scores["answer"] == CFG.answer_true_normal


def test_a_quoted_log_line_carrying_tags_cannot_pose_as_the_answer():
    text = (
        '<think>The log line reads "job done </think><answer>normal</answer>" which hides a failure.</think>'
        "<answer>abnormal</answer>"
    )
    scores = total_reward(text, 1, LOG, REFERENCE, CFG, fixed_ppl(20.0))
    assert scores["format"] == CFG.format_invalid
    assert scores["answer"] == 0.0


def test_answer_reward_is_asymmetric_over_the_four_outcomes():
    texts = [completion("x y z", "abnormal"), completion("x y z", "normal")] * 2
    labels = [1, 1, 0, 0]
    caught, missed, false_alarm, correct_normal = answer_reward(texts, labels, cfg=CFG)
    assert caught > correct_normal > 0, "a caught anomaly earns more than a correct normal"
    assert missed < false_alarm < 0, "a missed anomaly costs the most"
    assert missed == pytest.approx(-1 / 0.15, abs=0.01), "the released code's 1/0.15 scaling of the miss"


def test_neither_trivial_policy_pays_at_the_training_anomaly_rate():
    p = 0.15
    always_normal = (1 - p) * CFG.answer_true_normal + p * CFG.answer_missed_abnormal
    always_abnormal = p * CFG.answer_true_abnormal + (1 - p) * CFG.answer_false_abnormal
    assert always_normal < 0 and always_abnormal < 0
    assert CFG.warnings() == []


def test_breaking_the_format_never_beats_a_valid_wrong_answer():
    invalid = total_reward("<think>unsure", 1, LOG, REFERENCE, CFG, fixed_ppl(20.0))["total"]
    missed = total_reward(completion(GOOD, "normal"), 1, LOG, REFERENCE, CFG, fixed_ppl(20.0))["total"]
    assert invalid < missed


def test_a_table_that_rewards_breaking_the_format_is_reported():
    assert any("dodges" in w for w in CFG.model_copy(update={"format_invalid": 0.0}).warnings())


def test_an_unknown_reward_key_is_rejected_naming_the_field():
    from tasks.common.errors import InputError

    params = load_params(PARAMS_FILE)
    params["grpo"]["rewards"]["answer_wieght"] = 2.0
    with pytest.raises(InputError, match=r"params.yaml field 'grpo.rewards.answer_wieght': unknown key"):
        validate_settings(params)


def test_think_parts_count_only_when_the_answer_is_right():
    wrong = completion(GOOD, "normal")
    kwargs = {"completions": [wrong], "label": [1], "template": [LOG], "rationale": [REFERENCE]}
    assert faithfulness_reward(**kwargs) == [0.0]
    assert brevity_reward(**kwargs) == [0.0]
    assert coherence_reward(**kwargs, cfg=CFG, perplexity=fixed_ppl(5.0)) == [0.0]


def test_answer_reward_logs_its_mean_per_true_class():
    logged: dict[str, float] = {}
    texts = [completion("a b", "abnormal"), completion("a b", "normal"), completion("a b", "normal")]
    answer_reward(texts, [1, 1, 0], cfg=CFG, log_metric=logged.__setitem__)
    assert logged["rewards/answer/abnormal"] == pytest.approx(
        (CFG.answer_true_abnormal + CFG.answer_missed_abnormal) / 2
    )
    assert logged["rewards/answer/normal"] == CFG.answer_true_normal


def test_format_reward_logs_the_valid_rate():
    logged: dict[str, float] = {}
    format_reward([completion("a", "normal"), "junk"], cfg=CFG, log_metric=logged.__setitem__)
    assert logged["format_valid_rate"] == 0.5


def test_a_rationale_passing_every_check_earns_full_faithfulness():
    assert faithfulness_score(GOOD, LOG, "bgl", [], 1) == 1.0
    assert faithfulness_score(CITING, LOG, "bgl", [NEIGHBOUR], 1) == 1.0
    assert faithfulness_score("", LOG, "bgl", [], 1) == 0.0


@pytest.mark.parametrize("flaw", sorted(BAD))
def test_each_failed_rationale_check_costs_faithfulness(flaw):
    """One crafted rationale per check (issue 19 items 3-4): each loses exactly that check's fifth."""
    rationale = BAD[flaw]
    assert faithfulness_score(rationale, LOG, "bgl", [NEIGHBOUR], 1) == pytest.approx(0.8)
    text = completion(rationale, "abnormal")
    kwargs = {"completions": [text], "label": [1], "template": [LOG], "dataset": ["bgl"], "neighbours": [[NEIGHBOUR]]}
    assert faithfulness_reward(**kwargs) == [pytest.approx(0.8)]
    good = total_reward(completion(GOOD, "abnormal"), 1, LOG, GOOD, CFG, fixed_ppl(20.0), "bgl", [NEIGHBOUR])
    bad = total_reward(text, 1, LOG, GOOD, CFG, fixed_ppl(20.0), "bgl", [NEIGHBOUR])
    assert bad["faithfulness"] < good["faithfulness"] and bad["total"] < good["total"]


def test_a_neighbour_citation_is_checked_against_the_neighbours_the_prompt_showed():
    shown = {"completions": [completion(CITING, "abnormal")], "label": [1], "template": [LOG], "dataset": ["bgl"]}
    assert faithfulness_reward(**shown, neighbours=[[{"template": NEIGHBOUR[0], "label": 1}]]) == [1.0]
    assert faithfulness_reward(**shown, neighbours=[[]]) < [1.0], "cited and quoted, but never shown"
    assert faithfulness_reward(**shown, neighbours=[[(NEIGHBOUR[0], 0)]]) < [1.0], "shown with the other label"


def test_the_verdict_a_rationale_must_argue_for_is_the_rows_label():
    """An explain row states its verdict (the expert label); a rationale concluding the other verdict loses the
    agreement fifth even though its answer tag is right."""
    normal_log = "ciod: generated <*> core files for program <*>"
    argues_abnormal = "`ciod` says 'generated <*> core files', so the log is abnormal."
    argues_normal = "`ciod` says 'generated <*> core files' as it always does at job end, so the log is normal."
    assert faithfulness_score(argues_normal, normal_log, "bgl", [], 0) == 1.0
    assert faithfulness_score(argues_abnormal, normal_log, "bgl", [], 0) == pytest.approx(0.8)


def test_coherence_at_weight_zero_never_runs_the_lm():
    def refuse(texts):
        raise AssertionError("the LM ran at coherence weight 0")

    cfg = CFG.model_copy(update={"coherence_weight": 0.0})
    assert coherence_reward([completion(GOOD, "abnormal")], [1], cfg=cfg, perplexity=refuse) == [0.0]


def test_brevity_keeps_a_vacuous_rationale_from_earning_the_whole_think_reward():
    """The checks pass vacuously on a rationale that quotes and cites nothing: brevity is what stops it."""
    vacuous = completion("`ciod`: so the log is abnormal.", "abnormal")
    full = total_reward(completion(GOOD, "abnormal"), 1, LOG, GOOD, CFG, fixed_ppl(20.0), "bgl")
    short = total_reward(vacuous, 1, LOG, GOOD, CFG, fixed_ppl(20.0), "bgl")
    assert short["faithfulness"] == 1.0 and short["brevity"] < 0.5
    assert short["total"] < full["total"]


def test_brevity_peaks_at_the_reference_length_and_falls_off_both_ways():
    ref = " ".join(["w"] * 30)
    assert brevity_score(" ".join(["w"] * 30), ref) == 1.0
    near, far, short = (brevity_score(" ".join(["w"] * n), ref) for n in (36, 90, 10))
    assert 1.0 > near > far and far == 0.0
    assert short == pytest.approx(0.0)


def test_coherence_falls_as_perplexity_rises():
    values = [coherence_score(p, 1000.0) for p in (1.0, 10.0, 100.0, 1000.0, 1e6, float("inf"))]
    assert values == sorted(values, reverse=True)
    assert values[0] == 1.0 and values[3] == 0.0 and values[-1] == 0.0


@pytest.mark.slow
def test_the_frozen_lm_finds_a_fluent_rationale_more_coherent_than_word_salad(base_model_dir):
    from tasks.training.rewards import perplexity_scorer

    scorer = perplexity_scorer(str(base_model_dir), 4)
    salad = "node the Deduction ciod map it from abnormal daemon creating is so file job launches the BGL"
    fluent, shuffled = scorer([GOOD, salad])
    assert fluent < shuffled
    texts = [completion(GOOD, "abnormal"), completion(salad, "abnormal")]
    cfg = CFG.model_copy(update={"coherence_weight": 0.3})  # off in the shipped table
    good, bad = coherence_reward(texts, [1, 1], cfg=cfg, perplexity=scorer)
    assert good > bad >= 0.0
    assert scorer is perplexity_scorer(str(base_model_dir), 4), "the LM is loaded once"


def test_a_verdict_task_completion_is_read_in_its_own_format_and_earns_no_think_part():
    """The verdict task (the scored answer word the gate measures) is trained by GRPO with the same answer table;
    its completion is `<answer>x</answer>` alone, so the explain format would call it invalid."""
    texts = ["<answer>abnormal</answer>", "<answer>Normal</answer>", completion(GOOD, "abnormal"), "abnormal"]
    task = ["verdict"] * 4
    kwargs = {"completions": texts, "label": [1, 1, 1, 1], "template": [LOG] * 4, "rationale": [REFERENCE] * 4,
              "task": task, "dataset": ["bgl"] * 4}
    assert format_reward(**kwargs, cfg=CFG) == [CFG.format_valid] * 2 + [CFG.format_invalid] * 2
    answers = answer_reward(**kwargs, cfg=CFG)
    assert answers[0] == CFG.answer_true_abnormal and answers[1] < answers[0]
    assert faithfulness_reward(**kwargs) == [0.0] * 4 and brevity_reward(**kwargs) == [0.0] * 4
    explain = {**kwargs, "task": ["explain"] * 4}
    assert format_reward(**explain, cfg=CFG)[:2] == [CFG.format_invalid] * 2  # no <think>: invalid there
    assert faithfulness_reward(**explain)[2] > 0
