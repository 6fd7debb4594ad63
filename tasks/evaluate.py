"""evaluate stage: the candidate beside the baselines, on every test item, with intervals (the paper's Table 2).

Test sets (tasks/evaluation/testdata.py, served.py): the whole BGL and Spirit template test splits, the
BGL_2k windows and HDFS sessions (and their unseen-only subsets), and the served path: detect's own code on
raw BGL_2k lines (alert tags; expert-corrected template labels) and on Thunderbird_2k (false alarms). Every
method answers each (dataset, template) once: the lexical, classical and retrieval baselines (baselines.py;
the classical one cross-fits its C and thresholds per dataset on the training templates), the SFT-only
adapter (the paper's "without RL"), the zero-shot base model on a fixed sample, and the candidate, which
answers the served sets through the detector (tasks/evaluation/served.py). The candidate, its
no-retrieval ablation and the SFT adapter are judged by the calibrated verdict score against a threshold
fitted on the validation fold (tasks/evaluation/calibration.py; the candidate's goes to calibration.json and
the registry); the answer-word ablation is the word the candidate's rationale ends in. metrics.py scores every
set with 95% stratified bootstrap intervals; the candidate's paired differences to the best baseline are
computed on the same items. Outputs: reports/metrics.json (DVC metrics; schema in tasks/common/contracts.py),
reports/eval/ (eval.md, plots, predictions.jsonl, candidate_predictions.json, calibration.json), an MLflow run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.config import repo_root, resolve_path
from tasks.common.contracts import CALIBRATION_FILE, CANDIDATE, LLM_BASELINES, RULE_METHODS, Metrics
from tasks.common.files import atomic_dir, read_labelled_templates, write_json_atomic
from tasks.common.prompt import ABNORMAL, NORMAL, parse_completion, scored_verdict
from tasks.common.retrieval import INDEX_FILE, Neighbour, TemplateIndex
from tasks.common.settings import DetectSettings, EvaluateSettings, IndexSettings, load_settings
from tasks.detection.verdicts import TemplateVerdict, apply_verdict_rules, shows_rationale
from tasks.evaluation.calibration import Calibration, choose_threshold, threshold_interval
from tasks.evaluation.intervals import BootstrapSettings, paired_mean_f1_difference
from tasks.evaluation.memo import AnswerMemo
from tasks.evaluation.metrics import Evaluation, MethodResult, score
from tasks.evaluation.rationales import CHECKS, faithfulness_report, grounded_rationale
from tasks.evaluation.report import flat_metrics, main_sets, markdown_table, write_outputs
from tasks.evaluation.retrieval_quality import retrieval_quality
from tasks.evaluation.served import InProcessClassifier, detect_log, read_labelled_log, served_sets
from tasks.evaluation.testdata import SESSION_SETS, EvalData, EvalSet, Key, load_test_data

ANSWER_WORD = f"{CANDIDATE}_answer_word"  # ablation: without calibration (the paper's parsed answer)
NO_RETRIEVAL = f"{CANDIDATE}_no_retrieval"  # ablation: without retrieval (bare prompts)
NO_FIRST_STAGE = f"{CANDIDATE}_no_first_stage"  # ablation: the model scores every template (no first stage)
METHODS = (*RULE_METHODS, *LLM_BASELINES, NO_RETRIEVAL, NO_FIRST_STAGE, ANSWER_WORD, CANDIDATE)


def load_index(retrieval: IndexSettings | None, root: Path) -> TemplateIndex | None:
    """The index stage's retrieval index, None when prompts carry no neighbours (k 0 or no settings)."""
    if retrieval is None or retrieval.k == 0:
        return None
    return TemplateIndex.load(root / retrieval.out_dir / INDEX_FILE)


