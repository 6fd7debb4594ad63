"""The one owner of the prompt and answer format, used by distill, sft, grpo, evaluate and serving.

Two tasks share one answer format. `explain` (the paper's CoT): the completion is
`<think>rationale</think><answer>normal|abnormal</answer>`. `verdict`: the completion is
`<answer>normal|abnormal</answer>` alone; the scoring pass prefills `<answer>` and reads the probability of
the answer word from the next token's log-probabilities (`verdict_score`): the calibrated verdict score.
A prompt may carry the k most similar expert-labelled training templates (`neighbours`), each on its own
line with its label written by this module; log text can hold no line break, so it cannot pose as one.
Casing rule: the verdict inside <answer> is read after stripping whitespace and lowercasing,
so `<answer>Normal </answer>` is the valid verdict `normal`; anything else there is invalid.
Each tag must appear exactly once, think before answer, nothing but whitespace after </answer>.
Log text is defanged before it enters a prompt, so a log line carrying tags cannot pose as an answer,
and a line carrying chat-template control tokens (`<|im_end|><|im_start|>system ...`) cannot open a turn:
any `<|...|>` and every special-token string of the tokenizer that will read the prompt (passed in as
`special_tokens` by the caller that knows it; tasks.common.tokenizers reads them) lose their brackets.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
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
VERDICT_SYSTEM_PROMPT = (
    "You are a site reliability engineer who reads system logs from supercomputers "
    "(BGL, Spirit, Thunderbird) and distributed systems (HDFS). Decide whether a log template "
    "reports an anomaly. Give only the verdict inside <answer></answer> as exactly one word: normal or abnormal."
)
# The explain task given the verdict (issue 19, "one verdict, one reason"): the calibrated score decides, then the
# rationale is written for that verdict, so the reason a user reads argues for the alert it comes with. Trained
# on the expert label in its place. Before it, the rationale was a second, free answer: through the endpoint
# only 40 of 190 rationales shown with an alert concluded "abnormal" (issue 19).
EXPLAIN_VERDICT_SYSTEM_PROMPT = (
    "You are a site reliability engineer who reads system logs from supercomputers "
    "(BGL, Spirit, Thunderbird) and distributed systems (HDFS). You are given a log template and its verdict. "
    "Explain the verdict inside <think></think>: the component as written in the log, the log's own words "
    "that decide the case, and a similar labelled log when one is shown and bears on it. Then repeat the "
    "verdict inside <answer></answer> as exactly one word: normal or abnormal."
)
EXPLAIN, VERDICT = "explain", "verdict"
TASKS = (EXPLAIN, VERDICT)
USER_TEMPLATE = "Log ({dataset}):\n{log}\n\nIs this log normal or abnormal?"
GIVEN_VERDICT_TEMPLATE = "Log ({dataset}):\n{log}\n\nThe verdict is {verdict}. Explain why."
NEIGHBOURS_HEADER = "Similar logs an expert labelled:"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOP_LOGPROBS = 20  # next-token alternatives read for the verdict score (vLLM's default maximum)
# First tokens the answer word can start with (SmolLM2 splits `abnormal` into `ab` + `normal`); compared after
# strip and lowercase, so `Normal`, ` normal` and `Ab` count too.
ABNORMAL_STARTS, NORMAL_STARTS = ("ab", "abnormal", "abn"), ("normal", "norm", "nor")

_TAG_RE = re.compile(r"</?\s*(think|answer)\s*>", re.IGNORECASE)
# The shape of chat-template control tokens of ChatML, Llama 3, Qwen, Phi... (`<|im_start|>`, `<|eot_id|>`),
# defanged whatever the tokenizer: a log line has no business carrying one.
_CONTROL_RE = re.compile(r"<\|[^<>|\n]{0,64}\|>")
# Look-alikes with no NFKC decomposition back to ASCII, so no tokenizer normaliser restores the token.
_DEFANG = str.maketrans({"<": "‹", ">": "›", "|": "¦", "[": "⁅", "]": "⁆"})
_WORD_JOINER = "\u2060"  # splits a special token that has no bracket to replace
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


def _defang(token: str) -> str:
    changed = token.translate(_DEFANG)
    return changed if changed != token else token[:1] + _WORD_JOINER + token[1:]


@functools.lru_cache(maxsize=32)
def _control_pattern(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    longest_first = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, longest_first), _CONTROL_RE.pattern]))


def defang_control_tokens(text: str, special_tokens: Iterable[str] = ()) -> str:
    """`text` with every `<|...|>` and every string of `special_tokens` made inert for a tokenizer.

    Brackets become look-alikes (`<|im_end|>` → `‹¦im_end¦›`, `[INST]` → `⁅INST⁆`); a token without a
    bracket gets a word joiner after its first character. Nothing else changes.

    >>> defang_control_tokens("x <|im_end|> <file_sep>", ["<file_sep>"])
    'x ‹¦im_end¦› ‹file_sep›'
    """
    return _control_pattern(tuple(sorted(set(special_tokens)))).sub(lambda m: _defang(m.group(0)), text)


def defang_messages(messages: list[dict[str, str]], special_tokens: Iterable[str] = ()) -> list[dict[str, str]]:
    """Chat messages with control tokens defanged in the user turns (where log text is), for stored prompts."""
    tokens = tuple(special_tokens)
    return [{**m, "content": defang_control_tokens(m["content"], tokens)} if m.get("role") == "user" else m
            for m in messages]


def sanitize_log(log: str, max_chars: int = 2000, special_tokens: Iterable[str] = ()) -> str:
    """Make raw log text safe to embed: no control characters, control tokens and tags defanged, length capped."""
    text = "".join(ch if ch.isprintable() or ch in "\t" else " " for ch in log)
    text = defang_control_tokens(text, special_tokens)
    text = _TAG_RE.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text)
    if len(text) > max_chars:
        text = text[:max_chars] + " …[truncated]"
    return text.strip()


Neighbours = Sequence[tuple[str, int]]  # (template, 0/1 expert label), most similar first


def user_prompt(log: str, dataset: str = "system log", max_chars: int = 2000,
                special_tokens: Iterable[str] = (), neighbours: Neighbours = (), verdict: str | None = None) -> str:
    """The user turn for one log: the labelled neighbours (when given), the log text (sanitized, at most
    `max_chars`) and the question, or with `verdict` the verdict to explain. Neighbour texts are sanitized like
    log text; their labels come from here."""
    text = sanitize_log(log, max_chars, special_tokens)
    question = (USER_TEMPLATE.format(dataset=dataset, log=text) if verdict is None else
                GIVEN_VERDICT_TEMPLATE.format(dataset=dataset, log=text, verdict=label_name(verdict)))
    if not neighbours:
        return question
    tokens = tuple(special_tokens)
    lines = [f"- {label_name(label)}: {sanitize_log(template, 300, tokens)}" for template, label in neighbours]
    return NEIGHBOURS_HEADER + "\n" + "\n".join(lines) + "\n\n" + question


def prompt_messages(log: str, dataset: str = "system log", max_chars: int = 2000,
                    special_tokens: Iterable[str] = (), *, neighbours: Neighbours = (),
                    task: str = EXPLAIN, verdict: int | str | None = None) -> list[dict[str, str]]:
    """Chat messages up to (not including) the assistant turn; `special_tokens`: the reading tokenizer's;
    `task`: `explain` (rationale, then verdict) or `verdict` (the verdict alone). `verdict` (explain only):
    the verdict the rationale is written for (the scored verdict; the expert label in training); None asks the
    paper's open question, where the model decides in its answer word (zero-shot, versions without a threshold).
    Raises ValueError for an unknown task or label, or a verdict given to the verdict task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if verdict is not None and task != EXPLAIN:
        raise ValueError("a given verdict only goes with the explain task")
    given = None if verdict is None else label_name(verdict)
    system = VERDICT_SYSTEM_PROMPT if task == VERDICT else SYSTEM_PROMPT if given is None else \
        EXPLAIN_VERDICT_SYSTEM_PROMPT
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user_prompt(log, dataset, max_chars, special_tokens, neighbours, given)},
    ]


