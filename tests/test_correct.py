"""correct: the shipped expert patch on the real template lists, matching rules, review queue, bad corrections."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.errors import InputError
from tasks.common.settings import CorrectSettings, load_settings
from tasks.correct import correct_templates, load_patch, load_templates, normalize, run
from tasks.fetch import fetch_sources

REPO = Path(__file__).resolve().parents[1]
PATCH = "rationanomaly/anomaly_patch.json"
BGL, SPIRIT = "logprompt/templates_bgl.csv", "logprompt/templates_spirit.csv"


@pytest.fixture(scope="module")
def shipped(mirror: Path):
    """The correction of the real mirror files, computed once for the module."""
    return correct_templates(mirror / PATCH, {"bgl": mirror / BGL, "spirit": mirror / SPIRIT})


def test_shipped_patch_gives_the_papers_counts(shipped):
    report = shipped.report
    assert report["corrections"] == 225
    assert (report["matched_exact"], report["matched_normalized"], report["unmatched"]) == (224, 1, [])
    after = report["abnormal_after"]
    assert (after["bgl"]["abnormal"], after["bgl"]["total"]) == (112, 1766)
    assert (after["spirit"]["abnormal"], after["spirit"]["total"]) == (172, 1297)
    assert report["abnormal_before"]["bgl"]["abnormal"] == 44 and report["abnormal_before"]["spirit"]["abnormal"] == 22
    assert report["by_dataset"]["bgl"]["corrected"] == 72 and report["by_dataset"]["spirit"]["corrected"] == 153
    # 221 normal→abnormal as the patch states; one of its 4 "abnormal→normal" records names a template
    # that the list already labels normal, so it confirms rather than flips (and is reported as such).
    assert report["by_direction"] == {"normal_to_abnormal": 221, "abnormal_to_normal": 3, "unchanged": 1}
    assert [m["index"] for m in report["stated_label_mismatch"]] == [41]
    assert report["patch_sha256"] == "fb99f08fac90b734f0d9f1b908de36c918e1950dc340a92a3a4e46415c458ef7"


def test_only_the_hw_info_correction_needs_the_normalised_form(shipped):
    (match,) = shipped.report["normalized_matches"]
    assert match["correction"].startswith("Error, getting detailed hw info")
    assert match["template"].startswith("Error getting detailed hw info") and match["dataset"] == "bgl"
    frame = shipped.templates
    row = frame[frame["template"] == match["template"]].iloc[0]
    assert (row["label_original"], row["label"], row["correction"]) == (0, 1, "normalized")


def test_corrected_templates_have_the_declared_columns_and_labels(shipped):
    frame = shipped.templates
    assert list(frame.columns) == ["dataset", "template", "label_original", "label", "correction"]
    assert set(frame["label"]) == {0, 1} and set(frame["correction"]) == {"none", "exact", "normalized"}
    assert len(frame) == 1766 + 1297


def test_review_queue_lists_near_twins_of_corrected_templates_and_changes_none(shipped):
    queue = shipped.queue
    bgl = queue[queue["template"].str.startswith("rts tree/torus link training failed: wanted: C X+ X-")]
    assert len(bgl) == 1 and bgl.iloc[0]["label"] == "normal" and bgl.iloc[0]["twin_label"] == "abnormal"
    assert "<*> C X+ X-" in bgl.iloc[0]["twin_template"]
    spirit = queue[queue["template"] == "mount: RPC: Timed out"]
    assert len(spirit) == 1 and spirit.iloc[0]["twin_template"] == ">> mount: RPC: Timed out"
    frame = shipped.templates.set_index("template")
    assert frame.loc["mount: RPC: Timed out", "label"] == 0
    assert frame.loc["mount: RPC: Timed out", "correction"] == "none"
    assert shipped.report["review_queue_size"] == len(queue)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def patch_json(*records: tuple[str, str, str]) -> str:
    return json.dumps([{"instruction": "i", "input": t, "label": old, "rectified": new} for t, old, new in records],
                      indent=4)


def test_a_normalised_form_shared_by_two_templates_changes_neither(tmp_path: Path):
    templates = write(tmp_path / "t.csv", "log,label\n\"disk a, failed\",0\ndisk a failed!,0\nother,0\n")
    patch = write(tmp_path / "p.json", patch_json(("Disk A failed", "normal", "abnormal")))
    result = correct_templates(patch, {"x": templates})
    assert result.report["matched_normalized"] == 0
    assert "one correction never changes two" in result.report["unmatched"][0]["reason"]
    assert result.templates["label"].tolist() == [0, 0, 0]


def test_exact_match_wins_over_the_normalised_form(tmp_path: Path):
    templates = write(tmp_path / "t.csv", "log,label\n  link down  ,0\nLink down!,0\n")
    patch = write(tmp_path / "p.json", patch_json(("link down", "normal", "abnormal")))
    result = correct_templates(patch, {"x": templates})
    assert result.templates["correction"].tolist() == ["exact", "none"]
    assert normalize("Link <*> down!") == "link<*>down" and normalize("<*>:<*>") == "<*><*>"


def test_invalid_json_names_the_line(tmp_path: Path):
    patch = write(tmp_path / "p.json", '[\n  {"input": "a", "rectified": "abnormal"},\n  {"input": "b",,}\n]\n')
    with pytest.raises(InputError, match=r"p\.json:3: not valid JSON"):
        load_patch(patch)


def test_unknown_label_value_names_record_line_and_field(tmp_path: Path):
    patch = write(tmp_path / "p.json", patch_json(("a", "normal", "abnormal"), ("b", "normal", "broken")))
    with pytest.raises(InputError, match=r"p\.json:8 field '\[1\]\.rectified': record 1: unknown label value 'broken'"):
        load_patch(patch)


def test_two_entries_giving_one_template_different_labels_are_a_conflict(tmp_path: Path):
    patch = write(tmp_path / "p.json", patch_json(("a", "normal", "abnormal"), ("x", "normal", "abnormal"),
                                                  (" a ", "abnormal", "normal")))
    with pytest.raises(InputError, match=r"conflicting corrections: records 0 \(line 2\) and 2 \(line 14\)"):
        load_patch(patch)


def test_a_conflict_found_only_through_normalisation_is_reported_too(tmp_path: Path):
    templates = write(tmp_path / "t.csv", "log,label\nlink down,0\n")
    patch = write(tmp_path / "p.json", patch_json(("link down", "normal", "abnormal"),
                                                  ("Link down!", "normal", "normal")))
    with pytest.raises(InputError, match="conflicting corrections: records 0 and 1"):
        correct_templates(patch, {"x": templates})


def test_empty_template_list_is_an_error(tmp_path: Path):
    with pytest.raises(InputError, match=r"t\.csv: empty template list"):
        load_templates(write(tmp_path / "t.csv", "log,label\n"), "x")
    with pytest.raises(InputError, match=r"e\.csv: empty template list"):
        load_templates(write(tmp_path / "e.csv", ""), "x")


def test_template_list_errors_name_line_and_field(tmp_path: Path):
    with pytest.raises(InputError, match=r"t\.csv:3 field 'label': unknown label 'maybe'"):
        load_templates(write(tmp_path / "t.csv", "log,label\na,0\nb,maybe\n"), "x")
    with pytest.raises(InputError, match=r"u\.csv:3: not UTF-8"):
        load_templates(write(tmp_path / "u.csv", b"log,label\na,0\nb \xff,0\n"), "x")
    with pytest.raises(InputError, match=r"m\.csv:1 field 'label': missing column"):
        load_templates(write(tmp_path / "m.csv", "log,lab\na,0\n"), "x")


def digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def stage_root(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root with data/raw fetched from the mirror; repo_root() points at it."""
    fetch_sources(REPO / "sources.yaml", tmp_path / "data/raw", mirror)
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    return tmp_path


