"""correct stage: the experts' label corrections applied to the BGL and Spirit templates, every change accounted for.

Corrections come in the paper's `anomaly_patch.json` format (`input` = template, `label` = the
original label, `rectified` = the expert's label). A correction matches a template exactly after
`strip()`; only a correction with no exact match is tried on a normalised form (lowercase, no
punctuation or whitespace, every `<*>` kept), and only when that form names exactly one template:
one correction never changes two templates. Resolved multi-annotator reviews (tasks.data.review) are
applied after the patch, as later expert decisions. Templates that are near-twins of a corrected
template (same text once placeholders, punctuation, whitespace and case are ignored) but carry a
different label go to a review queue for an expert: listed, never changed.

A review record whose `system` names a system the template lists do not hold (e.g. `thunderbird`; compared
case-insensitively with the `template_files` names) labels a template of a new system (issue 20): it is
resolved like any other (majority, kappa) and kept in the resolution file, marked `new_system`, but applied
to no template list: it never reaches the split (so never a BGL/Spirit test item, nor SFT data); the index
stage adds it to the retrieval index, its review files and annotators with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common.config import repo_root
from tasks.common.errors import InputError
from tasks.common.files import atomic_path, read_csv_text, sha256_file
from tasks.common.prompt import LABELS
from tasks.common.settings import CorrectSettings, load_settings
from tasks.common.tracking import stage_run
from tasks.data.review import ReviewResult, parse_label, review_folder

PLACEHOLDER = "<*>"
KINDS = ("none", "exact", "normalized", "review")
_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Lowercase, punctuation and whitespace dropped, every `<*>` kept (the fallback match key)."""
    return PLACEHOLDER.join(_NON_WORD.sub("", part) for part in text.lower().split(PLACEHOLDER))


def loose_key(text: str) -> str:
    """Like `normalize` but placeholders dropped too: near-twins share it (the review-queue key)."""
    return _NON_WORD.sub("", text.lower().replace(PLACEHOLDER, ""))


def direction(before: int, after: int) -> str:
    """'normal_to_abnormal', 'abnormal_to_normal' or 'unchanged' for a label change (0/1 labels)."""
    return "unchanged" if before == after else f"{LABELS[before]}_to_{LABELS[after]}"


@dataclass(frozen=True)
class Correction:
    """One expert decision: this template's label is `rectified` (0/1)."""

    index: int  # position in its file
    line: int | None  # line where the record starts, when known
    template: str
    rectified: int
    stated: int | None  # the original label the record claims, if given
    source: str  # "patch" | "review"


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(path, "file not found", hint="run the fetch stage first") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start})", line=data[: exc.start].count(b"\n") + 1) from exc


def read_json_records(path: Path) -> list[tuple[Any, int]]:
    """The elements of a JSON array, each with the line it starts on (for errors that point at it)."""
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from exc
    if not isinstance(data, list):
        raise InputError(path, f"expected a JSON array of corrections, found {type(data).__name__}", line=1)
    decoder, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
    for _ in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return list(zip(data, lines, strict=True))


def parse_corrections(records: list[tuple[Any, int | None]], file: str | Path, source: str) -> list[Correction]:
    """Check every record (object, non-empty `input`, known labels) and reject conflicting duplicates."""
    corrections: list[Correction] = []
    first: dict[str, Correction] = {}
    for index, (record, line) in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(file, f"record {index} is not an object", line=line, field=f"[{index}]")
        template = record.get("input")
        if not isinstance(template, str) or not template.strip():
            raise InputError(file, f"record {index} has no template", line=line, field=f"[{index}].input")
        labels: dict[str, int | None] = {}
        for key in ("rectified", "label"):
            value = record.get(key)
            if value is None and key == "label":
                labels[key] = None
                continue
            try:
                labels[key] = parse_label(str(value))
            except ValueError:
                raise InputError(file, f"record {index}: unknown label value {value!r}", line=line,
                                 field=f"[{index}].{key}", hint="expected 'normal' or 'abnormal'") from None
        correction = Correction(index, line, template, int(labels["rectified"]), labels["label"], source)
        earlier = first.setdefault(template.strip(), correction)
        if earlier is not correction and earlier.rectified != correction.rectified:
            raise InputError(file, f"conflicting corrections: records {earlier.index} (line {earlier.line}) and "
                             f"{index} (line {line}) give template {template.strip()!r} different labels "
                             f"({LABELS[earlier.rectified]} vs {LABELS[correction.rectified]})",
                             line=line, field=f"[{index}].rectified", hint="keep one of the two")
        corrections.append(correction)
    return corrections


