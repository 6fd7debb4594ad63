"""Isolated working copies of the project, for tests and benchmarks that run the real pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tasks.common.config import set_profile

_GIT_ENV = {"GIT_AUTHOR_NAME": "rationanomaly", "GIT_AUTHOR_EMAIL": "ci@localhost",
            "GIT_COMMITTER_NAME": "rationanomaly", "GIT_COMMITTER_EMAIL": "ci@localhost"}


# Pipeline outputs: a copy starts without them, as a fresh clone does.
GENERATED = {"data", "models", "reports", "dvc.lock"}


def copy_project(source: Path, dest: Path, profile: str = "smoke") -> Path:
    """Copy git-tracked and untracked-but-not-ignored files into `dest`, set the profile, commit.

    The copy has its own git history, DVC cache, data/, models/ and mlflow.db, so runs never touch `source`.
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=source, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if name.split("/", 1)[0] in GENERATED:
            continue
        src = source / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    set_profile(profile, dest / "params.yaml")
    env = {**os.environ, **_GIT_ENV}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "working copy"], cwd=dest, check=True, env=env)
    return dest
