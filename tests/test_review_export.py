"""`rationanomaly review export` (issue 20 item 1): detect's templates ranked by the value of a label, written as a
review file the `correct` stage reads once a person fills the labels."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tasks.common.errors import InputError
from tasks.data.review import load_review_file, review_folder
from tasks.data.review_export import REVIEW_COLUMNS, export_review, rank, read_detect_output
from tasks.detection.cache import VerdictCache
from tasks.detection.verdicts import TemplateVerdict

THETA = 0.5


def template(tid: int, text: str, verdict: str, score: float | None, *, shown: bool | None = True,
             first_stage: bool = False, dataset: str = "thunderbird", **extra: Any) -> dict[str, Any]:
    """A template record as tasks.detection.detector writes it."""
    return {"kind": "template", "template_id": tid, "template": text, "verdict": verdict, "score": score,
            "rationale": f"why {text}" if verdict == "abnormal" else "", "dataset": dataset, "model_version": "3",
            "threshold": THETA, "neighbour_shown": shown, "first_stage": first_stage, "example_line": tid,
            "example": f"host1 {text.replace('<*>', '7')}", **extra}


def write_output(path: Path, templates: list[dict[str, Any]], lines: dict[int, int]) -> Path:
    """A detect output: each template record, then `lines[id]` line records of it."""
    rows = [json.dumps(t) for t in templates]
    number = 0
    for tid, count in lines.items():
        for _ in range(count):
            number += 1
            rows.append(json.dumps({"kind": "line", "line": number, "template_id": tid, "verdict": "x"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# five templates, one of each kind the ranking tells apart
ALERT = template(1, "kernel panic on <*>", "abnormal", 0.9)  # A 1, U 0.2, K 0
NEAR_UNKNOWN = template(2, "link flap on port <*>", "normal", 0.45, shown=False)  # U 0.9, K 1
CHATTY = template(3, "session opened for user <*>", "normal", 0.01)  # U 0.02
DUMP = template(4, "<*> <*> 0x<*>", "normal", 0.0, shown=False, first_stage=True)  # left out: first stage
CONFIDENT = template(5, "cron job finished", "normal", 0.0)  # value 0: left out
LINES = {1: 100, 2: 3, 3: 1000, 4: 500, 5: 40}


def value(a: float, u: float, k: float, lines: int) -> float:
    return (a + u + k) * math.log2(1 + lines)


def test_templates_are_ranked_by_the_documented_value_of_a_label(tmp_path: Path) -> None:
    found: dict[Any, Any] = {}
    read_detect_output(write_output(tmp_path / "d.jsonl", [ALERT, NEAR_UNKNOWN, CHATTY, DUMP, CONFIDENT], LINES),
                       found)
    result = rank(found)
    ranked = [(c.template, c.lines, round(v, 6)) for c, v in result.rows]
    assert ranked == [("kernel panic on <*>", 100, round(value(1, 0.2, 0, 100), 6)),   # 7.99
                      ("link flap on port <*>", 3, round(value(0, 0.9, 1, 3), 6)),    # 3.8
                      ("session opened for user <*>", 1000, round(value(0, 0.02, 0, 1000), 6))]  # 0.2
    assert (result.templates, result.first_stage, result.labelled, result.no_value, result.over_budget) == (
        5, 1, 0, 1, 0)
    # --threshold replaces the records' own: at 0.9 the alert sits on it (U 1)
    assert rank(found, threshold=0.9).rows[0][1] == pytest.approx(value(1, 1, 0, 100))


def test_a_template_the_version_already_holds_labelled_is_not_asked_again(tmp_path: Path) -> None:
    """After an index-only release, detect marks the templates the index holds labelled (`labelled_template`):
    their verdict is the label, so another label is worth nothing, however alarming they look."""
    labelled = template(6, "disk <*> failed", "abnormal", 0.95, shown=False, labelled_template=True)
    found: dict[Any, Any] = {}
    read_detect_output(write_output(tmp_path / "d.jsonl", [ALERT, labelled], {1: 10, 6: 900}), found)
    result = rank(found)
    assert [c.template for c, _ in result.rows] == ["kernel panic on <*>"]
    assert (result.labelled, result.no_value) == (1, 0)


def test_lines_of_several_outputs_add_up_and_a_renamed_template_id_counts_under_its_new_text(tmp_path: Path) -> None:
    first = write_output(tmp_path / "a.jsonl", [ALERT], {1: 2})
    # the second run's drain merged template 1 into a new text mid-run: later lines belong to that text
    second = tmp_path / "b.jsonl"
    rows = [ALERT, {"kind": "line", "line": 1, "template_id": 1},
            {**ALERT, "template": "kernel panic on <*> <*>"}, {"kind": "line", "line": 2, "template_id": 1},
            {"kind": "line", "line": 3, "template_id": 1}]
    second.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    found: dict[Any, Any] = {}
    for path in (first, second):
        read_detect_output(path, found)
    assert {c.template: c.lines for c in found.values()} == {"kernel panic on <*>": 3, "kernel panic on <*> <*>": 2}


def test_the_written_file_once_labelled_is_read_by_the_correct_stage_reader(tmp_path: Path) -> None:
    output = write_output(tmp_path / "d.jsonl", [ALERT, NEAR_UNKNOWN, CHATTY, DUMP, CONFIDENT], LINES)
    out = tmp_path / "export" / "erin.csv"
    out.parent.mkdir()
    export_review([output], out)
    with out.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == list(REVIEW_COLUMNS)
    assert [r["template"] for r in rows] == ["kernel panic on <*>", "link flap on port <*>",
                                             "session opened for user <*>"]
    alert = rows[0]
    assert alert["label"] == "" and alert["lines"] == "100" and alert["verdict"] == "abnormal"
    assert alert["score"] == "0.9000" and alert["rationale"] == "why kernel panic on <*>"
    assert alert["example"] == "host1 kernel panic on 7" and alert["system"] == "thunderbird"
    assert rows[1]["neighbour_shown"] == "false"
    # unfilled, the reader refuses it at the first empty label, naming the file and line
    with pytest.raises(InputError) as refused:
        load_review_file(out)
    assert (refused.value.file, refused.value.line, refused.value.field) == (str(out), 2, "label")
    # a person fills every label (and deletes nothing): `correct`'s reader resolves it, context columns ignored
    labels = {"kernel panic on <*>": "abnormal", "link flap on port <*>": "abnormal",
              "session opened for user <*>": "normal"}
    for row in rows:
        row["label"] = labels[row["template"]]
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = review_folder(out.parent, senior="erin")
    assert result is not None and result.annotators == ["erin"]
    assert {r["input"]: r["rectified"] for r in result.records} == labels


def test_budget_keeps_the_most_valuable(tmp_path: Path) -> None:
    output = write_output(tmp_path / "d.jsonl", [ALERT, NEAR_UNKNOWN, CHATTY, DUMP, CONFIDENT], LINES)
    result = export_review([output], tmp_path / "top.csv", budget=2)
    assert [c.template for c, _ in result.rows] == ["kernel panic on <*>", "link flap on port <*>"]
    assert result.over_budget == 1
    assert len((tmp_path / "top.csv").read_text(encoding="utf-8").splitlines()) == 3  # header + 2
    with pytest.raises(InputError, match="at least 1"):
        export_review([output], tmp_path / "none.csv", budget=0)


def test_the_file_is_written_whole_or_not_at_all_and_labels_are_never_overwritten(tmp_path: Path) -> None:
    good = write_output(tmp_path / "good.jsonl", [ALERT], {1: 5})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ALERT) + "\n{truncated\n", encoding="utf-8")
    out = tmp_path / "reviews" / "erin.csv"
    out.parent.mkdir()
    with pytest.raises(InputError):
        export_review([good, bad], out)
    assert list(out.parent.iterdir()) == []  # nothing half-written, no temporary file left
    out.write_text("template,label\nkernel panic on <*>,abnormal\n", encoding="utf-8")  # someone's labels
    with pytest.raises(InputError, match="already exists") as refused:
        export_review([good], out)
    assert refused.value.file == str(out)
    assert out.read_text(encoding="utf-8") == "template,label\nkernel panic on <*>,abnormal\n"
    export_review([good], out, overwrite=True)
    assert out.read_text(encoding="utf-8").startswith("template,label,category,note,")
    assert sorted(p.name for p in out.parent.iterdir()) == ["erin.csv"]


@pytest.mark.parametrize(("text", "line", "pattern"), [
    (json.dumps(ALERT) + "\nnot json\n", 2, "not a JSON line"),
    (json.dumps(ALERT) + "\n\n" + json.dumps({"kind": "line", "line": 1, "template_id": 9}) + "\n", 3,
     "template id 9"),
    (json.dumps({**ALERT, "dataset": None}) + "\n", 1, "without \\['dataset'\\]"),
    ("[1, 2]\n", 1, "not a JSON object"),
    (json.dumps({"kind": "summary"}) + "\n", None, "no template records"),
])
def test_bad_input_names_the_file_and_line(tmp_path: Path, text: str, line: int | None, pattern: str) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=pattern) as refused:
        export_review([path], tmp_path / "out.csv")
    assert (refused.value.file, refused.value.line) == (str(path), line)
    assert not (tmp_path / "out.csv").exists()


def test_the_verdict_cache_fills_what_an_older_output_lacks_and_is_left_unchanged(tmp_path: Path) -> None:
    old = {k: v for k, v in NEAR_UNKNOWN.items() if k not in ("neighbour_shown", "first_stage", "threshold")}
    old["score"] = None
    output = write_output(tmp_path / "old.jsonl", [old], {2: 3})
    cache_file = tmp_path / "cache.sqlite"
    cache = VerdictCache(cache_file, "3", {})
    cache.put(TemplateVerdict(old["template"], "thunderbird", "normal", True, "", "", "3", 0.1, 0.45,
                              neighbour_shown=False))
    cache.close()
    before = cache_file.read_bytes()
    # the older output alone: no score, neighbour flag unknown → value 0, nothing to label
    with pytest.raises(InputError, match="no template worth a label"):
        export_review([output], tmp_path / "a.csv", threshold=THETA)
    result = export_review([output], tmp_path / "b.csv", threshold=THETA, cache_file=cache_file)
    (candidate, got), = result.rows
    assert (candidate.score, candidate.neighbour_shown) == (0.45, False)
    assert got == pytest.approx(value(0, 0.9, 1, 3))
    assert cache_file.read_bytes() == before
    with sqlite3.connect(cache_file) as db:
        assert db.execute("SELECT count(*) FROM verdicts").fetchone() == (1,)


def test_detect_then_export_end_to_end(tmp_path: Path, chat_server: Any) -> None:
    """A real detect run (a real local OpenAI-compatible server, a real retrieval index) feeds the export: the
    alert comes first; the first-stage register dump and the template the index already holds labelled (its
    verdict is that label) are left out."""
    from test_detect import BGL, lines_file, run_detect

    from tasks.common.retrieval import INDEX_FILE, TemplateIndex

    (tmp_path / "index").mkdir()
    TemplateIndex(["instruction cache parity error corrected"], [1], ["bgl"], floor=0.1,
                  same_system=True).save(tmp_path / "index" / INDEX_FILE)
    head = BGL[0].split("instruction")[0]
    data = lines_file(BGL + [BGL[0]] + [head + "r00=0x00000000 r01=0x1eb2f7c0"] * 3)
    _, records = run_detect(tmp_path, chat_server().url, data,
                            endpoint={"threshold": 0.5, "index_dir": str(tmp_path / "index"), "neighbours": 2})
    output = tmp_path / "run.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = export_review([output], tmp_path / "erin.csv")
    ranked = [c.template for c, _ in result.rows]
    assert result.first_stage == 1 and not any("r00=" in t for t in ranked)
    assert result.labelled == 1 and "instruction cache parity error corrected" not in ranked
    # the scores are 0.909 (alerts) and 0.091: U = 0.18 for both; the alignment template had no labelled
    # neighbour above the floor (K 1), the alert had one
    u = 1 - (0.9089 - 0.5) / 0.5
    assert [(t, round(v, 3)) for t, v in zip(ranked, (v for _, v in result.rows), strict=True)] == [
        ("<*> double-hummer alignment exceptions", round(value(0, u, 1, 2), 3)),
        ("data TLB error interrupt", round(value(1, u, 0, 1), 3))]


def test_cli_review_export_and_review_still_resolves(tmp_path: Path) -> None:
    from rationanomaly.cli import app

    output = write_output(tmp_path / "d.jsonl", [ALERT, NEAR_UNKNOWN, CHATTY], {1: 100, 2: 3, 3: 1000})
    runner = CliRunner()
    done = runner.invoke(app, ["review", "export", str(output), "--out", str(tmp_path / "erin.csv"), "--budget", "1"])
    assert done.exit_code == 0, done.output
    assert "1 templates to label written" in done.output
    assert len((tmp_path / "erin.csv").read_text(encoding="utf-8").splitlines()) == 2
    again = runner.invoke(app, ["review", "export", str(output), "--out", str(tmp_path / "erin.csv")])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "a.csv").write_text("template,label\nkernel panic on <*>,abnormal\n", encoding="utf-8")
    resolved = runner.invoke(app, ["review", str(folder), "--senior", "a"])  # the group's default command
    assert resolved.exit_code == 0, resolved.output
    assert '"resolved": 1' in resolved.output
