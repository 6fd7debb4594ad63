"""The served path, measured: what `rationanomaly detect` answers on labelled raw logs.

The candidate answers through the same classifier interface as the live endpoint (tasks.detection.verdicts,
`InProcessClassifier`), so the run goes through detect's own code: formats (the alert tag stripped), line
framing, multi-line records, drain3 with the project's masks, the prompt, the verdict cache. Labels never
come from the detector: `read_labelled_log` reads each line's first field (`-` = normal, anything else an
alert), which the detector drops before mining, and a test proves it never reaches drain3 or the model.

Sets built from one detect run per log (tasks.evaluation.testdata.EvalSet; each line judged by the template
detect mined for it, so baselines answer the same mined templates):
- served_bgl2k_lines: every BGL_2k line, labelled by its alert tag;
- served_bgl2k_windows: consecutive windows of `window_lines` lines, abnormal when any line is;
- served_bgl2k_lines_corrected: the lines whose message matches an expert-corrected LogPrompt BGL template,
  labelled by that template's corrected label (the raw tags carry the labelling errors the paper corrected).
  A template matches when its text, with each `<*>` standing for any run of characters and whitespace
  runs for any whitespace, equals the whole message; among several, the one with most literal characters;
- served_thunderbird_lines / served_thunderbird_templates: Thunderbird_2k, a system never trained on with no
  alert line, scored by the share of lines (and of mined templates) flagged abnormal: false alarms. A mined
  template that matches an expert-corrected template (`expert_labels`: the correct stage's rule) takes the
  experts' label; those the experts call abnormal are anomalies, not false alarms, and are left out of both
  sets (issue 18 item 7: `data_thread() got not answer from any <*> <*> datasource`, corrected to abnormal on
  Spirit, is 819 of Thunderbird_2k's 2,000 lines). The report counts them and says why.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.errors import InputError
from tasks.common.prompt import ABNORMAL, LABELS, NORMAL, scored_verdict
from tasks.common.retrieval import Neighbour
from tasks.common.settings import DetectSettings
from tasks.correct import Correction, match_corrections
from tasks.detection.detector import Detector
from tasks.detection.formats import FORMATS
from tasks.detection.framing import LineFramer
from tasks.detection.records import record_content
from tasks.detection.verdicts import TemplateVerdict, apply_verdict_rules, shows_rationale
from tasks.evaluation.rationales import grounded_rationale
from tasks.evaluation.testdata import EvalSet, Key

NORMAL_TAG = "-"  # LogHub's first field of a normal line


@dataclass(frozen=True)
class LabelledLog:
    """A raw log file with each physical line's 0/1 label read from its first field (line i = index i-1)."""

    name: str
    path: Path
    fmt: str
    lines: tuple[str, ...]
    labels: tuple[int, ...]


def read_labelled_log(name: str, path: Path, fmt: str, max_lines: int | None = None) -> LabelledLog:
    """The lines of a LogHub-labelled file (framed as detect frames them; the first `max_lines` when given);
    InputError when missing or when a line has no first field to read a label from."""
    if not path.is_file():
        raise InputError(path, "labelled log not found", hint="run `dvc repro fetch`")
    framer = LineFramer(1 << 20)
    data = path.read_bytes()
    raw = [head + (tail or b"") for head, tail in [*framer.feed(data), *framer.finish()]][:max_lines]
    lines, labels = [], []
    for number, line in enumerate(raw, start=1):
        text = line.decode("utf-8", errors="replace")
        fields = text.split(None, 1)
        if not fields:
            raise InputError(path, "empty line: no first field to read the label from", line=number)
        lines.append(text)
        labels.append(0 if fields[0] == NORMAL_TAG else 1)
    if not lines:
        raise InputError(path, "no lines")
    return LabelledLog(name, path, fmt, tuple(lines), tuple(labels))


