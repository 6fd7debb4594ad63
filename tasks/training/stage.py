"""What every training stage does the same way before its first step and around its run.

`read_inputs` checks the data and the base model (cheap, before anything loads), `trainer_arguments` gives
the Trainer arguments both trl configs share, `Prepared` is what a stage has built once it may start, and
`log_run_start` records params, digests and the training data in the stage's MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.config import resolve_path
from tasks.common.files import sha256_file
from tasks.common.settings import TrainingSettings
from tasks.common.tracking import flatten_params
from tasks.training.checkpoints import Resume
from tasks.training.model import base_model_sha256, has_accelerator, require_base_model, seed_everything
from tasks.training.records import balance_classes, load_sft_records, log_training_data


@dataclass
class TrainingInputs:
    """The checked inputs of a training stage: records (anomalies repeated to the balance fraction), base model,
    and the sha256 digests the checkpoint fingerprint and lineage use."""

    data_file: Path
    records: list[dict[str, Any]]
    repeated_abnormal: int
    base_dir: Path
    data_sha: str
    base_sha: str | None


def read_inputs(settings: TrainingSettings, stage: str) -> TrainingInputs:
    """Read, check and balance the SFT records, and check the base model folder; then seed every RNG.

    Raises InputError naming the file, line and field (see `load_sft_records`, `balance_classes`,
    `require_base_model`).
    """
    data_file = resolve_path(settings.data_file)
    records = load_sft_records(data_file)
    records, repeated = balance_classes(records, settings.balance_abnormal_fraction, settings.seed,
                                        f"{stage}.balance_abnormal_fraction")
    base_dir = require_base_model(settings.base_model_dir, f"{stage}.base_model_dir")
    seed_everything(settings.seed)
    return TrainingInputs(data_file, records, repeated, base_dir, sha256_file(data_file), base_model_sha256(base_dir))


def load_tokenizer(folder: Path, *, left_padding: bool = False) -> Any:
    """The tokenizer of `folder`, with the EOS token as padding when it has none (SmolLM2 has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if left_padding:
        tokenizer.padding_side = "left"
    return tokenizer


def trainer_arguments(settings: TrainingSettings, ckpt_dir: Path) -> dict[str, Any]:
    """The TrainingArguments SFTConfig and GRPOConfig both take from the settings: steps, batch, optimiser,
    checkpoints every `save_steps` (two kept), seeds, precision, CPU when no accelerator, no tqdm, no reporters
    (our own callbacks log)."""
    return {
        "output_dir": str(ckpt_dir),
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.per_device_train_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler_type,
        "logging_steps": settings.logging_steps,
        "save_strategy": "steps",
        "save_steps": settings.save_steps,
        "save_total_limit": 2,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "bf16": settings.bf16,
        "use_cpu": not has_accelerator(),
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


@dataclass
class Prepared:
    """Everything a training stage checked and built before its first step."""

    trainer: Any
    inputs: TrainingInputs
    out_dir: Path
    ckpt_dir: Path
    resume: Resume
    dropped: int  # examples longer than the stage's length limit
    trainable: int  # trainable parameters
    total: int  # all parameters


def log_run_start(mlflow: Any, settings: TrainingSettings, prepared: Prepared, **tags: str) -> None:
    """Params, digest tags and the training data (as an MLflow dataset) in the stage run; no-op off rank 0."""
    if mlflow is None:
        return
    mlflow.log_params(flatten_params(settings.model_dump()))
    mlflow.set_tags({"data_sha256": prepared.inputs.data_sha, "base_model_sha256": str(prepared.inputs.base_sha),
                     "resumed_from_step": str(prepared.resume.step), **tags})
    log_training_data(prepared.inputs.data_file)
