"""What sft and grpo share: input checks, LoRA, seeding, progress, MLflow, checkpoints and the accelerate launcher.

Everything here runs before the expensive part (loading data, checking paths and LoRA targets) or around
it (callbacks, checkpoint choice, publishing the output folder all-or-nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.base_model import META_FILE, read_base_model_meta, sha256_file
from tasks.common.adapters import tied_embedding_targets
from tasks.config import PARAMS_FILE, repo_root
from tasks.errors import InputError
from tasks.prompt import label_id, parse_completion

LAUNCHED_ENV = "RATIONANOMALY_ACCELERATE_CHILD"
FINGERPRINT_FILE = "fingerprint.json"
ROLES = ("system", "user", "assistant")
DATASET_NAME = "sft-cot"  # the MLflow dataset name flows/data.py gives data/sft/train.jsonl


# ---- inputs ---------------------------------------------------------------------------------------------------


def resolve(path: str | Path) -> Path:
    """A params path, relative to the repo root unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else repo_root() / path


def _check_message(msg: Any, role: str, path: Path, line: int, where: str) -> str:
    if not isinstance(msg, dict):
        raise InputError(path, f"expected a message object, found {type(msg).__name__}", line=line, field=where)
    if msg.get("role") != role:
        raise InputError(
            path,
            f"expected role '{role}', found {msg.get('role')!r}",
            line=line,
            field=f"{where}.role",
            hint="each example is [system, user, assistant]",
        )
    content = msg.get("content")
    if not isinstance(content, str) or not content.strip():
        raise InputError(path, "message content is missing or empty", line=line, field=f"{where}.content")
    return content


def load_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and check the SFT jsonl; every problem names the file, the line and the field.

    Returns one normalised record per line: prompt ([system, user]), completion ([assistant]),
    template (the log text), dataset, label (0/1) and rationale (the reference think part).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "SFT dataset not found", hint="run `dvc repro distill` or set data_file in params.yaml")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"not valid JSON: {exc.msg}", line=line_no) from exc
            if not isinstance(row, dict):
                raise InputError(path, f"expected a JSON object, found {type(row).__name__}", line=line_no)
            messages = row.get("messages")
            if not isinstance(messages, list) or len(messages) != len(ROLES):
                found = f"{len(messages)} messages" if isinstance(messages, list) else repr(type(messages).__name__)
                raise InputError(
                    path,
                    f"expected a list of 3 messages (system, user, assistant), found {found}",
                    line=line_no,
                    field="messages",
                )
            system, user, assistant = (
                _check_message(m, role, path, line_no, f"messages[{i}]")
                for i, (m, role) in enumerate(zip(messages, ROLES, strict=True))
            )
            parsed = parse_completion(assistant)
            if not parsed.valid:
                raise InputError(
                    path,
                    "assistant message is not `<think>…</think><answer>normal|abnormal</answer>`",
                    line=line_no,
                    field="messages[2].content",
                    hint=f"found {assistant[:120]!r}",
                )
            label = row.get("label", parsed.label)
            try:
                label = label_id(label)
            except (ValueError, TypeError) as exc:
                raise InputError(path, str(exc), line=line_no, field="label") from exc
            if label != parsed.label:
                raise InputError(
                    path,
                    f"label {label} disagrees with the assistant's answer '{parsed.answer}'",
                    line=line_no,
                    field="label",
                )
            records.append(
                {
                    "prompt": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": assistant}],
                    "template": str(row.get("template") or user),
                    "dataset": str(row.get("dataset") or ""),
                    "label": label,
                    "rationale": str(row.get("rationale") or parsed.think),
                }
            )
    if not records:
        raise InputError(path, "the SFT dataset is empty", hint="check the distill stage's report")
    return records


