"""Labels of any system flow into the index, and a release that needs no retraining (issue 20, items 2 and 3).

Review files may label templates of a system the template lists do not hold (the `system` column); `correct`
resolves them (majority, kappa) and keeps them out of the split; the index stage adds them with their review
files and annotators. The index-only release keeps the @champion's adapter, registers the new index and threshold
as a new version judged by the same gate, and lineage names the review files and annotators. Real review CSVs, a
real project copy with dvc.lock, real LoRA adapters, a real SQLite MLflow registry, real Prefect flow runs and a
real local OpenAI-compatible server (test_detect's FakeChatServer) whose prompts are captured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from registry_world import World, make_adapter, world_in
from test_release_flow import candidate, release, set_candidate

from tasks.common.config import set_profile

THUNDERBIRD = "ib_sm_sweep.c: <*>: Found duplicate GUID <*>"  # a template of a system the LogPrompt lists lack
THUNDERBIRD_QUERY = "ib_sm_sweep.c: 578: Found duplicate GUID 0x0002c9020020a3f1"
OTHER = "kernel: e1000: eth0 NIC Link is Up 1000 Mbps Full Duplex"


def write_reviews(folder: Path, extra: str = "") -> None:
    """Two annotators: erin names the system in a `system` column, bob in a `dataset` column; a file written
    before the column existed (carol) stays valid and labels a template of the lists."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "erin.csv").write_text(f"template,label,note,system\n{THUNDERBIRD},abnormal,duplicate GUID,Thunderbird\n"
                                     f"{OTHER},normal,,thunderbird\n{extra}", encoding="utf-8")
    (folder / "bob.csv").write_text(f"template,label,dataset\n{THUNDERBIRD},abnormal,thunderbird\n"
                                    f"{OTHER},normal,thunderbird\n", encoding="utf-8")
    (folder / "carol.csv").write_text("template,label\ngenerating core.<*>,abnormal\n", encoding="utf-8")


def write_template_lists(root: Path) -> dict[str, Path]:
    lists = root / "data" / "raw" / "logprompt"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "templates_bgl.csv").write_text("log,label\ngenerating core.<*>,0\nciod: failed to read message prefix,1\n"
                                             "instruction cache parity error corrected,0\n", encoding="utf-8")
    (lists / "templates_spirit.csv").write_text("log,label\nkernel: GM: LANai is not running,1\n", encoding="utf-8")
    return {"bgl": lists / "templates_bgl.csv", "spirit": lists / "templates_spirit.csv"}


def test_review_labels_of_a_new_system_go_to_the_index_only(tmp_path: Path) -> None:
    """Fails on the old code: the system column was ignored, so the Thunderbird labels were tried on the BGL and
    Spirit lists, reported unmatched, and never reached the index."""
    from tasks import index as index_stage
    from tasks.common.retrieval import INDEX_FILE, TemplateIndex
    from tasks.common.settings import load_settings
    from tasks.correct import correct_templates

    write_reviews(tmp_path / "reviews")
    patch = tmp_path / "patch.json"
    patch.write_text("[]", encoding="utf-8")
    result = correct_templates(patch, write_template_lists(tmp_path), tmp_path / "reviews")

    review = result.report["review"]
    assert review["unmatched"] == [] and review["kappa_method"] == "fleiss"
    assert review["new_systems"] == {"thunderbird": {"templates": 2, "abnormal": 1}}
    assert set(result.templates["dataset"]) == {"bgl", "spirit"}  # never split, never a test item or SFT data
    assert result.templates.set_index("template").at["generating core.<*>", "label"] == 1  # carol's old file
    thunderbird = next(r for r in result.resolution if r["input"] == THUNDERBIRD)
    assert thunderbird["new_system"] and thunderbird["system"] == "thunderbird"
    assert thunderbird["sources"] == [{"annotator": "bob", "file": "bob.csv", "line": 2},
                                      {"annotator": "erin", "file": "erin.csv", "line": 2}]

    (tmp_path / "resolution.json").write_text(json.dumps(result.resolution), encoding="utf-8")
    pd.DataFrame({"dataset": ["bgl", "bgl"], "template": ["ciod: failed to read message prefix", "generating core"],
                  "label": [1, 0]}).to_parquet(tmp_path / "train.parquet")
    settings = load_settings().index.model_copy(update={"train_file": str(tmp_path / "train.parquet"),
                                                        "out_dir": str(tmp_path / "index")})
    meta = index_stage.run(settings, tmp_path / "resolution.json")
    assert meta["review_labels"]["systems"] == {"thunderbird": 2}
    assert meta["review_labels"]["annotators"] == ["bob", "erin"]
    table = pd.read_csv(tmp_path / "index" / index_stage.TEMPLATES_TABLE, keep_default_na=False)
    row = table[table["template"] == THUNDERBIRD].iloc[0]
    assert (row["dataset"], row["label"], row["source"]) == ("thunderbird", 1, "review")
    assert (row["annotators"], row["review_files"]) == ("bob;erin", "bob.csv;erin.csv")
    built = TemplateIndex.load(tmp_path / "index" / INDEX_FILE)
    assert (THUNDERBIRD, 1) in built.prompt_neighbours([THUNDERBIRD_QUERY], ["thunderbird"])[0]


