"""Line framing for `detect`: bytes in, bounded lines out, whatever line endings or line lengths a file has.

Rules (issue 15, case 3):

- LF, CRLF and a lone CR each end a line (classic Mac and some device logs write CR only; a file of
  CR-ended lines must not be read as one line).
- Memory per line is bounded: a line longer than `max_bytes` keeps its first `max_bytes` (head) and its
  last `max_bytes` (tail) while it is read; the middle is dropped as it streams past, so a file with no
  newline at all costs O(size) time and O(max_bytes) memory instead of re-copying a growing buffer.
- A line longer than `max_chars` is fitted by `fit_line`: long opaque runs (base64, hex dumps) are masked
  first, then head and tail are kept around a marker, so `payload=<4 kB> status=FAILED code=EIO` keeps
  the failure at its end.
"""

from __future__ import annotations

import re

# A run of 64+ characters of the base64/hex alphabet is a payload, not words: masked like drain3's values.
OPAQUE_RUN = re.compile(r"[A-Za-z0-9+/_\-]{64,}={0,2}")
OPAQUE_MASK = "<*>"
TRUNCATION_MARK = " … "  # between the kept head and tail of a cut line
TAIL_SHARE = 4  # a cut line keeps its last max_chars // TAIL_SHARE characters (500 of 2000): where outcomes are
# Terminal escapes (ECMA-48): CSI sequences (colours, cursor moves: ESC [ params intermediates final), OSC strings
# (ESC ] ... BEL or ESC \\, e.g. hyperlinks and window titles), and the two-byte escapes; a lone ESC last.
TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|\x1b")


def fit_line(head: str, max_chars: int, tail: str | None = None) -> tuple[str, bool]:
    """The line as it is mined and shown, at most `max_chars` characters; and whether it was changed.

    `tail` is the end of a line whose middle the reader already dropped (see LineFramer); None for a
    line read whole. A line that fits is returned unchanged. Otherwise opaque runs (OPAQUE_RUN) become
    `<*>`; if it still does not fit, the first characters and the last `max_chars // TAIL_SHARE` are kept
    around TRUNCATION_MARK.

    >>> fit_line("payload=" + "QUJD" * 1000 + " status=FAILED code=EIO", 2000)
    ('payload=<*> status=FAILED code=EIO', True)
    """
    if tail is None and len(head) <= max_chars:
        return head, False
    start = OPAQUE_RUN.sub(OPAQUE_MASK, head)
    if tail is None:
        if len(start) <= max_chars:
            return start, True
        end = start  # one string: its own end is the tail
    else:
        end = OPAQUE_RUN.sub(OPAQUE_MASK, tail)
        if len(start) + len(TRUNCATION_MARK) + len(end) <= max_chars:
            return start + TRUNCATION_MARK + end, True
    keep_tail = min(len(end), max_chars // TAIL_SHARE)
    keep_head = max(0, max_chars - len(TRUNCATION_MARK) - keep_tail)
    return start[:keep_head] + TRUNCATION_MARK + end[len(end) - keep_tail:], True


def strip_terminal_escapes(text: str) -> str:
    """`text` without terminal escape sequences (issue 21, case 3): `\\x1b[31mFAILED\\x1b[0m` reads `FAILED`, as
    `less -R` shows it, instead of gluing the colour's digits to the word (`[31mFAILED` would be a value to drain3).

    >>> strip_terminal_escapes("status \\x1b[1;31mFAILED\\x1b[0m after \\x1b]8;;http://x\\x07link\\x1b]8;;\\x07")
    'status FAILED after link'
    """
    return TERMINAL_ESCAPE.sub("", text)


def _utf8_head(data: bytes) -> bytes:
    """`data` without a UTF-8 sequence cut at its end (the reader cut there, the file did not)."""
    back = 0
    while back < min(3, len(data)) and data[-1 - back] & 0xC0 == 0x80:
        back += 1
    if back < len(data):
        lead = data[-1 - back]
        need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        if lead >= 0xC0 and back + 1 < need:
            return data[: len(data) - back - 1]
    return data


def _utf8_tail(data: bytes) -> bytes:
    """`data` without continuation bytes at its start (the rest of a character the reader cut)."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return data[skip:]


class LineFramer:
    """Splits a byte stream into lines: LF, CRLF and lone CR end a line; memory per line is bounded.

    `feed(block)` returns the lines the block completed, `finish()` the unterminated last one. Each line
    is `(head, tail)`: `tail` is None for a line of at most `max_bytes`; for a longer one `head` holds its
    first `max_bytes` and `tail` up to `max_bytes` of its end, both cut on UTF-8 character boundaries.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, found {max_bytes}")
        self.max_bytes = max_bytes
        self._head = b""  # the unfinished line (at most max_bytes)
        self._tail = b""  # its last max_bytes once it is longer
        self._long = False
        self._after_cr = False  # the last block ended in CR: a LF opening the next one is the same line end

    def _extend(self, piece: bytes) -> None:
        limit = self.max_bytes
        if not self._long:
            if len(self._head) + len(piece) <= limit:
                self._head += piece
                return
            joined = self._head + piece
            self._head, self._tail, self._long = joined[:limit], joined[limit:][-limit:], True
        elif len(piece) >= limit:
            self._tail = piece[-limit:]
        else:
            self._tail = (self._tail + piece)[-limit:]

    def _line(self, head: bytes, tail: bytes | None) -> tuple[bytes, bytes | None]:
        return (head, None) if tail is None else (_utf8_head(head), _utf8_tail(tail))

    def _end_pending(self, piece: bytes) -> tuple[bytes, bytes | None]:
        self._extend(piece)
        line = self._line(self._head, self._tail if self._long else None)
        self._head, self._tail, self._long = b"", b"", False
        return line

    def feed(self, block: bytes) -> list[tuple[bytes, bytes | None]]:
        """The lines `block` completes, in order."""
        if self._after_cr and block[:1] == b"\n":
            block = block[1:]
        self._after_cr = block[-1:] == b"\r"
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = block.split(b"\n")
        rest = parts.pop()
        lines: list[tuple[bytes, bytes | None]] = []
        if parts:
            lines.append(self._end_pending(parts[0]))
            limit = self.max_bytes
            lines.extend((p, None) if len(p) <= limit else self._line(p[:limit], p[limit:][-limit:])
                         for p in parts[1:])
        if rest:
            self._extend(rest)
        return lines

    def finish(self) -> list[tuple[bytes, bytes | None]]:
        """The last line when the input did not end with a line end."""
        self._after_cr = False
        if self._head or self._long:
            return [self._end_pending(b"")]
        return []
