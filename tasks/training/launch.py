"""Process topology of a training stage: the accelerate launcher path, the main-process test, a barrier, and the
MLflow stage run opened on the main process only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from tasks.common.config import repo_root, resolve_path
from tasks.common.errors import InputError

LAUNCHED_ENV = "RATIONANOMALY_ACCELERATE_CHILD"


def is_main_process() -> bool:
    """True outside accelerate, and on rank 0 under it (outputs and MLflow runs are written once)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0

def world_size() -> int:
    """How many processes run this stage (WORLD_SIZE, set by the launcher; 1 in a single process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """Wait for every process of an accelerate launch (a no-op in a single process).

    On a machine without an accelerator the state must say `cpu`: otherwise accelerate finds no backend under
    torchrun, reports a single process and this wait is silently a no-op (checked with two CPU processes). The
    Trainer later builds its own state (`use_cpu`) on the process group formed here.
    """
    if world_size() > 1:
        from accelerate import PartialState

        from tasks.training.model import has_accelerator

        PartialState(cpu=not has_accelerator()).wait_for_everyone()


def topology(trainer: Any) -> dict[str, Any]:
    """How the stage ran, for its report: the launcher, and how many processes trained (the Trainer's own count,
    so 2 means a process group really formed, not only that two processes started)."""
    return {"launcher": "accelerate" if os.environ.get(LAUNCHED_ENV) else "in-process",
            "world_size": int(trainer.args.world_size)}


def report_process(stage: str, trainer: Any) -> None:
    """One line per process when training ends (every rank prints its own: the launch log shows each ran)."""
    args = trainer.args
    print(f"[{stage}] process {args.process_index} of {args.world_size} finished at step {trainer.state.global_step}",
          flush=True)


@contextlib.contextmanager
def stage_tracking(stage: str, **tags: str) -> Iterator[Any]:
    """`tasks.tracking.stage_run` on the main process; yields the mlflow module there and None elsewhere."""
    if not is_main_process():
        yield None
        return
    from tasks.common.tracking import stage_run

    with stage_run(stage, **tags):
        import mlflow

        yield mlflow

def relaunch_with_accelerate(stage: str, config: str | None) -> bool:
    """Re-run `python -m tasks.<stage>` under `accelerate launch --config_file <config>` when one is set.

    Returns True when the stage ran in the launched processes (the caller then stops); False to run here.
    The child sees LAUNCHED_ENV and runs in-process, so this never recurses. Raises InputError when the
    config file does not exist, SystemExit with the launcher's code when the launched run fails.
    """
    if not config or os.environ.get(LAUNCHED_ENV):
        return False
    config_path = resolve_path(config)
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
