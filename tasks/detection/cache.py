"""The verdict cache: template → verdict for one model version, in SQLite, stored the moment it arrives."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

from tasks.detection.verdicts import TemplateVerdict

COLUMNS = ("model_version", "template", "dataset", "verdict", "valid", "score", "rationale", "raw", "created_at")


class CachedVerdict(NamedTuple):
    """What detect writes for a template: the verdict, whether it could be read, its score and rationale."""

    verdict: str | None
    valid: bool
    score: float | None
    rationale: str


class VerdictCache:
    """template → verdict for one model version, in SQLite; entries of other versions are dropped on open.

    A cache file from an older layout (other columns) is emptied and rebuilt: it only saves requests.
    """

    def __init__(self, path: str | Path, model_version: str) -> None:
        self.path, self.model_version = Path(path), str(model_version)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        found = tuple(row[1] for row in self._db.execute("PRAGMA table_info(verdicts)"))
        if found and found != COLUMNS:
            self._db.execute("DROP TABLE verdicts")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (model_version TEXT NOT NULL, template TEXT NOT NULL, "
            "dataset TEXT, verdict TEXT, valid INTEGER, score REAL, rationale TEXT, raw TEXT, created_at REAL, "
            "PRIMARY KEY (model_version, template))"
        )
        self.invalidated = self._db.execute("DELETE FROM verdicts WHERE model_version != ?",
                                            (self.model_version,)).rowcount
        self._db.commit()
        rows = self._db.execute("SELECT template, verdict, valid, score, rationale FROM verdicts "
                                "WHERE model_version = ?", (self.model_version,))
        self._memory = {t: CachedVerdict(v, bool(ok), s, r) for t, v, ok, s, r in rows}

    def get(self, template: str) -> CachedVerdict | None:
        """The cached verdict of a template for this model version, None when not asked yet."""
        return self._memory.get(template)

    def put(self, verdict: TemplateVerdict) -> None:
        """Stored and committed at once: this is what survives an endpoint failure."""
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.model_version, verdict.template, verdict.dataset, verdict.verdict, int(verdict.valid),
             verdict.score, verdict.rationale, verdict.raw, time.time()),
        )
        self._db.commit()
        self._memory[verdict.template] = CachedVerdict(verdict.verdict, verdict.valid, verdict.score,
                                                       verdict.rationale)

    def __len__(self) -> int:
        return len(self._memory)

    def close(self) -> None:
        """Close the database (every verdict is already committed)."""
        self._db.close()
