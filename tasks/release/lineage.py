"""Lineage an auditor can follow: from a registered model version back to every byte and decision that shaped it.

At registration, `collect_lineage` snapshots what the repo knows (dvc.lock hashes, the source manifest,
the correction report, params, base model, git commit, training runs) into `lineage.json` beside the
adapter and into version tags (the tags make the reverse query, `lineage_by_data`, a registry search).
`lineage(ref)` walks it forward: version → MLflow runs (sft, grpo, evaluate, register) → params → data with
source URL and sha256 → corrections → base model → code commit → gate verdict and approver.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tasks.common.config import repo_root
from tasks.common.files import sha256_file, sha256_json

LINEAGE_FILE = "lineage.json"
# dvc.lock entries recorded per version: tag name → (stage, path, deps|outs)
DVC_DATA = {
    "raw": ("fetch", "data/raw", "outs"),
    "corrections": ("correct", "data/raw/rationanomaly/anomaly_patch.json", "deps"),
    "reviews": ("correct", "corrections/reviews", "deps"),
    "corrected": ("correct", "data/corrected/templates.parquet", "outs"),
    "split": ("split", "data/split", "outs"),
    "distilled": ("distill", "data/sft/train.jsonl", "outs"),
    "index": ("index", "models/index", "outs"),
}


class LineageError(LookupError):
    """An unknown model, version, alias or data hash: the message says what was asked and what exists."""


# ---- collecting (at registration) -----------------------------------------------------------------------------


def dvc_lock_hashes(root: Path) -> dict[str, dict[str, Any]]:
    """The md5 DVC recorded for each data artifact of the lineage ({} entries when dvc.lock lacks them)."""
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) if lock_file.is_file() else {}
    stages = (lock or {}).get("stages", {})
    out: dict[str, dict[str, Any]] = {}
    for name, (stage, path, kind) in DVC_DATA.items():
        entry = next((e for e in stages.get(stage, {}).get(kind, []) if e.get("path") == path), None)
        out[name] = {"path": path, "stage": stage, "md5": entry.get("md5") if entry else None,
                     "size": entry.get("size") if entry else None, "nfiles": entry.get("nfiles") if entry else None}
    return out


def source_manifest(root: Path) -> list[dict[str, Any]]:
    """Every raw file with its public URL, sha256 and licence: data/raw/MANIFEST.json, else sources.yaml."""
    manifest = root / "data" / "raw" / "MANIFEST.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        rows = data.get("files", data.get("sources", data)) if isinstance(data, dict) else data
    else:
        sources = root / "sources.yaml"
        rows = (yaml.safe_load(sources.read_text(encoding="utf-8")) or {}).get("sources", []) if sources.is_file() \
            else []
    keys = ("name", "url", "sha256", "licence")
    return [{k: row.get(k) for k in keys} for row in rows if isinstance(row, dict)]


def correction_summary(root: Path, correct: dict[str, Any], lock: dict[str, dict[str, Any]] | None = None,
                       ) -> dict[str, Any]:
    """How many expert corrections were applied, the corrections file's hash, and the review-queue size.

    `correct` is the `correct` section of the effective params (its report, queue and patch paths).
    """
    params = correct
    report_file = root / params.get("report_file", "reports/correction.json")
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    queue_file = root / params.get("review_queue_file", "reports/review_queue.csv")
    queue_size = None
    if queue_file.is_file():
        with queue_file.open(encoding="utf-8") as handle:
            queue_size = sum(1 for _ in csv.DictReader(handle))
    patch = root / params.get("patch_file", "data/raw/rationanomaly/anomaly_patch.json")
    applied = None
    if report:
        applied = int(report.get("matched_exact", 0) or 0) + int(report.get("matched_normalized", 0) or 0)
    lock = lock if lock is not None else dvc_lock_hashes(root)
    return {
        "applied": applied,
        "matched_exact": report.get("matched_exact"),
        "matched_normalized": report.get("matched_normalized"),
        "unmatched": len(report.get("unmatched", []) or []) if report else None,
        "by_direction": report.get("by_direction"),
        "file": str(patch.relative_to(root)) if patch.is_relative_to(root) else str(patch),
        "file_sha256": sha256_file(patch) if patch.is_file() else None,
        "file_md5": lock.get("corrections", {}).get("md5"),
        "review_queue_size": queue_size,
    }


def review_summary(root: Path, correct: dict[str, Any]) -> dict[str, Any]:
    """The expert review files behind the labels (issue 20): each file in `correct.review_dir` with its annotator
    (the file name), sha256 and the labels it voted on, and the resolved labels by system (`new_systems`: the
    templates of systems the template lists do not hold, which only the retrieval index carries). Read from the
    resolution file `correct` wrote (correct.resolution_file) and the review folder; empty lists without them."""
    review_dir = root / correct.get("review_dir", "corrections/reviews")
    resolution_file = root / correct.get("resolution_file", "reports/review_resolution.json")
    try:
        records = json.loads(resolution_file.read_text(encoding="utf-8")) if resolution_file.is_file() else []
    except json.JSONDecodeError:
        records = []
    votes: dict[str, int] = {}
    new_systems: dict[str, int] = {}
    for record in records if isinstance(records, list) else []:
        for source in record.get("sources") or []:
            votes[str(source.get("file"))] = votes.get(str(source.get("file")), 0) + 1
        if record.get("new_system"):
            new_systems[str(record.get("system"))] = new_systems.get(str(record.get("system")), 0) + 1
    files = [{"file": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
              "annotator": path.stem, "sha256": sha256_file(path), "votes": votes.get(path.name, 0)}
             for path in sorted(review_dir.glob("*.csv"))] if review_dir.is_dir() else []
    return {"files": files, "annotators": [f["annotator"] for f in files], "resolved": len(records or []),
            "new_systems": dict(sorted(new_systems.items()))}


def pipeline_outputs(root: Path) -> list[str]:
    """What a run writes into tracked places: dvc.lock and every out, metric and plot path of dvc.yaml (relative
    POSIX paths; a folder covers everything under it)."""
    outputs = ["dvc.lock"]
    dvc_yaml = root / "dvc.yaml"
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}) if dvc_yaml.is_file() \
        else {}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind) or []:
                outputs.extend([out] if isinstance(out, str) else list(out) if isinstance(out, dict) else [])
    return [str(o).rstrip("/") for o in outputs]


def _only_profile_differs(root: Path, git: Any) -> bool:
    """params.yaml differs from the commit in its `profile:` line alone: what `--profile` writes, and the record
    carries the profile (`params.profile`) and the params' digest."""
    committed = git("show", "HEAD:./params.yaml")
    current = (root / "params.yaml").read_text(encoding="utf-8") if (root / "params.yaml").is_file() else None
    if committed is None or current is None:
        return False

    def without_profile(text: str) -> list[str]:
        return [line for line in text.strip().splitlines() if not line.startswith("profile:")]

    return without_profile(committed) == without_profile(current)


