"""The release flow after its evaluate stage, in a real project (issue 22): `rationanomaly gate` judges exactly
what the flow judged (item 5), and a retried `register` finds the version it made (item 3).

A real project copy on the default profile, real LoRA adapters, a real SQLite MLflow registry and the release
flow's own code after its evaluate stage (`release_evaluated`) run as a real Prefect flow; the command runs as a
user runs it, in a subprocess. Right after a release the command used to judge the new champion against itself
without the candidate's per-item predictions and fail `champion_margin` (exit 1) while the flow had passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_world import World, env_for, make_adapter, world_in

from tasks.common.config import set_profile

REPO = Path(__file__).resolve().parents[1]
GATED = ("template_bgl", "template_spirit", "served_bgl2k_lines_corrected")  # the default profile's min_f1 sets
DIGESTS = {name: f"digest-{name}" for name in (*GATED, "served_thunderbird_templates")}


def candidate(caught: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json and candidate_predictions.json as tasks.evaluate writes them: on each gated set 100 anomalies
    and 300 normal items, the first `caught` anomalies flagged and no false alarm (a higher `caught` catches a
    superset: a paired gain)."""
    f1 = 2 * caught / (2 * caught + (100 - caught))
    block = {"f1": f1, "precision": 1.0, "recall": caught / 100, "format_valid_rate": 0.97}
    methods = {name: dict(block) for name in GATED}
    methods["served_thunderbird_templates"] = {"false_alarm_rate": 0.1}
    faithful = {"rationales": 50, "agrees": 1.0, "component_in_log": 1.0, "quotes_grounded": 1.0,
                "cited_neighbour_shown": 1.0, "false_no_failure_word": 0.0, "false_no_failure_word_count": 0}
    metrics = {"engine": "transformers", "candidate": "rationanomaly", "methods": {"rationanomaly": methods},
               "test_data": {"digests": DIGESTS}, "bootstrap": {"resamples": 500, "confidence": 0.95, "seed": 7},
               # rationales that pass the gate's faithfulness rules (tasks.evaluate.rationale_summary's shape)
               "rationales": {"policy": "abnormal", "pooled": {"shown": faithful, "all": faithful},
                              "sets": {name: {"shown": faithful, "all": faithful} for name in GATED}}}
    items = {name: {"ids": [str(i) for i in range(400)], "labels": [1] * 100 + [0] * 300,
                    "pred": [1] * caught + [0] * (100 - caught) + [0] * 300, "digest": DIGESTS[name]}
             for name in GATED}
    return metrics, items


@pytest.fixture(scope="module")
def adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    for name, seed in (("sft", 1), ("grpo", 2), ("grpo2", 3), ("grpo3", 4), ("grpo4", 5)):
        make_adapter(base_model_dir, out / name, seed=seed)
    return out


@pytest.fixture(scope="module")
def world(base_model_dir: Path, adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("gate-cli") / "project"
    with world_in(root, base_model_dir, adapters) as built:
        set_profile("default", root / "params.yaml")  # the profile `make run` uses: champion_margin 0.02
        (root / "models" / "base").mkdir(parents=True, exist_ok=True)  # base_model.out_dir, as the flow reads it
        for f in base_model_dir.iterdir():
            (root / "models" / "base" / f.name).symlink_to(f)
        if not (root / "models" / "index").exists():
            (root / "models" / "index").mkdir()
            (root / "models" / "index" / "index.json").write_text("{}")
        yield built


def set_candidate(world: World, caught: int, adapter: Path | None = None) -> None:
    """What the grpo and evaluate stages leave: the adapter with its md5 in dvc.lock (`dvc commit`, as `dvc repro`
    records it), metrics.json and candidate_predictions.json."""
    if adapter is not None:
        for f in adapter.iterdir():
            shutil.copy2(f, world.grpo / f.name)
    for placeholder in ("data/sft/train.jsonl", "reports/grpo.json", "reports/grpo_rewards.csv"):  # other grpo deps
        (world.root / placeholder).parent.mkdir(parents=True, exist_ok=True)
        (world.root / placeholder).touch()
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "commit", "--force", "grpo"], cwd=world.root,
                   check=True, capture_output=True)
    metrics, items = candidate(caught)
    (world.root / "reports" / "eval").mkdir(parents=True, exist_ok=True)
    (world.root / "reports" / "metrics.json").write_text(json.dumps(metrics))
    (world.root / "reports" / "eval" / "candidate_predictions.json").write_text(json.dumps(items))