def load_patch(path: Path) -> list[Correction]:
    """The expert corrections of an anomaly_patch.json file; InputError names the record and field."""
    return parse_corrections(read_json_records(path), path, "patch")


def load_templates(path: Path, dataset: str) -> pd.DataFrame:
    """A template list (`log,label`; read with keep_default_na=False so 'NA' stays text)."""
    text = _decode(path)
    frame = read_csv_text(path, text, ("log", "label"), "empty template list: no templates to correct",
                          hint="check the fetch stage output")
    labels = []
    for row, value in enumerate(frame["label"]):
        try:
            labels.append(parse_label(value))
        except ValueError:
            raise InputError(path, f"unknown label {value!r}", line=row + 2, field="label",
                             hint="expected 0/1 or normal/abnormal") from None
    for row, value in enumerate(frame["log"]):
        if not value.strip():
            raise InputError(path, "empty template", line=row + 2, field="log")
    return pd.DataFrame({"dataset": dataset, "template": frame["log"], "label_original": labels})


@dataclass
class CorrectionResult:
    """The corrected templates, the correction report, the review queue and the review resolution."""
    templates: pd.DataFrame  # dataset, template, label_original, label, correction
    report: dict[str, Any]
    queue: pd.DataFrame
    resolution: list[dict[str, Any]] = field(default_factory=list)


class _Matcher:
    """Applies corrections to a template frame, remembering who changed what (to catch conflicts)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.by_exact: dict[str, list[int]] = {}
        self.by_norm: dict[str, list[int]] = {}
        for row, template in enumerate(frame["template"]):
            self.by_exact.setdefault(template.strip(), []).append(row)
            self.by_norm.setdefault(normalize(template), []).append(row)
        self.owner: dict[int, Correction] = {}

    def find(self, correction: Correction) -> tuple[list[int], str, str | None]:
        """Rows a correction applies to, how it matched, and why not when it did not."""
        exact = self.by_exact.get(correction.template.strip(), [])
        if exact:
            return exact, "exact", None
        rows = self.by_norm.get(normalize(correction.template), [])
        if len(rows) == 1:
            return rows, "normalized", None
        if rows:
            return [], "none", f"normalised form matches {len(rows)} templates; one correction never changes two"
        return [], "none", "no template matches, exactly or normalised"

    def apply(self, corrections: list[Correction], file: str | Path, override: bool) -> dict[str, Any]:
        counts = {"exact": 0, "normalized": 0}
        unmatched, normalized, overrides, mismatched = [], [], [], []
        for correction in corrections:
            rows, how, why = self.find(correction)
            if not rows:
                unmatched.append({"index": correction.index, "template": correction.template, "reason": why})
                continue
            counts[how] += 1
            for row in rows:
                earlier = self.owner.get(row)
                if earlier is not None and earlier.rectified != correction.rectified:
                    if not override:
                        raise InputError(file, f"conflicting corrections: records {earlier.index} and "
                                         f"{correction.index} give template "
                                         f"{self.frame.at[row, 'template']!r} different labels",
                                         line=correction.line, field=f"[{correction.index}].rectified")
                    overrides.append({"template": self.frame.at[row, "template"], "patch": LABELS[earlier.rectified],
                                      correction.source: LABELS[correction.rectified]})
                self.owner[row] = correction
                original = int(self.frame.at[row, "label_original"])
                if correction.stated is not None and correction.stated != original:
                    mismatched.append({"index": correction.index, "template": self.frame.at[row, "template"],
                                       "stated": LABELS[correction.stated], "found": LABELS[original]})
                self.frame.at[row, "label"] = correction.rectified
                self.frame.at[row, "correction"] = "review" if correction.source == "review" else how
                if how == "normalized":
                    normalized.append({"index": correction.index, "correction": correction.template,
                                       "template": self.frame.at[row, "template"],
                                       "dataset": self.frame.at[row, "dataset"]})
        return {"corrections": len(corrections), "matched_exact": counts["exact"],
                "matched_normalized": counts["normalized"], "unmatched": unmatched,
                "normalized_matches": normalized, "overrides": overrides, "stated_label_mismatch": mismatched}


def match_corrections(templates: Sequence[str], corrections: Sequence[Correction],
                      ) -> list[tuple[list[int], str, str | None]]:
    """For each correction, the positions in `templates` it applies to, how it matched (exact | normalized | none)
    and why not: this stage's one matching rule, for readers outside the stage (the evaluation gives Thunderbird_2k
    templates that match an expert-corrected template the experts' label, tasks/evaluation/served.py)."""
    matcher = _Matcher(pd.DataFrame({"template": list(templates)}))
    return [matcher.find(correction) for correction in corrections]


