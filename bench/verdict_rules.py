"""Issue 18 item 4: the LLM as the second opinion. Three verdict rules side by side on the live endpoint's scores,
whole template test split, with 95% stratified bootstrap intervals and model calls per template:

(a) the served rule: the model's verdict score against the version's threshold (templates without a letter word
    are normal without a call: the first stage, tasks.common.prompt.first_stage_normal);
(b) a cascade: the classical detector as a high-recall first stage (its score at or above the highest threshold that
    keeps out-of-fold recall >= `--cascade-recall` on the training templates) sends only its suspects to the model,
    which decides them with the served threshold; the rest are normal without a call;
(c) a stacked score: logistic regression on (model score, classical score, keyword flag), fitted per dataset on the
    validation fold (held out of SFT and GRPO; the classical score there is out-of-fold), its threshold the best
    abnormal-class F1 of its 5-fold cross-validated scores on that fold. No test item is used for any choice.

Beside them the classical detector alone (tasks.evaluation.baselines.fit_classical), and each rule's paired
difference to it. Needs a live server (`make run` or `rationanomaly serve`).

Usage: python bench/verdict_rules.py [--json F] [--cascade-recall 0.98]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _f1(labels: np.ndarray, pred: np.ndarray) -> float:
    tp = int(((pred == 1) & (labels == 1)).sum())
    return 2 * tp / max(1, int(pred.sum()) + int(labels.sum()))


def _recall_threshold(labels: np.ndarray, scores: np.ndarray, recall: float) -> float:
    """The highest threshold whose recall on (labels, scores) is at least `recall`."""
    positives = np.sort(scores[labels == 1])[::-1]
    keep = int(np.ceil(recall * len(positives)))
    return float(positives[max(0, keep - 1)]) if len(positives) else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--cascade-recall", type=float, default=0.98,
                        help="out-of-fold recall the cascade's classical first stage keeps (default 0.98)")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    from serving.client import client_for, endpoint_from_state
    from tasks.common.prompt import first_stage_normal, label_id
    from tasks.common.settings import load_settings
    from tasks.evaluate import training_templates
    from tasks.evaluation.baselines import _logistic, classical_features, fit_classical, keyword_hits
    from tasks.evaluation.calibration import choose_threshold
    from tasks.evaluation.intervals import BootstrapSettings, f1_interval, paired_mean_f1_difference
    from tasks.evaluation.testdata import load_test_data

    settings = load_settings()
    ev = settings.evaluate
    boot = BootstrapSettings(ev.bootstrap.resamples, ev.bootstrap.confidence, ev.seed)
    data = load_test_data(ev, ROOT)
    training = training_templates(data)
    classical = fit_classical(training, ev.classical, confidence=ev.bootstrap.confidence, seed=ev.seed)
    endpoint = endpoint_from_state(ROOT / settings.serve.state_file, settings.serve.api_key_env)
    client = client_for(endpoint, settings.detect, rationales="none")
    threshold = float(endpoint.threshold if endpoint.threshold is not None else 0.5)
    print(f"endpoint {endpoint.base_url}: {endpoint.model} v{endpoint.version}, threshold {threshold}")
    val_keys, val_labels = data.validation_keys()
    figures: dict[str, dict[str, object]] = {}
    for dataset, frame in data.templates.items():
        if dataset.lower() not in ("bgl", "spirit"):
            continue
        keys = [(str(d), str(t)) for d, t in zip(frame["dataset"], frame["template"], strict=True)]
        labels = np.asarray([label_id(y) for y in frame["label"]], dtype=int)
        fit = classical.fit_for(dataset)
        part = training[training["dataset"] == dataset]
        texts, y = part["template"].astype(str).tolist(), part["label"].astype(int).to_numpy()
        oof = cross_val_predict(make_pipeline(classical_features(ev.classical), _logistic(fit.c, ev.seed)), texts, y,
                                cv=StratifiedKFold(min(ev.classical.folds, int(y.sum())), shuffle=True,
                                                   random_state=ev.seed), method="predict_proba")[:, 1]
        oof_of = dict(zip(texts, oof, strict=True))
        vk = [(d, t) for d, t in val_keys if d == dataset]
        vy = np.asarray([yy for (d, _), yy in zip(val_keys, val_labels, strict=True) if d == dataset], dtype=int)

        started = time.perf_counter()
        scores_test = np.asarray([v.score or 0.0 for v in client.classify(keys)], dtype=float)
        scores_val = np.asarray([v.score or 0.0 for v in client.classify(vk)], dtype=float)
        seconds = time.perf_counter() - started
        letters = np.asarray([not first_stage_normal(t) for _, t in keys])
        bar_scores = classical.scores(keys)
        bar = classical.predict(keys)
        keyword = np.asarray([1.0 if keyword_hits(t) else 0.0 for _, t in keys])

        served = (scores_test >= threshold).astype(int) & letters
        low = _recall_threshold(y, oof, args.cascade_recall)
        suspects = letters & (bar_scores >= low)
        cascade = served & suspects

        def features(llm: np.ndarray, cls: np.ndarray, kw: np.ndarray) -> np.ndarray:
            clip = lambda p: np.clip(p, 1e-4, 1 - 1e-4)  # noqa: E731
            return np.column_stack([np.log(clip(llm) / (1 - clip(llm))), np.log(clip(cls) / (1 - clip(cls))), kw])

        x_val = features(scores_val, np.asarray([oof_of[t] for _, t in vk]),
                         np.asarray([1.0 if keyword_hits(t) else 0.0 for _, t in vk]))
        stacker = LogisticRegression(class_weight="balanced", max_iter=1000)
        cv_scores = cross_val_predict(stacker, x_val, vy, cv=StratifiedKFold(5, shuffle=True, random_state=ev.seed),
                                      method="predict_proba")[:, 1]
        stack_threshold = choose_threshold(vy.tolist(), cv_scores.tolist()).threshold
        stacker.fit(x_val, vy)
        stacked = (stacker.predict_proba(features(scores_test, bar_scores, keyword))[:, 1] >= stack_threshold)
        stacked = stacked.astype(int) & letters

        rows = {"served (a)": (served, float(letters.mean())), "cascade (b)": (cascade, float(suspects.mean())),
                "stacked (c)": (stacked, float(letters.mean())), "classical": (bar, 0.0)}
        out: dict[str, object] = {"templates": len(keys), "abnormal": int(labels.sum()),
                                  "validation": {"templates": len(vk), "abnormal": int(vy.sum())},
                                  "cascade_first_stage_threshold": round(low, 4),
                                  "stacked_threshold": round(float(stack_threshold), 4),
                                  "stacker_coefficients": [round(float(c), 3) for c in stacker.coef_[0]],
                                  "seconds": round(seconds, 1)}
        for name, (pred, calls) in rows.items():
            diff = paired_mean_f1_difference({dataset: (labels, pred, bar)}, boot)
            out[name] = {"f1": round(_f1(labels, pred), 3), "f1_ci": f1_interval(labels, pred, boot),
                         "minus_classical": round(diff.difference, 3), "minus_classical_ci": diff.interval,
                         "model_calls_per_template": round(calls, 3)}
        figures[dataset] = out
        print(json.dumps({dataset: out}, default=str))
    client.close()
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