def stage_params(root: Path) -> CorrectSettings:
    """The shipped `correct` settings, with the review folder under the test's project root."""
    return load_settings(REPO / "params.yaml").correct.model_copy(update={"review_dir": "reviews"})


def test_stage_writes_every_output_and_applies_resolved_reviews(stage_root: Path):
    params = stage_params(stage_root)
    write(stage_root / "reviews/README.md", "ignored")
    write(stage_root / "reviews/senior.csv", "template,label,category\nmount: RPC: Timed out,abnormal,network issue\n"
                                              "node 0 totalpages: 524275,normal,\n")
    write(stage_root / "reviews/ann.csv", "template,label\nmount: RPC: Timed out,abnormal\nnode 0 totalpages: 524275,"
                                           "abnormal\n")
    result = run(params)
    report = json.loads((stage_root / params.report_file).read_text())
    assert report["matched_exact"] == 224 and report["review"]["resolved_by"] == {"senior": 1, "unanimous": 1}
    assert report["review"]["kappa_method"] == "cohen" and report["kappa"] == report["review"]["kappa"]
    frame = pd.read_parquet(stage_root / params.out_file).set_index("template")
    assert frame.loc["mount: RPC: Timed out", "label"] == 1
    assert frame.loc["mount: RPC: Timed out", "correction"] == "review"
    assert report["abnormal_after"]["spirit"]["abnormal"] == 173
    resolution = json.loads((stage_root / params.resolution_file).read_text())
    assert [r["input"] for r in resolution] == [r["input"] for r in result.resolution]
    assert "## Multi-annotator review" in (stage_root / params.report_md).read_text()
    queue = pd.read_csv(stage_root / params.review_queue_file, keep_default_na=False)
    assert "mount: RPC: Timed out" not in set(queue["template"]), "resolved by review: no longer a near-twin"


def test_failed_run_leaves_the_last_good_outputs_untouched(stage_root: Path):
    params = stage_params(stage_root)
    run(params)
    outputs = [stage_root / getattr(params, k) for k in ("out_file", "report_file", "report_md", "review_queue_file",
                                                "resolution_file")]
    before = digest(outputs)
    patch = stage_root / params.patch_file
    patch.write_text(patch.read_text().replace('"rectified": "abnormal"', '"rectified": "abnormall"', 1))
    with pytest.raises(InputError, match="unknown label value 'abnormall'"):
        run(params)
    assert digest(outputs) == before
    assert not [p for p in (stage_root / "reports").iterdir() if p.name.endswith(".tmp")]
