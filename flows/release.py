"""Prefect flow `release`: evaluate → gate → register → (approve) → promote, with artifacts people read."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, task

from flows.common import file_text, publish_markdown, run_stages, use_profile
from tasks import registry
from tasks.config import repo_root, section
from tasks.dvc_ops import lock_hashes
from tasks.evaluate import evaluate_adapter
from tasks.gate import Verdict, evaluate_gate, same_test_data

CANDIDATE_TAG = "candidate.adapter_md5"


def candidate_digest() -> str:
    """The DVC md5 of the candidate adapter: the same adapter is never registered twice."""
    return lock_hashes().get("grpo", {}).get(section("grpo")["out_dir"], "")


@task(name="champion-metrics", retries=2, retry_delay_seconds=5)
def current_champion() -> dict[str, Any] | None:
    """The @champion's stored metrics, to compare on the same test data (retried: the registry may be remote)."""
    return registry.champion_metrics()


@task(name="re-evaluate-champion")
def champion_on_current_data(candidate: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The champion's metrics on the candidate's test data, re-measured when its stored ones used other data.

    After a data or cap change the stored F1s do not compare; rather than refuse every candidate
    (the `champion_same_test_data` rule), evaluate the champion's adapter again, like with like.
    """
    if champion is None or same_test_data(candidate, champion["metrics"]):
        return champion
    version = champion["version"]
    print(f"champion v{version} was measured on other test data: re-evaluating it on the current test data")
    dest = repo_root() / ".cache" / "champion-eval" / str(version)
    adapter = registry.download_adapter(f"{registry.model_name()}/{version}", dest)
    return {"version": version, "metrics": evaluate_adapter(adapter, section("evaluate")), "re_evaluated": True}


@task(name="gate")
def gate(metrics: dict[str, Any], champion: dict[str, Any] | None) -> Verdict:
    verdict = evaluate_gate(metrics, champion["metrics"] if champion else None,
                            champion_version=champion["version"] if champion else None)
    publish_markdown("gate-verdict", verdict.to_markdown(), "Every gate rule: threshold, measured, pass/fail")
    return verdict


@task(name="register", retries=2, retry_delay_seconds=5)
def register(metrics: dict[str, Any], verdict: Verdict, digest: str) -> str:
    """A new registry version for every evaluated candidate (@challenger when its gate passed)."""
    root = repo_root()
    version = registry.register_candidate(
        root / section("grpo")["out_dir"], root / section("base_model")["out_dir"], metrics, verdict,
        {CANDIDATE_TAG: digest},
    )
    card = registry.model_card_text(version)
    publish_markdown("model-card", card, f"Model card of version {version}")
    return version


@task(name="promote")
def promote(version: str, approver: str, reason: str) -> dict[str, Any]:
    return registry.promote(version, approver, reason)


@flow(name="release", log_prints=True)
def release_flow(profile: str | None = None) -> dict[str, Any]:
    """evaluate (DVC) → gate against @champion → register → optional human approval → promote."""
    use_profile(profile)
    stages = run_stages(["evaluate"])
    metrics = json.loads((repo_root() / section("evaluate")["metrics_file"]).read_text(encoding="utf-8"))
    table = file_text("reports/eval/eval.md", "(no report)")
    publish_markdown("evaluation-report", table, "Candidate beside the baselines, per dataset and level")
    result: dict[str, Any] = {"stages": stages, "table_md": table, "promoted": False}

    digest = candidate_digest()
    known = registry.version_with_tag(CANDIDATE_TAG, digest) if digest else None
    if known is not None:
        role = f" and @{registry.CHAMPION}" if registry.aliases().get(registry.CHAMPION) == known else ""
        result.update(version=known, reason=f"candidate unchanged (already registered as version {known}{role})",
                      verdict_md="(not re-gated: nothing new to release)")
        print(result["reason"])
        return result

    verdict = gate(metrics, champion_on_current_data(metrics, current_champion()))
    version = register(metrics, verdict, digest)
    result.update(version=version, verdict=verdict.to_dict(), verdict_md=verdict.to_markdown())
    if not verdict.passed:
        result["reason"] = "gate failed: " + ", ".join(rule.name for rule in verdict.failed)
        print(f"version {version} registered, not promoted: {result['reason']}")
        return result

    approver, why = "gate", "all gate rules passed"
    if section("gate").get("require_approval"):
        answer = registry.request_approval(verdict)
        if not answer.approve:
            registry.record_refusal(version, answer.approver, answer.reason)
            result["reason"] = f"refused by {answer.approver}: {answer.reason}"
            return result
        approver, why = answer.approver, answer.reason
    aliases = promote(version, approver, why)
    result.update(promoted=True, aliases=aliases, approver=approver)
    print(f"version {version} promoted to @champion (previous: {aliases.get('previous')})")
    return result


if __name__ == "__main__":
    release_flow()
