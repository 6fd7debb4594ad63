"""Isolated working copies of the project, for tests and benchmarks that run the real pipeline."""

from __future__ import annotations

import os
import re
import shutil
import socket
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
    set_serve_port(dest / "params.yaml", free_port_pair())  # never the port of a server running beside the tests
    env = {**os.environ, **_GIT_ENV}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-qm", "working copy"], cwd=dest, check=True, env=env)
    return dest


def free_port_pair() -> int:
    """A port p with p and p+1 free on loopback (the blue/green pair)."""
    from serving import server

    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65000 and server._port_free("127.0.0.1", port + 1):
            return port
    raise RuntimeError("no free port pair")


def set_serve_port(params_path: Path, port: int) -> None:
    """Rewrite `serve.port` in a copy's params.yaml (comments kept): a copy's endpoint must not collide with a
    server the user runs on the shipped port (seen in CI when a `make run` server was live beside the tests)."""
    text = params_path.read_text(encoding="utf-8")
    section = re.search(r"(?m)^serve:\n", text)
    if section is None:
        raise ValueError(f"{params_path}: no serve section")
    line = re.compile(r"(?m)^(  port:\s*)\d+")
    found = line.search(text, section.end())
    if found is None:
        raise ValueError(f"{params_path}: no serve.port")
    params_path.write_text(text[:found.start()] + f"{found.group(1)}{port}" + text[found.end():], encoding="utf-8")
