"""Trainer callbacks: a readable progress bar (or one line per logging step off a terminal) and per-step MLflow
metrics logged into the stage's own run."""

from __future__ import annotations

import time
from typing import Any

from tasks.common.formatting import fmt_number


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
            f"{k.split('/')[-2] if k.count('/') > 1 else k}={fmt_number(logs[k], 4, significant=True)}"
            for k in self.SHOWN
            if k in logs
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