def scoring_messages(log: str, dataset: str = "system log", max_chars: int = 2000,
                     special_tokens: Iterable[str] = (), *, neighbours: Neighbours = ()) -> list[dict[str, str]]:
    """The verdict task with the assistant turn opened by `<answer>`: continued (not closed) by the chat
    template, the model's next token is the first token of the answer word (`verdict_score` reads it)."""
    return [*prompt_messages(log, dataset, max_chars, special_tokens, neighbours=neighbours, task=VERDICT),
            {"role": "assistant", "content": ANSWER_OPEN}]


def token_logprobs(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(token text, log-probability) pairs as a map; two token ids that decode to the same text (a byte-level
    tokenizer has such pairs) have their probabilities added, so no alternative is lost."""
    out: dict[str, float] = {}
    for token, logprob in pairs:
        out[token] = float(logprob) if token not in out else math.log(math.exp(out[token]) + math.exp(logprob))
    return out


def verdict_score(top_logprobs: Mapping[str, float]) -> float | None:
    """P(abnormal) against P(normal) from the log-probabilities of the answer word's first token.

    `top_logprobs` maps token text to log-probability (the top-k the engine returned). Every token that starts
    `abnormal` (`ab`, `Ab`, ` abnormal`...) counts for abnormal, every one that starts `normal` for normal;
    None when neither is among them (the model would not answer there).

    >>> round(verdict_score({"ab": -0.2, "normal": -1.8, "The": -4.0}), 3)
    0.832
    """
    abnormal = sum(math.exp(lp) for token, lp in top_logprobs.items()
                   if token.strip().lower() in ABNORMAL_STARTS)
    normal = sum(math.exp(lp) for token, lp in top_logprobs.items() if token.strip().lower() in NORMAL_STARTS)
    total = abnormal + normal
    return abnormal / total if total > 0 else None


# The verdict rule's first stage (issue 18 item 4b): a template without a word of two or more letters (a hex or
# register dump, a list of numbers) is normal without a model call, with score FIRST_STAGE_SCORE. The same letter
# words are the TF-IDF tokens of retrieval and the baselines. Measured on the expert-corrected templates: none of
# the 1,520 such templates among 3,063 (BGL 1,280, Spirit 240) is abnormal; they are 518 of 707 BGL and 99 of 519
# Spirit test templates, so the first stage halves the model calls of the test split.
LETTER_WORD = r"(?u)\b[a-zA-Z][a-zA-Z_]+\b"
FIRST_STAGE_SCORE = 0.0
_LETTER_WORD_RE = re.compile(LETTER_WORD)


def first_stage_normal(log: str) -> bool:
    """Whether the verdict rule calls `log` normal before any model call: it holds no word of two or more letters.

    >>> first_stage_normal("r00=0x00000000 r01=0x1eb2f7c0"), first_stage_normal("<*> <*> 0x3f")
    (True, True)
    >>> first_stage_normal("ciod: failed to read <*>")
    False
    """
    return _LETTER_WORD_RE.search(log) is None


def scored_verdict(score: float | None, threshold: float) -> str:
    """The verdict of a calibrated score: `abnormal` when it reaches the version's threshold; a missing score
    (neither answer word among the top tokens) is `normal`, everywhere (evaluation, client, pyfunc, detect)."""
    return ABNORMAL if score is not None and score >= threshold else NORMAL


def format_completion(rationale: str, label: int | str) -> str:
    """The assistant turn the model is trained to write."""
    return f"<think>{rationale.strip()}</think><answer>{label_name(label)}</answer>"


def verdict_completion(label: int | str) -> str:
    """The assistant turn of the verdict task: `<answer>normal|abnormal</answer>`."""
    return f"{ANSWER_OPEN}{label_name(label)}{ANSWER_CLOSE}"


def training_messages(log: str, rationale: str, label: int | str, dataset: str = "system log", *,
                      neighbours: Neighbours = (), task: str = EXPLAIN) -> list[dict[str, str]]:
    """A full chat example for SFT: system, user, assistant (the rationale is not used by the verdict task).
    The explain task is given the expert label as its verdict: the model learns to write the reason for the
    verdict it is given, which at serving is the scored one."""
    completion = format_completion(rationale, label) if task == EXPLAIN else verdict_completion(label)
    return [*prompt_messages(log, dataset, neighbours=neighbours, task=task,
                             verdict=label if task == EXPLAIN else None),
            {"role": "assistant", "content": completion}]


def parse_verdict(text: str | None) -> str | None:
    """The verdict of a verdict-task completion `<answer>x</answer>` (casing rule as above); None otherwise."""
    match = re.fullmatch(r"\s*<answer>(?P<answer>[^<]*)</answer>\s*", text or "")
    answer = match.group("answer").strip().lower() if match else None
    return answer if answer in LABELS else None


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


CUT_MARK = " … "  # where the middle of a log text was cut to fit the context
_MIN_LOG_CHARS = 32  # below this a cut log says nothing: the prompt cannot be fitted


def cut_middle(text: str, max_chars: int) -> str:
    """`text` in at most `max_chars` characters: its first two thirds and last third around CUT_MARK.

    The head holds an event's first line and its cause lines (tasks.detection.records puts them first and drops
    the frames between), the tail holds where a long line's outcome is (`... status=FAILED`).

    >>> cut_middle("ERROR disk sda1 failed " + "x" * 100 + " code=EIO", 40)
    'ERROR disk sda1 failed xx … xxx code=EIO'
    """
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(CUT_MARK))
    tail = keep // 3
    return text[:keep - tail] + CUT_MARK + (text[len(text) - tail:] if tail else "")


def fit_prompt(build: Callable[[str, Neighbours], list[dict[str, str]]], log: str, neighbours: Neighbours,
               count: Callable[[list[dict[str, str]]], int], budget: int) -> tuple[list[dict[str, str]], str]:
    """The messages `build(log, neighbours)` cut to at most `budget` tokens by `count`, and what was cut.

    Order (issue 21, case 7: a prompt past the served context is refused by the endpoint, HTTP 400, vllm#20409):
    first the neighbours, least similar first (they are evidence; the log is the case); then the middle of the log
    text (cut_middle), shrunk in proportion to the excess until it fits. Returns (messages, '' | 'neighbours' |
    'log'). Raises ValueError when even a log of _MIN_LOG_CHARS characters without neighbours does not fit.
    """
    messages = build(log, neighbours)
    if count(messages) <= budget:
        return messages, ""
    shown = list(neighbours)
    while shown:
        shown.pop()
        messages = build(log, shown)
        if count(messages) <= budget:
            return messages, "neighbours"
    chars = len(log)
    for _ in range(12):
        used = count(messages)
        if used <= budget:
            return messages, "log"
        chars = min(chars - 1, int(chars * budget / used * 0.95))
        if chars < _MIN_LOG_CHARS:
            break
        messages = build(cut_middle(log, chars), ())
    raise ValueError(f"the prompt does not fit {budget} tokens even with {_MIN_LOG_CHARS} characters of log text "
                     "and no neighbours: raise the served context (serve.max_model_len) or lower the answer budget")
