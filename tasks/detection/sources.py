"""What `detect` reads: a file or pipe as UTF-8 bytes, whatever its compression or text encoding (issue 21, cases 1-2).

Rules, read the way `zcat` and `iconv` would, decided from the first bytes (magic numbers and byte-order marks),
never from the file name, so a rotated `app.log.1` that is really gzip is read too:

- gzip (`1f 8b`, also several members concatenated, as `cat a.gz b.gz` makes), bzip2 (`BZh`) and xz
  (`fd 37 7a 58 5a 00`) are decompressed as they stream (Python's gzip, bz2 and lzma). zstd and zip are refused
  with the command that reads them (`zstdcat FILE | rationanomaly detect -`, `unzip -p`): no standard-library
  reader, and a zip holds several files.
- A byte-order mark decides the text encoding: UTF-8's is dropped (the first header then parses), UTF-16 and
  UTF-32 (either byte order) are decoded and re-encoded as UTF-8 as they stream. UTF-16 without a mark is
  recognised by its NUL-interleaved ASCII (most even or most odd bytes NUL in the first block), as Windows
  tools write it.
- Binary data is never judged: when, after decompression and decoding, more than BINARY_SHARE of the first
  block's bytes are control bytes (NUL and others, except tab, line ends, form feed and ESC), the input is refused
  with InputError naming it. A few NUL bytes inside a text log (a file preallocated and cut by a crash) are not
  binary: the detector drops them per line and counts them.
- A compressed stream that ends early (a rotation caught mid-write) raises InputError naming the input after the
  lines before the break are judged and written: nothing already written is lost.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import gzip
import io
import lzma
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from tasks.common.errors import InputError

BLOCK = 1 << 16  # bytes per read
SNIFF_BYTES = 4096  # bytes the encoding and binary checks look at
BINARY_SHARE = 0.10  # above this share of control bytes in the first block, the input is binary
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\x1b")
_COMPRESSED: dict[bytes, tuple[str, Callable[..., IO[bytes]]]] = {  # streaming readers, closed with the input
    b"\x1f\x8b": ("gzip", functools.partial(gzip.open, mode="rb")),
    b"BZh": ("bzip2", functools.partial(bz2.open, mode="rb")),
    b"\xfd7zXZ\x00": ("xz", functools.partial(lzma.open, mode="rb")),
}
_REFUSED = {b"\x28\xb5\x2f\xfd": ("zstd", "zstdcat {name} | rationanomaly detect -"),
            b"PK\x03\x04": ("zip", "unzip -p {name} | rationanomaly detect -")}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class _RawBlocks(io.RawIOBase):
    """A raw stream over a block reader (what a decompressor reads from); a block larger than the caller's buffer
    is kept for the next call."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self._read, self._left = read, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._left or self._read()
        taken, self._left = data[:len(buffer)], data[len(buffer):]
        buffer[:len(taken)] = taken
        return len(taken)


@dataclass
class Source:
    """UTF-8 bytes of one input. `read()` returns the next block (b"" at the end); `fd` is the descriptor to wait
    on for a live pipe (None when decoding stands between the descriptor and the bytes); `decoded_as` says what was
    undone (e.g. `gzip, utf-16`), empty for plain UTF-8."""

    name: str
    read: Callable[[], bytes]
    fd: int | None
    decoded_as: str = ""


