"""Glue shared by the flows: choosing the profile, running a DVC stage as a Prefect task, publishing reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.config import repo_root, set_profile
from tasks.dvc_ops import StageResult, repro_stage


def use_profile(profile: str | None) -> None:
    """Select a params profile for this run (a DVC-tracked param, so DVC reruns what it affects)."""
    if profile and set_profile(profile):
        print(f"params.yaml: profile set to '{profile}'")


@task(name="dvc-stage", task_run_name="dvc repro {stage}", retries=0)
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
    create_table_artifact(key=key, table=rows, description=description)


def file_text(relative: str, default: str = "") -> str:
    path: Path = repo_root() / relative
    return path.read_text(encoding="utf-8") if path.exists() else default