def git_state(root: Path) -> dict[str, Any]:
    """The code commit, whether the code or configuration differ from it (`dirty`), and which tracked paths do.

    `dirty` describes the code and configuration, not the run's own outputs: dvc.lock and the outs, metrics and
    plots of dvc.yaml (`pipeline_outputs`, listed under `outputs_changed`) are rewritten by every run, and
    params.yaml whose only change is its `profile:` line (`--profile`) is the run's selection, recorded as
    `params.profile`. `modified` lists the other changed tracked paths (untracked files are not counted, as
    before). None values when git cannot tell (no git, no repository).
    """
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "-z", "--untracked-files=no", "--no-renames")
    if status is None:
        return {"commit": commit.strip() if commit else None, "dirty": None, "modified": None, "outputs_changed": None}
    prefix = (git("rev-parse", "--show-prefix") or "").strip()  # porcelain paths are relative to the repository
    changed = sorted({entry[3:].removeprefix(prefix) for entry in status.split("\0") if len(entry) > 3})
    outputs = pipeline_outputs(root)
    produced = [p for p in changed if any(p == o or p.startswith(o + "/") for o in outputs)]
    modified = [p for p in changed if p not in produced
                and not (p == "params.yaml" and _only_profile_differs(root, git))]
    return {"commit": commit.strip() if commit else None, "dirty": bool(modified), "modified": modified,
            "outputs_changed": produced}


