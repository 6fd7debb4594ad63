"""evaluate stage: the candidate beside the baselines, on the same test data, in one table (the paper's Table 2).

Test sets: template level on the BGL and Spirit test templates; session level on the BGL_2k 100-line windows
and the HDFS test sessions. Each unique template is classified once per method and the verdicts are mapped
onto sessions (a session is abnormal if any of its templates is). Session sets are also scored on the
unseen-only subset: lines whose template is among the training templates are dropped (a window's label is
recomputed from its remaining lines; a session without line labels is kept only if no template was seen).

Metrics (abnormal = positive): precision, recall, F1, confusion matrix (scikit-learn), format-valid rate,
mean rationale length, templates/s. An unparseable answer counts as normal and is also counted apart.
Outputs: reports/metrics.json (DVC metrics), reports/eval/ (eval.md, plots, predictions.jsonl), an MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from tasks.config import repo_root, section
from tasks.errors import InputError, write_text_atomic

CANDIDATE = "rationanomaly"
RULE_METHODS = ("keywords", "tfidf_lr")
LLM_BASELINES = ("zero_shot", "sft_only")
METHODS = (*RULE_METHODS, *LLM_BASELINES, CANDIDATE)
SESSION_SETS = {"bgl2k": ("sessions_bgl2k.jsonl", "window_id", "bgl"), "hdfs": ("sessions_hdfs.jsonl", "session_id",
                                                                                 "hdfs")}
SPLIT_COLUMNS = ("dataset", "template", "label")


# ---- metrics --------------------------------------------------------------------------------------------------


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], *, valid: Sequence[bool] | None = None,
                   rationale_words: Sequence[int] | None = None) -> dict[str, Any]:
    """Precision, recall, F1 and the confusion matrix with abnormal (1) as the positive class.

    `valid` marks answers that followed the format; invalid ones are already counted as normal in `y_pred`
    and are reported apart (how many, and how many of them hid a real anomaly). Rule baselines pass None.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true_a, y_pred_a = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true_a.shape != y_pred_a.shape:
        raise ValueError(f"{len(y_true_a)} labels but {len(y_pred_a)} predictions")
    n = len(y_true_a)
    out: dict[str, Any] = {"n": n, "n_abnormal": int(y_true_a.sum())}
    if n:
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true_a, y_pred_a, average="binary", pos_label=1, labels=[0, 1], zero_division=0)
        cm = confusion_matrix(y_true_a, y_pred_a, labels=[0, 1])
        out.update(precision=float(precision), recall=float(recall), f1=float(f1),
                   accuracy=float(accuracy_score(y_true_a, y_pred_a)), confusion_matrix=cm.tolist())
    else:
        out.update(precision=0.0, recall=0.0, f1=0.0, accuracy=0.0, confusion_matrix=[[0, 0], [0, 0]])
    if valid is not None:
        valid_a = np.asarray(valid, dtype=bool)
        out["format_valid_rate"] = float(valid_a.mean()) if len(valid_a) else 1.0
        out["format_invalid"] = int((~valid_a).sum())
        if len(valid_a) == n:
            out["format_invalid_abnormal"] = int(((~valid_a) & (y_true_a == 1)).sum())
        words = np.asarray(rationale_words if rationale_words is not None else [], dtype=float)
        valid_words = words[valid_a] if len(words) == len(valid_a) else words
        out["mean_rationale_words"] = float(valid_words.mean()) if len(valid_words) else 0.0
    else:
        out.update(format_valid_rate=None, format_invalid=None, mean_rationale_words=None)
    return out


