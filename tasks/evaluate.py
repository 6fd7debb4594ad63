"""evaluate stage: the candidate beside the baselines, on the same test data, in one table (the paper's Table 2).

Test sets: template level on the BGL and Spirit test templates; session level on the BGL_2k 100-line windows
and the HDFS test sessions (tasks/evaluation/testdata.py). Every method classifies each unique template once
(tasks/evaluation/inference.py for the LLMs, tasks/evaluation/baselines.py for the lexical baselines);
tasks/evaluation/metrics.py scores the verdicts and tasks/evaluation/report.py writes them.
Outputs: reports/metrics.json (DVC metrics), reports/eval/ (eval.md, plots, predictions.jsonl), an MLflow run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.config import repo_root
from tasks.common.contracts import CANDIDATE, LLM_BASELINES, RULE_METHODS, Metrics
from tasks.common.files import write_json_atomic
from tasks.common.settings import EvaluateSettings, load_settings
from tasks.evaluation.metrics import MethodResult, score
from tasks.evaluation.report import flat_metrics, markdown_table, sets_of, write_outputs
from tasks.evaluation.testdata import SESSION_SETS, EvalData, load_test_data, unseen_only

METHODS = (*RULE_METHODS, *LLM_BASELINES, CANDIDATE)


def rule_method(name: str, items: list[tuple[str, str]], predict: Callable[[list[str]], np.ndarray]) -> MethodResult:
    """A lexical baseline's verdict on every (dataset, template) item, timed."""
    started = time.perf_counter()
    labels = predict([t for _, t in items]) if items else np.array([], dtype=int)
    seconds = time.perf_counter() - started
    verdicts = {item: {"label": int(y), "valid": None, "rationale_words": None} for item, y in zip(items, labels,
                                                                                                      strict=True)}
    return MethodResult(name, verdicts, seconds, "scikit-learn" if name == "tfidf_lr" else "regex", False)


def llm_method(name: str, engine: Any, items: list[tuple[str, str]], adapter_dir: Path | None) -> MethodResult:
    """An LLM method's verdict on every item through `engine` (base model alone when `adapter_dir` is None)."""
    run_ = engine.classify([t for _, t in items], [d for d, _ in items], adapter_dir=adapter_dir)
    verdicts = {(p.dataset, p.template): {"label": p.label, "valid": p.valid, "verdict": p.verdict,
                                          "rationale_words": p.rationale_words, "rationale": p.rationale,
                                          "completion": p.completion}
                for p in run_.predictions}
    return MethodResult(name, verdicts, run_.seconds, run_.engine, True, run_.notes)


def model_paths(settings: EvaluateSettings, root: Path) -> dict[str, Path | None]:
    """Which model each LLM method runs: None = the base model alone."""
    return {"zero_shot": None, "sft_only": root / settings.sft_dir, CANDIDATE: root / settings.candidate_dir}


def check_inputs(settings: EvaluateSettings, root: Path, methods: Sequence[str]) -> None:
    """Every model folder a method needs exists (InputError naming the folder otherwise), before any loads."""
    from tasks.evaluation.inference import check_model_dirs

    base = root / settings.base_model_dir
    for method, adapter in model_paths(settings, root).items():
        if method in methods:
            check_model_dirs(base, adapter)


