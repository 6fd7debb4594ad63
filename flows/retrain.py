"""Prefect flow `retrain`: data → train → release → deploy under one MLflow parent run, never two at once
(flows.common.pipeline_lock), on the profile fixed at its start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prefect import flow

from flows.common import pipeline_lock, publish_markdown, stages_table, start_run
from flows.data import data_flow
from flows.deploy import deploy_flow
from flows.release import release_flow
from flows.train import train_flow
from tasks.common.config import repo_root
from tasks.common.dvc_ops import stale_stages
from tasks.common.files import write_text_atomic
from tasks.common.tracking import PARENT_RUN_ENV, setup_mlflow


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
    changes: dict[str, list[str]], stages: list[dict[str, Any]], release: dict[str, Any], deploy: dict[str, Any] | None,
    profile: str,
) -> str:
    """What changed, what ran, how the candidate scored, whether it was promoted, what is live."""
    lines = ["# Retrain summary", "", f"Profile: **{profile}** (fixed for the whole run).", "",
             "## What changed since the last run", ""]
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
    with pipeline_lock():
        settings = start_run(profile)
        changes = stale_stages()
        with parent_run(settings.profile) as run_id:
            stages = data_flow() + train_flow()
            release = release_flow()
            stages += release.get("stages", [])
            served = deploy_flow() if deploy else None
        summary = summary_markdown(changes, stages, release, served, settings.profile)
        publish_markdown("retrain-summary", summary, "What changed, what ran, the verdict and the endpoint")
        write_text_atomic(repo_root() / "reports" / "retrain_summary.md", summary + "\n")
        print(summary)
        return {"parent_run_id": run_id, "profile": settings.profile, "changes": changes, "stages": stages,
                "release": release, "deploy": served}


def serve_schedule(profile: str = "default", cron: str = "0 2 * * 0") -> None:
    """Serve the retrain deployment on its schedule from this process (`prefect.yaml` declares the same)."""
    retrain_flow.serve(name="retrain-weekly", cron=cron, parameters={"profile": profile})


if __name__ == "__main__":
    retrain_flow()
