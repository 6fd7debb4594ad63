"""The MLflow model registry: every evaluated candidate becomes a version; aliases say which one serves.

- `register_candidate`: logs the adapter as an MLflow pyfunc model (adapter folder + a reference to the base
  model; loadable back through `models:/<name>@champion`), tags the version with its lineage and gate
  verdict, attaches a Markdown model card, and points `@challenger` at it when the gate passed.
- `promote`: `@previous` ← old `@champion`, `@champion` ← the version; refused (no alias moves) unless the
  version's gate passed.
- `rollback`: `@champion` ← `@previous`, recording who and why.

Every function takes the registered model's name (`registry.model_name` in params.yaml) from its caller.

A registration that fails half-way tags the version `failed`; one that died without a chance to do so is
found (no `registration` tag) and tagged `failed` by the next registration.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow.pyfunc

from tasks.common.config import repo_root
from tasks.common.contracts import BASE_REF_FILE, CALIBRATION_FILE, CANDIDATE, INDEX_ARTIFACT, PROMPT_FORMAT, Metrics
from tasks.common.errors import InputError
from tasks.release.gate import GateVerdict
from tasks.release.lineage import LINEAGE_FILE, collect_lineage, lineage_tags
from tasks.release.model_card import DESCRIPTION_LIMIT, model_card
from tasks.release.pyfunc import RationAnomalyModel, pyfunc_requirements, pyfunc_signature

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
CARD_FILE = "model_card.md"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "candidate_predictions.json"  # per test set: item ids, labels, the version's 0/1 predictions


class RegistryError(RuntimeError):
    """The registry could not do what was asked; the message says why and what to do."""


class RegistryUnavailable(RegistryError):
    """The tracking/registry store cannot be reached or written."""


class PromotionRefused(RegistryError):
    """The version may not become @champion (incomplete registration or failed gate); no alias moved."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- connection -----------------------------------------------------------------------------------------------


def check_registry(uri: str | None = None, timeout_s: float = 5.0) -> str:
    """Fail fast, with the URI and a hint, when the registry cannot be reached; returns the URI."""
    from tasks.common.tracking import tracking_uri

    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    hint = "set MLFLOW_TRACKING_URI to a reachable tracking server or a sqlite:/// path in a writable folder"
    if parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is not None and db.name != ":memory:":
            db = db if db.is_absolute() else Path.cwd() / db
            if not db.parent.is_dir():
                raise RegistryUnavailable(f"model registry {uri} is unreachable: folder {db.parent} does not exist "
                                          f"({hint})")
            if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
                raise RegistryUnavailable(f"model registry {uri} is unreachable: {db} is not writable ({hint})")
    elif parsed.scheme in ("http", "https"):
        import httpx

        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"model registry {uri} is unreachable: {type(exc).__name__}: {exc} "
                                      f"({hint})") from exc
    try:
        client(uri).search_registered_models(max_results=1)
    except Exception as exc:
        raise RegistryUnavailable(f"model registry {uri} is unreachable: {type(exc).__name__}: {exc} ({hint})") \
            from exc
    return uri


def client(uri: str | None = None) -> Any:
    """An MlflowClient on `uri` (default: the project's tracking store) for tracking and registry."""
    from mlflow import MlflowClient

    from tasks.common.tracking import tracking_uri

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(c: Any, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in (c.get_registered_model(name).aliases or {}).items()}
    except MlflowException:
        return {}


def aliases(name: str) -> dict[str, str]:
    """alias → version of the registered model ({} when it does not exist yet)."""
    return _aliases(client(), name)


# ---- registration ---------------------------------------------------------------------------------------------


def repair_incomplete(name: str, c: Any | None = None) -> list[str]:
    """Tag `failed` every version whose registration never completed (a crash between steps)."""
    from mlflow.exceptions import MlflowException

    c = c or client()
    repaired = []
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return repaired
    for mv in versions:
        tags = dict(mv.tags or {})
        if "registration" not in tags and "failed" not in tags:
            c.set_model_version_tag(name, mv.version, "failed", f"registration never completed (found {_now()})")
            c.set_model_version_tag(name, mv.version, "registration", "failed")
            repaired.append(str(mv.version))
    return repaired


