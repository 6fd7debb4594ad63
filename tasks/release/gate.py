"""gate: a promotion decision as data. Every rule, its threshold, the measured value and pass/fail.

Pure function over metrics dicts (the candidate's and the current champion's, as tasks.evaluate writes
them) and their per-item predictions, so the same verdict can be recomputed, stored with the model version
and shown to a person. Each rule row carries the measured value's 95% interval when there is one.
Rules (params.yaml `gate`):
- min_f1.<set>: the candidate's abnormal-class F1 on that test set is at least the threshold;
- min_recall_abnormal.<set>: recall on abnormal at least this on every min_f1 set (missed failures cost most);
- max_false_alarm_rate.<set>: on a set without anomalies, the share flagged abnormal at most this;
- max_format_invalid_rate.<set>: share of answers that break the format at most this, on every min_f1 set;
- champion_same_test_data: the champion's results were measured on the same test data (else they don't compare);
- champion_margin: the paired bootstrap interval of (candidate − champion) mean F1 over the min_f1 sets lies
  above −champion_margin, so a gain within sampling noise never replaces the champion (issue 13);
- max_regression.<set>: no test set's F1 falls more than this below the champion's (point values);
- min_rationale_agreement, min_component_in_log, min_quotes_grounded, min_cited_neighbour_shown: the share of
  rationales passing that check (tasks.evaluation.rationales, issue 19 item 3) on the worst set, over the
  rationales of `rationale_scope` (shown: those `detect` gives a user, after the served guard; shown_model: the
  model's own on those items; all: every one written), at least this;
- max_false_no_failure_word: false "no failure word" claims over every rationale in scope (each template once)
  at most this;
- max_rationale_replaced: the share of shown rationales the served guard replaced by the evidence rationale
  (tasks.evaluation.rationales.grounded_rationale: the model's own failed a check), worst set, at most this.
Read from metrics.json's `rationales` block (tasks.evaluate.rationale_summary); a rule set on metrics without
that block fails and says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.common.contracts import CANDIDATE
from tasks.common.formatting import fmt_number
from tasks.common.settings import GateSettings
from tasks.evaluation.intervals import BootstrapSettings, paired_mean_f1_difference

COMPARED_SETS = ("template_bgl", "template_spirit", "session_bgl2k", "session_hdfs", "served_bgl2k_lines_corrected")


@dataclass(frozen=True)
class Rule:
    """One gate rule: its threshold, the measured value and its 95% interval [low, high] (None when there is
    none), pass/fail and a detail for a person."""

    name: str
    threshold: float | str | None
    measured: float | str | None
    passed: bool
    detail: str = ""
    interval: list[float] | None = None


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
                 "| rule | threshold | measured | 95% interval | result | detail |", "|---|---|---|---|---|---|"]
        for r in self.rules:
            interval = f"[{r.interval[0]:.4f}, {r.interval[1]:.4f}]" if r.interval else "—"
            lines.append(f"| {r.name} | {fmt_number(r.threshold, 4)} | {fmt_number(r.measured, 4)} | {interval} | "
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


def _bootstrap(metrics: dict[str, Any]) -> BootstrapSettings:
    b = metrics.get("bootstrap") or {}
    return BootstrapSettings(int(b.get("resamples", 2000)), float(b.get("confidence", 0.95)), int(b.get("seed", 42)))


def champion_margin_rule(candidate_items: dict[str, Any] | None, champion_items: dict[str, Any] | None,
                         gated: list[str], margin: float, bootstrap: BootstrapSettings) -> Rule:
    """The paired rule: the interval of (candidate − champion) mean F1 over `gated` must lie above −margin.

    Both item-prediction dicts are tasks.evaluate.item_predictions output; the items must be the same
    (same digest per set), else the rule fails and says which set differs.
    """
    if not gated:
        return Rule("champion_margin", -margin, None, True, "no gated set")
    if candidate_items is None or champion_items is None:
        missing = "candidate" if candidate_items is None else "champion"
        return Rule("champion_margin", -margin, None, False, f"no per-item predictions of the {missing}: the paired "
                    "difference cannot be drawn (re-evaluate it on the current test data)")
    sets: dict[str, tuple[Any, Any, Any]] = {}
    for name in gated:
        cand, champ = candidate_items.get(name), champion_items.get(name)
        if cand is None or champ is None:
            return Rule("champion_margin", -margin, None, False, f"set {name} missing from the "
                        f"{'candidate' if cand is None else 'champion'}'s predictions")
        if cand.get("digest") != champ.get("digest") or cand["ids"] != champ["ids"]:
            return Rule("champion_margin", -margin, None, False,
                        f"set {name}: the champion was measured on other items")
        sets[name] = (cand["labels"], cand["pred"], champ["pred"])
    diff = paired_mean_f1_difference(sets, bootstrap)
    interval = list(diff.interval) if diff.interval else None
    low = interval[0] if interval else diff.difference
    return Rule("champion_margin", -margin, round(diff.difference, 6), low > -margin,
                f"candidate − champion mean F1 over {', '.join(gated)}; the interval's lower end must exceed "
                f"{-margin:+.4f}", interval)


# gate field → the check of tasks.evaluation.rationales it bounds from below (a share per set)
RATIONALE_SHARE_RULES = {"min_rationale_agreement": "agrees", "min_component_in_log": "component_in_log",
                         "min_quotes_grounded": "quotes_grounded", "min_cited_neighbour_shown": "cited_neighbour_shown"}


def rationale_rules(metrics: dict[str, Any] | None, settings: GateSettings) -> list[Rule]:
    """The faithfulness rules set in `settings` (module docstring), from metrics.json's `rationales` block."""
    wanted = {name: getattr(settings, name)
              for name in (*RATIONALE_SHARE_RULES, "max_false_no_failure_word", "max_rationale_replaced")
              if getattr(settings, name) is not None}
    if not wanted:
        return []
    block = (metrics or {}).get("rationales") or {}
    scope = settings.rationale_scope
    if "sets" not in block or "pooled" not in block:
        return [Rule(name, threshold, None, False, "no rationale faithfulness in the candidate's metrics "
                     "(re-evaluate with the current evaluate stage)") for name, threshold in wanted.items()]
    per_set = {name: scopes.get(scope) or {} for name, scopes in block["sets"].items()}
    measured = {name: row for name, row in per_set.items() if row.get("rationales")}
    where = f"{scope} rationales (detect.rationales: {block.get('policy')})"
    rules = []
    for name, threshold in wanted.items():
        if name == "max_false_no_failure_word":
            count = int((block["pooled"].get(scope) or {}).get("false_no_failure_word_count", 0))
            offenders = [s for s, row in measured.items() if row.get("false_no_failure_word_count")]
            rules.append(Rule(name, threshold, count, count <= threshold,
                              f"{where}, each template once" + (f"; in {', '.join(offenders)}" if offenders else "")))
            continue
        if name == "max_rationale_replaced":
            shown = {s: scopes.get("shown") or {} for s, scopes in block["sets"].items()}
            shown = {s: row for s, row in shown.items() if row.get("rationales") and "replaced" in row}
            worst = max(shown, key=lambda s: shown[s]["replaced"], default=None)
            value = shown[worst]["replaced"] if worst else None
            rules.append(Rule(name, threshold, value, value is not None and value <= threshold,
                              f"shown rationales replaced by the evidence rationale; worst set {worst}" if worst else
                              "no replacement count in the candidate's metrics (re-evaluate with the current "
                              "evaluate stage)"))
            continue
        check = RATIONALE_SHARE_RULES[name]
        if not measured:
            rules.append(Rule(name, threshold, None, True, f"no {where} on any set"))
            continue
        worst = min(measured, key=lambda s: measured[s][check])
        failing = [s for s, row in measured.items() if row[check] < threshold]
        rules.append(Rule(name, threshold, measured[worst][check], not failing,
                          f"{check} on {where}; worst set {worst} ({measured[worst]['rationales']} rationales)"
                          + (f"; below on {', '.join(failing)}" if failing else "")))
    return rules


