"""`rationanomaly review export`: from `detect` outputs, the templates worth a person's time, as a review file.

Input: one or more `detect` JSON-lines outputs (tasks.detection.detector: a `template` record the first time a
template appears, with its text, dataset, verdict, score, rationale, threshold, neighbour_shown, first_stage and an
example line; one `line` record per event naming its template id), and optionally the run's verdict cache
(tasks.detection.cache, read only), which fills what an older output's template records lack (score, rationale,
neighbour_shown, first_stage) for the same model version, system and template.

A template is one (dataset, template text) pair over all files; its `lines` are the events of all files that
carry it (a drain merge that renames a template id mid-run counts the later lines under the new text).

Ranking: the value of a person's label for a template (issue 20 item 1; the active-learning criteria of
EagerLog and FAME: uncertainty, and coverage of what the labelled set does not hold), with n its lines, s its score
and θ the version's threshold:

    value = (A + U + K) · log2(1 + n)

- A = 1 when the verdict is `abnormal` (an alert someone will be paged for: confirming or refuting it saves the
  most attention), else 0;
- U = 1 - |s - θ| / max(θ, 1 - θ), in [0, 1]: 1 at the threshold, 0 at the far end of the scale (the verdict a
  label is most likely to flip); 1 when no verdict could be read (`invalid`); 0 when there is no score or
  threshold (a version served by its answer word);
- K = 1 when the prompt showed no labelled neighbour of the template's own system above the retrieval floor
  (`neighbour_shown` false: the model had no expert example to go by, and a label adds one to the index), else 0
  (shown, or not reported);
- log2(1 + n): more lines, more value, but sub-linearly, so one chatty template does not bury a hundred rare
  alerts.

Templates the verdict rule's first stage decided (no word of letters: normal without a model call) are left out:
a label cannot change their verdict. So are templates the version's index already holds labelled (detect's
`labelled_template`: their verdict is that label). Templates of value 0 are left out too. Ties go to more lines, then the text.

Output: the review file format the `correct` stage reads (tasks.data.review: `template,label,category,note`), with
`label` (and `category`, `note`) empty for the person to fill, then `system` (the template's dataset as detect
named it: the review reader's optional system column, which lets a label of a system the template lists do not
hold reach the index) and context columns the reader ignores: lines, verdict, score, threshold, neighbour_shown,
value, example_line, example, rationale, source. The file's name is the annotator
(`corrections/reviews/<name>.csv`); the reader refuses a row whose label is still empty, naming the file and line
(field 'label'), so a half-filled export never enters a release: fill every row or delete it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.errors import InputError
from tasks.common.files import write_text_atomic
from tasks.common.prompt import ABNORMAL

REVIEW_COLUMNS = ("template", "label", "category", "note")  # what tasks.data.review reads
CONTEXT_COLUMNS = ("system", "lines", "verdict", "score", "threshold", "neighbour_shown", "value", "example_line",
                   "example", "rationale", "source")
TEMPLATE_FIELDS = ("template_id", "template", "dataset", "verdict")  # required in a `template` record


@dataclass
class Candidate:
    """One (dataset, template) of the detect outputs, with what ranks it."""

    template: str
    dataset: str
    verdict: str
    score: float | None
    threshold: float | None
    rationale: str
    neighbour_shown: bool | None
    first_stage: bool
    model_version: str
    example: str
    example_line: int | None
    source: str  # the first detect output that holds it
    lines: int = 0
    labelled: bool = False  # the version's index holds it, labelled, and its verdict is that label

    def terms(self, threshold: float | None = None) -> tuple[float, float, float]:
        """(A, U, K) of the module's formula; `threshold` replaces the record's when given."""
        theta = self.threshold if threshold is None else threshold
        alert = 1.0 if self.verdict == ABNORMAL else 0.0
        if self.verdict == "invalid":
            near = 1.0
        elif self.score is None or theta is None:
            near = 0.0
        else:
            near = max(0.0, 1.0 - abs(self.score - theta) / max(theta, 1.0 - theta))
        unknown = 1.0 if self.neighbour_shown is False else 0.0
        return alert, near, unknown

    def value(self, threshold: float | None = None) -> float:
        """(A + U + K) · log2(1 + lines); 0 for a first-stage template and for one already labelled."""
        if self.first_stage or self.labelled:
            return 0.0
        return sum(self.terms(threshold)) * math.log2(1 + self.lines)


@dataclass
class Export:
    """The ranked rows written, and what was read and left out."""

    rows: list[tuple[Candidate, float]]
    templates: int  # distinct (dataset, template) pairs read
    first_stage: int  # left out: the first stage decides them whatever the label
    labelled: int  # left out: the version's index holds them labelled (detect's `labelled_template`)
    no_value: int  # left out: value 0 (a confident normal verdict with a labelled neighbour shown)
    over_budget: int  # valuable, past --budget


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def read_detect_output(path: Path, found: dict[tuple[str, str], Candidate]) -> None:
    """Add the templates and line counts of one detect output to `found` ((dataset, template) → Candidate).

    Raises InputError naming the file and line for a line that is not a JSON object, a template record missing a
    field, a line record naming a template id no template record introduced, or a file with no template record.
    """
    if not path.is_file():
        raise InputError(path, "detect output not found", hint="the file `rationanomaly detect --out` wrote")
    current: dict[Any, tuple[str, str]] = {}  # template id → key, as the file introduced it
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"not a JSON line ({exc.msg})", line=number,
                                 hint="expected the JSON lines `rationanomaly detect --out` writes") from None
            if not isinstance(record, dict):
                raise InputError(path, "not a JSON object", line=number)
            kind = record.get("kind")
            if kind == "template":
                missing = [f for f in TEMPLATE_FIELDS if record.get(f) is None]
                if missing:
                    raise InputError(path, f"template record without {missing}", line=number, field=missing[0])
                key = (str(record["dataset"]), str(record["template"]))
                current[record["template_id"]] = key
                if key not in found:
                    score, threshold = record.get("score"), record.get("threshold")
                    found[key] = Candidate(
                        key[1], key[0], str(record["verdict"]), None if score is None else float(score),
                        None if threshold is None else float(threshold), str(record.get("rationale") or ""),
                        _bool(record.get("neighbour_shown")), bool(record.get("first_stage")),
                        str(record.get("model_version") or ""), str(record.get("example") or ""),
                        record.get("example_line"), str(path),
                        labelled=bool(record.get("labelled_template")))
            elif kind == "line":
                key = current.get(record.get("template_id"))
                if key is None:
                    raise InputError(path, f"line record names template id {record.get('template_id')!r}, which no "
                                     "template record before it introduced", line=number, field="template_id")
                found[key].lines += 1
    if not current:
        raise InputError(path, "no template records: not a detect output",
                         hint="the file `rationanomaly detect --out` wrote")


def fill_from_cache(cache_file: Path, found: dict[tuple[str, str], Candidate]) -> int:
    """Fill score, rationale, neighbour_shown and first_stage that the output lacked from a verdict cache (opened
    read-only: an export never changes it), for the same model version, system and template; returns how many
    candidates changed. Raises InputError when the file is not a verdict cache."""
    if not cache_file.is_file():
        raise InputError(cache_file, "verdict cache not found", hint="detect.cache_file in params.yaml")
    try:
        db = sqlite3.connect(f"file:{cache_file}?mode=ro", uri=True)
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(verdicts)")}
            wanted = [c for c in ("score", "rationale", "neighbour_shown", "first_stage") if c in columns]
            if not {"model_version", "dataset", "template"} <= columns:
                raise InputError(cache_file, "not a verdict cache (no verdicts table)")
            rows = db.execute(f"SELECT model_version, dataset, template, {', '.join(wanted)} FROM verdicts").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise InputError(cache_file, f"not a verdict cache ({exc})") from None
    changed = 0
    for version, dataset, template, *values in rows:
        candidate = found.get((dataset, template))
        if candidate is None or (candidate.model_version and candidate.model_version != version):
            continue
        cached = dict(zip(wanted, values, strict=True))
        before = (candidate.score, candidate.rationale, candidate.neighbour_shown, candidate.first_stage)
        if candidate.score is None and cached.get("score") is not None:
            candidate.score = float(cached["score"])
        if not candidate.rationale and cached.get("rationale"):
            candidate.rationale = str(cached["rationale"])
        if candidate.neighbour_shown is None and cached.get("neighbour_shown") is not None:
            candidate.neighbour_shown = bool(cached["neighbour_shown"])
        candidate.first_stage = candidate.first_stage or bool(cached.get("first_stage"))
        changed += before != (candidate.score, candidate.rationale, candidate.neighbour_shown, candidate.first_stage)
    return changed


def rank(found: dict[tuple[str, str], Candidate], budget: int | None = None,
         threshold: float | None = None) -> Export:
    """The candidates worth a label, most valuable first (the module's formula), at most `budget` of them
    (None: all); `threshold` replaces the threshold the records carry."""
    valued = [(c, c.value(threshold)) for c in found.values()]
    first_stage = sum(c.first_stage for c in found.values())
    labelled = sum(c.labelled and not c.first_stage for c in found.values())
    worth = sorted(((c, v) for c, v in valued if v > 0), key=lambda cv: (-cv[1], -cv[0].lines, cv[0].template))
    kept = worth if budget is None else worth[:budget]
    return Export(kept, len(found), first_stage, labelled, len(valued) - first_stage - labelled - len(worth),
                  len(worth) - len(kept))


def review_csv(rows: Sequence[tuple[Candidate, float]], threshold: float | None = None) -> str:
    """The review file's text: REVIEW_COLUMNS (label, category and note empty) then CONTEXT_COLUMNS."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow((*REVIEW_COLUMNS, *CONTEXT_COLUMNS))
    for c, value in rows:
        theta = c.threshold if threshold is None else threshold
        writer.writerow((c.template, "", "", "", c.dataset, c.lines, c.verdict,
                         "" if c.score is None else f"{c.score:.4f}", "" if theta is None else f"{theta:.4f}",
                         "" if c.neighbour_shown is None else str(c.neighbour_shown).lower(), f"{value:.3f}",
                         "" if c.example_line is None else c.example_line, c.example, c.rationale, c.source))
    return buffer.getvalue()


def export_review(outputs: Sequence[Path], out: Path, *, budget: int | None = None, cache_file: Path | None = None,
                  threshold: float | None = None, overwrite: bool = False) -> Export:
    """Read `outputs`, rank, and write the review file `out` atomically (whole or not at all).

    Raises InputError for bad input (naming the file and line), a budget below 1, a threshold outside [0, 1], no
    template worth a label, or an existing `out` without `overwrite` (it may hold a person's labels).
    """
    if budget is not None and budget < 1:
        raise InputError("--budget", f"must be at least 1, got {budget}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError("--threshold", f"must be in [0, 1], got {threshold}")
    if out.exists() and not overwrite:
        raise InputError(out, "already exists and may hold labels", hint="choose another --out, or pass --force")
    if not outputs:
        raise InputError("FILES", "no detect output given")
    found: dict[tuple[str, str], Candidate] = {}
    for path in outputs:
        read_detect_output(Path(path), found)
    if cache_file is not None:
        fill_from_cache(Path(cache_file), found)
    result = rank(found, budget, threshold)
    if not result.rows:
        raise InputError(", ".join(map(str, outputs)), f"no template worth a label among {result.templates} "
                         f"({result.first_stage} decided by the first stage, {result.labelled} labelled already, "
                         f"{result.no_value} confident normals with a labelled neighbour shown)")
    write_text_atomic(out, review_csv(result.rows, threshold))
    return result