def release(world: World) -> dict[str, Any]:
    """The release flow after its evaluate stage, as a real Prefect flow run."""
    from prefect import flow

    from flows.release import release_evaluated
    from tasks.common.settings import load_settings

    @flow(name="release-after-evaluate")
    def released() -> dict[str, Any]:
        return release_evaluated(load_settings(), [])

    return released()


def gate_command(world: World) -> tuple[int, dict[str, Any], str]:
    """`rationanomaly gate --json` in the project: exit code, verdict, stderr."""
    env = {**os.environ, **env_for(world.root)}
    proc = subprocess.run([sys.executable, "-m", "rationanomaly.cli", "gate", "--json"], cwd=world.root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_the_command_and_the_flow_give_one_verdict(world: World, adapters: Path) -> None:
    from tasks.release import registry

    # First candidate, no champion: the flow registers and promotes it.
    set_candidate(world, caught=60)
    first = release(world)
    assert first["promoted"] and first["verdict"]["passed"]
    assert registry.aliases("rationanomaly")["champion"] == first["version"]

    # Right after the release (the failed case): the command answers with the verdict the flow acted on.
    code, verdict, stderr = gate_command(world)
    assert (code, verdict) == (0, first["verdict"]), stderr[-3000:]
    assert f"already registered as version {first['version']} and @champion" in stderr

    # A better adapter: the command's verdict before the release is the one the flow then acts on.
    set_candidate(world, caught=90, adapter=adapters / "grpo2")
    code, verdict, _ = gate_command(world)
    second = release(world)
    assert (code, verdict) == (0, second["verdict"])
    assert second["promoted"] and verdict["champion_version"] == first["version"]
    margin = next(r for r in verdict["rules"] if r["name"] == "champion_margin")
    assert margin["passed"] and margin["interval"] is not None  # paired on the per-item predictions

    # A worse one: both refuse it, on the same rules.
    set_candidate(world, caught=40, adapter=adapters / "grpo3")
    code, verdict, _ = gate_command(world)
    third = release(world)
    assert (code, verdict) == (1, third["verdict"])
    assert not third["promoted"] and "champion_margin" in verdict["failed"]


def test_a_retried_register_returns_the_version_it_made(world: World, adapters: Path) -> None:
    """`register` is retried (a remote registry may time out); an attempt after one whose registration completed
    but whose answer was lost must not add a second version (crewAI issue 5802)."""
    from prefect import flow

    from flows import release
    from tasks.common.settings import load_settings
    from tasks.release import registry

    set_candidate(world, caught=95, adapter=adapters / "grpo4")
    before = {mv.version for mv in registry.client().search_model_versions("name='rationanomaly'")}

    @flow(name="register-retried")
    def registered_twice() -> tuple[str, str, str]:
        settings = load_settings()
        decided = release.judge(settings)
        args = (decided.metrics, decided.items, decided.verdict, decided.digest, settings, decided.judgement)
        first = release.register(*args)
        again = release.register.fn(*args)  # what a retry of that task runs, in the same flow run
        return first, again, str(release.FlowRunContext.get().flow_run.id)

    first, again, run_id = registered_twice()
    added = [mv for mv in registry.client().search_model_versions("name='rationanomaly'") if mv.version not in before]
    assert first == again and [str(mv.version) for mv in added] == [first]
    assert dict(added[0].tags)[release.RUN_TAG] == run_id


def test_register_is_not_retried_for_damaged_or_bad_input_but_is_for_a_registry_failure() -> None:
    from prefect.states import Failed

    from flows.release import _transient, register
    from tasks.common.integrity import IntegrityError
    from tasks.release.registry import RegistryUnavailable

    assert register.retry_condition_fn is _transient
    damaged = Failed(data=IntegrityError("models/grpo/adapter_model.safetensors", "md5 differs from dvc.lock"))
    assert not _transient(register, None, damaged)
    assert _transient(register, None, Failed(data=RegistryUnavailable("mlflow server timed out")))
