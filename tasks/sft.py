"""sft stage: CoT supervised fine-tuning of a LoRA adapter on the distilled rationales and verdicts.

trl SFTTrainer on a conversational prompt/completion dataset: the prompt (system + user) is rendered with
the base model's chat template and masked out of the loss (labels -100), so the model learns only the
assistant turn: `<think>…</think><answer>…</answer>` (explain task) or `<answer>…</answer>` (verdict task,
the one the calibrated score reads). The SmolLM2 template has no `{% generation %}`
markers, so trl's `assistant_only_loss` would fail on it; completion-only loss works with any template, and
`check_prompt_masked` verifies it on the tokenised data before training starts.

Checkpoints go to `checkpoint_dir` (git-ignored, not a DVC out, so DVC never deletes them) every
`save_steps`; with `resume: auto` a killed run continues from the last complete checkpoint whose
fingerprint (params + data + base model hashes) matches. The adapter folder is published all-or-nothing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

from tasks.common.config import resolve_path
from tasks.common.errors import InputError
from tasks.common.files import sha256_json, write_json_atomic
from tasks.common.prompt import ANSWER_OPEN, defang_messages
from tasks.common.settings import SftSettings, load_settings
from tasks.common.tokenizers import special_tokens_of
from tasks.training.callbacks import install_callbacks
from tasks.training.checkpoints import prepare_checkpoints, publish_adapter
from tasks.training.launch import (
    is_main_process,
    relaunch_with_accelerate,
    report_process,
    stage_tracking,
    topology,
)
from tasks.training.model import (
    count_parameters,
    library_versions,
    lora_config,
    require_base_model,
    set_torch_threads,
    torch_dtype,
)
from tasks.training.records import load_sft_records
from tasks.training.stage import Prepared, load_tokenizer, log_run_start, read_inputs, trainer_arguments

STAGE = "sft"


def build_dataset(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[Any, int]:
    """prompt/completion rows that fit in `max_length` tokens; returns (dataset, number dropped as too long).

    A truncated example would lose its `<answer>` and teach the model to stop mid-rationale, so it is dropped.
    """
    from datasets import Dataset

    rows, dropped = [], 0
    special = special_tokens_of(tokenizer)
    for r in records:
        prompt = defang_messages(r["prompt"], special)  # the log text must not carry this tokenizer's controls
        ids = tokenizer.apply_chat_template(prompt + r["completion"], tokenize=True, return_dict=False)
        if len(ids) > max_length:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "completion": r["completion"]})
    return Dataset.from_list(rows), dropped


def check_prompt_masked(trainer: Any, tokenizer: Any) -> int:
    """Assert the loss sees only the assistant turn: prompt tokens are -100, the rest starts at `<think>` (the
    explain task) or `<answer>` (the verdict task)."""
    example = trainer.train_dataset[0]
    labels = example["labels"]
    masked = sum(1 for x in labels if x == -100)
    trained = tokenizer.decode([x for x in labels if x != -100])
    if masked == 0 or not trained.lstrip().startswith(("<think>", ANSWER_OPEN)):
        raise RuntimeError(
            f"completion-only loss is not in effect: {masked} masked tokens, trained text "
            f"starts {trained[:60]!r}; the prompt would be trained on"
        )
    return masked


@dataclass
class PreparedSft(Prepared):
    """What the sft stage built before its first step, plus its own counts."""

    masked: int = 0  # prompt tokens masked out of the loss in the first example


def prepare_sft(settings: SftSettings, *, full_finetune: bool = False) -> PreparedSft:
    """Check the inputs (data, base model, LoRA targets), build the trainer and pick the checkpoint to resume.

    `full_finetune` trains every weight instead of a LoRA adapter (bench/levers.py measures it against LoRA;
    the pipeline's grpo, registry and serving take a LoRA adapter).

    Raises InputError (naming file and field) for bad data, a missing base model, LoRA targets that do not
    exist, or data that is all longer than `max_length`; RuntimeError when the prompt would be trained on.
    """
    threads = set_torch_threads(settings.torch_threads)  # first: OpenMP reads its wait policy as torch loads
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    inputs = read_inputs(settings, STAGE)
    tokenizer = load_tokenizer(inputs.base_dir)
    dataset, dropped = build_dataset(inputs.records, tokenizer, settings.max_length)
    if len(dataset) == 0:
        raise InputError(
            inputs.data_file,
            f"every example is longer than max_length={settings.max_length} tokens",
            field="sft.max_length",
            hint="raise sft.max_length or shorten the rationales",
        )
    model = AutoModelForCausalLM.from_pretrained(str(inputs.base_dir), dtype=torch_dtype(settings.bf16))
    lora = lora_config(settings.lora, model, STAGE)

    ckpt_dir = resolve_path(settings.checkpoint_dir)
    fingerprint = sha256_json({"params": settings.training_fingerprint_params(), "data": inputs.data_sha,
                               "base": inputs.base_sha})
    resume = prepare_checkpoints(ckpt_dir, fingerprint, settings.resume)
    print(
        f"[{STAGE}] {len(dataset)} examples ({inputs.repeated_abnormal} repeated anomalies, "
        f"{dropped} longer than {settings.max_length} tokens dropped); "
        f"{resume.reason}; {threads} torch thread(s)",
        flush=True,
    )

    config = SFTConfig(
        **trainer_arguments(settings, ckpt_dir),
        warmup_steps=settings.warmup_steps,
        max_length=settings.max_length,
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=None if full_finetune else lora)
    masked = check_prompt_masked(trainer, tokenizer)
    trainable, total = count_parameters(trainer.model)
    if trainable == 0:
        raise RuntimeError("the LoRA adapter has no trainable parameters; training would change nothing")
    return PreparedSft(trainer, inputs, resolve_path(settings.out_dir), ckpt_dir, resume, dropped, trainable, total,
                       masked)


def run(settings: SftSettings) -> dict[str, Any]:
    """Train the SFT adapter; returns the metadata written to training_meta.json (reports/sft.json is its
    summary). Raises what `prepare_sft` raises, before the first step."""
    prep = prepare_sft(settings)
    trainer, resume, out_dir = prep.trainer, prep.resume, prep.out_dir
    trainable, total, data_sha, base_sha = prep.trainable, prep.total, prep.inputs.data_sha, prep.inputs.base_sha
    with stage_tracking(STAGE) as mlflow:
        install_callbacks(trainer, STAGE, mlflow)
        log_run_start(mlflow, settings, prep)
        started, cpu_started = time.monotonic(), time.process_time()
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
        runtime, cpu = time.monotonic() - started, time.process_time() - cpu_started
        steps = int(trainer.state.global_step)
        report_process(STAGE, trainer)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

        meta = {
            "stage": STAGE,
            "steps": steps,
            "runtime_s": round(runtime, 1),
            "s_per_step": round(runtime / max(1, steps - resume.step), 3),
            # CPU seconds of all threads: what a step costs, whatever the neighbours on a shared machine do
            "cpu_s_per_step": round(cpu / max(1, steps - resume.step), 3),
            "resumed_from_step": resume.step,
            "trainable_params": trainable,
            "total_params": total,
            "examples": len(trainer.train_dataset),
            "dropped_too_long": prep.dropped,
            "repeated_abnormal": prep.inputs.repeated_abnormal,
            "prompt_tokens_masked_first_example": prep.masked,
            **topology(trainer),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_loss": float(result.training_loss) if result.training_loss is not None else None,
            "data_file": settings.data_file,
            "data_sha256": data_sha,
            "base_model_dir": settings.base_model_dir,
            "base_model_sha256": base_sha,
            "params": settings.model_dump(),
            "versions": library_versions(),
            # lets an auditor holding only the adapter folder find the run that made it
            "mlflow_run_id": mlflow.active_run().info.run_id if mlflow is not None else None,
        }
        meta["adapter_sha256"] = publish_adapter(trainer, out_dir, lambda digest: {**meta, "adapter_sha256": digest})
        if is_main_process():
            report = {k: v for k, v in meta.items() if k not in ("params", "versions")}
            write_json_atomic(resolve_path(settings.report_file), report)
            if mlflow is not None:
                mlflow.log_metrics(
                    {
                        "runtime_s": runtime,
                        "trainable_params": trainable,
                        "total_params": total,
                        "steps": steps,
                        "examples": len(trainer.train_dataset),
                    }
                )
                mlflow.log_artifact(str(out_dir / "training_meta.json"))
            if not settings.keep_checkpoints:
                shutil.rmtree(prep.ckpt_dir, ignore_errors=True)
    return meta


def main() -> None:
    settings = load_settings().sft
    # Fail on bad input here, before any process is launched.
    load_sft_records(resolve_path(settings.data_file))
    require_base_model(settings.base_model_dir, f"{STAGE}.base_model_dir")
    if relaunch_with_accelerate(STAGE, settings.accelerate_config):
        return
    meta = run(settings)
    if is_main_process():
        print(
            f"[{STAGE}] done: {meta['steps']} steps in {meta['runtime_s']} s, final loss {meta['final_loss']}, "
            f"adapter → {settings.out_dir}",
            flush=True,
        )


if __name__ == "__main__":
    main()
