"""The data spine under real DVC in a copy of the project: counts, review queue, skipping, selective reruns."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.common.dvc_ops import repro_stage, stale_stages

DATA_STAGES = ["fetch", "correct", "split", "distill"]


def repro_all(stages: list[str]) -> dict[str, bool]:
    return {stage: repro_stage(stage).ran for stage in stages}


@pytest.fixture(scope="module")
def reproduced(module_project: Path) -> Path:
    """The data stages reproduced once in a fresh copy; the tests below run in this order and build on it."""
    assert all(repro_all(DATA_STAGES).values())
    return module_project


def test_dvc_repro_gives_the_papers_correction_counts(reproduced: Path):
    report = json.loads((reproduced / "reports/correction.json").read_text())
    assert report["matched_exact"] == 224
    assert report["matched_normalized"] == 1
    assert report["unmatched"] == []
    abnormal = report["abnormal_after"]
    assert (abnormal["bgl"]["abnormal"], abnormal["bgl"]["total"]) == (112, 1766)
    assert (abnormal["spirit"]["abnormal"], abnormal["spirit"]["total"]) == (172, 1297)
    templates = pd.read_parquet(reproduced / "data/corrected/templates.parquet")
    assert set(templates.columns) >= {"dataset", "template", "label_original", "label", "correction"}
    assert int(templates.query("dataset == 'bgl'")["label"].sum()) == 112


def test_review_queue_surfaces_near_twins_of_corrected_templates(reproduced: Path):
    queue = pd.read_csv(reproduced / "reports/review_queue.csv", keep_default_na=False)
    column = "template" if "template" in queue.columns else queue.columns[0]
    listed = " || ".join(queue[column])
    assert "rts tree/torus link training failed: wanted: C X+ X-" in listed
    assert any(t.strip() == "mount: RPC: Timed out" for t in queue[column])


def test_second_repro_skips_every_stage(reproduced: Path):
    assert not set(DATA_STAGES) & set(stale_stages())
    assert repro_all(DATA_STAGES) == dict.fromkeys(DATA_STAGES, False)


def edit_mirror_file(project: Path, tmp_path: Path, name: str, edit) -> None:
    """Copy the current mirror, change one file with `edit(text) -> text`, pin its new sha256, switch to it.

    The env change lasts for the module (the module fixture restores it), so later tests build on it.
    """
    new_mirror = tmp_path / "mirror"
    shutil.copytree(os.environ["RATIONANOMALY_MIRROR"], new_mirror, ignore=shutil.ignore_patterns("*.xlsx"))
    target = new_mirror / name
    target.chmod(0o644)
    target.write_text(edit(target.read_text()))
    sources = yaml.safe_load((project / "sources.yaml").read_text())
    for source in sources["sources"]:
        if source["name"] == name:
            source["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (project / "sources.yaml").write_text(yaml.safe_dump(sources, sort_keys=False))
    os.environ["RATIONANOMALY_MIRROR"] = str(new_mirror)


def test_changed_corrections_rerun_correction_and_what_follows(
    reproduced: Path, tmp_path: Path
):
    """A new expert decision (one correction withdrawn) flows through correct → split → distill."""
    name = "rationanomaly/anomaly_patch.json"
    edit_mirror_file(reproduced, tmp_path, name, lambda t: json.dumps(json.loads(t)[1:]))
    stale = set(stale_stages())
    assert "fetch" in stale and not {"correct", "split", "distill"} & stale
    ran = repro_all(DATA_STAGES)
    assert ran["fetch"] and ran["correct"] and ran["split"]
    report = json.loads((reproduced / "reports/correction.json").read_text())
    assert report["matched_exact"] + report["matched_normalized"] == 224


def test_changed_session_source_reruns_split_but_not_correction(
    reproduced: Path, tmp_path: Path
):
    """HDFS sessions feed only the session test sets: correct and distill stay as they are."""
    name = "hdfs_sessions/session_test.jsonl"
    edit_mirror_file(reproduced, tmp_path, name, lambda t: "\n".join(t.splitlines()[:-1]) + "\n")
    ran = repro_all(DATA_STAGES)
    assert ran == {"fetch": True, "correct": False, "split": True, "distill": False}


def _write_lock(root: Path, pid: int) -> Path:
    lock = root / ".dvc/tmp/rwlock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"write": {"reports/sft.json": {"pid": pid, "cmd": "dvc repro sft"}},
                                "read": {"data/sft": [{"pid": pid, "cmd": "dvc repro sft"}]}}))
    return lock


def test_a_lock_left_by_a_killed_run_is_removed_and_a_live_one_is_kept(tmp_path: Path):
    """A killed `dvc repro` whose parent died too stays a zombie where PID 1 does not reap orphans: DVC
    reports its outputs busy forever. Its lock is removed; the lock of a running holder is not touched."""
    import subprocess
    import sys
    import time

    import psutil

    from tasks.common.dvc_ops import release_dead_lock

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits and stays a zombie until waited for
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        lock = _write_lock(tmp_path, zombie.pid)
        assert release_dead_lock(tmp_path) == [f"PID {zombie.pid} (dvc repro sft)"]
        assert not lock.exists()
    finally:
        zombie.wait()
    lock = _write_lock(tmp_path, os.getpid())
    assert release_dead_lock(tmp_path) == []
    assert lock.exists()
