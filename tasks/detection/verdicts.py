"""What the detector asks and gets back: the classifier interface and one template's verdict.

Two classifiers implement it: serving.client.Client (the live endpoint over HTTP) and the evaluate stage's
in-process candidate (tasks.evaluation.served), so the served path is measured with the detector's own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    neighbour. `no_neighbour_rule`: the score flagged it, but its prompt showed no labelled neighbour of its own
    system and it holds no failure word, so it is normal (`no_neighbour_normal`).

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
    no_neighbour_rule: bool = False


RATIONALE_POLICIES = ("abnormal", "all", "none")  # params.yaml detect.rationales


def own_system_shown(found: Sequence[Neighbour], dataset: str | None) -> bool:
    """Whether any of the neighbours a prompt showed is of the template's own system (`system_key`)."""
    return any(system_key(n.dataset) == system_key(dataset) for n in found)


def no_neighbour_normal(template: str, own_neighbour_shown: bool | None) -> bool:
    """The verdict rule for a template judged without evidence of its own system (issue 18 item 5, the stated
    default for a system with no labelled templates; issue 20): when its prompt showed no labelled neighbour of its
    own system (`own_neighbour_shown` False, detect's `neighbour_shown`) and it holds no word of the keyword list
    (tasks.data.teachers.FAILURE_WORDS), it is normal whatever its score. None (a version without an index, or a
    classifier that does not say) turns the rule off.

    Why (measured 2026-12-06 with the default candidate): on Thunderbird_2k, never trained on and with no label in
    the index, the score flagged 48% of the mined templates the experts do not call abnormal, the keyword list 20%,
    the two together 19%. Per template, not per system: after 10 labelled Thunderbird templates the index shows a
    Thunderbird prompt only Thunderbird neighbours, and the held-out templates with none above the floor were
    flagged 134 of 150 times (bench/thunderbird_loop.py). On the BGL and Spirit test templates the rule turns 1 and
    2 flagged templates normal (one of them an anomaly).
    """
    return own_neighbour_shown is False and not keyword_hits(template)


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
