"""Running DVC stages from flows: DVC decides what is stale; we report what ran, what was skipped and why."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.config import repo_root
from tasks.common.errors import Busy


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the tail of its output."""


class StageLocked(StageFailed, Busy):
    """DVC's lock is held by a running process; the one-line message names it. Retrying cannot help until that
    process ends, so the flows do not retry this (flows.common.run_stage)."""


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


def _is_dvc(cmdline: list[str]) -> bool:
    """Whether a command line runs DVC (`dvc ...`, `python .../bin/dvc ...`, `python -m dvc ...`), not its
    background daemon (`dvc daemon ...`: analytics and updater, no lock)."""
    head = [Path(arg).name for arg in cmdline[:3]]
    runs = head[:1] == ["dvc"] or head[1:2] == ["dvc"] or cmdline[1:3] == ["-m", "dvc"]
    return runs and "daemon" not in cmdline[:4]


def dvc_processes(root: Path | None = None) -> list[str]:
    """The running DVC commands whose working folder is `root` (default: the project) or inside it, as
    `PID <pid> (<command line>)`; zombies and this process excluded."""
    import psutil

    root = (root or repo_root()).resolve()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE or not _is_dvc(info["cmdline"] or []):
            continue
        cwd = Path(info["cwd"]) if info["cwd"] else None
        if cwd is None or not (cwd == root or root in cwd.parents) or _daemon_waiter(proc):
            continue
        found.append(f"PID {info['pid']} ({' '.join(info['cmdline'])})")
    return found


def _daemon_waiter(proc: Any) -> bool:
    """Whether a DVC process is the fork DVC leaves to wait for its background daemon (it keeps the command line of
    the command that forked it, e.g. `dvc init`, and holds no lock)."""
    import psutil

    try:
        return any("daemon" in child.cmdline()[:4] for child in proc.children())
    except psutil.Error:
        return False


def _holders(lock: Any) -> list[dict[str, Any]]:
    """Every entry of DVC's rwlock (`{"write": {path: info}, "read": {path: [info]}}`, info `{"pid", "cmd"}`);
    raises ValueError when the file does not have that shape."""
    if not isinstance(lock, dict):
        raise ValueError("not a JSON object")
    holders = [*(lock.get("write") or {}).values(),
               *(info for infos in (lock.get("read") or {}).values() for info in infos)]
    for info in holders:
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            raise ValueError(f"entry {info!r} has no integer pid")
    return holders


def release_dead_lock(root: Path | None = None) -> list[str]:
    """Remove DVC's stage lock (`.dvc/tmp/rwlock`) when every process it names has ended, or when it is empty or
    unreadable and no DVC command runs in the project; return what was released (`PID <pid> (<cmd>)` for each
    ended holder, or the one problem of the unreadable file) and say it in one line on stderr.

    A killed `dvc repro` leaves its entries behind. DVC drops entries of PIDs that no longer exist, but a
    killed process whose parent died too stays a zombie where PID 1 does not reap orphans (many containers),
    and DVC then reports the outputs "busy" forever and asks for the file to be removed by hand (issue 15's
    kill-and-rerun case, seen in CI). One killed while DVC rewrites the file leaves it empty, and every DVC
    command then fails on it ("JSON structure is corrupted", dvc issue 7615; issue 22, item 3). A lock with
    any running holder, or an unreadable one while a DVC command runs here, is left alone. The check holds
    DVC's own guard of that file (`rwlock.lock`, taken by every dvc command that edits it), so no entry a
    starting dvc process adds meanwhile is lost, and a file found empty is not one being written.
    """
    from dvc.lock import LockError, make_lock

    root = root or repo_root()
    lock_dir = root / ".dvc" / "tmp"
    path = lock_dir / "rwlock"
    if not path.exists():
        return []
    try:
        with make_lock(str(lock_dir / "rwlock.lock"), tmp_dir=str(lock_dir)):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return []
            try:
                holders = _holders(json.loads(text))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                if dvc_processes(root):
                    return []  # a running DVC command may own it: repro_stage names it if DVC stops on it
                problem = "empty" if not text.strip() else f"unreadable ({exc})"
                path.unlink(missing_ok=True)
                print(f"removed DVC's stage lock {path}: it was {problem}, left by an interrupted dvc command, "
                      "and no dvc command runs here", file=sys.stderr)
                return [f"{problem} lock file"]
            if not holders or any(_running(int(info["pid"])) for info in holders):
                return []
            path.unlink(missing_ok=True)
    except LockError:
        return []  # a dvc command is editing the lock right now: it is alive, leave it to DVC
    ended = sorted({f"PID {info['pid']} ({info.get('cmd', '?')})" for info in holders})
    print(f"removed DVC's stage lock {path}: every process holding it has ended: {', '.join(ended)}",
          file=sys.stderr)
    return ended


_BLOCKER = re.compile(r"\(PID (\d+)\): (.+)")


def lock_holders(output: str, root: Path) -> list[str] | None:
    """When DVC's `output` says it stopped on its lock, the running processes holding it (`PID <pid> (<cmd>)`,
    from DVC's own message, else the DVC commands running in `root`); None when it stopped for another reason
    or nothing holding the lock runs any more (a rerun then gets through)."""
    if "is being blocked by" in output:
        holders = [f"PID {pid} ({cmd.strip()})" for pid, cmd in _BLOCKER.findall(output) if _running(int(pid))]
    elif "Unable to acquire lock" in output or "RWLock-file" in output:
        holders = dvc_processes(root)
    else:
        return None
    return holders or None


def _check_lock(output: str, root: Path, what: str) -> None:
    holders = lock_holders(output, root)
    if holders:
        raise StageLocked(f"{what} not run: DVC's lock in {root / '.dvc' / 'tmp'} is held by a running process: "
                          f"{', '.join(holders)} (wait for it to end, or stop it)")


def stale_stages(root: Path | None = None, *, for_what: str = "dvc status") -> dict[str, list[str]]:
    """Which stages DVC would rerun, and why (`dvc status`), without running anything. Raises StageLocked
    (naming `for_what` as not run) when DVC's lock is held by a running process, StageFailed otherwise."""
    root = root or repo_root()
    release_dead_lock(root)
    proc = subprocess.run([*_dvc(root), "status", "--json"], cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        _check_lock(proc.stdout + proc.stderr, root, for_what)
        raise StageFailed(f"dvc status failed in {root}:\n{proc.stderr[-2000:]}")
    raw = json.loads(proc.stdout or "{}")
    recorded = lock_hashes(root)
    return {
        stage: describe_status(value) if stage in recorded else ["first run"]
        for stage, value in ((key.split(":")[-1], value) for key, value in raw.items())
    }


def repro_stage(stage: str, root: Path | None = None) -> StageResult:
    """`dvc repro <stage>`: runs it (and anything stale upstream) only if its deps, params or outs changed.

    Raises StageLocked (one line naming the holder) when DVC stopped on a lock a running process holds,
    StageFailed with the tail of DVC's output for any other failure."""
    root = root or repo_root()
    changes = stale_stages(root, for_what=f"stage '{stage}'").get(stage, [])
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
        _check_lock("".join(tail), root, f"stage '{stage}'")
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