def balance_classes(records: list[dict[str, Any]], abnormal_fraction: float | None, seed: int,
                    field_name: str) -> tuple[list[dict[str, Any]], int]:
    """Repeat abnormal examples (drawn with replacement, seeded) until they make up `abnormal_fraction`.

    Anomalies are about a tenth of the templates; a small model trained a few CPU minutes on that
    mix learns to answer `normal` to everything. Returns the records and how many repeats were added;
    None, or a fraction the data already reaches, adds none.
    """
    if abnormal_fraction is None:
        return records, 0
    fraction = float(abnormal_fraction)
    if not 0.0 <= fraction < 1.0:
        raise InputError(PARAMS_FILE, f"must be in [0, 1), found {abnormal_fraction!r}", field=field_name)
    abnormal = [r for r in records if r["label"] == 1]
    if not abnormal:
        raise InputError(PARAMS_FILE, "the data has no abnormal example to balance with", field=field_name)
    # a + k = f (n + k)  =>  k = (f n - a) / (1 - f)
    extra = max(0, round((fraction * len(records) - len(abnormal)) / (1.0 - fraction)))
    from sklearn.utils import resample

    repeats = resample(abnormal, replace=True, n_samples=extra, random_state=seed) if extra else []
    return records + list(repeats), extra


def require_base_model(path: str | Path, field_name: str) -> Path:
    """The base model folder, or an InputError naming the params field that points to it."""
    path = resolve(path)
    if not (path / "config.json").is_file():
        problem = "base model folder does not exist" if not path.exists() else "no config.json in the base model folder"
        raise InputError(path, problem, field=field_name, hint="run `dvc repro base_model` or fix the path")
    return path


def base_model_sha256(model_dir: Path) -> str | None:
    """The weights digest recorded by the base_model stage (None for a folder made elsewhere)."""
    if not (model_dir / META_FILE).exists():
        return None
    return read_base_model_meta(model_dir).get("weights_sha256")


def file_sha256(path: str | Path) -> str:
    return sha256_file(Path(path))


NOT_TRAINING_PARAMS = (
    "resume",
    "keep_checkpoints",
    "torch_threads",
    "logging_steps",
    "report_file",
    "rewards_csv",
    "rewards_png",
    "out_dir",
)


def training_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params that shape the training itself (what a checkpoint fingerprint covers)."""
    return {k: v for k, v in params.items() if k not in NOT_TRAINING_PARAMS}


def params_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---- model, LoRA, seed ----------------------------------------------------------------------------------------


def linear_module_names(model: Any) -> list[str]:
    """Short names (last path part) of the linear layers LoRA can target, e.g. q_proj, down_proj."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(lora: dict[str, Any], model: Any, field_prefix: str) -> Any:
    """A peft LoraConfig from params, after checking every target module exists in `model` and can be served.

    peft would otherwise fail late, or (with a partial match) adapt fewer layers than asked; a run that
    adapts nothing would train the plain base model. Never that: a missing name is an InputError. So is
    `embed_tokens` or `lm_head` on a model with tied embeddings (tasks.common.adapters: merged for
    evaluation and serving, such a LoRA changes both sides of the shared matrix).
    """
    from peft import LoraConfig

    targets = lora["target_modules"]
    available = linear_module_names(model)
    if targets != "all-linear":
        if isinstance(targets, str):
            targets = [targets]
        all_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in all_names]
        if missing or not targets:
            raise InputError(
                PARAMS_FILE,
                f"LoRA target modules {missing or targets} do not exist in {type(model).__name__}",
                field=f"{field_prefix}.lora.target_modules",
                hint=f"linear modules available: {', '.join(available)}",
            )
        tied = tied_embedding_targets(targets, bool(getattr(model.config, "tie_word_embeddings", False)))
        if tied:
            raise InputError(
                PARAMS_FILE,
                f"LoRA target modules {tied} cannot be served: {type(model).__name__} ties its input and output "
                "embeddings (tie_word_embeddings), and merging such a LoRA changes both",
                field=f"{field_prefix}.lora.target_modules",
                hint="drop them; the attention and MLP projections are the usual targets",
            )
    return LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs from one seed (the Trainer reseeds its own from the same value)."""
    import numpy as np
    import torch

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_torch_threads(setting: int | str | None) -> int:
    """Intra-op threads for torch: an int, or "auto" = one per idle core (tasks.config.idle_core_threads)."""
    import torch

    from tasks.config import idle_core_threads

    threads = idle_core_threads() if setting in (None, "auto") else max(1, int(setting))
    torch.set_num_threads(threads)
    return threads


def has_accelerator() -> bool:
    """A CUDA/XPU/MPS device is present (else Trainer must be told use_cpu, or bf16 is refused)."""
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )


def torch_dtype(params: dict[str, Any]) -> Any:
    import torch

    return torch.bfloat16 if params.get("bf16") else torch.float32


def adapter_digest(adapter_dir: str | Path) -> str:
    """sha256 over the adapter's tensors (names and bytes), independent of file metadata."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


