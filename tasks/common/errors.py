"""Errors that help: each names the file, the line or field, what was expected and what was found."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input to a stage, raised before the expensive part starts.

    The message reads `<file>[:<line>][ field '<field>']: <problem> (<hint>)`; the parts are kept as
    attributes (`file`, `line`, `field`) so callers and tests can check where the problem is.
    """

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


class Busy(RuntimeError):
    """A lock another running process holds (the pipeline's, DVC's): the one-line message names the lock and the
    holder. Waiting for that process is the fix, so it is neither retried nor shown as a traceback."""
