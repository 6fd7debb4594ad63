"""The Markdown model card stored with every registered version: data, method, metrics, gate, limits."""

from __future__ import annotations

from typing import Any

from tasks.common.contracts import CANDIDATE
from tasks.evaluation.report import FAITHFULNESS_COLUMNS, markdown_table, rationale_lines, sets_of
from tasks.release.gate import GateVerdict

# MLflow keeps a model version's description in a 5,000-character column: the registry stores the compact card
# there and the full one as the version's `model_card` artifact.
DESCRIPTION_LIMIT = 4900
# The compact card's metrics: the candidate, its RL ablation and the lexical baselines on the headline sets.
HEADLINE_METHODS = (CANDIDATE, "sft_only", "keywords", "tfidf_lr")
HEADLINE_SETS = ("template_bgl", "template_spirit", "served_bgl2k_lines_corrected")


def faithfulness_lines(metrics: dict[str, Any], *, compact: bool) -> list[str]:
    """The rationales' faithfulness (issue 19): the full card has eval.md's table per set and its sample per
    verdict from BGL_2k and Thunderbird_2k; the compact one a line over the rationales users see."""
    r = metrics.get("rationales") or {}
    if not compact:
        return rationale_lines(metrics) or ["(no rationale measured)"]
    row = (r.get("pooled") or {}).get("shown") or {}
    if not row.get("rationales"):
        return [f"No rationale shown (detect.rationales: {r.get('policy')})."]
    shares = "; ".join(f"{title} {row[key]:.3f}" for key, title in FAITHFULNESS_COLUMNS)
    replaced = (f" The model's own rationale failed a check and was replaced by the evidence rationale for "
                f"{row['replaced_count']} of them ({row['replaced']:.1%})." if "replaced_count" in row else "")
    return [f"Over the {row['rationales']} rationales `detect` shows (detect.rationales: {r.get('policy')}): "
            f"{shares}; false \"no failure word\" claims {row['false_no_failure_word_count']}.{replaced} "
            "Per set: the full card."]


def model_card(name: str, metrics: dict[str, Any], verdict: GateVerdict, record: dict[str, Any],
               calibration: dict[str, Any] | None = None, *, compact: bool = False) -> str:
    """A Markdown card from the version's metrics (every test set, with 95% intervals), gate verdict, lineage and
    verdict threshold (`calibration`, evaluate's calibration.json; None for a version without one).

    `compact` (the registry description, at most DESCRIPTION_LIMIT characters): the headline methods and sets
    only, the failed gate rules only, no source list; it says where the full card is.
    """

    data_lines = [f"- {d['name']}: `{d.get('path')}` md5 `{d.get('md5')}`" for d in record.get("data", [])]
    sources = next((d.get("sources") for d in record.get("data", []) if d.get("sources")), []) or []
    if not compact:
        data_lines += [f"  - {s['name']}: sha256 `{s['sha256']}` from {s['url']} ({s.get('licence')})"
                       for s in sources]
    c = record.get("corrections", {})
    values = record.get("params", {}).get("values", {})
    sft, grpo = values.get("sft") or {}, values.get("grpo") or {}
    if not metrics.get("methods"):
        table = "(no metrics)"
    elif compact:
        headline = {**metrics, "methods": {m: b for m, b in metrics["methods"].items() if m in HEADLINE_METHODS}}
        table = markdown_table(headline, [s for s in HEADLINE_SETS if s in sets_of(metrics)])
    else:
        table = "\n\n".join(markdown_table(metrics, [s]) for s in sets_of(metrics)
                              if not s.endswith(("_unseen", "_sample")))
    if compact:
        failed = ", ".join(f"`{r.name}` ({r.detail})" for r in verdict.failed)
        gate = (f"{'PASSED' if verdict.passed else 'FAILED'}: {len(verdict.rules) - len(verdict.failed)} of "
                f"{len(verdict.rules)} rules pass" + (f"; failed: {failed}" if failed else "") + ".")
    else:  # the verdict's Markdown without its title line
        gate = verdict.to_markdown().partition("\n")[2]
    return "\n".join([
        f"# Model card: {name}", "",
        "Explainable log anomaly detection (RationAnomaly, arXiv 2509.14693): given a log template the model "
        "writes `<think>rationale</think><answer>normal|abnormal</answer>`.", "",
        "## Method",
        f"- Base model: {record['base_model'].get('source')} (weights sha256 `{record['base_model'].get('sha256')}`)",
        f"- CoT-guided SFT with LoRA (r={(sft.get('lora') or {}).get('r')}, {sft.get('max_steps')} steps), then "
        f"GRPO ({grpo.get('max_steps')} steps, {grpo.get('num_generations')} generations) with format, asymmetric "
        "answer and rationale rewards.",
        (f"- Verdict: P(abnormal) of the answer word after `<answer>` (one forward pass) ≥ "
         f"{calibration['threshold']:.4f}, fitted on {calibration.get('n')} held-out training templates (validation "
         f"AP {calibration.get('average_precision', 0):.3f}); prompts carry the {calibration.get('neighbours', 0)} "
         "most similar expert-labelled training templates (the `index` artifact)." if calibration else
         "- Verdict: the answer word the model writes after its rationale."),
        f"- Rationale teacher: {record.get('teacher')}. Params sha256 `{record['params'].get('sha256')}` "
        f"(profile {record['params'].get('profile')}). Code commit `{record['code'].get('commit')}`"
        + (" with uncommitted changes" if record["code"].get("dirty") else "") + ".", "",
        "## Data", *data_lines,
        f"- Expert corrections applied: {c.get('applied')} (file sha256 `{c.get('file_sha256')}`); "
        f"review queue: {c.get('review_queue_size')} templates awaiting an expert.", "",
        "## Metrics (precision / recall / F1, abnormal = positive)", "", table, "",
        f"Engine: {metrics.get('engine')}.", "",
        "## Rationales: do they argue for the verdict, on evidence in the log?", "",
        *faithfulness_lines(metrics, compact=compact), "",
        "## Gate", "", gate, "",
        "## Limits",
        "- Trained and tested on BGL and Spirit templates (LogPrompt) with session checks on BGL_2k and HDFS; other "
        "systems (e.g. Thunderbird) are out of distribution.",
        "- Judges one template at a time: anomalies visible only in sequences or timing are not seen.",
        "- A small CPU-trained model: rationales can be fluent yet wrong; treat them as a lead, not proof.",
        "- An answer that breaks the format is counted as normal; watch the format-valid rate.", "",
        *(["The full card (every method and test set, every gate rule, the sources) is the version's "
           "`model_card` artifact.", ""] if compact else []),
    ])
