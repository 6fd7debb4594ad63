"""Log formats: header layouts (LogHub's), the drain3 masks, and auto-detection.

Only the free-text content after a header is mined and shown to the model. The first field of BGL, Spirit
and Thunderbird lines is the ground-truth alert tag (`-` = normal): it is never sent.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tasks.detection.envelopes import ENVELOPE_SHAPES
from tasks.detection.records import SESSION_KEYS

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
    # envelopes: the message inside is mined as generic text (tasks.detection.envelopes)
    "cri": (None, "system log"),
    "docker": (None, "system log"),
    "journald": (None, "system log"),
}
SESSION_FORMATS = tuple(SESSION_KEYS)  # formats reported per session (tasks.detection.records), not per window
AUTO_ORDER = ("bgl", "thunderbird", "hdfs")  # Spirit lines share Thunderbird's layout: name it explicitly
_B, _E = r"((?<=[^A-Za-z0-9])|^)", r"((?=[^A-Za-z0-9])|$)"
MASKS = (  # order matters: an IP or hex value must be masked before its digits are
    _B + r"(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(:\d+)?)" + _E,
    _B + r"(0x[0-9a-fA-F]+)" + _E,
    _B + r"([0-9a-fA-F]{8,})" + _E,
    _B + r"([\-\+]?\d+)" + _E,
)


def detect_format(lines: Iterable[str]) -> str:
    """The layout most of the first non-empty lines match (an envelope's shape, tasks.detection.envelopes, or a
    header); `generic` when none fits."""
    votes: Counter[str] = Counter()
    for text in lines:
        for name, shape in ENVELOPE_SHAPES.items():
            if shape.match(text):
                votes[name] += 1
                break
        else:
            for name in AUTO_ORDER:
                pattern = FORMATS[name][0]
                if pattern is not None and pattern.match(text):
                    votes[name] += 1
                    break
    return votes.most_common(1)[0][0] if votes else "generic"