class InProcessClassifier:
    """The candidate behind the detector's classifier interface: `engine` (tasks.evaluation.inference) answers as
    the endpoint does: a verdict score against `threshold` for every template, and a written rationale for the
    ones `rationales` asks for (abnormal | all | none); `neighbours(items)` gives the labelled templates shown, and
    `found(items)` the same neighbours with their system, which the verdict rules read (tasks.detection.verdicts.
    apply_verdict_rules; None: off). `threshold` None: the version has none, so the verdict is the answer word of
    a rationale for every template.

    Every verdict it gives is kept in `answers`, so the evaluation scores exactly what detect was told.
    """

    def __init__(self, engine: Any, adapter_dir: Path | None, version: str, *, threshold: float | None = 0.5,
                 neighbours: Callable[[Sequence[Key]], Any] = lambda items: None,
                 rationales: str = "abnormal",
                 found: Callable[[Sequence[Key]], Sequence[Sequence[Neighbour]] | None] = lambda items: None) -> None:
        self.engine, self.adapter_dir, self.version = engine, adapter_dir, version
        self.threshold, self.neighbours, self.rationales = threshold, neighbours, rationales
        # per item: the neighbours its prompt showed, with system and label (None: no index, the rules are off)
        self.found = found
        self.answers: dict[Key, TemplateVerdict] = {}
        self.seconds = 0.0

    def classify(self, items: Sequence[tuple[str, str]], *,
                 on_result: Callable[[TemplateVerdict], None] | None = None) -> list[TemplateVerdict]:
        """Verdicts for (dataset, template) items in input order, from batched engine calls."""
        started = time.perf_counter()
        items = list(items)
        shown = self.neighbours(items)
        scored = self.engine.score([t for _, t in items], [d for d, _ in items], self.adapter_dir, shown)
        threshold = self.threshold
        flagged = [threshold is not None and scored_verdict(s, threshold) == ABNORMAL for s in scored.scores]
        # the endpoint client's rules: a labelled template takes its label, an alert without evidence is none
        found = self.found(items) if threshold is not None else None
        ruled = [apply_verdict_rules(template, dataset, None if found is None else found[i],
                                     ABNORMAL if flag else NORMAL)
                 for i, (flag, (dataset, template)) in enumerate(zip(flagged, items, strict=True))]
        flagged = [r.verdict == ABNORMAL for r in ruled]
        explain = [i for i, abnormal in enumerate(flagged)
                   if shows_rationale(self.rationales, ABNORMAL if abnormal else NORMAL, threshold is not None)]
        written = {}
        if explain:
            run = self.engine.classify([items[i][1] for i in explain], [items[i][0] for i in explain],
                                       adapter_dir=self.adapter_dir,
                                       neighbours=[shown[i] for i in explain] if shown is not None else None,
                                       # written for the scored verdict (issue 19), as the endpoint's client does
                                       verdicts=None if threshold is None else
                                       [ABNORMAL if flagged[i] else NORMAL for i in explain])
            written = dict(zip(explain, run.predictions, strict=True))
        if threshold is None:  # a version without a threshold is served by the word its rationale ends in
            flagged = [written[i].verdict == ABNORMAL for i in range(len(items))]
        self.seconds += time.perf_counter() - started
        each = (time.perf_counter() - started) / max(1, len(items))
        out = []
        for i, ((dataset, template), score) in enumerate(zip(items, scored.scores, strict=True)):
            p = written.get(i)
            valid = p.valid if threshold is None and p else score is not None
            verdict = ABNORMAL if flagged[i] else NORMAL
            # the endpoint client's guard (issue 19): a rationale failing a check is replaced, marked 'evidence'
            guarded = grounded_rationale(p.rationale, template, dataset, shown[i] if shown is not None else [],
                                         verdict) if p else None
            out.append(TemplateVerdict(template, dataset, verdict, valid, guarded.text if guarded else "",
                                       p.completion if p else "", self.version, each, score,
                                       p.verdict if p else None,
                                       rationale_source=guarded.source if guarded else None,
                                       no_evidence_rule=ruled[i].no_evidence,
                                       labelled_template=ruled[i].labelled))
        for verdict in out:
            self.answers[(verdict.dataset, verdict.template)] = verdict
            if on_result is not None:
                on_result(verdict)
        return out

    def model_version(self) -> str:
        """The version label the verdicts carry."""
        return self.version

    def close(self) -> None:
        """Nothing to free: the engine belongs to the caller."""


@dataclass
class DetectedLog:
    """What detect made of a labelled log: the (dataset, template) each line was judged by, and its summary."""

    log: LabelledLog
    key_of_line: dict[int, Key]
    summary: dict[str, Any]
    templates: list[Key] = field(default_factory=list)  # every mined template, in first-use order


def detect_log(log: LabelledLog, settings: DetectSettings, classifier: Any) -> DetectedLog:
    """Run the detector over `log` with a private cache and no saved drain state; read its JSON-lines output.

    Each `line` record (a line, or a multi-line event's first to last line) maps its lines to the template
    text the detector judged it by at that moment (a template's text can widen later in the run).
    """
    with tempfile.TemporaryDirectory(prefix="served-eval-") as folder:
        private = settings.model_copy(update={"cache_file": str(Path(folder) / "verdicts.sqlite"), "drain_state": ""})
        out = io.StringIO()
        source = io.BytesIO(("\n".join(log.lines) + "\n").encode("utf-8"))
        with Detector(private, classifier, progress=False) as detector:
            summary = detector.run(source, out, log.fmt)
    dataset = FORMATS[log.fmt][1]
    text_of: dict[int, str] = {}
    key_of_line: dict[int, Key] = {}
    templates: dict[Key, None] = {}
    for row in map(json.loads, out.getvalue().splitlines()):
        if row["kind"] == "template":
            text_of[row["template_id"]] = row["template"]
        elif row["kind"] == "line":
            key = (dataset, text_of[row["template_id"]])
            templates[key] = None
            for number in range(row["line"], row.get("last_line", row["line"]) + 1):
                key_of_line[number] = key
    return DetectedLog(log, key_of_line, summary, list(templates))


