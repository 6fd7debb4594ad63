"""Running DVC stages from flows: DVC decides what is stale; we report what ran, what was skipped and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.config import repo_root


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the tail of its output."""


@dataclass
class StageResult:
    """What one `dvc repro <stage>` did: whether it ran, how long (s), and why (dvc status lines)."""
    stage: str
    ran: bool
    seconds: float
    changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As plain data (Prefect results and artifacts)."""
        return asdict(self)


def _dvc(root: Path) -> list[str]:
    """The dvc executable of this interpreter's environment (works in a venv that is not activated)."""
    candidate = Path(sys.executable).with_name("dvc")
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "dvc"]


def _env() -> dict[str, str]:
    """Stage commands run `python -m tasks.x`: put this interpreter's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def describe_status(status: list[Any]) -> list[str]:
    """Flatten `dvc status --json` entries of one stage into readable change lines."""
    lines: list[str] = []
    for entry in status:
        if isinstance(entry, str):
            lines.append(entry)
            continue
        for kind, changes in entry.items():
            if isinstance(changes, dict):
                for what, paths in changes.items():
                    names = paths if isinstance(paths, list) else [paths] if isinstance(paths, str) else list(paths)
                    lines.append(f"{kind} {what}: {', '.join(map(str, names))}")
            else:
                lines.append(f"{kind}: {changes}")
    return lines


def _running(pid: int) -> bool:
    """Whether a process with this PID runs: a zombie (exited, never reaped) does not; one we may not inspect does."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def release_dead_lock(root: Path | None = None) -> list[str]:
    """Remove DVC's stage lock (`.dvc/tmp/rwlock`) when every process it names has ended; return them.

    A killed `dvc repro` leaves its entries behind. DVC drops entries of PIDs that no longer exist, but a
    killed process whose parent died too stays a zombie where PID 1 does not reap orphans (many containers),
    and DVC then reports the outputs "busy" forever and asks for the file to be removed by hand (issue 15's
    kill-and-rerun case, seen in CI). A lock with any running holder is left alone. The check holds DVC's own
    guard of that file (`rwlock.lock`, taken by every dvc command that edits it), so no entry a starting dvc
    process adds meanwhile is lost.
    """
    from dvc.lock import LockError, make_lock

    lock_dir = (root or repo_root()) / ".dvc" / "tmp"
    path = lock_dir / "rwlock"
    if not path.exists():
        return []
    try:
        with make_lock(str(lock_dir / "rwlock.lock"), tmp_dir=str(lock_dir)):
            try:
                lock = json.loads(path.read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError):
                return []
            holders = [*(lock.get("write") or {}).values(),
                       *(info for infos in (lock.get("read") or {}).values() for info in infos)]
            if not holders or any(_running(int(info["pid"])) for info in holders):
                return []
            path.unlink(missing_ok=True)
    except LockError:
        return []  # a dvc command is editing the lock right now: it is alive, leave it to DVC
    ended = sorted({f"PID {info['pid']} ({info['cmd']})" for info in holders})
    print(f"removed DVC's stage lock {path}: every process holding it has ended: {', '.join(ended)}",
          file=sys.stderr)
    return ended


def stale_stages(root: Path | None = None) -> dict[str, list[str]]:
    """Which stages DVC would rerun, and why (`dvc status`), without running anything."""
    root = root or repo_root()
    release_dead_lock(root)
    proc = subprocess.run([*_dvc(root), "status", "--json"], cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"dvc status failed in {root}:\n{proc.stderr[-2000:]}")
    raw = json.loads(proc.stdout or "{}")
    recorded = lock_hashes(root)
    return {
        stage: describe_status(value) if stage in recorded else ["first run"]
        for stage, value in ((key.split(":")[-1], value) for key, value in raw.items())
    }


def repro_stage(stage: str, root: Path | None = None) -> StageResult:
    """`dvc repro <stage>`: runs it (and anything stale upstream) only if its deps, params or outs changed."""
    root = root or repo_root()
    changes = stale_stages(root).get(stage, [])
    start = time.monotonic()
    proc = subprocess.Popen(
        [*_dvc(root), "repro", stage], cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    tail: list[str] = []
    ran = False
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = [*tail[-60:], line]
        if line.startswith(f"Running stage '{stage}'"):
            ran = True
    if proc.wait() != 0:
        raise StageFailed(f"stage '{stage}' failed (dvc repro exit {proc.returncode}):\n{''.join(tail)}")
    return StageResult(stage=stage, ran=ran, seconds=round(time.monotonic() - start, 2), changes=changes)


def lock_hashes(root: Path | None = None) -> dict[str, dict[str, str]]:
    """md5 of every out recorded in dvc.lock, per stage: the content lineage a model version is tagged with."""
    import yaml

    lock_file = (root or repo_root()) / "dvc.lock"
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    return {
        name: {out["path"]: out.get("md5", "") for out in stage.get("outs", [])}
        for name, stage in (lock.get("stages") or {}).items()
    }
