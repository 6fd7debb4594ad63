"""MLflow conventions shared by every stage: where runs go and how a stage run hangs under the pipeline run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tasks.config import repo_root

EXPERIMENT = "rationanomaly"
PARENT_RUN_ENV = "RATIONANOMALY_PARENT_RUN_ID"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file in the project folder (ignored by git)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def setup_mlflow() -> Any:
    """Point MLflow at the project's store and experiment; returns the mlflow module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_registry_uri() != tracking_uri():
        mlflow.set_registry_uri(tracking_uri())
    artifacts = (repo_root() / "mlartifacts").as_uri()
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


@contextmanager
def stage_run(stage: str, **tags: str) -> Iterator[Any]:
    """An MLflow run for one stage, a child of the pipeline's parent run when one is set in the env."""
    mlflow = setup_mlflow()
    run_tags = {"stage": stage, **tags}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=run_tags) as run:
        yield run