# ---- the index-only release in a real project and registry ---------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    for name, seed in (("sft", 1), ("grpo", 2)):
        make_adapter(base_model_dir, out / name, seed=seed)
    return out


@pytest.fixture(scope="module")
def world(base_model_dir: Path, adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("index-release") / "project"
    with world_in(root, base_model_dir, adapters) as built:
        set_profile("default", root / "params.yaml")  # the gate `make run` uses
        (root / "models" / "base").mkdir(parents=True, exist_ok=True)
        for f in base_model_dir.iterdir():
            (root / "models" / "base" / f.name).symlink_to(f)
        yield built


def rebuild_index(world: World) -> None:
    """What `dvc repro index` does after the review files changed: the correct stage (on small template lists),
    the index stage from the training split plus the new-system labels, recorded in dvc.lock (`dvc commit`)."""
    from tasks import correct
    from tasks import index as index_stage
    from tasks.common.settings import load_settings

    settings = load_settings()
    write_template_lists(world.root)
    correct.run(settings.correct)
    templates = ["ciod: failed to read message prefix", "generating core", "kernel: GM: LANai is not running"]
    train = pd.DataFrame({"dataset": ["bgl", "bgl", "spirit"], "template": templates, "label": [1, 0, 1]})
    train.to_parquet(world.root / settings.index.train_file)
    index_stage.run(settings.index, settings.correct.resolution_file)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "commit", "--force", "index"], cwd=world.root,
                   check=True, capture_output=True)


def index_only_release(world: World, caught: int) -> dict[str, Any]:
    """The index-only flow's own code after its evaluation (release_kept_adapter) as a real Prefect flow run, the
    kept adapter downloaded from the registry; the evaluation's files as tasks.evaluate.evaluate_kept_adapter
    writes them (metrics with `caught` of 100 anomalies per gated set, a threshold, 3 neighbours)."""
    from prefect import flow

    from flows.release import INDEX_RELEASE_DIR, champion_adapter, release_kept_adapter
    from tasks.common.settings import load_settings

    metrics, items = candidate(caught)
    eval_dir = world.root / INDEX_RELEASE_DIR / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    (eval_dir / "candidate_predictions.json").write_text(json.dumps(items))
    (eval_dir / "calibration.json").write_text(json.dumps({"threshold": 0.4, "average_precision": 0.8,
                                                           "neighbours": 3}))

    @flow(name="index-only-after-evaluate")
    def released() -> dict[str, Any]:
        settings = load_settings()
        return release_kept_adapter(settings, champion_adapter(settings), eval_dir, [])

    return released()


def test_an_index_only_release_is_gated_traced_and_served(world: World, chat_server: Any,
                                                         tmp_path: Path) -> None:
    """Fails on the old code: there was no index-only release (flows.release has no release_kept_adapter), review
    files were not in the lineage and a Thunderbird label never reached the index."""
    from serving.client import Endpoint, client_for
    from serving.resolve import resolve_champion
    from tasks.common.prompt import NEIGHBOURS_HEADER
    from tasks.common.settings import load_settings
    from tasks.release import registry
    from tasks.release.lineage import lineage, render_lineage

    name = "rationanomaly"
    set_candidate(world, caught=80)
    champion = release(world)
    assert champion["promoted"]
    champion_adapter_md5 = registry.version_tags(champion["version"], name=name)["artifact.adapter.md5"]

    # Labels of a new system, worse metrics: registered like any candidate, refused by the gate, nothing moves.
    write_reviews(world.root / "corrections" / "reviews")
    rebuild_index(world)
    worse = index_only_release(world, caught=40)
    assert not worse["promoted"] and "champion_margin" in worse["verdict"]["failed"]
    assert worse["adapter_from"] == champion["version"]
    assert registry.aliases(name)["champion"] == champion["version"]
    tags = registry.version_tags(worse["version"], name=name)
    assert (tags["release.kind"], tags["release.adapter_from"]) == ("index-only", champion["version"])
    assert tags["gate.passed"] == "false"

    # One more label, better metrics: promoted, with the champion's adapter weights and the new index.
    write_reviews(world.root / "corrections" / "reviews",
                  extra="kernel: mptscsih: ioc0: attempting task abort!,abnormal,,thunderbird\n")
    rebuild_index(world)
    better = index_only_release(world, caught=90)
    assert better["promoted"], better.get("reason")
    chain = lineage(f"{name}@champion")
    assert chain["release"] == {"kind": "index-only", "adapter_from": champion["version"]}
    files = {Path(f["file"]).name: f for f in chain["reviews"]["files"]}
    assert files["erin.csv"]["annotator"] == "erin" and files["erin.csv"]["file"] == "corrections/reviews/erin.csv"
    assert files["erin.csv"]["votes"] == 3 and chain["reviews"]["new_systems"] == {"thunderbird": 3}
    assert "erin" in chain["reviews"]["annotators"]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_lineage(chain))
    shown = console.export_text()
    assert "corrections/reviews/erin.csv by erin: 3 votes" in shown and "index-only release" in shown
    new_tags = registry.version_tags(better["version"], name=name)
    assert f"erin.csv={files['erin.csv']['sha256']}" in new_tags["data.reviews.sha256"]
    assert new_tags["verdict.threshold"] == "0.4"
    record = json.loads(Path(registry.mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{better['version']}/artifacts/lineage.json", dst_path=str(tmp_path))
    ).read_text())
    old_record = json.loads(Path(registry.mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{champion['version']}/artifacts/lineage.json",
        dst_path=str(tmp_path / "old"))).read_text())
    weights = "adapter_model.safetensors"
    assert record["artifacts"]["adapter"]["files"][weights] == old_record["artifacts"]["adapter"]["files"][weights]
    assert new_tags["artifact.adapter.md5"] != champion_adapter_md5  # a new calibration.json beside the weights

    # The served version's prompt for a Thunderbird log shows the newly labelled Thunderbird template.
    settings = load_settings()
    ref = resolve_champion(name, dest_root=tmp_path / "serve", fallback_base_dir=world.base)
    assert ref.version == better["version"] and ref.neighbours == 3 and ref.threshold == 0.4
    server = chat_server()
    endpoint = Endpoint(server.url, name, ref.version, threshold=ref.threshold, index_dir=ref.index_dir,
                        neighbours=ref.neighbours)
    with client_for(endpoint, settings.detect, max_retries=1, backoff_s=0.01) as client:
        client.classify_one(THUNDERBIRD_QUERY, "thunderbird")
    assert server.prompts and server.prompts[0].startswith(NEIGHBOURS_HEADER)
    assert f"- abnormal: {THUNDERBIRD}" in server.prompts[0]


