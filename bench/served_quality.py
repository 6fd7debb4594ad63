"""What users get from the live endpoint on the whole template test split: verdict F1 beside the classical bar, and
the rationales they are shown.

Every BGL and Spirit test template (data/split/test.parquet) is sent through `serving.client.Client` with the
`detect` settings, exactly as `rationanomaly detect` asks about a template: the verdict is the scored answer against
the served version's threshold, and a rationale is written only for what `detect.rationales` says (default: the
abnormal verdicts). Printed per dataset, with 95% stratified bootstrap intervals (evaluate.bootstrap):

- abnormal-class F1 of the served verdicts, beside the `classical` baseline (word+char TF-IDF + keyword flag,
  cross-fitted threshold: tasks.evaluation.baselines.fit_classical) on the same items, and their paired
  difference;
- on the rationales users are shown (issue 19: never averaged over templates nobody reads): how many, the share
  that conclude the verdict they come with (agreement), whose named component is the log's own, whose quotes all
  occur in the log or a shown neighbour, and the count of false "no failure word" claims (the log holds a word of
  the keyword list);
- how many of those the served guard replaced by the evidence rationale (`rationale_source`), and the same checks
  on the model's own rationales for those templates (its completion, before the guard);
- LLM requests per template, and wall time;
- ten shown rationales drawn at random (seed 0).

`--detect-output FILE` (repeatable) adds the same rationale figures for the template records of a
`rationanomaly detect --out FILE` run against the same endpoint (e.g. on BGL_2k and Thunderbird_2k): the rationale
each record shows, its `rationale_source`, and the model's own text read from the verdict cache
(`detect.cache_file`, the `raw` column) when it is there. `--skip-split` measures only those files.

Needs a live server (`make run` or `rationanomaly serve`). Usage:
python bench/served_quality.py [--limit N] [--json F] [--detect-output FILE ...] [--skip-split]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="templates per dataset (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--detect-output", type=Path, action="append", default=[],
                        help="a `rationanomaly detect --out` file of a run against the same endpoint")
    parser.add_argument("--skip-split", action="store_true", help="only the --detect-output files")
    args = parser.parse_args()

    from serving.client import client_for, endpoint_from_state
    from tasks.common.prompt import ABNORMAL, label_id, parse_completion
    from tasks.common.settings import load_settings
    from tasks.evaluate import training_templates
    from tasks.evaluation.baselines import fit_classical
    from tasks.evaluation.intervals import BootstrapSettings, f1_interval, paired_mean_f1_difference
    from tasks.evaluation.rationales import faithfulness_report
    from tasks.evaluation.testdata import load_test_data

    settings = load_settings()
    data = load_test_data(settings.evaluate, ROOT)
    classical = fit_classical(training_templates(data), settings.evaluate.classical,
                              confidence=settings.evaluate.bootstrap.confidence, seed=settings.evaluate.seed)
    endpoint = endpoint_from_state(ROOT / settings.serve.state_file, settings.serve.api_key_env)
    client = client_for(endpoint, settings.detect)
    print(f"endpoint {endpoint.base_url}: {endpoint.model} v{endpoint.version}, threshold {endpoint.threshold}, "
          f"{endpoint.neighbours} neighbours, context {endpoint.max_model_len}; "
          f"rationales: {settings.detect.rationales}")
    figures: dict[str, dict[str, object]] = {}
    shown_all: list[tuple[str, str, str, str, str]] = []
    def rationale_figures(items: list[tuple[str, str, str, list, str]], sources: list[str | None],
                          own: list[str | None]) -> dict[str, object]:
        """The checks on the shown rationales (items: rationale, log, dataset, shown neighbours, verdict), how many
        the guard replaced, and the checks on the model's own text where known."""
        shown_checks = faithfulness_report(items)  # the shared checks (tasks/evaluation/rationales.py)
        model = faithfulness_report((o, *item[1:]) for o, item in zip(own, items, strict=True) if o is not None)
        return {"shown_rationales": len(items), "agreement": shown_checks["agrees"],
                "component_is_the_logs": shown_checks["component_in_log"],
                "quotes_grounded": shown_checks["quotes_grounded"],
                "cited_neighbour_shown": shown_checks["cited_neighbour_shown"],
                "false_no_failure_word_claims": shown_checks["false_no_failure_word_count"],
                "all_checks_pass": shown_checks["all_pass"],
                "replaced_by_evidence": sum(src == "evidence" for src in sources),
                "model_own": {k: model[k] for k in ("rationales", "agrees", "component_in_log", "quotes_grounded",
                                                     "cited_neighbour_shown", "false_no_failure_word_count",
                                                     "all_pass")}}

    for dataset, frame in data.templates.items():
        if args.skip_split or dataset.lower() not in ("bgl", "spirit"):
            continue
        frame = frame if args.limit is None else frame.head(args.limit)
        keys = [(str(d), str(t)) for d, t in zip(frame["dataset"], frame["template"], strict=True)]
        labels = np.asarray([label_id(y) for y in frame["label"]], dtype=int)
        requests_before, started = client.requests, time.perf_counter()
        verdicts = client.classify(keys)
        seconds = time.perf_counter() - started
        served = np.asarray([int(v.verdict == ABNORMAL) for v in verdicts], dtype=int)
        bar = classical.predict(keys)
        boot = BootstrapSettings(settings.evaluate.bootstrap.resamples, settings.evaluate.bootstrap.confidence,
                                 settings.evaluate.seed)
        diff = paired_mean_f1_difference({dataset: (labels, served, bar)}, boot)
        shown = [(v, t) for v, (_, t) in zip(verdicts, keys, strict=True) if v.rationale]
        near = {t: client.neighbours_of(t, endpoint, dataset) for _, t in shown}  # (template, label) as shown
        items = [(v.rationale, t, dataset, near[t], v.verdict) for v, t in shown]
        rationales = rationale_figures(items, [v.rationale_source for v, _ in shown],
                                       [parse_completion(v.raw).think if v.raw else None for v, _ in shown])
        shown_all += [(dataset, t, v.verdict or "", f"{v.score:.3f}" if v.score is not None else "-", v.rationale)
                      for v, t in shown]

        def f1(pred: np.ndarray, truth: np.ndarray = labels) -> float:
            tp = int(((pred == 1) & (truth == 1)).sum())
            return 2 * tp / max(1, int(pred.sum()) + int(truth.sum()))

        figures[dataset] = {
            "templates": len(keys), "abnormal": int(labels.sum()),
            "served_f1": round(f1(served), 3), "served_f1_ci": f1_interval(labels, served, boot),
            "classical_f1": round(f1(bar), 3), "classical_f1_ci": f1_interval(labels, bar, boot),
            "served_minus_classical": {"difference": round(diff.difference, 3), "interval": diff.interval},
            **rationales,
            "requests_per_template": round((client.requests - requests_before) / max(1, len(keys)), 3),
            "seconds": round(seconds, 1),
        }
        print(json.dumps({dataset: figures[dataset]}, default=str))
    raw_of = cached_answers(ROOT / settings.detect.cache_file)
    for path in args.detect_output:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        told = [r for r in records if r.get("kind") == "template" and r.get("rationale")]
        items = [(r["rationale"], r["template"], r["dataset"],
                  client.neighbours_of(r["template"], endpoint, r["dataset"]), r["verdict"]) for r in told]
        own = [raw_of.get((r["dataset"], r["template"])) for r in told]
        figures[path.name] = {"templates": sum(r.get("kind") == "template" for r in records),
                              **rationale_figures(items, [r.get("rationale_source") for r in told],
                                                  [parse_completion(o).think if o else None for o in own])}
        print(json.dumps({path.name: figures[path.name]}, default=str))
        shown_all += [(f"{path.name}", r["template"], r["verdict"], f"{r['score']:.3f}" if r.get("score") is not None
                       else "-", f"[{r.get('rationale_source')}] {r['rationale']}") for r in told]
    client.close()
    print("\nten shown rationales, drawn at random (seed 0):")
    for dataset, template, verdict, score, rationale in random.Random(0).sample(shown_all, min(10, len(shown_all))):
        print(f"- [{dataset}] {verdict} (score {score}) {template[:100]!r}\n    {rationale}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")


def cached_answers(cache_file: Path) -> dict[tuple[str, str], str]:
    """(dataset, template) → the model's raw answer in detect's verdict cache (empty when there is no cache)."""
    import sqlite3

    if not cache_file.is_file():
        return {}
    with sqlite3.connect(cache_file) as db:
        try:
            return {(d, t): raw for d, t, raw in db.execute("SELECT dataset, template, raw FROM verdicts") if raw}
        except sqlite3.Error:
            return {}


if __name__ == "__main__":
    main()
