"""What the detector asks and gets back: the classifier interface and one template's verdict.

Two classifiers implement it: serving.client.Client (the live endpoint over HTTP) and the evaluate stage's
in-process candidate (tasks.evaluation.served), so the served path is measured with the detector's own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tasks.common.prompt import ABNORMAL, NORMAL
from tasks.common.retrieval import Neighbour, system_key
from tasks.data.teachers import keyword_hits


class ClassifierError(RuntimeError):
    """The classifier could not answer (after its retries), or the model changed during a run."""


@dataclass(frozen=True)
class TemplateVerdict:
    """One template's answer. `verdict` is None when no verdict could be read (`valid` False): with a threshold
    `valid` means the verdict was scored, without one that the rationale was format-valid.

    `score` is the calibrated verdict score P(abnormal) in [0, 1] (None when not asked for or not readable);
    with a score, `verdict` is the score against the model's threshold. `rationale` is the text inside
    <think> (empty when no rationale was asked for); `raw` the whole completion; `answer` the word the
    rationale ended in (None when none was written or the completion broke the format); `latency_s` seconds
    from request to answer (retries included).

    `neighbour_shown`: whether the prompt showed a labelled neighbour of the template's own system (a template
    of a system the index does not hold gets False even when neighbours of other systems were shown; issue 20
    item 4); None when the classifier does not say. `first_stage`: decided by the verdict rule's first stage
    (tasks.common.prompt.first_stage_normal: no word of letters, normal without a model call), which needs no
    neighbour. `no_evidence_rule`: the score flagged it, but it holds no failure word and the most similar
    labelled neighbour of its own system its prompt showed is not abnormal, so it is normal (`no_evidence_normal`).
    `labelled_template`: the index holds this very template of its system, labelled, and the verdict is that label
    (`labelled_template`).

    `rationale_source`: who wrote `rationale` ('model', or 'evidence' when the model's rationale failed a check
    and the teacher's evidence rationale for the verdict replaced it: tasks.evaluation.rationales.
    grounded_rationale, issue 19); None when there is no rationale. The model's own text stays in `raw`.
    """

    template: str
    dataset: str
    verdict: str | None
    valid: bool
    rationale: str
    raw: str
    model_version: str
    latency_s: float
    score: float | None = None
    answer: str | None = None
    neighbour_shown: bool | None = None
    first_stage: bool = False
    rationale_source: str | None = None
    no_evidence_rule: bool = False
    labelled_template: bool = False


RATIONALE_POLICIES = ("abnormal", "all", "none")  # params.yaml detect.rationales


def own_system_shown(found: Sequence[Neighbour], dataset: str | None) -> bool:
    """Whether any of the neighbours a prompt showed is of the template's own system (`system_key`)."""
    return any(system_key(n.dataset) == system_key(dataset) for n in found)


def nearest_own_abnormal(found: Sequence[Neighbour], dataset: str | None) -> bool:
    """Whether the most similar neighbour of the template's own system the prompt showed is labelled abnormal
    (False when none of its own system was shown)."""
    own = [n for n in found if system_key(n.dataset) == system_key(dataset)]
    return bool(own) and max(own, key=lambda n: n.similarity).label == 1


def labelled_template(template: str, dataset: str | None, found: Sequence[Neighbour]) -> int | None:
    """The label (0 normal, 1 abnormal) of a shown neighbour of the template's own system whose text is the
    template's (after strip): the index holds this very template, labelled by experts or an operator's review file
    (issue 20: "label the templates that matter and expect the detector to learn them"). None when there is none."""
    text = str(template).strip()
    for n in found:
        if n.label in (0, 1) and system_key(n.dataset) == system_key(dataset) and str(n.template).strip() == text:
            return int(n.label)
    return None


def no_evidence_normal(template: str, nearest_abnormal: bool | None) -> bool:
    """The verdict rule for an alert without evidence (issue 18 items 4 and 5, issue 20): a template the score
    flagged is normal when it holds no word of the keyword list (tasks.data.teachers.FAILURE_WORDS) and the most
    similar labelled neighbour of its own system its prompt showed is not abnormal (`nearest_abnormal` False:
    `nearest_own_abnormal`; also when none of its system was shown, the case issue 18 item 5 asks a default for: a
    system without labels alerts on failure words only). None (a version without an index, or a classifier that
    does not say) turns the rule off.

    Why (measured 2026-12-06 on the default candidate, the answers from the evaluation's answer memo): on
    Thunderbird_2k, never trained on and with no label in the index, the score flagged 48% of the mined templates
    the experts do not call abnormal, the keyword list 20%, the two together 19%. After 50 labelled Thunderbird
    templates, "no neighbour of its own system" no longer applied to 141 of 177 held-out templates, 44 of which
    the score flagged, only 3 with an abnormal Thunderbird neighbour shown (bench/thunderbird_loop.py). On the
    whole BGL and Spirit test split, abnormal-class F1 of the score alone, of "any abnormal neighbour of its
    system shown" and of this rule: BGL 0.672 / 0.694 / 0.696, Spirit 0.515 / 0.514 / 0.541 (the candidate's
    scores read back from the answer memo, no model call).
    """
    return nearest_abnormal is False and not keyword_hits(template)


@dataclass(frozen=True)
class RuledVerdict:
    """The verdict after the version's rules on top of the score: `verdict`, and which rule decided it, if any
    (`labelled`: the index holds the template, labelled; `no_evidence`: flagged without evidence)."""

    verdict: str | None
    labelled: bool = False
    no_evidence: bool = False


def apply_verdict_rules(template: str, dataset: str | None, found: Sequence[Neighbour] | None,
                        verdict: str | None) -> RuledVerdict:
    """`verdict` (the score against the threshold; None when none was read) after the rules that read the shown
    neighbours `found` (None: the version has no index, the rules are off): a labelled template takes its label
    (`labelled_template`), whatever the score or the first stage said; else an abnormal verdict without
    evidence is normal (`no_evidence_normal`)."""
    if found is None:
        return RuledVerdict(verdict)
    label = labelled_template(template, dataset, found)
    if label is not None:
        return RuledVerdict(ABNORMAL if label else NORMAL, labelled=True)
    if verdict == ABNORMAL and no_evidence_normal(template, nearest_own_abnormal(found, dataset)):
        return RuledVerdict(NORMAL, no_evidence=True)
    return RuledVerdict(verdict)


def shows_rationale(policy: str, verdict: str | None, has_threshold: bool) -> bool:
    """Whether `detect` asks for (and a user sees) a rationale for a template with this scored `verdict`, under
    `policy` (params.yaml detect.rationales: abnormal | all | none). A version without a threshold is served by
    the word its rationale ends in, so every template gets one whatever the policy."""
    return not has_threshold or policy == "all" or (policy == "abnormal" and verdict == "abnormal")


class Classifier(Protocol):
    """Answers (dataset, template) items; `on_result` is called in the caller's thread as each answer arrives."""

    def classify(self, items: Sequence[tuple[str, str]], *,
                 on_result: Callable[[TemplateVerdict], None] | None = None) -> list[TemplateVerdict]:
        """Verdicts in input order; raises ClassifierError when it cannot answer (answers already passed to
        `on_result` are kept by the caller)."""
        ...

    def model_version(self) -> str:
        """The version of the model that answers (keys the verdict cache)."""
        ...

    def close(self) -> None:
        """Free connections or model memory."""
        ...
