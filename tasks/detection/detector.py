"""The detector: raw lines in, JSON-lines verdicts out (see tasks/detection/__init__.py for the rules).

Millions of lines share a few thousand templates, so the classifier is asked once per template and the
answer (verdict, rationale, model version) is kept in SQLite. Each answer is stored the moment it
arrives: when the classifier fails, the run stops with a clear error and a rerun resumes from the
cache. Output is JSON lines: a `template` record the first time a template (or its text) appears (with its
verdict, score, rationale, the endpoint's threshold, an example line, `neighbour_shown`: whether a labelled
neighbour of its system was in the prompt, and `first_stage`; issue 20 item 4),
one `line` record per event (a line, or a multi-line record such as a stack trace: `line` is its first
line, `last_line` its last), then one `window` record per `window_lines` events, or, for formats with a
session key (HDFS block ids), one `session` record per session at the end of the input.
A run may create at most `detect.max_new_templates` new templates; past that it stops before asking the
classifier, since input where nearly every line is a new template is not a log drain3 can parse.
"""

from __future__ import annotations

import json
import select
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tasks.common.config import resolve_path
from tasks.common.errors import InputError
from tasks.common.prompt import ABNORMAL
from tasks.common.settings import DetectSettings
from tasks.detection.cache import VerdictCache
from tasks.detection.envelopes import ENVELOPES, Unwrapper
from tasks.detection.formats import FORMATS, SESSION_FORMATS, detect_format
from tasks.detection.framing import LineFramer, fit_line, strip_terminal_escapes
from tasks.detection.miner import hold_drain_state, make_miner
from tasks.detection.outcomes import keep_outcomes
from tasks.detection.records import Record, RecordJoiner, Sessions
from tasks.detection.sources import Source, open_source
from tasks.detection.verdicts import Classifier, ClassifierError, TemplateVerdict


@dataclass
class DetectStats:
    """Counters of one detect run (lines, windows, templates, requests), reported in its summary."""
    lines: int = 0
    empty_lines: int = 0
    invalid_utf8_lines: int = 0
    replaced_chars: int = 0
    truncated_lines: int = 0
    escape_lines: int = 0  # lines that held terminal escapes (colour codes), stripped before mining
    nul_bytes: int = 0  # NUL bytes dropped from text lines
    unparsed_envelope_lines: int = 0  # container/journald lines that did not parse as their envelope
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
    format: str = ""  # the format the input was read as (auto-detection's vote, or --format)
    decoded_as: str = ""  # what was undone before reading: compression and text encoding (tasks.detection.sources)
    line_counts: Counter[int] = field(default_factory=Counter)


AUTO_SAMPLE = 200  # non-empty lines the format vote reads (--format auto)
EXAMPLE_CHARS = 500  # characters of a template's example line (its first event's content) in its record
EXPORT_COMMAND = "rationanomaly review export"  # what labels the templates a run did not know (issue 20 item 1)
# detect settings that change the verdict of one template under one model version: they scope the cache
ANSWER_SETTINGS = ("max_line_chars", "max_tokens", "rationales")


