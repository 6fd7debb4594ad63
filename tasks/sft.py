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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.common.config import resolve_path
from tasks.common.errors import InputError
from tasks.common.files import sha256_json
from tasks.common.prompt import ANSWER_OPEN, defang_messages
from tasks.common.settings import SftSettings, load_settings
from tasks.common.tokenizers import special_tokens_of
from tasks.training.checkpoints import prepare_checkpoints
from tasks.training.launch import is_main_process, relaunch_with_accelerate
from tasks.training.model import (
    count_parameters,
    lora_config,
    require_base_model,
    set_torch_threads,
    torch_dtype,
)
from tasks.training.records import load_sft_records
from tasks.training.stage import Prepared, load_tokenizer, read_inputs, train_and_report, trainer_arguments

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


def sft_fields(prepared: PreparedSft) -> Callable[[Any], dict[str, Any]]:
    """The sft report's own fields, read from the trained Trainer: the masked prompt size and the loss at the
    first and the last logging step."""

    def fields(trainer: Any) -> dict[str, Any]:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return {
            "prompt_tokens_masked_first_example": prepared.masked,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
        }

    return fields


def run(settings: SftSettings) -> dict[str, Any]:
    """Train the SFT adapter; returns the report written to reports/sft.json (`SftReport`; the adapter's
    training_meta.json adds params and versions). Raises what `prepare_sft` raises, before the first step."""
    prep = prepare_sft(settings)
    return train_and_report(STAGE, settings, prep, sft_fields(prep))


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
            f"[{STAGE}] done: {meta['steps']} steps in {meta['wall_time_s']} s, final loss {meta['final_loss']}, "
            f"adapter → {settings.out_dir}",
            flush=True,
        )


if __name__ == "__main__":
    main()
