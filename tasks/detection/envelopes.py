"""Container and journald envelopes: the message inside a line, as the log shippers read it (issue 21, case 4).

A line of these formats is a wrapper around the program's own output; only the message is mined and judged, and
messages split by the runtime are joined back first, so a Java trace in a pod log joins its header line again
(tasks.detection.records) and a failure word is not glued to a JSON field:

- `cri`: containerd / CRI-O (`<RFC 3339 time> <stdout|stderr> <P|F>[:flags] <message>`, the kubelet's
  format; fluent-bit's `cri` parser, kubernetes#44976). `P` marks a partial piece of a line longer than the
  runtime's buffer: pieces of one stream are joined until the `F` that ends them (cri-o#4432).
- `docker`: docker's json-file driver (`{"log": "...\\n", "stream": "stderr", "time": "..."}`). A `log` value
  without its final newline is a partial piece (the driver splits at 16 KiB, moby#36777): joined until the piece
  that ends with a newline.
- `journald`: `journalctl -o json`, one JSON object per entry. MESSAGE is a string, an array of byte values
  when it is not valid UTF-8 or holds control characters (systemd's JSON export format), or null; it is decoded
  as UTF-8 with bad bytes replaced, a null or missing message reads EMPTY_MESSAGE. The entry's PRIORITY (and
  SYSLOG_FACILITY) stays visible in front of the message as `<facility.severity>`, like a syslog PRI
  (tasks.detection.outcomes): the severity is the entry's own verdict on itself.

A line that does not parse as its envelope (a banner, a truncated JSON object) is passed on as it is, and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tasks.detection.outcomes import priority_label
from tasks.detection.records import EMPTY_MESSAGE

CRI_LINE = re.compile(r"^(?P<time>\d{4}-\d\d-\d\dT\S+) (?P<stream>stdout|stderr) (?P<tag>[PF])(?::\S*)?"
                      r"(?: (?P<message>.*))?$")
ENVELOPES = ("cri", "docker", "journald")
# How each envelope is recognised by auto-detection (tasks.detection.formats.detect_format).
ENVELOPE_SHAPES: dict[str, re.Pattern[str]] = {
    "cri": CRI_LINE,
    "docker": re.compile(r'^\{.*"log"\s*:\s*"'),
    "journald": re.compile(r'^\{.*"(?:MESSAGE|__REALTIME_TIMESTAMP)"\s*:'),
}


def _message_text(value: Any) -> str:
    """journald's MESSAGE as text: a string as is, a byte array decoded as UTF-8 (bad bytes replaced), else ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", errors="replace")
    return ""


@dataclass
class Unwrapper:
    """Lines of an envelope format in, (first line number, message) out; partial pieces are held until joined.

    `feed` returns the messages a line completes (none for a partial piece); `flush` the pieces left open at the
    end of the input. `unparsed` counts lines that did not parse as the envelope and were passed on whole.
    """

    fmt: str
    unparsed: int = 0
    _partial: dict[str, tuple[int, list[str]]] = field(default_factory=dict)

    def feed(self, number: int, text: str) -> list[tuple[int, str]]:
        """The messages completed by line `number` whose text is `text`."""
        if self.fmt == "cri":
            match = CRI_LINE.match(text)
            if match is None:
                self.unparsed += 1
                return [(number, text)]
            return self._piece(match["stream"], number, match["message"] or "", final=match["tag"] == "F")
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            self.unparsed += 1
            return [(number, text)]
        if self.fmt == "docker":
            piece = entry.get("log")
            if not isinstance(piece, str):
                self.unparsed += 1
                return [(number, text)]
            return self._piece(str(entry.get("stream", "")), number, piece.removesuffix("\n"),
                               final=piece.endswith("\n"))
        message = _message_text(entry.get("MESSAGE")).strip() or EMPTY_MESSAGE
        label = priority_label(entry.get("PRIORITY"), entry.get("SYSLOG_FACILITY"))
        return [(number, f"{label} {message}" if label else message)]

    def _piece(self, stream: str, number: int, piece: str, final: bool) -> list[tuple[int, str]]:
        first, pieces = self._partial.pop(stream, (number, []))
        pieces.append(piece)
        if not final:
            self._partial[stream] = (first, pieces)
            return []
        return [(first, "".join(pieces))]

    def flush(self) -> list[tuple[int, str]]:
        """Partial pieces never ended by the runtime (the input stopped mid-line), in order of their first line."""
        open_pieces = sorted(self._partial.values())
        self._partial.clear()
        return [(first, "".join(pieces)) for first, pieces in open_pieces]