def training_runs(adapter_dirs: dict[str, Path | None]) -> dict[str, dict[str, Any]]:
    """What each training stage wrote into its adapter's training_meta.json (run id when recorded)."""
    out = {}
    for stage, path in adapter_dirs.items():
        meta_file = Path(path) / "training_meta.json" if path else None
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file and meta_file.is_file() else {}
        out[stage] = {"run_id": meta.get("mlflow_run_id") or meta.get("run_id"), "adapter_dir": str(path),
                      "data_sha256": meta.get("data_sha256"), "base_model_sha256": meta.get("base_model_sha256"),
                      "steps": meta.get("steps"), "adapter_sha256": meta.get("adapter_sha256")}
    return out


def find_training_run(stage: str, info: dict[str, Any]) -> str | None:
    """The MLflow run of a training stage: the id recorded in training_meta.json, else the newest run with that
    stage tag and the same data and base-model hashes (sft/grpo tag their runs with both)."""
    if info.get("run_id"):
        return str(info["run_id"])
    if not info.get("data_sha256"):
        return None
    from tasks.common.tracking import setup_mlflow

    mlflow = setup_mlflow()
    query = f"tags.stage = '{stage}' and tags.data_sha256 = '{info['data_sha256']}'"
    if info.get("base_model_sha256"):
        query += f" and tags.base_model_sha256 = '{info['base_model_sha256']}'"
    runs = mlflow.search_runs(filter_string=query, order_by=["attributes.start_time DESC"], max_results=1,
                              output_format="list", search_all_experiments=True)
    return runs[0].info.run_id if runs else None


