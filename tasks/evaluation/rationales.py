"""Do the rationales explain the log they are about, and argue for the verdict they come with? (issues 14, 19)

`check_rationale` runs six checks on one rationale; `faithfulness_report` aggregates them (evaluation, the served
path in bench/served_quality.py, the distill stage's guard on teacher answers, GRPO's think reward):

- agrees: the rationale's conclusion equals the verdict it comes with. The conclusion is the last
  "(the) log is [not] normal|abnormal|anomalous" phrase; without one, the last of the words normal, abnormal,
  anomalous, anomaly (a "not" right before it flips it). No such word at all: no conclusion, not agreeing;
- component_in_log: the component the rationale names occurs in the log as written. The named component is the
  first `backquoted` token (the teachers' format: "`MidplaneSwitchController` ..."), which must occur in the log
  (case-sensitive, as written). A rationale with no backquoted token (the format before issue 19) is read with
  the lexicon: the first lexicon component found in its text (tasks.data.teachers.find_component) must be the
  log's own. Measured on the champion before issue 14: Thunderbird's `kernel time sync` explained as a PowerPC
  register dump;
- quotes_grounded: every fragment quoted ('...' or "...", the opening quote not after a letter or digit and the
  closing one not before one, so "log's" opens no quote) occurs in the log or a neighbour shown with it;
- cited_neighbour_shown: every neighbour the rationale cites (a quote right after "similar log", "neighbour",
  "expert label(l)ed ...") occurs in a shown neighbour, and the label it gives that neighbour, when it gives one
  and the neighbour's label is known, is the shown one. True when none is cited;
- false_no_failure_word: the rationale claims the log has no failure or error word while the log holds a word of
  the keyword list (tasks.data.teachers.FAILURE_WORDS, the keyword baseline's list). The issue-19 served run:
  "routine status output ... without any failure word" under `... bll_clear_port failed`;
- consistent: the rationale holds no deduction arguing for the other verdict (the teacher's deduction phrases,
  tasks.data.teachers.lexicon_rationale: "routine status output", "with no sign of a" ... for normal, "signals
  a", "this event marks a" for abnormal). The default candidate's served rationales (2026-12-06): "it is routine
  status output of `ciod`, with no sign of a system error ... So the log is abnormal." under an alert.

`grounded_rationale` is the guard every served path applies (the endpoint's client, detect, the evaluation's
served path, the pyfunc): a rationale failing any check is never shown; the offline teacher's evidence rationale
for the same verdict, log and shown neighbours replaces it, marked `evidence` (issue 19 item 1: one verdict, one
reason). Measured on the default candidate before the guard (2026-12-06, 410 shown rationales): 99.3% agreed,
92.9% named a component of the log, 71.2% quoted only grounded words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tasks.common.prompt import label_id, label_name
from tasks.data.teachers import find_component, keyword_hits, lexicon_rationale


def _plain(text: str) -> str:
    return " ".join(text.replace("…", " ").lower().split())


def quotes(rationale: str) -> list[str]:
    """The fragments a rationale quotes, without the ellipsis the teacher appends to a cut quote (an apostrophe
    inside a word, as in "log's", opens or closes no quote)."""
    found = [(a or b).replace("…", "").strip() for a, b in _STRICT_QUOTE.findall(rationale)]
    return [fragment for fragment in found if fragment]


def component_matches(rationale: str, log: str, dataset: str) -> bool:
    """The component named in the rationale is the log's own (tasks.data.teachers' lexicon)."""
    return find_component(rationale, dataset).name == find_component(log, dataset).name


def quotes_grounded(rationale: str, sources: Iterable[str]) -> bool:
    """Every quoted fragment occurs in one of `sources` (the log, and any neighbour shown with it)."""
    texts = [_plain(s) for s in sources]
    return all(any(_plain(q) in text for text in texts) for q in quotes(rationale))


Neighbour = str | tuple[str, int | str]
CHECKS = ("agrees", "component_in_log", "quotes_grounded", "cited_neighbour_shown", "false_no_failure_word",
          "consistent")
# The teacher's deduction phrases for each verdict (tasks.data.teachers.lexicon_rationale); a rationale using one
# for the other verdict argues both ways (the `consistent` check).
ARGUES_FOR = {
    "normal": ("routine status output", "with no sign of a", "routine, successful step", "not a failure by itself",
               "so the condition was handled"),
    "abnormal": ("signals a", "signal a", "this event marks a"),
}

_CONCLUSION = re.compile(r"\blog (?:is|was|looks|seems)\s+(not\s+)?(abnormal|normal|anomalous)\b", re.IGNORECASE)
_VERDICT_WORD = re.compile(r"\b(not\s+)?(abnormal|normal|anomalous|anomaly)\b", re.IGNORECASE)
_BACKQUOTED = re.compile(r"`([^`\s][^`]{0,79})`")
_STRICT_QUOTE = re.compile(r"(?<![\w'\"])(?:'([^']{2,120})'|\"([^\"]{2,200})\")(?![A-Za-z0-9])")
_NO_FAILURE_WORD = re.compile(
    r"\b(?:without|no|lacks?|lacking|free of|nor|not? (?:any|a single))\s+(?:any\s+|an?\s+|explicit\s+|single\s+)*"
    r"(?:failure|error|fault|failure or error|error or failure)[- ](?:words?|keywords?|terms?|messages?|indicators?)"
    r"|\b(?:does not|doesn't|do not) (?:contain|mention|hold|include) (?:any|an?) (?:failure|error)",
    re.IGNORECASE)
_CITE = re.compile(
    r"(?:similar (?:log|template|event|line|message)s?|neighbou?r(?:ing)?(?: log| template)?s?|"
    r"expert[- ]label(?:l)?ed(?: the)?(?: similar)?(?: log| template)?|shown (?:log|template|example)s?)"
    r"[^\"'.;]{0,40}?(?:\"([^\"]{2,200})\"|'([^']{2,120})')"
    r"(?:[\s,]*(?:\(?\s*(?:was\s+|is\s+|as\s+)?(?:labell?ed\s+|called\s+)?)(abnormal|normal)\b)?",
    re.IGNORECASE)


@dataclass(frozen=True)
class RationaleChecks:
    """The six checks on one rationale (see the module docstring); `passed` when all hold."""

    agrees: bool
    component_in_log: bool
    quotes_grounded: bool
    cited_neighbour_shown: bool
    false_no_failure_word: bool
    consistent: bool = True

    @property
    def passed(self) -> bool:
        """Every check holds (and no false "no failure word" claim)."""
        return not self.failed()

    def failed(self) -> list[str]:
        """The names of the failed checks, in CHECKS order (e.g. ['agrees', 'false_no_failure_word'])."""
        return [name for name in CHECKS if getattr(self, name) == (name == "false_no_failure_word")]


def conclusion(rationale: str) -> str | None:
    """'normal', 'abnormal' or None: the verdict the rationale concludes (rule in the module docstring)."""
    found = list(_CONCLUSION.finditer(rationale)) or list(_VERDICT_WORD.finditer(rationale))
    if not found:
        return None
    negated, word = found[-1].group(1), found[-1].group(2).lower()
    abnormal = word != "normal"
    return "abnormal" if abnormal != bool(negated) else "normal"


def named_component(rationale: str) -> str | None:
    """The component a rationale names as written: its first `backquoted` token, None without one."""
    match = _BACKQUOTED.search(rationale)
    return match.group(1).strip() if match else None


def cited_neighbours(rationale: str) -> list[tuple[str, str | None]]:
    """(quoted fragment, label word or None) for each neighbour the rationale cites."""
    return [((a or b).replace("…", "").strip(), label.lower() if label else None)
            for a, b, label in _CITE.findall(rationale)]


def claims_no_failure_word(rationale: str) -> bool:
    """The rationale says the log holds no failure or error word ("without any failure word", ...)."""
    return bool(_NO_FAILURE_WORD.search(rationale))


def argues_against(rationale: str, verdict: int | str) -> bool:
    """The rationale uses a deduction phrase of the other verdict (`ARGUES_FOR`), e.g. "routine status output"
    under an abnormal verdict. Raises ValueError for a verdict other than 0/1 or 'normal'/'abnormal'."""
    other = "normal" if label_name(verdict) == "abnormal" else "abnormal"
    text = _plain(rationale)
    return any(re.search(rf"\b{re.escape(phrase)}\b", text) for phrase in ARGUES_FOR[other])


def _neighbour(item: Neighbour) -> tuple[str, str | None]:
    if isinstance(item, str):
        return item, None
    template, label = item
    return str(template), label_name(label)


def check_rationale(rationale: str, log: str, dataset: str, shown_neighbours: Sequence[Neighbour],
                    verdict: int | str) -> RationaleChecks:
    """The six checks of one rationale against its log, the neighbours shown with it (templates, or (template,
    0/1 or label word) pairs) and the verdict it comes with (0/1 or 'normal'/'abnormal'; ValueError otherwise)."""
    near = [_neighbour(n) for n in shown_neighbours]
    named = named_component(rationale)
    component = named in log if named is not None else component_matches(rationale, log, dataset)
    cited = True
    for fragment, label in cited_neighbours(rationale):
        hits = [known for text, known in near if fragment and _plain(fragment) in _plain(text)]
        if not hits or (label is not None and all(known is not None and known != label for known in hits)):
            cited = False
    return RationaleChecks(
        agrees=conclusion(rationale) == label_name(verdict),
        component_in_log=component,
        quotes_grounded=quotes_grounded(rationale, [log, *(text for text, _ in near)]),
        cited_neighbour_shown=cited,
        false_no_failure_word=claims_no_failure_word(rationale) and bool(keyword_hits(log)),
        consistent=not argues_against(rationale, verdict))


RATIONALE_SOURCES = ("model", "evidence")  # who wrote the rationale a user is shown
NORMAL_BASIS = "the version scores it below its threshold, learned from expert-labelled logs"


@dataclass(frozen=True)
class ShownRationale:
    """The rationale a user is shown: `text`; `source` 'model' (the model's own, passing every check) or
    'evidence' (the teacher's evidence rationale, replacing one that failed); `failed`: the checks the model's
    rationale failed (empty for 'model')."""

    text: str
    source: str
    failed: tuple[str, ...] = ()


def evidence_rationale(log: str, dataset: str, shown_neighbours: Sequence[Neighbour], verdict: int | str) -> str:
    """The offline teacher's rationale for `verdict` (tasks.data.teachers.lexicon_rationale): the log's component
    and deciding words, a shown neighbour with the same label cited; for an error-worded normal log a documented
    benign reason, else the version's score (`NORMAL_BASIS`: no expert saw a served log). Neighbours without a
    label are not cited. Raises ValueError for a verdict other than 0/1 or 'normal'/'abnormal'."""
    labelled = [(text, label_id(known)) for text, known in map(_neighbour, shown_neighbours) if known is not None]
    return lexicon_rationale(log, label_id(verdict), dataset, labelled, normal_basis=NORMAL_BASIS)


def grounded_rationale(rationale: str, log: str, dataset: str, shown_neighbours: Sequence[Neighbour],
                       verdict: int | str) -> ShownRationale:
    """The guard of the served paths (module docstring): the model's `rationale` when it passes every check
    against its log, shown neighbours and verdict, else the evidence rationale for that verdict (an empty or
    unreadable rationale is replaced too: it concludes nothing). Raises ValueError for a verdict other than 0/1
    or 'normal'/'abnormal'."""
    failed = check_rationale(rationale, log, dataset, shown_neighbours, verdict).failed() if rationale else ["agrees"]
    if not failed:
        return ShownRationale(rationale, "model")
    return ShownRationale(evidence_rationale(log, dataset, shown_neighbours, verdict), "evidence", tuple(failed))


def faithfulness_report(items: Iterable[tuple[str, str, str, Sequence[Neighbour], int | str]]
                        ) -> dict[str, float | int]:
    """Over (rationale, log, dataset, shown neighbours, verdict) items with a non-empty rationale: `rationales`
    (how many), the share passing each check (`agrees`, `component_in_log`, `quotes_grounded`,
    `cited_neighbour_shown`), the share and count of false "no failure word" claims, and the share passing all
    (`all_pass`). Shares are 0.0 when there is no rationale."""
    checks = [check_rationale(r, log, d, near, v) for r, log, d, near, v in items if r]
    n = len(checks)

    def share(count: int) -> float:
        return round(count / n, 4) if n else 0.0

    report: dict[str, float | int] = {"rationales": n}
    for name in CHECKS:
        count = sum(getattr(c, name) for c in checks)
        report[name] = share(count)
        report[f"{name}_count"] = count
    report["all_pass"] = share(sum(c.passed for c in checks))
    return report
