"""The evaluation report: the Markdown table (methods × test sets, like the paper's Table 2), plots, every
verdict behind the numbers, and the outputs swapped in all-or-nothing."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.contracts import Metrics
from tasks.common.files import atomic_dir, write_json_atomic
from tasks.common.formatting import fmt_number
from tasks.evaluation.metrics import MethodResult
from tasks.evaluation.testdata import SESSION_SETS, EvalData

SET_TITLES = {"template_bgl": "BGL (template)", "template_spirit": "Spirit (template)",
              "session_bgl2k": "BGL_2k windows (session)", "session_hdfs": "HDFS (session)",
              "session_bgl2k_unseen": "BGL_2k windows, unseen only", "session_hdfs_unseen": "HDFS, unseen only"}

def sets_of(metrics: Metrics | dict[str, Any]) -> list[str]:
    """Every test set any method was scored on: template sets first, unseen-only subsets last."""
    seen: dict[str, None] = {}
    for blocks in metrics["methods"].values():
        seen.update(dict.fromkeys(blocks))
    return sorted(seen, key=lambda s: (s.endswith("_unseen"), not s.startswith("template"), s))

def markdown_table(metrics: Metrics | dict[str, Any], sets: Iterable[str]) -> str:
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

def report_markdown(metrics: Metrics) -> str:
    """eval.md: the P/R/F1 table, the unseen-only table, format and speed per method, the test data, plots."""
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
        lines.append(f"| {method} | {speed['engine']} | {fmt_number(float(np.mean(valid)) if valid else None)} | "
                     f"{invalid if valid else '—'} | {hidden if valid else '—'} | "
                     f"{fmt_number(float(np.mean(words)) if words else None, 1)} | {speed['templates_per_s']:.2f} |")
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

def write_plots(metrics: Metrics, out_dir: Path) -> list[Path]:
    """Confusion matrices (methods x test sets) and F1 per method and test set, as PNGs in `out_dir`;
    returns their paths."""
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


def write_outputs(metrics: Metrics, data: EvalData, results: dict[str, MethodResult], out_dir: Path,
                  metrics_file: Path) -> None:
    """reports/eval/ (eval.md, plots, predictions.jsonl, metrics.json) swapped in whole, then metrics.json:
    a failed run leaves the last good outputs."""
    with atomic_dir(out_dir) as staging:
        (staging / "eval.md").write_text(report_markdown(metrics), encoding="utf-8")
        write_plots(metrics, staging)
        with (staging / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for row in prediction_records(data, results):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_json_atomic(metrics_file, metrics)


def flat_metrics(metrics: Metrics) -> dict[str, float]:
    """`method.set.metric` → value, for MLflow."""
    out = {}
    for method, blocks in metrics["methods"].items():
        for s, block in blocks.items():
            for key in ("precision", "recall", "f1", "format_valid_rate", "mean_rationale_words", "templates_per_s"):
                if isinstance(block.get(key), int | float):
                    out[f"{method}.{s}.{key}"] = float(block[key])
    return out
