"""Artifact integrity: the bytes about to be registered, promoted or served, read again and compared with the md5
their lineage records.

DVC 3 records a file output in dvc.lock as the plain md5 of its bytes (`hash: md5`) and a folder output as
`<md5>.dir`: the md5 of a JSON manifest listing each file's md5 and relative path, stored in the DVC cache under
that name (dvc-data's `Tree`, whose digest `tree_md5` calls). `dvc status` trusts its state database (inode,
mtime, size), so bytes changed in place, e.g. in a cache file linked into the workspace, pass it unseen (DVC
issues 5978, 9641); here every byte is read again. A registered version records the same kind of manifest
(`manifest`) for each folder it stores, so a copy downloaded later is checked file by file (`verify_manifest`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.common.errors import InputError
from tasks.common.files import md5_file


class IntegrityError(InputError):
    """Bytes that differ from the md5 their lineage records: the message names the file, the recorded and the
    found md5, and what to do (an InputError, so every command reports it as one line)."""


@dataclass(frozen=True)
class LockedOut:
    """One output as dvc.lock records it: its stage, path (relative to the project folder) and md5 (`.dir` for
    a folder)."""

    stage: str
    path: str
    md5: str


def tree_md5(files: Mapping[str, str]) -> str:
    """The `<md5>.dir` DVC 3 gives a folder whose files (relative POSIX path → md5) are `files` (dvc-data's
    Tree digest: md5 of the JSON list of {md5, relpath} sorted by path)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for relpath, md5 in files.items():
        tree.add(tuple(relpath.split("/")), None, HashInfo("md5", md5))
    tree.digest()
    return str(tree.hash_info.value)


def folder_md5s(folder: str | Path, ignored: Callable[[str], bool] | None = None) -> dict[str, str]:
    """Relative POSIX path → md5 of every file under `folder`, sorted by path; `ignored(relpath)` drops files
    (DVC's .dvcignore). A single file gives {its name: md5}. Raises FileNotFoundError when `folder` is absent."""
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: md5_file(folder)}
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relpath = path.relative_to(folder).as_posix()
        if ignored is None or not ignored(relpath):
            found[relpath] = md5_file(path)
    return found


def manifest(folder: str | Path) -> dict[str, Any]:
    """What a registered version records of a folder it stores: {"md5": its DVC `.dir` md5, "nfiles", "size"
    (bytes), "files": {relative path: md5}}."""
    files = folder_md5s(folder)
    size = sum((Path(folder) / relpath).stat().st_size for relpath in files)
    return {"md5": tree_md5(files), "nfiles": len(files), "size": size, "files": files}


def _first_difference(recorded: Mapping[str, str], found: Mapping[str, str]) -> tuple[list[str], str]:
    """The differing relative paths, and the first one described (what differs and how)."""
    differing = [p for p in sorted(recorded.keys() | found.keys()) if recorded.get(p) != found.get(p)]
    if not differing:
        return [], ""
    first = differing[0]
    want, got = recorded.get(first), found.get(first)
    if got is None:
        what = f"missing (recorded with md5 {want})"
    elif want is None:
        what = f"is not among the recorded files (md5 {got})"
    else:
        what = f"md5 {got} differs from the recorded {want}"
    if len(differing) > 1:
        what += f"; {len(differing) - 1} other file(s) differ too: {', '.join(differing[1:6])}"
    return differing, what


# ---- dvc.lock ---------------------------------------------------------------------------------------------------


def locked_out(root: Path, path: str | Path) -> LockedOut | None:
    """The dvc.lock output entry for `path` (a file or folder in `root`), None when dvc.lock records none, the path
    is outside `root`, or the entry is not DVC 3's plain md5."""
    lock_file = root / "dvc.lock"
    try:
        relpath = Path(os.path.abspath(Path(path) if Path(path).is_absolute() else root / path)).relative_to(
            os.path.abspath(root)).as_posix()
    except ValueError:
        return None
    if not lock_file.is_file():
        return None
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            if str(out.get("path", "")).rstrip("/") == relpath and out.get("md5") and out.get("hash") == "md5":
                return LockedOut(stage, relpath, str(out["md5"]))
    return None