# ---- progress and MLflow callbacks ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Callback:
    """transformers' TrainerCallback protocol (every `on_*` event a no-op unless defined) without importing
    transformers when this module loads: the accelerate launcher parent only checks inputs and re-launches."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class RichProgressCallback(_Callback):
    """A terminal progress bar for Trainer: step/total, elapsed, ETA and the latest loss or reward.

    Replaces transformers' tqdm bar (which prints whole log dicts); when stdout is not a terminal (DVC,
    CI) it prints one line per logging step instead, so logs stay readable.
    """

    SHOWN = ("loss", "reward", "rewards/answer_reward/mean", "kl", "learning_rate")

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.progress: Any = None
        self.task: Any = None
        self.start = time.monotonic()
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console()
        self.start, self.start_step = time.monotonic(), state.global_step
        if console.is_terminal:
            self.progress = Progress(
                TextColumn(f"[bold]{self.stage}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                self.stage, total=state.max_steps, completed=state.global_step, metrics=""
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        shown = "  ".join(
            f"{k.split('/')[-2] if k.count('/') > 1 else k}={_fmt(logs[k])}" for k in self.SHOWN if k in logs
        )
        if not shown:  # the end-of-training summary (runtime etc.): the stage prints its own
            return
        if self.progress is not None:
            self.progress.update(self.task, metrics=shown)
            return
        done = state.global_step - self.start_step
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        print(
            f"[{self.stage}] step {state.global_step}/{state.max_steps}  elapsed {elapsed:.0f}s  "
            f"eta {eta:.0f}s  {shown}",
            flush=True,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MlflowMetricsCallback(_Callback):
    """Every numeric value the Trainer logs (loss, learning rate, each reward component, KL, ...) per step.

    Our own instead of transformers' MLflowCallback, which would open its own run and log every
    TrainingArguments field; this one logs into the stage run that `tasks.tracking.stage_run` opened.
    """

    def __init__(self, mlflow: Any) -> None:
        self.mlflow = mlflow

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics = {
            k.replace("@", "_at_"): float(v)
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v  # drop NaN
        }
        if metrics:
            self.mlflow.log_metrics(metrics, step=state.global_step)


def install_callbacks(trainer: Any, stage: str, mlflow: Any | None) -> None:
    """Swap the default tqdm/printer callbacks for ours."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RichProgressCallback(stage))
    if mlflow is not None:
        trainer.add_callback(MlflowMetricsCallback(mlflow))


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params (`lora.r`: '8'); values cut to MLflow's 6000-char limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)[:6000]
    return flat


def log_training_data(path: Path) -> str:
    """The training file as an MLflow dataset input, named and digested as the data flow logs it (md5 = DVC's)."""
    from tasks.tracking import log_dataset_file

    digest = hashlib.md5(path.read_bytes()).hexdigest()
    log_dataset_file(path, DATASET_NAME, "training", digest=digest)
    return digest