# ---- test data ------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Everything every method is scored on, identical for all of them."""

    train: pd.DataFrame
    templates: dict[str, pd.DataFrame]  # dataset -> test templates (capped)
    sessions: dict[str, list[dict[str, Any]]]  # bgl2k/hdfs -> sessions
    seen: set[str] = field(default_factory=set)  # training templates, stripped

    def items(self) -> list[tuple[str, str]]:
        """Unique (dataset, template) pairs to classify: test templates and every session template."""
        pairs: dict[tuple[str, str], None] = {}
        for dataset, frame in self.templates.items():
            pairs.update(dict.fromkeys(zip([dataset] * len(frame), frame["template"], strict=True)))
        for name, sessions in self.sessions.items():
            prompt_dataset = SESSION_SETS[name][2]
            for session in sessions:
                pairs.update(dict.fromkeys((prompt_dataset, t) for t in session["templates"]))
        return list(pairs)

    def digests(self) -> dict[str, str]:
        """A short hash of each test set's content, so metrics computed on other data are never compared."""
        out = {}
        for dataset, frame in self.templates.items():
            rows = sorted(zip(frame["template"], frame["label"].astype(int), strict=True))
            out[f"template_{dataset}"] = _digest(rows)
        for name, sessions in self.sessions.items():
            out[f"session_{name}"] = _digest([(s["id"], s["templates"], s["label"]) for s in sessions])
        return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_split_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, "split file not found", hint="run `dvc repro split`")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise InputError(path, f"not a readable parquet file: {exc}") from exc
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}", field=missing[0])
    bad = frame.index[~frame["label"].isin([0, 1])].tolist()
    if bad:
        raise InputError(path, f"label {frame.at[bad[0], 'label']} is not 0/1", line=int(bad[0]) + 1, field="label")
    frame = frame.assign(template=frame["template"].astype(str), dataset=frame["dataset"].astype(str).str.lower(),
                         label=frame["label"].astype(int))
    return frame[list(SPLIT_COLUMNS)].reset_index(drop=True)


def read_sessions(path: Path, id_field: str) -> list[dict[str, Any]]:
    """Session JSON lines, each checked: an id, a list of templates, a 0/1 label, optional line_labels."""
    if not path.is_file():
        raise InputError(path, "session file not found", hint="run `dvc repro split`")
    sessions = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"not valid JSON: {exc.msg}", line=number) from exc
            if not isinstance(row, dict) or not isinstance(row.get("templates"), list):
                raise InputError(path, "expected an object with a list 'templates'", line=number, field="templates")
            if row.get("label") not in (0, 1):
                raise InputError(path, f"label {row.get('label')!r} is not 0/1", line=number, field="label")
            line_labels = row.get("line_labels")
            if line_labels is not None and (not isinstance(line_labels, list)
                                            or len(line_labels) != len(row["templates"])):
                raise InputError(path, "line_labels must be a list as long as templates", line=number,
                                 field="line_labels")
            sessions.append({"id": str(row.get(id_field, number)), "templates": [str(t) for t in row["templates"]],
                             "line_labels": [int(v) for v in line_labels] if line_labels is not None else None,
                             "label": int(row["label"])})
    if not sessions:
        raise InputError(path, "no sessions")
    return sessions


def cap_stratified(frame: pd.DataFrame, cap: int | None, seed: int, label: str = "label") -> pd.DataFrame:
    """At most `cap` rows keeping the label mix (seeded), with at least one row of every label present, so a
    small cap never leaves a test set without anomalies; the whole frame when it is small enough."""
    if cap is None or len(frame) <= int(cap):
        return frame
    cap = int(cap)
    groups = {key: np.asarray(idx) for key, idx in frame.groupby(label, sort=True).indices.items()}
    quota = {key: max(1, round(cap * len(idx) / len(frame))) for key, idx in groups.items()}
    while sum(quota.values()) > cap and max(quota.values()) > 1:
        quota[max(quota, key=lambda k: quota[k])] -= 1
    rng = np.random.default_rng(seed)
    picked = np.concatenate([rng.choice(idx, size=min(quota[key], len(idx)), replace=False)
                             for key, idx in groups.items()])
    return frame.iloc[np.sort(picked)]


