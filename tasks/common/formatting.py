"""How numbers read in reports, verdicts and progress lines: one rule for every table the project prints."""

from __future__ import annotations

from typing import Any


def fmt_number(value: Any, digits: int = 3, *, significant: bool = False) -> str:
    """`None` → '—', a float → `digits` decimals (or `digits` significant digits), anything else → its str.

    >>> fmt_number(0.51234), fmt_number(None), fmt_number(12), fmt_number(0.00012345, 3, significant=True)
    ('0.512', '—', '12', '0.000123')
    """
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if significant else f"{value:.{digits}f}"
    return str(value)
