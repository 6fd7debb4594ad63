"""The verdict cache: template → verdict for one model version, in SQLite, stored the moment it arrives."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tasks.detection.verdicts import TemplateVerdict


class VerdictCache:
    """template → verdict for one model version, in SQLite; entries of other versions are dropped on open."""

    def __init__(self, path: str | Path, model_version: str) -> None:
        self.path, self.model_version = Path(path), str(model_version)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (model_version TEXT NOT NULL, template TEXT NOT NULL, "
            "dataset TEXT, verdict TEXT, valid INTEGER, rationale TEXT, raw TEXT, created_at REAL, "
            "PRIMARY KEY (model_version, template))"
        )
        self.invalidated = self._db.execute("DELETE FROM verdicts WHERE model_version != ?",
                                            (self.model_version,)).rowcount
        self._db.commit()
        rows = self._db.execute("SELECT template, verdict, valid, rationale FROM verdicts WHERE model_version = ?",
                                (self.model_version,))
        self._memory = {t: (v, bool(ok), r) for t, v, ok, r in rows}

    def get(self, template: str) -> tuple[str | None, bool, str] | None:
        """(verdict, valid, rationale) of a template for this model version, None when not asked yet."""
        return self._memory.get(template)

    def put(self, verdict: TemplateVerdict) -> None:
        """Stored and committed at once: this is what survives an endpoint failure."""
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.model_version, verdict.template, verdict.dataset, verdict.verdict, int(verdict.valid),
             verdict.rationale, verdict.raw, time.time()),
        )
        self._db.commit()
        self._memory[verdict.template] = (verdict.verdict, verdict.valid, verdict.rationale)

    def __len__(self) -> int:
        return len(self._memory)

    def close(self) -> None:
        self._db.close()
