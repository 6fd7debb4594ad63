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
- LLM requests per template, and wall time;
- ten shown rationales drawn at random (seed 0).

Needs a live server (`make run` or `rationanomaly serve`). Usage: python bench/served_quality.py [--limit N] [--json F]
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
    args = parser.parse_args()

    from serving.client import client_for, endpoint_from_state
    from tasks.common.prompt import ABNORMAL, label_id
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
    for dataset, frame in data.templates.items():
        if dataset.lower() not in ("bgl", "spirit"):
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
        faithfulness = faithfulness_report(items)  # the shared checks (tasks/evaluation/rationales.py)
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
            "shown_rationales": len(shown), "agreement": faithfulness["agrees"],
            "component_is_the_logs": faithfulness["component_in_log"],
            "quotes_grounded": faithfulness["quotes_grounded"],
            "cited_neighbour_shown": faithfulness["cited_neighbour_shown"],
            "false_no_failure_word_claims": faithfulness["false_no_failure_word_count"],
            "all_checks_pass": faithfulness["all_pass"],
            "requests_per_template": round((client.requests - requests_before) / max(1, len(keys)), 3),
            "seconds": round(seconds, 1),
        }
        print(json.dumps({dataset: figures[dataset]}, default=str))
    client.close()
    print("\nten shown rationales, drawn at random (seed 0):")
    for dataset, template, verdict, score, rationale in random.Random(0).sample(shown_all, min(10, len(shown_all))):
        print(f"- [{dataset}] {verdict} (score {score}) {template[:100]!r}\n    {rationale}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
