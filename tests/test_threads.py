"""The training thread rule (issue 22, item 6): one thread per available core, idle OpenMP threads asleep, whatever
the neighbours do at the stage's start. bench/threads.py measures the candidate rules."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.common.config import resolve_threads
from tasks.common.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (torch and OpenMP not loaded yet), from the project folder."""
    # vLLM imported in-process by an earlier test sets LD_PRELOAD (torch's libgomp, tcmalloc) and LOCAL_WORLD_SIZE in
    # os.environ: a preloaded libgomp reads its wait policy before any code runs, so drop what it left behind
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("OMP_", "GOMP_")) and k not in ("LD_PRELOAD", "LOCAL_WORLD_SIZE")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **(env or {})})


def spin_count(stderr: str) -> str:
    """The spin count OpenMP read as torch loaded it (OMP_DISPLAY_ENV): 0 = idle threads sleep at once."""
    line = next((x for x in stderr.splitlines() if "GOMP_SPINCOUNT" in x), None)
    assert line is not None, f"OpenMP never loaded:\n{stderr[-2000:]}"
    return line.split("=", 1)[1].strip().strip("'")


@pytest.fixture
def busy_core() -> Iterator[None]:
    """One core kept busy by a one-thread busy loop in its own process (it ends by itself after 60 s)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, "60"])
    time.sleep(0.5)
    yield
    proc.terminate()
    proc.wait(timeout=10)


def test_training_threads_do_not_depend_on_a_busy_core_at_the_start(busy_core: None) -> None:
    # issue 22: `auto` sampled idle cores once, at the start, and a busy moment gave the whole SFT stage one thread
    cores = len(os.sched_getaffinity(0))
    for profile in ("smoke", "default", "gpu"):
        settings = load_settings(REPO / "params.yaml", profile=profile)
        for stage in ("sft", "grpo"):
            threads = resolve_threads(getattr(settings, stage).torch_threads)
            assert threads == cores, f"{profile}.{stage}: {threads} threads on {cores} cores with one core busy"


def test_cores_are_those_the_process_may_use_shared_among_local_data_parallel_processes() -> None:
    code = ("import os; from tasks.common.config import resolve_threads\n"
            "print(resolve_threads('cores'))\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(resolve_threads('cores'))")
    cores = len(os.sched_getaffinity(0))
    alone, pinned = python(code).stdout.split()
    shared = python(code, env={"LOCAL_WORLD_SIZE": "2"}).stdout.split()[0]
    assert (int(alone), int(pinned), int(shared)) == (cores, 1, max(1, cores // 2))


@pytest.mark.parametrize(("policy", "expected"), [(None, "0"), ("ACTIVE", "30000000000")])
def test_the_thread_rule_makes_idle_openmp_threads_sleep_unless_the_environment_names_a_policy(policy, expected):
    done = python("from tasks.training.model import set_torch_threads; print(set_torch_threads(1))",
                  env={"OMP_WAIT_POLICY": policy} if policy else None)
    assert done.returncode == 0, done.stderr[-2000:]
    assert spin_count(done.stderr) == expected


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_training_stage_sets_the_wait_policy_before_it_loads_torch(tmp_path: Path, stage: str) -> None:
    # OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the stage must apply the rule before any torch import
    # (two spinning threads took 19-44 s per SFT step against 10-11 s passive on this shared machine, bench/threads.py)
    code = (
        "import importlib, sys\nfrom pathlib import Path\nfrom tasks.common.errors import InputError\n"
        "from tasks.common.settings import load_settings\nstage, data = sys.argv[1:]\n"
        "settings = getattr(load_settings(Path('params.yaml')), stage).model_copy(update={'data_file': data})\n"
        "try:\n    getattr(importlib.import_module(f'tasks.{stage}'), f'prepare_{stage}')(settings)\n"
        "except InputError as exc:\n    print('refused:', exc)\n"
    )
    done = python(code, stage, str(tmp_path / "missing.jsonl"))
    assert "refused:" in done.stdout, done.stderr[-2000:]
    assert spin_count(done.stderr) == "0"