def rationale_summary(candidate: MethodResult, sets: Sequence[EvalSet],
                      neighbours: Callable[[Sequence[Key]], Any], policy: str, has_threshold: bool,
                      examples: int, seed: int) -> dict[str, Any]:
    """Faithfulness of the candidate's rationales (tasks.evaluation.rationales.faithfulness_report, issue 19 item
    3) on every set, over three scopes: `shown` (what a user reads: for the items `detect` shows a rationale
    under `policy`, params.yaml detect.rationales, the rationale after the served paths' guard,
    tasks.evaluation.rationales.grounded_rationale; its `replaced` count and share say how many the guard
    replaced by the evidence rationale), `shown_model` (the model's own rationales on those items, before the
    guard) and `all` (every rationale the model wrote, i.e. every explained item). Each rationale is checked
    against its log, the neighbours its prompt showed (`neighbours(keys)`, the same function the prompts were
    built with) and the verdict it comes with (the scored one). Also `pooled` over every key once, and
    `examples`: up to `examples` rationales per verdict (seeded) from the served BGL_2k and Thunderbird_2k logs,
    each with the checks the model's own rationale failed and the one shown. Sets named `*_sample` (the
    zero-shot samples) are left out: they repeat template-set keys."""
    import random

    written = [key for key, v in candidate.verdicts.items() if v.get("rationale")]
    shown_near = neighbours(written) if written else None
    near = {key: list(shown_near[i]) if shown_near is not None else [] for i, key in enumerate(written)}

    def item(key: Key) -> tuple[str, str, str, list[Any], int]:
        v = candidate.verdicts[key]
        return v["rationale"], key[1], key[0], near[key], int(v["label"])

    guarded = {key: grounded_rationale(*item(key)) for key in written}

    def shown_item(key: Key) -> tuple[str, str, str, list[Any], int]:
        return (guarded[key].text, *item(key)[1:])

    def shown(key: Key) -> bool:
        return shows_rationale(policy, ABNORMAL if candidate.verdicts[key]["label"] else NORMAL, has_threshold)

    def scopes(keys: Sequence[Key]) -> dict[str, Any]:
        keys = [key for key in keys if key in near]
        seen = [key for key in keys if shown(key)]
        replaced = sum(guarded[key].source != "model" for key in seen)
        return {"shown": {**faithfulness_report(shown_item(key) for key in seen), "replaced_count": replaced,
                          "replaced": round(replaced / len(seen), 4) if seen else 0.0},
                "shown_model": faithfulness_report(item(key) for key in seen),
                "all": faithfulness_report(item(key) for key in keys)}

    def sample(prefix: str) -> dict[str, list[dict[str, Any]]]:
        keys = list(dict.fromkeys(key for s in sets if s.name.startswith(prefix) for key in s.unique_keys()
                                  if key in near))
        out = {}
        for verdict, label in ((ABNORMAL, 1), (NORMAL, 0)):
            group = [key for key in keys if candidate.verdicts[key]["label"] == label]
            picked = random.Random(seed).sample(group, min(examples, len(group)))
            out[verdict] = [{"dataset": key[0], "log": key[1], "score": candidate.verdicts[key].get("score"),
                             "rationale": candidate.verdicts[key]["rationale"], "shown": shown(key),
                             "failed": list(guarded[key].failed), "shown_rationale": guarded[key].text,
                             "source": guarded[key].source} for key in picked]
        return out

    return {"policy": policy, "threshold": has_threshold, "checks": list(CHECKS), "pooled": scopes(written),
            "sets": {s.name: scopes(s.unique_keys()) for s in sets if not s.name.endswith("_sample")},
            "examples": {"served_bgl2k": sample("served_bgl2k"), "served_thunderbird": sample("served_thunderbird")}}


def rule_method(name: str, keys: Sequence[Key], predict: Callable[[list[str]], np.ndarray], engine: str,
                scores: Callable[[list[str]], np.ndarray] | None = None) -> MethodResult:
    """A lexical or retrieval baseline's verdict (and score, when it has one) on every (dataset, template) key."""
    started = time.perf_counter()
    texts = [t for _, t in keys]
    labels = predict(texts) if keys else np.array([], dtype=int)
    values = scores(texts) if scores is not None and keys else [None] * len(keys)
    seconds = time.perf_counter() - started
    verdicts = {key: {"label": int(y), "score": None if v is None else float(v), "valid": None,
                      "rationale_words": None} for key, y, v in zip(keys, labels, values, strict=True)}
    return MethodResult(name, verdicts, seconds, engine, False)


def training_templates(data: EvalData) -> pd.DataFrame:
    """Every labelled template that is not a test item: the training split and the validation fold (dataset,
    template, label), what the classical baseline cross-fits its C and thresholds on."""
    parts = [data.train] + ([data.validation] if data.validation is not None else [])
    return pd.concat([p[["dataset", "template", "label"]] for p in parts], ignore_index=True)