def test_an_index_only_release_without_a_champion_stops_before_any_stage(tmp_path: Path) -> None:
    """`rationanomaly release --index-only` with no @champion: one line, exit 1, no DVC stage run."""
    import os

    from registry_world import REPO, env_for

    root = tmp_path / "project"
    root.mkdir()
    from workspace import copy_project

    copy_project(REPO, root)
    env = {**os.environ, **env_for(root)}
    proc = subprocess.run([sys.executable, "-m", "rationanomaly.cli", "release", "--index-only"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "models:/rationanomaly@champion: no @champion to keep the adapter of" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (root / "models" / "index").exists() and not (root / "dvc.lock").exists()


@pytest.mark.slow
def test_an_index_only_release_end_to_end_on_the_smoke_profile(module_project: Path, base_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """The whole flow on the smoke profile with real data: a champion (a tiny real adapter registered through the
    release flow's code), then review files labelling Thunderbird templates, then `release_index_only_flow`
    (dvc repro index, the champion's adapter downloaded and evaluated with the new index, gate, register).
    Prints the wall time of the index-only release."""
    from flows.release import release_index_only_flow
    from tasks.common.dvc_ops import repro_stage
    from tasks.common.settings import load_settings
    from tasks.evaluate import evaluate_kept_adapter
    from tasks.release import registry
    from tasks.release.gate import evaluate_gate
    from tasks.release.pyfunc import model_config

    root = module_project
    repro_stage("index", root)
    settings = load_settings()
    (root / settings.base_model.out_dir).mkdir(parents=True, exist_ok=True)  # the converted base, as the stage makes it
    for f in base_model_dir.iterdir():
        (root / settings.base_model.out_dir / f.name).symlink_to(f)
    adapter = make_adapter(base_model_dir, tmp_path / "adapter", seed=2, scale=0.05)
    (adapter / "training_meta.json").write_text(json.dumps({"stage": "grpo", "steps": 0}))
    metrics = evaluate_kept_adapter(adapter, settings.evaluate, settings.detect, settings.index, tmp_path / "eval")
    items = json.loads((tmp_path / "eval" / "candidate_predictions.json").read_text())
    verdict = evaluate_gate(metrics, None, settings.gate, candidate_items=items)
    first = registry.register_candidate(adapter, root / settings.base_model.out_dir, metrics, verdict,
                                        name=settings.registry.model_name, model_config=model_config(settings.evaluate),
                                        params=settings.model_dump(), predictions=items,
                                        calibration=json.loads((tmp_path / "eval" / "calibration.json").read_text()),
                                        index_dir=root / settings.index.out_dir)
    client = registry.client()
    client.set_model_version_tag(settings.registry.model_name, first, "gate.passed", "true")
    registry.promote(first, "test", "a champion to keep", name=settings.registry.model_name)

    write_reviews(root / "corrections" / "reviews")
    started = time.perf_counter()
    result = release_index_only_flow()
    seconds = time.perf_counter() - started
    print(f"\nindex-only release on the smoke profile: {seconds:.1f} s wall (flow says {result['seconds']} s); "
          f"version {result.get('version')}, promoted {result['promoted']}, {result.get('reason', '')}")
    assert result["adapter_from"] == first and result.get("version") not in (None, first)
    table = pd.read_csv(root / settings.index.out_dir / "templates.csv", keep_default_na=False)
    assert (table["dataset"] == "thunderbird").sum() == 2
