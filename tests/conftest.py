"""Shared fixtures: real small things (the converted base model, a copy of the project, the mirror)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from workspace import copy_project

REPO = Path(__file__).resolve().parents[1]
# As the CLI does: no telemetry, patience for the temporary Prefect server on a busy machine, no hub downloads.
for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)
# The suite's own Prefect home (the temporary servers' database, result storage), not the user's ~/.prefect: a
# database there migrated by another Prefect version stops every temporary server ("No such revision").
os.environ["PREFECT_HOME"] = str(REPO / ".cache" / "prefect-home")
# Created here: Prefect does not create its home's parents, and in a clean clone `.cache` does not exist yet when
# the first in-process flow starts the temporary server ("sqlite3.OperationalError: unable to open database file";
# it failed CI twice as a timeout of that server, never in a working copy).
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
MIRROR = Path(os.environ.get("RATIONANOMALY_MIRROR", REPO.parent / "shared" / "data"))
TEST_CACHE = REPO / ".cache" / "test-assets"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "SOURCES.md").exists():
        pytest.skip(f"data mirror not found at {MIRROR} (set RATIONANOMALY_MIRROR)")
    return MIRROR


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The default base model converted once per machine into the test cache (~40 s the first time)."""
    from tasks.base_model import GGUF_SOURCE, META_FILE, build_base_model

    target = TEST_CACHE / "base"
    if not (target / META_FILE).exists():
        build_base_model(GGUF_SOURCE, target)
    return target


def enter_project(dest: Path, monkeypatch: pytest.MonkeyPatch, mirror: Path) -> Path:
    """Point the pipeline (cwd, root, mirror, MLflow store) at a project copy."""
    monkeypatch.setenv("RATIONANOMALY_MIRROR", str(mirror))
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(dest))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{dest / 'mlflow.db'}")
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: Path) -> Path:
    """A fresh copy of the project on the smoke profile, with the mirror configured; cwd is set to it."""
    return enter_project(copy_project(REPO, tmp_path / "project"), monkeypatch, mirror)


@pytest.fixture(scope="module")
def module_project(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Iterator[Path]:
    """Like `project`, shared by the tests of one module (for expensive pipeline runs done once)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield enter_project(copy_project(REPO, tmp_path_factory.mktemp("project") / "project"), monkeypatch, mirror)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Quiet the line Prefect logs when its temporary server (started by flows run in this process) stops at
    interpreter exit: the handler holds a test's captured stream, long closed, and the line printed a logging
    traceback after the summary (seen at the end of every CI run)."""
    import sys

    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        server.subprocess_server_logger.disabled = True


@pytest.fixture
def chat_server() -> Iterator[Any]:
    """Starts test_detect's FakeChatServer (a real local OpenAI-compatible HTTP server) with the given mode;
    every server started is stopped afterwards."""
    import contextlib

    from test_detect import FakeChatServer

    servers: list[FakeChatServer] = []

    def start(**kwargs: Any) -> FakeChatServer:
        servers.append(FakeChatServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        with contextlib.suppress(OSError):
            server.stop()
