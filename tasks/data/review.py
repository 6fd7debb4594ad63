"""Multi-annotator review: one CSV per annotator, resolved by majority, agreement measured as kappa.

A review folder holds `<annotator>.csv` files with columns `template,label[,category][,note][,system]`
(label `normal`/`abnormal` or 0/1; category one of the paper's Table 1 categories). The file name names the
annotator; the optional `system` column (alias `dataset`) names the system a template was logged by, so a file
may label templates of a system the LogPrompt lists do not hold (e.g. `thunderbird`, issue 20): empty or
absent means a template of those lists, as in files written before the column existed. A template is a
(system, template) pair: the same text of two systems is two templates. Each template
gets the majority label of the annotators who labelled it; on a tie the senior reviewer's label
wins, and a tie the senior did not vote on stays unresolved (listed, never applied). Agreement is
Cohen's kappa for two annotators and Fleiss' kappa for three or more, computed over the templates
every annotator labelled. The resolution comes out as corrections in the `anomaly_patch.json`
format, so the `correct` stage applies it exactly like the shipped expert patch.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.errors import InputError
from tasks.common.prompt import CATEGORIES, LABELS, label_name

# The instruction string of every record in the paper's anomaly_patch.json.
INSTRUCTION = "Classify the given log entries into normal and abnormal categories."
REQUIRED_COLUMNS = ("template", "label")
SYSTEM_COLUMNS = ("system", "dataset")  # the optional column naming a template's system (first found wins)


@dataclass(frozen=True)
class Annotation:
    """One annotator's decision on one template, with the line it came from."""

    annotator: str
    template: str
    label: int  # 1 = abnormal
    category: str | None
    note: str
    line: int
    system: str | None = None  # the template's system (lowercase); None: the LogPrompt lists (BGL, Spirit)
    file: str = ""  # the review file's name, e.g. `erin.csv`


@dataclass
class ReviewResult:
    """The resolution of a review folder: corrections to apply, what stayed open, and agreement."""

    annotators: list[str]
    records: list[dict[str, Any]]
    unresolved: list[dict[str, Any]]
    kappa: float | None
    kappa_method: str | None  # "cohen" | "fleiss" | None (one annotator, or no template labelled by all)
    kappa_templates: int
    senior: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts, agreement (kappa and its method) and notes, for printing and the report."""
        by = Counter(r["resolved_by"] for r in self.records)
        return {
            "annotators": self.annotators, "senior": self.senior, "senior_present": self.senior in self.annotators,
            "templates": len(self.records) + len(self.unresolved), "resolved": len(self.records),
            "resolved_by": dict(sorted(by.items())), "unresolved": self.unresolved,
            "kappa": self.kappa, "kappa_method": self.kappa_method, "kappa_templates": self.kappa_templates,
            "notes": self.notes,
        }


def parse_label(value: str) -> int:
    """`normal`/`abnormal` (any case) or `0`/`1` → 0/1; ValueError otherwise."""
    text = value.strip().lower()
    if text in ("0", "1"):
        return int(text)
    return LABELS.index(label_name(text))


def parse_category(value: str) -> str | None:
    """A Table 1 category name (case-insensitive), None when empty; ValueError for anything else."""
    text = " ".join(value.strip().lower().split())
    if not text:
        return None
    if text not in CATEGORIES:
        raise ValueError(f"unknown category {value!r}; expected one of {', '.join(CATEGORIES)}")
    return text


def load_review_file(path: Path) -> list[Annotation]:
    """One annotator's CSV, checked row by row (errors name the line and the field)."""
    annotator = path.stem
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 text (byte {exc.start})", line=line) from exc
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; found {columns}", line=1, field=missing[0],
                         hint="columns: template,label[,category][,note][,system]")
    reader.fieldnames = columns
    system_column = next((c for c in SYSTEM_COLUMNS if c in columns), None)
    seen: dict[tuple[str | None, str], Annotation] = {}
    for row in reader:
        line = reader.line_num
        template = (row.get("template") or "").strip()
        if not template:
            raise InputError(path, "empty template", line=line, field="template")
        try:
            label = parse_label(row.get("label") or "")
        except ValueError:
            raise InputError(path, f"unknown label {row.get('label')!r}", line=line, field="label",
                             hint="use normal/abnormal or 0/1") from None
        try:
            category = parse_category(row.get("category") or "")
        except ValueError as exc:
            raise InputError(path, str(exc), line=line, field="category") from None
        note = (row.get("note") or "").strip()
        system = (" ".join((row.get(system_column) or "").split()).lower() or None) if system_column else None
        key = (system, template)
        if key in seen and seen[key].label != label:
            raise InputError(path, f"template labelled twice with different labels (lines {seen[key].line} "
                             f"and {line})", line=line, field="label")
        seen.setdefault(key, Annotation(annotator, template, label, category, note, line, system, path.name))
    if not seen:
        raise InputError(path, "no review rows", hint="remove the file or add rows: template,label,...")
    return list(seen.values())


