"""gate: a promotion decision as data. Every rule, its threshold, the measured value and pass/fail.

Pure function over metrics dicts (the candidate's and the current champion's, as tasks.evaluate writes
them), so the same verdict can be recomputed, stored with the model version and shown to a person.
Rules (params.yaml `gate`):
- min_f1.<set>: the candidate's F1 on that test set is at least the threshold;
- min_recall_abnormal: recall on abnormal at least this on every gated set (missed failures are the costly error);
- max_format_invalid_rate: share of answers that break the format at most this, on every gated set;
- champion_same_test_data: the champion's metrics were measured on the same test data (else F1s don't compare);
- champion_margin: mean F1 over the gated sets beats the champion's by at least this;
- max_regression.<set>: no test set's F1 falls more than this below the champion's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.common.contracts import CANDIDATE
from tasks.common.formatting import fmt_number
from tasks.common.settings import GateSettings

COMPARED_SETS = ("template_bgl", "template_spirit", "session_bgl2k", "session_hdfs")


@dataclass(frozen=True)
class Rule:
    """One gate rule: its threshold, the measured value, pass/fail and a detail for a person."""
    name: str
    threshold: float | str | None
    measured: float | str | None
    passed: bool
    detail: str = ""


@dataclass
class GateVerdict:
    """The promotion decision as data: every rule, the champion it was compared with, whether approval is required."""
    rules: list[Rule]
    candidate: str = CANDIDATE
    champion_version: str | None = None
    require_approval: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every rule passed."""
        return all(rule.passed for rule in self.rules)

    @property
    def failed(self) -> list[Rule]:
        """The rules that failed, in order."""
        return [rule for rule in self.rules if not rule.passed]

    def to_dict(self) -> dict[str, Any]:
        """As plain data (stored as a registry version tag and an MLflow artifact)."""
        return {"passed": self.passed, "candidate": self.candidate, "champion_version": self.champion_version,
                "require_approval": self.require_approval, "failed": [r.name for r in self.failed],
                "rules": [asdict(r) for r in self.rules], "params": self.params}

    def to_json(self) -> str:
        """`to_dict` as canonical JSON."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateVerdict:
        """The verdict back from `to_dict`'s output."""
        return cls(rules=[Rule(**r) for r in data.get("rules", [])], candidate=data.get("candidate", CANDIDATE),
                   champion_version=data.get("champion_version"),
                   require_approval=bool(data.get("require_approval", False)), params=data.get("params", {}))

    def summary(self) -> str:
        """One line: PASSED, or every failed rule with its measured value and threshold."""
        if self.passed:
            return "PASSED: every rule holds"
        return "FAILED: " + "; ".join(f"{r.name} measured {fmt_number(r.measured, 4)} vs threshold "
                                      f"{fmt_number(r.threshold, 4)}" + (f" ({r.detail})" if r.detail else "")
                                      for r in self.failed)

    def to_markdown(self) -> str:
        """A Markdown table of every rule for the Prefect artifact and the model card."""
        champion = f"champion v{self.champion_version}" if self.champion_version else "no champion yet"
        lines = [f"# Gate: {'PASSED' if self.passed else 'FAILED'}", "",
                 f"Candidate **{self.candidate}** against {champion}."
                 + (" Human approval is required before promotion." if self.require_approval else ""), "",
                 "| rule | threshold | measured | result | detail |", "|---|---|---|---|---|"]
        for r in self.rules:
            lines.append(f"| {r.name} | {fmt_number(r.threshold, 4)} | {fmt_number(r.measured, 4)} | "
                         f"{'pass' if r.passed else '**FAIL**'} | {r.detail} |")
        return "\n".join(lines) + "\n"


def method_block(metrics: dict[str, Any] | None, method: str | None = None) -> dict[str, Any] | None:
    """The per-set metrics of one method: accepts metrics.json whole, or a method's block already."""
    if metrics is None:
        return None
    if "methods" in metrics:
        method = method or metrics.get("candidate", CANDIDATE)
        if method not in metrics["methods"]:
            raise KeyError(f"metrics have no method {method!r}; found {sorted(metrics['methods'])}")
        return metrics["methods"][method]
    return metrics


def _digests(metrics: dict[str, Any] | None) -> dict[str, str]:
    return dict((metrics or {}).get("test_data", {}).get("digests", {}))


