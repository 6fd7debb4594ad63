"""Templates per second for evaluation: vLLM's offline engine against transformers `generate`, same templates.

    python bench/evaluate.py [--n 200] [--max-new-tokens 96] [--adapter models/grpo] [--engines vllm,transformers]

Templates come from data/split/test.parquet when the split exists, else from the mirror's LogPrompt lists.
Model loading (and, for vLLM, merging the adapter and starting the engine) is timed apart from generation.
Prints each engine's templates/s for writing a rationale (generation) and for the calibrated verdict score
(one forward pass, tasks.common.prompt.verdict_score), their ratios, how often the two engines' verdicts
agree and how far apart their scores are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def templates(n: int, seed: int) -> tuple[list[str], list[str]]:
    split = ROOT / "data" / "split" / "test.parquet"
    if split.is_file():
        frame = pd.read_parquet(split)
    else:
        mirror = Path(os.environ.get("RATIONANOMALY_MIRROR", ROOT.parent / "shared" / "data"))
        frame = pd.concat(pd.read_csv(mirror / f"logprompt/templates_{d}.csv", keep_default_na=False)
                          .rename(columns={"log": "template"}).assign(dataset=d) for d in ("bgl", "spirit"))
    frame = frame.sample(min(n, len(frame)), random_state=seed)
    return frame["template"].astype(str).tolist(), frame["dataset"].astype(str).tolist()


def main() -> None:
    from tasks.evaluation.inference import open_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="templates (default 200)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (default: models/grpo if present)")
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="1", help="torch threads: an int, auto, or none (engine default)")
    args = parser.parse_args()

    adapter = args.adapter or (str(ROOT / "models" / "grpo") if (ROOT / "models/grpo/adapter_config.json").is_file()
                               else None)
    logs, datasets = templates(args.n, args.seed)
    from _live import base_model_dir

    base = base_model_dir()
    model = f"{base.name} + {adapter}" if adapter else base.name
    print(f"{len(logs)} templates, max_new_tokens={args.max_new_tokens}, batch={args.batch_size}, "
          f"dtype={args.dtype}, threads={args.threads or 'default'}, model={model}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    results, scores = {}, {}
    for name in args.engines.split(","):
        started = time.perf_counter()
        engine = open_engine(base, name, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             dtype=args.dtype, threads=None if args.threads == "none" else args.threads)
        opened = time.perf_counter() - started
        try:
            run = engine.classify(logs, datasets, adapter_dir=adapter)
            scored = engine.score(logs, datasets, adapter)
        finally:
            engine.close()
        results[name], scores[name] = run, scored
        valid = sum(p.valid for p in run.predictions)
        score_rate = len(logs) / max(scored.seconds, 1e-9)
        print(f"{name:>12}: {run.templates_per_s:7.3f} templates/s  ({run.seconds:.1f} s generating, "
              f"{opened + run.load_seconds:.1f} s start/load; {valid}/{len(logs)} format-valid); "
              f"score {score_rate:7.2f} templates/s = {score_rate / max(run.templates_per_s, 1e-9):.0f}x "
              f"generation ({sum(s is None for s in scored.scores)} unscored)", flush=True)
    if {"vllm", "transformers"} <= results.keys():
        v, t = results["vllm"], results["transformers"]
        agree = sum(a.label == b.label for a, b in zip(v.predictions, t.predictions, strict=True)) / len(logs)
        same = sum(a.completion == b.completion for a, b in zip(v.predictions, t.predictions, strict=True))
        print(f"vLLM / transformers: {v.templates_per_s / max(t.templates_per_s, 1e-9):.1f}x templates/s; "
              f"verdicts agree on {agree:.0%}, identical completions {same}/{len(logs)}")
        both = [(a, b) for a, b in zip(scores["vllm"].scores, scores["transformers"].scores, strict=True)
                if a is not None and b is not None]
        gap = max((abs(a - b) for a, b in both), default=float("nan"))
        print(f"scores: vLLM / transformers {scores['transformers'].seconds / max(scores['vllm'].seconds, 1e-9):.1f}x "
              f"faster; {len(both)}/{len(logs)} scored by both, largest difference {gap:.3f}")


if __name__ == "__main__":
    main()
