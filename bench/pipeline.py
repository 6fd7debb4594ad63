"""Wall time of a full retrain run per stage, then of a second run with nothing changed (goal: ≤ 5 %).

Runs in a throwaway copy of the project so the working tree is untouched:
    .venv/bin/python bench/pipeline.py [--profile default|smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workspace import copy_project  # noqa: E402


def run_retrain(project: Path) -> tuple[float, dict]:
    """One `retrain` in its own process (as a user runs it); returns wall seconds and the flow result."""
    code = (
        "import json,sys; from flows.retrain import retrain_flow; r = retrain_flow();"
        "json.dump({'stages': r['stages']}, open('bench_result.json','w'))"
    )
    start = time.monotonic()
    env = {**os.environ, "RATIONANOMALY_ROOT": str(project)}
    subprocess.run([sys.executable, "-c", code], cwd=project, check=True, env=env)
    return time.monotonic() - start, json.loads((project / "bench_result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rationanomaly-bench-") as tmp:
        project = copy_project(REPO, Path(tmp) / "project", profile=args.profile)
        first, result = run_retrain(project)
        second, again = run_retrain(project)
        subprocess.run([sys.executable, "-m", "rationanomaly.cli", "serve", "--stop"], cwd=project, check=False)
    print(f"\nprofile: {args.profile}")
    print(f"{'stage':<12} {'first run (s)':>14} {'second run (s)':>15}")
    seconds_again = {s["stage"]: s for s in again["stages"]}
    for stage in result["stages"]:
        rerun = seconds_again.get(stage["stage"], {})
        print(f"{stage['stage']:<12} {stage['seconds']:>14.1f} {rerun.get('seconds', float('nan')):>15.1f}"
              f"{'' if not rerun.get('ran') else '  (ran again!)'}")
    print(f"full run: {first:.1f} s   unchanged re-run: {second:.1f} s   ratio: {second / first:.1%} (goal ≤ 5%)")


if __name__ == "__main__":
    main()