def is_main_process() -> bool:
    """True outside accelerate, and on rank 0 under it (outputs and MLflow runs are written once)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def barrier() -> None:
    """Wait for every process of an accelerate launch (a no-op in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextlib.contextmanager
def stage_tracking(stage: str, **tags: str) -> Iterator[Any]:
    """`tasks.tracking.stage_run` on the main process; yields the mlflow module there and None elsewhere."""
    if not is_main_process():
        yield None
        return
    from tasks.tracking import stage_run

    with stage_run(stage, **tags):
        import mlflow

        yield mlflow


# ---- checkpoints and outputs ----------------------------------------------------------------------------------


@dataclass
class Resume:
    """Where a run starts: `checkpoint` is None for a fresh start; `step` is the checkpoint's global step."""

    checkpoint: str | None
    step: int = 0
    reason: str = ""
    fingerprint: str = field(default="", repr=False)


def _complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders the Trainer finished writing (trainer_state.json is its last file)."""
    found = []
    for path in ckpt_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.rsplit("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        found.append((step, path))
    return sorted(found)


def prepare_checkpoints(ckpt_dir: Path, fingerprint: str, mode: str | bool | None) -> Resume:
    """Pick the checkpoint to resume from, or clear the folder for a fresh start.

    `mode` (params `resume`): "auto" resumes from the newest complete checkpoint when its fingerprint (params,
    data and base-model hashes) matches this run's; anything else is wiped. false/"never" always starts fresh.
    """
    mode = "never" if mode in (False, None, "never", "false") else str(mode)
    if mode not in ("auto", "never"):
        raise InputError(PARAMS_FILE, f"resume is {mode!r}; expected auto or false", field="resume")
    stored = ckpt_dir / FINGERPRINT_FILE
    old = json.loads(stored.read_text(encoding="utf-8")).get("fingerprint") if stored.exists() else None
    checkpoints = _complete_checkpoints(ckpt_dir) if ckpt_dir.exists() else []
    barrier()  # every rank has read the folder before rank 0 may clear it
    if mode == "auto" and old == fingerprint and checkpoints:
        step, path = checkpoints[-1]
        return Resume(str(path), step, f"resuming from {path.name} (same params, data and base model)", fingerprint)
    reason = (
        "fresh start"
        if not checkpoints
        else "fresh start (resume disabled)"
        if mode == "never"
        else "fresh start (checkpoints were made with other params/data; removed)"
    )
    if is_main_process():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"fingerprint": fingerprint}) + "\n", encoding="utf-8")
    barrier()
    return Resume(None, 0, reason, fingerprint)


def publish_adapter(trainer: Any, out_dir: Path, meta: Callable[[str], dict[str, Any]]) -> str | None:
    """Save the trained adapter + tokenizer to `out_dir` all-or-nothing; returns its tensor digest on rank 0.

    Every rank calls `save_model` (under FSDP it gathers the sharded weights); rank 0 then writes
    training_meta.json from `meta(digest)` (which may raise to refuse publishing) and swaps the folder in.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return None
    try:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        digest = adapter_digest(tmp)
        write_json(tmp / "training_meta.json", meta(digest))
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return digest


def write_json(path: Path, data: Any) -> None:
    from tasks.errors import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


# ---- the accelerate launcher path -----------------------------------------------------------------------------


def relaunch_with_accelerate(stage: str, config: str | None) -> bool:
    """Re-run `python -m tasks.<stage>` under `accelerate launch --config_file <config>` when one is set.

    Returns True when the stage ran in the launched processes (the caller then stops); False to run here.
    The child sees LAUNCHED_ENV and runs in-process, so this never recurses.
    """
    if not config or os.environ.get(LAUNCHED_ENV):
        return False
    config_path = resolve(config)
    if not config_path.is_file():
        raise InputError(config_path, "accelerate config not found", field=f"{stage}.accelerate_config")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
        "-m",
        f"tasks.{stage}",
    ]
    print(f"[{stage}] launching: {' '.join(cmd[2:])}", flush=True)
    env = {**os.environ, LAUNCHED_ENV: "1", "RATIONANOMALY_ROOT": str(repo_root())}
    result = subprocess.run(cmd, cwd=repo_root(), env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(result.returncode)
    return True