def build_review_queue(frame: pd.DataFrame) -> pd.DataFrame:
    """Near-twins (same `loose_key`) of each corrected template that carry a different label."""
    keys = frame["template"].map(loose_key)
    rows = []
    corrected = frame.index[frame["correction"] != "none"]
    groups = frame.groupby(keys).groups
    for twin in corrected:
        key = keys[twin]
        if not key:
            continue
        for row in groups.get(key, []):
            if row != twin and frame.at[row, "label"] != frame.at[twin, "label"]:
                rows.append({
                    "dataset": frame.at[row, "dataset"], "template": frame.at[row, "template"],
                    "label": LABELS[int(frame.at[row, "label"])], "correction": frame.at[row, "correction"],
                    "twin_dataset": frame.at[twin, "dataset"], "twin_template": frame.at[twin, "template"],
                    "twin_label": LABELS[int(frame.at[twin, "label"])], "twin_correction": frame.at[twin, "correction"],
                })
    columns = ["dataset", "template", "label", "correction", "twin_dataset", "twin_template", "twin_label",
               "twin_correction"]
    queue = pd.DataFrame(rows, columns=columns)
    return queue.drop_duplicates().sort_values(["dataset", "template", "twin_template"]).reset_index(drop=True)


def _directions(frame: pd.DataFrame) -> dict[str, int]:
    """How corrected templates moved: normal→abnormal, abnormal→normal, or confirmed (unchanged)."""
    moved = {"normal_to_abnormal": 0, "abnormal_to_normal": 0, "unchanged": 0}
    changed = frame[frame["correction"] != "none"]
    for before, after in zip(changed["label_original"], changed["label"], strict=True):
        moved[direction(int(before), int(after))] += 1
    return moved


def _counts(frame: pd.DataFrame, column: str) -> dict[str, dict[str, Any]]:
    out = {}
    for dataset, part in frame.groupby("dataset", sort=False):
        abnormal, total = int(part[column].sum()), len(part)
        out[str(dataset)] = {"abnormal": abnormal, "total": total, "rate": round(abnormal / total, 4)}
    return out


