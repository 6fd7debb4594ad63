"""Prefect flow `retrain`: data → train → release → deploy under one MLflow parent run, never two at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow

from flows.common import publish_markdown, stages_table, use_profile
from flows.data import data_flow
from flows.deploy import deploy_flow
from flows.release import release_flow
from flows.train import train_flow
from tasks.config import load_params, repo_root
from tasks.dvc_ops import stale_stages
from tasks.tracking import PARENT_RUN_ENV, setup_mlflow

LOCK_FILE = ".cache/retrain.lock"


class RunInProgress(RuntimeError):
    """Another retrain run holds the lock; two runs would fight over DVC outputs and the registry."""


@contextmanager
def exclusive_run() -> Iterator[None]:
    lock_path = repo_root() / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise RunInProgress(f"another retrain run holds {lock_path}; wait for it or remove a stale lock") from exc
    try:
        yield
    finally:
        lock.release()


@contextmanager
def parent_run(profile: str) -> Iterator[str]:
    """One MLflow parent run; stage runs (in DVC subprocesses too) attach to it through the env."""
    mlflow = setup_mlflow()
    with mlflow.start_run(run_name=f"retrain-{datetime.now(UTC):%Y%m%d-%H%M%S}", tags={"flow": "retrain"}) as run:
        mlflow.log_param("profile", profile)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)


def summary_markdown(
    changes: dict[str, list[str]], stages: list[dict[str, Any]], release: dict[str, Any], deploy: dict[str, Any] | None
) -> str:
    """What changed, what ran, how the candidate scored, whether it was promoted, what is live."""
    lines = ["# Retrain summary", "", "## What changed since the last run", ""]
    lines += [f"- **{stage}**: {'; '.join(why) or 'new'}" for stage, why in changes.items()] or ["- nothing"]
    lines += ["", "## Stages", "", stages_table(stages), "", "## Evaluation", "", release.get("table_md", "(none)")]
    lines += ["", "## Gate", "", release.get("verdict_md", "(no verdict)"), ""]
    if release.get("promoted"):
        lines.append(f"**Promoted**: version {release.get('version')} is now `@champion`.")
    else:
        reason = release.get("reason", "gate failed")
        lines.append(f"**Not promoted**: {reason}. Aliases and the endpoint are untouched.")
    lines += ["", "## Endpoint", ""]
    if deploy and deploy.get("url") is None:
        lines.append(f"- none: {deploy.get('reason')}")
    elif deploy:
        lines.append(f"- live: {deploy.get('url')} serving version {deploy.get('version')} ({deploy.get('action')})")
    else:
        lines.append("- deploy not run")
    return "\n".join(lines)


@flow(name="retrain", log_prints=True)
def retrain_flow(profile: str | None = None, deploy: bool = True) -> dict[str, Any]:
    """data → train → release → deploy; DVC reruns only what changed; a failed gate leaves production alone."""
    with exclusive_run():
        use_profile(profile)
        changes = stale_stages()
        with parent_run(load_params()["profile"]) as run_id:
            stages = data_flow() + train_flow()
            release = release_flow()
            stages += release.get("stages", [])
            served = deploy_flow() if deploy else None
        summary = summary_markdown(changes, stages, release, served)
        publish_markdown("retrain-summary", summary, "What changed, what ran, the verdict and the endpoint")
        summary_file = repo_root() / "reports" / "retrain_summary.md"
        summary_file.write_text(summary + "\n", encoding="utf-8")
        print(summary)
        return {"parent_run_id": run_id, "changes": changes, "stages": stages, "release": release, "deploy": served}


def serve_schedule(profile: str = "default", cron: str = "0 2 * * 0") -> None:
    """Serve the retrain deployment on its schedule from this process (`prefect.yaml` declares the same)."""
    retrain_flow.serve(name="retrain-weekly", cron=cron, parameters={"profile": profile})


if __name__ == "__main__":
    retrain_flow()
