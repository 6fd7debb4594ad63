"""Which torch thread rule keeps the SFT stage fast when another process holds a core? (issue 22, item 6)

    .venv/bin/python bench/threads.py [--steps 2] [--warmup 0] [--rounds 1]
        [--rules chosen,auto_old,all,all_passive,one] [--conditions quiet,busy,busy_at_start]

Runs a fixed, short piece of the real sft stage (tasks.sft.prepare_sft: the default profile's model, LoRA,
batch and max_length; `--steps` timed optimizer steps after `--warmup` untimed ones: the first step was not
slower here) under each thread rule, each on a quiet machine and with one busy background core, and prints the
median seconds per step as ratios against the baseline: the chosen rule (`chosen` = params.yaml's
`sft.torch_threads` applied by tasks.training.model.set_torch_threads) on a quiet machine, run first in the
same invocation. `--rounds` repeats the whole plan (figures are medians over rounds). The default plan is 11
configurations of ~40-60 s each on 2 cores (~10 minutes).

Conditions (the busy core is a bounded one-thread busy loop this bench starts and stops itself):
  quiet          nothing of ours besides the training
  busy           the busy loop runs from before the rule is applied until the last step
  busy_at_start  the busy loop runs while the rule is applied, and stops before the first step (the field
                 case of issue 22: light background work at the stage's start); only for rules that look at
                 the machine (for the others it is the quiet run)

Rules (each configuration is a fresh process: torch's thread pool and OpenMP's environment are fixed at start):
  chosen       params.yaml's setting, applied by the project's own code (run the bench before and after a change)
  auto_old     one thread per core idle during a 1 s psutil sample at the start (the rule before issue 22)
  all          one thread per core (torch's own default), OpenMP's default wait policy
  all_passive  one thread per core, OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)
  all_bind     one thread per core, passive, each thread pinned to its core (OMP_PROC_BIND=close, places=cores)
  over_passive one thread more than cores, passive (a larger share of the CPU against a busy neighbour)
  one          one thread
(all_bind and over_passive run only when named in --rules.)

Only `chosen` gets the project's wait policy (tasks.training.model.set_torch_threads); every other rule runs
with the OpenMP environment listed above and, without OMP_WAIT_POLICY, OpenMP's default (threads spin ~3 ms at
each barrier before sleeping), as every stage did before issue 22. Each row prints the spin count OpenMP read
(OMP_DISPLAY_ENV): 0 = passive, 300000 = the default.

Other engineers may share this machine: every row prints the 1-minute load average before the configuration
started (before our own busy loop) and after it, so a noisy figure can be told from a slow rule. CPU s/step
is the CPU time of all the training process's threads (spinning OpenMP threads count).
Records: data/sft/train.jsonl when the pipeline made it, else real BGL templates (the data mirror) with three
real neighbours each, half explain and half verdict examples, like the distilled data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES: dict[str, dict[str, str]] = {  # rule -> the OpenMP environment its process starts with
    "chosen": {},
    "auto_old": {},
    "all": {},
    "all_passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "all_bind": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "over_passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one": {},
}
DEFAULT_RULES = ("chosen", "auto_old", "all", "all_passive", "one")
LOOKS_AT_MACHINE = {"auto_old"}  # rules whose thread count depends on the machine at the start
CONDITIONS = ("quiet", "busy", "busy_at_start")
OMP_VARS = ("OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_DYNAMIC")
BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


# ---- child: one configuration -----------------------------------------------------------------------------------


def old_auto_threads() -> int:
    """The `auto` rule before issue 22: one thread per core idle during a 1-second sample, at least one."""
    import psutil

    cores = os.cpu_count() or 1
    busy_cores = psutil.cpu_percent(interval=1.0) / 100.0 * cores
    return max(1, min(cores, round(cores - busy_cores)))


def rule_setting(rule: str, project_setting: Any) -> Any:
    """The `torch_threads` value the stage gets under `rule` (prepare_sft applies it with set_torch_threads)."""
    cores = os.cpu_count() or 1
    if rule == "auto_old":
        return old_auto_threads()
    return {"chosen": project_setting, "one": 1, "over_passive": cores + 1}.get(rule, cores)


def bench_records(work: Path, n: int = 64) -> Path:
    """data/sft/train.jsonl when it exists; else `n` real BGL templates with three real neighbours each, half
    as explain examples (a rationale of ~60 tokens) and half as verdict examples, like the distilled mix."""
    real = ROOT / "data" / "sft" / "train.jsonl"
    if real.exists():
        return real
    import pandas as pd

    from tasks.common.prompt import EXPLAIN, VERDICT, training_messages

    mirror = Path(os.environ.get("RATIONANOMALY_MIRROR", ROOT.parent / "shared" / "data"))
    frame = pd.read_csv(mirror / "logprompt" / "templates_bgl.csv", keep_default_na=False)
    frame = frame[frame["log"].str.len() < 200].sample(n + 3, random_state=0).reset_index(drop=True)
    path = work / "train.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            log, label = frame.loc[i, "log"], int(frame.loc[i, "label"])
            neighbours = [(frame.loc[j, "log"], int(frame.loc[j, "label"])) for j in (i + 1, i + 2, i + 3)]
            word = next((w for w in log.split() if w.isalpha()), "the component")
            rationale = (
                f"Domain: {word} messages come from BGL system software. Core: the log says \"{log[:60]}\". "
                f"Deduction: {'a failure an operator must act on' if label else 'routine status output'}, "
                f"as the wording and the neighbours' labels show."
            )
            task = EXPLAIN if i % 2 == 0 else VERDICT
            messages = training_messages(log, rationale, label, "BGL", neighbours=neighbours, task=task)
            handle.write(json.dumps({"messages": messages, "template": log, "label": label, "task": task}) + "\n")
    return path


def busy_core(seconds: float) -> subprocess.Popen:
    """A one-thread busy loop in its own process that ends by itself after `seconds` (or when stopped)."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds)])


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


