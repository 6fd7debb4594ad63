"""Lineage on a temporary registry, both directions, as an auditor reads it (API and CLI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_world import MD5, REPO, World, build_world, candidate_metrics, env_for, make_adapter, release
from typer.testing import CliRunner

from rationanomaly.cli import app
from tasks.release.lineage import LineageError, lineage, lineage_by_data, parse_ref

BGL_SHA = "bdd8c62f45ce953f7f5b27b54c5c1c812c6fbc3ca7018e1234f2a33e72d9f6de"  # templates_bgl.csv in sources.yaml


@pytest.fixture(scope="module")
def world(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    adapters = tmp_path_factory.mktemp("adapters")
    make_adapter(base_model_dir, adapters / "sft", seed=1)
    make_adapter(base_model_dir, adapters / "grpo", seed=2)
    root = tmp_path_factory.mktemp("lineage") / "project"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env_for(root).items():
            mp.setenv(key, value)
        root.mkdir()
        mp.chdir(root)
        w = build_world(root, base_model_dir, adapters)
        release(w, "rationanomaly", candidate_metrics(0.6, 0.5), approver="alice", reason="first model")
        release(w, "rationanomaly", candidate_metrics(0.7, 0.6), approver="erin", reason="better on both")
        yield w


def test_champion_lineage_walks_back_to_data_corrections_base_model_code_and_gate(world: World) -> None:
    chain = lineage("rationanomaly@champion")
    assert chain["model"]["version"] == "2" and chain["model"]["aliases"] == ["challenger", "champion"]
    runs = chain["runs"]
    assert runs["sft"]["run_id"] == world.runs["sft"] and runs["sft"]["params"]["max_steps"] == "6"
    assert runs["grpo"]["run_id"] == world.runs["grpo"] and runs["grpo"]["metrics"]["reward"] == 0.5
    assert runs["evaluate"]["run_id"] and runs["register"]["status"] == "FINISHED"
    data = {d["name"]: d for d in chain["data"]}
    assert {n: d["md5"] for n, d in data.items()} == world.md5
    sources = {s["name"]: s for s in data["raw"]["sources"]}
    assert sources["logprompt/templates_bgl.csv"]["sha256"] == BGL_SHA
    assert sources["logprompt/templates_bgl.csv"]["url"].startswith("https://raw.githubusercontent.com/lunyiliu/")
    c = chain["corrections"]
    assert (c["applied"], c["matched_normalized"], c["review_queue_size"]) == (225, 1, 2)
    assert c["file"] == "data/raw/rationanomaly/anomaly_patch.json" and len(c["file_sha256"]) == 64
    base = json.loads((world.base / "base_model.json").read_text())
    assert chain["base_model"]["sha256"] == base["weights_sha256"]
    assert len(chain["code"]["commit"]) == 40
    assert chain["params"]["sha256"] and chain["params"]["values"]["sft"]["max_steps"]
    gate = chain["gate"]
    assert gate["passed"] and gate["champion_version_at_gate"] == "1"
    assert (gate["approver"], gate["approval_reason"]) == ("erin", "better on both")
    assert {r["name"] for r in gate["rules"]} >= {"min_f1.template_bgl", "champion_margin"}


def test_lineage_by_version_number_and_models_uri(world: World) -> None:
    assert lineage("rationanomaly/1")["gate"]["approver"] == "alice"
    assert lineage("models:/rationanomaly@previous")["model"]["version"] == "1"


def test_reverse_lineage_lists_every_version_trained_on_a_data_hash(world: World) -> None:
    hits = lineage_by_data(MD5["split"])
    assert [(h["version"], h["matched"]) for h in hits] == [("1", ["data.split.md5"]), ("2", ["data.split.md5"])]
    assert hits[1]["aliases"] == ["challenger", "champion"]
    by_source = lineage_by_data(BGL_SHA[:12].upper())  # a prefix of a raw file's sha256, any case
    assert [h["version"] for h in by_source] == ["1", "2"]
    assert by_source[0]["matched"] == ["data.sources.sha256[logprompt/templates_bgl.csv]"]


def test_unknown_model_alias_version_or_hash_is_said_plainly(world: World) -> None:
    with pytest.raises(LineageError, match=r"no registered model named 'nope'.*registered: rationanomaly"):
        lineage("nope@champion")
    with pytest.raises(LineageError, match=r"has no alias @staging \(aliases: @challenger→v2, @champion→v2, "
                                           r"@previous→v1\)"):
        lineage("rationanomaly@staging")
    with pytest.raises(LineageError, match="has no version '9'"):
        lineage("rationanomaly/9")
    with pytest.raises(LineageError, match="no registered model version was trained on data with hash 'abcdef12'"):
        lineage_by_data("abcdef12")
    with pytest.raises(LineageError, match="too short"):
        lineage_by_data("ab")
    with pytest.raises(LineageError, match="not '<name>@<alias>'"):
        parse_ref("rationanomaly")


def test_cli_prints_the_tree_and_json_and_the_reverse_table(world: World) -> None:
    runner = CliRunner()
    tree = runner.invoke(app, ["lineage", "rationanomaly@champion"], terminal_width=200)
    assert tree.exit_code == 0, tree.output
    for needle in ("rationanomaly v2", "@champion", "MLflow runs", world.runs["sft"], "corrections applied 225",
                   "review queue 2", BGL_SHA, "base model", "code commit", "gate passed", "approver: erin"):
        assert needle in tree.output
    as_json = runner.invoke(app, ["lineage", "rationanomaly@champion", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["model"]["version"] == "2"
    reverse = runner.invoke(app, ["lineage", "--data", MD5["corrected"], "--json"])
    assert [h["version"] for h in json.loads(reverse.output)] == ["1", "2"]
    table = runner.invoke(app, ["lineage", "--data", MD5["corrected"]], terminal_width=200)
    assert table.exit_code == 0 and "data.corrected.md5" in table.output


def test_cli_unknown_reference_exits_non_zero_with_the_reason(world: World) -> None:
    result = CliRunner().invoke(app, ["lineage", "ghost@champion"])
    assert result.exit_code == 1 and "no registered model named 'ghost'" in result.output
    both = CliRunner().invoke(app, ["lineage"])
    assert both.exit_code != 0


def test_cli_rollback_records_the_actor_and_reason(world: World) -> None:
    release(world, "rb", candidate_metrics(0.6, 0.5))
    release(world, "rb", candidate_metrics(0.7, 0.6))
    params = world.root / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("model_name: rationanomaly", "model_name: rb"))
    try:
        result = CliRunner().invoke(app, ["rollback", "--actor", "frank", "--reason", "latency"])
        assert result.exit_code == 0, result.output
        assert "@champion → v1 (was v2)" in result.output
        assert lineage("rb/2")["gate"]["rolled_back_by"] == "frank"
        again = CliRunner().invoke(app, ["rollback", "--actor", "frank", "--reason", "again"])
        assert again.exit_code == 1 and "no @previous version" in again.output
    finally:
        params.write_text(original)


def test_git_dirty_describes_code_and_configuration_not_the_runs_outputs(tmp_path: Path) -> None:
    """Issue 22, item 7: every run rewrites dvc.lock (and, with --profile, the profile line of params.yaml)."""
    import subprocess

    from tasks.release.lineage import git_state, lineage_tags

    repo = tmp_path / "clone"
    for name in ("dvc.yaml", "params.yaml", "tasks/sft.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((REPO / name).read_bytes())
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    env = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b",
           "PATH": "/usr/bin:/bin"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env)
    assert git_state(repo)["dirty"] is False
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {sft: {outs: []}}\n")  # what every run does
    params = repo / "params.yaml"
    committed = params.read_text()
    params.write_text(committed.replace("profile: default", "profile: smoke", 1))  # `--profile smoke`
    state = git_state(repo)
    assert state["dirty"] is False
    assert (state["modified"], state["outputs_changed"]) == ([], ["dvc.lock"])
    record = {"params": {"sha256": "x"}, "base_model": {}, "code": state}
    assert lineage_tags(record)["git.dirty"] == "false" and "git.modified" not in lineage_tags(record)
    params.write_text(committed.replace("profile: default", "profile: smoke", 1).replace("seed: 42", "seed: 7", 1))
    (repo / "tasks/sft.py").write_text((repo / "tasks/sft.py").read_text() + "\n# edited\n")
    state = git_state(repo)
    assert (state["dirty"], state["modified"]) == (True, ["params.yaml", "tasks/sft.py"])
    tags = lineage_tags({**record, "code": state})
    assert tags["git.dirty"] == "true" and tags["git.modified"] == "params.yaml,tasks/sft.py"