def collect_lineage(root: Path | None = None, *, adapter_dir: Path, base_model_dir: Path,
                    metrics: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the registry stores about where a candidate came from (JSON-serialisable).

    `params` are the effective params the candidate was made with (`Settings.model_dump()`); None records
    no params (only their absence). Never raises for a missing run: the lookup error is recorded instead.
    """
    from tasks.base_model import read_base_model_meta

    root = root or repo_root()
    params = params or {}
    lock = dvc_lock_hashes(root)
    sources = source_manifest(root)
    data = [{"name": name, **entry, **({"sources": sources} if name == "raw" else {})}
            for name, entry in lock.items()]
    sft_dir = Path(params.get("grpo", {}).get("sft_adapter_dir") or params.get("sft", {}).get("out_dir", "models/sft"))
    sft_dir = sft_dir if sft_dir.is_absolute() else root / sft_dir
    runs = training_runs({"sft": sft_dir, "grpo": Path(adapter_dir)})
    for stage, info in runs.items():
        try:
            info["run_id"] = find_training_run(stage, info)
        except Exception as exc:  # a lookup failure must not block registration; it is recorded instead
            info["lookup_error"] = f"{type(exc).__name__}: {exc}"
    distill = params.get("distill", {})
    teacher = distill.get("teacher")
    if teacher == "openai":
        teacher = f"openai:{distill.get('openai', {}).get('model')}@{distill.get('openai', {}).get('base_url')}"
    base_meta = read_base_model_meta(base_model_dir)
    return {
        "data": data,
        "corrections": correction_summary(root, params.get("correct", {}), lock),
        "reviews": review_summary(root, params.get("correct", {})),
        "params": {"sha256": sha256_json(params), "profile": params.get("profile"),
                   "values": {k: params.get(k) for k in ("split", "distill", "sft", "grpo", "evaluate", "gate")}},
        "base_model": {"dir": str(base_model_dir), "source": base_meta.get("source"),
                       "sha256": base_meta.get("weights_sha256"), "gguf_sha256": base_meta.get("gguf_sha256")},
        "teacher": teacher,
        "code": git_state(root),
        "runs": {**runs, "evaluate": {"run_id": (metrics or {}).get("mlflow_run_id")}},
        "adapter": {"dir": str(adapter_dir)},
    }


def lineage_tags(record: dict[str, Any]) -> dict[str, str]:
    """The version tags that make lineage searchable in the registry (all strings)."""
    tags: dict[str, str] = {}
    for entry in record.get("data", []):
        if entry.get("md5"):
            tags[f"data.{entry['name']}.md5"] = str(entry["md5"])
        if entry.get("sources"):
            tags["data.sources.sha256"] = ",".join(f"{s['name']}={s['sha256']}" for s in entry["sources"])
    corrections = record.get("corrections", {})
    if corrections.get("file_sha256"):
        tags["data.corrections.sha256"] = corrections["file_sha256"]
    reviews = record.get("reviews") or {}
    if reviews.get("files"):  # `lineage --data <a review file's sha256>` finds the versions its labels reached
        tags["data.reviews.sha256"] = ",".join(f"{Path(f['file']).name}={f['sha256']}" for f in reviews["files"])
        tags["reviews.annotators"] = ",".join(reviews["annotators"])
    tags["params.sha256"] = record["params"]["sha256"]
    tags["base_model.sha256"] = str(record["base_model"].get("sha256"))
    tags["base_model.source"] = str(record["base_model"].get("source"))
    tags["teacher"] = str(record.get("teacher"))
    tags["git.commit"] = str(record["code"].get("commit"))
    tags["git.dirty"] = str(record["code"].get("dirty")).lower()
    if record["code"].get("modified"):
        modified = record["code"]["modified"]
        more = f",…(+{len(modified) - 50} more)" if len(modified) > 50 else ""
        tags["git.modified"] = ",".join(modified[:50]) + more
    for name, artifact in (record.get("artifacts") or {}).items():
        tags[f"artifact.{name}.md5"] = str(artifact["md5"])
    for stage, info in record.get("runs", {}).items():
        if info.get("run_id"):
            tags[f"run.{stage}"] = str(info["run_id"])
    return tags


# ---- verifying (before promoting or serving) --------------------------------------------------------------------


def verify_version_files(artifacts_dir: Path, *, what: str, hint: str, tags: dict[str, str] | None = None,
                         base_model_dir: Path | None = None, shown_as: str | None = None) -> list[str]:
    """Check a registered version's stored folders (adapter, index) in `artifacts_dir` file by file against the
    manifests its lineage.json records, and, given `base_model_dir`, the base weights' sha256 against the
    record's. With the version's `tags`, each manifest's md5 must also equal its `artifact.<name>.md5` tag (kept
    in the registry, apart from the artifact store). `what` names the version in messages, `shown_as` the
    folder (default its path), `hint` says what to do.

    Returns the names checked ([] for a version registered before manifests were recorded, or a folder with no
    lineage.json). Raises IntegrityError (tasks.common.integrity) naming the first file that differs.
    """
    from tasks.common.integrity import IntegrityError, verify_manifest

    lineage_file = artifacts_dir / LINEAGE_FILE
    if not lineage_file.is_file():
        return []
    record = json.loads(lineage_file.read_text(encoding="utf-8"))
    checked = []
    for name, recorded in (record.get("artifacts") or {}).items():
        if tags is not None and tags.get(f"artifact.{name}.md5") != recorded.get("md5"):
            shown = f"{shown_as}/{LINEAGE_FILE}" if shown_as else lineage_file
            raise IntegrityError(shown, f"records md5 {recorded.get('md5')} for the {what} {name}, the "
                                 f"registry's tag artifact.{name}.md5 says {tags.get(f'artifact.{name}.md5')}",
                                 field=f"artifacts.{name}.md5", hint=hint)
        verify_manifest(artifacts_dir / name, recorded, what=f"{what} {name}", hint=hint,
                        shown_as=f"{shown_as}/{name}" if shown_as else None)
        checked.append(name)
    expected = (record.get("base_model") or {}).get("sha256")
    if base_model_dir is not None and checked and expected:
        from tasks.base_model import weights_sha256

        found = weights_sha256(base_model_dir)
        if found != expected:
            raise IntegrityError(base_model_dir, f"weights sha256 {found} differ from the {expected} the {what} was "
                                 "registered with", hint="restore the base model: `dvc checkout --relink models/base`, "
                                 "else `dvc repro --force --single-item base_model`")
        checked.append("base_model")
    return checked


# ---- walking (for auditors) -----------------------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name@alias`, `name/version` or `models:/...` → (name, alias, version)."""
    ref = ref.removeprefix("models:/").strip()
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    raise LineageError(f"model reference {ref!r} is not '<name>@<alias>' or '<name>/<version>' "
                       f"(e.g. rationanomaly@champion)")