def evaluate_gate(candidate: dict[str, Any], champion: dict[str, Any] | None, settings: GateSettings,
                  *, champion_version: str | None = None, candidate_name: str | None = None,
                  candidate_items: dict[str, Any] | None = None,
                  champion_items: dict[str, Any] | None = None) -> GateVerdict:
    """The verdict for `candidate` (metrics.json or a method block) against `champion` (same shape, or None).

    `candidate_items` / `champion_items` are the per-item predictions (tasks.evaluate.item_predictions) the
    paired champion rule resamples. Every rule of `settings` becomes a `Rule`; nothing raises for a missing
    test set (that rule fails and says so).
    """
    cand = method_block(candidate, candidate_name) or {}
    champ = method_block(champion)
    rules: list[Rule] = []
    gated = list(settings.min_f1)

    def interval(name: str, key: str) -> list[float] | None:
        value = cand.get(name, {}).get(key)
        return list(value) if value else None

    for name, threshold in settings.min_f1.items():
        f1 = _f1(cand, name)
        rules.append(Rule(f"min_f1.{name}", threshold, f1, f1 is not None and f1 >= threshold,
                          "" if f1 is not None else "test set missing from the candidate's metrics",
                          interval(name, "f1_ci")))
    if settings.min_recall_abnormal is not None:
        threshold = settings.min_recall_abnormal
        for name in gated:
            recall = cand.get(name, {}).get("recall")
            rules.append(Rule(f"min_recall_abnormal.{name}", threshold, recall,
                              recall is not None and float(recall) >= threshold))
    for name, threshold in settings.max_false_alarm_rate.items():
        rate = cand.get(name, {}).get("false_alarm_rate")
        rules.append(Rule(f"max_false_alarm_rate.{name}", threshold, rate, rate is not None and rate <= threshold,
                          "" if rate is not None else "test set missing from the candidate's metrics",
                          interval(name, "false_alarm_rate_ci")))
    if settings.max_format_invalid_rate is not None:
        threshold = settings.max_format_invalid_rate
        for name in gated:
            valid = cand.get(name, {}).get("format_valid_rate")
            invalid = None if valid is None else round(1.0 - float(valid), 6)
            rules.append(Rule(f"max_format_invalid_rate.{name}", threshold, invalid,
                              invalid is not None and invalid <= threshold,
                              "" if invalid is not None else "no format-valid rate (not an LLM?)"))
    rules += rationale_rules(candidate, settings)

    if champ is None:
        rules.append(Rule("champion_margin", -settings.champion_margin, None, True, "no champion yet: first candidate"))
    else:
        cand_digests, champ_digests = _digests(candidate), _digests(champion)
        shared = sorted(set(cand_digests) & set(champ_digests))
        differ = [s for s in shared if cand_digests[s] != champ_digests[s]]
        if cand_digests and champ_digests:
            rules.append(Rule("champion_same_test_data", "identical", "differs: " + ", ".join(differ) if differ
                              else "identical", not differ,
                              "re-evaluate the champion on the current test data" if differ else ""))
        rules.append(champion_margin_rule(candidate_items, champion_items, gated, settings.champion_margin,
                                          _bootstrap(candidate)))
        if settings.max_regression_per_dataset is not None:
            limit = settings.max_regression_per_dataset
            for name in COMPARED_SETS:
                now, before = _f1(cand, name), _f1(champ, name)
                if now is None or before is None:
                    continue
                drop = round(before - now, 6)
                rules.append(Rule(f"max_regression.{name}", limit, drop, drop <= limit,
                                  f"F1 {before:.4f} → {now:.4f}"))
    return GateVerdict(rules=rules, candidate=candidate_name or (candidate or {}).get("candidate", CANDIDATE),
                       champion_version=champion_version, require_approval=settings.require_approval,
                       params=settings.model_dump())