def step_timer() -> Any:
    """A Trainer callback that records wall and CPU seconds (all threads) of every optimizer step (imported late:
    transformers loads torch, which must come after the rule under test)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self._start = self._cpu = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._start, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu)

    return StepTimer()


def run_child(rule: str, condition: str, steps: int, warmup: int, busy_limit_s: float) -> dict[str, Any]:
    """One configuration in this (fresh) process; returns its figures."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    os.environ.update(RATIONANOMALY_ROOT=str(work), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
                      HF_HUB_OFFLINE="1")
    from _live import base_model_dir

    from tasks.common.settings import load_settings
    from tasks.sft import prepare_sft

    load_before = os.getloadavg()[0]
    data, base = bench_records(work), base_model_dir()
    params = load_settings(ROOT / "params.yaml", profile="default").sft
    busy = busy_core(busy_limit_s) if condition in ("busy", "busy_at_start") else None
    try:
        if busy is not None:
            time.sleep(1.5)  # the loop is running (and counted by a CPU sample) before the rule looks
        setting = rule_setting(rule, params.torch_threads)
        if rule != "chosen" and "OMP_WAIT_POLICY" not in os.environ:
            import warnings

            import torch  # loaded before the rule, as before issue 22: OpenMP's default (spinning) policy

            warnings.filterwarnings("ignore", "torch was loaded before the thread rule", RuntimeWarning)
        sft = params.model_copy(update={
            "data_file": str(data), "base_model_dir": str(base), "max_steps": warmup + steps, "save_steps": 10_000,
            "logging_steps": 1, "keep_checkpoints": False, "resume": False, "torch_threads": setting,
            "out_dir": str(work / "sft"), "checkpoint_dir": str(work / "ckpt"), "report_file": str(work / "r.json"),
        })
        prep = prepare_sft(sft)
        if condition == "busy_at_start":
            stop(busy)
        import torch  # loaded by prepare_sft, after the rule (OpenMP reads its environment as torch loads)

        timer = step_timer()
        prep.trainer.add_callback(timer)
        train_started = time.monotonic()
        prep.trainer.train()
        train_s = time.monotonic() - train_started
    finally:
        stop(busy)
    shutil.rmtree(work, ignore_errors=True)
    timed, cpu = timer.times[warmup:], timer.cpu[warmup:]
    lengths = [len(x["input_ids"]) for x in prep.trainer.train_dataset]
    return {"rule": rule, "condition": condition, "setting": setting, "threads": torch.get_num_threads(),
            "omp": {k: os.environ[k] for k in OMP_VARS if k in os.environ},
            "s_per_step": statistics.median(timed), "cpu_s_per_step": statistics.median(cpu),
            "steps_s": [round(t, 2) for t in timer.times], "load_before": load_before,
            "load_after": os.getloadavg()[0], "setup_s": train_started - started, "train_s": train_s,
            "median_tokens": statistics.median(lengths),
            "batch": sft.per_device_train_batch_size,
            "data": str(data) if data.parent != work else "mirror BGL templates, 3 neighbours, explain+verdict"}


# ---- parent: every configuration in its own process --------------------------------------------------------------