class _Pushback:
    """A block reader with bytes put back in front (what the checks sniffed)."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self._read, self._front = read, b""

    def unread(self, data: bytes) -> None:
        self._front = data + self._front

    def read(self) -> bytes:
        if self._front:
            data, self._front = self._front, b""
            return data
        return self._read()

    def peek(self, want: int, live: bool = False) -> bytes:
        """At least `want` bytes unless the input ends first; nothing is consumed. `live` (a pipe that may be
        `tail -f`): whatever the first read gives, so a live stream is never held up waiting for more."""
        data = b""
        while len(data) < want and not (live and data):
            block = self.read()
            if not block:
                break
            data += block
        self.unread(data)
        return data


def _utf16_without_bom(sample: bytes) -> str | None:
    """`utf-16-le`/`utf-16-be` when most odd or most even bytes are NUL (ASCII text in UTF-16), else None."""
    pairs = len(sample) // 2
    if pairs < 8:
        return None
    even_nul = sum(1 for i in range(0, 2 * pairs, 2) if sample[i] == 0) / pairs
    odd_nul = sum(1 for i in range(1, 2 * pairs, 2) if sample[i] == 0) / pairs
    if odd_nul > 0.6 and even_nul < 0.1:
        return "utf-16-le"
    if even_nul > 0.6 and odd_nul < 0.1:
        return "utf-16-be"
    return None


def _recoder(read: Callable[[], bytes], encoding: str) -> Callable[[], bytes]:
    """A block reader that decodes `encoding` incrementally (bad sequences replaced) and returns UTF-8."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    done = False

    def recoded() -> bytes:
        nonlocal done
        while not done:
            block = read()
            done = not block
            text = decoder.decode(block, final=done)
            if text:
                return text.encode("utf-8")
        return b""

    return recoded


_CHECK = {"gzip": "gzip -t", "bzip2": "bzip2 -t", "xz": "xz -t"}


def _guarded(read: Callable[[], bytes], kind: str, name: str) -> Callable[[], bytes]:
    """`read` with a decompressor's errors (truncated or corrupt stream) turned into InputError naming the input."""

    def guarded() -> bytes:
        try:
            return read()
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise InputError(name, f"the {kind} stream is truncated or corrupt ({exc})",
                             hint=f"verdicts up to the break are written; check the file with `{_CHECK[kind]}`"
                             ) from exc

    return guarded


def open_source(handle: IO[bytes], name: str) -> Source:
    """The input as UTF-8 bytes: decompressed, decoded from its byte-order mark or UTF-16 shape, BOM dropped.

    `handle` is a binary file or pipe; a pipe or terminal is read with os.read so a live `tail -f` is not held up.
    Raises InputError naming `name` for zstd or zip input (with the command that reads it) and for binary data.
    """
    try:
        fd: int | None = handle.fileno()
        stream = not stat.S_ISREG(os.fstat(fd).st_mode)
    except (OSError, AttributeError, io.UnsupportedOperation):
        fd, stream = None, False
    raw_read: Callable[[int], bytes] = (
        (lambda n: os.read(fd, n)) if stream and fd is not None else handle.read)  # type: ignore[arg-type]
    reader = _Pushback(lambda: raw_read(BLOCK))
    head = reader.peek(6, live=stream)
    steps: list[str] = []
    for magic, (kind, command) in _REFUSED.items():
        if head.startswith(magic):
            shown = name if name != "stdin" else "FILE"
            raise InputError(name, f"{kind}-compressed input is not read by detect",
                             hint=f"decompress it first: {command.format(name=shown)}")
    for magic, (kind, opener) in _COMPRESSED.items():
        if head.startswith(magic):
            inner = opener(io.BufferedReader(_RawBlocks(reader.read)))
            reader = _Pushback(_guarded(functools.partial(inner.read, BLOCK), kind, name))
            steps.append(kind)
            stream = False  # decompression stands between the descriptor and the bytes: no select on it
            break
    first = reader.peek(SNIFF_BYTES, live=stream)
    encoding = next((enc for bom, enc in _BOMS if first.startswith(bom)), None) or _utf16_without_bom(
        first[:SNIFF_BYTES])
    if encoding is not None:
        steps.append(encoding.removesuffix("-sig"))
        reader = _Pushback(_recoder(reader.read, encoding))
        stream = False
        first = reader.peek(SNIFF_BYTES, live=True)
    sample = first[:SNIFF_BYTES]
    controls = sum(1 for byte in sample if (byte < 0x20 and byte not in _TEXT_CONTROLS) or byte == 0x7F)
    if sample and controls / len(sample) > BINARY_SHARE:
        after = f" after {', '.join(steps)} decoding" if steps else ""
        raise InputError(name, f"binary data, not a text log ({controls} of the first {len(sample)} bytes{after} "
                         "are control bytes)", hint="pass a text log; unpack an archive first")
    return Source(name, reader.read, fd if stream else None, ", ".join(steps))
