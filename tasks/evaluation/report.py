"""The evaluation report: tables with 95% intervals (methods × test sets, like the paper's Table 2), the
served-path table, paired differences, plots, every verdict behind the numbers, all swapped in at once."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.contracts import CALIBRATION_FILE, Metrics
from tasks.common.files import atomic_dir, write_json_atomic
from tasks.common.formatting import fmt_number
from tasks.evaluation.metrics import Evaluation
from tasks.evaluation.retrieval_quality import quality_table

SET_TITLES = {"template_bgl": "BGL templates", "template_spirit": "Spirit templates",
              "session_bgl2k": "BGL_2k windows (sessions)", "session_hdfs": "HDFS sessions",
              "session_bgl2k_unseen": "BGL_2k windows, unseen only", "session_hdfs_unseen": "HDFS, unseen only",
              "template_bgl_sample": "BGL templates (sample)", "template_spirit_sample": "Spirit templates (sample)",
              "served_bgl2k_lines": "served: BGL_2k lines (alert tags)",
              "served_bgl2k_windows": "served: BGL_2k 100-line windows",
              "served_bgl2k_lines_corrected": "served: BGL_2k lines (expert labels)",
              "served_thunderbird_lines": "served: Thunderbird_2k lines",
              "served_thunderbird_templates": "served: Thunderbird_2k templates"}
# Why the paper's Table 2 most likely reports averaged (macro) figures: measured on "8000 entries" per
# dataset (more than the unique templates), and several of its F1 values sit 0.04-0.05 below the harmonic
# mean of the precision and recall printed beside them, which an average of per-class F1s does and a
# single-class F1 cannot (the harmonic mean of a class's P and R is its F1).
PAPER_METRIC_NOTE = (
    "The paper's Table 2 (F1 0.887 BGL, 0.862 Spirit) was measured on 8000 log entries per dataset and "
    "several of its F1 values sit 0.04-0.05 below the harmonic mean of the precision and recall beside "
    "them: they are most likely macro (averaged) figures, not abnormal-class F1 on unique templates. "
    "Compare them with the macro-F1 column, not with abnormal-class F1.")


def sets_of(metrics: Metrics | dict[str, Any]) -> list[str]:
    """Every test set any method was scored on: templates, sessions, served path; subsets and samples last."""
    seen: dict[str, None] = {}
    for blocks in metrics["methods"].values():
        seen.update(dict.fromkeys(blocks))
    order = ("template_", "session_", "served_")

    def rank(name: str) -> tuple[int, int, str]:
        tail = name.endswith(("_unseen", "_sample"))
        family = next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))
        return tail, family, name

    return sorted(seen, key=rank)


def main_sets(metrics: Metrics | dict[str, Any]) -> list[str]:
    """The template and session sets with anomalies (not subsets or samples): the paper-style table."""
    return [s for s in sets_of(metrics) if s.startswith(("template_", "session_"))
            and not s.endswith(("_unseen", "_sample"))]


def _interval(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "[—]"


def cell(block: dict[str, Any] | None) -> str:
    """One table cell: abnormal-class P / R / F1 [95% interval]; or the false-alarm rate for a set without anomalies."""
    if block is None:
        return "—"
    if "false_alarm_rate" in block:
        return f"false alarms {block['false_alarm_rate']:.3f} {_interval(block.get('false_alarm_rate_ci'))}"
    return (f"{block['precision']:.3f} / {block['recall']:.3f} / **{block['f1']:.3f}** "
            f"{_interval(block.get('f1_ci'))}")


def markdown_table(metrics: Metrics | dict[str, Any], sets: Iterable[str]) -> str:
    """Methods as rows, P / R / F1 [95% interval] per test set as columns."""
    sets = list(sets)
    header = "| method | " + " | ".join(f"{SET_TITLES.get(s, s)} P / R / F1 [95% CI]" for s in sets) + " |"
    lines = [header, "|---|" + "---|" * len(sets)]
    for method, blocks in metrics["methods"].items():
        if not any(s in blocks for s in sets):
            continue
        name = f"**{method}** (candidate)" if method == metrics.get("candidate") else method
        lines.append(f"| {name} | " + " | ".join(cell(blocks.get(s)) for s in sets) + " |")
    return "\n".join(lines)


def averaged_table(metrics: Metrics | dict[str, Any], sets: Iterable[str]) -> str:
    """Methods as rows, macro-F1 [95% interval] and weighted F1 per set: the averaged figures."""
    sets = list(sets)
    lines = ["| method | " + " | ".join(f"{SET_TITLES.get(s, s)} macro-F1 [95% CI] / weighted F1" for s in sets)
             + " |", "|---|" + "---|" * len(sets)]
    for method, blocks in metrics["methods"].items():
        if not any(s in blocks for s in sets):
            continue
        cells = []
        for s in sets:
            b = blocks.get(s)
            cells.append("—" if b is None or "macro_f1" not in b else
                         f"{b['macro_f1']:.3f} {_interval(b.get('macro_f1_ci'))} / {b['weighted_f1']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(metrics: Metrics | dict[str, Any]) -> str:
    """Candidate − best baseline and candidate − SFT-only, paired on the same items, per set."""
    lines = ["| test set | best baseline | candidate − best baseline [95% CI] | candidate − sft_only [95% CI] |",
             "|---|---|---|---|"]
    def diff(row: dict[str, Any] | None) -> str:
        return "—" if row is None else f"{row['f1_difference']:+.3f} {_interval(row.get('ci'))}"

    for name, rows in (metrics.get("differences") or {}).items():
        lines.append(f"| {SET_TITLES.get(name, name)} | {rows.get('best_baseline', '—')} | "
                     f"{diff(rows.get('vs_best_baseline'))} | {diff(rows.get('vs_sft_only'))} |")
    return "\n".join(lines)


ABLATION_SETS = ("template_bgl", "template_spirit", "served_bgl2k_lines_corrected")


def ablation_table(metrics: Metrics | dict[str, Any]) -> str:
    """The paper's Fig. 2 as a table: the candidate, each ablation and the baselines, F1 [95% CI] and AP."""
    sets = [s for s in ABLATION_SETS if any(s in b for b in metrics["methods"].values())]
    ablations = metrics.get("ablations") or {}
    lines = ["| method | what it is | " + " | ".join(f"{SET_TITLES.get(s, s)} F1 [95% CI] / AP" for s in sets) + " |",
             "|---|---|" + "---|" * len(sets)]
    for method, blocks in metrics["methods"].items():
        if method == "zero_shot":
            continue
        what = "the candidate" if method == metrics.get("candidate") else ablations.get(method, "baseline")
        cells = []
        for s in sets:
            b = blocks.get(s)
            ap = b.get("average_precision") if b else None
            cells.append("—" if b is None else f"{b['f1']:.3f} {_interval(b.get('f1_ci'))}"
                         + (f" / {ap:.3f}" if ap is not None else ""))
        lines.append(f"| {method} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_lines(metrics: Metrics | dict[str, Any]) -> list[str]:
    """The fitted thresholds and their validation figures."""
    fold = (metrics.get("test_data") or {}).get("validation") or {}
    lines = [f"Thresholds fitted on the validation fold ({fold.get('n')} training templates held out, "
             f"{fold.get('abnormal')} abnormal; never the test split) to maximise abnormal-class F1:", "",
             "| method | threshold [95% bootstrap] | validation AP | validation P / R / F1 |", "|---|---|---|---|"]
    for method, c in (metrics.get("calibration") or {}).items():
        lines.append(f"| {method} | {c['threshold']:.4f} {_interval(c.get('threshold_ci'))} | "
                     f"{c['average_precision']:.3f} | "
                     f"{c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f} |")
    return lines


def expert_lines(thunder: dict[str, Any]) -> list[str]:
    """Thunderbird_2k templates that match an expert-corrected template: why they leave the false-alarm figures."""
    rows = thunder.get("expert_labelled") or []
    if not rows:
        return []
    lines = [f"- False alarms are counted on {thunder.get('false_alarm_templates')} templates "
             f"({thunder.get('false_alarm_lines')} lines): {thunder.get('expert_abnormal_templates')} templates "
             f"({thunder.get('expert_abnormal_lines')} lines) match a template the experts corrected to abnormal "
             "(the correct stage's matching: the same text, else the one template with the same normalised form; "
             "adjacent `<*>` merged on both sides), so they are anomalies by the experts' labels, not false "
             "alarms. Matches:", ""]
    lines += ["| Thunderbird_2k template | lines | experts' label | expert-corrected template (dataset, match) |",
              "|---|---|---|---|"]
    def text(value: str) -> str:
        return value.replace("|", "\\|")

    lines += [f"| `{text(r['template'])}` | {r['lines']} | {r['label'] or 'conflicting'} | "
              f"`{text(r['expert_template'])}` ({r['expert_dataset']}, {r['matched']}) |" for r in rows]
    return lines


def classical_lines(metrics: Metrics | dict[str, Any]) -> list[str]:
    """The classical baseline's choices per dataset: C, the threshold and its spread, out-of-fold figures."""
    fits = metrics.get("classical") or {}
    if not fits:
        return []
    lines = ["Word 1-2 and character 2-5 gram TF-IDF with the keyword flag, class-balanced logistic regression. Per "
             "dataset, C (best out-of-fold average precision) and the threshold (best out-of-fold abnormal-class "
             "F1) are chosen on k-fold cross-fitted scores of the training templates (training split and "
             "validation fold; never a test item), then the model is refitted on all of them. `*` is the model "
             "of every training template, which answers for a system without training templates (HDFS, "
             "Thunderbird). Threshold spread: its 95% percentile interval over stratified bootstrap resamples "
             "of the out-of-fold scores, and the choice on each fold alone.", "",
             "| dataset | training templates (abnormal) | folds | C | threshold [95% bootstrap] | per-fold thresholds "
             "| out-of-fold AP | out-of-fold P / R / F1 |", "|---|---|---|---|---|---|---|---|"]
    for scope, f in fits.items():
        folds = ", ".join(f"{t:.2f}" for t in f["fold_thresholds"])
        oof = f["oof"]
        lines.append(f"| {scope} | {f['n']} ({f['abnormal']}) | {f['folds']} | {f['c']:g} | "
                     f"{f['threshold']:.3f} {_interval(f.get('threshold_ci'))} | {folds} | "
                     f"{oof['average_precision']:.3f} | {oof['precision']:.3f} / {oof['recall']:.3f} / "
                     f"{oof['f1']:.3f} |")
    return lines


FAITHFULNESS_COLUMNS = (("agrees", "concludes its verdict"), ("component_in_log", "names a component in the log"),
                        ("quotes_grounded", "quotes only the log or a shown neighbour"),
                        ("cited_neighbour_shown", "cites only shown neighbours"),
                        ("consistent", "never argues the other verdict"))


def rationale_lines(metrics: Metrics | dict[str, Any]) -> list[str]:
    """Faithfulness of the candidate's rationales (issue 19 item 3) per set, for the rationales `detect` shows
    and for every one written, then a sample of rationales per verdict from BGL_2k and Thunderbird_2k."""
    r = metrics.get("rationales") or {}
    if not (r.get("pooled") or {}).get("all", {}).get("rationales"):
        return []
    lines = [f"Shown: the rationales `detect` gives a user (detect.rationales: {r.get('policy')}"
             + ("" if r.get("threshold") else "; no threshold, so every template") + "), after the served guard: "
             "a rationale failing a check is replaced by the evidence rationale for its verdict (replaced: how "
             "many). Shown_model: the model's own rationales on those items, before the guard. All: every "
             "rationale the model wrote, each for its scored verdict. Checks: tasks/evaluation/rationales.py.", "",
             "| set | scope | rationales | " + " | ".join(title for _, title in FAITHFULNESS_COLUMNS)
             + " | false \"no failure word\" | all checks pass | replaced |",
             "|---|---|---|" + "---|" * len(FAITHFULNESS_COLUMNS) + "---|---|---|"]
    for name, scopes in [("all sets (each template once)", r["pooled"]), *(r.get("sets") or {}).items()]:
        for scope in ("shown", "shown_model", "all"):
            row = scopes.get(scope) or {}
            if not row.get("rationales"):
                continue
            replaced = (f"{row['replaced_count']} ({row['replaced']:.3f})" if "replaced_count" in row else "-")
            lines.append(f"| {SET_TITLES.get(name, name)} | {scope} | {row['rationales']} | "
                         + " | ".join(f"{row[key]:.3f}" for key, _ in FAITHFULNESS_COLUMNS)
                         + f" | {row['false_no_failure_word_count']} | {row['all_pass']:.3f} | {replaced} |")
    for log_name, by_verdict in (r.get("examples") or {}).items():
        for verdict, examples in by_verdict.items():
            lines += ["", f"{log_name}, judged {verdict}:"]
            lines += [f"- `{e['log'][:160]}` (score {fmt_number(e.get('score'))}"
                      f"{', shown' if e.get('shown') else ', not shown'}"
                      + (f"; the model's fails {', '.join(e['failed'])})" if e.get("failed")
                         else "; passes every check)")
                      + f" → {e['rationale'][:400]}"
                      + (f"<br>shown instead (evidence): {e['shown_rationale'][:400]}"
                         if e.get("source") == "evidence" else "")
                      for e in examples] or ["- (no rationale written)"]
    return lines


def report_markdown(metrics: Metrics) -> str:
    """eval.md: the tables with intervals, the served path, paired differences, format and speed, data, plots."""
    sets = sets_of(metrics)
    main = main_sets(metrics)
    served = [s for s in sets if s.startswith("served_")]
    extra = [s for s in sets if s.endswith(("_unseen", "_sample"))]
    td = metrics["test_data"]
    b = metrics.get("bootstrap") or {}
    lines = [
        "# Evaluation", "",
        f"Engine: **{metrics.get('engine') or 'none (no LLM method)'}**. Candidate: **{metrics['candidate']}**. "
        f"Created {metrics['created_at']}.", "",
        f"Every figure is on every test item; intervals are {int(b.get('confidence', 0.95) * 100)}% "
        f"{b.get('method', 'bootstrap')} intervals over {b.get('resamples')} resamples (seed {b.get('seed')}).", "",
    ]
    lines += [f"> {note}" for note in metrics.get("engine_notes", [])]
    lines += ["", "## Abnormal-class precision / recall / F1 (the primary figure)", "", markdown_table(metrics, main),
              "", "## Averaged figures: macro-F1 and support-weighted F1", "", PAPER_METRIC_NOTE, "",
              averaged_table(metrics, main), ""]
    if served:
        info = td.get("served") or {}
        bgl, thunder = info.get("bgl2k") or {}, info.get("thunderbird") or {}
        lines += ["## The served path: `detect` on labelled raw logs", "",
                  "Detect's own code (header and alert-tag stripping, framing, drain3 with its masks, the prompt, "
                  "the verdict cache), the candidate answering through the endpoint's classifier interface; the "
                  "baselines answer the same mined templates.", "",
                  f"- BGL_2k: {bgl.get('lines')} lines ({bgl.get('alert_lines')} with an alert tag), "
                  f"{bgl.get('mined_templates')} mined templates; {bgl.get('matched_lines')} lines matched an "
                  f"expert-corrected LogPrompt template ({bgl.get('matched_templates')} templates, "
                  f"{bgl.get('matched_lines_abnormal')} abnormal under the corrected labels, "
                  f"{bgl.get('matched_lines_of_training_templates')} lines of training templates). A template "
                  "matches when its text, each `<*>` any run of characters, equals the whole message; among "
                  "several, the one with most literal characters.",
                  f"- Thunderbird_2k: {thunder.get('lines')} lines ({thunder.get('alert_lines')} alerts), "
                  f"{thunder.get('mined_templates')} mined templates; a system never trained on.",
                  *expert_lines(thunder), "",
                  markdown_table(metrics, served), "",
                  "Every line of a template shares that template's verdict, so line figures weigh a template by "
                  "how often it is written, and their intervals (lines resampled as if independent) are too "
                  "narrow: on Thunderbird_2k the most frequent template covers "
                  f"{thunder.get('largest_template_lines', '?')} of {thunder.get('lines')} lines. Template figures "
                  "count each kind of message once; the gate reads those for false alarms.", ""]
    if metrics.get("differences"):
        lines += ["## Paired differences (same items)", "",
                  "The best baseline of a set is the lexical, classical or retrieval baseline with the highest "
                  "point F1 on it.", "", differences_table(metrics), ""]
    if metrics.get("classical"):
        lines += ["## The classical baseline: C and threshold cross-fitted per dataset", "",
                  *classical_lines(metrics), ""]
    if metrics.get("calibration"):
        lines += ["## The verdict score and its threshold", "",
                  "The verdict is the probability of `abnormal` against `normal` for the answer word after a "
                  "prefilled `<answer>` (the verdict task; one forward pass), against a threshold. "
                  "`disagreement_rate`: how often the word the rationale ended in differs from that verdict.", "",
                  *calibration_lines(metrics), "", "![precision-recall curves](pr_curves.png)", ""]
    if metrics.get("ablations"):
        lines += ["## Ablations (the paper's Fig. 2)", "", ablation_table(metrics), ""]
    if metrics.get("retrieval"):
        policy = metrics["retrieval"]["policy"]
        lines += ["## Retrieval: the neighbours the prompts showed (test split)", "",
                  f"Index policy: {', '.join(f'{key} {value}' for key, value in policy.items())}. recall@k: "
                  "a neighbour with the template's own label among those shown.", "",
                  *quality_table(metrics["retrieval"]["datasets"]), ""]
    rationale_part = rationale_lines(metrics)
    if rationale_part:
        lines += ["## Rationales: do they argue for their verdict, on evidence in the log?", "", *rationale_part, ""]
    if extra:
        lines += ["## Subsets and samples", "", markdown_table(metrics, extra), ""]
    lines += ["## Answer format, rationales and speed", "",
              "| method | engine | format-valid rate | invalid answers (as normal) | mean rationale words "
              "| unique templates | templates/s | model calls per template |", "|---|---|---|---|---|---|---|---|"]
    for method, blocks in metrics["methods"].items():
        template_blocks = [b for s, b in blocks.items() if s.startswith("template_")]
        valid = [b["format_valid_rate"] for b in template_blocks if b.get("format_valid_rate") is not None]
        invalid = sum(b.get("format_invalid") or 0 for b in template_blocks)
        words = [b["mean_rationale_words"] for b in template_blocks if b.get("mean_rationale_words") is not None]
        speed = metrics["speed"][method]
        lines.append(f"| {method} | {speed['engine']} | {fmt_number(float(np.mean(valid)) if valid else None)} | "
                     f"{invalid if valid else '—'} | {fmt_number(float(np.mean(words)) if words else None, 1)} | "
                     f"{speed['unique_templates']} | {speed['templates_per_s']:.2f} | "
                     f"{fmt_number(speed.get('model_calls_per_template'))} |")
    lines += ["", "## Test data", "",
              "| set | items | abnormal | note |", "|---|---|---|---|"]
    lines += [f"| {SET_TITLES.get(name, name)} | {v['n']} | {v['abnormal']} | {v.get('note', '')} |"
              for name, v in (td.get("sets") or {}).items()]
    lines += ["", f"Unique templates classified per LLM method: {td['unique_templates_classified']} (test and "
              f"session templates; the served path adds the templates detect mines). Training templates: "
              f"{td['train_templates']}. Caps: {metrics['params']}.",
              "A session (window) is abnormal when any of its templates (lines) is judged abnormal, as in the "
              "paper. An answer that breaks the `<think>…</think><answer>…</answer>` format counts as normal.",
              "", "## F1 per method and test set, with 95% intervals", "", "![F1](f1_by_method.png)", "",
              "## Confusion matrices", "", "![confusion matrices](confusion_matrices.png)", ""]
    return "\n".join(lines)


def write_plots(metrics: Metrics, out_dir: Path) -> list[Path]:
    """Confusion matrices (methods × main sets) and abnormal-class F1 with 95% error bars per method and set
    (served sets included), as PNGs in `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    methods = list(metrics["methods"])
    sets = main_sets(metrics)
    fig, axes = plt.subplots(len(methods), max(1, len(sets)), figsize=(3.2 * max(1, len(sets)), 2.9 * len(methods)),
                             squeeze=False)
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

    bar_sets = [s for s in sets_of(metrics) if not s.endswith(("_unseen", "_sample"))
                and any("f1" in b.get(s, {}) and "false_alarm_rate" not in b.get(s, {})
                        for b in metrics["methods"].values())]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(bar_sets)), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        blocks = metrics["methods"][method]
        values = [blocks.get(s, {}).get("f1", np.nan) for s in bar_sets]
        cis = [blocks.get(s, {}).get("f1_ci") for s in bar_sets]
        low = [v - ci[0] if ci else 0.0 for v, ci in zip(values, cis, strict=True)]
        high = [ci[1] - v if ci else 0.0 for v, ci in zip(values, cis, strict=True)]
        ax.bar(np.arange(len(bar_sets)) + i * width, values, width, label=method, yerr=[low, high], capsize=2,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(np.arange(len(bar_sets)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels([SET_TITLES.get(s, s) for s in bar_sets], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("abnormal-class F1 (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    f1_path = out_dir / "f1_by_method.png"
    fig.savefig(f1_path, dpi=90)
    plt.close(fig)
    return [cm_path, f1_path]


def prediction_records(evaluation: Evaluation) -> Iterable[dict[str, Any]]:
    """Every verdict behind the metrics: per (dataset, template) with the model's answer, and per set item."""
    for method, result in evaluation.results.items():
        for (dataset, template), v in result.verdicts.items():
            yield {"kind": "template", "method": method, "dataset": dataset, "template": template,
                   "pred": v["label"], "valid": v.get("valid"), "verdict": v.get("verdict"),
                   "rationale": v.get("rationale"), "completion": v.get("completion")}
        for eval_set in evaluation.sets:
            if not result.answers(eval_set):
                continue
            for item, label, pred in zip(eval_set.ids, eval_set.labels, result.predictions(eval_set), strict=True):
                yield {"kind": "item", "method": method, "set": eval_set.name, "id": item, "label": int(label),
                       "pred": int(pred)}


def write_pr_curves(evaluation: Evaluation, out_dir: Path) -> Path | None:
    """Precision-recall curves of every method with a verdict score, per main template set, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay

    from tasks.evaluation.metrics import item_scores

    sets = [s for s in evaluation.sets if s.name in ABLATION_SETS and s.labels.any()]
    scored = [r for r in evaluation.results.values()
              if r.verdicts and any(v.get("score") is not None for v in r.verdicts.values())]
    if not sets or not scored:
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 4.0), squeeze=False)
    for ax, eval_set in zip(axes[0], sets, strict=True):
        for result in scored:
            if result.answers(eval_set):
                PrecisionRecallDisplay.from_predictions(eval_set.labels, item_scores(result, eval_set), ax=ax,
                                                        name=result.name, plot_chance_level=result is scored[0])
        ax.set_title(SET_TITLES.get(eval_set.name, eval_set.name), fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "pr_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(evaluation: Evaluation, candidate_items: dict[str, Any], out_dir: Path, metrics_file: Path) -> None:
    """reports/eval/ (eval.md, plots, predictions.jsonl, candidate_predictions.json, calibration.json, metrics.json)
    swapped in whole, then metrics.json: a failed run leaves the last good outputs."""
    metrics = evaluation.metrics
    with atomic_dir(out_dir) as staging:
        (staging / "eval.md").write_text(report_markdown(metrics), encoding="utf-8")
        write_plots(metrics, staging)
        write_pr_curves(evaluation, staging)
        calibration = (metrics.get("calibration") or {}).get(metrics["candidate"])
        if calibration:  # the neighbours its prompts carried: serving must show the same number
            calibration = {**calibration, "neighbours": metrics["params"].get("neighbours_k", 0)}
        (staging / CALIBRATION_FILE).write_text(json.dumps(calibration or {}, indent=2) + "\n", encoding="utf-8")
        with (staging / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for row in prediction_records(evaluation):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (staging / CANDIDATE_PREDICTIONS).write_text(json.dumps(candidate_items) + "\n", encoding="utf-8")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_json_atomic(metrics_file, metrics)


CANDIDATE_PREDICTIONS = "candidate_predictions.json"  # per set: ids, labels, the candidate's 0/1 predictions


def flat_metrics(metrics: Metrics) -> dict[str, float]:
    """`method.set.metric` → value, for MLflow (interval bounds as `f1_low` / `f1_high`)."""
    out = {}
    for method, blocks in metrics["methods"].items():
        for s, block in blocks.items():
            for key in ("precision", "recall", "f1", "macro_f1", "weighted_f1", "false_alarm_rate", "average_precision",
                        "format_valid_rate", "mean_rationale_words", "templates_per_s"):
                if isinstance(block.get(key), int | float):
                    out[f"{method}.{s}.{key}"] = float(block[key])
            if block.get("f1_ci"):
                out[f"{method}.{s}.f1_low"], out[f"{method}.{s}.f1_high"] = map(float, block["f1_ci"])
    r = metrics.get("rationales") or {}
    for name, scopes in [("pooled", r.get("pooled") or {}), *(r.get("sets") or {}).items()]:
        for scope, row in scopes.items():  # rationales.<set>.<shown|all>.<check share or count>
            for key, value in row.items():
                out[f"rationales.{name}.{scope}.{key}"] = float(value)
    return out
