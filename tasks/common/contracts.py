"""The files several modules read, as typed definitions: who writes them and what each key means.

- `metrics.json` (`Metrics`): written by the evaluate stage; read by the gate, the registry, the release
  flow and the model card.
- `.serve/state.json` (`ServeState`): written by serving.server on a successful deploy; read by the client,
  `detect`, the deploy flow and `rationanomaly serve --status`.
- `reports/sft.json`, `reports/grpo.json` (`SftReport`, `GrpoReport`, sharing `TrainingReport`): written by the
  training stages (tasks.training.stage); read by the train flow's summary and the retrain summary.

These are TypedDicts: JSON in, JSON out, with the shape written down once. `CANDIDATE` is the candidate's
method name in every metrics table.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

# A registered version's artifact naming its base model (folder + weights sha256): written by the registry,
# read by serving.resolve and the pyfunc model.
BASE_REF_FILE = "base_model_ref.json"
# The candidate's verdict threshold and its validation figures: written by evaluate, stored in the registered
# adapter folder, read by serving, detect, the client and the pyfunc model.
CALIBRATION_FILE = "calibration.json"
# A registered version's retrieval index folder, beside its adapter folder (artifacts/index, artifacts/adapter).
INDEX_ARTIFACT = "index"
CANDIDATE = "rationanomaly"  # the method name of the candidate the gate judges, in metrics.json and reports
# lexical, classical and retrieval baselines (baselines.py); the paired "best baseline" is the best of these
RULE_METHODS = ("keywords", "tfidf_lr", "classical", "knn_1", "knn_vote")
LLM_BASELINES = ("zero_shot", "sft_only")  # the base model alone; the SFT adapter (paper's "without RL")


class SetMetrics(TypedDict, total=False):
    """One method on one test set. Counts are items (templates, sessions, log lines or windows); rates and
    F1 are in [0, 1]; intervals are [low, high] 95% stratified bootstrap bounds (None when a class has
    fewer than 2 items).

    `f1` is abnormal-class F1 (the primary figure); `macro_f1` the unweighted mean of both classes' F1 and
    `weighted_f1` their support-weighted mean (what averaged tables report). `confusion_matrix` is
    [[TN, FP], [FN, TP]] with abnormal = positive. A set without anomalies (positives_expected False)
    reports `false_alarm_rate` instead of intervals of F1. The format fields are None for methods that
    write no answer (the lexical and retrieval baselines).
    """

    n: int
    n_abnormal: int
    precision: float
    recall: float
    f1: float
    f1_ci: list[float] | None
    macro_f1: float
    macro_f1_ci: list[float] | None
    weighted_f1: float
    false_alarm_rate: float
    false_alarm_rate_ci: list[float] | None
    average_precision: float  # of the verdict score, for methods that have one
    disagreement_rate: float  # share of written answers whose word differs from the scored verdict
    accuracy: float
    confusion_matrix: list[list[int]]
    format_valid_rate: float | None
    format_invalid: int | None
    format_invalid_abnormal: int
    mean_rationale_words: float | None
    templates_per_s: float
    n_templates: int


class MethodSpeed(TypedDict):
    """How fast a method classified its unique templates (model loading excluded)."""

    engine: str
    unique_templates: int
    seconds: float
    templates_per_s: float


class TestDataSummary(TypedDict):
    """What every method was scored on: a content digest per test set (`template_bgl`, `session_hdfs`, ...)
    so metrics measured on other data are never compared, and the counts."""

    digests: dict[str, str]
    sets: dict[str, dict[str, Any]]  # per set: family, items, abnormal, note
    templates: dict[str, dict[str, int]]
    sessions: dict[str, dict[str, int]]
    served: dict[str, Any]  # how the served-path sets were built (lines, mined and matched templates)
    validation: dict[str, int]  # the fold the thresholds were fitted on
    unique_templates_classified: int
    train_templates: int


class Metrics(TypedDict):
    """reports/metrics.json: every method on every test set (`methods[method][set]`)."""

    schema: int  # 2: every test item, intervals, served path, calibration
    engine: str | None
    engine_notes: list[str]
    candidate: str
    methods: dict[str, dict[str, SetMetrics]]
    differences: dict[str, dict[str, Any]]  # per set: candidate − best baseline / − sft_only, paired, with interval
    calibration: dict[str, dict[str, Any]]  # per scored method: the threshold and its validation figures
    ablations: dict[str, str]  # method name → what it leaves out
    # faithfulness of the candidate's rationales (tasks.evaluate.rationale_summary, issue 19): detect's policy,
    # per set and pooled the `shown` and `all` faithfulness_report, examples per verdict from BGL_2k/Thunderbird_2k
    rationales: dict[str, Any]
    speed: dict[str, MethodSpeed]
    test_data: TestDataSummary
    bootstrap: dict[str, Any]
    params: dict[str, Any]
    created_at: str
    mlflow_run_id: NotRequired[str]
    # the classical baseline's fits, per dataset and "*" (the default for a system without training templates):
    # training templates, chosen C, threshold with its bootstrap interval and per-fold values, out-of-fold figures
    classical: NotRequired[dict[str, dict[str, Any]]]
    # what the prompts showed on the test split (issue 18): the index policy and, per dataset, recall@k, shares
    # of prompts showing any neighbour / one below the floor, neighbours from another system
    # (tasks.evaluation.retrieval_quality)
    retrieval: NotRequired[dict[str, Any]]


class ServeState(TypedDict):
    """.serve/state.json: the live vLLM endpoint after a deploy passed its health and smoke checks."""

    model: str  # registered model name
    version: str  # registry version served
    served_model: str  # the name to send in requests (the adapter's name under LoRA serving)
    base_served_model: str | None  # the base model's served name under LoRA serving (smoke "adapter active" rule)
    host: str
    port: int
    pid: int
    started_at: str  # ISO 8601, UTC
    ready_s: float  # seconds from start to /health
    base: str
    adapter: str | None
    merged: bool
    model_dir: str
    log: str
    api_key_env: str | None
    special_tokens: list[str]  # the served tokenizer's special tokens, defanged in log text by every client
    threshold: float | None  # the version's verdict threshold (calibration.json); None: the rationale's word decides
    index_dir: str | None  # the version's retrieval index folder (None: its prompts carry no neighbours)
    neighbours: int  # labelled neighbours per prompt
    launch: dict[str, Any]  # serving.server.launch_settings: a deploy of the live version with others relaunches
    smoke: dict[str, Any]


class TrainingReport(TypedDict, total=False):
    """What reports/sft.json and reports/grpo.json both say, under one name each (tasks.training.stage writes it
    for both stages; training_meta.json in the adapter folder adds `params` and `versions`).

    Times are seconds: `wall_time_s` of `trainer.train` (this run only, after any resume), `s_per_step` and
    `cpu_s_per_step` (CPU seconds of all threads) per step trained in this run. `examples` are the training rows
    (SFT examples, GRPO prompts) after `dropped_too_long` were dropped; `repeated_abnormal` counts the anomalies
    repeated to the balance fraction. `train_loss` is the Trainer's mean loss over this run's steps.
    """

    stage: str
    steps: int
    wall_time_s: float
    s_per_step: float
    cpu_s_per_step: float
    resumed_from_step: int
    trainable_params: int
    total_params: int
    examples: int
    dropped_too_long: int
    repeated_abnormal: int
    launcher: str  # "accelerate" or "in-process"
    world_size: int
    train_loss: float | None
    data_file: str
    data_sha256: str
    base_model_dir: str
    base_model_sha256: str | None
    mlflow_run_id: str | None
    adapter_sha256: str | None


class SftReport(TrainingReport, total=False):
    """reports/sft.json: the shared facts, the loss at the first and last logging step, the masked prompt size."""

    first_loss: float | None
    final_loss: float | None
    prompt_tokens_masked_first_example: int


class GrpoReport(TrainingReport, total=False):
    """reports/grpo.json: the shared facts, every reward component at the first and last step (and the mean of
    the first and last quarter of the steps), and the SFT adapter it continued from."""

    first_rewards: dict[str, float]
    final_rewards: dict[str, float]
    first_window_mean: dict[str, float | None]
    final_window_mean: dict[str, float | None]
    sft_adapter_dir: str | None
    sft_adapter_sha256: str | None


# Which explain prompt (tasks.common.prompt: `prompt_messages` with or without `verdict`) a registered version was
# trained on, recorded with it (calibration.json `prompt_format`, written by the registry): 1, the open question
# (versions registered before issue 19: told the verdict, they write an unrelated answer, so serving asks them the
# open question); 2, given the verdict.
OPEN_QUESTION_FORMAT, GIVEN_VERDICT_FORMAT = 1, 2
PROMPT_FORMAT = GIVEN_VERDICT_FORMAT  # what this code trains (kept here, not in prompt.py: a training dependency)


def explain_verdict(verdict: str | None, prompt_format: int) -> str | None:
    """The verdict to put in the explain prompt of a version of `prompt_format`: `verdict` for one trained given
    the verdict, None (the open question) for an older one."""
    return verdict if prompt_format >= GIVEN_VERDICT_FORMAT else None
