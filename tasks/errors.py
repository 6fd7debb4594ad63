"""Errors that help: each names the file, the line or field, what was expected and what was found."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write a whole text file or nothing."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
