"""The test data every method is scored on, identical for all of them: template test sets per dataset and the
session sets (BGL_2k 100-line windows, HDFS blocks), read and checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.errors import InputError
from tasks.common.files import iter_json_lines, read_labelled_templates, sha256_json
from tasks.common.settings import EvaluateSettings

# session set → (file in the split folder, id field, the dataset name its templates are prompted with)
SESSION_SETS = {"bgl2k": ("sessions_bgl2k.jsonl", "window_id", "bgl"), "hdfs": ("sessions_hdfs.jsonl", "session_id",
                                                                                 "hdfs")}

SPLIT_COLUMNS = ("dataset", "template", "label")

@dataclass
class EvalData:
    """Everything every method is scored on, identical for all of them."""

    train: pd.DataFrame
    templates: dict[str, pd.DataFrame]  # dataset -> test templates (capped)
    sessions: dict[str, list[dict[str, Any]]]  # bgl2k/hdfs -> sessions
    seen: set[str] = field(default_factory=set)  # training templates, stripped

    def items(self) -> list[tuple[str, str]]:
        """Unique (dataset, template) pairs to classify: test templates and every session template."""
        pairs: dict[tuple[str, str], None] = {}
        for dataset, frame in self.templates.items():
            pairs.update(dict.fromkeys(zip([dataset] * len(frame), frame["template"], strict=True)))
        for name, sessions in self.sessions.items():
            prompt_dataset = SESSION_SETS[name][2]
            for session in sessions:
                pairs.update(dict.fromkeys((prompt_dataset, t) for t in session["templates"]))
        return list(pairs)

    def digests(self) -> dict[str, str]:
        """A short hash of each test set's content, so metrics computed on other data are never compared."""
        out = {}
        for dataset, frame in self.templates.items():
            rows = sorted(zip(frame["template"], frame["label"].astype(int), strict=True))
            out[f"template_{dataset}"] = _digest(rows)
        for name, sessions in self.sessions.items():
            out[f"session_{name}"] = _digest([(s["id"], s["templates"], s["label"]) for s in sessions])
        return out

def _digest(obj: Any) -> str:
    return sha256_json(obj)[:16]

def read_split_frame(path: Path) -> pd.DataFrame:
    """A split parquet (dataset, template, label 0/1), checked; InputError names the file, row and field."""
    frame = read_labelled_templates(path, SPLIT_COLUMNS, missing_hint="run `dvc repro split`", what="split templates")
    frame = frame.assign(template=frame["template"].astype(str), dataset=frame["dataset"].astype(str).str.lower(),
                         label=frame["label"].astype(int))
    return frame[list(SPLIT_COLUMNS)].reset_index(drop=True)


def read_sessions(path: Path, id_field: str) -> list[dict[str, Any]]:
    """Session JSON lines, each checked: an id, a list of templates, a 0/1 label, optional line_labels."""
    if not path.is_file():
        raise InputError(path, "session file not found", hint="run `dvc repro split`")
    sessions = []
    for number, row in iter_json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("templates"), list):
            raise InputError(path, "expected an object with a list 'templates'", line=number, field="templates")
        if row.get("label") not in (0, 1):
            raise InputError(path, f"label {row.get('label')!r} is not 0/1", line=number, field="label")
        line_labels = row.get("line_labels")
        if line_labels is not None and (not isinstance(line_labels, list)
                                        or len(line_labels) != len(row["templates"])):
            raise InputError(path, "line_labels must be a list as long as templates", line=number,
                             field="line_labels")
        sessions.append({"id": str(row.get(id_field, number)), "templates": [str(t) for t in row["templates"]],
                         "line_labels": [int(v) for v in line_labels] if line_labels is not None else None,
                         "label": int(row["label"])})
    if not sessions:
        raise InputError(path, "no sessions")
    return sessions

def cap_stratified(frame: pd.DataFrame, cap: int | None, seed: int, label: str = "label") -> pd.DataFrame:
    """At most `cap` rows keeping the label mix (seeded), with at least one row of every label present, so a
    small cap never leaves a test set without anomalies; the whole frame when it is small enough."""
    if cap is None or len(frame) <= int(cap):
        return frame
    cap = int(cap)
    groups = {key: np.asarray(idx) for key, idx in frame.groupby(label, sort=True).indices.items()}
    quota = {key: max(1, round(cap * len(idx) / len(frame))) for key, idx in groups.items()}
    while sum(quota.values()) > cap and max(quota.values()) > 1:
        quota[max(quota, key=lambda k: quota[k])] -= 1
    rng = np.random.default_rng(seed)
    picked = np.concatenate([rng.choice(idx, size=min(quota[key], len(idx)), replace=False)
                             for key, idx in groups.items()])
    return frame.iloc[np.sort(picked)]

def cap_sessions(sessions: list[dict[str, Any]], cap: int | None, seed: int) -> list[dict[str, Any]]:
    """At most `cap` sessions, stratified by label like `cap_stratified`; all of them when `cap` is None."""
    if cap is None or len(sessions) <= int(cap):
        return sessions
    frame = pd.DataFrame({"i": range(len(sessions)), "label": [s["label"] for s in sessions]})
    return [sessions[i] for i in cap_stratified(frame, cap, seed)["i"]]

def load_test_data(settings: EvaluateSettings, root: Path) -> EvalData:
    """Read and check every test input (before any model loads), applying the seeded caps.

    Raises InputError naming the file, line and field of the first problem in the split folder.
    """
    split_dir = root / settings.split_dir
    seed = settings.seed
    train = read_split_frame(split_dir / "train.parquet")
    test = read_split_frame(split_dir / "test.parquet")
    templates = {str(name): cap_stratified(part.reset_index(drop=True), settings.max_templates_per_dataset, seed)
                 for name, part in test.groupby("dataset", sort=True)}
    sessions = {name: cap_sessions(read_sessions(split_dir / file, id_field), settings.max_sessions_per_dataset,
                                   seed)
                for name, (file, id_field, _) in SESSION_SETS.items()}
    return EvalData(train=train, templates=templates, sessions=sessions,
                    seen={t.strip() for t in train["template"]})

def unseen_only(sessions: list[dict[str, Any]], seen: set[str]) -> list[dict[str, Any]]:
    """Sessions with every line of a training template removed (no leakage); empty sessions dropped."""
    out = []
    for session in sessions:
        keep = [i for i, t in enumerate(session["templates"]) if t.strip() not in seen]
        if not keep:
            continue
        if session["line_labels"] is not None:
            labels = [session["line_labels"][i] for i in keep]
            out.append({**session, "templates": [session["templates"][i] for i in keep], "line_labels": labels,
                        "label": int(any(labels))})
        elif len(keep) == len(session["templates"]):
            out.append(session)
    return out
