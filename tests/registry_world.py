"""A small real world for registry and lineage tests: a project copy with dvc.lock, correction report, source
manifest, real tiny LoRA adapters, real MLflow training runs, and a temporary SQLite registry.

Not a test module: test_registry.py and test_lineage.py build it through `build_world`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from workspace import copy_project

from tasks.common.settings import GateSettings, load_settings
from tasks.release.gate import evaluate_gate

REPO = Path(__file__).resolve().parents[1]
# The rationale-faithfulness rules switched off, for gates built in code (issue 19's rules have their own tests).
RATIONALE_RULES_OFF: dict[str, Any] = {
    "rationale_scope": "shown", "min_rationale_agreement": None, "min_component_in_log": None,
    "min_quotes_grounded": None, "min_cited_neighbour_shown": None, "max_false_no_failure_word": None,
    "max_rationale_replaced": None}
GATE = GateSettings(
    **RATIONALE_RULES_OFF, min_f1={"template_bgl": 0.3, "template_spirit": 0.3}, min_recall_abnormal=0.3,
                    max_false_alarm_rate={}, max_format_invalid_rate=0.2, champion_margin=0.0,
                    max_regression_per_dataset=0.05, require_approval=False)
MD5 = {"raw": "1f3870be274f6c49b3e31a0c6728957f.dir", "corrections": "6f8db599de986fab7a21625b7916589c",
       "reviews": "0c7a5b4b0cf9a8dbb4c5b2e6a1b4c3d2.dir", "corrected": "9e107d9d372bb6826bd81d3542a419d6",
       "split": "e4d909c290d0fb1ca068ffaddf22cbd0.dir", "distilled": "d41d8cd98f00b204e9800998ecf8427e",
       "index": "5d41402abc4b2a76b9719d911017c592.dir"}


@dataclass
class World:
    root: Path
    base: Path
    sft: Path
    grpo: Path
    runs: dict[str, str]
    md5: dict[str, str] = field(default_factory=dict)  # lineage's data md5s as dvc.lock holds them (index: real)


def make_adapter(base_model_dir: Path, out: Path, seed: int, scale: float = 1.0) -> Path:
    """A real peft LoRA adapter on the base model (random B so it changes outputs), saved untrained; `scale`
    multiplies B (a small one keeps the base model's answers readable)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out


def write_dvc_lock(root: Path) -> None:
    """dvc.lock in DVC 3's layout, with the entries lineage reads."""
    def entry(path: str, md5: str) -> dict[str, Any]:
        return {"path": path, "hash": "md5", "md5": md5, "size": 1234}

    lock = {"schema": "2.0", "stages": {
        "fetch": {"cmd": "python -m tasks.fetch", "outs": [entry("data/raw", MD5["raw"])]},
        "correct": {"cmd": "python -m tasks.correct",
                    "deps": [entry("data/raw/rationanomaly/anomaly_patch.json", MD5["corrections"]),
                             entry("corrections/reviews", MD5["reviews"])],
                    "outs": [entry("data/corrected/templates.parquet", MD5["corrected"])]},
        "split": {"cmd": "python -m tasks.split", "outs": [entry("data/split", MD5["split"])]},
        "index": {"cmd": "python -m tasks.index", "outs": [entry("models/index", MD5["index"])]},
        "distill": {"cmd": "python -m tasks.distill", "outs": [entry("data/sft/train.jsonl", MD5["distilled"])]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")


def write_reports(root: Path) -> None:
    reports = root / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "correction.json").write_text(json.dumps({
        "matched_exact": 224, "matched_normalized": 1, "unmatched": [],
        "by_direction": {"normal->abnormal": 221, "abnormal->normal": 4}}), encoding="utf-8")
    (reports / "review_queue.csv").write_text(
        "dataset,template,label\nbgl,rts tree/torus link training failed,0\nspirit,mount: RPC: Timed out,0\n",
        encoding="utf-8")
    sources = yaml.safe_load((root / "sources.yaml").read_text(encoding="utf-8"))["sources"]
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "MANIFEST.json").write_text(json.dumps({"sources_file": "sources.yaml", "files": [
        {**{k: s[k] for k in ("name", "url", "sha256", "licence")}, "origin": "mirror"} for s in sources]}),
        encoding="utf-8")
    patch = raw / "rationanomaly"
    patch.mkdir(parents=True, exist_ok=True)
    (patch / "anomaly_patch.json").write_text('[{"input": "x", "label": "normal", "rectified": "abnormal"}]',
                                              encoding="utf-8")


def training_run(stage: str, **tags: str) -> str:
    """A real MLflow run for a training stage, as sft/grpo log them."""
    import mlflow

    from tasks.common.tracking import stage_run

    with stage_run(stage, data_sha256="feedbeef", base_model_sha256="cafe", **tags) as run:
        mlflow.log_params({"max_steps": 6, "learning_rate": 5e-4})
        mlflow.log_metrics({"loss": 1.25, "reward": 0.5})
        return run.info.run_id


def index_folder(path: Path) -> Path:
    """A real retrieval index (the index stage's output) in `path`."""
    from tasks.common.retrieval import INDEX_FILE, TemplateIndex

    path.mkdir(parents=True, exist_ok=True)
    TemplateIndex(["ciod: failed to read message prefix", "generating core"], [1, 0], ["bgl", "bgl"]).save(
        path / INDEX_FILE)
    return path


def commit_outputs(root: Path, stages: tuple[str, ...] = ("grpo", "index")) -> None:
    """Record the stages' outputs (models/grpo, models/index) in dvc.lock and the DVC cache with `dvc commit`, as
    `dvc repro` leaves them: the registry checks registered bytes against these records. The stages' other deps
    and outputs, which the world does not need, get empty placeholders."""
    for placeholder in ("data/sft/train.jsonl", "data/split/train.parquet", "models/base/placeholder",
                        "reports/grpo.json", "reports/grpo_rewards.csv", "reports/review_resolution.json",
                        "data/corrected/templates.parquet"):
        (root / placeholder).parent.mkdir(parents=True, exist_ok=True)
        (root / placeholder).touch()
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run([str(dvc), "commit", "--force", *stages], cwd=root, check=True, capture_output=True)


def build_world(root: Path, base_model_dir: Path, adapters: Path) -> World:
    """The project copy; env (RATIONANOMALY_ROOT, MLFLOW_TRACKING_URI, cwd) must already point at `root`."""
    copy_project(REPO, root)
    write_dvc_lock(root)
    write_reports(root)
    runs = {"sft": training_run("sft"), "grpo": training_run("grpo")}
    sft, grpo = root / "models" / "sft", root / "models" / "grpo"
    for stage, path, src in (("sft", sft, adapters / "sft"), ("grpo", grpo, adapters / "grpo")):
        path.mkdir(parents=True)
        for f in src.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        (path / "training_meta.json").write_text(json.dumps({"stage": stage, "mlflow_run_id": runs[stage],
                                                             "data_sha256": "feedbeef", "steps": 6}),
                                                 encoding="utf-8")
    index_folder(root / "models" / "index")
    commit_outputs(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    md5 = {**MD5, "index": lock["stages"]["index"]["outs"][0]["md5"]}
    return World(root=root, base=base_model_dir, sft=sft, grpo=grpo, runs=runs, md5=md5)


def candidate_metrics(bgl: float, spirit: float, *, hdfs: float = 0.5, valid: float = 0.97) -> dict[str, Any]:
    """metrics.json as tasks.evaluate writes it, with a real evaluate run behind it."""
    def block(f1: float) -> dict[str, Any]:
        return {"f1": f1, "precision": f1, "recall": max(f1, 0.3), "format_valid_rate": valid, "n": 40,
                "n_abnormal": 6, "confusion_matrix": [[30, 4], [2, 4]]}

    blocks = {"template_bgl": block(bgl), "template_spirit": block(spirit), "session_hdfs": block(hdfs)}
    metrics = {"engine": "transformers", "candidate": "rationanomaly",
               "methods": {"rationanomaly": blocks, "keywords": {k: block(0.2) for k in blocks}},
               "speed": {}, "test_data": {"digests": {"template_bgl": "a1", "template_spirit": "b2",
                                                      "session_hdfs": "c3"}},
               "created_at": "2026-01-01T00:00:00+00:00"}
    metrics["mlflow_run_id"] = training_run("evaluate")
    return metrics


def candidate_items(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-item predictions with the metrics' F1 on each template set: 100 anomalies, 300 normal items, the first
    c anomalies caught and no false alarm, c = 100·F1/(2−F1); a higher F1 catches a superset (paired gains)."""
    out = {}
    for name in ("template_bgl", "template_spirit"):
        f1 = metrics["methods"]["rationanomaly"][name]["f1"]
        caught = round(100 * f1 / (2 - f1))
        out[name] = {"ids": [str(i) for i in range(400)], "labels": [1] * 100 + [0] * 300,
                     "pred": [1] * caught + [0] * (100 - caught) + [0] * 300,
                     "digest": metrics["test_data"]["digests"][name]}
    return out


def release(world: World, name: str, metrics: dict[str, Any], approver: str = "alice",
            reason: str = "beats the champion") -> tuple[str, Any]:
    """gate → register → promote (when the gate passed), as the release flow does."""
    from tasks.release.registry import champion_metrics, promote, register_candidate

    champion = champion_metrics(name)
    items = candidate_items(metrics)
    verdict = evaluate_gate(metrics, champion["metrics"] if champion else None, GATE,
                            champion_version=champion["version"] if champion else None, candidate_items=items,
                            champion_items=champion["items"] if champion else None)
    version = register_candidate(world.grpo, world.base, metrics, verdict, predictions=items,
                                 **register_kwargs(world, name))
    if verdict.passed:
        promote(version, approver, reason, name=name)
    return version, verdict


def register_kwargs(world: World, name: str) -> dict[str, Any]:
    """What the release flow passes to register_candidate besides the candidate: name, pyfunc config, params."""
    from tasks.release.pyfunc import model_config

    settings = load_settings(world.root / "params.yaml")
    return {"name": name, "model_config": model_config(settings.evaluate), "params": settings.model_dump(),
            "root": world.root}


def env_for(root: Path) -> dict[str, str]:
    return {"RATIONANOMALY_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")}


@contextmanager
def world_in(root: Path, base_model_dir: Path, adapters: Path) -> Iterator[World]:
    """A world built in `root` (created) with the project's environment set (env_for) and `root` the working
    folder, both undone on exit: the set-up every registry test module's `world` fixture shares."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env_for(root).items():
            mp.setenv(key, value)
        root.mkdir()
        mp.chdir(root)
        yield build_world(root, base_model_dir, adapters)
