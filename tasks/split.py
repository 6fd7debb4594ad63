"""split stage: seeded, stratified template-level train/test per dataset, plus the session-level test sets.

Templates: `train_test_split(stratify=label)` per dataset with a fixed seed; then normals in train
are subsampled until abnormal templates make up `train_anomaly_rate` of it (paper: 15%), while the
test set keeps the natural rate. Sessions: BGL_2k cut into fixed `window_lines` windows (a window
is abnormal if any of its lines is; structured-CSV `Label` '-' means normal) and the HDFS block
sessions. Leakage: how many distinct session templates also appear among the training templates.
Raw log bytes that are not UTF-8 are replaced by U+FFFD and counted in the report; long lines are
read whole (the pandas C parser has no field-size limit) and the longest is reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.config import repo_root
from tasks.common.errors import InputError
from tasks.common.files import (
    atomic_dir,
    iter_json_lines,
    read_csv_text,
    read_labelled_templates,
    write_text_atomic,
)
from tasks.common.settings import SplitSettings, load_settings
from tasks.common.tracking import stage_run

SPLIT_COLUMNS = ["dataset", "template", "label"]


def read_text_lossy(path: Path) -> tuple[str, int]:
    """File text with invalid UTF-8 replaced by U+FFFD, and how many invalid sequences were replaced."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(path, "file not found", hint="run the fetch stage first") from exc
    text = data.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - data.count("\ufffd".encode())


def longest_line(text: str) -> int:
    """Characters in the longest line of `text` (reported, so an unexpected giant line is seen)."""
    return max((len(line) for line in text.splitlines()), default=0)


def load_templates(path: Path) -> pd.DataFrame:
    """The corrected templates (dataset, template, label 0/1); InputError names the file, row and field."""
    return read_labelled_templates(path, tuple(SPLIT_COLUMNS), missing_hint="run the correct stage first",
                                   what="corrected templates")


