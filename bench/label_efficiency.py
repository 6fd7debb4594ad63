"""How many expert labels does a system the model never saw need? Measured label efficiency (issue 20 item 5).

    python bench/label_efficiency.py [--profile default] [--adapter DIR] [--ks 0,10,25,50,100] [--grpo]
                                     [--root DIR] [--metrics FILE | --in-domain-f1 F] [--max-templates N]
                                     [--json reports/label_efficiency.json]

Simulates a new system with Spirit held out of training:

1. **A model trained without Spirit.** The distill stage's own code (tasks.distill.distill, the `distill.teacher`
   with the experts' notes) on the BGL training templates only, with neighbours from an index of the BGL training
   templates under params.yaml `index:`, then the sft stage's code (tasks.sft.prepare_sft: same balancing,
   completion-only loss, optimiser) with the `--profile`'s sft settings, in a temporary folder (`--keep DIR`
   keeps it). GRPO only with `--grpo` (tasks.grpo.prepare_grpo continuing the SFT adapter): off by default,
   because the default profile's 12 GRPO steps cost ~8 CPU-min on a quiet machine (params.yaml grpo.max_steps)
   and the verdict score this bench reads is the verdict task SFT teaches. `--adapter DIR` reuses an adapter
   already trained this way and skips training.
2. **Labels added to the index only.** For k in `--ks`, k expert-labelled Spirit training templates
   (data/split/train.parquet, the experts' corrected labels) join the BGL training templates in a fresh
   tasks.common.retrieval.TemplateIndex with the `index:` policy (features, k, floor, same system, contrastive).
   With the same-system policy a Spirit prompt shows Spirit neighbours as soon as the index holds one, BGL ones
   before (k = 0). Chosen two ways:
   - `export`: the review export's ranking (tasks.data.review_export.rank, the same code and formula
     (A + U + K) · log2(1 + lines)) over the Spirit training templates as scored by the BGL-only model with the
     BGL-only index (the state of a new system when the operator runs `detect`). Proxy: the split holds
     templates, not their line counts, so every template counts 1 line (log2 2 = 1); K is 1 for every template
     (no Spirit neighbour can be shown before any label), so the ranking is A + U: alerts first, then the
     scores nearest the threshold. First-stage templates (no letter word) are left out, as the export does.
   - `random`: a seeded permutation (`--seed`) of all Spirit training templates (first-stage ones included:
     an operator picking at random does not know which those are).
   The lists are nested (the first 10 of the 25 are the 10), as one operator labelling more over time.
3. **Verdict and F1.** Every Spirit test template (data/split/test.parquet; `--max-templates` caps it, stratified
   and seeded as the evaluate stage caps) is scored with the in-process engine (tasks.evaluation.inference.
   open_engine; first stage + the verdict score, tasks.common.prompt.scored_verdict) with the neighbours of the
   k-label index. Threshold (the rule of the new system): the one fitted on the BGL validation fold
   (tasks.evaluation.calibration.choose_threshold, BGL-only index; the same-system policy keeps BGL prompts from
   seeing Spirit labels, so it does not move with k) — what an index-only release has without a validation fold
   of the new system. Beside it, `refit`: the threshold fitted on the k labelled templates themselves, each
   scored with the k-label index minus itself and its near-duplicates (index.near_duplicate_similarity, as
   distill does), when they hold >= 2 anomalies (else the BGL threshold). Both with the served verdict rules on
   top (tasks.detection.verdicts.apply_verdict_rules on the neighbours the k-label index shows: an alert needs a
   failure word or an abnormal nearest Spirit neighbour), as every served path applies them; `score_only_f1` is the BGL
   threshold without them. Abnormal-class F1 with 95% stratified
   bootstrap intervals (tasks.evaluation.intervals.f1_interval, evaluate.bootstrap), beside the in-domain
   candidate's Spirit F1 (the evaluate stage's `--metrics` file, methods.<candidate>.template_spirit, or
   `--in-domain-f1`) and the issue's target ratio 0.9.
4. **Wall time** of each index-only step: the index rebuild (TF-IDF fit over BGL + k templates) and the
   rescoring of the Spirit test templates (model already loaded: a served version keeps it). Not measured here:
   registering and deploying the version (the index-only release flow's own cost).

Thunderbird_2k (the issue's optional second loop) is measured by bench/thunderbird_loop.py (detect's code on the
log, the review export's ranking, false alarms before and after), not here. Prints one row per (strategy, k),
writes `--json` and a plot of F1 against k beside it (same name, .png). Needs the split (`dvc repro split`) and
the base model under `--root`. Wall seconds are as measured on this machine (2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOME, NEW = "bgl", "spirit"  # trained on HOME only; NEW is the system that gets labels
STRATEGIES = ("export", "random")
TARGET_RATIO = 0.9  # issue 20: >= 90% of the in-domain candidate's F1 with at most 50 labels


def build_index(frame: Any, retrieval: Any) -> Any:
    """A TemplateIndex of `frame` (dataset, template, label) under the `index:` policy of params.yaml."""
    from tasks.common.retrieval import TemplateIndex

    return TemplateIndex(frame["template"].tolist(), frame["label"].astype(int).tolist(), frame["dataset"].tolist(),
                         retrieval.features, k=retrieval.k, floor=retrieval.floor,
                         same_system=retrieval.same_system, contrastive=retrieval.contrastive)


def train_home_only(settings: Any, root: Path, train: Any, work: Path, grpo: bool) -> tuple[Path, dict[str, Any]]:
    """Distill + SFT (+ GRPO) on the HOME training templates; returns (adapter folder, what was trained)."""
    from tasks.common.config import resolve_path
    from tasks.data.teachers import expert_notes, make_teacher
    from tasks.distill import distill
    from tasks.sft import prepare_sft

    home = train[train["dataset"] == HOME].reset_index(drop=True)
    train_file = work / f"train_{HOME}.parquet"
    home.to_parquet(train_file, index=False)
    correct = settings.correct
    notes = (expert_notes(resolve_path(correct.out_file, root), resolve_path(correct.resolution_file, root))
             if settings.distill.teacher == "lexicon" else None)
    teacher = make_teacher(settings.distill, root, notes)
    started = time.monotonic()
    report = distill(train_file, work / "sft.jsonl", work / "distill.json", teacher, build_index(home, settings.index),
                     settings.index, settings.split.seed, settings.distill.hard_negative_repeats)
    distill_s = time.monotonic() - started
    base = str(resolve_path(settings.sft.base_model_dir, root))
    sft = settings.sft.model_copy(update={
        "data_file": str(work / "sft.jsonl"), "base_model_dir": base, "out_dir": str(work / "sft"),
        "checkpoint_dir": str(work / "sft-ckpt"), "resume": False, "report_file": str(work / "sft.json")})
    prep = prepare_sft(sft)
    started = time.monotonic()
    prep.trainer.train()
    prep.trainer.save_model(str(work / "sft"))
    trained = {"templates": len(home), "distilled_examples": sum(report["examples"].values()),
               "distill_seconds": round(distill_s, 1), "sft_steps": sft.max_steps,
               "sft_seconds": round(time.monotonic() - started, 1), "grpo_steps": 0, "grpo_seconds": 0.0}
    adapter = work / "sft"
    if grpo:
        from tasks.grpo import prepare_grpo

        rl = settings.grpo.model_copy(update={
            "data_file": str(work / "sft.jsonl"), "base_model_dir": base, "sft_adapter_dir": str(adapter),
            "out_dir": str(work / "grpo"), "checkpoint_dir": str(work / "grpo-ckpt"), "resume": False,
            "report_file": str(work / "grpo.json"), "rewards_csv": str(work / "grpo_rewards.csv"),
            "rewards_png": str(work / "grpo_rewards.png")})
        prep_rl = prepare_grpo(rl)
        started = time.monotonic()
        prep_rl.trainer.train()
        prep_rl.trainer.save_model(str(work / "grpo"))
        trained.update(grpo_steps=rl.max_steps, grpo_seconds=round(time.monotonic() - started, 1))
        adapter = work / "grpo"
    return adapter, trained


def in_domain(metrics_file: Path | None, value: float | None) -> dict[str, Any] | None:
    """The in-domain candidate's Spirit template F1: `value` when given, else read from the evaluate stage's
    metrics file (methods.<candidate>.template_<NEW>); None when neither is available."""
    if value is not None:
        return {"f1": value, "f1_ci": None, "source": "--in-domain-f1"}
    if metrics_file is None or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    figures = metrics["methods"][metrics["candidate"]][f"template_{NEW}"]
    return {"f1": round(float(figures["f1"]), 3), "f1_ci": figures.get("f1_ci"), "n": figures.get("n"),
            "source": f"{metrics_file} (created {metrics.get('created_at')})"}


def export_order(pool: Any, scores: list[float | None], shown: list[bool], threshold: float) -> list[int]:
    """Row positions of `pool` in the review export's order (tasks.data.review_export.rank), one line each."""
    from tasks.common.prompt import first_stage_normal, scored_verdict
    from tasks.data.review_export import Candidate, rank

    found = {}
    for position, (template, score, seen) in enumerate(zip(pool["template"], scores, shown, strict=True)):
        found[(NEW, str(template))] = Candidate(
            str(template), NEW, scored_verdict(score, threshold), score, threshold, "", seen,
            first_stage_normal(str(template)), "", "", None, str(position), lines=1)
    return [int(c.source) for c, _ in rank(found).rows]


