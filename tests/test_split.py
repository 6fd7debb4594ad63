"""split: seeded stratified template split at the paper's train anomaly rate, session test sets, leakage, raw bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.config import load_params
from tasks.common.errors import InputError
from tasks.common.settings import load_settings, validate_settings
from tasks.correct import correct_templates
from tasks.split import split_all

BGL_STRUCTURED = "loghub/BGL/BGL_2k.log_structured.csv"
HDFS_TEST = "hdfs_sessions/session_test.jsonl"


@pytest.fixture(scope="module")
def corrected(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real corrected templates (from the mirror's patch and lists) as a parquet file."""
    result = correct_templates(mirror / "rationanomaly/anomaly_patch.json",
                               {"bgl": mirror / "logprompt/templates_bgl.csv",
                                "spirit": mirror / "logprompt/templates_spirit.csv"})
    path = tmp_path_factory.mktemp("corrected") / "templates.parquet"
    result.templates.to_parquet(path, index=False)
    return path


SHIPPED = load_settings(Path(__file__).resolve().parents[1] / "params.yaml").split


def do_split(corrected: Path, out: Path, bgl: Path, hdfs: Path, **kwargs) -> dict:
    """split_all with the shipped `split` settings, except what `kwargs` overrides."""
    knobs = {k: getattr(SHIPPED, k) for k in ("seed", "test_fraction", "train_anomaly_rate", "window_lines",
                                              "validation_fraction")}
    return split_all(corrected, bgl, hdfs, out / "split", out / "split.json", **{**knobs, **kwargs})