def keyed_rule_method(name: str, keys: Sequence[Key], predict: Callable[[list[Key]], np.ndarray],
                      scores: Callable[[list[Key]], np.ndarray]) -> MethodResult:
    """A baseline that answers each (dataset, template) key by its dataset's model (the classical detector)."""
    started = time.perf_counter()
    keys = list(keys)
    labels, values = (predict(keys), scores(keys)) if keys else (np.array([], dtype=int), np.array([]))
    verdicts = {key: {"label": int(y), "score": float(v), "valid": None, "rationale_words": None}
                for key, y, v in zip(keys, labels, values, strict=True)}
    return MethodResult(name, verdicts, time.perf_counter() - started, "scikit-learn", False)


def _llm_verdict(p: Any) -> dict[str, Any]:
    """A verdict dict from an engine Prediction (tasks.evaluation.inference)."""
    return {"label": p.label, "valid": p.valid, "verdict": p.verdict, "rationale_words": p.rationale_words,
            "rationale": p.rationale, "completion": p.completion}


def _served_verdict(v: TemplateVerdict) -> dict[str, Any]:
    """A verdict dict from what the detector was told (tasks.detection.verdicts.TemplateVerdict); `valid` is the
    rationale's format when one was written (its answer word was readable), None when none was written. The
    rationale is the model's own (read from the completion): rationale_summary applies the served guard itself."""
    model_rationale = parse_completion(v.raw).think if v.raw else ""  # the model's own, before the served guard
    return {"label": int(v.verdict == ABNORMAL), "score": v.score, "valid": (v.answer is not None) if v.raw else None,
            "verdict": v.verdict, "rationale_words": len(model_rationale.split()), "rationale": model_rationale,
            "completion": v.raw}


def llm_method(name: str, engine: Any, keys: Sequence[Key], adapter_dir: Path | None,
               neighbours: Any = None, verdicts: Sequence[str] | None = None) -> MethodResult:
    """An LLM method's written answer (rationale, then the answer word) on every key through `engine` (the base
    model alone when `adapter_dir` is None); `neighbours[i]` are shown with key i; `verdicts[i]` is the verdict
    key i's rationale is written for (None: the model answers the open question)."""
    run_ = engine.classify([t for _, t in keys], [d for d, _ in keys], adapter_dir=adapter_dir, neighbours=neighbours,
                           verdicts=verdicts)
    verdicts = {(p.dataset, p.template): _llm_verdict(p) for p in run_.predictions}
    return MethodResult(name, verdicts, run_.seconds, run_.engine, True, run_.notes)


def answer_memo(settings: EvaluateSettings, root: Path) -> AnswerMemo | None:
    """The answer memo under `evaluate.answer_memo` (relative to `root`; None when null): answers to exact prompts
    asked before by the same engine and weights are not asked again (tasks.evaluation.memo)."""
    if settings.answer_memo is None:
        return None
    return AnswerMemo(resolve_path(settings.answer_memo, root), settings.answer_memo_gib)


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


def bootstrap_settings(settings: EvaluateSettings) -> BootstrapSettings:
    """The interval settings of `evaluate.bootstrap`, seeded with `evaluate.seed`."""
    return BootstrapSettings(settings.bootstrap.resamples, settings.bootstrap.confidence, settings.seed)


def _served(settings: EvaluateSettings, detect: DetectSettings, root: Path, classifier: InProcessClassifier,
            data: EvalData) -> tuple[list[EvalSet], dict[str, Any]]:
    served = settings.served
    bgl = read_labelled_log("bgl2k", root / served.bgl_log, "bgl", served.max_lines)
    thunderbird = read_labelled_log("thunderbird", root / served.thunderbird_log, "thunderbird", served.max_lines)
    corrected = read_labelled_templates(root / served.corrected_templates,
                                        ("dataset", "template", "label", "correction"),
                                        missing_hint="run `dvc repro correct`", what="corrected templates")
    return served_sets(detect_log(bgl, detect, classifier), detect_log(thunderbird, detect, classifier),
                       corrected, data.seen, served.window_lines)


