"""Shared fixtures: real small things (the converted base model, a copy of the project, the mirror)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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


def copy_project(dest: Path, profile: str = "smoke") -> Path:
    """A working copy of the project (git-tracked files + untracked non-ignored ones) with its own git and DVC.

    Runs stay isolated: their own data/, models/, mlflow.db and DVC cache.
    """
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    from tasks.config import set_profile

    set_profile(profile, dest / "params.yaml")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=dest, check=True, env=env)
    return dest


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: Path) -> Path:
    """A fresh copy of the project on the smoke profile, with the mirror configured; cwd is set to it."""
    dest = copy_project(tmp_path / "project")
    monkeypatch.setenv("RATIONANOMALY_MIRROR", str(mirror))
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(dest))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{dest / 'mlflow.db'}")
    monkeypatch.chdir(dest)
    return dest