def _slim_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The candidate's own metrics and the test-data digests: what a later gate compares against."""
    candidate = metrics.get("candidate", CANDIDATE)
    return {"candidate": candidate, "engine": metrics.get("engine"),
            "methods": {candidate: metrics.get("methods", {}).get(candidate, {})},
            "test_data": metrics.get("test_data", {}), "bootstrap": metrics.get("bootstrap"),
            "mlflow_run_id": metrics.get("mlflow_run_id"),
            "created_at": metrics.get("created_at")}


def stage_artifacts(root: Path, staging: Path, adapter_dir: Path, base_model_dir: Path, index_dir: Path | None,
                    calibration: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Copy the adapter (and index) into `staging` as they will be registered, verify the copies (and the base
    model, referenced in place) against what dvc.lock records, and return each stored folder's manifest.

    The manifest ({"md5", "nfiles", "size", "files": {path: md5}, "source", "dvc": the dvc.lock entry or None,
    "added": files the registry wrote}) goes into lineage.json and the `artifact.<name>.md5` tag; promote and
    serve check the stored copies against it. `calibration` is written into the adapter copy after the check.
    Raises IntegrityError naming the first file whose bytes differ from dvc.lock's record, before anything is
    registered (dvc issues 5978, 9641: `dvc status` does not read the bytes again).
    """
    from tasks.common.integrity import manifest, verify_locked

    sources = {"adapter": adapter_dir, **({INDEX_ARTIFACT: index_dir} if index_dir is not None else {})}
    locked = {}
    for name, source in sources.items():
        # MLflow leaves __pycache__ out of the artifacts it stores (mlflow.utils.file_utils): so does the manifest
        shutil.copytree(source, staging / name, ignore=shutil.ignore_patterns("__pycache__"))
        locked[name] = verify_locked(root, staging / name, source)
    verify_locked(root, base_model_dir)
    added = []
    if calibration:  # the threshold travels with the adapter: serving, detect and the pyfunc read it there
        # with the explain prompt format the adapter was trained on: this code's, unless the caller knows it (an
        # index-only release keeps an older champion's adapter and its format)
        calibration = {**calibration, "prompt_format": int(calibration.get("prompt_format") or PROMPT_FORMAT)}
        (staging / "adapter" / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2), encoding="utf-8")
        added.append(CALIBRATION_FILE)
    return {name: {**manifest(staging / name), "source": str(source),
                   "dvc": asdict(locked[name]) if locked[name] else None, "added": added if name == "adapter" else []}
            for name, source in sources.items()}


def register_candidate(adapter_dir: str | Path, base_model_dir: str | Path, metrics: Metrics | dict[str, Any],
                       verdict: GateVerdict, lineage_tags_extra: dict[str, str] | None = None, *,
                       name: str, model_config: dict[str, Any], params: dict[str, Any] | None = None,
                       predictions: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None,
                       index_dir: Path | None = None, root: Path | None = None,
                       record: dict[str, Any] | None = None, idempotency_tags: dict[str, str] | None = None) -> str:
    """Register an evaluated candidate as a new version; returns the version number (a string).

    `@challenger` moves to it only if its gate passed (a failed gate moves no alias). `model_config` is the
    pyfunc model's (tasks.release.pyfunc.model_config); `predictions` the candidate's per-item predictions
    (tasks.evaluate.item_predictions), kept so a later candidate can be compared with it item by item;
    `calibration` its verdict threshold (evaluate's calibration.json, written into the adapter folder) and
    `index_dir` the retrieval index its prompts use (stored as the `index` artifact).
    `record` is the lineage snapshot, collected from the repo (with the effective `params`) when not given.
    `idempotency_tags` name this registration (e.g. the flow run and the candidate): when a completely registered
    version already carries all of them, that version is returned and nothing is created (a retry after a
    registration that completed but whose caller saw a failure, crewAI issue 5802); a new version gets them.
    Raises InputError for missing model folders, RegistryUnavailable when the store cannot be reached,
    RegistryError when registration fails (the version, if one was created, is tagged `failed`).
    """
    from tasks.evaluation.inference import check_model_dirs

    root = root or repo_root()
    adapter_dir, base_model_dir = Path(adapter_dir), Path(base_model_dir)
    check_model_dirs(base_model_dir, adapter_dir)
    base_meta_file = base_model_dir / "base_model.json"
    if not base_meta_file.is_file():
        raise InputError(base_meta_file, "base model description missing", hint="run `dvc repro base_model`")
    uri = check_registry()
    c = client(uri)
    repair_incomplete(name, c)
    if idempotency_tags and (done := _versions_tagged(c, name, idempotency_tags)):
        import sys

        print(f"{name} v{done[-1]} is already registered with {idempotency_tags}: returned, not registered again",
              file=sys.stderr)
        return done[-1]
    record = json.loads(json.dumps(record, default=str)) if record is not None else collect_lineage(
        root, adapter_dir=adapter_dir, base_model_dir=base_model_dir, metrics=metrics, params=params)
    base_meta = json.loads(base_meta_file.read_text(encoding="utf-8"))
    slim = _slim_metrics(metrics)
    card = model_card(name, slim, verdict, record, calibration)
    description = model_card(name, slim, verdict, record, calibration, compact=True)

    from tasks.common.tracking import setup_mlflow, stage_run

    setup_mlflow()
    staging = Path(tempfile.mkdtemp(prefix="register-"))
    version: str | None = None
    try:
        adapter_copy = staging / "adapter"  # stored as artifacts/adapter whatever the folder was called
        record["artifacts"] = stage_artifacts(root, staging, adapter_dir, base_model_dir, index_dir, calibration)
        extra_artifacts = {INDEX_ARTIFACT: str(staging / INDEX_ARTIFACT)} if index_dir is not None else {}
        ref_file, card_file = staging / BASE_REF_FILE, staging / CARD_FILE
        lineage_file, metrics_file = staging / LINEAGE_FILE, staging / METRICS_FILE
        ref_file.write_text(json.dumps({"path": str(base_model_dir.resolve()), **base_meta}, indent=2),
                            encoding="utf-8")
        card_file.write_text(card, encoding="utf-8")
        lineage_file.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        metrics_file.write_text(json.dumps(slim, indent=2), encoding="utf-8")
        predictions_file = staging / PREDICTIONS_FILE
        predictions_file.write_text(json.dumps(predictions or {}), encoding="utf-8")
        with stage_run("register", candidate=str(adapter_dir)) as run:
            record.setdefault("runs", {})["register"] = {"run_id": run.info.run_id}
            lineage_file.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
            mlflow.log_text(card, CARD_FILE)
            mlflow.log_dict(verdict.to_dict(), "gate_verdict.json")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=RationAnomalyModel(),
                artifacts={"adapter": str(adapter_copy), "base_model_ref": str(ref_file), "model_card": str(card_file),
                           "lineage": str(lineage_file), "metrics": str(metrics_file),
                           "predictions": str(predictions_file), **extra_artifacts},
                signature=pyfunc_signature(), pip_requirements=pyfunc_requirements(),
                model_config=model_config,
            )
            mv = mlflow.register_model(info.model_uri, name)
            version = str(mv.version)
            tags = {**lineage_tags(record), **(lineage_tags_extra or {}), **(idempotency_tags or {}),
                    "run.register": run.info.run_id, "registered_at": _now(),
                    "gate.passed": str(verdict.passed).lower(), "gate.verdict": verdict.to_json(),
                    "gate.failed": ",".join(r.name for r in verdict.failed), "metrics": json.dumps(slim),
                    **({"verdict.threshold": str(calibration["threshold"]),
                        "verdict.neighbours": str(calibration.get("neighbours", 0)),
                        "verdict.validation_ap": str(calibration.get("average_precision"))} if calibration else {}),
                    "adapter.dir": str(adapter_dir)}
            for key, value in tags.items():
                c.set_model_version_tag(name, version, key, value)
            c.update_model_version(name, version, description=description[:DESCRIPTION_LIMIT])
            if verdict.passed:
                c.set_registered_model_alias(name, CHALLENGER, version)
            c.set_model_version_tag(name, version, "registration", "complete")
    except Exception as exc:
        if version is not None:
            try:
                c.set_model_version_tag(name, version, "failed", f"{type(exc).__name__}: {exc}"[:5000])
                c.set_model_version_tag(name, version, "registration", "failed")
            except Exception as tag_exc:  # the registry went away mid-way; the next registration repairs it
                raise RegistryError(f"registering {name} v{version} failed ({exc}) and the version could not be "
                                    f"tagged failed ({tag_exc}); the next registration will tag it") from exc
            raise RegistryError(f"registering {name} v{version} failed and it is tagged `failed`: {exc}") from exc
        if isinstance(exc, RegistryError | InputError):
            raise
        raise RegistryError(f"registering a version of {name} in {uri} failed before a version existed: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


# ---- aliases --------------------------------------------------------------------------------------------------


def _version_tags(c: Any, name: str, version: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(c.get_model_version(name, str(version)).tags or {})
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} has no version {version!r}") from exc


def verify_version(name: str, version: str, tags: dict[str, str]) -> list[str]:
    """Read a version's stored adapter and index back from the artifact store and check them file by file against
    the manifests its lineage.json records and its `artifact.<name>.md5` tags; returns the names checked ([] for a
    version registered before manifests were kept, said on stderr). Raises PromotionRefused naming the file
    that differs, or the artifacts that cannot be read."""
    import sys

    import mlflow.artifacts

    from tasks.common.integrity import IntegrityError
    from tasks.release.lineage import verify_version_files

    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts",
                                                              dst_path=tmp))
        except Exception as exc:  # MLflow raises several types for an unreadable store
            raise PromotionRefused(f"{name} v{version}: its artifacts could not be read to verify them "
                                   f"({type(exc).__name__}: {exc}); no alias moved") from exc
        try:
            checked = verify_version_files(folder, what=f"{name} v{version}", tags=tags,
                                           shown_as=f"models:/{name}/{version}/artifacts",
                                           hint="the registry's copy is damaged: register the candidate again")
        except IntegrityError as exc:
            raise PromotionRefused(f"{name} v{version} is not promoted, its stored bytes differ from its lineage: "
                                   f"{exc}; no alias moved") from exc
    if not checked:
        print(f"{name} v{version} records no per-file hashes (registered before they were kept): promoted "
              "unverified", file=sys.stderr)
    return checked


def promote(version: str | int, approver: str, reason: str, *, name: str) -> dict[str, str | None]:
    """`@previous` ← old `@champion`, `@champion` ← version. Refused (nothing moves) unless the gate passed."""
    version = str(version)
    c = client(check_registry())
    tags = _version_tags(c, name, version)
    if tags.get("failed") or tags.get("registration") != "complete":
        raise PromotionRefused(f"{name} v{version} is not completely registered ({tags.get('failed') or 'no tag'}); "
                               "no alias moved")
    if tags.get("gate.passed") != "true":
        failed = tags.get("gate.failed") or "unknown"
        raise PromotionRefused(f"{name} v{version} failed its gate (rules: {failed}); no alias moved")
    current = _aliases(c, name)
    old = current.get(CHAMPION)
    if old == version:
        return {"champion": version, "previous": current.get(PREVIOUS)}
    verify_version(name, version, tags)
    if old is not None:
        c.set_registered_model_alias(name, PREVIOUS, old)
        c.set_model_version_tag(name, version, "promoted_over", old)
    c.set_registered_model_alias(name, CHAMPION, version)
    for key, value in (("approved_by", approver), ("approval_reason", reason), ("promoted_at", _now())):
        c.set_model_version_tag(name, version, key, value)
    return {"champion": version, "previous": old}


def record_refusal(version: str | int, actor: str, reason: str, *, name: str) -> None:
    """Record on the version that a person (or the gate) refused its promotion; no alias moves."""
    c = client(check_registry())
    for key, value in (("promotion", "refused"), ("refused_by", actor), ("refusal_reason", reason),
                       ("refused_at", _now())):
        c.set_model_version_tag(name, str(version), key, value)


def rollback(actor: str, reason: str, *, name: str) -> dict[str, str | None]:
    """`@champion` ← `@previous` (and `@previous` ← the one before it, when known), recording who and why."""
    c = client(check_registry())
    current = _aliases(c, name)
    target, leaving = current.get(PREVIOUS), current.get(CHAMPION)
    if target is None:
        raise RegistryError(f"model {name!r} has no @previous version to roll back to "
                            f"(aliases: {current or 'none'})")
    before = _version_tags(c, name, target).get("promoted_over")
    c.set_registered_model_alias(name, CHAMPION, target)
    if before and before not in (target, leaving):
        c.set_registered_model_alias(name, PREVIOUS, before)
    else:
        c.delete_registered_model_alias(name, PREVIOUS)
    now = _now()
    if leaving is not None:
        for key, value in (("rolled_back_by", actor), ("rolled_back_reason", reason), ("rolled_back_at", now)):
            c.set_model_version_tag(name, leaving, key, value)
    for key, value in (("restored_by", actor), ("restored_reason", reason), ("restored_at", now)):
        c.set_model_version_tag(name, target, key, value)
    event = {"from": leaving, "to": target, "actor": actor, "reason": reason, "at": now}
    c.set_registered_model_tag(name, "last_rollback", json.dumps(event))
    return {"champion": target, "previous": before if before not in (target, leaving) else None,
            "rolled_back": leaving}


def version_predictions(name: str, version: str) -> dict[str, Any] | None:
    """The per-item predictions stored with a version ({set: {ids, labels, pred, digest}}), None when the version
    has none (registered before they were kept) or they cannot be read."""
    import mlflow.artifacts

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}/artifacts/{PREDICTIONS_FILE}")
        return json.loads(Path(path).read_text(encoding="utf-8")) or None
    except Exception:  # MLflow raises several types for a missing artifact; absence is an answer here
        return None


def champion_metrics(name: str) -> dict[str, Any] | None:
    """The current `@champion`'s stored metrics and per-item predictions ({'version', 'metrics', 'items'}; items
    None when the version has none), or None when there is no champion."""
    c = client(check_registry())
    version = _aliases(c, name).get(CHAMPION)
    if version is None:
        return None
    tags = _version_tags(c, name, version)
    items = version_predictions(name, version)
    if tags.get("metrics"):
        return {"version": version, "metrics": json.loads(tags["metrics"]), "items": items}
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts/{METRICS_FILE}")
    return {"version": version, "metrics": json.loads(Path(path).read_text(encoding="utf-8")), "items": items}


def download_adapter(ref: str, dest: str | Path | None = None) -> Path:
    """The LoRA adapter folder of a registered version (`<name>@<alias>` or `<name>/<version>`), downloaded
    into `dest` (a temporary folder when None); returns its path."""
    import mlflow.artifacts

    from tasks.common.tracking import setup_mlflow

    setup_mlflow()
    ref = ref.removeprefix("models:/")
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref}/artifacts/adapter",
                                               dst_path=str(dest) if dest else None)
    return Path(path)


# ---- look-ups for the release flow ----------------------------------------------------------------------------


def versions_with_tags(wanted: dict[str, str], *, name: str) -> list[str]:
    """The completely registered versions carrying every tag of `wanted` (e.g. the same candidate adapter),
    oldest first."""
    return _versions_tagged(client(check_registry()), name, wanted)


def _versions_tagged(c: Any, name: str, wanted: dict[str, str]) -> list[str]:
    found = []
    for mv in c.search_model_versions(f"name = '{name}'"):
        tags = dict(mv.tags or {})
        if tags.get("registration") == "complete" and all(tags.get(k) == v for k, v in wanted.items()):
            found.append(str(mv.version))
    return sorted(found, key=int)


def version_tags(version: str | int, *, name: str) -> dict[str, str]:
    """A version's tags; RegistryError when the model has no such version."""
    return _version_tags(client(check_registry()), name, str(version))


def stored_verdict(version: str | int, *, name: str) -> GateVerdict | None:
    """The gate verdict a version was registered with (its `gate.verdict` tag), None when it has none."""
    text = _version_tags(client(check_registry()), name, str(version)).get("gate.verdict")
    return GateVerdict.from_dict(json.loads(text)) if text else None


def model_card_text(version: str | int, *, name: str) -> str:
    """The Markdown model card stored with a version (in its registration run)."""
    import mlflow.artifacts

    c = client(check_registry())
    run_id = c.get_model_version(name, str(version)).run_id
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CARD_FILE)
    return Path(path).read_text(encoding="utf-8")