def differences(results: dict[str, MethodResult], sets: Sequence[EvalSet], metrics: dict[str, Any],
                bootstrap: BootstrapSettings) -> dict[str, dict[str, Any]]:
    """Paired F1 differences on the same items, per set with anomalies: the candidate minus the best lexical,
    classical or retrieval baseline on that set (by point F1), and minus the SFT-only adapter (the RL ablation)."""
    out: dict[str, dict[str, Any]] = {}
    candidate = results.get(CANDIDATE)
    if candidate is None:
        return out
    for eval_set in sets:
        if not eval_set.positives_expected or not candidate.answers(eval_set):
            continue
        rows: dict[str, Any] = {}
        baselines = [m for m in RULE_METHODS if m in results and results[m].answers(eval_set)]
        if baselines:
            best = max(baselines, key=lambda m: metrics[m][eval_set.name]["f1"])
            rows["best_baseline"] = best
        others = [("best_baseline", rows.get("best_baseline")), ("sft_only", "sft_only")]
        for label, other in others:
            if other is None or other not in results or not results[other].answers(eval_set):
                continue
            paired = (eval_set.labels, candidate.predictions(eval_set), results[other].predictions(eval_set))
            diff = paired_mean_f1_difference({eval_set.name: paired}, bootstrap)
            rows[f"vs_{label}"] = {"method": other, "f1_difference": diff.difference,
                                   "ci": list(diff.interval) if diff.interval else None}
        out[eval_set.name] = rows
    return out


def item_predictions(result: MethodResult, sets: Sequence[EvalSet]) -> dict[str, dict[str, Any]]:
    """Per set: item ids, labels and the method's 0/1 predictions (the gate pairs the champion's with them)."""
    return {s.name: {"ids": list(s.ids), "labels": s.labels.tolist(), "pred": result.predictions(s).tolist(),
                     "digest": s.digest()}
            for s in sets if s.positives_expected and result.answers(s)}


def scored_method(name: str, engine: Any, adapter: Path | None, keys: Sequence[Key], data: EvalData,
                  neighbours: Callable[[Sequence[Key]], Any], bootstrap: BootstrapSettings | None = None,
                  first_stage: bool = True,
                  found: Callable[[Sequence[Key]], Sequence[Sequence[Neighbour]] | None] | None = None,
                  ) -> tuple[MethodResult, Calibration | None]:
    """A method judged by its calibrated verdict score: the threshold fitted on the validation fold, then every
    key scored and thresholded. Without a validation fold (or one without anomalies) the threshold is 0.5 and
    no calibration is returned; evaluate_all then judges the candidate by its answer word, as it is served.

    `neighbours(keys)` gives the labelled templates shown with each key (None: bare prompts). With `bootstrap`,
    the calibration carries the threshold's spread over stratified resamples of the validation fold
    (tasks.evaluation.calibration.threshold_interval; issue 18 item 5). `first_stage` False: the model scores
    every template, none is called normal before it (the first-stage ablation). `found(keys)` gives the same
    neighbours with their system: the served verdict rules then apply on top of the threshold, as every served
    path applies them (tasks.detection.verdicts.apply_verdict_rules: a labelled template takes its label, an
    alert without evidence is normal); the threshold is fitted on the scores alone.
    """
    val_keys, val_labels = data.validation_keys()
    calibration = None
    threshold = 0.5
    seconds = 0.0
    if val_keys and sum(val_labels):
        val_run = engine.score([t for _, t in val_keys], [d for d, _ in val_keys], adapter, neighbours(val_keys),
                               first_stage=first_stage)
        calibration = choose_threshold(val_labels, val_run.scores)
        if bootstrap is not None:
            calibration = dataclasses.replace(calibration, threshold_ci=threshold_interval(
                val_labels, val_run.scores, bootstrap.resamples, bootstrap.confidence, bootstrap.seed))
        threshold, seconds = calibration.threshold, val_run.seconds
    run_ = engine.score([t for _, t in keys], [d for d, _ in keys], adapter, neighbours(keys),
                        first_stage=first_stage)
    verdicts = {key: {"label": int(scored_verdict(s, threshold) == ABNORMAL), "score": s, "valid": None,
                      "rationale_words": None} for key, s in zip(keys, run_.scores, strict=True)}
    result = MethodResult(name, verdicts, run_.seconds + seconds, run_.engine, True)
    result.notes.append(f"verdict score ≥ {threshold:.4f}" + (" (fitted on the validation fold)" if calibration
                                                              else " (no validation fold)"))
    shown = found(keys) if found is not None and calibration is not None else None
    if shown is not None:
        ruled = [apply_verdict_rules(t, d, near, ABNORMAL if verdicts[(d, t)]["label"] else NORMAL)
                 for (d, t), near in zip(keys, shown, strict=True)]
        for key, r in zip(keys, ruled, strict=True):
            verdicts[key]["label"] = int(r.verdict == ABNORMAL)
        result.notes.append(f"verdict rules: {sum(r.labelled for r in ruled)} labelled templates took their label, "
                            f"{sum(r.no_evidence for r in ruled)} alerts without evidence (no failure word, and "
                            "the nearest labelled neighbour of their system shown not abnormal) are normal")
    calls = len(keys) if run_.model_calls is None else run_.model_calls
    result.model_calls_per_template = calls / max(1, len(keys))
    if first_stage:
        result.notes.append(f"the model scored {calls} of {len(keys)} templates; the first stage called the rest "
                            "normal (no letter word)")
    return result, calibration


