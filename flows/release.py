"""Prefect flow `release`: evaluate → gate → register → (approve) → promote, with artifacts people read.

Flow `release-index-only` (issue 20): new expert labels served without retraining. It rebuilds the retrieval
index from the review files (DVC: correct → index), keeps the adapter of the current @champion, re-measures
what the version's verdict and the gate need (tasks.evaluate.evaluate_kept_adapter: the validation-fold
threshold, the gated sets, the rationales) and registers the result as a new version judged by the same gate.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import flow, task
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.common import file_text, pipeline_lock, publish_markdown, run_stages, start_run
from tasks.common.config import repo_root
from tasks.common.contracts import CALIBRATION_FILE, OPEN_QUESTION_FORMAT
from tasks.common.dvc_ops import lock_hashes
from tasks.common.errors import InputError
from tasks.common.files import sha256_bytes, sha256_json
from tasks.common.settings import Settings
from tasks.evaluate import evaluate_adapter, evaluate_kept_adapter
from tasks.evaluation.report import CANDIDATE_PREDICTIONS
from tasks.release import registry
from tasks.release.gate import GateVerdict, evaluate_gate, same_test_data
from tasks.release.pyfunc import model_config, read_prompt_format

CANDIDATE_TAG = "candidate.adapter_md5"
# sha256 of the metrics the candidate was gated on and of the gate rules: a version is re-judged (registered
# anew, with its new verdict) when either changes, e.g. a gate rule edited after a candidate failed it.
JUDGEMENT_TAG = "candidate.judgement_sha256"
# The release flow run that registered a version: a retry of `register` in that run finds it instead of adding one.
RUN_TAG = "release.flow_run_id"
# An index-only release (issue 20): its kind, and the version whose adapter it kept.
KIND_TAG, ADAPTER_FROM_TAG = "release.kind", "release.adapter_from"
INDEX_ONLY = "index-only"
# The index-only release's working folder: the kept adapter as downloaded, and its evaluation (metrics.json,
# candidate_predictions.json, calibration.json) under `eval/`.
INDEX_RELEASE_DIR = ".cache/index-release"


class ApprovalInput(RunInput):
    """What the approver types into the Prefect UI when the release flow pauses."""

    approver: str = Field(min_length=1, description="Who decides (recorded on the model version)")
    approve: bool = Field(description="Promote this version to @champion?")
    reason: str = Field(description="Why (recorded on the model version)")


def request_approval(verdict: GateVerdict, timeout_s: int = 24 * 3600) -> ApprovalInput:
    """Pause the running flow until a person approves or rejects (Prefect UI, or `POST /api/flow_runs/<id>/resume`
    with `{"run_input": {...}}`); returns the answer. Raises RuntimeError outside a flow run."""
    if FlowRunContext.get() is None:
        raise RuntimeError("request_approval must be called inside a Prefect flow run (it pauses that flow)")
    description = "Approve promotion to @champion?\n\n" + verdict.to_markdown()
    return pause_flow_run(
        wait_for_input=ApprovalInput.with_initial_data(description=description, approve=False, reason=""),
        timeout=timeout_s, key="approval")


def calibration(settings: Settings) -> dict[str, Any] | None:
    """The candidate's verdict threshold written by the evaluate stage (None when it fitted none)."""
    path = repo_root() / settings.evaluate.out_dir / CALIBRATION_FILE
    value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return value or None


def judgement_digest(settings: Settings, metrics_file: Path | None = None) -> str:
    """What a gate verdict depends on besides the adapter: the evaluation's metrics file (default
    evaluate.metrics_file) and the gate rules."""
    metrics = (metrics_file or repo_root() / settings.evaluate.metrics_file).read_bytes()
    return sha256_bytes(metrics + sha256_json(settings.gate.model_dump(mode="json")).encode())


def candidate_digest(settings: Settings) -> str:
    """The DVC md5 of the candidate adapter: registered once per judgement (see JUDGEMENT_TAG)."""
    return lock_hashes().get("grpo", {}).get(settings.grpo.out_dir, "")


@task(name="champion-metrics", retries=2, retry_delay_seconds=5)
def current_champion(model_name: str) -> dict[str, Any] | None:
    """The @champion's stored metrics, to compare on the same test data (retried: the registry may be remote)."""
    return registry.champion_metrics(model_name)