def template_pattern(template: str) -> re.Pattern[str]:
    """A LogPrompt template as a whole-message pattern: `<*>` any run of characters, whitespace any whitespace.

    >>> bool(template_pattern("ciod: failed to read message prefix on <*>").match(
    ...     "ciod: failed to read message prefix on control stream (CioStream socket to 172.16.96.116:33569"))
    True
    """
    parts = [re.escape(piece) for piece in re.split(r"<\*>", " ".join(template.split()))]
    return re.compile(r"\s*" + ".*?".join(p.replace(r"\ ", r"\s+") for p in parts) + r"\s*", re.DOTALL)


def match_messages(messages: Sequence[str], templates: Sequence[str]) -> list[int | None]:
    """For each message, the index of the template that matches it whole with most literal characters (None if
    none does); identical messages are matched once. A template is tried only when the message holds its
    longest literal word (a cheap filter before the regular expression)."""
    patterns = []
    for index, template in enumerate(templates):
        words = [w for w in re.split(r"<\*>|\s+", template) if w]
        patterns.append((index, template_pattern(template), len(template.replace("<*>", "")),
                         max(words, key=len) if words else ""))
    patterns.sort(key=lambda p: -p[2])  # most literal characters first: the first full match is the best
    found: dict[str, int | None] = {}
    out = []
    for message in messages:
        if message not in found:
            found[message] = next((index for index, pattern, _, word in patterns
                                   if word in message and pattern.fullmatch(message)), None)
        out.append(found[message])
    return out


_PLACEHOLDER_RUN = re.compile(r"<\*>(?:\s*<\*>)+")


def merge_placeholder_runs(template: str) -> str:
    """Adjacent `<*>` (touching or apart by whitespace only) as one `<*>`: drain3 masks one whitespace token per
    `<*>`, while the LogPrompt lists often write one variable as `<*> <*>` (Khan et al., ICSE 2022, template
    rule CV "consecutive variables").

    >>> merge_placeholder_runs("data_thread() got not answer from any <*> <*> datasource")
    'data_thread() got not answer from any <*> datasource'
    """
    return _PLACEHOLDER_RUN.sub("<*>", template)


