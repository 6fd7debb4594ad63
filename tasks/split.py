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
from prefect import task

from tasks.config import repo_root, section
from tasks.errors import InputError, atomic_dir, read_csv_text, write_text_atomic
from tasks.tracking import stage_run

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
    return max((len(line) for line in text.splitlines()), default=0)


def check_params(params: dict[str, Any]) -> None:
    fraction, rate = params.get("test_fraction", 0.4), params.get("train_anomaly_rate")
    if not 0 < float(fraction) < 1:
        raise InputError("params.yaml", f"test_fraction {fraction} must be between 0 and 1",
                         field="split.test_fraction")
    if rate is not None and not 0 < float(rate) < 1:
        raise InputError("params.yaml", f"train_anomaly_rate {rate} must be between 0 and 1 (or null)",
                         field="split.train_anomaly_rate")
    if int(params.get("window_lines", 100)) < 1:
        raise InputError("params.yaml", "window_lines must be at least 1", field="split.window_lines")


def load_templates(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise InputError(path, "corrected templates not found", hint="run the correct stage first") from exc
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}", field=missing[0])
    if frame.empty:
        raise InputError(path, "empty template list")
    return frame


def split_dataset(frame: pd.DataFrame, test_fraction: float, train_rate: float | None, seed: int,
                  source: str | Path = "templates") -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One dataset: stratified split, then normals subsampled in train to reach `train_rate`."""
    from sklearn.model_selection import train_test_split

    dataset = str(frame["dataset"].iloc[0])
    labels = frame["label"].astype(int)
    if labels.value_counts().min() < 2 or labels.nunique() < 2:
        raise InputError(source, f"dataset '{dataset}' needs at least 2 templates of each "
                         f"label for a stratified split; found {labels.value_counts().to_dict()}", field="label")
    train_idx, test_idx = train_test_split(frame.index.to_numpy(), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    train, test = frame.loc[sorted(train_idx)], frame.loc[sorted(test_idx)]
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
    }
    return train[SPLIT_COLUMNS], test[SPLIT_COLUMNS], stats


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
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", line=number) from exc
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


def split_all(templates_file: Path, bgl_structured: Path, hdfs_test: Path, out_dir: Path, report_file: Path,
              seed: int = 42, test_fraction: float = 0.4, train_anomaly_rate: float | None = 0.15,
              window_lines: int = 100) -> dict[str, Any]:
    """Template split + session test sets + leakage, written all-or-nothing into `out_dir`; returns the report."""
    check_params({"test_fraction": test_fraction, "train_anomaly_rate": train_anomaly_rate,
                  "window_lines": window_lines})
    frame = load_templates(templates_file)
    windows, bgl_stats = bgl_windows(bgl_structured, window_lines)
    sessions, hdfs_stats = hdfs_sessions(hdfs_test)
    trains, tests, per_dataset = [], [], {}
    for dataset, part in frame.groupby("dataset", sort=False):
        train, test, stats = split_dataset(part, test_fraction, train_anomaly_rate, seed, templates_file)
        trains.append(train)
        tests.append(test)
        per_dataset[str(dataset)] = stats
    train_all = pd.concat(trains, ignore_index=True).astype({"label": "int64"})
    test_all = pd.concat(tests, ignore_index=True).astype({"label": "int64"})
    train_set = {t.strip() for t in train_all["template"]}
    test_set = {t.strip() for t in test_all["template"]}
    report = {
        "seed": seed, "test_fraction": test_fraction, "train_anomaly_rate": train_anomaly_rate,
        "templates": per_dataset, "totals": {"train": len(train_all), "test": len(test_all)},
        "sessions": {"bgl2k": {k: v for k, v in bgl_stats.items() if k != "input"},
                     "hdfs": {k: v for k, v in hdfs_stats.items() if k != "input"}},
        "leakage": {"bgl2k": leakage(windows, train_set, test_set), "hdfs": leakage(sessions, train_set, test_set)},
        "inputs": {bgl_structured.name: bgl_stats["input"], hdfs_test.name: hdfs_stats["input"]},
    }
    with atomic_dir(out_dir) as staging:
        train_all.to_parquet(staging / "train.parquet", index=False)
        test_all.to_parquet(staging / "test.parquet", index=False)
        _write_jsonl(staging / "sessions_bgl2k.jsonl", windows)
        _write_jsonl(staging / "sessions_hdfs.jsonl", sessions)
    write_text_atomic(report_file, json.dumps(report, indent=2) + "\n")
    return report


def run(params: dict[str, Any]) -> dict[str, Any]:
    """The stage from its params section (paths relative to the repo root)."""
    check_params(params)
    root = repo_root()
    rate = params.get("train_anomaly_rate")
    return split_all(
        root / params.get("templates_file", "data/corrected/templates.parquet"), root / params["bgl_structured"],
        root / params["hdfs_test"], root / params["out_dir"], root / params.get("report_file", "reports/split.json"),
        seed=int(params["seed"]), test_fraction=float(params["test_fraction"]),
        train_anomaly_rate=None if rate is None else float(rate), window_lines=int(params["window_lines"]),
    )


@task(name="split")
def split_task(params: dict[str, Any]) -> dict[str, Any]:
    return run(params)


def main() -> None:
    params = section("split")
    report = run(params)
    with stage_run("split"):
        import mlflow

        mlflow.log_params({k: params[k] for k in ("seed", "test_fraction", "train_anomaly_rate", "window_lines")})
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