def _client() -> Any:
    from mlflow import MlflowClient

    from tasks.common.tracking import setup_mlflow, tracking_uri

    setup_mlflow()
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def resolve_version(client: Any, ref: str) -> Any:
    """The ModelVersion a reference names, or a LineageError saying what exists."""
    from mlflow.exceptions import MlflowException

    from tasks.common.tracking import tracking_uri

    name, alias, version = parse_ref(ref)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        known = [m.name for m in client.search_registered_models()]
        raise LineageError(f"no registered model named {name!r} in {tracking_uri()} (registered: "
                           f"{', '.join(known) or 'none'})") from exc
    aliases = dict(getattr(model, "aliases", {}) or {})
    if alias is not None:
        if alias not in aliases:
            listed = ", ".join(f"@{a}→v{v}" for a, v in sorted(aliases.items())) or "none"
            raise LineageError(f"model {name!r} has no alias @{alias} (aliases: {listed})")
        version = str(aliases[alias])
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise LineageError(f"model {name!r} has no version {version!r}") from exc


def _aliases_of(client: Any, name: str, version: str) -> list[str]:
    model = client.get_registered_model(name)
    return sorted(a for a, v in (getattr(model, "aliases", {}) or {}).items() if str(v) == str(version))


def _run_summary(client: Any, run_id: str | None, stage: str) -> dict[str, Any]:
    if not run_id:
        return {"run_id": None, "note": f"no {stage} run recorded"}
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return {"run_id": run_id, "note": "run not found in this tracking store"}
    metrics = run.data.metrics
    keep = {k: v for k, v in sorted(metrics.items()) if not k.startswith(("zero_shot.", "sft_only.", "keywords.",
                                                                           "tfidf_lr."))}
    return {"run_id": run_id, "name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "params": dict(sorted(run.data.params.items())),
            "metrics": dict(list(keep.items())[:40]),
            "inputs": [d.dataset.name for d in (run.inputs.dataset_inputs if run.inputs else [])]}


def _load_record(client: Any, mv: Any) -> dict[str, Any]:
    """lineage.json stored with the version's model artifacts ({} if it cannot be read)."""
    import mlflow.artifacts

    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}/artifacts/"
                                                                f"{LINEAGE_FILE}")
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:
        return {}


def lineage(model_ref: str) -> dict[str, Any]:
    """The chain for one model version: runs, params, data (with sources), corrections, base model, code, gate."""
    client = _client()
    mv = resolve_version(client, model_ref)
    tags = dict(mv.tags or {})
    record = _load_record(client, mv)
    runs_record = record.get("runs", {})
    runs = {stage: _run_summary(client, tags.get(f"run.{stage}") or runs_record.get(stage, {}).get("run_id"), stage)
            for stage in ("sft", "grpo", "evaluate", "register")}
    gate = json.loads(tags["gate.verdict"]) if tags.get("gate.verdict") else {}
    return {
        "model": {"name": mv.name, "version": str(mv.version), "ref": model_ref,
                  "aliases": _aliases_of(client, mv.name, mv.version), "created_at": mv.creation_timestamp,
                  "registered_at": tags.get("registered_at"), "registration": tags.get("registration"),
                  "failed": tags.get("failed"), "source": mv.source},
        "runs": runs,
        "params": record.get("params", {"sha256": tags.get("params.sha256")}),
        "data": record.get("data", [{"name": k.split(".")[1], "md5": v} for k, v in tags.items()
                                    if k.startswith("data.") and k.endswith(".md5")]),
        "corrections": record.get("corrections", {}),
        "reviews": record.get("reviews", {}),
        "release": record.get("release", {"kind": tags.get("release.kind", "retrain"),
                                          "adapter_from": tags.get("release.adapter_from")}),
        "base_model": record.get("base_model", {"sha256": tags.get("base_model.sha256")}),
        "teacher": record.get("teacher", tags.get("teacher")),
        "code": record.get("code", {"commit": tags.get("git.commit"), "dirty": tags.get("git.dirty") == "true"}),
        "artifacts": {name: {k: v for k, v in a.items() if k != "files"}
                      for name, a in (record.get("artifacts") or {}).items()},
        "gate": {"passed": tags.get("gate.passed") == "true", "failed_rules": gate.get("failed", []),
                 "rules": gate.get("rules", []), "champion_version_at_gate": gate.get("champion_version"),
                 "approver": tags.get("approved_by"), "approval_reason": tags.get("approval_reason"),
                 "promoted_at": tags.get("promoted_at"), "rolled_back_by": tags.get("rolled_back_by"),
                 "rolled_back_reason": tags.get("rolled_back_reason"), "refused": tags.get("promotion")},
    }


