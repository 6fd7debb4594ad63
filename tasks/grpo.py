"""grpo stage: multi-reward GRPO on top of the SFT adapter.

The SFT adapter is loaded *trainable* (`PeftModel.from_pretrained(..., is_trainable=True)`): loaded frozen,
GRPO trains nothing and saves a byte-identical adapter (trl issue 6700). So this stage checks both ends:
trainable parameters > 0 before training, and adapter tensors different from the SFT ones after it.
With beta > 0 trl keeps a frozen copy of the SFT adapter ("ref") as the KL reference; only the trained
"default" adapter is saved (checkpoints included, so a resume reloads the right weights).

Rewards (tasks/rewards.py) are logged per step to MLflow, with the answer reward per true class, the
completion length and the KL; the same curve goes to reports/grpo_rewards.csv (a DVC plot) and a PNG.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.config import resolve_path
from tasks.common.errors import InputError
from tasks.common.files import atomic_path, sha256_json
from tasks.common.prompt import EXPLAIN, defang_messages
from tasks.common.settings import GrpoSettings, load_settings
from tasks.common.tokenizers import special_tokens_of
from tasks.training.checkpoints import prepare_checkpoints
from tasks.training.launch import is_main_process, relaunch_with_accelerate
from tasks.training.model import (
    adapter_digest,
    base_model_sha256,
    count_parameters,
    lora_config,
    require_base_model,
    set_torch_threads,
    torch_dtype,
)
from tasks.training.records import load_sft_records
from tasks.training.rewards import (
    COMPONENTS,
    THINK_COMPONENTS,
    metric_name,
    perplexity_scorer,
    reward_functions,
    reward_weights,
)
from tasks.training.stage import Prepared, load_tokenizer, read_inputs, train_and_report, trainer_arguments

STAGE = "grpo"
CSV_COLUMNS = (
    "step",
    "reward",
    *COMPONENTS,
    "answer_abnormal",
    "answer_normal",
    "format_valid_rate",
    "completion_length",
    "kl",
)
_LOG_KEYS = {
    "reward": "reward",
    **{c: metric_name(c) for c in COMPONENTS},
    "answer_abnormal": "rewards/answer/abnormal",
    "answer_normal": "rewards/answer/normal",
    "format_valid_rate": "format_valid_rate",
    "completion_length": "completions/mean_length",
    "kl": "kl",
}


def require_sft_adapter(adapter_dir: str | Path, base_sha: str | None) -> Path:
    """The SFT adapter folder, checked to exist and to belong to this base model (else InputError)."""
    path = resolve_path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise InputError(
                path / name,
                "SFT adapter missing",
                field=f"{STAGE}.sft_adapter_dir",
                hint="run `dvc repro sft` first, or set grpo.sft_adapter_dir: null to start a new LoRA",
            )
    meta_file = path / "training_meta.json"
    if base_sha and meta_file.is_file():
        trained_on = json.loads(meta_file.read_text(encoding="utf-8")).get("base_model_sha256")
        if trained_on and trained_on != base_sha:
            raise InputError(
                meta_file,
                f"adapter was trained on base model {trained_on[:12]}, not on {base_sha[:12]}",
                field="base_model_sha256",
                hint="rerun sft on the current base model",
            )
    return path


def build_dataset(records: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int) -> tuple[Any, int]:
    """Prompt rows plus the columns the rewards read (label, template, rationale, dataset, and the neighbours the
    prompt shows as {"template", "label"} records); drops over-long prompts."""
    from datasets import Dataset

    rows, dropped = [], 0
    special = special_tokens_of(tokenizer)
    for r in records:
        prompt = defang_messages(r["prompt"], special)  # the log text must not carry this tokenizer's controls
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "task": r.get("task", EXPLAIN),
                     "neighbours": [{"template": str(t), "label": int(y)} for t, y in r.get("neighbours", [])],
                     **{k: r[k] for k in ("label", "template", "rationale", "dataset")}})
    return Dataset.from_list(rows), dropped


def reward_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training step with every reward component (the reward curve)."""
    rows = []
    for entry in log_history:
        if _LOG_KEYS["format"] not in entry:
            continue
        row: dict[str, Any] = {"step": int(entry["step"])}
        for column, key in _LOG_KEYS.items():
            value = entry.get(key)
            row[column] = float(value) if isinstance(value, int | float) else None
        rows.append(row)
    return rows


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """A curve row without its step and missing values (e.g. no abnormal prompt in that step)."""
    return {k: v for k, v in row.items() if k != "step" and v is not None and not math.isnan(v)}


