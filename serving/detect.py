"""The consumer pipeline: raw log lines → drain3 templates → verdict cache → model calls only for new templates.

Millions of lines share a few thousand templates, so the model is asked once per template and the
answer (verdict, rationale, model version) is kept in SQLite. Each answer is stored the moment it
arrives: when the endpoint goes down, the run stops with a clear error and a rerun resumes from the
cache. Output is JSON lines: a `template` record the first time a template (or its text) appears,
one `line` record per event (a line, or a multi-line record such as a stack trace: `line` is its first
line, `last_line` its last), then one `window` record per `window_lines` events, or, for formats with a
session key (HDFS block ids), one `session` record per session at the end of the input.

Rules for real files, each in its own module: line framing and long lines (serving.framing), multi-line
records and sessions (serving.records), wildcards that stand for values only (serving.drain_rules).
A run may create at most `detect.max_new_templates` new templates; past that it stops before asking the
model, since input where nearly every line is a new template is not a log drain3 can parse.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import sqlite3
import stat
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jsonpickle
from drain3 import TemplateMiner
from drain3.file_persistence import FilePersistence
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

from serving.client import Client, Endpoint, EndpointError, Verdict, endpoint_from_state
from serving.drain_rules import RULES, ValueDrain
from serving.framing import LineFramer, fit_line
from serving.records import SESSION_KEYS, Record, RecordJoiner, Sessions
from tasks.common.config import resolve_path
from tasks.common.errors import InputError
from tasks.common.files import atomic_path
from tasks.common.prompt import ABNORMAL
from tasks.common.settings import DetectSettings, ServeSettings
from tasks.common.tokenizers import special_tokens_in

# Header layouts (LogHub's log formats); only the free-text content is mined and shown to the model.
# The first field of BGL/Spirit/Thunderbird lines is the ground-truth alert tag: it is never sent.
FORMATS: dict[str, tuple[re.Pattern[str] | None, str]] = {
    "bgl": (re.compile(r"^\S+ \d+ \d{4}\.\d\d\.\d\d \S+ \d{4}-\d\d-\d\d-\d\d\.\d\d\.\d\d\.\d+ \S+ \S+ \S+ \S+ ?"
                       r"(?P<content>.*)$"), "bgl"),
    "thunderbird": (re.compile(r"^\S+ \d+ \d{4}\.\d\d\.\d\d \S+ \w{3} +\d+ [\d:]+ \S+ [^:\s]+(?:\[\d+\])?: ?"
                               r"(?P<content>.*)$"), "thunderbird"),
    "spirit": (re.compile(r"^\S+ \d+ \d{4}\.\d\d\.\d\d \S+ \w{3} +\d+ [\d:]+ \S+ [^:\s]+(?:\[\d+\])?: ?"
                          r"(?P<content>.*)$"), "spirit"),
    "hdfs": (re.compile(r"^\d{6} \d{6} \d+ \w+ [^:\s]+: ?(?P<content>.*)$"), "hdfs"),
    "generic": (None, "system log"),
}
SESSION_FORMATS = tuple(SESSION_KEYS)  # formats reported per session (serving.records), not per window
AUTO_ORDER = ("bgl", "thunderbird", "hdfs")  # Spirit lines share Thunderbird's layout: name it explicitly
_B, _E = r"((?<=[^A-Za-z0-9])|^)", r"((?=[^A-Za-z0-9])|$)"
MASKS = (  # order matters: an IP or hex value must be masked before its digits are
    _B + r"(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(:\d+)?)" + _E,
    _B + r"(0x[0-9a-fA-F]+)" + _E,
    _B + r"([0-9a-fA-F]{8,})" + _E,
    _B + r"([\-\+]?\d+)" + _E,
)


def detect_format(lines: Iterable[str]) -> str:
    """The layout most of the first non-empty lines match; `generic` when none fits."""
    votes: Counter[str] = Counter()
    for text in lines:
        for name in AUTO_ORDER:
            pattern = FORMATS[name][0]
            if pattern is not None and pattern.match(text):
                votes[name] += 1
                break
    return votes.most_common(1)[0][0] if votes else "generic"


# ---------------------------------------------------------------- drain3 with checkpointed persistence


class _AtomicFilePersistence(FilePersistence):
    """drain3's FilePersistence, written all-or-nothing so a crash cannot leave a half-written state."""

    def save_state(self, state: bytes) -> None:
        with atomic_path(self.file_path) as tmp:
            tmp.write_bytes(state)