def correct_templates(patch_file: Path, template_files: dict[str, Path], review_dir: Path | None = None,
                      senior: str = "senior") -> CorrectionResult:
    """Apply the patch, then any resolved reviews; report every match, change and near-twin."""
    corrections = load_patch(patch_file)
    frame = pd.concat([load_templates(path, name) for name, path in template_files.items()], ignore_index=True)
    frame["label"] = frame["label_original"]
    frame["correction"] = "none"
    matcher = _Matcher(frame)
    patch_stats = matcher.apply(corrections, patch_file, override=False)

    review: ReviewResult | None = None
    review_stats: dict[str, Any] | None = None
    if review_dir is not None:
        originals = {t.strip(): int(x) for t, x in zip(frame["template"], frame["label_original"], strict=True)}
        review = review_folder(review_dir, senior, originals)
    new_systems: dict[str, dict[str, int]] = {}
    if review is not None:
        listed = {name.strip().lower() for name in template_files}
        for record in review.records:
            if record.get("system") and record["system"] not in listed:
                record["new_system"] = True  # index-only knowledge: never a template-list correction
                counts = new_systems.setdefault(record["system"], {"templates": 0, "abnormal": 0})
                counts["templates"] += 1
                counts["abnormal"] += int(parse_label(record["rectified"]))
        records = [(record, None) for record in review.records if not record.get("new_system")]
        review_stats = matcher.apply(parse_corrections(records, review_dir, "review"), review_dir, override=True)
        review_stats["new_systems"] = dict(sorted(new_systems.items()))

    queue = build_review_queue(frame)
    by_dataset = {}
    for dataset, part in frame.groupby("dataset", sort=False):
        kinds = part["correction"].value_counts()
        by_dataset[str(dataset)] = {"templates": len(part), "corrected": int((part["correction"] != "none").sum()),
                                    **{k: int(kinds.get(k, 0)) for k in KINDS[1:]}, **_directions(part)}
    report: dict[str, Any] = {
        "patch_file": str(patch_file.name), "patch_sha256": sha256_file(patch_file),
        **patch_stats,
        "by_direction": _directions(frame), "by_dataset": by_dataset,
        "abnormal_before": _counts(frame, "label_original"), "abnormal_after": _counts(frame, "label"),
        "review_queue_size": len(queue),
        "review": None if review is None else {**review.summary(), **(review_stats or {})},
        "kappa": None if review is None else review.kappa,
    }
    frame["label_original"] = frame["label_original"].astype("int64")
    frame["label"] = frame["label"].astype("int64")
    return CorrectionResult(frame, report, queue, [] if review is None else review.records)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]


def report_markdown(report: dict[str, Any], queue: pd.DataFrame) -> str:
    """The correction report for people: summary, per dataset, odd matches, review queue."""
    lines = ["# Label correction report", "",
             f"Patch `{report['patch_file']}` (sha256 `{report['patch_sha256'][:16]}…`): "
             f"{report['corrections']} corrections, {report['matched_exact']} matched exactly, "
             f"{report['matched_normalized']} after normalisation, {len(report['unmatched'])} unmatched.", "",
             "## Per dataset", ""]
    rows = []
    for name, stats in report["by_dataset"].items():
        before, after = report["abnormal_before"][name], report["abnormal_after"][name]
        rows.append({"dataset": name, "templates": stats["templates"], "corrected": stats["corrected"],
                     "exact": stats["exact"], "normalized": stats["normalized"], "review": stats["review"],
                     "normal→abnormal": stats["normal_to_abnormal"], "abnormal→normal": stats["abnormal_to_normal"],
                     "abnormal before": f"{before['abnormal']} ({before['rate']:.1%})",
                     "abnormal after": f"{after['abnormal']} / {after['total']} ({after['rate']:.1%})"})
    lines += _table(rows, list(rows[0]))
    d = report["by_direction"]
    lines += ["", f"Directions: {d['normal_to_abnormal']} normal→abnormal, {d['abnormal_to_normal']} "
              f"abnormal→normal, {d['unchanged']} confirmed unchanged."]
    if report["normalized_matches"]:
        lines += ["", "## Matched only after normalisation", ""]
        lines += _table(report["normalized_matches"], ["index", "dataset", "correction", "template"])
    if report["unmatched"]:
        lines += ["", "## Unmatched corrections", "", *_table(report["unmatched"], ["index", "template", "reason"])]
    if report["stated_label_mismatch"]:
        lines += ["", "## Records whose stated original label differs from the template list", ""]
        lines += _table(report["stated_label_mismatch"], ["index", "template", "stated", "found"])
    review = report.get("review")
    if review:
        kappa = "n/a" if review["kappa"] is None else f"{review['kappa']:.3f}"
        lines += ["", "## Multi-annotator review", "",
                  f"Annotators: {', '.join(review['annotators'])} (senior: {review['senior']}). "
                  f"{review['kappa_method'] or 'kappa'} = {kappa} over {review['kappa_templates']} templates "
                  f"labelled by all. Resolved {review['resolved']}, unresolved {len(review['unresolved'])}."]
        if review["unresolved"]:
            lines += ["", *_table(review["unresolved"], ["template", "votes", "reason"])]
        if review.get("new_systems"):
            shown = ", ".join(f"{name} {c['templates']} ({c['abnormal']} abnormal)"
                              for name, c in review["new_systems"].items())
            lines += ["", f"Templates of systems the template lists do not hold (index only, never split): {shown}."]
    lines += ["", f"## Review queue ({len(queue)})", "",
              "Near-twins of a corrected template (equal once placeholders, punctuation, whitespace and case are "
              "ignored) with a different label. Listed for an expert; never changed automatically.", ""]
    lines += _table(queue.to_dict("records"), ["dataset", "template", "label", "twin_template", "twin_label"])
    return "\n".join(lines) + "\n"


