"""Prefect flow `data`: fetch → base_model → correct → split → distill, each through DVC."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import (
    file_text,
    pipeline_lock,
    publish_markdown,
    publish_table,
    read_json,
    run_stages,
    stages_table,
    start_run,
)
from tasks.common.config import repo_root
from tasks.common.dvc_ops import lock_hashes
from tasks.common.tracking import log_dataset_file, stage_run

DATA_STAGES = ["fetch", "base_model", "correct", "split", "index", "distill"]
DATASETS = {  # path → (MLflow dataset name, context)
    "data/corrected/templates.parquet": ("corrected-templates", "correction"),
    "data/split/train.parquet": ("train-templates", "training"),
    "data/split/test.parquet": ("test-templates", "evaluation"),
    "data/sft/train.jsonl": ("sft-cot", "training"),
}


@task(name="log-datasets")
def log_datasets() -> None:
    """Record the data versions in MLflow, each with its DVC md5 as digest."""
    md5 = {path: digest for outs in lock_hashes().values() for path, digest in outs.items()}
    with stage_run("data") as run:
        for path, (name, context) in DATASETS.items():
            digest = md5.get(path) or next((d for p, d in md5.items() if path.startswith(p + "/")), None)
            if (repo_root() / path).exists():
                log_dataset_file(repo_root() / path, name, context, digest=(digest or "")[:32] or None)
        import mlflow

        mlflow.log_dict(lock_hashes(), "dvc_lock_hashes.json")
        print(f"datasets logged to MLflow run {run.info.run_id}")


@task(name="publish-data-reports")
def publish_data_reports(results: list[dict[str, Any]]) -> None:
    """Correction report, split statistics and distillation counts as Prefect artifacts."""
    publish_markdown("data-stages", "# Data stages\n\n" + stages_table(results), "Which data stages ran")
    publish_markdown("correction-report", file_text("reports/correction.md", "(no report)"), "Expert label corrections")
    split = read_json("reports/split.json")
    rows = [{"dataset": k, **v} for k, v in (split.get("templates") or {}).items() if isinstance(v, dict)]
    if rows:
        publish_table("split-statistics", rows, "Template-level train/test split")
    distill = read_json("reports/distill.json")
    lines = ["# Distillation", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in distill.items() if not isinstance(v, (dict, list))]
    publish_markdown("distillation-counts", "\n".join(lines), "CoT rationales accepted and rejected")


@flow(name="data", log_prints=True)
def data_flow(profile: str | None = None) -> list[dict[str, Any]]:
    """fetch → base_model → correct → split → distill (DVC skips what has not changed), then reports."""
    with pipeline_lock():
        start_run(profile)
        results = run_stages(DATA_STAGES)
        publish_data_reports(results)
        log_datasets()
    if not any(r["ran"] for r in results):
        print("data: every stage was up to date; nothing re-ran")
    return results


if __name__ == "__main__":
    data_flow()
