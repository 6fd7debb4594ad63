"""What every training stage does the same way before its first step and around its run.

`read_inputs` checks the data and the base model (cheap, before anything loads), `trainer_arguments` gives
the Trainer arguments both trl configs share, `Prepared` is what a stage has built once it may start, and
`log_run_start` records params, digests and the training data in the stage's MLflow run.

`train_and_report` is the one train-and-report frame of sft and grpo (issue 19 item 5): MLflow stage run and
callbacks, resume from the chosen checkpoint, timing, the shared report (`TrainingReport`, one name per fact),
the all-or-nothing adapter with its training_meta.json, reports/<stage>.json, the final MLflow metrics
(`RUN_METRICS`) and checkpoint cleanup. A stage passes only what differs: its own report fields, a refusal
rule for the trained adapter, and extra outputs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.config import resolve_path
from tasks.common.contracts import TrainingReport
from tasks.common.files import sha256_file, write_json_atomic
from tasks.common.settings import TrainingSettings
from tasks.common.tracking import flatten_params
from tasks.training.callbacks import install_callbacks
from tasks.training.checkpoints import Resume, publish_adapter
from tasks.training.launch import is_main_process, report_process, stage_tracking, topology
from tasks.training.model import (
    base_model_sha256,
    has_accelerator,
    library_versions,
    require_base_model,
    seed_everything,
)
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


SHARED_REPORT_KEYS = tuple(TrainingReport.__annotations__)
# The figures logged as MLflow metrics at the end of every training stage's run, named as in its report.
RUN_METRICS = ("steps", "wall_time_s", "s_per_step", "cpu_s_per_step", "train_loss", "trainable_params",
               "total_params", "examples")


@dataclass
class RunStats:
    """What one `trainer.train` call did: steps reached, wall and CPU seconds of this run, the Trainer's mean loss,
    the rows it trained on and how it ran (launcher, processes)."""

    steps: int
    wall_s: float
    cpu_s: float
    train_loss: float | None
    examples: int
    launcher: str
    world_size: int


def shared_report(stage: str, settings: TrainingSettings, prepared: Prepared, stats: RunStats,
                  mlflow_run_id: str | None) -> dict[str, Any]:
    """The `TrainingReport` fields of a run (`adapter_sha256` None until the adapter is published).

    Per-step times divide by the steps trained in this run (after `resumed_from_step`), at least 1.
    """
    trained = max(1, stats.steps - prepared.resume.step)
    report = {
        "stage": stage,
        "steps": stats.steps,
        "wall_time_s": round(stats.wall_s, 1),
        "s_per_step": round(stats.wall_s / trained, 3),
        # CPU seconds of all threads: what a step costs, whatever the neighbours on a shared machine do
        "cpu_s_per_step": round(stats.cpu_s / trained, 3),
        "resumed_from_step": prepared.resume.step,
        "trainable_params": prepared.trainable,
        "total_params": prepared.total,
        "examples": stats.examples,
        "dropped_too_long": prepared.dropped,
        "repeated_abnormal": prepared.inputs.repeated_abnormal,
        "launcher": stats.launcher,
        "world_size": stats.world_size,
        "train_loss": stats.train_loss,
        "data_file": settings.data_file,
        "data_sha256": prepared.inputs.data_sha,
        "base_model_dir": settings.base_model_dir,
        "base_model_sha256": prepared.inputs.base_sha,
        # lets an auditor holding only the adapter folder find the run that made it
        "mlflow_run_id": mlflow_run_id,
        "adapter_sha256": None,
    }
    assert tuple(report) == SHARED_REPORT_KEYS, "TrainingReport and shared_report must list the same keys"
    return report


def with_stage_fields(report: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`report` plus a stage's own fields; ValueError when the stage would rename or overwrite a shared fact."""
    clash = sorted(set(own) & set(SHARED_REPORT_KEYS))
    if clash:
        raise ValueError(f"stage report fields {clash} are shared facts: tasks.training.stage writes them")
    return {**report, **own}


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The `RUN_METRICS` of a report, as MLflow metrics (None values left out)."""
    return {key: float(report[key]) for key in RUN_METRICS if report.get(key) is not None}


def train_and_report(
    stage: str,
    settings: TrainingSettings,
    prepared: Prepared,
    own_fields: Callable[[Any], dict[str, Any]],
    *,
    refuse: Callable[[str], None] | None = None,
    write_outputs: Callable[[Any], list[Path]] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train `prepared.trainer` from `prepared.resume`, publish the adapter and report; returns the report written
    to `settings.report_file` (training_meta.json holds the same plus `params` and `versions`).

    `own_fields(trainer)` gives the stage's own report fields after training; `refuse(adapter_digest)` may raise
    to keep the old adapter folder (nothing is then published nor reported); `write_outputs(trainer)` writes the
    stage's extra files on the main process and returns them to log as MLflow artifacts; `tags` go on the MLflow
    run. Checkpoints are removed after success unless `keep_checkpoints`. Raises what the Trainer and the hooks
    raise, and ValueError when `own_fields` names a shared fact.
    """
    trainer = prepared.trainer
    with stage_tracking(stage) as mlflow:
        install_callbacks(trainer, stage, mlflow)
        log_run_start(mlflow, settings, prepared, **(tags or {}))
        started, cpu_started = time.monotonic(), time.process_time()
        result = trainer.train(resume_from_checkpoint=prepared.resume.checkpoint)
        wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
        report_process(stage, trainer)
        where = topology(trainer)
        stats = RunStats(
            steps=int(trainer.state.global_step),
            wall_s=wall,
            cpu_s=cpu,
            train_loss=float(result.training_loss) if result.training_loss is not None else None,
            examples=len(trainer.train_dataset),
            launcher=where["launcher"],
            world_size=where["world_size"],
        )
        run_id = mlflow.active_run().info.run_id if mlflow is not None else None
        report = with_stage_fields(shared_report(stage, settings, prepared, stats, run_id), own_fields(trainer))
        provenance = {"params": settings.model_dump(), "versions": library_versions()}

        def meta(digest: str) -> dict[str, Any]:
            if refuse is not None:
                refuse(digest)
            return {**report, "adapter_sha256": digest, **provenance}

        report["adapter_sha256"] = publish_adapter(trainer, prepared.out_dir, meta)
        if is_main_process():
            artifacts = write_outputs(trainer) if write_outputs is not None else []
            write_json_atomic(resolve_path(settings.report_file), report)
            if mlflow is not None:
                mlflow.log_metrics(run_metrics(report))
                for path in (*artifacts, prepared.out_dir / "training_meta.json"):
                    mlflow.log_artifact(str(path))
            if not settings.keep_checkpoints:
                shutil.rmtree(prepared.ckpt_dir, ignore_errors=True)
    return report