def split_dataset(frame: pd.DataFrame, test_fraction: float, train_rate: float | None, seed: int,
                  source: str | Path = "templates", validation_fraction: float = 0.0,
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One dataset: stratified train/test split; `validation_fraction` of the training part held out (stratified,
    at the natural anomaly rate: it chooses the verdict threshold); then normals subsampled in what remains
    for training to reach `train_rate`. Returns (train, test, validation, stats)."""
    from sklearn.model_selection import train_test_split

    dataset = str(frame["dataset"].iloc[0])
    labels = frame["label"].astype(int)
    if labels.value_counts().min() < 2 or labels.nunique() < 2:
        raise InputError(source, f"dataset '{dataset}' needs at least 2 templates of each "
                         f"label for a stratified split; found {labels.value_counts().to_dict()}", field="label")
    train_idx, test_idx = train_test_split(frame.index.to_numpy(), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    train, test = frame.loc[sorted(train_idx)], frame.loc[sorted(test_idx)]
    validation = train.iloc[:0]
    if validation_fraction > 0:
        fit_idx, validation_idx = train_test_split(train.index.to_numpy(), test_size=validation_fraction,
                                                   stratify=train["label"].astype(int), random_state=seed)
        train, validation = train.loc[sorted(fit_idx)], train.loc[sorted(validation_idx)]
    abnormal, normal = train[train["label"] == 1], train[train["label"] == 0]
    dropped = 0
    if train_rate is not None and len(abnormal):
        keep = round(len(abnormal) * (1 - train_rate) / train_rate)
        if keep < len(normal):
            rng = np.random.default_rng(seed)
            kept = rng.choice(normal.index.to_numpy(), size=keep, replace=False)
            dropped = len(normal) - keep
            train = train.loc[sorted([*abnormal.index, *kept])]
    stats = {
        "total": len(frame), "abnormal": int(labels.sum()),
        "train": len(train), "train_abnormal": int(train["label"].sum()),
        "train_anomaly_rate": round(float(train["label"].mean()), 4), "train_normals_dropped": dropped,
        "test": len(test), "test_abnormal": int(test["label"].sum()),
        "test_anomaly_rate": round(float(test["label"].mean()), 4),
        "validation": len(validation), "validation_abnormal": int(validation["label"].sum()),
    }
    return train[SPLIT_COLUMNS], test[SPLIT_COLUMNS], validation[SPLIT_COLUMNS], stats


def bgl_windows(path: Path, window_lines: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """BGL_2k structured lines in fixed windows: templates, per-line labels, window label (any abnormal line)."""
    text, replaced = read_text_lossy(path)
    frame = read_csv_text(path, text, ("Label", "EventTemplate"), "no log lines")
    templates = frame["EventTemplate"].tolist()
    labels = [0 if value.strip() == "-" else 1 for value in frame["Label"]]
    windows = []
    for start in range(0, len(frame), window_lines):
        line_labels = labels[start:start + window_lines]
        windows.append({"window_id": start // window_lines, "templates": templates[start:start + window_lines],
                        "line_labels": line_labels, "label": int(any(line_labels))})
    stats = {"lines": len(frame), "abnormal_lines": int(sum(labels)), "window_lines": window_lines,
             "windows": len(windows), "abnormal_windows": sum(w["label"] for w in windows),
             "partial_last_window": len(frame) % window_lines != 0}
    return windows, {**stats, "input": {"non_utf8_replaced": replaced, "longest_line_chars": longest_line(text)}}


def hdfs_sessions(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """HDFS block sessions from JSON lines `{block_id, templates, label}`, each line checked."""
    text, replaced = read_text_lossy(path)
    sessions = []
    for number, record in iter_json_lines(path, text):
        for key, kind in (("block_id", str), ("templates", list), ("label", int)):
            if not isinstance(record.get(key) if isinstance(record, dict) else None, kind):
                raise InputError(path, f"expected {kind.__name__} '{key}'", line=number, field=key)
        if record["label"] not in (0, 1):
            raise InputError(path, f"label {record['label']!r} is not 0/1", line=number, field="label")
        sessions.append({"session_id": record["block_id"], "templates": [str(t) for t in record["templates"]],
                         "label": record["label"]})
    if not sessions:
        raise InputError(path, "no sessions")
    stats = {"sessions": len(sessions), "abnormal": sum(s["label"] for s in sessions)}
    return sessions, {**stats, "input": {"non_utf8_replaced": replaced, "longest_line_chars": longest_line(text)}}


def leakage(sessions: list[dict[str, Any]], train: set[str], test: set[str]) -> dict[str, Any]:
    """Distinct session templates also present among the train (and test) templates, exact after strip."""
    seen = [t.strip() for s in sessions for t in s["templates"]]
    distinct = set(seen)
    in_train = distinct & train
    return {"distinct_templates": len(distinct), "in_train": len(in_train),
            "in_train_share": round(len(in_train) / len(distinct), 4) if distinct else 0.0,
            "in_test": len(distinct & test), "lines_with_train_template": sum(t in train for t in seen),
            "lines": len(seen)}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_all(templates_file: Path, bgl_structured: Path, hdfs_test: Path, out_dir: Path, report_file: Path, *,
              seed: int, test_fraction: float, train_anomaly_rate: float | None, window_lines: int,
              validation_fraction: float) -> dict[str, Any]:
    """Template split + session test sets + leakage, written all-or-nothing into `out_dir`; returns the report.

    Raises InputError naming the file, line and field of bad input; nothing is written then.
    """
    frame = load_templates(templates_file)
    windows, bgl_stats = bgl_windows(bgl_structured, window_lines)
    sessions, hdfs_stats = hdfs_sessions(hdfs_test)
    trains, tests, validations, per_dataset = [], [], [], {}
    for dataset, part in frame.groupby("dataset", sort=False):
        train, test, validation, stats = split_dataset(part, test_fraction, train_anomaly_rate, seed, templates_file,
                                                       validation_fraction)
        trains.append(train)
        tests.append(test)
        validations.append(validation)
        per_dataset[str(dataset)] = stats
    train_all = pd.concat(trains, ignore_index=True).astype({"label": "int64"})
    test_all = pd.concat(tests, ignore_index=True).astype({"label": "int64"})
    validation_all = pd.concat(validations, ignore_index=True).astype({"label": "int64"})
    train_set = {t.strip() for t in train_all["template"]}
    test_set = {t.strip() for t in test_all["template"]}
    report = {
        "seed": seed, "test_fraction": test_fraction, "train_anomaly_rate": train_anomaly_rate,
        "validation_fraction": validation_fraction, "templates": per_dataset,
        "totals": {"train": len(train_all), "test": len(test_all), "validation": len(validation_all)},
        "sessions": {"bgl2k": {k: v for k, v in bgl_stats.items() if k != "input"},
                     "hdfs": {k: v for k, v in hdfs_stats.items() if k != "input"}},
        "leakage": {"bgl2k": leakage(windows, train_set, test_set), "hdfs": leakage(sessions, train_set, test_set)},
        "inputs": {bgl_structured.name: bgl_stats["input"], hdfs_test.name: hdfs_stats["input"]},
    }
    with atomic_dir(out_dir) as staging:
        train_all.to_parquet(staging / "train.parquet", index=False)
        test_all.to_parquet(staging / "test.parquet", index=False)
        if len(validation_all):  # no fold (validation_fraction 0): no file, and no threshold is fitted
            validation_all.to_parquet(staging / "validation.parquet", index=False)
        _write_jsonl(staging / "sessions_bgl2k.jsonl", windows)
        _write_jsonl(staging / "sessions_hdfs.jsonl", sessions)
    write_text_atomic(report_file, json.dumps(report, indent=2) + "\n")
    return report


def run(settings: SplitSettings) -> dict[str, Any]:
    """The stage (paths relative to the repo root); returns the split report. Raises InputError naming the
    file, line and field of bad input."""
    root = repo_root()
    return split_all(
        root / settings.templates_file, root / settings.bgl_structured, root / settings.hdfs_test,
        root / settings.out_dir, root / settings.report_file, seed=settings.seed,
        test_fraction=settings.test_fraction, train_anomaly_rate=settings.train_anomaly_rate,
        window_lines=settings.window_lines, validation_fraction=settings.validation_fraction,
    )


def main() -> None:
    settings = load_settings().split
    report = run(settings)
    with stage_run("split"):
        import mlflow

        mlflow.log_params({k: getattr(settings, k) for k in ("seed", "test_fraction", "validation_fraction",
                                                              "train_anomaly_rate", "window_lines")})
        metrics = {f"{d}_{k}": v for d, s in report["templates"].items() for k, v in s.items()}
        metrics.update({f"leakage_{name}_in_train": v["in_train"] for name, v in report["leakage"].items()})
        metrics.update(bgl2k_windows=report["sessions"]["bgl2k"]["windows"],
                       hdfs_sessions=report["sessions"]["hdfs"]["sessions"])
        mlflow.log_metrics(metrics)
    sizes = ", ".join(f"{d} {s['train']}/{s['test']}" for d, s in report["templates"].items())
    print(f"split: train/test templates {sizes}; BGL_2k windows {report['sessions']['bgl2k']['windows']}, "
          f"HDFS test sessions {report['sessions']['hdfs']['sessions']}")


if __name__ == "__main__":
    main()
