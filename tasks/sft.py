"""sft stage: CoT supervised fine-tuning of a LoRA adapter on the distilled rationales.

trl SFTTrainer on a conversational prompt/completion dataset: the prompt (system + user) is rendered with
the base model's chat template and masked out of the loss (labels -100), so the model learns only the
assistant turn `<think>…</think><answer>…</answer>`. The SmolLM2 template has no `{% generation %}`
markers, so trl's `assistant_only_loss` would fail on it; completion-only loss works with any template, and
`check_prompt_masked` verifies it on the tokenised data before training starts.

Checkpoints go to `checkpoint_dir` (git-ignored, not a DVC out, so DVC never deletes them) every
`save_steps`; with `resume: auto` a killed run continues from the last complete checkpoint whose
fingerprint (params + data + base model hashes) matches. The adapter folder is published all-or-nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from tasks import training as T
from tasks.common.tokenizers import special_tokens_of
from tasks.config import section
from tasks.prompt import defang_messages

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
    """Assert the loss sees only the assistant turn: prompt tokens are -100, the rest starts at `<think>`."""
    example = trainer.train_dataset[0]
    labels = example["labels"]
    masked = sum(1 for x in labels if x == -100)
    trained = tokenizer.decode([x for x in labels if x != -100])
    if masked == 0 or not trained.lstrip().startswith("<think>"):
        raise RuntimeError(
            f"completion-only loss is not in effect: {masked} masked tokens, trained text "
            f"starts {trained[:60]!r}; the prompt would be trained on"
        )
    return masked


@dataclass
class PreparedSft:
    """Everything checked and built before the first training step."""

    trainer: Any
    records: list[dict[str, Any]]
    data_file: Path
    data_sha: str
    base_sha: str | None
    out_dir: Path
    ckpt_dir: Path
    resume: T.Resume
    examples: int
    dropped: int
    masked: int
    trainable: int
    total: int
    repeated_abnormal: int = 0


def prepare_sft(params: dict[str, Any]) -> PreparedSft:
    """Check the inputs (data, base model, LoRA targets), build the trainer and pick the checkpoint to resume."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data_file = T.resolve(params["data_file"])
    records = T.load_sft_records(data_file)
    records, repeated = T.balance_classes(records, params.get("balance_abnormal_fraction"), int(params["seed"]),
                                          "sft.balance_abnormal_fraction")
    base_dir = T.require_base_model(params["base_model_dir"], f"{STAGE}.base_model_dir")
    data_sha, base_sha = T.file_sha256(data_file), T.base_model_sha256(base_dir)

    T.seed_everything(int(params["seed"]))
    threads = T.set_torch_threads(params.get("torch_threads", "auto"))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, dropped = build_dataset(records, tokenizer, int(params["max_length"]))
    if len(dataset) == 0:
        raise T.InputError(
            data_file,
            f"every example is longer than max_length={params['max_length']} tokens",
            field="sft.max_length",
            hint="raise sft.max_length or shorten the rationales",
        )
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=T.torch_dtype(params))
    lora = T.lora_config(params["lora"], model, STAGE)

    ckpt_dir = T.resolve(params["checkpoint_dir"])
    fingerprint = T.params_hash({"params": T.training_params(params), "data": data_sha, "base": base_sha})
    resume = T.prepare_checkpoints(ckpt_dir, fingerprint, params.get("resume", "auto"))
    print(
        f"[{STAGE}] {len(dataset)} examples ({repeated} repeated anomalies, "
        f"{dropped} longer than {params['max_length']} tokens dropped); "
        f"{resume.reason}; {threads} torch thread(s)",
        flush=True,
    )

    config = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=int(params["max_steps"]),
        per_device_train_batch_size=int(params["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(params["gradient_accumulation_steps"]),
        learning_rate=float(params["learning_rate"]),
        lr_scheduler_type=str(params.get("lr_scheduler_type", "linear")),
        warmup_steps=int(params.get("warmup_steps", 0)),
        max_length=int(params["max_length"]),
        completion_only_loss=True,
        packing=False,
        logging_steps=int(params["logging_steps"]),
        save_strategy="steps",
        save_steps=int(params["save_steps"]),
        save_total_limit=2,
        seed=int(params["seed"]),
        data_seed=int(params["seed"]),
        bf16=bool(params.get("bf16", False)),
        use_cpu=not T.has_accelerator(),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    masked = check_prompt_masked(trainer, tokenizer)
    trainable, total = T.count_parameters(trainer.model)
    if trainable == 0:
        raise RuntimeError("the LoRA adapter has no trainable parameters; training would change nothing")
    return PreparedSft(
        trainer,
        records,
        data_file,
        data_sha,
        base_sha,
        T.resolve(params["out_dir"]),
        ckpt_dir,
        resume,
        len(dataset),
        dropped,
        masked,
        trainable,
        total,
        repeated,
    )


def run_sft(params: dict[str, Any]) -> dict[str, Any]:
    """Train the SFT adapter from `params` (the `sft` section); returns the metrics written to reports/sft.json."""
    prep = prepare_sft(params)
    trainer, resume, out_dir = prep.trainer, prep.resume, prep.out_dir
    trainable, total, data_sha, base_sha = prep.trainable, prep.total, prep.data_sha, prep.base_sha
    with T.stage_tracking(STAGE) as mlflow:
        T.install_callbacks(trainer, STAGE, mlflow)
        if mlflow is not None:
            mlflow.log_params(T.flatten(params))
            mlflow.set_tags(
                {"data_sha256": data_sha, "base_model_sha256": str(base_sha), "resumed_from_step": str(resume.step)}
            )
            T.log_training_data(prep.data_file)
        started, cpu_started = time.monotonic(), time.process_time()
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
        runtime, cpu = time.monotonic() - started, time.process_time() - cpu_started
        steps = int(trainer.state.global_step)
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
            "examples": prep.examples,
            "dropped_too_long": prep.dropped,
            "repeated_abnormal": prep.repeated_abnormal,
            "prompt_tokens_masked_first_example": prep.masked,
            "launcher": "accelerate" if os.environ.get(T.LAUNCHED_ENV) else "in-process",
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_loss": float(result.training_loss) if result.training_loss is not None else None,
            "data_file": str(params["data_file"]),
            "data_sha256": data_sha,
            "base_model_dir": str(params["base_model_dir"]),
            "base_model_sha256": base_sha,
            "params": params,
            "versions": T.library_versions(),
            # lets an auditor holding only the adapter folder find the run that made it
            "mlflow_run_id": mlflow.active_run().info.run_id if mlflow is not None else None,
        }
        meta["adapter_sha256"] = T.publish_adapter(trainer, out_dir, lambda digest: {**meta, "adapter_sha256": digest})
        if T.is_main_process():
            report = {k: v for k, v in meta.items() if k not in ("params", "versions")}
            T.write_json(T.resolve(params["report_file"]), report)
            if mlflow is not None:
                mlflow.log_metrics(
                    {
                        "runtime_s": runtime,
                        "trainable_params": trainable,
                        "total_params": total,
                        "steps": steps,
                        "examples": prep.examples,
                    }
                )
                mlflow.log_artifact(str(out_dir / "training_meta.json"))
            if not params.get("keep_checkpoints", False):
                shutil.rmtree(prep.ckpt_dir, ignore_errors=True)
    return meta


@task(name="sft")
def sft_task(params: dict[str, Any]) -> dict[str, Any]:
    """Prefect wrapper (flows normally run the stage through DVC; this is for direct composition)."""
    return run_sft(params)


def main() -> None:
    params = section(STAGE)
    # Fail on bad input here, before any process is launched.
    T.load_sft_records(T.resolve(params["data_file"]))
    T.require_base_model(params["base_model_dir"], f"{STAGE}.base_model_dir")
    if T.relaunch_with_accelerate(STAGE, params.get("accelerate_config")):
        return
    meta = run_sft(params)
    if T.is_main_process():
        print(
            f"[{STAGE}] done: {meta['steps']} steps in {meta['runtime_s']} s, final loss {meta['final_loss']}, "
            f"adapter → {params['out_dir']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