@pytest.fixture(scope="module")
def shipped(corrected: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("split")
    return do_split(corrected, out, mirror / BGL_STRUCTURED, mirror / HDFS_TEST), out / "split"


def test_template_split_is_stratified_at_the_papers_train_anomaly_rate(shipped):
    report, folder = shipped
    bgl, spirit = report["templates"]["bgl"], report["templates"]["spirit"]
    assert (bgl["train"], bgl["train_abnormal"], bgl["test"], bgl["test_abnormal"]) == (360, 54, 707, 45)
    assert (spirit["train"], spirit["train_abnormal"], spirit["test"], spirit["test_abnormal"]) == (547, 82, 519, 69)
    # a fifth of the training part is held out at the natural anomaly rate, to choose the verdict threshold
    assert (bgl["validation"], bgl["validation_abnormal"], spirit["validation"], spirit["validation_abnormal"]) == \
        (212, 13, 156, 21)
    assert bgl["train_anomaly_rate"] == pytest.approx(0.15, abs=0.002)
    assert spirit["test_anomaly_rate"] == pytest.approx(172 / 1297, abs=0.002)  # test keeps the natural rate
    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    validation = pd.read_parquet(folder / "validation.parquet")
    assert list(train.columns) == list(test.columns) == list(validation.columns) == ["dataset", "template", "label"]
    assert len(test) == 1226 and int(test["label"].sum()) == 45 + 69
    keys = [{(d, t) for d, t in part[["dataset", "template"]].itertuples(index=False)}
            for part in (train, test, validation)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]


def test_split_is_deterministic_for_a_seed(shipped, corrected: Path, mirror: Path, tmp_path: Path):
    _, folder = shipped
    do_split(corrected, tmp_path, mirror / BGL_STRUCTURED, mirror / HDFS_TEST)
    for name in ("train.parquet", "test.parquet", "validation.parquet", "sessions_bgl2k.jsonl", "sessions_hdfs.jsonl"):
        assert (tmp_path / "split" / name).read_bytes() == (folder / name).read_bytes(), name
    other = do_split(corrected, tmp_path / "seed7", mirror / BGL_STRUCTURED, mirror / HDFS_TEST, seed=7)
    assert (tmp_path / "seed7/split/train.parquet").read_bytes() != (folder / "train.parquet").read_bytes()
    assert other["templates"]["bgl"]["train"] == 360


def test_null_train_anomaly_rate_keeps_every_training_normal(corrected: Path, mirror: Path, tmp_path: Path):
    report = do_split(corrected, tmp_path, mirror / BGL_STRUCTURED, mirror / HDFS_TEST, train_anomaly_rate=None)
    bgl = report["templates"]["bgl"]
    assert bgl["train_normals_dropped"] == 0 and bgl["train"] + bgl["validation"] + bgl["test"] == 1766


def test_bgl_2k_is_cut_into_100_line_windows_abnormal_if_any_line_is(shipped):
    report, folder = shipped
    windows = [json.loads(line) for line in (folder / "sessions_bgl2k.jsonl").read_text().splitlines()]
    assert len(windows) == 20 and report["sessions"]["bgl2k"]["abnormal_lines"] == 143
    assert all(len(w["templates"]) == len(w["line_labels"]) == 100 for w in windows)
    assert all(w["label"] == int(any(w["line_labels"])) for w in windows)
    assert sum(sum(w["line_labels"]) for w in windows) == 143
    assert windows[0]["templates"][0] == "instruction cache parity error corrected"
    assert report["sessions"]["bgl2k"]["abnormal_windows"] == sum(w["label"] for w in windows)


def test_hdfs_test_sessions_are_kept_whole(shipped):
    report, folder = shipped
    sessions = [json.loads(line) for line in (folder / "sessions_hdfs.jsonl").read_text().splitlines()]
    assert len(sessions) == 1588 and sum(s["label"] for s in sessions) == 57
    assert set(sessions[0]) == {"session_id", "templates", "label"}
    assert report["sessions"]["hdfs"] == {"sessions": 1588, "abnormal": 57}


def test_leakage_counts_session_templates_seen_in_training(shipped):
    report, folder = shipped
    train = {t.strip() for t in pd.read_parquet(folder / "train.parquet")["template"]}
    windows = [json.loads(line) for line in (folder / "sessions_bgl2k.jsonl").read_text().splitlines()]
    distinct = {t.strip() for w in windows for t in w["templates"]}
    leak = report["leakage"]["bgl2k"]
    assert leak["distinct_templates"] == len(distinct) == 120
    assert leak["in_train"] == len(distinct & train)
    assert report["leakage"]["hdfs"]["in_train"] == 0


def test_non_utf8_bytes_are_replaced_and_counted(corrected: Path, mirror: Path, tmp_path: Path):
    data = (mirror / BGL_STRUCTURED).read_bytes().replace(b"instruction cache parity error corrected",
                                                           b"instruction cache \xff\xfe parity error corrected", 1)
    bgl = tmp_path / "bgl.csv"
    bgl.write_bytes(data)
    report = do_split(corrected, tmp_path, bgl, mirror / HDFS_TEST)
    assert report["inputs"]["bgl.csv"]["non_utf8_replaced"] == 2
    assert report["inputs"][Path(HDFS_TEST).name]["non_utf8_replaced"] == 0
    first = json.loads((tmp_path / "split/sessions_bgl2k.jsonl").read_text().splitlines()[0])
    assert first["templates"][0] == "instruction cache parity error corrected"  # EventTemplate untouched


def test_a_one_megabyte_log_line_is_read_whole(corrected: Path, mirror: Path, tmp_path: Path):
    huge = "x" * 1_000_000
    lines = (mirror / BGL_STRUCTURED).read_text().splitlines()
    fields = lines[1].split(",")
    fields[-3], fields[-1] = huge, huge  # Content and EventTemplate
    bgl = tmp_path / "bgl.csv"
    bgl.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    hdfs = tmp_path / "hdfs.jsonl"
    hdfs.write_text((mirror / HDFS_TEST).read_text() + json.dumps({"block_id": "blk_big", "templates": [huge],
                                                                    "label": 1}) + "\n")
    report = do_split(corrected, tmp_path, bgl, hdfs)
    assert report["inputs"]["bgl.csv"]["longest_line_chars"] > 2_000_000
    assert report["sessions"]["hdfs"]["sessions"] == 1589
    first = json.loads((tmp_path / "split/sessions_bgl2k.jsonl").read_text().splitlines()[0])
    assert first["templates"][0] == huge


def test_a_failed_split_leaves_the_last_good_outputs_untouched(corrected: Path, mirror: Path, tmp_path: Path):
    do_split(corrected, tmp_path, mirror / BGL_STRUCTURED, mirror / HDFS_TEST)
    outputs = [*sorted((tmp_path / "split").iterdir()), tmp_path / "split.json"]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"block_id": "a", "templates": [], "label": 0}\n\n{"block_id": "b", "templates": [\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:3: not valid JSON"):
        do_split(corrected, tmp_path, mirror / BGL_STRUCTURED, bad)
    bad.write_text('{"block_id": "a", "templates": [], "label": 2}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1 field 'label'"):
        do_split(corrected, tmp_path, mirror / BGL_STRUCTURED, bad)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "split", "split.json"]


def test_bad_split_params_are_named(corrected: Path, mirror: Path, tmp_path: Path):
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["split"]["train_anomaly_rate"] = 1.5
    with pytest.raises(InputError, match=r"field 'split\.train_anomaly_rate'"):
        validate_settings(params)


def test_the_retrieval_index_holds_training_templates_only(shipped, tmp_path: Path) -> None:
    """Prompts show expert-labelled neighbours: never a validation or test template (no label leak)."""
    import pandas as pd

    from tasks import index as index_stage
    from tasks.common.retrieval import INDEX_FILE, TemplateIndex
    from tasks.common.settings import IndexSettings

    _, split_dir = shipped
    settings = IndexSettings(train_file=str(split_dir / "train.parquet"), out_dir=str(tmp_path / "index"), k=3,
                             features="word", floor=0.1, same_system=True, contrastive=True, bare_fraction=0.3,
                             near_duplicate_similarity=0.95)
    meta = index_stage.run(settings)
    index = TemplateIndex.load(tmp_path / "index" / INDEX_FILE)
    train = pd.read_parquet(split_dir / "train.parquet")
    held_out = set(pd.read_parquet(split_dir / "test.parquet")["template"]) | set(
        pd.read_parquet(split_dir / "validation.parquet")["template"])
    assert meta["templates"] == len(index) == len(train) and set(index.templates) == set(train["template"])
    found = {n.template for row in index.search(sorted(held_out), 3) for n in row}
    assert found and not found & held_out