@task(name="re-evaluate-champion")
def champion_on_current_data(candidate: dict[str, Any], champion: dict[str, Any] | None,
                             settings: Settings) -> dict[str, Any] | None:
    """The champion's metrics and per-item predictions on the candidate's test data, re-measured when its stored
    ones used other data or it has no per-item predictions (registered before they were kept).

    After a data or cap change the stored F1s do not compare; rather than refuse every candidate
    (the `champion_same_test_data` rule), evaluate the champion's adapter again, like with like.
    """
    if champion is None or (same_test_data(candidate, champion["metrics"]) and champion.get("items")):
        return champion
    version = champion["version"]
    why = "has no per-item predictions" if same_test_data(candidate, champion["metrics"]) else \
        "was measured on other test data"
    print(f"champion v{version} {why}: re-evaluating it on the current test data")
    dest = repo_root() / ".cache" / "champion-eval" / str(version)
    adapter = registry.download_adapter(f"{settings.registry.model_name}/{version}", dest)
    metrics, items = evaluate_adapter(adapter, settings.evaluate, settings.detect, settings.index)
    return {"version": version, "metrics": metrics, "items": items, "re_evaluated": True}


@task(name="gate")
def gate(metrics: dict[str, Any], items: dict[str, Any], champion: dict[str, Any] | None,
         settings: Settings) -> GateVerdict:
    """The verdict as data: the candidate's per-item predictions paired with the champion's."""
    return evaluate_gate(metrics, champion["metrics"] if champion else None, settings.gate,
                         champion_version=champion["version"] if champion else None, candidate_items=items,
                         champion_items=champion.get("items") if champion else None)


P = ParamSpec("P")
R = TypeVar("R")


def _step(step: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """A task of this module as a Prefect task run inside a flow run, as its plain function outside one (the
    `rationanomaly gate` command: no Prefect server for a read-only verdict)."""
    if FlowRunContext.get() is None:
        return step.fn(*args, **kwargs)  # type: ignore[attr-defined]
    return step(*args, **kwargs)


@dataclass
class KeptAdapter:
    """An index-only release's adapter: the @champion's (`version`), downloaded into `adapter_dir`, with the
    manifest md5 it was registered with; `calibration` the threshold refitted with the new index; `prompt_format`
    the explain prompt the adapter was trained on (tasks.common.prompt), kept in the new version's calibration."""

    version: str
    adapter_dir: Path
    adapter_md5: str
    calibration: dict[str, Any] | None = None
    prompt_format: int = OPEN_QUESTION_FORMAT

    def tags(self) -> dict[str, str]:
        """The version tags that say what this release kept."""
        return {KIND_TAG: INDEX_ONLY, ADAPTER_FROM_TAG: self.version}


@dataclass
class Judgement:
    """The release decision on the evaluated candidate before anything is registered.

    `known`: the version already registered for this candidate (the @champion itself, or the same adapter judged
    on the same metrics and gate rules): nothing new to release, `verdict` is the one stored with it (None when
    it has none) and `reason` says so. Otherwise `verdict` is the fresh verdict against the comparable @champion.
    `digest` and `judgement` are the candidate's CANDIDATE_TAG and JUDGEMENT_TAG values.
    """

    metrics: dict[str, Any]
    items: dict[str, Any]
    digest: str
    judgement: str
    verdict: GateVerdict | None
    known: str | None = None
    reason: str = ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg}", line=exc.lineno) from exc


