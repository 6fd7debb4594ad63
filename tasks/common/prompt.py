"""The one owner of the prompt and answer format, used by distill, sft, grpo, evaluate and serving.

A completion is `<think>rationale</think><answer>normal|abnormal</answer>`.
Casing rule: the verdict inside <answer> is read after stripping whitespace and lowercasing,
so `<answer>Normal </answer>` is the valid verdict `normal`; anything else there is invalid.
Each tag must appear exactly once, think before answer, nothing but whitespace after </answer>.
Log text is defanged before it enters a prompt, so a log line carrying tags cannot pose as an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NORMAL, ABNORMAL = "normal", "abnormal"
LABELS: tuple[str, str] = (NORMAL, ABNORMAL)  # index = integer label (1 = abnormal)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# The paper's Table 1 anomaly categories: used by expert review files and by the rationale teachers.
CATEGORIES: tuple[str, ...] = ("system error", "network issue", "hardware failure", "software exception")

SYSTEM_PROMPT = (
    "You are a site reliability engineer who reads system logs from supercomputers "
    "(BGL, Spirit, Thunderbird) and distributed systems (HDFS). Decide whether a log template "
    "reports an anomaly. First reason step by step inside <think></think>: the component and "
    "what it does, the key facts in the log, and the deduction. Then give the verdict inside "
    "<answer></answer> as exactly one word: normal or abnormal."
)
USER_TEMPLATE = "Log ({dataset}):\n{log}\n\nIs this log normal or abnormal?"

_TAG_RE = re.compile(r"</?\s*(think|answer)\s*>", re.IGNORECASE)
_COMPLETION_RE = re.compile(
    r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL
)


def label_name(label: int | str) -> str:
    """`1`/`abnormal` → 'abnormal', `0`/`normal` → 'normal'."""
    if isinstance(label, str):
        key = label.strip().lower()
        if key in LABELS:
            return key
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS} or 0/1")
    if int(label) in (0, 1):
        return LABELS[int(label)]
    raise ValueError(f"unknown label {label!r}; expected 0 (normal) or 1 (abnormal)")


def label_id(label: int | str) -> int:
    """`abnormal`/1 → 1, `normal`/0 → 0."""
    return LABELS.index(label_name(label))


def sanitize_log(log: str, max_chars: int = 2000) -> str:
    """Make raw log text safe to embed: no control characters, tags defanged, length capped."""
    text = "".join(ch if ch.isprintable() or ch in "\t" else " " for ch in log)
    text = _TAG_RE.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text)
    if len(text) > max_chars:
        text = text[:max_chars] + " …[truncated]"
    return text.strip()


def user_prompt(log: str, dataset: str = "system log", max_chars: int = 2000) -> str:
    """The user turn for one log: the log text (sanitized, at most `max_chars`) and the question."""
    return USER_TEMPLATE.format(dataset=dataset, log=sanitize_log(log, max_chars))


def prompt_messages(log: str, dataset: str = "system log", max_chars: int = 2000) -> list[dict[str, str]]:
    """Chat messages up to (not including) the assistant turn."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_prompt(log, dataset, max_chars)},
    ]


def format_completion(rationale: str, label: int | str) -> str:
    """The assistant turn the model is trained to write."""
    return f"<think>{rationale.strip()}</think><answer>{label_name(label)}</answer>"


def training_messages(log: str, rationale: str, label: int | str, dataset: str = "system log") -> list[dict[str, str]]:
    """A full chat example for SFT: system, user, assistant."""
    return [*prompt_messages(log, dataset), {"role": "assistant", "content": format_completion(rationale, label)}]


@dataclass(frozen=True)
class Parsed:
    """What a completion says. `valid` is False for missing, repeated or misordered tags or a bad verdict."""

    valid: bool
    think: str
    answer: str | None  # 'normal' | 'abnormal' | None when invalid

    @property
    def label(self) -> int:
        """Integer verdict; an unparseable answer counts as normal (0) and is reported apart via `valid`."""
        return 1 if self.answer == ABNORMAL else 0


def parse_completion(text: str | None) -> Parsed:
    """Read a model's completion strictly; never raises."""
    if not text:
        return Parsed(False, "", None)
    if any(text.count(tag) != 1 for tag in TAGS):
        return Parsed(False, "", None)
    match = _COMPLETION_RE.match(text)
    if not match:
        return Parsed(False, "", None)
    think = match.group("think").strip()
    answer = match.group("answer").strip().lower()
    if answer not in LABELS or not think:
        return Parsed(False, think, None)
    return Parsed(True, think, answer)