def same_test_data(candidate: dict[str, Any], champion: dict[str, Any] | None) -> bool:
    """True when every test set both were measured on has the same content digest."""
    cand, champ = _digests(candidate), _digests(champion)
    return all(cand[name] == champ[name] for name in set(cand) & set(champ))


def _f1(block: dict[str, Any], name: str) -> float | None:
    value = block.get(name, {}).get("f1")
    return float(value) if value is not None else None


def evaluate_gate(candidate: dict[str, Any], champion: dict[str, Any] | None, settings: GateSettings,
                  *, champion_version: str | None = None, candidate_name: str | None = None) -> GateVerdict:
    """The verdict for `candidate` (metrics.json or a method block) against `champion` (same shape, or None).

    Every rule of `settings` becomes a `Rule` with threshold, measured value and pass/fail; nothing raises
    for a missing test set (that rule fails and says so).
    """
    params = settings.model_dump()
    cand = method_block(candidate, candidate_name) or {}
    champ = method_block(champion)
    rules: list[Rule] = []
    min_f1: dict[str, float] = {str(k): float(v) for k, v in (params.get("min_f1") or {}).items()}
    gated = list(min_f1)

    for name, threshold in min_f1.items():
        f1 = _f1(cand, name)
        rules.append(Rule(f"min_f1.{name}", threshold, f1, f1 is not None and f1 >= threshold,
                          "" if f1 is not None else "test set missing from the candidate's metrics"))
    if params.get("min_recall_abnormal") is not None:
        threshold = float(params["min_recall_abnormal"])
        for name in gated:
            recall = cand.get(name, {}).get("recall")
            rules.append(Rule(f"min_recall_abnormal.{name}", threshold, recall,
                              recall is not None and float(recall) >= threshold))
    if params.get("max_format_invalid_rate") is not None:
        threshold = float(params["max_format_invalid_rate"])
        for name in gated:
            valid = cand.get(name, {}).get("format_valid_rate")
            invalid = None if valid is None else round(1.0 - float(valid), 6)
            rules.append(Rule(f"max_format_invalid_rate.{name}", threshold, invalid,
                              invalid is not None and invalid <= threshold,
                              "" if invalid is not None else "no format-valid rate (not an LLM?)"))

    if champ is None:
        rules.append(Rule("champion_margin", float(params.get("champion_margin", 0.0)), None, True,
                          "no champion yet: first candidate"))
    else:
        cand_digests, champ_digests = _digests(candidate), _digests(champion)
        shared = sorted(set(cand_digests) & set(champ_digests))
        differ = [s for s in shared if cand_digests[s] != champ_digests[s]]
        if cand_digests and champ_digests:
            rules.append(Rule("champion_same_test_data", "identical", "differs: " + ", ".join(differ) if differ
                              else "identical", not differ,
                              "re-evaluate the champion on the current test data" if differ else ""))
        cand_f1 = [_f1(cand, s) for s in gated]
        champ_f1 = [_f1(champ, s) for s in gated]
        margin = float(params.get("champion_margin", 0.0))
        if gated and None not in cand_f1 and None not in champ_f1:
            cand_mean = sum(cand_f1) / len(cand_f1)  # type: ignore[arg-type]
            champ_mean = sum(champ_f1) / len(champ_f1)  # type: ignore[arg-type]
            delta = round(cand_mean - champ_mean, 6)
            rules.append(Rule("champion_margin", margin, delta, delta >= margin,
                              f"mean F1 over {', '.join(gated)}: candidate {cand_mean:.4f}, "
                              f"champion {champ_mean:.4f}"))
        else:
            rules.append(Rule("champion_margin", margin, None, False, "F1 missing for a gated set"))
        if params.get("max_regression_per_dataset") is not None:
            limit = float(params["max_regression_per_dataset"])
            for name in COMPARED_SETS:
                now, before = _f1(cand, name), _f1(champ, name)
                if now is None or before is None:
                    continue
                drop = round(before - now, 6)
                rules.append(Rule(f"max_regression.{name}", limit, drop, drop <= limit,
                                  f"F1 {before:.4f} → {now:.4f}"))
    return GateVerdict(rules=rules, candidate=candidate_name or (candidate or {}).get("candidate", CANDIDATE),
                   champion_version=champion_version, require_approval=bool(params.get("require_approval", False)),
                   params=dict(params))