def judge(settings: Settings, metrics_file: Path | None = None, items_file: Path | None = None) -> Judgement:
    """The verdict the release flow acts on, and the one `rationanomaly gate` shows: one function, so the two
    cannot differ (issue 22, item 5: right after `make run` the command judged the new champion against itself
    without the candidate's per-item predictions and failed `champion_margin`, while the flow had passed).

    Reads the candidate's metrics (default evaluate.metrics_file) and per-item predictions (default
    evaluate.out_dir/candidate_predictions.json; {} when absent, and then `champion_margin` fails saying so),
    answers with the registered version when this candidate was already judged, else gates it against the
    @champion measured on the same test data (re-evaluated when its stored results do not compare). Raises
    FileNotFoundError without metrics, InputError for a file that is not JSON, RegistryError when the registry
    cannot be read.
    """
    name = settings.registry.model_name
    metrics_file = metrics_file or repo_root() / settings.evaluate.metrics_file
    items_file = items_file or repo_root() / settings.evaluate.out_dir / CANDIDATE_PREDICTIONS
    metrics = _read_json(metrics_file)
    items = _read_json(items_file) if items_file.is_file() else {}
    digest, judgement = candidate_digest(settings), judgement_digest(settings, metrics_file)
    decided = Judgement(metrics, items, digest, judgement, None)

    same_adapter = registry.versions_with_tags({CANDIDATE_TAG: digest}, name=name) if digest else []
    champion = registry.aliases(name).get(registry.CHAMPION)
    judged = [v for v in same_adapter if v == champion]  # the champion itself: nothing to release
    if digest and not judged:  # the same adapter judged on the same metrics and rules: the verdict would repeat
        judged = registry.versions_with_tags({CANDIDATE_TAG: digest, JUDGEMENT_TAG: judgement}, name=name)
    if judged:
        decided.known = judged[-1]
        role = f" and @{registry.CHAMPION}" if champion == decided.known else ""
        decided.reason = f"candidate unchanged (already registered as version {decided.known}{role})"
        decided.verdict = registry.stored_verdict(decided.known, name=name)
        return decided
    if same_adapter:
        print(f"candidate adapter already registered as version {same_adapter[-1]}, judged on other metrics or gate "
              "rules: judging it again as a new version")
    comparable = _step(champion_on_current_data, metrics, _step(current_champion, name), settings)
    decided.verdict = _step(gate, metrics, items, comparable, settings)
    return decided


@task(name="verify-candidate")
def verify_candidate(settings: Settings) -> dict[str, str | None]:
    """The candidate adapter, its index and the base model read byte for byte against dvc.lock before anything is
    judged or registered (no retries: damaged bytes stay damaged; `register` checks the copies it stores again).
    Returns name → the dvc.lock md5 checked (None: not recorded). Raises IntegrityError naming the file."""
    from tasks.common.integrity import verify_locked

    root = repo_root()
    folders = {"adapter": settings.grpo.out_dir, "base_model": settings.base_model.out_dir,
               **({"index": settings.index.out_dir} if settings.index.k else {})}
    return {name: entry.md5 if (entry := verify_locked(root, root / folder)) else None
            for name, folder in folders.items()}


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for `register`: a registry that timed out or failed is worth another attempt, bad
    or damaged input (InputError, IntegrityError: the bytes do not match their lineage) is not."""
    return not isinstance(state.result(raise_on_failure=False), InputError)


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def register(metrics: dict[str, Any], items: dict[str, Any], verdict: GateVerdict, digest: str,
             settings: Settings, judgement: str = "", kept: KeptAdapter | None = None) -> str:
    """A new registry version for every evaluated candidate (@challenger when its gate passed). `kept`: an
    index-only release's adapter and calibration (default: the grpo stage's adapter and evaluate's calibration).

    Retried (a remote registry may time out), and idempotent under retry: the version is tagged with this flow
    run and the candidate, and an attempt after one that registered it returns it instead of adding a second
    version (issue 22, item 3; crewAI issue 5802)."""
    root = repo_root()
    name = settings.registry.model_name
    run = FlowRunContext.get()
    this_run = str(run.flow_run.id) if run is not None and run.flow_run is not None else ""
    version = registry.register_candidate(
        kept.adapter_dir if kept else root / settings.grpo.out_dir, root / settings.base_model.out_dir, metrics,
        verdict, kept.tags() if kept else None,
        idempotency_tags={CANDIDATE_TAG: digest, JUDGEMENT_TAG: judgement, RUN_TAG: this_run},
        name=name, model_config=model_config(settings.evaluate), params=settings.model_dump(), predictions=items,
        calibration=kept.calibration if kept else calibration(settings),
        index_dir=root / settings.index.out_dir if settings.index.k else None,
    )
    card = registry.model_card_text(version, name=name)
    publish_markdown("model-card", card, f"Model card of version {version}")
    return version


@task(name="promote")
def promote(version: str, approver: str, reason: str, model_name: str) -> dict[str, Any]:
    """Move @champion to the version (and @previous to the old champion)."""
    return registry.promote(version, approver, reason, name=model_name)


@flow(name="release", log_prints=True)
def release_flow(profile: str | None = None) -> dict[str, Any]:
    """evaluate (DVC) → gate against @champion → register → optional human approval → promote."""
    with pipeline_lock():
        settings = start_run(profile)
        return release_evaluated(settings, run_stages(["evaluate"]))


def release_evaluated(settings: Settings, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The release flow after the evaluate stage: judge → register → (approve) → promote, with artifacts.
    Call it inside a flow run (it runs Prefect tasks and may pause for approval)."""
    table = file_text(f"{settings.evaluate.out_dir}/eval.md", "(no report)")
    publish_markdown("evaluation-report", table, "Candidate beside the baselines, per dataset and level")
    result: dict[str, Any] = {"stages": stages, "table_md": table, "promoted": False, "profile": settings.profile}

    verify_candidate(settings)
    decided = judge(settings)
    if decided.known is not None:
        result.update(version=decided.known, reason=decided.reason,
                      verdict_md="(not re-gated: nothing new to release)")
        print(result["reason"])
        return result
    return register_and_promote(settings, decided, result)