def cap_sessions(sessions: list[dict[str, Any]], cap: int | None, seed: int) -> list[dict[str, Any]]:
    if cap is None or len(sessions) <= int(cap):
        return sessions
    frame = pd.DataFrame({"i": range(len(sessions)), "label": [s["label"] for s in sessions]})
    return [sessions[i] for i in cap_stratified(frame, cap, seed)["i"]]


def load_test_data(params: dict[str, Any], root: Path) -> EvalData:
    """Read and check every test input (before any model loads), applying the seeded caps."""
    split_dir = root / params.get("split_dir", "data/split")
    seed = int(params.get("seed", 42))
    train = read_split_frame(split_dir / "train.parquet")
    test = read_split_frame(split_dir / "test.parquet")
    templates = {str(name): cap_stratified(part.reset_index(drop=True), params.get("max_templates_per_dataset"), seed)
                 for name, part in test.groupby("dataset", sort=True)}
    sessions = {name: cap_sessions(read_sessions(split_dir / file, id_field), params.get("max_sessions_per_dataset"),
                                   seed)
                for name, (file, id_field, _) in SESSION_SETS.items()}
    return EvalData(train=train, templates=templates, sessions=sessions,
                    seen={t.strip() for t in train["template"]})


def unseen_only(sessions: list[dict[str, Any]], seen: set[str]) -> list[dict[str, Any]]:
    """Sessions with every line of a training template removed (no leakage); empty sessions dropped."""
    out = []
    for session in sessions:
        keep = [i for i, t in enumerate(session["templates"]) if t.strip() not in seen]
        if not keep:
            continue
        if session["line_labels"] is not None:
            labels = [session["line_labels"][i] for i in keep]
            out.append({**session, "templates": [session["templates"][i] for i in keep], "line_labels": labels,
                        "label": int(any(labels))})
        elif len(keep) == len(session["templates"]):
            out.append(session)
    return out


# ---- methods --------------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's verdict on every unique (dataset, template), and how it was produced."""

    name: str
    verdicts: dict[tuple[str, str], dict[str, Any]]  # label, valid (None for rules), rationale_words, ...
    seconds: float
    engine: str
    is_llm: bool
    notes: list[str] = field(default_factory=list)

    @property
    def templates_per_s(self) -> float:
        return len(self.verdicts) / self.seconds if self.seconds > 0 else 0.0


def rule_method(name: str, items: list[tuple[str, str]], predict: Callable[[list[str]], np.ndarray]) -> MethodResult:
    started = time.perf_counter()
    labels = predict([t for _, t in items]) if items else np.array([], dtype=int)
    seconds = time.perf_counter() - started
    verdicts = {item: {"label": int(y), "valid": None, "rationale_words": None} for item, y in zip(items, labels,
                                                                                                      strict=True)}
    return MethodResult(name, verdicts, seconds, "scikit-learn" if name == "tfidf_lr" else "regex", False)


def llm_method(name: str, engine: Any, items: list[tuple[str, str]], adapter_dir: Path | None) -> MethodResult:
    run = engine.classify([t for _, t in items], [d for d, _ in items], adapter_dir=adapter_dir)
    verdicts = {(p.dataset, p.template): {"label": p.label, "valid": p.valid, "verdict": p.verdict,
                                          "rationale_words": p.rationale_words, "rationale": p.rationale,
                                          "completion": p.completion}
                for p in run.predictions}
    return MethodResult(name, verdicts, run.seconds, run.engine, True, run.notes)