def _norm_hash(value: str) -> str:
    return value.strip().lower().removesuffix(".dir")


def lineage_by_data(data_hash: str, model_name: str | None = None) -> list[dict[str, Any]]:
    """Every registered version trained on data with this hash (a dvc.lock md5 or a source file's sha256;
    a prefix of at least 6 characters is enough)."""
    from tasks.common.tracking import tracking_uri

    wanted = _norm_hash(data_hash)
    if len(wanted) < 6:
        raise LineageError(f"data hash {data_hash!r} is too short; give at least 6 hex characters")
    client = _client()
    names = [model_name] if model_name else [m.name for m in client.search_registered_models()]
    hits = []
    searched = 0
    for name in names:
        for mv in client.search_model_versions(f"name='{name}'"):
            searched += 1
            tags = dict(mv.tags or {})
            matched = []
            for key, value in tags.items():
                if not key.startswith("data."):
                    continue
                for part in value.split(","):
                    label, _, digest = part.rpartition("=")
                    if _norm_hash(digest).startswith(wanted):
                        matched.append(f"{key}[{label}]" if label else key)
            if matched:
                hits.append({"name": mv.name, "version": str(mv.version),
                             "aliases": _aliases_of(client, mv.name, mv.version), "matched": matched,
                             "registered_at": tags.get("registered_at"), "gate_passed": tags.get("gate.passed"),
                             "failed": tags.get("failed")})
    if not hits:
        raise LineageError(f"no registered model version was trained on data with hash {data_hash!r} "
                           f"(searched {searched} version(s) in {tracking_uri()})")
    return sorted(hits, key=lambda h: (h["name"], int(h["version"])))


# ---- rendering ------------------------------------------------------------------------------------------------


