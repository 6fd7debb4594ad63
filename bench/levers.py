"""Which training setup gives the best calibrated verdict? A measurement study of the issue-14 levers.

    python bench/levers.py [--variants explain_verdict,verdict_only,full_verdict] [--steps 128] [--k 3]
                           [--out reports/levers.json]

Each variant fine-tunes the base model with the sft stage's own code (tasks.sft.prepare_sft: same records,
balancing, completion-only loss, optimiser) for `--steps` steps, then scores the verdict task (the answer
word's first-token probability, tasks.common.prompt.verdict_score) on the validation fold and the whole
template test split, with the index stage's neighbours in every prompt. The threshold is fitted on the
validation fold (tasks.evaluation.calibration); abnormal-class F1 and macro-F1 on each test set carry 95%
stratified bootstrap intervals (tasks.evaluation.intervals). Needs `dvc repro distill` (split, index, data).

Variants (what each changes from the shipped `sft` settings):
  explain_verdict  both tasks, LoRA (the shipped mix)
  verdict_only     the verdict examples only, LoRA
  full_verdict     the verdict examples only, full fine-tuning (every weight; learning rate --full-lr)
  explain_verdict_char
                   both tasks, LoRA, neighbours from a character 3-5 gram index (index.features: char), the
                   index and the distilled data rebuilt with it
  base             no training: the base model's own verdict score (the floor)

Prints one row per variant and writes them to --out; wall seconds of training and scoring are given as
measured on this machine (2 shared cores: compare variants run in the same invocation).
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

VARIANTS = ("explain_verdict", "verdict_only", "full_verdict", "explain_verdict_char", "base")


def verdict_records(data_file: Path, out: Path, tasks: tuple[str, ...]) -> Path:
    """The distilled records of `tasks` only, as a jsonl the sft code reads."""
    with data_file.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for line in src:
            if json.loads(line).get("task", "explain") in tasks:
                dst.write(line)
    return out


def char_index_data(settings: Any, work: Path) -> tuple[Path, Path]:
    """The index rebuilt with character n-grams and the training data distilled with its neighbours."""
    from tasks import distill, index

    retrieval = settings.index.model_copy(update={"features": "char", "out_dir": str(work / "index-char")})
    index.run(retrieval)
    data = settings.distill.model_copy(update={"out_file": str(work / "char-train.jsonl"),
                                               "report_file": str(work / "char-distill.json")})
    distill.run(data, retrieval, settings.split.seed)
    return work / "index-char", work / "char-train.jsonl"


def train(variant: str, everything: Any, work: Path, steps: int,
          full_lr: float) -> tuple[Path, Path | None, Path, float]:
    """Fine-tune one variant; returns (model folder to load, adapter folder or None, index folder, wall s)."""
    from tasks.sft import prepare_sft

    settings, index_dir, source = everything.sft, ROOT / everything.index.out_dir, ROOT / everything.sft.data_file
    if variant == "base":
        return ROOT / settings.base_model_dir, None, index_dir, 0.0
    if variant.endswith("_char"):
        index_dir, source = char_index_data(everything, work)
    tasks = ("explain", "verdict") if variant.startswith("explain_verdict") else ("verdict",)
    data = verdict_records(source, work / f"{variant}.jsonl", tasks)
    full = variant.startswith("full")
    overrides = {"data_file": str(data), "max_steps": steps, "out_dir": str(work / variant),
                 "checkpoint_dir": str(work / f"{variant}-ckpt"), "resume": False, "save_steps": steps,
                 "report_file": str(work / f"{variant}.json"), **({"learning_rate": full_lr} if full else {})}
    prep = prepare_sft(settings.model_copy(update=overrides), full_finetune=full)
    started = time.monotonic()
    prep.trainer.train()
    seconds = time.monotonic() - started
    prep.trainer.save_model(str(work / variant))
    if full:
        prep.trainer.processing_class.save_pretrained(str(work / variant))
        return work / variant, None, index_dir, seconds
    return ROOT / settings.base_model_dir, work / variant, index_dir, seconds


def measure(model_dir: Path, adapter: Path | None, index_dir: Path, evaluate: Any, k: int) -> dict[str, Any]:
    """Scores on the validation fold and the test split; threshold, F1 and macro-F1 with intervals, AP."""
    import pandas as pd
    from sklearn.metrics import average_precision_score, f1_score

    from tasks.common.retrieval import INDEX_FILE, TemplateIndex
    from tasks.evaluate import bootstrap_settings
    from tasks.evaluation.calibration import apply_threshold, as_scores, choose_threshold
    from tasks.evaluation.inference import open_engine
    from tasks.evaluation.intervals import f1_interval

    split = ROOT / evaluate.split_dir
    validation, test = pd.read_parquet(split / "validation.parquet"), pd.read_parquet(split / "test.parquet")
    index = TemplateIndex.load(index_dir / INDEX_FILE)
    engine = open_engine(model_dir, evaluate.engine, batch_size=evaluate.batch_size,
                         max_new_tokens=evaluate.max_new_tokens, dtype=evaluate.dtype,
                         max_model_len=evaluate.max_model_len, kvcache_gib=evaluate.kvcache_space_gib,
                         threads=evaluate.torch_threads)
    started = time.monotonic()
    try:
        def scores(frame: pd.DataFrame) -> list[float | None]:
            templates, datasets = frame["template"].astype(str).tolist(), frame["dataset"].astype(str).tolist()
            return engine.score(templates, datasets, adapter, index.prompt_neighbours(templates, datasets, k)).scores

        val_scores, test_scores = scores(validation), scores(test)
    finally:
        engine.close()
    calibration = choose_threshold(validation["label"].astype(int).tolist(), val_scores)
    bootstrap = bootstrap_settings(evaluate)
    row: dict[str, Any] = {"threshold": round(calibration.threshold, 4),
                           "validation_ap": round(calibration.average_precision, 3),
                           "score_seconds": round(time.monotonic() - started, 1)}
    test = test.assign(score=as_scores(test_scores), missing=[s is None for s in test_scores])
    for dataset, frame in test.groupby("dataset"):
        truth = frame["label"].astype(int).to_numpy()
        predicted = apply_threshold(frame["score"].tolist(), calibration.threshold)
        row[dataset] = {
            "n": len(frame), "abnormal": int(truth.sum()), "missing_scores": int(frame["missing"].sum()),
            "f1": round(float(f1_score(truth, predicted, zero_division=0)), 3),
            "f1_ci": f1_interval(truth, predicted, bootstrap),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro", zero_division=0)), 3),
            "macro_f1_ci": f1_interval(truth, predicted, bootstrap, statistic="macro_f1"),
            "ap": round(float(average_precision_score(truth, frame["score"])), 3),
        }
    return row


def show(variant: str, row: dict[str, Any]) -> str:
    def interval(ci: Any) -> str:
        return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "[n/a]"

    cells = [f"{d}: F1 {row[d]['f1']:.3f} {interval(row[d]['f1_ci'])} macro {row[d]['macro_f1']:.3f} "
             f"AP {row[d]['ap']:.2f}" for d in ("bgl", "spirit") if d in row]
    return (f"{variant:20s} train {row['train_seconds']:6.0f} s  score {row['score_seconds']:5.0f} s  "
            f"thr {row['threshold']:.3f}  val AP {row['validation_ap']:.2f} | " + " | ".join(cells))


def main() -> None:
    from tasks.common.settings import load_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="explain_verdict,verdict_only,full_verdict",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: sft.max_steps)")
    parser.add_argument("--k", type=int, default=None, help="neighbours per prompt (default: index.k)")
    parser.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "levers.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep the trained models in this folder")
    args = parser.parse_args()
    settings = load_settings()
    steps, k = args.steps or settings.sft.max_steps, settings.index.k if args.k is None else args.k
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            model_dir, adapter, index_dir, seconds = train(variant, settings, work, steps, args.full_lr)
            rows[variant] = {"steps": 0 if variant == "base" else steps, "k": k, "train_seconds": round(seconds, 1),
                             **measure(model_dir, adapter, index_dir, settings.evaluate, k)}
            print(show(variant, rows[variant]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