class _CheckpointMiner(TemplateMiner):
    """TemplateMiner that snapshots at checkpoints (end of each chunk) instead of on every new cluster.

    Its Drain is serving.drain_rules.ValueDrain (wildcards for values only, drain3 0.9.3's short-template
    fix). A saved state mined under other rules is not reused: the miner starts afresh and says so in
    `state_reset` (template ids restart; verdicts stay cached by template text).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.dirty = False
        self.state_reset: str | None = None
        super().__init__(*args, **kwargs)
        if not isinstance(self.drain, ValueDrain):
            config = self.config
            self.drain = ValueDrain(sim_th=config.drain_sim_th, depth=config.drain_depth,
                                    max_children=config.drain_max_children, max_clusters=config.drain_max_clusters,
                                    extra_delimiters=config.drain_extra_delimiters, profiler=self.profiler)

    def load_state(self) -> None:
        """drain3 0.9.1's load_state renames dict keys while iterating them (a RuntimeError on Python 3.11)."""
        state = self.persistence_handler.load_state()
        if state is None:
            return
        if self.config.snapshot_compress_state:
            state = zlib.decompress(base64.b64decode(state))
        drain = jsonpickle.loads(state)
        if not isinstance(drain, ValueDrain) or getattr(drain, "rules", None) != RULES:
            self.state_reset = (f"{getattr(self.persistence_handler, 'file_path', 'drain state')} was mined under "
                                f"older template rules; templates are mined afresh under {RULES}")
            return
        drain.id_to_cluster = {int(key): cluster for key, cluster in drain.id_to_cluster.items()}
        drain.profiler = self.profiler
        self.drain = drain

    def get_snapshot_reason(self, change_type: str, cluster_id: int) -> str | None:
        self.dirty = self.dirty or change_type != "none"
        return None

    def checkpoint(self) -> None:
        if self.dirty and self.persistence_handler is not None:
            self.save_state("checkpoint")
            self.dirty = False


def make_miner(state_file: Path | None, sim_th: float = 0.4, depth: int = 4) -> _CheckpointMiner:
    """A drain3 miner with the project's masks (values become `<*>`), checkpointed to `state_file` when given."""
    config = TemplateMinerConfig()
    config.drain_sim_th, config.drain_depth = sim_th, depth
    config.masking_instructions = [MaskingInstruction(pattern, "*") for pattern in MASKS]  # masks read "<*>"
    persistence = None
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        persistence = _AtomicFilePersistence(str(state_file))
    return _CheckpointMiner(persistence, config)


# ---------------------------------------------------------------- verdict cache


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

    def put(self, verdict: Verdict) -> None:
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


# ---------------------------------------------------------------- the detector


def default_endpoint(settings: DetectSettings, serve: ServeSettings, model_name: str, base_model_dir: str,
                     ) -> Endpoint | Callable[[], Endpoint]:
    """detect.base_url when set (a remote endpoint serving `detect.model`, default the registered `model_name`),
    else the live server of serve.state_file, re-read before every retry (follows a blue/green switch).

    For base_url the served tokenizer's special tokens are read from detect.tokenizer_dir (null: the project's
    base model folder `base_model_dir`); a folder without tokenizer files leaves the generic `<|...|>` rule.
    """
    key_env = serve.api_key_env
    if settings.base_url:
        tokenizer_dir = settings.tokenizer_dir or base_model_dir
        return Endpoint(settings.base_url.rstrip("/"), settings.model or model_name,
                        settings.model_version or "unknown", os.environ.get(key_env) if key_env else None,
                        special_tokens_in(resolve_path(tokenizer_dir)))
    state_file = resolve_path(serve.state_file)
    return lambda: endpoint_from_state(state_file, key_env)