def register_and_promote(settings: Settings, decided: Judgement, result: dict[str, Any],
                         kept: KeptAdapter | None = None) -> dict[str, Any]:
    """A judged candidate: the verdict artifact → register → (approve) → promote when the gate passed; `result`
    updated and returned. Call it inside a flow run."""
    name = settings.registry.model_name
    verdict = decided.verdict
    if verdict is None:  # judge() leaves it None only for a known version
        raise RuntimeError("the candidate was neither judged nor found registered")
    publish_markdown("gate-verdict", verdict.to_markdown(), "Every gate rule: threshold, measured, pass/fail")
    version = register(decided.metrics, decided.items, verdict, decided.digest, settings, decided.judgement, kept)
    result.update(version=version, verdict=verdict.to_dict(), verdict_md=verdict.to_markdown())
    if not verdict.passed:
        result["reason"] = "gate failed: " + ", ".join(rule.name for rule in verdict.failed)
        print(f"version {version} registered, not promoted: {result['reason']}")
        return result

    approver, why = "gate", "all gate rules passed"
    if settings.gate.require_approval:
        answer = request_approval(verdict)
        if not answer.approve:
            registry.record_refusal(version, answer.approver, answer.reason, name=name)
            result["reason"] = f"refused by {answer.approver}: {answer.reason}"
            return result
        approver, why = answer.approver, answer.reason
    aliases = promote(version, approver, why, name)
    result.update(promoted=True, aliases=aliases, approver=approver)
    print(f"version {version} promoted to @champion (previous: {aliases.get('previous')})")
    return result


# ---- the index-only release (issue 20) ---------------------------------------------------------------------------