def expert_labels(templates: Sequence[str], corrected: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """Which of `templates` (mined by detect) match an expert-corrected template, by position: the experts' `label`
    (0/1), the corrected template, its `dataset` and how it `matched` (exact | normalized).

    The matching is the correct stage's (tasks.correct.match_corrections: the same text after strip(), else the
    one template with the same normalised form), applied after `merge_placeholder_runs` on both sides.
    `corrected` holds the correct stage's output (dataset, template, label, correction); the experts' templates
    are its rows with `correction` other than "none". A template that corrections of both labels match keeps
    neither (`label` None, `conflict` lists them).
    """
    experts = corrected[corrected["correction"] != "none"].reset_index(drop=True)
    corrections = [Correction(i, None, merge_placeholder_runs(str(t)), int(label), None, "patch")
                   for i, (t, label) in enumerate(zip(experts["template"], experts["label"], strict=True))]
    found: dict[int, dict[str, Any]] = {}
    merged = [merge_placeholder_runs(t) for t in templates]
    for i, (rows, how, _) in enumerate(match_corrections(merged, corrections)):
        for row in rows:
            match = {"label": int(experts.at[i, "label"]), "template": str(experts.at[i, "template"]),
                     "dataset": str(experts.at[i, "dataset"]), "matched": how}
            earlier = found.setdefault(row, match)
            if earlier is not match and earlier["label"] is not None and earlier["label"] != match["label"]:
                found[row] = {**earlier, "label": None, "conflict": [earlier, match]}
    return found


def served_sets(bgl: DetectedLog, thunderbird: DetectedLog, corrected: pd.DataFrame, train_templates: set[str],
                window_lines: int) -> tuple[list[EvalSet], dict[str, Any]]:
    """The served-path sets (module docstring) and how they were built: counts, matched lines, seen templates.

    `corrected` holds the expert-corrected templates (dataset, template, label); `train_templates` the training
    templates (stripped), to count the matched lines whose template the model was trained on.
    """
    sets: list[EvalSet] = []
    numbers = [n for n in range(1, len(bgl.log.lines) + 1) if n in bgl.key_of_line]
    labels = np.asarray([bgl.log.labels[n - 1] for n in numbers], dtype=int)
    sets.append(EvalSet("served_bgl2k_lines", "served", tuple(map(str, numbers)), labels,
                        tuple((bgl.key_of_line[n],) for n in numbers), note="labels: the lines' own alert tags"))
    windows = [range(start, min(start + window_lines, len(bgl.log.lines) + 1))
               for start in range(1, len(bgl.log.lines) + 1, window_lines)]
    sets.append(EvalSet("served_bgl2k_windows", "served", tuple(f"{w.start}-{w.stop - 1}" for w in windows),
                        np.asarray([int(any(bgl.log.labels[n - 1] for n in w)) for w in windows], dtype=int),
                        tuple(tuple(dict.fromkeys(bgl.key_of_line[n] for n in w if n in bgl.key_of_line))
                              for w in windows), note=f"{window_lines}-line windows, abnormal if any line is"))

    bgl_templates = corrected[corrected["dataset"] == "bgl"].reset_index(drop=True)
    header = FORMATS["bgl"][0]
    messages = [record_content(bgl.log.lines[n - 1].strip(), "bgl", header) or "" for n in numbers]
    matched = match_messages(messages, bgl_templates["template"].tolist())
    keep = [(n, m) for n, m in zip(numbers, matched, strict=True) if m is not None]
    sets.append(EvalSet(
        "served_bgl2k_lines_corrected", "served", tuple(str(n) for n, _ in keep),
        np.asarray([int(bgl_templates.at[m, "label"]) for _, m in keep], dtype=int),
        tuple((bgl.key_of_line[n],) for n, _ in keep),
        note="lines matched to an expert-corrected LogPrompt template, labelled by it"))

    experts = expert_labels([t for _, t in thunderbird.templates], corrected)
    abnormal = {thunderbird.templates[i] for i, m in experts.items() if m["label"] == 1}
    rest = [k for k in thunderbird.templates if k not in abnormal]
    thunder_numbers = [n for n in range(1, len(thunderbird.log.lines) + 1)
                       if n in thunderbird.key_of_line and thunderbird.key_of_line[n] not in abnormal]
    left_out = "; templates the experts call abnormal left out" if abnormal else ""
    sets.append(EvalSet("served_thunderbird_lines", "served", tuple(map(str, thunder_numbers)),
                        np.asarray([thunderbird.log.labels[n - 1] for n in thunder_numbers], dtype=int),
                        tuple((thunderbird.key_of_line[n],) for n in thunder_numbers), positives_expected=False,
                        note=f"a system never trained on, no alert line: false alarms per line{left_out}"))
    sets.append(EvalSet("served_thunderbird_templates", "served", tuple(t for _, t in rest),
                        np.zeros(len(rest), dtype=int), tuple((k,) for k in rest),
                        positives_expected=False, note=f"false alarms per mined template{left_out}"))
    lines_of = Counter(thunderbird.key_of_line.values())
    expert_rows = [{"template": thunderbird.templates[i][1], "lines": lines_of[thunderbird.templates[i]],
                    "label": None if m["label"] is None else LABELS[m["label"]], "expert_template": m["template"],
                    "expert_dataset": m["dataset"], "matched": m["matched"]} for i, m in sorted(experts.items())]

    matched_templates = {bgl_templates.at[m, "template"] for _, m in keep}
    info = {
        "bgl2k": {"lines": len(bgl.log.lines), "alert_lines": int(sum(bgl.log.labels)),
                  "mined_templates": len(bgl.templates), "matched_lines": len(keep),
                  "matched_templates": len(matched_templates),
                  "matched_lines_of_training_templates": sum(
                      bgl_templates.at[m, "template"].strip() in train_templates for _, m in keep),
                  "matched_lines_abnormal": int(sum(bgl_templates.at[m, "label"] for _, m in keep)),
                  "detect": {k: bgl.summary.get(k) for k in ("templates", "requested", "seconds")}},
        "thunderbird": {"lines": len(thunderbird.log.lines), "alert_lines": int(sum(thunderbird.log.labels)),
                        "mined_templates": len(thunderbird.templates),
                        "largest_template_lines": max(lines_of.values(), default=0),
                        "detect": {k: thunderbird.summary.get(k) for k in ("templates", "requested", "seconds")},
                        # mined templates that match an expert-corrected one, with the experts' label
                        "expert_labelled": expert_rows,
                        "expert_abnormal_templates": len(abnormal),
                        "expert_abnormal_lines": sum(lines_of[k] for k in abnormal),
                        "false_alarm_templates": len(rest), "false_alarm_lines": len(thunder_numbers)},
    }
    return sets, info
