"""The model registry end to end on a temporary SQLite registry: champion, challenger, previous, rollback."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_world import (
    RATIONALE_RULES_OFF,
    World,
    candidate_metrics,
    env_for,
    make_adapter,
    register_kwargs,
    release,
    world_in,
)

from tasks.common.settings import GateSettings
from tasks.release import registry
from tasks.release.gate import evaluate_gate

NO_RULES = GateSettings(
    **RATIONALE_RULES_OFF, min_f1={}, min_recall_abnormal=None, max_false_alarm_rate={}, max_format_invalid_rate=None,
                        champion_margin=0.0,
                        max_regression_per_dataset=None, require_approval=False)


@pytest.fixture(scope="module")
def adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    make_adapter(base_model_dir, out / "sft", seed=1)
    make_adapter(base_model_dir, out / "grpo", seed=2)
    return out


@pytest.fixture(scope="module")
def world(base_model_dir: Path, adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world_in(tmp_path_factory.mktemp("registry") / "project", base_model_dir, adapters) as built:
        yield built


def versions(name: str) -> dict[str, dict[str, str]]:
    c = registry.client()
    return {str(mv.version): dict(mv.tags) for mv in c.search_model_versions(f"name='{name}'")}


def test_first_candidate_becomes_champion(world: World) -> None:
    version, verdict = release(world, "first", candidate_metrics(0.6, 0.5))
    assert verdict.passed
    assert registry.aliases("first") == {"champion": version, "challenger": version}
    tags = versions("first")[version]
    assert tags["registration"] == "complete" and "failed" not in tags
    assert tags["gate.passed"] == "true" and json.loads(tags["gate.verdict"])["passed"] is True
    assert tags["approved_by"] == "alice" and tags["approval_reason"] == "beats the champion"
    assert tags["base_model.sha256"] == json.loads((world.base / "base_model.json").read_text())["weights_sha256"]
    assert tags["run.sft"] == world.runs["sft"] and tags["run.grpo"] == world.runs["grpo"]
    assert tags["data.split.md5"].endswith(".dir") and tags["params.sha256"] and tags["git.commit"]
    assert tags["teacher"] == "lexicon" and tags["registered_at"]


def test_better_candidate_is_promoted_and_old_champion_becomes_previous(world: World) -> None:
    v1, _ = release(world, "better", candidate_metrics(0.6, 0.5))
    v2, verdict = release(world, "better", candidate_metrics(0.7, 0.6))
    assert verdict.passed and verdict.champion_version == v1
    assert registry.aliases("better") == {"champion": v2, "previous": v1, "challenger": v2}
    assert versions("better")[v2]["promoted_over"] == v1
    assert registry.champion_metrics("better")["metrics"]["methods"]["rationanomaly"]["template_bgl"]["f1"] == 0.7


def test_failed_gate_moves_no_alias(world: World) -> None:
    v1, _ = release(world, "refuse", candidate_metrics(0.6, 0.5))
    v2, _ = release(world, "refuse", candidate_metrics(0.7, 0.6))
    before = registry.aliases("refuse")
    v3, verdict = release(world, "refuse", candidate_metrics(0.5, 0.62))  # BGL regresses by 0.2
    assert not verdict.passed
    assert {r.name for r in verdict.failed} == {"champion_margin", "max_regression.template_bgl"}
    assert registry.aliases("refuse") == before == {"champion": v2, "previous": v1, "challenger": v2}
    tags = versions("refuse")[v3]
    assert tags["registration"] == "complete"  # still registered, for the record
    assert tags["gate.passed"] == "false" and tags["gate.failed"] == "champion_margin,max_regression.template_bgl"
    with pytest.raises(registry.PromotionRefused, match="failed its gate"):
        registry.promote(v3, "mallory", "force it", name="refuse")
    assert registry.aliases("refuse") == before


def test_rollback_restores_the_old_champion_and_records_who_and_why(world: World) -> None:
    v1, _ = release(world, "roll", candidate_metrics(0.6, 0.5))
    v2, _ = release(world, "roll", candidate_metrics(0.7, 0.6))
    result = registry.rollback("bob", "false alarms in production", name="roll")
    assert result == {"champion": v1, "previous": None, "rolled_back": v2}
    assert registry.aliases("roll") == {"champion": v1, "challenger": v2}
    tags = versions("roll")
    assert tags[v2]["rolled_back_by"] == "bob" and tags[v2]["rolled_back_reason"] == "false alarms in production"
    assert tags[v1]["restored_by"] == "bob"
    event = json.loads(registry.client().get_registered_model("roll").tags["last_rollback"])
    assert (event["from"], event["to"], event["actor"]) == (v2, v1, "bob")
    with pytest.raises(registry.RegistryError, match="no @previous version"):
        registry.rollback("bob", "again", name="roll")


def test_rollback_after_three_promotions_keeps_a_previous(world: World) -> None:
    v1, _ = release(world, "chain", candidate_metrics(0.5, 0.5))
    v2, _ = release(world, "chain", candidate_metrics(0.6, 0.6))
    v3, _ = release(world, "chain", candidate_metrics(0.7, 0.7))
    registry.rollback("bob", "bad", name="chain")
    assert registry.aliases("chain") == {"champion": v2, "previous": v1, "challenger": v3}


def test_approval_is_recorded_and_a_refusal_moves_nothing(world: World) -> None:
    v1, _ = release(world, "approval", candidate_metrics(0.6, 0.5), approver="carol", reason="reviewed the report")
    tags = versions("approval")[v1]
    assert (tags["approved_by"], tags["approval_reason"]) == ("carol", "reviewed the report")
    assert tags["promoted_at"]
    metrics = candidate_metrics(0.7, 0.6)
    verdict = evaluate_gate(metrics, registry.champion_metrics("approval")["metrics"], NO_RULES)
    v2 = registry.register_candidate(world.grpo, world.base, metrics, verdict, **register_kwargs(world, "approval"))
    registry.record_refusal(v2, "dave", "wants a larger test set", name="approval")
    assert registry.aliases("approval")["champion"] == v1
    tags = versions("approval")[v2]
    assert (tags["promotion"], tags["refused_by"], tags["refusal_reason"]) == \
        ("refused", "dave", "wants a larger test set")


def test_model_card_and_lineage_are_attached_to_the_version(world: World) -> None:
    import mlflow.artifacts

    version, _ = release(world, "card", candidate_metrics(0.6, 0.5))
    card = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/card/{version}/artifacts/"
                                                                 "model_card.md")).read_text()
    for needle in ("# Model card: card", "## Data", "## Method", "## Metrics", "## Limits", "| **rationanomaly**",
                   "0.600 / 0.600 / **0.600**", "anomaly_patch.json", "Expert corrections applied: 225"):
        assert needle in card
    description = registry.client().get_model_version("card", version).description
    # the description is the compact card (MLflow's column holds 5,000 characters): it keeps the verdict's
    # figures and the limits whole, and points at the full card
    assert description.startswith("# Model card: card") and len(description) <= 4900
    assert "## Limits" in description and "| **rationanomaly**" in description
    assert "`model_card` artifact" in description and "raw.githubusercontent.com" not in description


def test_champion_adapter_downloads_byte_identical(world: World, tmp_path: Path) -> None:
    release(world, "download", candidate_metrics(0.6, 0.5))
    folder = registry.download_adapter("download@champion", tmp_path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (world.grpo / name).read_bytes()


def test_unreachable_registry_fails_with_a_clear_message_and_registers_nothing(world: World,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    metrics = candidate_metrics(0.6, 0.5)
    verdict = evaluate_gate(metrics, None, NO_RULES)
    for uri, needle in (("http://127.0.0.1:9", "ConnectError"),
                        (f"sqlite:///{tmp_path}/no/such/folder/mlflow.db", "does not exist")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(registry.RegistryUnavailable) as raised:
            registry.register_candidate(world.grpo, world.base, metrics, verdict, **register_kwargs(world, "down"))
        assert uri in str(raised.value) and needle in str(raised.value) and "MLFLOW_TRACKING_URI" in str(raised.value)
        with pytest.raises(registry.RegistryUnavailable):
            registry.promote("1", "alice", "x", name="down")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_for(world.root)["MLFLOW_TRACKING_URI"])
    assert versions("down") == {}


def test_a_registration_that_fails_half_way_is_tagged_failed(world: World) -> None:
    metrics = candidate_metrics(0.6, 0.5)
    verdict = evaluate_gate(metrics, None, NO_RULES)
    with pytest.raises(registry.RegistryError, match="tagged `failed`"):  # a tag over MLflow's 100k limit
        registry.register_candidate(world.grpo, world.base, metrics, verdict, {"note": "x" * 100_001},
                                    **register_kwargs(world, "halfway"))
    (version, tags), = versions("halfway").items()
    assert tags["registration"] == "failed" and "maximum length" in tags["failed"]
    assert registry.aliases("halfway") == {}
    with pytest.raises(registry.PromotionRefused, match="not completely registered"):
        registry.promote(version, "alice", "x", name="halfway")


def test_a_registration_that_died_is_tagged_failed_by_the_next_one(world: World) -> None:
    c = registry.client()
    c.create_registered_model("crashed")
    orphan = c.create_model_version("crashed", source=str(world.grpo))  # as a killed process leaves it
    version, _ = release(world, "crashed", candidate_metrics(0.6, 0.5))
    tags = versions("crashed")
    assert tags[str(orphan.version)]["registration"] == "failed"
    assert "never completed" in tags[str(orphan.version)]["failed"]
    assert registry.aliases("crashed")["champion"] == version != str(orphan.version)


def test_request_approval_outside_a_flow_says_so(world: World) -> None:
    from flows.release import ApprovalInput, request_approval

    verdict = evaluate_gate(candidate_metrics(0.6, 0.5), None, NO_RULES)
    with pytest.raises(RuntimeError, match="inside a Prefect flow"):
        request_approval(verdict)
    assert set(ApprovalInput.model_fields) >= {"approver", "approve", "reason"}


def register_calibrated(world: World, name: str, threshold: float, adapter: Path | None = None) -> str:
    metrics = candidate_metrics(0.6, 0.5)
    verdict = evaluate_gate(metrics, None, NO_RULES)
    calibration = {"threshold": threshold, "neighbours": 2, "average_precision": 0.7, "n": 40, "abnormal": 6}
    version = registry.register_candidate(adapter or world.grpo, world.base, metrics, verdict,
                                          calibration=calibration,
                                          index_dir=world.root / "models" / "index",  # the index stage's output
                                          **register_kwargs(world, name))
    registry.promote(version, "alice", "calibrated", name=name)
    return version


def test_the_threshold_and_index_travel_with_the_version_to_serving(world: World, tmp_path: Path) -> None:
    from serving.resolve import local_model_ref, resolve_champion
    from tasks.common.errors import InputError
    from tasks.common.retrieval import INDEX_FILE

    version = register_calibrated(world, "calibrated", 0.37)
    assert versions("calibrated")[version]["verdict.threshold"] == "0.37"
    ref = resolve_champion("calibrated", dest_root=tmp_path / "serve", fallback_base_dir=world.base)
    assert (ref.threshold, ref.neighbours) == (0.37, 2)
    assert (Path(str(ref.index_dir)) / INDEX_FILE).is_file()
    assert Path(ref.adapter_dir).parent == Path(str(ref.index_dir)).parent  # artifacts/adapter, artifacts/index
    # the same read from a downloaded artifacts folder (`serve --adapter`, detect.version_dir)
    local = local_model_ref("m", "local", world.base, Path(ref.adapter_dir).parent)
    assert (local.threshold, local.index_dir, local.neighbours) == (0.37, ref.index_dir, 2)
    assert local_model_ref("m", "local", world.base, world.grpo).threshold is None  # an adapter never evaluated
    # a calibration the artifacts cannot honour is refused by name, before anything is served
    broken = tmp_path / "broken"
    (broken / "adapter").mkdir(parents=True)
    for f in Path(ref.adapter_dir).iterdir():
        (broken / "adapter" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match=r"index\.pkl does not exist") as raised:
        local_model_ref("m", "local", world.base, broken)
    assert "calibration.json" in str(raised.value)
    (broken / "adapter" / "calibration.json").write_text('{"threshold": 3.5}')
    with pytest.raises(InputError, match="not a probability"):
        local_model_ref("m", "local", world.base, broken)


@pytest.mark.slow
def test_champion_loads_back_through_the_models_uri_and_classifies(world: World, tmp_path: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd

    version, _ = release(world, "loadback", candidate_metrics(0.6, 0.5))
    model = mlflow.pyfunc.load_model("models:/loadback@champion", model_config={"max_new_tokens": 6})
    logs = pd.DataFrame({"log": ["ciod: failed to read message prefix", ""], "dataset": ["bgl"] * 2})
    out = model.predict(logs)
    assert list(out.columns) == ["verdict", "label", "score", "valid", "rationale", "rationale_source", "completion",
                                 "missing"]
    assert len(out) == 2 and out["score"].isna().all()
    assert out["rationale_source"][0] in {"model", "evidence"} and out["rationale_source"][1] is None  # the guard
    assert out["verdict"][0] in {"normal", "abnormal"} and out["missing"].tolist() == [False, True]  # "": no log
    assert os.path.isdir(model._model_impl.python_model.adapter_dir)
    assert registry.aliases("loadback")["champion"] == version
    # a calibrated version scores every row: threshold 0 flags every scored row, with the index's neighbours
    gentle = make_adapter(world.base, tmp_path / "gentle", seed=3, scale=0.01)  # answers like the base model
    (gentle / "training_meta.json").write_bytes((world.grpo / "training_meta.json").read_bytes())
    register_calibrated(world, "loadback-calibrated", 0.0, gentle)
    model = mlflow.pyfunc.load_model("models:/loadback-calibrated@champion", model_config={"max_new_tokens": 6})
    assert model._model_impl.python_model.index is not None
    out = model.predict(logs)
    scored = out["score"].notna()
    assert scored.any() and out["score"][scored].between(0, 1).all()
    assert (out["verdict"][scored] == "abnormal").all() and (out["valid"] == scored).all()


def test_release_flow_lookups_find_the_card_and_an_already_registered_candidate(world: World) -> None:
    metrics = candidate_metrics(0.6, 0.5)
    verdict = evaluate_gate(metrics, None, NO_RULES)
    version = registry.register_candidate(world.grpo, world.base, metrics, verdict, {"candidate.adapter_md5": "abc"},
                                          **register_kwargs(world, "lookups"))
    assert registry.versions_with_tags({"candidate.adapter_md5": "abc"}, name="lookups") == [version]
    assert registry.versions_with_tags({"candidate.adapter_md5": "other"}, name="lookups") == []
    assert registry.model_card_text(version, name="lookups").startswith("# Model card: lookups")


def test_a_registration_named_by_idempotency_tags_happens_once(world: World) -> None:
    """A retry after a registration that completed returns that version (issue 22, item 3); other tags register
    anew."""
    metrics = candidate_metrics(0.6, 0.5)
    verdict = evaluate_gate(metrics, None, NO_RULES)
    once = {"release.flow_run_id": "run-1", "candidate.adapter_md5": "abc.dir"}
    first = registry.register_candidate(world.grpo, world.base, metrics, verdict, idempotency_tags=once,
                                        **register_kwargs(world, "once"))
    again = registry.register_candidate(world.grpo, world.base, metrics, verdict, idempotency_tags=once,
                                        **register_kwargs(world, "once"))
    other = registry.register_candidate(world.grpo, world.base, metrics, verdict,
                                        idempotency_tags={**once, "release.flow_run_id": "run-2"},
                                        **register_kwargs(world, "once"))
    assert first == again != other and sorted(versions("once")) == sorted({first, other})
    assert versions("once")[first]["release.flow_run_id"] == "run-1"
