"""DVC's stage lock after an interrupted run, and a lock a running DVC command holds (issue 22, item 3).

Real DVC in a small repository of its own: a stage that waits holds the lock while the tests run others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.common.dvc_ops import StageLocked, release_dead_lock, repro_stage

DVC = str(Path(sys.executable).with_name("dvc"))
DVC_YAML = """stages:
  wait:
    cmd: python -c "import pathlib, time; pathlib.Path('waiting').touch(); time.sleep(300)"
    outs: [waited]
  after:
    cmd: python -c "import pathlib; pathlib.Path('after').write_text('x')"
    deps: [waited]
    outs: [after]
  apart:
    cmd: python -c "import pathlib; pathlib.Path('apart').write_text('x')"
    outs: [apart]
"""


@pytest.fixture
def dvc_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture
def waiting(dvc_repo: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`dvc repro wait` running in the repository (it holds DVC's lock on `waited` until stopped)."""
    proc = subprocess.Popen([DVC, "repro", "wait"], cwd=dvc_repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (dvc_repo / "waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "dvc repro wait did not start its stage"
            time.sleep(0.2)
        yield proc
    finally:
        proc.kill()  # the dvc process this fixture started, by its handle
        proc.wait()


@pytest.mark.parametrize("content", ["", "{\"write\": {\"waited\": {\"pid\": 1", "[]"])
def test_an_empty_or_corrupt_lock_with_no_dvc_running_is_removed_in_one_line(
        dvc_repo: Path, content: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A dvc command killed while rewriting its lock leaves it empty (dvc issue 7615): every later DVC command
    failed on it, and the cleanup skipped the file."""
    lock = dvc_repo / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(content)
    released = release_dead_lock(dvc_repo)
    assert len(released) == 1 and not lock.exists()
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(lock) in err and "no dvc command runs here" in err
    assert repro_stage("apart", dvc_repo).ran  # DVC works again


def test_a_corrupt_lock_while_dvc_runs_is_kept_and_the_stage_names_the_holder(
        dvc_repo: Path, waiting: subprocess.Popen[bytes]) -> None:
    lock = dvc_repo / ".dvc" / "tmp" / "rwlock"
    lock.write_text("")
    assert release_dead_lock(dvc_repo) == [] and lock.exists()
    with pytest.raises(StageLocked) as failed:
        repro_stage("apart", dvc_repo)
    message = str(failed.value)
    assert f"PID {waiting.pid} (" in message and "dvc repro wait" in message and "\n" not in message


def test_a_stage_blocked_by_a_running_dvc_fails_at_once_naming_it(
        dvc_repo: Path, waiting: subprocess.Popen[bytes]) -> None:
    with pytest.raises(StageLocked) as failed:
        repro_stage("after", dvc_repo)
    message = str(failed.value)
    assert message.startswith("stage 'after' not run: ") and "\n" not in message
    assert f"PID {waiting.pid} (" in message and "dvc repro wait" in message


def test_the_flow_does_not_retry_a_stage_whose_lock_a_running_process_holds(
        dvc_repo: Path, waiting: subprocess.Popen[bytes]) -> None:
    """The fetch stage is retried twice, 10 s apart, for the network; a held lock is not a network hiccup."""
    from prefect import flow

    from flows.common import run_fetch_stage

    assert run_fetch_stage.retries == 2 and run_fetch_stage.retry_delay_seconds == 10
    # the shipped task with its retry condition, its retries 10 minutes apart: a retry cannot hide in slow start-up
    slow_retry = run_fetch_stage.with_options(retry_delay_seconds=600)
    assert slow_retry.retry_condition_fn is run_fetch_stage.retry_condition_fn is not None

    @flow(name="locked-stage")
    def locked() -> float:
        start = time.monotonic()
        with pytest.raises(StageLocked, match=f"PID {waiting.pid}"):
            slow_retry("after")
        return time.monotonic() - start

    assert locked() < 300  # one attempt: a retry would wait 600 s first


def test_the_command_reports_a_held_lock_in_one_line_without_retrying(tmp_path: Path, mirror: Path) -> None:
    """`rationanomaly data` while a live process holds DVC's lock on data/raw: no retry, no traceback, the last
    line names the holder."""
    from workspace import copy_project

    project = copy_project(Path(__file__).resolve().parents[1], tmp_path / "project")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock = project / ".dvc" / "tmp" / "rwlock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps({"write": {str(project / "data" / "raw"): {"pid": holder.pid,
                                                                             "cmd": "dvc repro fetch"}}}))
        env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "RATIONANOMALY_ROOT": str(project),
               "PREFECT_HOME": str(tmp_path / "prefect"), "RATIONANOMALY_MIRROR": str(mirror)}
        proc = subprocess.run([sys.executable, "-m", "rationanomaly.cli", "data"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        holder.kill()  # the process this test started to hold the lock
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "Retry" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: stage 'fetch' not run: DVC's lock")
    assert f"PID {holder.pid} (dvc repro fetch)" in errors[0]