def write_outputs(result: CorrectionResult, paths: dict[str, Path]) -> None:
    """Every output or none: each is written beside its target and renamed in only after all were written."""
    with (atomic_path(paths["out_file"]) as parquet, atomic_path(paths["report_file"]) as report,
          atomic_path(paths["report_md"]) as markdown, atomic_path(paths["review_queue_file"]) as queue,
          atomic_path(paths["resolution_file"]) as resolution):
        result.templates.to_parquet(parquet, index=False)
        report.write_text(json.dumps(result.report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        markdown.write_text(report_markdown(result.report, result.queue), encoding="utf-8")
        result.queue.to_csv(queue, index=False, lineterminator="\n")
        resolution.write_text(json.dumps(result.resolution, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


OUTPUTS = ("out_file", "report_file", "report_md", "review_queue_file", "resolution_file")


def run(settings: CorrectSettings) -> CorrectionResult:
    """The stage (paths relative to the repo root): corrected templates, report, review queue and resolution,
    all written or none. Raises InputError naming the file, line and field of bad input."""
    root = repo_root()
    result = correct_templates(
        root / settings.patch_file, {name: root / path for name, path in settings.template_files.items()},
        root / settings.review_dir if settings.review_dir else None, settings.senior_reviewer,
    )
    write_outputs(result, {key: root / getattr(settings, key) for key in OUTPUTS})
    return result


def main() -> None:
    settings = load_settings().correct
    report = run(settings).report
    after = ", ".join(f"{k} {v['abnormal']}/{v['total']}" for k, v in report["abnormal_after"].items())
    with stage_run("correct"):
        import mlflow

        mlflow.log_params({"patch_sha256": report["patch_sha256"], "senior_reviewer": settings.senior_reviewer})
        metrics = {"matched_exact": report["matched_exact"], "matched_normalized": report["matched_normalized"],
                   "unmatched": len(report["unmatched"]), "review_queue_size": report["review_queue_size"],
                   **{f"abnormal_after_{k}": v["abnormal"] for k, v in report["abnormal_after"].items()}}
        if report["kappa"] is not None:
            metrics["kappa"] = report["kappa"]
        mlflow.log_metrics({**metrics, **report["by_direction"]})
        mlflow.log_artifact(str(repo_root() / settings.report_md))
    print(f"correct: {report['matched_exact']} exact, {report['matched_normalized']} normalised, "
          f"{len(report['unmatched'])} unmatched; abnormal after: {after}; review queue {report['review_queue_size']}")


if __name__ == "__main__":
    main()
