"""Benchmark of the training stages on the default profile's settings: printed, not asserted.

Prints seconds per SFT step and per GRPO step (median over a few steps, the first one excluded as warm-up),
GRPO generation throughput (generated tokens per second inside trl's `generate` calls) and peak RSS.
Everything runs in a temporary folder (own MLflow store); the project's outputs are not touched.

    .venv/bin/python bench/training.py [--sft-steps 6] [--grpo-steps 3] [--profile default]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _live import base_model_dir  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tasks.common.settings import Settings, load_settings  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time and CPU time (all threads) of every optimizer step.

    On a shared machine wall time depends on the neighbours; CPU time is what the step costs.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._start = self._cpu = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu)


def profile_params(profile: str) -> Settings:
    """The project's settings on `profile`."""
    return load_settings(REPO / "params.yaml", profile=profile)


def bench_data(work: Path, n: int = 64) -> Path:
    """data/sft/train.jsonl when the pipeline made it; else short rationales for real BGL templates (the mirror)."""
    real = REPO / "data" / "sft" / "train.jsonl"
    if real.exists():
        return real
    import pandas as pd

    from tasks.common.prompt import training_messages

    mirror = Path(os.environ.get("RATIONANOMALY_MIRROR", REPO.parent / "shared" / "data"))
    frame = pd.read_csv(mirror / "logprompt" / "templates_bgl.csv", keep_default_na=False).sample(n, random_state=0)
    path = work / "train.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for log, label in zip(frame["log"], frame["label"], strict=True):
            word = next((w for w in log.split() if w.isalpha()), "the component")
            rationale = (
                f'Domain: {word} messages come from BGL system software. Core: the log says "{log[:60]}". '
                f"Deduction: {'a failure that needs action' if label else 'routine status output'}."
            )
            messages = training_messages(log, rationale, label, "BGL")
            handle.write(
                json.dumps({"messages": messages, "template": log, "label": int(label), "rationale": rationale}) + "\n"
            )
    return path


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--sft-steps", type=int, default=6)
    parser.add_argument("--grpo-steps", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    os.environ.update(
        RATIONANOMALY_ROOT=str(work), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", HF_HUB_OFFLINE="1"
    )
    params = profile_params(args.profile)
    data, base = bench_data(work), base_model_dir()
    common = {
        "data_file": str(data),
        "base_model_dir": str(base),
        "save_steps": 10_000,
        "logging_steps": 1,
        "keep_checkpoints": False,
        "resume": False,
    }

    from tasks.grpo import prepare_grpo
    from tasks.sft import prepare_sft

    sft = params.sft.model_copy(update={
        **common,
        "max_steps": args.sft_steps,
        "out_dir": str(work / "sft"),
        "checkpoint_dir": str(work / "ckpt-sft"),
    })
    prep = prepare_sft(sft)
    timer = StepTimer()
    prep.trainer.add_callback(timer)
    prep.trainer.train()
    prep.trainer.save_model(str(work / "sft"))
    sft_times, sft_cpu = timer.times, median_after_warmup(timer.cpu)
    sft_step = median_after_warmup(sft_times)

    grpo = params.grpo.model_copy(update={
        **common,
        "max_steps": args.grpo_steps,
        "sft_adapter_dir": str(work / "sft"),
        "out_dir": str(work / "grpo"),
        "checkpoint_dir": str(work / "ckpt-grpo"),
    })
    gprep = prepare_grpo(grpo)
    timer = StepTimer()
    gprep.trainer.add_callback(timer)
    model, tokenizer = gprep.trainer.model, gprep.trainer.processing_class
    generated: list[tuple[int, float]] = []
    original_generate = model.generate

    def timed_generate(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = original_generate(*a, **kw)
        new = out[:, kw["input_ids"].shape[1] :]
        tokens = int((new != tokenizer.pad_token_id).sum())
        generated.append((tokens, time.perf_counter() - start))
        return out

    model.generate = timed_generate
    gprep.trainer.train()
    grpo_times, grpo_cpu = timer.times, median_after_warmup(timer.cpu)
    grpo_step = median_after_warmup(grpo_times)
    gen_tokens, gen_time = sum(t for t, _ in generated), sum(s for _, s in generated)

    import torch

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s, g = params.sft.model_dump(), params.grpo.model_dump()
    print(
        f"profile {args.profile}: base model {base}, data {data} ({len(prep.trainer.train_dataset)} SFT examples), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"torch threads {torch.get_num_threads()}; CPU s/step = CPU time of all threads (what a step costs)")
    print(
        f"SFT : {sft_step:6.2f} s/step wall, {sft_cpu:6.2f} CPU  "
        f"(batch {s['per_device_train_batch_size']}, max_length {s['max_length']}; "
        f"steps timed {[round(t, 1) for t in sft_times]}) -> "
        f"{s['max_steps']} steps ≈ {sft_step * s['max_steps'] / 60:.1f} min"
    )
    print(
        f"GRPO: {grpo_step:6.2f} s/step wall, {grpo_cpu:6.2f} CPU  "
        f"({g['per_device_train_batch_size']} completions of ≤"
        f"{g['max_completion_length']} tokens, {g['num_generations']} per prompt; "
        f"timed {[round(t, 1) for t in grpo_times]}) -> "
        f"{g['max_steps']} steps ≈ {grpo_step * g['max_steps'] / 60:.1f} min"
    )
    print(
        f"GRPO generation: {gen_tokens / gen_time:6.1f} tokens/s ({gen_tokens} tokens in {gen_time:.1f} s, "
        f"{gen_time / max(1e-9, sum(grpo_times)) * 100:.0f}% of step time)"
    )
    print(f"peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