def explained_keys(candidate: MethodResult, keys: Sequence[Key], normal_sample: int, seed: int) -> list[Key]:
    """The keys the evaluation writes a rationale for: every one the candidate calls abnormal (the rationales
    `detect` shows by default) and a seeded sample of `normal_sample` normal-verdict keys per dataset (so the
    report has rationales of both verdicts), in `keys` order."""
    import random

    normals: dict[str, list[Key]] = {}
    for key in keys:
        if not candidate.verdicts[key]["label"]:
            normals.setdefault(key[0], []).append(key)
    sampled = {key for group in normals.values() for key in random.Random(seed).sample(group, min(normal_sample,
                                                                                                   len(group)))}
    return [key for key in keys if candidate.verdicts[key]["label"] or key in sampled]


def rule_baselines(settings: EvaluateSettings, methods: Sequence[str], data: EvalData, keys: Sequence[Key],
                   index: TemplateIndex | None) -> tuple[dict[str, MethodResult], dict[str, dict[str, Any]]]:
    """The lexical, classical and retrieval baselines among `methods`, each answering every key (no model
    loads); and the classical baseline's fits per dataset (C, threshold and its spread; {} without it). They
    learn from training templates only: keywords from none, tfidf_lr and the knn ones from the training split,
    classical from the training split and the validation fold (`training_templates`)."""
    from tasks.evaluation import baselines

    all_keys = list(keys)
    out: dict[str, MethodResult] = {}
    classical_fits: dict[str, dict[str, Any]] = {}
    if "keywords" in methods:
        out["keywords"] = rule_method("keywords", all_keys, baselines.keyword_predict, "regex")
    if "tfidf_lr" in methods:
        started = time.perf_counter()
        model = baselines.fit_tfidf_lr(data.train["template"], data.train["label"], ngram_max=settings.tfidf.ngram_max,
                                       c=settings.tfidf.C, seed=settings.seed)
        out["tfidf_lr"] = rule_method("tfidf_lr", all_keys, lambda ts: baselines.tfidf_lr_predict(model, ts),
                                      "scikit-learn", lambda ts: baselines.tfidf_lr_scores(model, ts))
        out["tfidf_lr"].notes.append(f"fitted on {len(data.train)} training templates in "
                                     f"{time.perf_counter() - started:.2f} s")
    if "classical" in methods:
        started = time.perf_counter()
        detector = baselines.fit_classical(training_templates(data), settings.classical,
                                           confidence=settings.bootstrap.confidence, seed=settings.seed)
        out["classical"] = keyed_rule_method("classical", all_keys, detector.predict, detector.scores)
        out["classical"].seconds += time.perf_counter() - started
        classical_fits = {scope: fit.to_dict() for scope, fit in detector.fits.items()}
    if {"knn_1", "knn_vote"} & set(methods):
        knn = index or TemplateIndex(data.train["template"], data.train["label"], data.train["dataset"])
        systems = [d for d, _ in all_keys]  # rule_method passes the keys' templates in this order
        if "knn_1" in methods:
            out["knn_1"] = rule_method("knn_1", all_keys, lambda ts: baselines.knn_1_predict(knn, ts, systems),
                                       "scikit-learn")
        if "knn_vote" in methods:
            votes = settings.knn.k
            out["knn_vote"] = rule_method(
                "knn_vote", all_keys,
                lambda ts: (baselines.knn_vote_scores(knn, ts, votes, systems) >= 0.5).astype(int),
                "scikit-learn", lambda ts: baselines.knn_vote_scores(knn, ts, votes, systems))
    return out, classical_fits