class Detector:
    """Raw lines in, JSON-lines verdicts out, configured by the `detect` settings.

    `client` answers for templates the cache lacks (tasks.detection.verdicts.Classifier: the HTTP client of the
    live endpoint, serving.client.Client, or the candidate in-process for evaluation); the detector closes it.
    """

    def __init__(self, settings: DetectSettings, client: Classifier, *, model_version: str | None = None,
                 progress: bool = True, answer_scope: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.client = client
        self.model_version = str(model_version or settings.model_version or client.model_version())
        self.threshold = (answer_scope or {}).get("threshold")  # the endpoint's, written in each template record
        # the cache serves a verdict only under the same version, answer settings and `answer_scope` (what the
        # client knows decides answers: the endpoint's threshold, index and neighbour count)
        scope = {key: getattr(settings, key) for key in ANSWER_SETTINGS} | dict(answer_scope or {})
        state_file = resolve_path(settings.drain_state) if settings.drain_state else None
        self._state_lock = hold_drain_state(state_file) if state_file is not None else None
        try:
            self.cache = VerdictCache(resolve_path(settings.cache_file), self.model_version, scope)
            self.miner = make_miner(state_file, settings.drain_sim_th, settings.drain_depth)
        except BaseException:
            self._release_state()
            raise
        self.progress = progress
        self._memo: dict[str, int] = {}
        self._memo_size = settings.memo_size
        self._emitted: dict[int, tuple[str, str]] = {}  # cluster id → (template text, system) last written
        self._clusters_at_start = self.miner.drain.clusters_counter  # reset per run: the template budget

    def close(self) -> None:
        try:
            self.miner.checkpoint()
            self.cache.close()
            self.client.close()
        finally:
            self._release_state()

    def _release_state(self) -> None:
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    @staticmethod
    def _chunks(source: Source, size: int, flush_s: float,
                max_bytes: int) -> Iterator[list[tuple[int, bytes, bytes | None]]]:
        """(line number, head bytes, tail bytes or None) in chunks of `size` lines, framed by LineFramer.

        On a pipe or terminal (`tail -f app.log | rationanomaly detect -`) a partial chunk is also
        released after `flush_s` seconds without input, so verdicts do not wait for 5,000 more lines.
        When the input breaks (a truncated compressed file), the lines before the break are yielded, then
        the InputError is raised: nothing read is lost.
        """
        fd = source.fd
        chunk: list[tuple[int, bytes, bytes | None]] = []
        framer, number = LineFramer(max_bytes), 0
        broken: InputError | None = None
        while True:
            if fd is not None and chunk and not select.select([fd], [], [], flush_s)[0]:
                yield chunk
                chunk = []
                continue
            try:
                block = source.read()
            except InputError as exc:
                broken = exc
                break
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
        if broken is not None:
            raise broken

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
        missing = [(dataset, t) for t, dataset in templates.items() if self.cache.get(t, dataset) is None]
        stats.cache_hits += len(templates) - len(missing)
        if not missing:
            return

        def store(verdict: TemplateVerdict) -> None:
            if verdict.model_version != self.model_version:
                raise ClassifierError(f"the live model changed from version {self.model_version} to "
                                    f"{verdict.model_version} during the run; rerun to use the new model "
                                    "(its cache starts empty)")
            self.cache.put(verdict)
            stats.requested += 1

        batch = self.settings.batch_size
        try:
            for start in range(0, len(missing), batch):
                self.client.classify(missing[start:start + batch], on_result=store)
        except ClassifierError as exc:  # same type (an endpoint failure stays one), with how to resume
            raise type(exc)(f"{exc}. {len(self.cache)} template verdicts are kept in {self.cache.path}; "
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
                self._run(open_source(handle, str(path)), out, fmt, stats, path.stat().st_size)
        else:
            handle = sys.stdin.buffer if str(source) == "-" else source
            self._run(open_source(handle, "stdin"), out, fmt, stats, None)  # type: ignore[arg-type]
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
        """A line's text, fitted to max_line_chars before mining (tasks.detection.framing.fit_line); None when empty.

        `tail` is the end of a line the reader cut (longer than its byte bound), None for a whole line.
        """
        text, bad = self._text(raw, stats)
        tail_text = None
        if tail is not None:
            tail_text, bad_tail = self._text(tail, stats)
            bad = bad or bad_tail
        stats.invalid_utf8_lines += bad
        if "\x00" in text or (tail_text and "\x00" in tail_text):
            stats.nul_bytes += text.count("\x00") + (tail_text or "").count("\x00")
            text, tail_text = text.replace("\x00", ""), tail_text.replace("\x00", "") if tail_text else tail_text
        if "\x1b" in text or (tail_text and "\x1b" in tail_text):  # colour codes would glue digits to words
            stats.escape_lines += 1
            text = strip_terminal_escapes(text)
            tail_text = strip_terminal_escapes(tail_text) if tail_text else tail_text
        if tail_text is None and not text.strip():
            stats.empty_lines += 1
            return None
        text, cut = fit_line(text, self.settings.max_line_chars, tail_text)  # a 1 MB line is no template
        stats.truncated_lines += cut
        return text

    def _mine(self, chunk: list[tuple[int, bytes, bytes | None]], joiner: RecordJoiner, unwrapper: Unwrapper | None,
              final: bool, stats: DetectStats) -> list[tuple[Record, int]]:
        """(event, cluster id) for each event the chunk completes; `final` also closes the open event (and the
        envelope pieces still open). Envelope lines (container, journald) are unwrapped to their message first."""
        records = []
        for number, raw, tail in chunk:
            text = self._decode(raw, tail, stats)
            if text is None:
                continue
            for first, message in unwrapper.feed(number, text) if unwrapper is not None else ((number, text),):
                if (closed := joiner.add(first, message)) is not None:
                    records.append(closed)
        if final:
            for first, message in unwrapper.flush() if unwrapper is not None else ():
                if (closed := joiner.add(first, message)) is not None:
                    records.append(closed)
            if (closed := joiner.flush()) is not None:
                records.append(closed)
        stats.continuation_lines = joiner.continuation_lines
        if unwrapper is not None:
            stats.unparsed_envelope_lines = unwrapper.unparsed
        return [(record, self._cluster_id(self._event_text(joiner, record))) for record in records]

    @staticmethod
    def _event_text(joiner: RecordJoiner, record: Record) -> str:
        """What is mined of an event: its compacted text with outcome-bearing numbers as their class
        (tasks.detection.outcomes)."""
        return keep_outcomes(joiner.text(record))

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

    def _run(self, source: Source, out: IO[str], fmt: str, stats: DetectStats, size: int | None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        name = source.name
        if fmt != "auto" and fmt not in FORMATS:
            raise InputError(name, f"unknown log format {fmt!r}", hint=f"one of auto, {', '.join(FORMATS)}")
        stats.decoded_as = source.decoded_as
        if source.decoded_as:
            size = None  # the file's size counts compressed or UTF-16 bytes, not the bytes read
        window_lines = self.settings.window_lines
        window: list[int] = [0, 0, 0]  # first line, events, abnormal events
        window_templates: Counter[int] = Counter()
        emitted = self._emitted
        joiner: RecordJoiner | None = None
        unwrapper: Unwrapper | None = None
        sessions: Sessions | None = None
        # auto: decided by the first AUTO_SAMPLE non-empty lines; until a format wins (a pipe's first chunk may be
        # one odd line), chunks are read as generic and the vote goes on
        sample: list[str] | None = [] if fmt == "auto" else None
        current = "generic" if fmt == "auto" else fmt
        dataset = FORMATS[current][1]
        self._clusters_at_start = self.miner.drain.clusters_counter
        chunk_lines = self.settings.chunk_lines
        max_chars = self.settings.max_line_chars
        progress = Progress(TextColumn("detect"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                            transient=True, disable=not self.progress or size is None)
        task = progress.add_task(name, total=size)
        write = out.write

        def write_events(parsed: list[tuple[Record, int]]) -> None:
            self._write_events(parsed, dataset, write, stats, window, window_templates, sessions, window_lines)

        try:
            with progress:
                # 4 bytes per character at most in UTF-8: a line's kept head holds max_line_chars characters
                chunks = self._chunks(source, chunk_lines, self.settings.flush_s, 4 * max_chars)
                for chunk in chunks:
                    if sample is not None:
                        texts = (raw.decode("utf-8", errors="replace").strip() for _, raw, _ in chunk)
                        sample.extend(line for line in texts if line)
                        del sample[AUTO_SAMPLE:]
                        voted = detect_format(sample)
                        if voted != "generic" or len(sample) >= AUTO_SAMPLE:
                            sample = None  # decided
                        if voted != current:
                            if joiner is not None:  # events read under the old format are closed first
                                write_events(self._mine([], joiner, unwrapper, True, stats))
                            current, joiner = voted, None
                    if joiner is None:
                        pattern, dataset = FORMATS[current]
                        envelope = current in ENVELOPES
                        joiner = RecordJoiner("generic" if envelope else current, pattern,
                                              self.settings.max_record_lines, max_chars)
                        unwrapper = Unwrapper(current) if envelope else None
                        sessions = Sessions(self.settings.max_open_sessions) if current in SESSION_FORMATS else None
                    # a short chunk is the end of the input or a pause on a pipe: close the open event
                    parsed = self._mine(chunk, joiner, unwrapper, len(chunk) < chunk_lines, stats)
                    self._check_template_budget(name, stats.lines + len(parsed), stats)
                    write_events(parsed)
                    out.flush()
                    progress.update(task, advance=sum(len(raw) + len(tail or b"") for _, raw, tail in chunk))
                if joiner is not None:
                    write_events(self._mine([], joiner, unwrapper, True, stats))
                if window[1]:
                    self._emit_window(write, window, window_templates, None, stats)
                for record in sessions.close() if sessions is not None else []:
                    self._emit_session(write, record, stats)
                stats.templates = len(emitted)
                stats.new_templates = self.miner.drain.clusters_counter - self._clusters_at_start
                stats.format = current
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
        example = {}  # cluster id → its first event here: the example line of its template record
        for record, cid in parsed:
            example.setdefault(cid, record)
        for cid, template in templates.items():
            cached = self.cache.get(template, dataset)
            assert cached is not None  # _classify stored every template or raised
            verdict_of[cid] = (cached.verdict if cached.valid else "invalid", cached.verdict == ABNORMAL, cached.valid)
            if emitted.get(cid) != (template, dataset):
                emitted[cid] = (template, dataset)
                score = None if cached.score is None else round(cached.score, 4)
                first = example[cid]
                write(json.dumps({"kind": "template", "template_id": cid, "template": template,
                                  "verdict": verdict_of[cid][0], "score": score, "rationale": cached.rationale,
                                  "rationale_source": cached.rationale_source,
                                  "no_evidence_rule": cached.no_evidence_rule,
                                  "labelled_template": cached.labelled_template,
                                  "dataset": dataset, "model_version": self.model_version,
                                  "threshold": self.threshold, "neighbour_shown": cached.neighbour_shown,
                                  "first_stage": cached.first_stage, "example_line": first.first,
                                  "example": first.parts[0][:EXAMPLE_CHARS]}) + "\n")
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
        """Counts and the top anomalous templates with their rationales.

        What the run did not know (issue 20 item 4): `templates_without_neighbour` / `lines_without_neighbour` count
        the templates judged with no labelled neighbour of their own system in the prompt (and their lines);
        `templates_first_stage` / `lines_first_stage` those the verdict rule's first stage decided (no word of
        letters: normal without a model call), which are known without a neighbour. A template whose classifier
        does not report neighbours (`neighbour_shown` None) is in neither count. `rationales_shown` /
        `rationales_replaced`: the templates given a rationale, and those whose model rationale failed a check
        and was replaced by the evidence rationale (issue 19; tasks.evaluation.rationales.grounded_rationale).
        `templates_no_evidence_rule` / `lines_...`: those the score flagged but the no-evidence rule made normal (no
        failure word, and the nearest labelled neighbour of their system shown not abnormal; tasks.detection.verdicts.
        no_evidence_normal); `templates_labelled` / `lines_labelled`: those the index holds, labelled, whose verdict
        is that label (tasks.detection.verdicts.labelled_template).
        """
        top = []
        unknown = {"templates_without_neighbour": 0, "lines_without_neighbour": 0, "templates_first_stage": 0,
                   "lines_first_stage": 0, "rationales_shown": 0, "rationales_replaced": 0,
                   "templates_no_evidence_rule": 0, "lines_no_evidence_rule": 0, "templates_labelled": 0,
                   "lines_labelled": 0}
        for cid, count in stats.line_counts.items():
            template, dataset = self._emitted.get(cid, (None, ""))
            cached = self.cache.get(template, dataset) if template is not None else None
            if cached is not None and cached.no_evidence_rule:
                unknown["templates_no_evidence_rule"] += 1
                unknown["lines_no_evidence_rule"] += count
            if cached is not None and cached.labelled_template:
                unknown["templates_labelled"] += 1
                unknown["lines_labelled"] += count
            if cached is not None and cached.rationale_source is not None:
                unknown["rationales_shown"] += 1
                unknown["rationales_replaced"] += cached.rationale_source != "model"
            kind = None if cached is None else "first_stage" if cached.first_stage else \
                "without_neighbour" if cached.neighbour_shown is False else None
            if kind is not None:
                unknown[f"templates_{kind}"] += 1
                unknown[f"lines_{kind}"] += count
        for cid, count in stats.line_counts.most_common():
            template, dataset = self._emitted.get(cid, (None, ""))
            cached = self.cache.get(template, dataset) if template is not None else None
            if cached and cached.verdict == ABNORMAL:
                top.append({"template_id": cid, "template": template, "lines": count, "score": cached.score,
                            "rationale": cached.rationale, "rationale_source": cached.rationale_source})
            if len(top) >= self.settings.top_k:
                break
        counts = {k: v for k, v in vars(stats).items() if k != "line_counts"}
        counts["seconds"] = round(stats.seconds, 3)
        counts["lines_per_s"] = round(stats.lines / stats.seconds, 1) if stats.seconds else None
        return {"kind": "summary", "model_version": self.model_version, **counts,
                "cache_entries": len(self.cache), "cache_invalidated": self.cache.invalidated,
                "drain_state_reset": self.miner.state_reset, **unknown, "top_anomalous": top}


def print_summary(summary: dict[str, Any], console: Any = None, output: str | None = None) -> None:
    """A rich table for people: counts, what the run did not know (templates and lines judged without a labelled
    neighbour of their system, with the export command that ranks them for labelling, on `output`: the detect
    output file, None or '-' when it went to stdout), then the top anomalous templates with rationales.

    Log text and rationales are untrusted: they are shown as plain text, never read as console markup (a template
    holding `[/api/v1/orders]` would otherwise be a closing tag and crash the summary, issue 21 case 8).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(stderr=True)
    counts = Table(title=Text(f"detect summary (model version {summary['model_version']})"), show_header=False)
    for key in ("format", "decoded_as", "lines", "abnormal_lines", "windows", "abnormal_windows", "sessions",
                "abnormal_sessions", "templates", "new_templates", "requested", "cache_hits", "invalid_answer_lines",
                "empty_lines", "invalid_utf8_lines", "truncated_lines", "continuation_lines", "escape_lines",
                "nul_bytes", "unparsed_envelope_lines", "unsessioned_lines", "seconds", "lines_per_s"):
        if (key in summary and summary[key] not in ("", None)) or key in ("lines", "abnormal_lines", "templates"):
            counts.add_row(key, Text(str(summary.get(key))))
    console.print(counts)
    if "templates_without_neighbour" in summary:
        where = output if output and output != "-" else "<detect output file, --out>"
        console.print(Text(
            f"not known: {summary['templates_without_neighbour']} templates ({summary['lines_without_neighbour']} "
            "lines) were judged without a labelled neighbour of their system; "
            f"{summary['templates_first_stage']} templates ({summary['lines_first_stage']} lines) hold no word of "
            "letters and are normal by the verdict rule's first stage, which needs no neighbour.\n"
            + (f"{summary['templates_no_evidence_rule']} templates ({summary['lines_no_evidence_rule']} "
               "lines) scored above the threshold are normal: they hold no failure word and the nearest labelled "
               "neighbour of their system shown is not abnormal.\n"
               if summary.get("templates_no_evidence_rule") else "")
            + (f"{summary['templates_labelled']} templates ({summary['lines_labelled']} lines) are labelled in the "
               "version's index and take that label.\n" if summary.get("templates_labelled") else "")
            + f"label what is worth it: {EXPORT_COMMAND} {where} --out corrections/reviews/<your name>.csv"))
    if summary.get("rationales_shown"):
        console.print(Text(
            f"rationales: {summary['rationales_shown']} shown; {summary['rationales_replaced']} of them are the "
            "evidence rationale for the verdict, because the model's own failed a check (it must agree with the "
            "verdict, name a component and quote only words of the log or a shown neighbour)"))
    if summary.get("drain_state_reset"):
        console.print(Text(f"note: {summary['drain_state_reset']}"))
    if summary["top_anomalous"]:
        top = Table(title="top anomalous templates")
        for column in ("lines", "template", "rationale", "by"):
            top.add_column(column, overflow="fold")
        for row in summary["top_anomalous"]:
            top.add_row(str(row["lines"]), Text(row["template"]), Text(row["rationale"] or ""),
                        Text(row.get("rationale_source") or ""))
        console.print(top)