@dataclass
class DetectStats:
    """Counters of one detect run (lines, windows, templates, requests), reported in its summary."""
    lines: int = 0
    empty_lines: int = 0
    invalid_utf8_lines: int = 0
    replaced_chars: int = 0
    truncated_lines: int = 0
    continuation_lines: int = 0  # lines joined to the event before them (stack-trace frames, ...)
    abnormal_lines: int = 0
    invalid_answer_lines: int = 0
    windows: int = 0
    abnormal_windows: int = 0
    sessions: int = 0
    abnormal_sessions: int = 0
    unsessioned_lines: int = 0  # events of a session format that name no session
    templates: int = 0
    new_templates: int = 0
    requested: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    line_counts: Counter[int] = field(default_factory=Counter)


class Detector:
    """Raw lines in, JSON-lines verdicts out, configured by the `detect` settings.

    `endpoint` (or a ready `client`) says where the model answers: build it with `default_endpoint`.
    """

    def __init__(self, settings: DetectSettings, *, client: Client | None = None,
                 endpoint: Endpoint | Callable[[], Endpoint] | None = None, model_version: str | None = None,
                 progress: bool = True) -> None:
        self.settings = settings
        if client is None:
            if endpoint is None:
                raise ValueError("Detector needs an endpoint or a client (see serving.detect.default_endpoint)")
            client = Client(endpoint, concurrency=settings.concurrency, max_retries=settings.max_retries,
                            backoff_s=settings.backoff_s, timeout_s=settings.timeout_s,
                            max_tokens=int(settings.max_tokens),  # type: ignore[arg-type]  # resolved by Settings
                            max_log_chars=settings.max_line_chars)
        self.client = client
        self.model_version = str(model_version or settings.model_version or client.endpoint().version)
        self.cache = VerdictCache(resolve_path(settings.cache_file), self.model_version)
        self.miner = make_miner(resolve_path(settings.drain_state) if settings.drain_state else None,
                                settings.drain_sim_th, settings.drain_depth)
        self.progress = progress
        self._memo: dict[str, int] = {}
        self._memo_size = settings.memo_size
        self._emitted: dict[int, str] = {}  # cluster id → template text last written (one run)
        self._clusters_at_start = self.miner.drain.clusters_counter  # reset per run: the template budget

    def close(self) -> None:
        self.miner.checkpoint()
        self.cache.close()
        self.client.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    @staticmethod
    def _chunks(handle: IO[bytes], size: int, flush_s: float,
                max_bytes: int) -> Iterator[list[tuple[int, bytes, bytes | None]]]:
        """(line number, head bytes, tail bytes or None) in chunks of `size` lines, framed by LineFramer.

        On a pipe or terminal (`tail -f app.log | rationanomaly detect -`) a partial chunk is also
        released after `flush_s` seconds without input, so verdicts do not wait for 5,000 more lines.
        """
        try:
            fd: int | None = handle.fileno()
            stream = not stat.S_ISREG(os.fstat(fd).st_mode)
        except (OSError, AttributeError, io.UnsupportedOperation):
            fd, stream = None, False
        read = (lambda: os.read(fd, 1 << 16)) if stream and fd is not None else (lambda: handle.read(1 << 20))
        chunk: list[tuple[int, bytes, bytes | None]] = []
        framer, number = LineFramer(max_bytes), 0
        while True:
            if stream and chunk and not select.select([fd], [], [], flush_s)[0]:
                yield chunk
                chunk = []
                continue
            block = read()
            if not block:
                break
            for head, tail in framer.feed(block):
                number += 1
                chunk.append((number, head, tail))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
        for head, tail in framer.finish():
            chunk.append((number + 1, head, tail))
        if chunk:
            yield chunk

    def _cluster_id(self, content: str) -> int:
        """drain3 cluster of a line; identical content is memoised (drain would return the same cluster)."""
        cid = self._memo.get(content)
        if cid is None:
            cid = self.miner.add_log_message(content)["cluster_id"]
            if self._memo_size > 0:
                if len(self._memo) >= self._memo_size:
                    self._memo.clear()
                self._memo[content] = cid
        return cid

    # -- classification

    def _classify(self, templates: dict[str, str], stats: DetectStats) -> None:
        """Ask the endpoint about templates the cache lacks; each answer is stored as it arrives."""
        missing = [(dataset, t) for t, dataset in templates.items() if self.cache.get(t) is None]
        stats.cache_hits += len(templates) - len(missing)
        if not missing:
            return

        def store(verdict: Verdict) -> None:
            if verdict.model_version != self.model_version:
                raise EndpointError(f"the live model changed from version {self.model_version} to "
                                    f"{verdict.model_version} during the run; rerun to use the new model "
                                    "(its cache starts empty)")
            self.cache.put(verdict)
            stats.requested += 1

        batch = self.settings.batch_size
        try:
            for start in range(0, len(missing), batch):
                self.client.classify(missing[start:start + batch], on_result=store)
        except EndpointError as exc:
            raise EndpointError(f"{exc}. {len(self.cache)} template verdicts are kept in {self.cache.path}; "
                                "rerun the same command to resume") from exc

    # -- the run

    def run(self, source: str | Path | IO[bytes], out: IO[str], fmt: str = "auto") -> dict[str, Any]:
        """Detect on a file path, '-' (stdin) or a binary handle; write JSON lines to `out`; return the summary."""
        stats = DetectStats()
        started = time.perf_counter()
        if isinstance(source, str | Path) and str(source) != "-":
            path = Path(source)
            if not path.is_file():
                raise InputError(path, "log file not found")
            with path.open("rb") as handle:
                self._run(handle, out, fmt, stats, path.stat().st_size, str(path))
        else:
            handle = sys.stdin.buffer if str(source) == "-" else source
            self._run(handle, out, fmt, stats, None, "stdin")  # type: ignore[arg-type]
        stats.seconds = time.perf_counter() - started
        return self.summary(stats)

    @staticmethod
    def _text(raw: bytes, stats: DetectStats) -> tuple[str, bool]:
        """UTF-8 with bad bytes replaced (and counted); whether any were."""
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            stats.replaced_chars += text.count("\ufffd") - raw.count("\ufffd".encode())
            return text, True

    def _decode(self, raw: bytes, tail: bytes | None, stats: DetectStats) -> str | None:
        """A line's text, fitted to max_line_chars before mining (serving.framing.fit_line); None when empty.

        `tail` is the end of a line the reader cut (longer than its byte bound), None for a whole line.
        """
        text, bad = self._text(raw, stats)
        tail_text = None
        if tail is not None:
            tail_text, bad_tail = self._text(tail, stats)
            bad = bad or bad_tail
        stats.invalid_utf8_lines += bad
        if tail_text is None and not text.strip():
            stats.empty_lines += 1
            return None
        text, cut = fit_line(text, self.settings.max_line_chars, tail_text)  # a 1 MB line is no template
        stats.truncated_lines += cut
        return text

    def _mine(self, chunk: list[tuple[int, bytes, bytes | None]], joiner: RecordJoiner, final: bool,
              stats: DetectStats) -> list[tuple[Record, int]]:
        """(event, cluster id) for each event the chunk completes; `final` also closes the open event."""
        records = []
        for number, raw, tail in chunk:
            text = self._decode(raw, tail, stats)
            if text is None:
                continue
            closed = joiner.add(number, text)
            if closed is not None:
                records.append(closed)
        if final and (closed := joiner.flush()) is not None:
            records.append(closed)
        stats.continuation_lines = joiner.continuation_lines
        return [(record, self._cluster_id(joiner.text(record))) for record in records]

    def _check_template_budget(self, name: str, events: int, stats: DetectStats) -> None:
        """Stop before asking the model when this run created more than detect.max_new_templates templates."""
        budget = self.settings.max_new_templates
        stats.new_templates = self.miner.drain.clusters_counter - self._clusters_at_start
        if stats.new_templates <= budget:
            return
        self.miner.dirty = False  # keep the saved drain state of the last good chunk, not these templates
        unparseable = stats.new_templates >= events / 2
        raise InputError(
            name,
            f"{stats.new_templates} new templates from {events} events exceed detect.max_new_templates={budget}"
            + ("; nearly every line is a new template, so this input does not look like a log drain3 can "
               "parse (JSON lines, binary data, or the wrong --format?)" if unparseable else ""),
            hint="no model call was made for them; check the input, or raise detect.max_new_templates when a "
                 "new system really has this many templates",
        )

    def _run(self, handle: IO[bytes], out: IO[str], fmt: str, stats: DetectStats, size: int | None,
             name: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        if fmt != "auto" and fmt not in FORMATS:
            raise InputError(name, f"unknown log format {fmt!r}", hint=f"one of auto, {', '.join(FORMATS)}")
        window_lines = self.settings.window_lines
        window: list[int] = [0, 0, 0]  # first line, events, abnormal events
        window_templates: Counter[int] = Counter()
        emitted = self._emitted
        joiner: RecordJoiner | None = None
        sessions: Sessions | None = None
        self._clusters_at_start = self.miner.drain.clusters_counter
        chunk_lines = self.settings.chunk_lines
        max_chars = self.settings.max_line_chars
        progress = Progress(TextColumn("detect"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                            transient=True, disable=not self.progress or size is None)
        task = progress.add_task(name, total=size)
        write = out.write
        try:
            with progress:
                # 4 bytes per character at most in UTF-8: a line's kept head holds max_line_chars characters
                chunks = self._chunks(handle, chunk_lines, self.settings.flush_s, 4 * max_chars)
                for chunk in chunks:
                    if fmt == "auto":
                        sample = (raw.decode("utf-8", errors="replace").strip() for _, raw, _ in chunk[:200])
                        fmt = detect_format(line for line in sample if line)
                    pattern, dataset = FORMATS[fmt]
                    if joiner is None:
                        joiner = RecordJoiner(fmt, pattern, self.settings.max_record_lines, max_chars)
                        if fmt in SESSION_FORMATS:
                            sessions = Sessions(self.settings.max_open_sessions)
                    # a short chunk is the end of the input or a pause on a pipe: close the open event
                    parsed = self._mine(chunk, joiner, len(chunk) < chunk_lines, stats)
                    self._check_template_budget(name, stats.lines + len(parsed), stats)
                    self._write_events(parsed, dataset, write, stats, window, window_templates, sessions,
                                       window_lines)
                    out.flush()
                    progress.update(task, advance=sum(len(raw) + len(tail or b"") for _, raw, tail in chunk))
                if joiner is not None and (last := joiner.flush()) is not None:
                    self._write_events([(last, self._cluster_id(joiner.text(last)))], dataset, write, stats, window,
                                       window_templates, sessions, window_lines)
                if window[1]:
                    self._emit_window(write, window, window_templates, None, stats)
                for record in sessions.close() if sessions is not None else []:
                    self._emit_session(write, record, stats)
                stats.templates = len(emitted)
                stats.new_templates = self.miner.drain.clusters_counter - self._clusters_at_start
        finally:
            out.flush()

    def _write_events(self, parsed: list[tuple[Record, int]], dataset: str, write: Any, stats: DetectStats,
                      window: list[int], window_templates: Counter[int], sessions: Sessions | None,
                      window_lines: int) -> None:
        """Classify the events' new templates, then write template, line and window/session records."""
        emitted = self._emitted
        clusters = self.miner.drain.id_to_cluster
        templates = {cid: clusters[cid].get_template() for cid in {cid for _, cid in parsed}}
        try:
            self._classify({t: dataset for t in templates.values()}, stats)
        finally:
            self.miner.checkpoint()
        verdict_of = {}
        for cid, template in templates.items():
            verdict, valid, rationale = self.cache.get(template)  # type: ignore[misc]
            verdict_of[cid] = (verdict if valid else "invalid", verdict == ABNORMAL, valid)
            if emitted.get(cid) != template:
                emitted[cid] = template
                write(json.dumps({"kind": "template", "template_id": cid, "template": template,
                                  "verdict": verdict_of[cid][0], "rationale": rationale,
                                  "dataset": dataset, "model_version": self.model_version}) + "\n")
        for record, cid in parsed:
            label, abnormal, valid = verdict_of[cid]
            number, last = record.first, record.last
            stats.lines += 1
            stats.line_counts[cid] += 1
            stats.abnormal_lines += abnormal
            stats.invalid_answer_lines += not valid
            if last == number:
                write(f'{{"kind":"line","line":{number},"template_id":{cid},"verdict":"{label}"}}\n')
            else:
                write(f'{{"kind":"line","line":{number},"last_line":{last},"template_id":{cid},'
                      f'"verdict":"{label}"}}\n')
            if sessions is not None:
                if not record.keys:
                    stats.unsessioned_lines += 1
                for evicted in sessions.add(record.keys, number, last, cid, abnormal):
                    self._emit_session(write, evicted, stats)
                continue
            if window[1] == 0:
                window[0] = number
            window[1] += 1
            if abnormal:
                window[2] += 1
                window_templates[cid] += 1
            if window[1] >= window_lines:
                self._emit_window(write, window, window_templates, last, stats)
        stats.templates = len(emitted)

    @staticmethod
    def _emit_session(write: Any, record: dict[str, Any], stats: DetectStats) -> None:
        stats.sessions += 1
        stats.abnormal_sessions += record["verdict"] == ABNORMAL
        write(json.dumps(record) + "\n")

    def _emit_window(self, write: Any, window: list[int], templates: Counter[int], last: int | None,
                     stats: DetectStats) -> None:
        stats.windows += 1
        stats.abnormal_windows += window[2] > 0
        write(json.dumps({"kind": "window", "index": stats.windows, "first_line": window[0], "last_line": last,
                          "lines": window[1], "abnormal_lines": window[2],
                          "verdict": ABNORMAL if window[2] else "normal",
                          "abnormal_templates": dict(templates.most_common())}) + "\n")
        window[:] = [0, 0, 0]
        templates.clear()

    def summary(self, stats: DetectStats) -> dict[str, Any]:
        """Counts and the top anomalous templates with their rationales."""
        top = []
        for cid, count in stats.line_counts.most_common():
            template = self._emitted.get(cid)
            cached = self.cache.get(template) if template is not None else None
            if cached and cached[0] == ABNORMAL:
                top.append({"template_id": cid, "template": template, "lines": count, "rationale": cached[2]})
            if len(top) >= self.settings.top_k:
                break
        counts = {k: v for k, v in vars(stats).items() if k != "line_counts"}
        counts["seconds"] = round(stats.seconds, 3)
        counts["lines_per_s"] = round(stats.lines / stats.seconds, 1) if stats.seconds else None
        return {"kind": "summary", "model_version": self.model_version, **counts,
                "cache_entries": len(self.cache), "cache_invalidated": self.cache.invalidated,
                "drain_state_reset": self.miner.state_reset, "top_anomalous": top}


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """A rich table for people: counts, then the top anomalous templates with rationales."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    counts = Table(title=f"detect summary (model version {summary['model_version']})", show_header=False)
    for key in ("lines", "abnormal_lines", "windows", "abnormal_windows", "sessions", "abnormal_sessions",
                "templates", "new_templates", "requested", "cache_hits", "invalid_answer_lines", "empty_lines",
                "invalid_utf8_lines", "truncated_lines", "continuation_lines", "unsessioned_lines", "seconds",
                "lines_per_s"):
        counts.add_row(key, str(summary.get(key)))
    console.print(counts)
    if summary.get("drain_state_reset"):
        console.print(f"note: {summary['drain_state_reset']}")
    if summary["top_anomalous"]:
        top = Table(title="top anomalous templates")
        for column in ("lines", "template", "rationale"):
            top.add_column(column, overflow="fold")
        for row in summary["top_anomalous"]:
            top.add_row(str(row["lines"]), row["template"], row["rationale"])
        console.print(top)