def load_reviews(review_dir: Path) -> dict[str, list[Annotation]]:
    """Every `*.csv` in the folder (other files, such as README.md, are ignored), by annotator name."""
    if not review_dir.is_dir():
        return {}
    return {path.stem: load_review_file(path) for path in sorted(review_dir.glob("*.csv"))}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def agreement(labels: Mapping[str, Mapping[str, int]]) -> tuple[float | None, str | None, int]:
    """(kappa, method, templates used) over the templates every annotator labelled.

    Two annotators: Cohen's kappa (scikit-learn); three or more: Fleiss' kappa (statsmodels).
    Kappa is undefined (None) with one annotator, no shared template, or when chance agreement is total.
    """
    annotators = sorted(labels)
    if len(annotators) < 2:
        return None, None, 0
    common = sorted(set.intersection(*(set(labels[a]) for a in annotators)))
    if not common:
        return None, "cohen" if len(annotators) == 2 else "fleiss", 0
    if len(annotators) == 2:
        from sklearn.metrics import cohen_kappa_score

        first, second = ([labels[a][t] for t in common] for a in annotators)
        return _finite(cohen_kappa_score(first, second, labels=[0, 1])), "cohen", len(common)
    import numpy as np
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    matrix = np.array([[labels[a][t] for a in annotators] for t in common])
    table, _ = aggregate_raters(matrix, n_cat=2)
    return _finite(fleiss_kappa(table, method="fleiss")), "fleiss", len(common)


def _majority(values: Mapping[str, Any], senior: str) -> tuple[Any, str] | None:
    """The most frequent value, 'majority'; on a tie the senior's value, 'senior'; else None."""
    counts = Counter(values.values()).most_common()
    if not counts:
        return None
    if len(counts) == 1 or counts[0][1] > counts[1][1]:
        return counts[0][0], "unanimous" if len(counts) == 1 else "majority"
    tied = {value for value, n in counts if n == counts[0][1]}
    if senior in values and values[senior] in tied:
        return values[senior], "senior"
    return None


def resolve_reviews(annotations: Mapping[str, list[Annotation]], senior: str,
                    original_labels: Mapping[str, int] | None = None) -> ReviewResult:
    """Majority per template (senior breaks ties) and kappa; records in the anomaly_patch.json format.

    `original_labels` (template → 0/1) fills each record's `label` (the label before review) when known.
    """
    original_labels = original_labels or {}
    by_template: dict[tuple[str | None, str], dict[str, Annotation]] = {}
    for annotator in sorted(annotations):
        for ann in annotations[annotator]:
            by_template.setdefault((ann.system, ann.template), {})[annotator] = ann
    records, unresolved = [], []
    for (system, template), votes in by_template.items():
        named = {"system": system} if system else {}
        decided = _majority({a: v.label for a, v in votes.items()}, senior)
        tally = {name: sum(v.label == i for v in votes.values()) for i, name in enumerate(LABELS)}
        if decided is None:
            unresolved.append({"template": template, **named, "votes": tally, "annotators": sorted(votes),
                               "reason": f"tie and the senior reviewer '{senior}' did not label it"})
            continue
        label, how = decided
        categories = {a: v.category for a, v in votes.items() if v.label == label and v.category}
        category = _majority(categories, senior) if categories else None
        record: dict[str, Any] = {"instruction": INSTRUCTION, "input": template, **named}
        if not system and template in original_labels:
            record["label"] = label_name(int(original_labels[template]))
        record.update(rectified=label_name(label), category=category[0] if category else None,
                      votes=tally, resolved_by=how, annotators=sorted(votes),
                      notes=[f"{a}: {v.note}" for a, v in sorted(votes.items()) if v.note],
                      # where each vote came from: the review file and its line (lineage, issue 20)
                      sources=[{"annotator": a, "file": v.file, "line": v.line} for a, v in sorted(votes.items())])
        records.append(record)
    kappa, method, used = agreement({a: {f"{x.system or ''}\t{x.template}": x.label for x in anns}
                                     for a, anns in annotations.items()})
    notes = []
    if senior not in annotations:
        notes.append(f"senior reviewer '{senior}' has no review file: ties stay unresolved")
    return ReviewResult(sorted(annotations), records, unresolved, kappa, method, used, senior, notes)


def review_folder(review_dir: Path, senior: str,
                  original_labels: Mapping[str, int] | None = None) -> ReviewResult | None:
    """Resolve a review folder; None when it holds no review CSV."""
    annotations = load_reviews(review_dir)
    return resolve_reviews(annotations, senior, original_labels) if annotations else None
