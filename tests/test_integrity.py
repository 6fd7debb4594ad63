"""Issue 22, item 2: bytes that differ from the hash their lineage records are never registered, promoted or served.

The world is a real DVC project (models/grpo and models/index committed with `dvc commit`) and a real SQLite
MLflow registry; damage is a flipped byte with size and mtime kept, as a changed DVC cache file linked into the
workspace looks (DVC issues 5978, 9641): `dvc status` still says up to date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from registry_world import (
    RATIONALE_RULES_OFF,
    World,
    candidate_metrics,
    make_adapter,
    register_kwargs,
    release,
    world_in,
)

from tasks.common.integrity import IntegrityError, tree_md5, verify_locked
from tasks.common.settings import GateSettings, load_settings
from tasks.release import registry
from tasks.release.gate import evaluate_gate

NO_RULES = GateSettings(
    **RATIONALE_RULES_OFF, min_f1={}, min_recall_abnormal=None, max_false_alarm_rate={}, max_format_invalid_rate=None,
                        champion_margin=0.0, max_regression_per_dataset=None, require_approval=False)
WEIGHTS = "adapter_model.safetensors"
DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture(scope="module")
def world(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    adapters = tmp_path_factory.mktemp("adapters")
    make_adapter(base_model_dir, adapters / "sft", seed=1)
    make_adapter(base_model_dir, adapters / "grpo", seed=2)
    with world_in(tmp_path_factory.mktemp("integrity") / "project", base_model_dir, adapters) as built:
        yield built


def flip_byte(path: Path, offset: int = 4096) -> None:
    """Change one byte in place, keeping size and mtime (what DVC's state database looks at)."""
    stat = path.stat()
    path.chmod(0o644)
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def cache_object(root: Path, md5: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def versions(name: str) -> list[str]:
    return sorted(str(mv.version) for mv in registry.client().search_model_versions(f"name='{name}'"))


def register(world: World, name: str, **kwargs: object) -> str:
    metrics = candidate_metrics(0.6, 0.5)
    return registry.register_candidate(world.grpo, world.base, metrics, evaluate_gate(metrics, None, NO_RULES),
                                       **kwargs, **register_kwargs(world, name))


def locked_md5(world: World, stage: str) -> str:
    return yaml.safe_load((world.root / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]


def test_the_manifest_md5_is_dvcs_own(world: World) -> None:
    out = {"md5": locked_md5(world, "grpo")}
    manifest = json.loads(cache_object(world.root, out["md5"]).read_text())
    assert tree_md5({e["relpath"]: e["md5"] for e in manifest}) == out["md5"]
    assert verify_locked(world.root, world.grpo).md5 == out["md5"]


def test_a_flipped_adapter_byte_stops_registration_naming_the_file(world: World) -> None:
    release(world, "flip", candidate_metrics(0.6, 0.5))
    before_versions, before_aliases = versions("flip"), registry.aliases("flip")
    weights = world.grpo / WEIGHTS
    original = weights.read_bytes()
    flip_byte(weights)
    try:
        status = subprocess.run([DVC, "status", "--json", "grpo"], cwd=world.root, capture_output=True, text=True,
                                check=True)
        assert "models/grpo" not in status.stdout  # DVC does not read the bytes again: the premise
        with pytest.raises(IntegrityError) as raised:
            register(world, "flip")
        message = str(raised.value)
        assert message.startswith(f"models/grpo/{WEIGHTS}: md5 ") and "stage 'grpo'" in message
        assert "`dvc checkout --relink models/grpo`" in message  # the cache still holds the recorded bytes
        assert versions("flip") == before_versions and registry.aliases("flip") == before_aliases
        from flows.release import verify_candidate  # the release flow stops before judging

        with pytest.raises(IntegrityError, match=f"models/grpo/{WEIGHTS}"):
            verify_candidate.fn(load_settings(world.root / "params.yaml"))
        # the hint works: DVC restores the recorded bytes, and the candidate registers
        subprocess.run([DVC, "checkout", "--relink", "models/grpo"], cwd=world.root, check=True, capture_output=True)
        assert weights.read_bytes() == original
        assert register(world, "flip") not in before_versions
    finally:
        weights.chmod(0o644)
        weights.write_bytes(original)


def test_a_damaged_cache_copy_is_named_with_a_rebuild_hint(world: World) -> None:
    manifest = json.loads(cache_object(world.root, locked_md5(world, "grpo")).read_text())
    recorded = next(e["md5"] for e in manifest if e["relpath"] == WEIGHTS)
    cached, weights = cache_object(world.root, recorded), world.grpo / WEIGHTS
    originals = cached.read_bytes(), weights.read_bytes()
    flip_byte(weights)
    flip_byte(cached)  # a hardlinked or symlinked cache: one change, both places
    try:
        with pytest.raises(IntegrityError) as raised:
            register(world, "cache")
        message = str(raised.value)
        assert f"the DVC cache's copy {cached} is damaged too" in message
        assert "`dvc repro --force --single-item grpo`" in message
        assert versions("cache") == []
    finally:
        for path, data in zip((cached, weights), originals, strict=True):
            path.chmod(0o644)
            path.write_bytes(data)


def test_an_extra_or_missing_file_is_named(world: World) -> None:
    extra = world.grpo / "notes.txt"
    extra.write_text("not written by the grpo stage")
    try:
        with pytest.raises(IntegrityError, match=r"models/grpo/notes\.txt: is not among the recorded files"):
            verify_locked(world.root, world.grpo)
    finally:
        extra.unlink()
    (world.grpo / "__pycache__").mkdir(exist_ok=True)
    (world.grpo / "__pycache__" / "x.pyc").write_bytes(b"ignored by .dvcignore")
    assert verify_locked(world.root, world.grpo) is not None


def stored_file(name: str, version: str, relpath: str) -> Path:
    uri = registry.client().get_model_version_download_uri(name, version)
    return Path(uri.removeprefix("file://")) / "artifacts" / relpath


def test_promotion_is_refused_when_the_stored_bytes_differ(world: World) -> None:
    version = register(world, "stored")
    tags = dict(registry.client().get_model_version("stored", version).tags)
    record = json.loads(stored_file("stored", version, "lineage.json").read_text())
    assert tags["artifact.adapter.md5"] == record["artifacts"]["adapter"]["md5"]
    assert record["artifacts"]["adapter"]["dvc"] == {"stage": "grpo", "path": "models/grpo",
                                                     "md5": locked_md5(world, "grpo")}
    flip_byte(stored_file("stored", version, f"adapter/{WEIGHTS}"))
    with pytest.raises(registry.PromotionRefused) as raised:
        registry.promote(version, "alice", "looks fine", name="stored")
    assert f"models:/stored/{version}/artifacts/adapter/{WEIGHTS}" in str(raised.value)
    assert "no alias moved" in str(raised.value)
    assert "champion" not in registry.aliases("stored")


def test_serve_refuses_a_damaged_download_before_starting_a_server(world: World, tmp_path: Path) -> None:
    from serving import server
    from serving.resolve import resolve_champion
    from tasks.common.contracts import CALIBRATION_FILE

    calibration = {"threshold": 0.4, "neighbours": 2, "average_precision": 0.7, "n": 40, "abnormal": 6}
    version = register(world, "served", calibration=calibration, index_dir=world.root / "models" / "index")
    registry.promote(version, "alice", "verified", name="served")
    ref = resolve_champion("served", dest_root=tmp_path / "serve", fallback_base_dir=world.base)
    assert server.verify_artifacts(ref) == ["adapter", "index", "base_model"]
    record = json.loads((Path(ref.adapter_dir).parent / "lineage.json").read_text())
    assert record["artifacts"]["adapter"]["added"] == [CALIBRATION_FILE]
    settings = load_settings(world.root / "params.yaml").serve
    index_file = next(Path(str(ref.index_dir)).iterdir())
    flip_byte(index_file, offset=10)
    with pytest.raises(IntegrityError) as raised:
        server.deploy(ref, settings)
    assert str(raised.value).startswith(f"{index_file}: md5 ") and "served v" in str(raised.value)
    assert f"delete {tmp_path / 'serve' / 'served' / version}" in str(raised.value)
    assert server.read_state(settings) is None  # nothing went live
