"""Do the rationales explain the log they are about? Two checks on every rationale the candidate wrote.

- component match: the component the rationale names (the first lexicon component found in its text,
  tasks.data.teachers.find_component) is the log's own component (the same lookup on the log). Measured on
  the champion before issue 14: Thunderbird's `kernel time sync` explained as a PowerPC register dump;
- quotes in the log: every fragment the rationale quotes ('...' or "...") occurs in the log, so it never
  cites words the log does not hold.
A rationale that a neighbour shown in the prompt supports may quote that neighbour instead (`sources`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from tasks.data.teachers import find_component

_QUOTE = re.compile(r"'([^']{2,120})'|\"([^\"]{2,200})\"")


def _plain(text: str) -> str:
    return " ".join(text.replace("…", " ").lower().split())


def quotes(rationale: str) -> list[str]:
    """The fragments a rationale quotes, without the ellipsis the teacher appends to a cut quote."""
    found = [(a or b).replace("…", "").strip() for a, b in _QUOTE.findall(rationale)]
    return [fragment for fragment in found if fragment]


def component_matches(rationale: str, log: str, dataset: str) -> bool:
    """The component named in the rationale is the log's own (tasks.data.teachers' lexicon)."""
    return find_component(rationale, dataset).name == find_component(log, dataset).name


def quotes_grounded(rationale: str, sources: Iterable[str]) -> bool:
    """Every quoted fragment occurs in one of `sources` (the log, and any neighbour shown with it)."""
    texts = [_plain(s) for s in sources]
    return all(any(_plain(q) in text for text in texts) for q in quotes(rationale))


def rationale_report(items: Sequence[tuple[str, str, str, Sequence[str]]]) -> dict[str, float | int]:
    """Shares over (rationale, log, dataset, neighbour texts) items with a rationale: component match, quotes in
    the log (or a shown neighbour), both."""
    rows = [(component_matches(r, log, d), quotes_grounded(r, [log, *near])) for r, log, d, near in items if r]
    n = len(rows)
    return {"rationales": n,
            "component_match": sum(c for c, _ in rows) / n if n else 0.0,
            "quotes_in_log": sum(q for _, q in rows) / n if n else 0.0,
            "both": sum(c and q for c, q in rows) / n if n else 0.0}