def configurations(rules: list[str], conditions: list[str], baseline: str) -> list[tuple[str, str]]:
    """(rule, condition) in run order: the baseline (quiet) first, busy_at_start only where the rule looks."""
    plan = [(baseline, "quiet")]
    for rule in rules:
        for condition in conditions:
            if condition == "busy_at_start" and rule not in LOOKS_AT_MACHINE:
                continue
            if (rule, condition) not in plan:
                plan.append((rule, condition))
    return plan


def run_configuration(rule: str, condition: str, steps: int, warmup: int, timeout_s: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS} | RULES[rule] | {"OMP_DISPLAY_ENV": "VERBOSE"}
    cmd = [sys.executable, __file__, "--child", rule, condition, "--steps", str(steps), "--warmup", str(warmup),
           "--busy-limit", str(timeout_s)]
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{rule}/{condition} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)  # what OpenMP read as torch loaded
    return json.loads(lines[-1][len("RESULT "):]) | {"wall_s": time.monotonic() - started,
                                                     "spincount": spin.group(1) if spin else "?"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed SFT steps per configuration (the size)")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole plan runs (medians over rounds)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed SFT steps before them")
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES), help=f"of {', '.join(RULES)}")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--baseline", default="chosen", choices=list(RULES))
    parser.add_argument("--timeout", type=float, default=900, help="seconds one configuration may take")
    parser.add_argument("--child", nargs=2, metavar=("RULE", "CONDITION"), help=argparse.SUPPRESS)
    parser.add_argument("--busy-limit", type=float, default=900, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_child(*args.child, args.steps, args.warmup, args.busy_limit)
        print("RESULT " + json.dumps(result), flush=True)
        return

    rules = [r for r in args.rules.split(",") if r]
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = sorted(set(rules) - set(RULES)) + sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        parser.error(f"unknown rule or condition {unknown}; rules {list(RULES)}, conditions {list(CONDITIONS)}")
    plan = configurations(rules, conditions, args.baseline)
    from _live import base_model_dir

    base_model_dir()  # made once here (it loads torch), not in a child where torch must load after the rule
    print(f"{os.cpu_count()} CPUs; {args.rounds} x {len(plan)} configurations of {args.warmup}+{args.steps} SFT "
          f"steps each; load average now {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_no in range(args.rounds):
        for rule, condition in plan:
            r = run_configuration(rule, condition, args.steps, args.warmup, args.timeout)
            results.setdefault((rule, condition), []).append(r)
            if len(results) == 1 and round_no == 0:
                print(f"baseline {rule}/quiet: batch {r['batch']}, median {r['median_tokens']:.0f} tokens/example, "
                      f"data {r['data']}\n{HEADER}", flush=True)
            print(row(r, median_step(results[plan[0]])), flush=True)

    base = median_step(results[plan[0]])
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds:\n{HEADER}")
        for key in plan:
            runs = results[key]
            print(row(runs[0] | {"s_per_step": median_step(runs), "steps_s": [round(r["s_per_step"], 2) for r in runs],
                                 "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in runs)}, base))
    print("\nbusy / quiet per rule (issue 22 asks <= 1.3 under one busy core; loads are 1-minute load averages "
          "before each run):")
    for rule in rules:
        quiet = results.get((rule, "quiet"))
        for condition in ("busy", "busy_at_start"):
            other = results.get((rule, condition))
            if quiet and other:
                loads = ", ".join(f"{r['load_before']:.2f}" for r in quiet), ", ".join(
                    f"{r['load_before']:.2f}" for r in other)
                print(f"  {rule:<13}{condition:<15}{median_step(other) / median_step(quiet):>6.2f}  "
                      f"(load avg: quiet {loads[0]}; {condition} {loads[1]})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


HEADER = (f"{'rule':<13}{'condition':<15}{'threads':>8}{'s/step':>9}{'x base':>8}{'CPU s/step':>11}"
          f"{'load avg before->after':>24}  steps (s)")


def median_step(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["s_per_step"] for r in runs)


def row(r: dict[str, Any], base: float) -> str:
    """One configuration's line: threads, s/step, ratio to the baseline, CPU s/step, load averages, steps."""
    return (f"{r['rule']:<13}{r['condition']:<15}{r['threads']:>8}{r['s_per_step']:>9.2f}{r['s_per_step'] / base:>8.2f}"
            f"{r['cpu_s_per_step']:>11.2f}{r['load_before']:>14.2f} -> {r['load_after']:<6.2f}  "
            f"{r['steps_s']} ({r['wall_s']:.0f} s, OpenMP spin count {r['spincount']}, "
            f"{r['omp'] or 'no OMP_ variables'})")

if __name__ == "__main__":
    main()
