"""Prefect flow `train`: CoT-SFT → multi-reward GRPO, each through DVC, ending in a readable summary."""

from __future__ import annotations

import base64
from typing import Any

from prefect import flow, task

from flows.common import pipeline_lock, publish_markdown, read_json, run_stages, stages_table, start_run
from tasks.common.config import repo_root

TRAIN_STAGES = ["sft", "grpo"]


def reward_summary_markdown(results: list[dict[str, Any]]) -> str:
    """Steps, wall time and reward per component (first → last step), plus the reward curve."""
    sft, grpo = read_json("reports/sft.json"), read_json("reports/grpo.json")
    lines = ["# Training", "", stages_table(results), "", "| stage | steps | wall time (s) |", "|---|---|---|"]
    for name, report in (("sft", sft), ("grpo", grpo)):
        lines.append(f"| {name} | {report.get('steps', '?')} | {report.get('wall_time_s', '?')} |")
    first, last = grpo.get("first_rewards") or {}, grpo.get("final_rewards") or {}
    if last:
        lines += ["", "## GRPO reward by component", "", "| component | first step | last step |", "|---|---|---|"]
        lines += [f"| {key} | {first.get(key, float('nan')):.3f} | {value:.3f} |" for key, value in last.items()]
    curve = repo_root() / "reports" / "grpo_rewards.png"
    if curve.exists():
        encoded = base64.b64encode(curve.read_bytes()).decode()
        lines += ["", "## Reward curve", "", f"![reward curve](data:image/png;base64,{encoded})"]
    return "\n".join(lines)


@task(name="publish-training-summary")
def publish_training_summary(results: list[dict[str, Any]]) -> str:
    """Publish the training summary (steps, time, rewards, reward curve) as a Prefect artifact."""
    markdown = reward_summary_markdown(results)
    publish_markdown("training-summary", markdown, "SFT and GRPO: steps, time, rewards")
    return markdown


@flow(name="train", log_prints=True)
def train_flow(profile: str | None = None) -> list[dict[str, Any]]:
    """sft → grpo (DVC skips what has not changed), then the training summary artifact."""
    with pipeline_lock():
        start_run(profile)
        results = run_stages(TRAIN_STAGES)
        publish_training_summary(results)
    return results


if __name__ == "__main__":
    train_flow()