def window_means(rows: list[dict[str, Any]], first: bool) -> dict[str, float | None]:
    """Mean of each column over the first (or last) quarter of the curve: steadier than a single noisy step."""
    if not rows:
        return {}
    n = max(1, len(rows) // 4)
    window = rows[:n] if first else rows[-n:]
    out: dict[str, float | None] = {}
    for column in CSV_COLUMNS[1:]:
        values = [r[column] for r in window if r[column] is not None and not math.isnan(r[column])]
        out[column] = float(f"{sum(values) / len(values):.5g}") if values else None
    return out


def write_curve(rows: list[dict[str, Any]], csv_path: Path, png_path: Path) -> None:
    """reports/grpo_rewards.csv (the DVC plot) and a PNG of the same curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS} for r in rows)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [r["step"] for r in rows]
    for column in ("reward", "format", "answer"):
        top.plot(steps, [r[column] for r in rows], label=column, marker=".")
    for column in THINK_COMPONENTS:
        bottom.plot(steps, [r[column] for r in rows], label=column, marker=".")
    top.set_ylabel("reward (mean)")
    bottom.set_ylabel("think parts (mean, 0..1)")
    bottom.set_xlabel("step")
    top.legend(loc="best", fontsize=8)
    bottom.legend(loc="best", fontsize=8)
    top.set_title("GRPO reward by component")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _trainer_class() -> Any:
    from trl import GRPOTrainer

    class AdapterOnlyGRPOTrainer(GRPOTrainer):
        """Saves only the trained adapter: trl's frozen "ref" copy in a checkpoint would make a resume load it
        and skip the trained one (transformers loads adapter sub-folders only when there are any)."""

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            shutil.rmtree(Path(output_dir or self.args.output_dir) / "ref", ignore_errors=True)

    return AdapterOnlyGRPOTrainer


@dataclass
class PreparedGrpo(Prepared):
    """What the grpo stage built before its first step, plus the SFT adapter it continues from."""

    sft_digest: str | None = None  # tensor digest of the SFT adapter (None: a fresh LoRA)


def prepare_grpo(settings: GrpoSettings) -> PreparedGrpo:
    """Check the inputs (rewards, data, base model, SFT adapter), build the trainer, pick the checkpoint to resume.

    Raises InputError (naming file and field) for bad data, a missing base model or SFT adapter, or prompts
    all longer than `max_prompt_length`; RuntimeError when nothing would be trained.
    """
    threads = set_torch_threads(settings.torch_threads)  # first: OpenMP reads its wait policy as torch loads
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    # --- cheap checks first: reward table, data, base model, SFT adapter, LoRA ---
    cfg = settings.rewards
    for note in cfg.warnings():
        print(f"[{STAGE}] warning: reward table: {note}", flush=True)
    inputs = read_inputs(settings, STAGE)
    sft_path = require_sft_adapter(settings.sft_adapter_dir, inputs.base_sha) if settings.sft_adapter_dir else None
    sft_digest = adapter_digest(sft_path) if sft_path else None
    out_dir, ckpt_dir = resolve_path(settings.out_dir), resolve_path(settings.checkpoint_dir)

    tokenizer = load_tokenizer(sft_path or inputs.base_dir, left_padding=True)
    dataset, dropped = build_dataset(inputs.records, tokenizer, settings.max_prompt_length)
    if len(dataset) == 0:
        raise InputError(
            inputs.data_file,
            f"every prompt is longer than max_prompt_length={settings.max_prompt_length}",
            field=f"{STAGE}.max_prompt_length",
        )
    model = AutoModelForCausalLM.from_pretrained(str(inputs.base_dir), dtype=torch_dtype(settings.bf16))
    if sft_path:
        model = PeftModel.from_pretrained(model, str(sft_path), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(settings.lora, model, STAGE))
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise RuntimeError(f"{sft_path}: adapter loaded frozen (0 trainable parameters); GRPO would train nothing")

    fingerprint = sha256_json({"params": settings.training_fingerprint_params(), "data": inputs.data_sha,
                               "base": inputs.base_sha, "sft": sft_digest})
    resume = prepare_checkpoints(ckpt_dir, fingerprint, settings.resume)
    print(
        f"[{STAGE}] {len(dataset)} prompts ({inputs.repeated_abnormal} repeated anomalies, "
        f"{dropped} over {settings.max_prompt_length} tokens dropped); "
        f"{resume.reason}; {threads} torch thread(s)",
        flush=True,
    )

    scorer = perplexity_scorer(
        str(resolve_path(cfg.coherence_model) if cfg.coherence_model else inputs.base_dir), cfg.coherence_batch_size
    )
    config = GRPOConfig(
        **trainer_arguments(settings, ckpt_dir),
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        beta=settings.beta,
        temperature=settings.temperature,
        top_p=settings.top_p,
        scale_rewards=settings.scale_rewards,
        loss_type=settings.loss_type,
        reward_weights=reward_weights(cfg),
        use_vllm=settings.use_vllm,
        vllm_mode=settings.vllm_mode,
        log_completions=False,
    )
    trainer = _trainer_class()(
        model=model,
        reward_funcs=reward_functions(cfg, scorer),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trained_names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    if not any(".default." in n for n in trained_names):
        raise RuntimeError("no parameter of the 'default' adapter is trainable; GRPO would train nothing")
    return PreparedGrpo(trainer, inputs, out_dir, ckpt_dir, resume, dropped, trainable, total, sft_digest)


def grpo_fields(prepared: PreparedGrpo, settings: GrpoSettings) -> Callable[[Any], dict[str, Any]]:
    """The grpo report's own fields, read from the trained Trainer: every reward component (with total reward,
    per-class answer, length and KL) at the first and the last step and over the first and last quarter, and
    the SFT adapter it continued from."""

    def fields(trainer: Any) -> dict[str, Any]:
        rows = reward_rows(trainer.state.log_history)
        return {
            "first_rewards": numeric(rows[0]) if rows else {},
            "final_rewards": numeric(rows[-1]) if rows else {},
            "first_window_mean": window_means(rows, first=True),
            "final_window_mean": window_means(rows, first=False),
            "sft_adapter_dir": settings.sft_adapter_dir,
            "sft_adapter_sha256": prepared.sft_digest,
        }

    return fields


def refuse_unchanged(prepared: PreparedGrpo) -> Callable[[str], None]:
    """RuntimeError when the trained adapter's digest is the SFT adapter's: GRPO changed nothing."""

    def refuse(digest: str) -> None:
        if digest == prepared.sft_digest:
            zero_std = [h.get("frac_reward_zero_std") for h in prepared.trainer.state.log_history]
            raise RuntimeError(
                f"GRPO left the adapter byte-identical to the SFT adapter (trl issue 6700 symptom, or every "
                f"group had equal rewards: frac_reward_zero_std per step {zero_std}); not publishing it"
            )

    return refuse


def curve_writer(settings: GrpoSettings) -> Callable[[Any], list[Path]]:
    """Writes the reward curve (reports/grpo_rewards.csv and its PNG) from the trained Trainer; returns both."""

    def write(trainer: Any) -> list[Path]:
        csv_path, png_path = resolve_path(settings.rewards_csv), resolve_path(settings.rewards_png)
        write_curve(reward_rows(trainer.state.log_history), csv_path, png_path)
        return [csv_path, png_path]

    return write


def run(settings: GrpoSettings) -> dict[str, Any]:
    """Train GRPO; returns the report written to reports/grpo.json (`GrpoReport`: rewards per component, first and
    last steps; the adapter's training_meta.json adds params and versions). Raises what `prepare_grpo` raises, and
    RuntimeError when the adapter did not change."""
    prep = prepare_grpo(settings)
    return train_and_report(STAGE, settings, prep, grpo_fields(prep, settings), refuse=refuse_unchanged(prep),
                            write_outputs=curve_writer(settings), tags={"sft_adapter_sha256": str(prep.sft_digest)})


def main() -> None:
    settings = load_settings().grpo
    # Fail on bad input here, before any process is launched.
    load_sft_records(resolve_path(settings.data_file))
    base_dir = require_base_model(settings.base_model_dir, f"{STAGE}.base_model_dir")
    if settings.sft_adapter_dir:
        require_sft_adapter(settings.sft_adapter_dir, base_model_sha256(base_dir))
    if relaunch_with_accelerate(STAGE, settings.accelerate_config):
        return
    report = run(settings)
    if is_main_process():
        final = report["final_window_mean"]
        print(
            f"[{STAGE}] done: {report['steps']} steps in {report['wall_time_s']} s; final reward "
            + ", ".join(f"{k}={v}" for k, v in final.items() if k in ("reward", *COMPONENTS)),
            flush=True,
        )


if __name__ == "__main__":
    main()
