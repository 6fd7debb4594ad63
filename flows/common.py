"""Glue shared by the flows: the pipeline lock, choosing the profile, running a DVC stage as a Prefect task,
publishing reports."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.recovery import RUN_RECORD, record_nested_run, record_run, recover_killed_run
from tasks.common.config import repo_root, set_profile
from tasks.common.dvc_ops import StageLocked, StageResult, repro_stage
from tasks.common.errors import Busy, InputError
from tasks.common.settings import Settings, load_settings


class QuietRefusals(logging.Filter):
    """Drop the traceback Prefect logs with a flow or task run that failed on bad input (InputError) or on a lock
    another running process holds (Busy): their one-line message, which Prefect's line already carries, says
    what and where; the stack adds nothing (issue 22, items 3 and 8: a held DVC lock ended in a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], InputError | Busy):
            record.exc_info, record.exc_text = None, None
        return True


for _logger in ("prefect.flow_runs", "prefect.task_runs"):  # the loggers of Prefect's flow and task engines
    logging.getLogger(_logger).addFilter(QuietRefusals())

LOCK_FILE = ".cache/pipeline.lock"
_locks: dict[Path, FileLock] = {}  # one lock object per file in this process: re-entrant for nested flows


class RunInProgress(Busy):
    """Another flow holds the pipeline lock; two runs would fight over params.yaml, DVC outputs and the registry."""


@contextmanager
def pipeline_lock() -> Iterator[None]:
    """Hold `.cache/pipeline.lock` while a flow changes the profile or runs DVC stages.

    Re-entrant within one process (the retrain flow calls the data, train and release flows), refused at
    once with RunInProgress when another process holds it: a second run would switch the running one's
    profile and gate rules under it (issue 15, case 8). While held, `.cache/pipeline-run.json` records the run
    (process, flow runs, temporary Prefect server); the next holder that finds it knows that run was killed,
    marks its flow runs Crashed and stops its orphaned server (flows.recovery; issue 22, item 3).
    """
    root = repo_root()
    lock_path, record = root / LOCK_FILE, root / RUN_RECORD
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = _locks.setdefault(lock_path, FileLock(str(lock_path)))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise RunInProgress(f"another pipeline run holds {lock_path} (a retrain, data, train or release flow); "
                            "wait for it to finish: the lock frees itself when that process ends") from exc
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            try:
                recovered = recover_killed_run(record)
            except Exception as exc:  # best effort: a cleanup that fails never stops the new run
                recovered = f"the previous pipeline run's leftovers were not cleaned up ({type(exc).__name__}: {exc})"
            if recovered:
                print(recovered)
            record_run(record)
        else:
            record_nested_run(record)
        yield
    finally:
        if outermost:
            record.unlink(missing_ok=True)
        lock.release()


def start_run(profile: str | None) -> Settings:
    """Select a params profile for this run (a DVC-tracked param, so DVC reruns what it affects) and read the
    settings once. Call it inside `pipeline_lock()`: the profile then stays fixed until the run ends."""
    if profile and set_profile(profile):
        print(f"params.yaml: profile set to '{profile}'")
    settings = load_settings()
    print(f"profile: {settings.profile}")
    return settings


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for a stage: not when DVC's lock is held by a running process (StageLocked),
    which a retry 10 s later meets again (issue 22, item 3: three pointless attempts, then a traceback)."""
    return not isinstance(state.result(raise_on_failure=False), StageLocked)


@task(name="dvc-stage", task_run_name="dvc repro {stage}", retries=0, retry_condition_fn=_worth_retrying)
def run_stage(stage: str) -> dict[str, Any]:
    """Run one DVC stage; DVC skips it when nothing it depends on changed."""
    result: StageResult = repro_stage(stage)
    print(f"stage {stage}: {'ran' if result.ran else 'skipped (up to date)'} in {result.seconds:.1f}s")
    return result.to_dict()


# Fetch talks to the network on a user's machine: retry it on transient failures.
run_fetch_stage = run_stage.with_options(retries=2, retry_delay_seconds=10)


def run_stages(stages: list[str]) -> list[dict[str, Any]]:
    """Run stages one after another: DVC holds a repo lock, so they never overlap."""
    return [(run_fetch_stage if name == "fetch" else run_stage)(name) for name in stages]


def read_json(relative: str) -> dict[str, Any]:
    """A report under the project folder as a dict ({} when it does not exist yet)."""
    path = repo_root() / relative
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def stages_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of which stages ran or were skipped and why."""
    lines = ["| stage | ran | seconds | what changed |", "|---|---|---|---|"]
    for r in results:
        changes = "; ".join(r.get("changes") or []) or "-"
        lines.append(f"| {r['stage']} | {'yes' if r['ran'] else 'skipped'} | {r['seconds']:.1f} | {changes} |")
    return "\n".join(lines)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A Markdown artifact a person reads in the Prefect UI (keys: lowercase letters, digits, dashes)."""
    create_markdown_artifact(key=key, markdown=markdown, description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact in the Prefect UI (one row per dict)."""
    create_table_artifact(key=key, table=rows, description=description)


def file_text(relative: str, default: str = "") -> str:
    """A text report under the project folder, or `default` when it does not exist yet."""
    path: Path = repo_root() / relative
    return path.read_text(encoding="utf-8") if path.exists() else default