@contextmanager
def _dvc_repo(root: Path) -> Iterator[Any]:
    """DVC's Repo at `root` (its cache location and .dvcignore), None when `root` is no DVC project."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        yield None
        return
    try:
        yield repo
    finally:
        repo.close()


def _cache_object(repo: Any, md5: str) -> Path | None:
    return Path(repo.cache.local.oid_to_path(md5)) if repo is not None else None


def _cached_manifest(repo: Any, dir_md5: str) -> dict[str, str] | None:
    """The `.dir` manifest in the DVC cache as {relpath: md5}, None when it is absent or does not hash to its
    own name (a damaged manifest cannot name the file)."""
    path = _cache_object(repo, dir_md5)
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
        files = {str(e["relpath"]): str(e["md5"]) for e in entries} if isinstance(entries, list) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if files is not None and tree_md5(files) == dir_md5 else None


def _repair_hint(repo: Any, entry: LockedOut, want: str | None) -> str:
    """What to do: restore from the DVC cache when its copy still has the recorded bytes, else rebuild."""
    rebuild = f"`dvc repro --force --single-item {entry.stage}`"
    if want is None:
        return f"remove it (stage '{entry.stage}' did not write it) or run {rebuild}"
    cached = _cache_object(repo, want)
    if cached is not None and cached.is_file() and md5_file(cached) == want:
        return f"the DVC cache holds the recorded bytes: run `dvc checkout --relink {entry.path}`, then release again"
    where = f"the DVC cache's copy {cached} is damaged too" if cached is not None and cached.is_file() else \
        "the DVC cache has no copy of the recorded bytes"
    return f"{where}: delete it, then `dvc pull {entry.path}` if a remote holds it, else run {rebuild}"


def verify_locked(root: Path, folder: str | Path, path: str | Path | None = None) -> LockedOut | None:
    """Check the bytes of `folder` (a DVC output, or a copy of it) against dvc.lock's record of `path` (default:
    `folder` itself); returns the entry checked, None when dvc.lock records no md5 for it.

    A folder is compared file by file with the `.dir` manifest in the DVC cache (files DVC ignores skipped), or,
    without a readable manifest, as a whole by its `.dir` md5. Raises IntegrityError naming the first file
    (as `<out path>/<file>`) that differs, is missing or is not recorded, with the recorded and found md5 and
    what to do (`dvc checkout --relink <path>` while the DVC cache is intact, else `dvc repro --force
    --single-item <stage>`).
    """
    entry = locked_out(root, path if path is not None else folder)
    if entry is None:
        return None
    folder = Path(folder)
    recorded_as = f"dvc.lock records for {entry.path} (stage '{entry.stage}': {entry.md5})"
    with _dvc_repo(root) as repo:
        if not entry.md5.endswith(".dir"):
            found = md5_file(folder) if folder.is_file() else None
            if found != entry.md5:
                problem = "missing" if found is None else f"md5 {found} differs from what {recorded_as}"
                raise IntegrityError(entry.path, problem, hint=_repair_hint(repo, entry, entry.md5))
            return entry

        def ignored(relpath: str) -> bool:
            return repo is not None and repo.dvcignore.is_ignored_file(str(Path(root, entry.path, relpath)))

        files = folder_md5s(folder, ignored)
        recorded = _cached_manifest(repo, entry.md5)
        if recorded is None:
            found_md5 = tree_md5(files)
            if found_md5 != entry.md5:
                raise IntegrityError(entry.path, f"its files hash to {found_md5}, not the {entry.md5} {recorded_as}; "
                                     "the DVC cache holds no readable manifest to name the file",
                                     hint=f"run `dvc repro --force --single-item {entry.stage}`")
            return entry
        differing, what = _first_difference(recorded, files)
        if differing:
            raise IntegrityError(f"{entry.path}/{differing[0]}", f"{what}; compared with what {recorded_as}",
                                 hint=_repair_hint(repo, entry, recorded.get(differing[0])))
    return entry


# ---- a registered version's own manifest ------------------------------------------------------------------------


def verify_manifest(folder: str | Path, recorded: Mapping[str, Any], *, what: str, hint: str,
                    shown_as: str | None = None) -> None:
    """Check every file of `folder` against `recorded` (a `manifest` written at registration; `what` names it in
    messages, e.g. "rationanomaly v3 adapter", `shown_as` the folder, default its path). The recorded files must
    hash to the recorded md5 (an edited record is caught too). Raises IntegrityError naming the first file that
    differs, is missing or is extra."""
    folder = Path(folder)
    shown = shown_as or str(folder)
    files = {str(k): str(v) for k, v in (recorded.get("files") or {}).items()}
    if tree_md5(files) != recorded.get("md5"):
        raise IntegrityError(shown, f"the manifest of the {what} does not add up to its recorded md5 "
                             f"{recorded.get('md5')} (found {tree_md5(files)})", hint=hint)
    found = folder_md5s(folder) if folder.exists() else {}
    differing, problem = _first_difference(files, found)
    if differing:
        raise IntegrityError(f"{shown}/{differing[0]}", f"{problem}; compared with the {what} as registered "
                             f"({recorded.get('md5')})", hint=hint)