def score(result: MethodResult, data: EvalData) -> dict[str, dict[str, Any]]:
    """Metrics of one method on every test set (template, session, session unseen-only)."""
    speed = {"templates_per_s": round(result.templates_per_s, 4)}
    blocks: dict[str, dict[str, Any]] = {}
    for dataset, frame in data.templates.items():
        got = [result.verdicts[(dataset, t)] for t in frame["template"]]
        blocks[f"template_{dataset}"] = {**_metrics(frame["label"].tolist(), got, result.is_llm), **speed}
    for name, sessions in data.sessions.items():
        prompt_dataset = SESSION_SETS[name][2]
        for suffix, subset in (("", sessions), ("_unseen", unseen_only(sessions, data.seen))):
            unique = sorted({t for s in subset for t in s["templates"]})
            got = {t: result.verdicts[(prompt_dataset, t)] for t in unique}
            y_pred = [int(any(got[t]["label"] for t in s["templates"])) for s in subset]
            block = binary_metrics([s["label"] for s in subset], y_pred)
            template_stats = _metrics([0] * len(unique), list(got.values()), result.is_llm)
            for key in ("format_valid_rate", "format_invalid", "mean_rationale_words"):
                block[key] = template_stats[key]
            blocks[f"session_{name}{suffix}"] = {**block, "n_templates": len(unique), **speed}
    return blocks


def _metrics(labels: list[int], verdicts: list[dict[str, Any]], is_llm: bool) -> dict[str, Any]:
    return binary_metrics(labels, [v["label"] for v in verdicts],
                          valid=[bool(v["valid"]) for v in verdicts] if is_llm else None,
                          rationale_words=[int(v["rationale_words"] or 0) for v in verdicts] if is_llm else None)


# ---- the stage ------------------------------------------------------------------------------------------------


def model_paths(params: dict[str, Any], root: Path) -> dict[str, Path | None]:
    """Which model each LLM method runs: None = the base model alone."""
    return {"zero_shot": None, "sft_only": root / params.get("sft_dir", "models/sft"),
            CANDIDATE: root / params.get("candidate_dir", "models/grpo")}


def check_inputs(params: dict[str, Any], root: Path, methods: Sequence[str]) -> None:
    from tasks.inference import ENGINES, check_model_dirs

    unknown = [m for m in params.get("baselines", []) if m not in (*RULE_METHODS, *LLM_BASELINES)]
    if unknown:
        raise InputError("params.yaml", f"unknown baseline(s) {unknown}; expected some of "
                         f"{[*RULE_METHODS, *LLM_BASELINES]}", field="evaluate.baselines")
    if params.get("engine", "auto") not in ENGINES:
        raise InputError("params.yaml", f"engine {params.get('engine')!r} is not one of {ENGINES}",
                         field="evaluate.engine")
    base = root / params.get("base_model_dir", "models/base")
    for method, adapter in model_paths(params, root).items():
        if method in methods:
            check_model_dirs(base, adapter)


