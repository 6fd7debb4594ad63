"""MLflow conventions shared by every stage: where runs go and how a stage run hangs under the pipeline run."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.common.config import repo_root

EXPERIMENT = "rationanomaly"
PARENT_RUN_ENV = "RATIONANOMALY_PARENT_RUN_ID"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file in the project folder (ignored by git)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def is_tracking_server(uri: str) -> bool:
    """True for a remote MLflow tracking server (http/https/databricks), which decides where artifacts go."""
    return uri.split(":", 1)[0].lower() in {"http", "https", "databricks"}


def setup_mlflow() -> Any:
    """Point MLflow at the project's store and experiment; returns the mlflow module.

    The experiment is created with its artifacts in the project's `mlartifacts/` on a local store; a tracking
    server keeps them in its own artifact store (`mlflow server --artifacts-destination s3://...`), so every
    client's artifacts land in one place (README, "Scaling out").
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_registry_uri() != tracking_uri():
        mlflow.set_registry_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        local = None if is_tracking_server(tracking_uri()) else (repo_root() / "mlartifacts").as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=local)
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
    # In-process (a flow's own task inside the retrain parent run): nest under the active run.
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=stage, tags=run_tags, nested=nested) as run:
        yield run


def log_dataset_file(path: str | Path, name: str, context: str, digest: str | None = None) -> None:
    """`mlflow.log_input` for a parquet/jsonl file in the active run; digest = DVC md5 when known."""
    import mlflow
    import pandas as pd

    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    # Nested columns (chat messages) are logged as text so the dataset schema stays flat.
    frame = frame.apply(lambda col: col.map(str) if col.dtype == object else col)
    with warnings.catch_warnings():  # schema hints about int columns and ambiguous local sources: noise here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(path), name=name, digest=digest)
        mlflow.log_input(dataset, context=context)


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params (`lora.r`: '8'; lists as JSON); values cut to MLflow's 6000-char limit."""
    import json

    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)[:6000]
    return flat