def evaluate_all(settings: EvaluateSettings, root: Path | None = None,
                 engine_factory: Callable[..., Any] | None = None) -> tuple[Metrics, EvalData, dict[str, MethodResult]]:
    """Run every method on the same test data; returns (metrics.json content, the data, raw method results).

    Raises InputError for missing or malformed test data or model folders, before any model loads.
    """
    from tasks.evaluation import baselines
    from tasks.evaluation.inference import open_engine

    root = root or repo_root()
    methods = [m for m in METHODS if m == CANDIDATE or m in settings.baselines]
    check_inputs(settings, root, methods)
    data = load_test_data(settings, root)
    items = data.items()
    results: dict[str, MethodResult] = {}
    if "keywords" in methods:
        results["keywords"] = rule_method("keywords", items, baselines.keyword_predict)
    if "tfidf_lr" in methods:
        started = time.perf_counter()
        model = baselines.fit_tfidf_lr(data.train["template"], data.train["label"],
                                       ngram_max=settings.tfidf.ngram_max, c=settings.tfidf.C, seed=settings.seed)
        fit_s = time.perf_counter() - started
        results["tfidf_lr"] = rule_method("tfidf_lr", items, lambda ts: baselines.tfidf_lr_predict(model, ts))
        results["tfidf_lr"].notes.append(f"fitted on {len(data.train)} training templates in {fit_s:.2f} s")
    llm = [m for m in methods if m in (*LLM_BASELINES, CANDIDATE)]
    engine_name, engine_notes = None, []
    if llm:
        factory = engine_factory or open_engine
        engine = factory(root / settings.base_model_dir, settings.engine, batch_size=settings.batch_size,
                         max_new_tokens=settings.max_new_tokens, dtype=settings.dtype,
                         max_model_len=settings.max_model_len, kvcache_gib=settings.kvcache_space_gib,
                         threads=settings.torch_threads)
        try:
            paths = model_paths(settings, root)
            for method in llm:
                results[method] = llm_method(method, engine, items, paths[method])
        finally:
            engine.close()
        engine_name, engine_notes = engine.name, list(engine.notes)
    metrics: Metrics = {
        "engine": engine_name,
        "engine_notes": engine_notes,
        "candidate": CANDIDATE,
        "methods": {name: score(result, data) for name, result in results.items()},
        "speed": {name: {"engine": r.engine, "unique_templates": len(r.verdicts), "seconds": round(r.seconds, 2),
                         "templates_per_s": round(r.templates_per_s, 4)} for name, r in results.items()},
        "test_data": {"digests": data.digests(),
                      "templates": {d: {"n": len(f), "abnormal": int(f["label"].sum())}
                                    for d, f in data.templates.items()},
                      "sessions": {n: {"n": len(s), "abnormal": sum(x["label"] for x in s),
                                       "unseen_n": len(unseen_only(s, data.seen))} for n, s in data.sessions.items()},
                      "unique_templates_classified": len(items), "train_templates": len(data.train)},
        "params": {k: getattr(settings, k) for k in ("max_templates_per_dataset", "max_sessions_per_dataset",
                                                      "max_new_tokens", "batch_size", "dtype", "torch_threads",
                                                      "seed")},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return metrics, data, results


def evaluate_adapter(adapter_dir: str | Path, settings: EvaluateSettings, root: Path | None = None) -> Metrics:
    """metrics.json content for one adapter alone (no baselines) on the current test data.

    For the gate when the champion's stored metrics were measured on other test data (data or caps changed):
    re-evaluate the champion's adapter (tasks.release.registry.download_adapter) here, then compare like with like.
    """
    alone = settings.model_copy(update={"baselines": [], "candidate_dir": str(Path(adapter_dir).resolve())})
    metrics, _, _ = evaluate_all(alone, root)
    return metrics


def adapter_meta(path: Path | None) -> dict[str, Any]:
    """training_meta.json of an adapter folder ({} when absent or unreadable), for lineage tags."""
    meta_file = path / "training_meta.json" if path else None
    if meta_file and meta_file.is_file():
        try:
            return json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
    return {}


def log_to_mlflow(metrics: Metrics, data: EvalData, settings: EvaluateSettings, root: Path, out_dir: Path,
                  metrics_file: Path) -> str:
    """The evaluate run: params, flat metrics, report + plots + predictions, and the datasets as inputs;
    returns the MLflow run id."""
    import mlflow.data

    from tasks.common.tracking import flatten_params, stage_run

    candidate_meta = adapter_meta(model_paths(settings, root)[CANDIDATE])
    tags = {"engine": str(metrics.get("engine")), "candidate": CANDIDATE}
    for key in ("adapter_sha256", "mlflow_run_id", "run_id"):
        if candidate_meta.get(key):
            tags[f"candidate.{key}"] = str(candidate_meta[key])
    with stage_run("evaluate", **tags) as run_:
        mlflow.log_params(flatten_params(settings.model_dump()))
        mlflow.log_metrics(flat_metrics(metrics))
        split_dir = root / settings.split_dir
        mlflow.log_input(mlflow.data.from_pandas(data.train, source=str(split_dir / "train.parquet"),
                                                 name="train_templates", targets="label"), context="training")
        for dataset, frame in data.templates.items():
            mlflow.log_input(mlflow.data.from_pandas(frame, source=str(split_dir / "test.parquet"),
                                                     name=f"test_templates_{dataset}", targets="label"),
                             context="evaluation")
        for name, sessions in data.sessions.items():
            frame = pd.DataFrame({"session_id": [s["id"] for s in sessions],
                                  "templates": [len(s["templates"]) for s in sessions],
                                  "label": [s["label"] for s in sessions]})
            mlflow.log_input(mlflow.data.from_pandas(frame, source=str(split_dir / SESSION_SETS[name][0]),
                                                     name=f"test_sessions_{name}", targets="label"),
                             context="evaluation")
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
        mlflow.log_artifact(str(metrics_file))
        return run_.info.run_id


def run(settings: EvaluateSettings, root: Path | None = None, *, track: bool = True) -> Metrics:
    """The stage: evaluate, write the outputs, log to MLflow (unless `track` is False); returns metrics.json."""
    root = root or repo_root()
    metrics, data, results = evaluate_all(settings, root)
    out_dir, metrics_file = root / settings.out_dir, root / settings.metrics_file
    write_outputs(metrics, data, results, out_dir, metrics_file)
    if track:
        metrics["mlflow_run_id"] = log_to_mlflow(metrics, data, settings, root, out_dir, metrics_file)
        write_json_atomic(metrics_file, metrics)
    return metrics


def main() -> None:
    settings = load_settings().evaluate
    metrics = run(settings)
    print(markdown_table(metrics, [s for s in sets_of(metrics) if not s.endswith("_unseen")]))
    print(f"engine: {metrics['engine']}; report: {settings.out_dir}/eval.md")


if __name__ == "__main__":
    main()
