"""distill stage: a CoT rationale for every training template, conditioned on its corrected label.

The teacher (tasks.data.teachers: `lexicon` offline, or any OpenAI-compatible endpoint) writes a
completion per template, shown the neighbours its explain example shows; each is validated with
`tasks.common.prompt.parse_completion` (format, and an answer equal to the label) and the rationale checks of
issue 19 (tasks.evaluation.rationales.check_rationale: concludes the label, names a component the log holds,
quotes only the log or a shown neighbour, cites only a shown neighbour with its label, no false "no failure
word") or rejected and counted per reason (`check_failed:<check>`). Each accepted template becomes two chat
examples built by `tasks.common.prompt.training_messages`, so the SFT data has exactly the format serving expects: the
`explain` task (rationale, then verdict) and the `verdict` task (the verdict alone, read as a score at
serving). Each prompt carries the labelled training templates the index's policy shows (the index stage: k,
similarity floor, same system, contrastive), never itself or a near-duplicate of it; a seeded
`index.bare_fraction` of the prompts carries none.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from rich.progress import Progress

from tasks.common.config import repo_root, resolve_path
from tasks.common.errors import InputError
from tasks.common.files import atomic_path, read_labelled_templates, write_text_atomic
from tasks.common.prompt import EXPLAIN, VERDICT, first_stage_normal, label_name, parse_completion, training_messages
from tasks.common.retrieval import INDEX_FILE, TemplateIndex
from tasks.common.settings import CorrectSettings, DistillSettings, IndexSettings, load_settings
from tasks.common.tracking import stage_run
from tasks.data.teachers import Teacher, expert_notes, keyword_hits, make_teacher
from tasks.evaluation.rationales import CHECKS, check_rationale

REQUIRED_COLUMNS = ("dataset", "template", "label")
# Every rejection reason the report counts (zero when none): format, label, request, and each rationale check.
REJECTIONS = ("format_invalid", "label_disagrees", "request_failed",
              *(f"check_failed:{name}" for name in CHECKS))


def load_train(path: Path) -> pd.DataFrame:
    """The training templates (dataset, template, label 0/1); InputError names the file, row and field."""
    return read_labelled_templates(path, REQUIRED_COLUMNS, missing_hint="run the split stage first",
                                   what="training templates")


Item = tuple[str, int, str]
Neighbours = list[tuple[str, int]]


def _ask(teacher: Teacher) -> Callable[[tuple[Item, Neighbours]], str | Exception]:
    def ask(job: tuple[Item, Neighbours]) -> str | Exception:
        (log, label, dataset), neighbours = job
        try:
            return teacher.completion(log, label, dataset, neighbours)
        except InputError:
            raise
        except Exception as exc:  # a failed request is counted as a rejection, not a crash
            return exc

    return ask


def completions(teacher: Teacher, items: list[Item],
                neighbours: list[Neighbours] | None = None) -> Iterator[str | Exception]:
    """The teacher's answers in input order, in parallel threads when it allows, with a progress bar; each item
    is asked with its `neighbours` (the ones its explain example shows; none when None)."""
    ask = _ask(teacher)
    jobs = list(zip(items, neighbours if neighbours is not None else [[] for _ in items], strict=True))
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"distill ({teacher.name})", total=len(items))
        if teacher.concurrency > 1:
            with ThreadPoolExecutor(max_workers=teacher.concurrency) as pool:
                for answer in pool.map(ask, jobs):
                    progress.advance(bar)
                    yield answer
        else:
            for job in jobs:
                answer = ask(job)
                progress.advance(bar)
                yield answer


def judge(answer: str | Exception, label: int, log: str | None = None, dataset: str = "",
          neighbours: Neighbours = ()) -> tuple[str | None, str | None]:
    """(rationale, None) for an answer that fits the format and the label and, given its `log`, passes the
    rationale checks (tasks.evaluation.rationales.check_rationale, issue 19) against the log, the `neighbours`
    its explain example shows and the label; else (None, rejection reason): `request_failed`, `format_invalid`,
    `label_disagrees` or `check_failed:<first failed check>`."""
    if isinstance(answer, Exception):
        return None, "request_failed"
    parsed = parse_completion(answer)
    if not parsed.valid:
        return None, "format_invalid"
    if parsed.answer != label_name(label):
        return None, "label_disagrees"
    if log is not None:
        failed = check_rationale(parsed.think or "", log, dataset, neighbours, label).failed()
        if failed:
            return None, f"check_failed:{failed[0]}"
    return parsed.think, None


def training_neighbours(index: TemplateIndex | None, templates: list[str], settings: IndexSettings,
                        seed: int, datasets: list[str] | None = None) -> list[list[tuple[str, int]]]:
    """For each training template (of `datasets`, one per template; None: unknown), the neighbours its prompts
    show under the index's policy (tasks.common.retrieval: k, floor, same system, contrastive), other than
    itself and below `near_duplicate_similarity` to it; [] for a seeded `bare_fraction` of them (or no index)."""
    import numpy as np

    if index is None or settings.k == 0:
        return [[] for _ in templates]
    rng = np.random.default_rng(seed)
    found = index.prompt_neighbours(templates, datasets, exclude_same=True,
                                    below=settings.near_duplicate_similarity)
    return [[] if rng.random() < settings.bare_fraction else near for near in found]


def is_hard_negative(template: str, label: int) -> bool:
    """An error-worded log the experts call normal: label 0 and a word of the keyword list (issue 18 item 3: the
    classical models and the LLM lose their precision on these, 22 BGL and 40 Spirit test normals)."""
    return label == 0 and bool(keyword_hits(template))


def distill(train_file: Path, out_file: Path, report_file: Path, teacher: Teacher,
            index: TemplateIndex | None = None, retrieval: IndexSettings | None = None,
            seed: int = 0, hard_negative_repeats: int = 1) -> dict[str, Any]:
    """Write the SFT dataset (an explain and a verdict example per accepted rationale, with neighbours from
    `index` as `retrieval` says) and the distillation report; returns the report.

    A template the verdict rule's first stage decides (tasks.common.prompt.first_stage_normal: no letter word)
    never reaches the model, so it is not distilled (counted as `first_stage`); a hard negative (`is_hard_negative`)
    has its examples written `hard_negative_repeats` times."""
    frame = load_train(train_file)
    every = [(str(t), int(y), str(d)) for t, y, d in zip(frame["template"], frame["label"], frame["dataset"],
                                                          strict=True)]
    items = [item for item in every if not first_stage_normal(item[0])]
    shown: dict[str, list[list[tuple[str, int]]]] = {
        task: (training_neighbours(index, [t for t, _, _ in items], retrieval, seed + offset, [d for _, _, d in items])
               if retrieval is not None else [[] for _ in items])
        for offset, task in enumerate((EXPLAIN, VERDICT))}
    rows, rejected, failures = [], Counter(), []
    per_dataset: dict[str, Counter[str]] = {}
    answers = completions(teacher, items, shown[EXPLAIN])  # the teacher sees what the explain example shows
    for position, ((template, label, dataset), answer) in enumerate(zip(items, answers, strict=True)):
        rationale, reason = judge(answer, label, template, dataset, shown[EXPLAIN][position])
        counts = per_dataset.setdefault(dataset, Counter())
        counts["total"] += 1
        if reason:
            rejected[reason] += 1
            counts["rejected"] += 1
            if isinstance(answer, Exception) and len(failures) < 5:
                failures.append(f"{type(answer).__name__}: {answer}")
            continue
        counts["accepted"] += 1
        repeats = hard_negative_repeats if is_hard_negative(template, label) else 1
        for task in [EXPLAIN, VERDICT] * repeats:
            neighbours = shown[task][position]
            messages = training_messages(template, rationale, label, dataset, neighbours=neighbours, task=task)
            rows.append({"messages": messages, "prompt": messages[:-1], "completion": messages[-1:],
                         "template": template, "dataset": dataset, "label": label, "rationale": rationale,
                         "task": task, "neighbours": [list(n) for n in neighbours]})
    if not rows:
        raise RuntimeError(f"teacher '{teacher.name}' produced no acceptable rationale for {len(items)} templates "
                           f"(rejected: {dict(rejected)}; first errors: {failures})")
    words = [len(row["rationale"].split()) for row in rows if row["task"] == EXPLAIN]
    report = {
        "teacher": teacher.name, "total": len(items), "first_stage": len(every) - len(items),
        "accepted": sum(c["accepted"] for c in per_dataset.values()),
        "hard_negatives": sum(is_hard_negative(t, y) for t, y, _ in items),
        "hard_negative_repeats": hard_negative_repeats,
        "examples": {task: sum(r["task"] == task for r in rows) for task in (EXPLAIN, VERDICT)},
        "examples_with_neighbours": sum(bool(r["neighbours"]) for r in rows), "rejected_total": sum(rejected.values()),
        "rejected": {reason: rejected.get(reason, 0) for reason in REJECTIONS},
        "per_dataset": {name: {k: c.get(k, 0) for k in ("total", "accepted", "rejected")}
                        for name, c in per_dataset.items()},
        "accepted_abnormal": sum(row["label"] for row in rows if row["task"] == EXPLAIN),
        "mean_rationale_words": round(statistics.mean(words), 1), "min_rationale_words": min(words),
        "max_rationale_words": max(words), "request_errors": failures,
    }
    stats = getattr(teacher, "stats", None)
    if callable(stats):
        report.update(stats())
    with atomic_path(out_file) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_text_atomic(report_file, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def run(settings: DistillSettings, retrieval: IndexSettings, seed: int,
        correct: CorrectSettings | None = None) -> dict[str, Any]:
    """The stage (paths relative to the repo root); returns the distillation report. `correct`: where the correct
    stage wrote the corrected templates and the review resolution, the lexicon teacher's expert notes (none when
    None). Raises InputError for bad training data or teacher settings (before any request), RuntimeError when
    no rationale is accepted."""
    root = repo_root()
    notes = (expert_notes(root / correct.out_file, root / correct.resolution_file)
             if correct is not None and settings.teacher == "lexicon" else None)
    teacher = make_teacher(settings, root, notes)  # checks the teacher's settings before any work
    index = TemplateIndex.load(resolve_path(retrieval.out_dir) / INDEX_FILE) if retrieval.k else None
    return distill(root / settings.train_file, root / settings.out_file, root / settings.report_file, teacher,
                   index, retrieval, seed, settings.hard_negative_repeats)


def main() -> None:
    everything = load_settings()
    settings = everything.distill
    report = run(settings, everything.index, everything.split.seed, everything.correct)
    with stage_run("distill", teacher=report["teacher"]):
        import mlflow

        mlflow.log_params({"teacher": report["teacher"], "model": report.get("model", "lexicon")})
        mlflow.log_metrics({"total": report["total"], "accepted": report["accepted"],
                            **{f"rejected_{k.replace(':', '_')}": v for k, v in report["rejected"].items()},
                            "mean_rationale_words": report["mean_rationale_words"]})
    print(f"distill ({report['teacher']}): {report['accepted']}/{report['total']} rationales accepted, "
          f"rejected {report['rejected']}, mean {report['mean_rationale_words']} words")


if __name__ == "__main__":
    main()