def evaluate_all(settings: EvaluateSettings, detect: DetectSettings, root: Path | None = None,
                 engine_factory: Callable[..., Any] | None = None, retrieval: IndexSettings | None = None,
                 ablations: bool = True) -> Evaluation:
    """Run every method on the same test data and score it; see the module docstring. `ablations` False leaves
    out the candidate's no-retrieval and no-first-stage ablations (no gate rule reads them; the index-only
    release, issue 20, measures only what the verdict and the gate need).

    Raises InputError for missing or malformed test data or model folders, before any model loads.
    """
    from tasks.evaluation.inference import open_engine

    root = root or repo_root()
    methods = [m for m in METHODS if m == CANDIDATE or m in settings.baselines]
    check_inputs(settings, root, methods)
    data = load_test_data(settings, root)
    sets = data.sets()
    samples = data.sample_sets(settings.zero_shot_sample, settings.seed) if "zero_shot" in methods else []
    keys = list(dict.fromkeys(k for s in sets for k in s.unique_keys()))
    results: dict[str, MethodResult] = {}
    calibrations: dict[str, dict[str, Any]] = {}
    paths = model_paths(settings, root)
    index = load_index(retrieval, root)
    k = retrieval.k if retrieval is not None else 0

    shown_of: dict[Key, list[Neighbour]] = {}  # one index lookup per key, for the prompts and the verdict rules

    def found(batch: Sequence[Key]) -> list[list[Neighbour]] | None:
        """Per key: the neighbours its prompt shows, with system and label (the verdict rules; None: no index)."""
        if index is None or k == 0:
            return None
        missing = [key for key in dict.fromkeys(batch) if key not in shown_of]
        if missing:
            shown_of.update(zip(missing, index.shown([t for _, t in missing], [d for d, _ in missing], k),
                                strict=True))
        return [shown_of[key] for key in batch]

    def with_neighbours(batch: Sequence[Key]) -> list[list[tuple[str, int]]] | None:
        """Per key: the (template, label) pairs its prompt shows (index.prompt_neighbours of `found`)."""
        near = found(batch)
        return None if near is None else [[(n.template, n.label) for n in shown] for shown in near]

    memo = answer_memo(settings, root) if engine_factory is None else None
    factory = engine_factory or functools.partial(open_engine, memo=memo)
    engine = factory(root / settings.base_model_dir, settings.engine, batch_size=settings.batch_size,
                     max_new_tokens=settings.max_new_tokens, dtype=settings.dtype,
                     max_model_len=settings.max_model_len, kvcache_gib=settings.kvcache_space_gib,
                     threads=settings.torch_threads)
    try:
        candidate, calibration = scored_method(CANDIDATE, engine, paths[CANDIDATE], keys, data, with_neighbours,
                                               bootstrap_settings(settings), found=found)
        if calibration is None:  # no threshold to register: the version is served by its answer word, so judge that
            explained = llm_method("explain", engine, keys, paths[CANDIDATE], with_neighbours(keys))
            for key, answer in explained.verdicts.items():
                candidate.verdicts[key].update({**answer, "answer_label": answer["label"]})
            candidate.notes = ["the answer word the model wrote: no validation fold anomaly to fit a threshold on"]
            answer_word = {key: {f: x for f, x in v.items() if f not in ("score", "answer_label")}
                           for key, v in candidate.verdicts.items()}
            answer_note = "the answer word the model wrote, no score or threshold"
        else:  # the score decides; a rationale is written for that verdict (issue 19), as the endpoint does
            chosen = explained_keys(candidate, keys, settings.explain_normal_sample, settings.seed)
            explained = llm_method("explain", engine, chosen, paths[CANDIDATE], with_neighbours(chosen),
                                   [ABNORMAL if candidate.verdicts[key]["label"] else NORMAL for key in chosen])
            for key, answer in explained.verdicts.items():
                candidate.verdicts[key].update({**answer, "label": candidate.verdicts[key]["label"],
                                                "answer_label": answer["label"]})
            # without calibration: the more probable answer word of the verdict task (score 0.5), no threshold
            answer_word = {key: {"label": int(v["score"] is not None and v["score"] >= 0.5), "score": None,
                                 "valid": v["score"] is not None, "rationale_words": None}
                           for key, v in candidate.verdicts.items()}
            answer_note = "the verdict task's more probable answer word (score 0.5), no calibrated threshold"
        candidate.seconds += explained.seconds
        results[ANSWER_WORD] = MethodResult(ANSWER_WORD, answer_word, candidate.seconds, candidate.engine, True,
                                            [answer_note])
        classifier = InProcessClassifier(engine, paths[CANDIDATE], version="candidate",
                                         threshold=calibration.threshold if calibration else None,
                                         neighbours=with_neighbours, rationales=detect.rationales,
                                         found=found)
        served, served_info = _served(settings, detect, root, classifier, data)
        candidate.verdicts.update({key: _served_verdict(v) for key, v in classifier.answers.items()
                                   if key not in candidate.verdicts})
        candidate.seconds += classifier.seconds
        results[CANDIDATE] = candidate
        if calibration:
            calibrations[CANDIDATE] = calibration.to_dict()
        if index is not None and k and ablations:
            bare, bare_calibration = scored_method(NO_RETRIEVAL, engine, paths[CANDIDATE], keys, data, lambda b: None)
            results[NO_RETRIEVAL] = bare
            if bare_calibration:
                calibrations[NO_RETRIEVAL] = bare_calibration.to_dict()
        if ablations:
            every, every_calibration = scored_method(NO_FIRST_STAGE, engine, paths[CANDIDATE], keys, data,
                                                     with_neighbours, first_stage=False, found=found)
            results[NO_FIRST_STAGE] = every
            if every_calibration:
                calibrations[NO_FIRST_STAGE] = every_calibration.to_dict()
        if "sft_only" in methods:
            sft, sft_calibration = scored_method("sft_only", engine, paths["sft_only"], keys, data, with_neighbours,
                                                 found=found)
            results["sft_only"] = sft
            if sft_calibration:
                calibrations["sft_only"] = sft_calibration.to_dict()
        if "zero_shot" in methods:
            sample_keys = list(dict.fromkeys(k for s in samples for k in s.unique_keys()))
            results["zero_shot"] = llm_method("zero_shot", engine, sample_keys, None)
    finally:
        engine.close()
        if memo is not None:
            memo.close()
    engine_name, engine_notes = engine.name, list(engine.notes)
    memo_note = engine.memo_note() if memo is not None else None
    if memo_note:
        engine_notes.append(memo_note)

    all_keys = list(dict.fromkeys([*keys, *(k for s in served for k in s.unique_keys())]))
    rules, classical_fits = rule_baselines(settings, methods, data, all_keys, index)
    results.update(rules)

    all_sets = [*sets, *served, *samples]
    bootstrap = bootstrap_settings(settings)
    ordered = {name: results[name] for name in METHODS if name in results}
    scored = {name: score(result, all_sets, bootstrap) for name, result in ordered.items()}
    metrics: Metrics = {
        "schema": 2,
        "engine": engine_name,
        "engine_notes": engine_notes,
        "candidate": CANDIDATE,
        "methods": scored,
        "differences": differences(ordered, all_sets, scored, bootstrap),
        "calibration": calibrations,
        "ablations": {ANSWER_WORD: "without calibration: the answer word the model wrote",
                      NO_RETRIEVAL: "without retrieval: bare prompts, no neighbours",
                      NO_FIRST_STAGE: "without the first stage: the model scores templates without a letter word too",
                      "sft_only": "without RL: the SFT adapter"},
        "rationales": rationale_summary(results[CANDIDATE], all_sets, with_neighbours, detect.rationales,
                                        calibration is not None, settings.rationale_examples, settings.seed),
        "speed": {name: {"engine": r.engine, "unique_templates": len(r.verdicts), "seconds": round(r.seconds, 2),
                         "templates_per_s": round(r.templates_per_s, 4),
                         "model_calls_per_template": None if r.model_calls_per_template is None
                         else round(r.model_calls_per_template, 4)} for name, r in ordered.items()},
        "test_data": {"digests": {s.name: s.digest() for s in all_sets},
                      "sets": {s.name: {"family": s.family, "n": len(s.ids), "abnormal": int(s.labels.sum()),
                                        "note": s.note} for s in all_sets},
                      "templates": {d: {"n": len(f), "abnormal": int(f["label"].sum())}
                                    for d, f in data.templates.items()},
                      "sessions": {n: {"n": len(s), "abnormal": sum(x["label"] for x in s)}
                                   for n, s in data.sessions.items()},
                      "served": served_info,
                      "validation": {"n": len(data.validation_keys()[0]), "abnormal": sum(data.validation_keys()[1])},
                      "unique_templates_classified": len(keys), "train_templates": len(data.train)},
        "bootstrap": {"resamples": bootstrap.resamples, "confidence": bootstrap.confidence, "seed": bootstrap.seed,
                      "method": "percentile, stratified by label (scipy.stats.bootstrap)"},
        "params": {k_: getattr(settings, k_) for k_ in ("max_templates_per_dataset", "max_sessions_per_dataset",
                                                        "zero_shot_sample", "max_new_tokens", "batch_size", "dtype",
                                                        "torch_threads", "seed")} | {"neighbours_k": k},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if classical_fits:
        metrics["classical"] = classical_fits
    if index is not None and k:  # what the prompts showed on the test split (issue 18)
        items = [(str(t), d, int(y)) for d, f in data.templates.items()
                 for t, y in zip(f["template"], f["label"], strict=True)]
        metrics["retrieval"] = {"policy": index.policy(), "datasets": retrieval_quality(index, items, k)}
    return Evaluation(metrics, data, ordered, all_sets)


def evaluate_adapter(adapter_dir: str | Path, settings: EvaluateSettings, detect: DetectSettings,
                     retrieval: IndexSettings, root: Path | None = None) -> tuple[Metrics, dict[str, dict[str, Any]]]:
    """metrics.json content and per-item predictions for one adapter alone (no baselines) on the current data.

    For the gate when the champion's stored results were measured on other test data (data or caps changed):
    re-evaluate the champion's adapter (tasks.release.registry.download_adapter) here, then compare like with like.
    """
    alone = settings.model_copy(update={"baselines": [], "candidate_dir": str(Path(adapter_dir).resolve())})
    evaluation = evaluate_all(alone, detect, root, retrieval=retrieval)
    return evaluation.metrics, item_predictions(evaluation.results[CANDIDATE], evaluation.sets)


def evaluate_kept_adapter(adapter_dir: str | Path, settings: EvaluateSettings, detect: DetectSettings,
                          retrieval: IndexSettings, out_dir: Path, root: Path | None = None) -> Metrics:
    """The index-only release's evaluation (issue 20): a registered adapter kept as it is, judged with the current
    retrieval index on the current test data, measuring what its verdict and the gate need and nothing else: the
    threshold refitted on the validation fold (the index changes the scores), every gated set (template test
    splits, the served BGL_2k and Thunderbird_2k paths) and the rationales the gate's faithfulness rules read; no
    baselines, no ablations. Writes `metrics.json`, `candidate_predictions.json` and `calibration.json` (with the
    neighbours its prompts carried) into `out_dir` (replaced as a whole); returns the metrics.

    Raises InputError for missing test data, adapter or base model."""
    from tasks.evaluation.report import CANDIDATE_PREDICTIONS

    alone = settings.model_copy(update={"baselines": [], "candidate_dir": str(Path(adapter_dir).resolve())})
    evaluation = evaluate_all(alone, detect, root, retrieval=retrieval, ablations=False)
    metrics = evaluation.metrics
    calibration = (metrics.get("calibration") or {}).get(CANDIDATE)
    calibration = {**calibration, "neighbours": metrics["params"].get("neighbours_k", 0)} if calibration else {}
    with atomic_dir(out_dir) as staging:
        write_json_atomic(staging / "metrics.json", metrics)
        write_json_atomic(staging / CANDIDATE_PREDICTIONS,
                          item_predictions(evaluation.results[CANDIDATE], evaluation.sets))
        write_json_atomic(staging / CALIBRATION_FILE, calibration)
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


def log_to_mlflow(evaluation: Evaluation, settings: EvaluateSettings, root: Path, out_dir: Path,
                  metrics_file: Path) -> str:
    """The evaluate run: params, flat metrics, report + plots + predictions, and the datasets as inputs;
    returns the MLflow run id."""
    import mlflow.data

    from tasks.common.tracking import flatten_params, stage_run

    metrics, data = evaluation.metrics, evaluation.data
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


def run(settings: EvaluateSettings, detect: DetectSettings, retrieval: IndexSettings, root: Path | None = None, *,
        track: bool = True) -> Metrics:
    """The stage: evaluate, write the outputs, log to MLflow (unless `track` is False); returns metrics.json."""
    root = root or repo_root()
    evaluation = evaluate_all(settings, detect, root, retrieval=retrieval)
    out_dir, metrics_file = root / settings.out_dir, root / settings.metrics_file
    write_outputs(evaluation, item_predictions(evaluation.results[CANDIDATE], evaluation.sets), out_dir,
                  metrics_file)
    if track:
        evaluation.metrics["mlflow_run_id"] = log_to_mlflow(evaluation, settings, root, out_dir, metrics_file)
        write_json_atomic(metrics_file, evaluation.metrics)
    return evaluation.metrics


def main() -> None:
    settings = load_settings()
    metrics = run(settings.evaluate, settings.detect, settings.index)
    print(markdown_table(metrics, main_sets(metrics)))
    print(f"engine: {metrics['engine']}; report: {settings.evaluate.out_dir}/eval.md")


if __name__ == "__main__":
    main()
