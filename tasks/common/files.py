"""File helpers every stage uses: all-or-nothing writes of files and folders, digests, CSV reading.

A failed stage leaves the previous good output untouched, never a half-written file or folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`, renamed onto it only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes it private; the output should read like any other file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(target: str | Path, staging: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside `target` that replaces it only if the block succeeds.

    The old folder is moved aside before the new one is renamed in, and removed only after, so at no
    moment is there a half-written `target`. `staging` fixes the staging folder's path (processes of a
    multi-process save must all write to one known place); by default it is a fresh temporary folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
    else:
        staging = Path(staging)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    staging.chmod(0o755)
    old = target.with_name(f".{target.name}.old")
    try:
        yield staging
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        try:
            staging.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write a whole text file or nothing."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | Path, data: Any) -> None:
    """Write `data` as indented JSON (dates and paths as strings), whole or not at all."""
    write_text_atomic(target, json.dumps(data, indent=2, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of an object's canonical JSON (sorted keys; non-JSON values as their str)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def md5_file(path: str | Path) -> str:
    """Hex md5 of a file, the digest DVC records for a single-file output in dvc.lock."""
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_csv_text(path: str | Path, text: str, columns: tuple[str, ...], empty_problem: str,
                  hint: str | None = None) -> pd.DataFrame:
    """A CSV (given as text) as string columns ('NA' stays text).

    Raises InputError naming `path` and the column when a column is missing, the CSV is malformed,
    or it has no rows (`empty_problem` says what an empty file means to the caller).
    """
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except pd.errors.ParserError as exc:
        raise InputError(path, f"not a valid CSV: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing and len(frame.columns):
        raise InputError(path, f"missing column(s) {missing}; found {list(frame.columns)}", line=1, field=missing[0])
    if frame.empty:
        raise InputError(path, empty_problem, hint=hint)
    return frame


def iter_json_lines(path: str | Path, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file (or of `text` read from it).

    Raises InputError naming the file, the line and the column for a line that is not valid JSON; checking
    each value's shape is the caller's.
    """
    lines = text.splitlines() if text is not None else Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", line=number) from exc


def read_labelled_templates(path: str | Path, columns: tuple[str, ...], *, missing_hint: str,
                            what: str = "templates") -> pd.DataFrame:
    """A parquet of labelled templates with at least `columns`, rows present, `label` 0/1 when it is a column.

    Raises InputError naming the file (and the row, 1-based, and field) when the file is missing (with
    `missing_hint`), unreadable, lacks a column, has no rows or holds a label other than 0/1.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found", hint=missing_hint)
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own types for a truncated or foreign file
        raise InputError(path, f"not a readable parquet file: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}", field=missing[0])
    if frame.empty:
        raise InputError(path, f"no {what}")
    if "label" in frame.columns:
        bad = frame.index[~frame["label"].isin([0, 1])].tolist()
        if bad:
            row = frame.index.get_loc(bad[0]) + 1
            raise InputError(path, f"label {frame.at[bad[0], 'label']} is not 0/1", line=row, field="label")
    return frame
