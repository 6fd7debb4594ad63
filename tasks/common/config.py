"""Where the project is and what params.yaml says, with the selected profile merged in.

`params.yaml` holds every knob; its `profile:` line picks an overlay from `profiles:` that is deep-merged
over the sections. Code reads the result through the typed settings in `tasks.common.settings`; this
module only finds, reads and rewrites the file.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tasks.common.errors import InputError

PARAMS_FILE = "params.yaml"
ROOT_ENV = "RATIONANOMALY_ROOT"


def repo_root() -> Path:
    """The project folder: RATIONANOMALY_ROOT if set, else the current directory (DVC runs stages there)."""
    return Path(os.environ.get(ROOT_ENV, ".")).resolve()


def resolve_path(path: str | Path, root: Path | None = None) -> Path:
    """A path from params.yaml: relative to the project folder (`root`, default `repo_root()`) unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else (root or repo_root()) / path


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay` merged in, recursing into nested dicts (neither input is changed)."""
    merged = copy.deepcopy(base)
    for key, value in (overlay or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_params_file(path: str | Path | None = None) -> dict[str, Any]:
    """params.yaml as written (profiles not applied). Raises InputError when missing or not valid YAML."""
    params_path = Path(path) if path else repo_root() / PARAMS_FILE
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise InputError(params_path, "params file not found", hint="run from the project folder") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(params_path, f"not valid YAML: {exc}", line=mark.line + 1 if mark else None) from exc
    if not isinstance(raw, dict):
        raise InputError(params_path, f"expected a mapping of sections, found {type(raw).__name__}")
    return raw


def merge_profile(raw: dict[str, Any], profile: str | None = None, *, source: str | Path = PARAMS_FILE,
                  ) -> dict[str, Any]:
    """The effective params: the base sections with `profiles[profile]` merged over them.

    `profile` defaults to the file's own `profile:` field. Raises InputError for an unknown profile.
    """
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    name = profile or raw.get("profile", "default")
    if name not in profiles:
        raise InputError(source, f"profile {name!r} is not defined; expected one of {sorted(profiles)}",
                         field="profile", hint="see `profiles:`")
    merged = deep_merge(raw, profiles[name])
    merged["profile"] = name
    return merged


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """The effective params of params.yaml (its own profile applied), as plain data."""
    params_path = Path(path) if path else repo_root() / PARAMS_FILE
    return merge_profile(read_params_file(params_path), source=params_path)


def set_profile(name: str, path: str | Path | None = None) -> bool:
    """Rewrite the `profile:` line of params.yaml (comments kept); True if it changed.

    The profile is a DVC-tracked param, so switching it makes DVC rerun what it affects.
    Raises InputError for a profile the file does not define.
    """
    params_path = Path(path) if path else repo_root() / PARAMS_FILE
    text = params_path.read_text(encoding="utf-8")
    profiles = (yaml.safe_load(text) or {}).get("profiles", {}) or {}
    if name not in profiles:
        raise InputError(params_path, f"unknown profile {name!r}; expected one of {sorted(profiles)}", field="profile")
    new_text, count = re.subn(r"(?m)^profile:.*$", f"profile: {name}", text, count=1)
    if count == 0:
        new_text = f"profile: {name}\n" + text
    if new_text == text:
        return False
    from tasks.common.files import write_text_atomic

    write_text_atomic(params_path, new_text)
    return True


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, a cgroup cpuset) shared among the local processes
    of a data-parallel launch (LOCAL_WORLD_SIZE, set by accelerate/torchrun), at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def idle_core_threads() -> int:
    """One thread per core idle right now (CPU use sampled over one second), at least one.

    The `auto` rule (evaluate's generation uses it): with OpenMP's default policy two threads spin at every barrier
    on a busy 2-core machine (measured here under load: one thread trained 2-4x and generated 5-10x faster than
    two). It decides once, at the start: light background work at that moment gave a whole SFT stage one thread
    (issue 22: 1,379 s against 639 s quiet), so training uses `cores` with sleeping OpenMP threads instead
    (`resolve_threads`). Not the load average: it remembers the previous pipeline stage for minutes.
    """
    import psutil

    cores = os.cpu_count() or 1
    busy_cores = psutil.cpu_percent(interval=1.0) / 100.0 * cores
    return max(1, min(cores, round(cores - busy_cores)))


def resolve_threads(setting: int | str | None) -> int | None:
    """Torch threads for a `torch_threads` setting; None = leave torch's default (returns None).

    - an int: as is (at least 1);
    - "cores": one per core this process may use (`available_cores`), whatever the neighbours do right now.
      The training default, with idle OpenMP threads asleep (OMP_WAIT_POLICY=PASSIVE, set by
      tasks.training.model.set_torch_threads). bench/threads.py on this 2-core machine shared with other jobs
      (load average 2-4), SFT median s/step over 2 rounds, quiet / one busy background core: cores 13.3 / 17.7
      (1.33x); the old `auto` 14.4 / 31.6 (2.2x: one thread against the busy core and the other jobs, 16.3 after
      a busy start); one thread 15.5 / 33.4; two spinning threads 19-69 / 50-94;
    - "auto": one per core idle during a one-second sample at the start (`idle_core_threads`).
    """
    if setting is None:
        return None
    if setting == "cores":
        return available_cores()
    if setting == "auto":
        return idle_core_threads()
    return max(1, int(setting))
