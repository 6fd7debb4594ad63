"""Reads params.yaml once and applies the selected profile, so every stage sees the same knobs."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
PROFILES = ("smoke", "default", "gpu")


def repo_root() -> Path:
    """The project folder: RATIONANOMALY_ROOT if set, else the current directory (DVC runs stages there)."""
    return Path(os.environ.get("RATIONANOMALY_ROOT", ".")).resolve()


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay` merged in, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in (overlay or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Effective params: the base sections with `profiles[profile]` merged over them."""
    params_path = Path(path) if path else repo_root() / PARAMS_FILE
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{params_path}: params file not found; run from the project folder") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{params_path}: not valid YAML: {exc}") from exc
    profile = raw.get("profile", "default")
    profiles = raw.pop("profiles", {}) or {}
    if profile not in profiles:
        raise ValueError(
            f"{params_path}: field 'profile' is {profile!r}; expected one of {sorted(profiles)} (see 'profiles:')"
        )
    return deep_merge(raw, profiles[profile])


def section(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stage's section of the effective params."""
    params = params if params is not None else load_params()
    if name not in params:
        raise KeyError(f"{PARAMS_FILE}: section '{name}' is missing")
    return params[name]


def set_profile(name: str, path: str | Path | None = None) -> bool:
    """Rewrite the `profile:` line of params.yaml (comments kept); True if it changed.

    The profile is a DVC-tracked param, so switching it makes DVC rerun what it affects.
    """
    params_path = Path(path) if path else repo_root() / PARAMS_FILE
    text = params_path.read_text(encoding="utf-8")
    profiles = (yaml.safe_load(text) or {}).get("profiles", {}) or {}
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}; {params_path} defines {sorted(profiles)}")
    new_text, count = re.subn(r"(?m)^profile:.*$", f"profile: {name}", text, count=1)
    if count == 0:
        new_text = f"profile: {name}\n" + text
    if new_text == text:
        return False
    params_path.write_text(new_text, encoding="utf-8")
    return True


def idle_core_threads() -> int:
    """One thread per core idle right now (CPU use sampled over one second), at least one.

    For "auto" torch threads: on a busy 2-core machine two OpenMP threads spin at every barrier
    (measured here under load: one thread trained 2-4x and generated 5-10x faster than two). Not the
    load average: it remembers the previous pipeline stage for minutes, so on a quiet machine each
    stage would inherit one thread from the stage before it.
    """
    import psutil

    cores = os.cpu_count() or 1
    busy_cores = psutil.cpu_percent(interval=1.0) / 100.0 * cores
    return max(1, min(cores, round(cores - busy_cores)))