def evaluate_all(params: dict[str, Any], root: Path | None = None,
                 engine_factory: Callable[..., Any] | None = None) -> tuple[dict[str, Any], EvalData,
                                                                             dict[str, MethodResult]]:
    """Run every method on the same test data; returns (metrics.json content, the data, raw method results)."""
    from tasks import baselines
    from tasks.inference import open_engine

    root = root or repo_root()
    methods = [m for m in METHODS if m == CANDIDATE or m in params.get("baselines", [])]
    check_inputs(params, root, methods)
    data = load_test_data(params, root)
    items = data.items()
    results: dict[str, MethodResult] = {}
    if "keywords" in methods:
        results["keywords"] = rule_method("keywords", items, baselines.keyword_predict)
    if "tfidf_lr" in methods:
        tfidf = params.get("tfidf", {})
        started = time.perf_counter()
        model = baselines.fit_tfidf_lr(data.train["template"], data.train["label"],
                                       ngram_max=int(tfidf.get("ngram_max", 2)), c=float(tfidf.get("C", 1.0)),
                                       seed=int(params.get("seed", 42)))
        fit_s = time.perf_counter() - started
        results["tfidf_lr"] = rule_method("tfidf_lr", items, lambda ts: baselines.tfidf_lr_predict(model, ts))
        results["tfidf_lr"].notes.append(f"fitted on {len(data.train)} training templates in {fit_s:.2f} s")
    llm = [m for m in methods if m in (*LLM_BASELINES, CANDIDATE)]
    engine_name, engine_notes = None, []
    if llm:
        factory = engine_factory or open_engine
        engine = factory(root / params.get("base_model_dir", "models/base"), params.get("engine", "auto"),
                         batch_size=int(params.get("batch_size", 16)),
                         max_new_tokens=int(params.get("max_new_tokens", 96)),
                         dtype=str(params.get("dtype", "bfloat16")),
                         max_model_len=int(params.get("max_model_len", 1024)),
                         kvcache_gib=float(params.get("kvcache_space_gib", 1)),
                         threads=params.get("torch_threads", "auto"))
        try:
            paths = model_paths(params, root)
            for method in llm:
                results[method] = llm_method(method, engine, items, paths[method])
        finally:
            engine.close()
        engine_name, engine_notes = engine.name, list(engine.notes)
    metrics = {
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
        "params": {k: params.get(k) for k in ("max_templates_per_dataset", "max_sessions_per_dataset",
                                               "max_new_tokens", "batch_size", "dtype", "torch_threads", "seed")},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return metrics, data, results


def evaluate_adapter(adapter_dir: str | Path, params: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """metrics.json content for one adapter alone (no baselines) on the current test data.

    For the gate when the champion's stored metrics were measured on other test data (data or caps changed):
    re-evaluate the champion's adapter (tasks.registry.download_adapter) here, then compare like with like.
    """
    metrics, _, _ = evaluate_all({**params, "baselines": [], "candidate_dir": str(Path(adapter_dir).resolve())},
                                 root)
    return metrics


# ---- report ---------------------------------------------------------------------------------------------------

MAIN_SETS = ("template_bgl", "template_spirit", "session_bgl2k", "session_hdfs")
SET_TITLES = {"template_bgl": "BGL (template)", "template_spirit": "Spirit (template)",
              "session_bgl2k": "BGL_2k windows (session)", "session_hdfs": "HDFS (session)",
              "session_bgl2k_unseen": "BGL_2k windows, unseen only", "session_hdfs_unseen": "HDFS, unseen only"}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def sets_of(metrics: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for blocks in metrics["methods"].values():
        seen.update(dict.fromkeys(blocks))
    return sorted(seen, key=lambda s: (s.endswith("_unseen"), not s.startswith("template"), s))


def markdown_table(metrics: dict[str, Any], sets: Iterable[str]) -> str:
    """Methods as rows, P / R / F1 per test set as columns, like the paper's Table 2."""
    sets = list(sets)
    header = "| method | " + " | ".join(f"{SET_TITLES.get(s, s)} P / R / F1" for s in sets) + " |"
    lines = [header, "|---|" + "---|" * len(sets)]
    for method, blocks in metrics["methods"].items():
        cells = []
        for s in sets:
            b = blocks.get(s)
            cells.append("—" if b is None else f"{b['precision']:.3f} / {b['recall']:.3f} / **{b['f1']:.3f}**")
        name = f"**{method}** (candidate)" if method == metrics.get("candidate") else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any]) -> str:
    sets = sets_of(metrics)
    main = [s for s in sets if not s.endswith("_unseen")]
    unseen = [s for s in sets if s.endswith("_unseen")]
    td = metrics["test_data"]
    lines = [
        "# Evaluation", "",
        f"Engine: **{metrics.get('engine') or 'none (no LLM method)'}**. Candidate: **{metrics['candidate']}**. "
        f"Created {metrics['created_at']}.", "",
    ]
    lines += [f"> {note}" for note in metrics.get("engine_notes", [])]
    lines += ["", "## Precision / recall / F1 (abnormal = positive)", "", markdown_table(metrics, main), ""]
    if unseen:
        lines += ["## Sessions, unseen templates only (training templates removed)", "",
                  markdown_table(metrics, unseen), ""]
    lines += ["## Answer format, rationales and speed", "",
              "| method | engine | format-valid rate | invalid answers (as normal) | invalid on true anomalies "
              "| mean rationale words | templates/s |", "|---|---|---|---|---|---|---|"]
    for method, blocks in metrics["methods"].items():
        template_blocks = [b for s, b in blocks.items() if s.startswith("template_")]
        valid = [b["format_valid_rate"] for b in template_blocks if b.get("format_valid_rate") is not None]
        invalid = sum(b.get("format_invalid") or 0 for b in template_blocks)
        hidden = sum(b.get("format_invalid_abnormal") or 0 for b in template_blocks)
        words = [b["mean_rationale_words"] for b in template_blocks if b.get("mean_rationale_words") is not None]
        speed = metrics["speed"][method]
        lines.append(f"| {method} | {speed['engine']} | {_fmt(float(np.mean(valid)) if valid else None)} | "
                     f"{invalid if valid else '—'} | {hidden if valid else '—'} | "
                     f"{_fmt(float(np.mean(words)) if words else None, 1)} | {speed['templates_per_s']:.2f} |")
    lines += ["", "## Test data", "",
              "- Template level: " + ", ".join(f"{d} {v['n']} templates ({v['abnormal']} abnormal)"
                                                 for d, v in td["templates"].items()),
              "- Session level: " + ", ".join(f"{n} {v['n']} sessions ({v['abnormal']} abnormal; "
                                                f"{v['unseen_n']} left in the unseen-only subset)"
                                                for n, v in td["sessions"].items()),
              f"- Unique templates classified per LLM method: {td['unique_templates_classified']}; "
              f"training templates: {td['train_templates']}.",
              f"- Caps (seeded, stratified): {metrics['params']}.",
              "- Counted as in the paper: a session is abnormal when any of its templates is judged abnormal. "
              "An answer that breaks the `<think>…</think><answer>…</answer>` format counts as normal.",
              "", "## Confusion matrices", "", "![confusion matrices](confusion_matrices.png)", "",
              "## F1 per method and test set", "", "![F1](f1_by_method.png)", ""]
    return "\n".join(lines)


def write_plots(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """Confusion matrices (methods x test sets) and F1 per method and test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    methods = list(metrics["methods"])
    sets = [s for s in sets_of(metrics) if not s.endswith("_unseen")]
    fig, axes = plt.subplots(len(methods), len(sets), figsize=(3.2 * len(sets), 2.9 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for col, s in enumerate(sets):
            ax = axes[row][col]
            block = metrics["methods"][method].get(s)
            if block is None:
                ax.axis("off")
                continue
            ConfusionMatrixDisplay(np.array(block["confusion_matrix"]), display_labels=["normal", "abnormal"]).plot(
                ax=ax, colorbar=False, values_format="d")
            ax.set_title(f"{method}\n{SET_TITLES.get(s, s)}", fontsize=8)
    fig.tight_layout()
    cm_path = out_dir / "confusion_matrices.png"
    fig.savefig(cm_path, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(sets)), 3.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [metrics["methods"][method].get(s, {}).get("f1", 0.0) for s in sets]
        ax.bar(np.arange(len(sets)) + i * width, values, width, label=method)
    ax.set_xticks(np.arange(len(sets)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels([SET_TITLES.get(s, s) for s in sets], fontsize=8)
    ax.set_ylabel("F1 (abnormal)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    f1_path = out_dir / "f1_by_method.png"
    fig.savefig(f1_path, dpi=90)
    plt.close(fig)
    return [cm_path, f1_path]


def prediction_records(data: EvalData, results: dict[str, MethodResult]) -> Iterable[dict[str, Any]]:
    """Every verdict behind the metrics: per template (with the model's answer) and per session."""
    labels = {(d, t): int(y) for d, f in data.templates.items() for t, y in zip(f["template"], f["label"],
                                                                                  strict=True)}
    for method, result in results.items():
        for (dataset, template), v in result.verdicts.items():
            yield {"kind": "template", "method": method, "dataset": dataset, "template": template,
                   "label": labels.get((dataset, template)), "pred": v["label"], "valid": v.get("valid"),
                   "verdict": v.get("verdict"), "rationale": v.get("rationale"), "completion": v.get("completion")}
        for name, sessions in data.sessions.items():
            prompt_dataset = SESSION_SETS[name][2]
            for s in sessions:
                pred = int(any(result.verdicts[(prompt_dataset, t)]["label"] for t in s["templates"]))
                yield {"kind": "session", "method": method, "set": name, "session_id": s["id"], "label": s["label"],
                       "pred": pred}


def write_outputs(metrics: dict[str, Any], data: EvalData, results: dict[str, MethodResult], out_dir: Path,
                  metrics_file: Path) -> None:
    """reports/eval/ swapped in whole, then metrics.json: a failed run leaves the last good outputs."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial.", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        (staging / "eval.md").write_text(report_markdown(metrics), encoding="utf-8")
        write_plots(metrics, staging)
        with (staging / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for row in prediction_records(data, results):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(metrics_file, json.dumps(metrics, indent=2) + "\n")


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`method.set.metric` → value, for MLflow."""
    out = {}
    for method, blocks in metrics["methods"].items():
        for s, block in blocks.items():
            for key in ("precision", "recall", "f1", "format_valid_rate", "mean_rationale_words", "templates_per_s"):
                if isinstance(block.get(key), int | float):
                    out[f"{method}.{s}.{key}"] = float(block[key])
    return out


def adapter_meta(path: Path | None) -> dict[str, Any]:
    """training_meta.json of an adapter folder ({} when absent), for lineage tags."""
    meta_file = path / "training_meta.json" if path else None
    if meta_file and meta_file.is_file():
        try:
            return json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
    return {}


def log_to_mlflow(metrics: dict[str, Any], data: EvalData, params: dict[str, Any], root: Path, out_dir: Path,
                  metrics_file: Path) -> str:
    """The evaluate run: params, flat metrics, report + plots + predictions, and the datasets as inputs."""
    import mlflow.data

    from tasks.tracking import stage_run

    candidate_meta = adapter_meta(model_paths(params, root)[CANDIDATE])
    tags = {"engine": str(metrics.get("engine")), "candidate": CANDIDATE}
    for key in ("adapter_sha256", "mlflow_run_id", "run_id"):
        if candidate_meta.get(key):
            tags[f"candidate.{key}"] = str(candidate_meta[key])
    with stage_run("evaluate", **tags) as run:
        flat_params = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in params.items()}
        mlflow.log_params(flat_params)
        mlflow.log_metrics(flat_metrics(metrics))
        split_dir = root / params.get("split_dir", "data/split")
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
        return run.info.run_id


def run(params: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """The stage: evaluate, write the outputs, log to MLflow; returns metrics.json's content."""
    root = root or repo_root()
    metrics, data, results = evaluate_all(params, root)
    out_dir = root / params.get("out_dir", "reports/eval")
    metrics_file = root / params.get("metrics_file", "reports/metrics.json")
    write_outputs(metrics, data, results, out_dir, metrics_file)
    if params.get("mlflow", True):
        metrics["mlflow_run_id"] = log_to_mlflow(metrics, data, params, root, out_dir, metrics_file)
        write_text_atomic(metrics_file, json.dumps(metrics, indent=2) + "\n")
    return metrics


@task(name="evaluate")
def evaluate_task(params: dict[str, Any]) -> dict[str, Any]:
    """Prefect task: the stage, plus its report published as a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    metrics = run(params)
    create_markdown_artifact(markdown=report_markdown(metrics), key="evaluation-report",
                             description="Candidate vs baselines on the same test data")
    return metrics


def main() -> None:
    params = section("evaluate")
    metrics = run(params)
    print(markdown_table(metrics, [s for s in sets_of(metrics) if not s.endswith("_unseen")]))
    print(f"engine: {metrics['engine']}; report: {params.get('out_dir', 'reports/eval')}/eval.md")


if __name__ == "__main__":
    main()