@task(name="champion-adapter", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def champion_adapter(settings: Settings) -> KeptAdapter:
    """The @champion's adapter, downloaded into INDEX_RELEASE_DIR/v<version>/ (replacing an earlier download;
    its calibration.json removed: the old index's threshold), with the manifest md5 of its registration
    (retried: the registry may be remote). Raises RegistryError when there is no @champion."""
    name = settings.registry.model_name
    version = registry.aliases(name).get(registry.CHAMPION)
    if version is None:
        raise registry.RegistryError(f"model {name!r} has no @champion")
    dest = repo_root() / INDEX_RELEASE_DIR / f"v{version}"
    shutil.rmtree(dest, ignore_errors=True)
    adapter = registry.download_adapter(f"{name}/{version}", dest)
    prompt_format = read_prompt_format(adapter)  # the kept adapter's, registered again with it
    (adapter / CALIBRATION_FILE).unlink(missing_ok=True)  # the threshold is refitted with the new index
    md5 = registry.version_tags(version, name=name).get("artifact.adapter.md5", "")
    return KeptAdapter(str(version), adapter, md5, prompt_format=prompt_format)


def require_champion(settings: Settings) -> str:
    """The @champion's version; InputError naming `models:/<name>@champion` when there is none (an index-only
    release keeps its adapter), as serving names a missing alias."""
    name = settings.registry.model_name
    version = registry.aliases(name).get(registry.CHAMPION)
    if version is None:
        raise InputError(f"models:/{name}@{registry.CHAMPION}", "no @champion to keep the adapter of",
                         hint="an index-only release reuses the served adapter: run `rationanomaly retrain` first")
    return version


def index_digest(settings: Settings) -> str:
    """The manifest md5 of the retrieval index as registering it would record it (tasks.common.integrity)."""
    from tasks.common.integrity import manifest

    return str(manifest(repo_root() / settings.index.out_dir)["md5"])


@task(name="evaluate-kept-adapter")
def evaluate_kept(kept: KeptAdapter, settings: Settings) -> Path:
    """tasks.evaluate.evaluate_kept_adapter into INDEX_RELEASE_DIR/eval; returns that folder."""
    out_dir = repo_root() / INDEX_RELEASE_DIR / "eval"
    evaluate_kept_adapter(kept.adapter_dir, settings.evaluate, settings.detect, settings.index, out_dir)
    return out_dir


def judge_kept(settings: Settings, kept: KeptAdapter, eval_dir: Path) -> Judgement:
    """The gate's verdict on an index-only candidate evaluated into `eval_dir` (metrics.json,
    candidate_predictions.json, calibration.json), against the @champion measured on the same test data (its
    adapter re-evaluated with the current index when its stored results do not compare), as `judge` does for a
    retrained one. The candidate is the kept adapter with the current index (CANDIDATE_TAG
    `index-only:<adapter md5>+<index md5>`). `kept.calibration` is set from the file."""
    metrics = _read_json(eval_dir / "metrics.json")
    items_file = eval_dir / CANDIDATE_PREDICTIONS
    items = _read_json(items_file) if items_file.is_file() else {}
    calibration_file = eval_dir / CALIBRATION_FILE
    kept.calibration = (_read_json(calibration_file) or None) if calibration_file.is_file() else None
    if kept.calibration is not None:  # the kept adapter answers the explain prompt it was trained on
        kept.calibration["prompt_format"] = kept.prompt_format
    digest = f"{INDEX_ONLY}:{kept.adapter_md5}+{index_digest(settings)}"
    decided = Judgement(metrics, items, digest, judgement_digest(settings, eval_dir / "metrics.json"), None)
    comparable = _step(champion_on_current_data, metrics, _step(current_champion, settings.registry.model_name),
                       settings)
    decided.verdict = _step(gate, metrics, items, comparable, settings)
    return decided


def release_kept_adapter(settings: Settings, kept: KeptAdapter, eval_dir: Path,
                         stages: list[dict[str, Any]]) -> dict[str, Any]:
    """An evaluated index-only candidate: judge → register (the kept adapter, the new index and threshold, tags
    release.kind and release.adapter_from) → (approve) → promote. Call it inside a flow run."""
    result: dict[str, Any] = {"stages": stages, "promoted": False, "profile": settings.profile, "kind": INDEX_ONLY,
                              "adapter_from": kept.version}
    return register_and_promote(settings, judge_kept(settings, kept, eval_dir), result, kept)


def release_index_only(settings: Settings, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """After the index stage: keep the @champion's adapter, stop when a version with that adapter and this index
    exists (the champion itself included: nothing new to serve), else evaluate it with the new index and release
    it like any candidate. Call it inside a flow run. Raises InputError without a @champion."""
    name = settings.registry.model_name
    require_champion(settings)
    kept = champion_adapter(settings)
    index_md5 = index_digest(settings)
    digest = f"{INDEX_ONLY}:{kept.adapter_md5}+{index_md5}"
    champion_tags = registry.version_tags(kept.version, name=name)
    known = registry.versions_with_tags({CANDIDATE_TAG: digest}, name=name)
    if champion_tags.get("artifact.index.md5") == index_md5:
        known = [kept.version]
    if known:
        reason = f"index unchanged: version {known[-1]} already serves this adapter with this index"
        print(reason)
        return {"stages": stages, "promoted": False, "profile": settings.profile, "kind": INDEX_ONLY,
                "adapter_from": kept.version, "version": known[-1], "reason": reason}
    return release_kept_adapter(settings, kept, evaluate_kept(kept, settings), stages)


@flow(name="release-index-only", log_prints=True)
def release_index_only_flow(profile: str | None = None) -> dict[str, Any]:
    """correct → index (DVC; split only when the template lists' labels changed) → the @champion's adapter kept,
    re-evaluated with the new index → gate → register → (approve) → promote. No retraining: a retrain picks the
    labels up when it runs distill again. Returns the release result with `seconds` (wall time)."""
    started = time.perf_counter()
    with pipeline_lock():
        settings = start_run(profile)
        require_champion(settings)  # before any stage runs
        result = release_index_only(settings, run_stages(["index"]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"index-only release in {result['seconds']} s: "
          + (f"version {result.get('version')}" if result.get("version") else "nothing registered")
          + (", promoted" if result.get("promoted") else f" ({result.get('reason', 'not promoted')})"))
    return result


if __name__ == "__main__":
    release_flow()
