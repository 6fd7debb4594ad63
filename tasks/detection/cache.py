"""The verdict cache: (system, template) → verdict for one model version and answer settings, in SQLite, stored the
moment it arrives."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from tasks.common.files import sha256_json
from tasks.detection.verdicts import TemplateVerdict

# PRAGMA user_version of the table layout; 2: keyed by system too (issue 21, case 9); 3: neighbour_shown and
# first_stage (issue 20 item 4); 4: rationale_source (issue 19, the served guard) and the no-neighbour rule; 5: that
# rule widened to no_evidence_rule, and labelled_template (tasks.detection.verdicts.apply_verdict_rules)
LAYOUT = 5
COLUMNS = ("model_version", "scope", "template", "dataset", "verdict", "valid", "score", "rationale", "raw",
           "created_at", "neighbour_shown", "first_stage", "rationale_source", "no_evidence_rule",
           "labelled_template")


class CachedVerdict(NamedTuple):
    """What detect writes for a template: the verdict, whether it could be read, its score and rationale, whether a
    labelled neighbour of its system was shown (None: not reported), whether the first stage decided it, and who
    wrote the rationale (`rationale_source`: model | evidence, None without one) and whether a verdict rule decided
    it (`no_evidence_rule`: an alert without evidence made normal; `labelled_template`: the template's own label;
    TemplateVerdict)."""

    verdict: str | None
    valid: bool
    score: float | None
    rationale: str
    neighbour_shown: bool | None = None
    first_stage: bool = False
    rationale_source: str | None = None
    no_evidence_rule: bool = False
    labelled_template: bool = False


def cache_scope(model_version: str, answer_settings: Mapping[str, Any]) -> str:
    """`<model version>/<12 hex digits>`: the version and a digest of the settings that shape its answers.

    `answer_settings` holds what changes a verdict for the same template (the characters of log text the prompt
    keeps, the answer budget, which verdicts get a rationale, the endpoint's threshold and index); values that
    are not JSON types are digested by their `str`.
    """
    return f"{model_version}/{sha256_json(dict(answer_settings))[:12]}"


class VerdictCache:
    """(system, template) → verdict for one `cache_scope`, in SQLite.

    The system (the `dataset` the prompt names: BGL, HDFS, system log...) is part of the key, because the prompt
    names it and the neighbours shown come from it: the same template text from an HDFS run is asked again, not
    served the verdict a BGL run got.

    Only verdicts of the same scope are served: another model version, or another answer setting
    (`detect.max_line_chars`, `max_tokens`, `rationales`, the endpoint's threshold or index) asks every
    template again. On open, entries of other model versions are dropped (`invalidated`); other scopes of
    the same version are kept, so switching a setting back finds its verdicts again.
    A cache file from an older layout (other columns) is emptied and rebuilt: it only saves requests.
    """

    def __init__(self, path: str | Path, model_version: str, answer_settings: Mapping[str, Any]) -> None:
        self.path, self.model_version = Path(path), str(model_version)
        self.scope = cache_scope(self.model_version, answer_settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        found = tuple(row[1] for row in self._db.execute("PRAGMA table_info(verdicts)"))
        layout = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found and (found != COLUMNS or layout != LAYOUT):
            self._db.execute("DROP TABLE verdicts")
        self._db.execute(f"PRAGMA user_version = {LAYOUT}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (model_version TEXT NOT NULL, scope TEXT NOT NULL, "
            "template TEXT NOT NULL, dataset TEXT, verdict TEXT, valid INTEGER, score REAL, rationale TEXT, "
            "raw TEXT, created_at REAL, neighbour_shown INTEGER, first_stage INTEGER, rationale_source TEXT, "
            "no_evidence_rule INTEGER, labelled_template INTEGER, "
            "PRIMARY KEY (scope, dataset, template))"
        )
        self.invalidated = self._db.execute("DELETE FROM verdicts WHERE model_version != ?",
                                            (self.model_version,)).rowcount
        self._db.commit()
        rows = self._db.execute("SELECT dataset, template, verdict, valid, score, rationale, neighbour_shown, "
                                "first_stage, rationale_source, no_evidence_rule, labelled_template FROM verdicts "
                                "WHERE scope = ?",
                                (self.scope,))
        self._memo = {(d, t): CachedVerdict(v, bool(ok), s, r, None if n is None else bool(n), bool(f), src, bool(u),
                                            bool(lt))
                      for d, t, v, ok, s, r, n, f, src, u, lt in rows}

    def get(self, template: str, dataset: str) -> CachedVerdict | None:
        """The cached verdict of a template of system `dataset` in this scope, None when not asked yet."""
        return self._memo.get((dataset, template))

    def put(self, verdict: TemplateVerdict) -> None:
        """Stored and committed at once: this is what survives an endpoint failure."""
        self._db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.model_version, self.scope, verdict.template, verdict.dataset, verdict.verdict, int(verdict.valid),
             verdict.score, verdict.rationale, verdict.raw, time.time(),
             None if verdict.neighbour_shown is None else int(verdict.neighbour_shown), int(verdict.first_stage),
             verdict.rationale_source, int(verdict.no_evidence_rule), int(verdict.labelled_template)),
        )
        self._db.commit()
        self._memo[(verdict.dataset, verdict.template)] = CachedVerdict(
            verdict.verdict, verdict.valid, verdict.score, verdict.rationale, verdict.neighbour_shown,
            verdict.first_stage, verdict.rationale_source, verdict.no_evidence_rule, verdict.labelled_template)

    def __len__(self) -> int:
        return len(self._memo)

    def close(self) -> None:
        """Close the database (every verdict is already committed)."""
        self._db.close()
