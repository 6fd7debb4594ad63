"""Errors that help: each names the file, the line or field, what was expected and what was found."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class InputError(ValueError):
    """Bad input to a stage, raised before the expensive part starts."""

    def __init__(
        self,
        file: str | Path,
        problem: str,
        *,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = str(file)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f" field '{field}'"
        message = f"{where}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
        self.file, self.line, self.field = str(file), line, field


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`, renamed onto it only if the block succeeds.

    A failed stage therefore leaves the previous good output untouched, never a half-written file.
    """
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
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `target` that replaces it only if the block succeeds.

    The old folder is moved aside before the new one is renamed in, and removed only after,
    so at no moment is there a half-written `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
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


def read_csv_text(path: str | Path, text: str, columns: tuple[str, ...], empty_problem: str,
                  hint: str | None = None) -> pd.DataFrame:
    """A CSV as text columns ('NA' stays text), refused with the file and column named if a column is
    missing, the CSV is malformed or it has no rows."""
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
