"""The test data every method is scored on, identical for all of them: template test sets per dataset and the
session sets (BGL_2k 100-line windows, HDFS blocks), read and checked before any model loads.

Every set becomes an `EvalSet`: items with 0/1 labels, each item abnormal when any of its (dataset,
template) keys is judged abnormal (a template item has one key; a session has its templates; a served log
line has the template detect mined for it). Methods answer keys once; sets map answers to items.
"""

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

Key = tuple[str, str]  # (dataset the prompt names, template)


@dataclass(frozen=True)
class EvalSet:
    """One test set: `labels[i]` (1 = abnormal) of item `ids[i]`, judged abnormal when any of `keys[i]` is.

    `family` is template | session | served; `positives_expected` False for a set with no anomaly by
    construction (a system never trained on), scored by its false-alarm rate.
    """

    name: str
    family: str
    ids: tuple[str, ...]
    labels: np.ndarray
    keys: tuple[tuple[Key, ...], ...]
    positives_expected: bool = True
    note: str = ""

    def unique_keys(self) -> list[Key]:
        """Every (dataset, template) the set's items depend on, once, in first-use order."""
        return list(dict.fromkeys(key for keys in self.keys for key in keys))

    def digest(self) -> str:
        """A short hash of the set's content (ids, labels, keys): metrics on other data are never compared."""
        return _digest([self.ids, self.labels.tolist(), self.keys])


def template_set(name: str, frame: pd.DataFrame, dataset: str, note: str = "") -> EvalSet:
    """Each template of `frame` (template, label) is one item with one key."""
    templates = frame["template"].astype(str).tolist()
    return EvalSet(name, "template", tuple(templates), frame["label"].to_numpy(dtype=int),
                   tuple(((dataset, t),) for t in templates), note=note)


def session_set(name: str, sessions: list[dict[str, Any]], dataset: str, note: str = "") -> EvalSet:
    """Each session is one item, abnormal when any of its templates is (as in the paper)."""
    return EvalSet(name, "session", tuple(s["id"] for s in sessions),
                   np.asarray([s["label"] for s in sessions], dtype=int),
                   tuple(tuple(dict.fromkeys((dataset, t) for t in s["templates"])) for s in sessions), note=note)


@dataclass
class EvalData:
    """Everything every method is scored on, identical for all of them."""

    train: pd.DataFrame
    templates: dict[str, pd.DataFrame]  # dataset -> test templates (capped)
    sessions: dict[str, list[dict[str, Any]]]  # bgl2k/hdfs -> sessions
    seen: set[str] = field(default_factory=set)  # training templates, stripped
    validation: pd.DataFrame | None = None  # the fold the verdict threshold is chosen on (never scored as test)

    def validation_keys(self) -> tuple[list[Key], list[int]]:
        """(dataset, template) keys of the validation fold and their labels ([] without a fold)."""
        frame = self.validation if self.validation is not None else self.train.iloc[:0]
        return (list(zip(frame["dataset"], frame["template"], strict=True)),
                frame["label"].astype(int).tolist())

    def sets(self) -> list[EvalSet]:
        """The template sets, the session sets and their unseen-only subsets (training templates removed)."""
        out = [template_set(f"template_{d}", frame, d) for d, frame in self.templates.items()]
        for name, sessions in self.sessions.items():
            dataset = SESSION_SETS[name][2]
            out.append(session_set(f"session_{name}", sessions, dataset))
            out.append(session_set(f"session_{name}_unseen", unseen_only(sessions, self.seen), dataset,
                                   note="lines of training templates removed"))
        return out

    def sample_sets(self, per_dataset: int, seed: int) -> list[EvalSet]:
        """A fixed, seeded, stratified sample of `per_dataset` templates per dataset (for the zero-shot model)."""
        return [template_set(f"template_{d}_sample", cap_stratified(frame, per_dataset, seed), d,
                             note=f"a fixed sample of {min(per_dataset, len(frame))} templates")
                for d, frame in self.templates.items()]

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
    validation_file = split_dir / "validation.parquet"
    validation = read_split_frame(validation_file) if validation_file.is_file() else None
    templates = {str(name): cap_stratified(part.reset_index(drop=True), settings.max_templates_per_dataset, seed)
                 for name, part in test.groupby("dataset", sort=True)}
    sessions = {name: cap_sessions(read_sessions(split_dir / file, id_field), settings.max_sessions_per_dataset,
                                   seed)
                for name, (file, id_field, _) in SESSION_SETS.items()}
    return EvalData(train=train, templates=templates, sessions=sessions,
                    seen={t.strip() for t in train["template"]}, validation=validation)

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