def render_lineage(chain: dict[str, Any]) -> Any:
    """A rich Tree an auditor reads top to bottom."""
    from rich.markup import escape
    from rich.tree import Tree

    m = chain["model"]
    aliases = " ".join(f"@{a}" for a in m["aliases"]) or "no alias"
    tree = Tree(f"[bold]{escape(m['name'])} v{m['version']}[/] ({aliases}) registered {m.get('registered_at')}"
                + (f" [red]FAILED: {escape(str(m['failed']))}[/]" if m.get("failed") else ""))
    runs = tree.add("[bold]MLflow runs[/]")
    for stage, run in chain["runs"].items():
        node = runs.add(f"{stage}: {run.get('run_id') or '—'} {escape(run.get('note', '') or run.get('status', ''))}")
        for key in ("inputs",):
            if run.get(key):
                node.add(f"{key}: {escape(', '.join(run[key]))}")
        interesting = {k: v for k, v in run.get("metrics", {}).items() if k.endswith((".f1", "loss", "reward"))}
        for key, value in list(interesting.items())[:8]:
            node.add(f"{escape(key)} = {value:.4f}")
    params = chain["params"]
    node = tree.add(f"[bold]params[/] sha256 {params.get('sha256')} (profile {params.get('profile')})")
    for section_name, values in (params.get("values") or {}).items():
        if isinstance(values, dict):
            short = {k: v for k, v in values.items() if not isinstance(v, dict | list)}
            node.add(f"{section_name}: {escape(json.dumps(short, default=str)[:300])}")
    data = tree.add("[bold]data[/] (dvc.lock md5)")
    for entry in chain["data"]:
        item = data.add(f"{entry['name']}: {entry.get('path', '')} md5 {entry.get('md5')}")
        for source in entry.get("sources", []) or []:
            item.add(f"{escape(str(source['name']))} sha256 {source['sha256']} ← {escape(str(source['url']))} "
                     f"({escape(str(source.get('licence')))})")
    c = chain["corrections"]
    tree.add(f"[bold]corrections[/] applied {c.get('applied')} (exact {c.get('matched_exact')}, normalised "
             f"{c.get('matched_normalized')}, unmatched {c.get('unmatched')}); file {c.get('file')} sha256 "
             f"{c.get('file_sha256')}; review queue {c.get('review_queue_size')}")
    reviews = chain.get("reviews") or {}
    if reviews.get("files"):
        node = tree.add(f"[bold]expert reviews[/] {reviews.get('resolved')} labels resolved"
                        + (f"; new systems (index only): {escape(json.dumps(reviews['new_systems']))}"
                           if reviews.get("new_systems") else ""))
        for f in reviews["files"]:
            node.add(f"{escape(f['file'])} by {escape(f['annotator'])}: {f['votes']} votes, sha256 {f['sha256']}")
    release = chain.get("release") or {}
    if release.get("kind") == "index-only":
        tree.add(f"[bold]index-only release[/]: the adapter of {escape(str(release.get('adapter_from')))}, "
                 "not retrained; index and threshold rebuilt")
    b = chain["base_model"]
    tree.add(f"[bold]base model[/] {escape(str(b.get('source')))} sha256 {b.get('sha256')}")
    tree.add(f"[bold]teacher[/] {escape(str(chain.get('teacher')))}")
    code = chain["code"]
    listed = ", ".join(code.get("modified") or [])  # records before issue 22 hold no list
    changes = (" (uncommitted changes" + (f": {escape(listed)}" if listed else "") + ")") if code.get("dirty") else ""
    tree.add(f"[bold]code[/] commit {code.get('commit')}{changes}")
    for name, artifact in (chain.get("artifacts") or {}).items():
        source = f" ← {escape(str(artifact.get('source')))}" + (f" (dvc.lock {artifact['dvc']['md5']})"
                                                                 if artifact.get("dvc") else "")
        tree.add(f"[bold]{escape(name)}[/] md5 {artifact.get('md5')}, {artifact.get('nfiles')} files{source}")
    g = chain["gate"]
    gate = tree.add(f"[bold]gate[/] {'[green]passed[/]' if g['passed'] else '[red]failed[/]'}"
                    + (f" vs champion v{g['champion_version_at_gate']}" if g.get("champion_version_at_gate") else ""))
    for rule in g.get("rules", []):
        mark = "✓" if rule["passed"] else "✗"
        gate.add(f"{mark} {escape(rule['name'])}: {rule['measured']} (threshold {rule['threshold']})")
    gate.add(f"approver: {escape(str(g.get('approver')))}; reason: {escape(str(g.get('approval_reason')))}; "
             f"promoted at {g.get('promoted_at')}")
    if g.get("rolled_back_by"):
        gate.add(f"[yellow]rolled back by {escape(str(g['rolled_back_by']))}: "
                 f"{escape(str(g.get('rolled_back_reason')))}[/]")
    return tree


def render_by_data(data_hash: str, hits: list[dict[str, Any]]) -> Any:
    """A rich table of the versions trained on data with this hash."""
    from rich.table import Table

    table = Table(title=f"Model versions trained on data {data_hash}")
    for column in ("model", "version", "aliases", "matched", "gate", "registered"):
        table.add_column(column)
    for h in hits:
        table.add_row(h["name"], h["version"], " ".join(f"@{a}" for a in h["aliases"]), ", ".join(h["matched"]),
                      "failed registration" if h.get("failed") else str(h.get("gate_passed")),
                      str(h.get("registered_at")))
    return table