def main() -> None:
    import numpy as np

    from tasks.common.config import resolve_path
    from tasks.common.prompt import ABNORMAL, NORMAL
    from tasks.common.retrieval import system_key
    from tasks.common.settings import load_settings
    from tasks.detection.verdicts import apply_verdict_rules
    from tasks.evaluate import bootstrap_settings
    from tasks.evaluation.calibration import apply_threshold, choose_threshold
    from tasks.evaluation.inference import open_engine
    from tasks.evaluation.intervals import f1_interval
    from tasks.evaluation.testdata import cap_stratified, read_split_frame

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: its `profile:` line)")
    parser.add_argument("--adapter", type=Path, default=None, help="a BGL-only adapter: skip training")
    parser.add_argument("--grpo", action="store_true", help="also run GRPO after SFT (the profile's grpo settings)")
    parser.add_argument("--ks", default="0,10,25,50,100", help="labels added to the index, comma-separated")
    parser.add_argument("--seed", type=int, default=None, help="the random choice's seed (default: split.seed)")
    parser.add_argument("--root", type=Path, default=ROOT, help="folder holding data/split and models/base")
    parser.add_argument("--metrics", type=Path, default=None,
                        help="the in-domain evaluation's metrics.json (default: ROOT/<evaluate.metrics_file>)")
    parser.add_argument("--in-domain-f1", type=float, default=None, help="the in-domain candidate's Spirit F1")
    parser.add_argument("--max-templates", type=int, default=-1,
                        help="cap per set (Spirit test, Spirit label pool, BGL validation), stratified and seeded; "
                             "default: the profile's evaluate.max_templates_per_dataset; 0: no cap")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder (trained adapter) here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, the plot beside it")
    args = parser.parse_args()
    settings = load_settings(ROOT / "params.yaml", profile=args.profile)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    if not ks or ks[0] < 0:
        parser.error(f"--ks must list labels counts >= 0, got {args.ks!r}")
    seed = settings.split.seed if args.seed is None else args.seed
    cap = settings.evaluate.max_templates_per_dataset if args.max_templates < 0 else (args.max_templates or None)
    ev, root = settings.evaluate, args.root.resolve()
    split = resolve_path(ev.split_dir, root)
    train, validation, test = (read_split_frame(split / f"{name}.parquet") for name in ("train", "validation", "test"))
    home_train = train[train["dataset"] == HOME].reset_index(drop=True)
    pool = cap_stratified(train[train["dataset"] == NEW].reset_index(drop=True), cap, seed).reset_index(drop=True)
    new_test = cap_stratified(test[test["dataset"] == NEW].reset_index(drop=True), cap, ev.seed).reset_index(drop=True)
    home_val = cap_stratified(validation[validation["dataset"] == HOME].reset_index(drop=True), cap, ev.seed)
    if ks[-1] > len(pool):
        parser.error(f"--ks asks for {ks[-1]} labels but the {NEW} training pool holds {len(pool)}")
    reference = in_domain(args.metrics or resolve_path(ev.metrics_file, ROOT), args.in_domain_f1)
    boot = bootstrap_settings(ev)

    with tempfile.TemporaryDirectory(prefix="label-efficiency-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.adapter is not None:
            adapter, trained = args.adapter, {"adapter": str(args.adapter), "reused": True}
        else:
            adapter, trained = train_home_only(settings, root, train, work, args.grpo)
            trained["adapter"] = str(adapter) if args.keep else "(temporary)"
        print(f"BGL-only model: {json.dumps(trained)}", flush=True)
        engine = open_engine(resolve_path(ev.base_model_dir, root), ev.engine, batch_size=ev.batch_size,
                             max_new_tokens=ev.max_new_tokens, dtype=ev.dtype, max_model_len=ev.max_model_len,
                             kvcache_gib=ev.kvcache_space_gib, threads=ev.torch_threads)
        try:
            def score(frame: Any, index: Any, **options: Any) -> list[float | None]:
                templates, datasets = frame["template"].tolist(), frame["dataset"].tolist()
                return engine.score(templates, datasets, adapter,
                                    index.prompt_neighbours(templates, datasets, **options)).scores

            home_index = build_index(home_train, settings.index)
            val_labels = home_val["label"].astype(int).tolist()
            if sum(val_labels):
                calibration = choose_threshold(val_labels, score(home_val, home_index))
                threshold, threshold_note = calibration.threshold, (
                    f"fitted on the {HOME} validation fold ({calibration.n} templates, {calibration.abnormal} "
                    f"abnormal; F1 there {calibration.f1:.3f})")
            else:
                threshold, threshold_note = 0.5, f"0.5: the {HOME} validation fold holds no anomaly"
            print(f"threshold {threshold:.4f}, {threshold_note}", flush=True)

            pool_scores = score(pool, home_index)
            own = [any(system_key(n.dataset) == NEW for n in found)
                   for found in home_index.shown(pool["template"].tolist(), pool["dataset"].tolist())]
            orders = {"export": export_order(pool, pool_scores, own, threshold),
                      "random": [int(i) for i in np.random.default_rng(seed).permutation(len(pool))]}
            truth = new_test["label"].astype(int).to_numpy()
            rows: list[dict[str, Any]] = []
            for strategy in STRATEGIES:
                for k in ks:
                    chosen = pool.iloc[orders[strategy][:k]]
                    if len(chosen) < k:
                        print(f"  {strategy}: only {len(chosen)} templates worth a label, not {k}", flush=True)
                    if k == 0 and rows and rows[0]["k"] == 0:  # the same index whatever the strategy
                        rows.append({**rows[0], "strategy": strategy})
                        print(show(rows[-1], reference), flush=True)
                        continue
                    started = time.monotonic()
                    index = build_index(pd_concat(home_train, chosen), settings.index)
                    rebuild = time.monotonic() - started
                    started = time.monotonic()
                    scores = score(new_test, index)
                    rescoring = time.monotonic() - started
                    labels = chosen["label"].astype(int).tolist()
                    refit, refit_note = threshold, "bgl"
                    if sum(labels) >= 2:
                        own_scores = score(chosen, index, exclude_same=True,
                                           below=settings.index.near_duplicate_similarity)
                        refit, refit_note = choose_threshold(labels, own_scores).threshold, "labels"
                    row = {"strategy": strategy, "k": k, "labels": len(chosen), "labelled_abnormal": int(sum(labels)),
                           "rebuild_seconds": round(rebuild, 2), "rescoring_seconds": round(rescoring, 1),
                           "threshold": round(threshold, 4), "refit_threshold": round(refit, 4),
                           "refit_from": refit_note}
                    found = index.shown(new_test["template"].tolist(), new_test["dataset"].tolist())
                    for name, theta in (("score_only_", threshold), ("", threshold), ("refit_", refit)):
                        predicted = apply_threshold(scores, theta)
                        if name != "score_only_":  # the served verdict rules on top of the threshold
                            predicted = np.asarray([
                                apply_verdict_rules(t, d, near, ABNORMAL if flag else NORMAL).verdict == ABNORMAL
                                for t, d, near, flag in zip(new_test["template"], new_test["dataset"], found,
                                                            predicted, strict=True)], dtype=int)
                        tp = int((predicted & truth).sum())
                        row[f"{name}f1"] = round(2 * tp / max(1, int(predicted.sum()) + int(truth.sum())), 3)
                        row[f"{name}f1_ci"] = f1_interval(truth, predicted, boot)
                        row[f"{name}precision"] = round(tp / max(1, int(predicted.sum())), 3)
                        row[f"{name}recall"] = round(tp / max(1, int(truth.sum())), 3)
                    if reference:
                        row["ratio_to_in_domain"] = round(row["f1"] / reference["f1"], 3) if reference["f1"] else None
                    rows.append(row)
                    print(show(row, reference), flush=True)
        finally:
            engine.close()

    figures = {"profile": settings.profile, "trained": trained, "threshold_rule": threshold_note,
               "threshold": round(threshold, 4), "test": {"dataset": NEW, "templates": len(new_test),
                                                          "abnormal": int(truth.sum()), "cap": cap},
               "pool": {"templates": len(pool), "abnormal": int(pool["label"].sum()),
                        "export_ranked": len(orders["export"])},
               "in_domain": reference, "target_ratio": TARGET_RATIO, "seed": seed, "engine": engine.name,
               "engine_notes": list(engine.notes), "rows": rows}
    print(verdict(rows, reference))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
        plot(rows, reference, args.json.with_suffix(".png"), len(new_test))
        print(f"→ {args.json}, {args.json.with_suffix('.png')}")


def pd_concat(home: Any, chosen: Any) -> Any:
    """The index's templates: HOME training templates, then the chosen NEW ones."""
    import pandas as pd

    return pd.concat([home, chosen], ignore_index=True)


def interval(ci: Any) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "[n/a]"


def show(row: dict[str, Any], reference: dict[str, Any] | None) -> str:
    ratio = f"  {row['ratio_to_in_domain']:.2f}× in-domain" if reference and row.get("ratio_to_in_domain") else ""
    return (f"{row['strategy']:6s} k {row['k']:3d} ({row['labelled_abnormal']:2d} abn) | F1 {row['f1']:.3f} "
            f"{interval(row['f1_ci'])} P {row['precision']:.2f} R {row['recall']:.2f}{ratio} | refit θ "
            f"{row['refit_threshold']:.3f} ({row['refit_from']}) F1 {row['refit_f1']:.3f} "
            f"{interval(row['refit_f1_ci'])}"
            f" | rebuild {row['rebuild_seconds']:.2f} s, rescoring {row['rescoring_seconds']:.1f} s")


def verdict(rows: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    """Where the issue's target stands: the best F1 with at most 50 labels against 0.9 × in-domain."""
    if not reference:
        return "in-domain F1 unknown (--metrics or --in-domain-f1): target not judged"
    within = [r for r in rows if r["k"] <= 50]
    best = max(within, key=lambda r: r["f1"]) if within else None
    if best is None:
        return "no k <= 50 measured: target not judged"
    goal = TARGET_RATIO * reference["f1"]
    return (f"in-domain {reference['f1']:.3f} {interval(reference['f1_ci'])} (n {reference.get('n', '?')}); "
            f"target {goal:.3f} (0.9×) with <= 50 "
            f"labels: best {best['f1']:.3f} ({best['strategy']}, k {best['k']}) → "
            f"{'met' if best['f1'] >= goal else 'not met'}")


def plot(rows: list[dict[str, Any]], reference: dict[str, Any] | None, out: Path, n: int) -> None:
    """F1 against k per strategy with the intervals, the in-domain F1 and 0.9 of it as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, marker in zip(STRATEGIES, ("o", "s"), strict=True):
        mine = [r for r in rows if r["strategy"] == strategy]
        ks, f1 = [r["k"] for r in mine], [r["f1"] for r in mine]
        low = [max(0.0, r["f1"] - r["f1_ci"][0]) if r["f1_ci"] else 0.0 for r in mine]  # f1 is rounded
        high = [max(0.0, r["f1_ci"][1] - r["f1"]) if r["f1_ci"] else 0.0 for r in mine]
        ax.errorbar(ks, f1, yerr=[low, high], marker=marker, capsize=3, label=f"{strategy} labels")
    if reference:
        ax.axhline(reference["f1"], color="k", linestyle="--", label="in-domain candidate")
        ax.axhline(TARGET_RATIO * reference["f1"], color="grey", linestyle=":", label="0.9 × in-domain")
    ax.set_xlabel("expert-labelled Spirit templates in the index (k)")
    ax.set_ylabel(f"Spirit test abnormal-class F1 ({n} templates)")
    ax.set_title("BGL-only model, labels added to the index only (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
