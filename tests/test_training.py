"""sft and grpo stages: real tiny trainings of the default model on real BGL templates (smoke profile).

The stages run as DVC runs them (`python -m tasks.<stage>` in a project folder), in subprocesses, so a
kill and a resume are real. Bad inputs are checked in-process: they must fail before any training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tasks.common.config import load_params, set_profile
from tasks.common.errors import InputError
from tasks.common.prompt import training_messages
from tasks.common.settings import load_settings, validate_settings
from tasks.training.rewards import COMPONENTS, metric_name

REPO = Path(__file__).resolve().parents[1]


# ---- helpers: a small real SFT dataset and a project folder ---------------------------------------------------


def short_rationale(log: str, label: int) -> str:
    """A short three-part rationale in the lexicon teacher's shape (domain, core information, deduction)."""
    words = [w for w in log.replace(":", " ").split() if w.isalpha()]
    component = words[0] if words else "the component"
    deduction = (
        "it reports a failure that stops work on the node, so an operator must act"
        if label
        else "it is routine status output with no error, so nothing needs to be done"
    )
    return (
        f'Domain: {component} messages come from BGL system software. Core: the log says "{log[:60]}". '
        f"Deduction: {deduction}."
    )


def record(log: str, label: int) -> dict[str, Any]:
    rationale = short_rationale(log, label)
    messages = training_messages(log, rationale, label, "BGL")
    return {
        "messages": messages,
        "prompt": messages[:2],
        "completion": messages[2:],
        "template": log,
        "dataset": "bgl",
        "label": label,
        "rationale": rationale,
    }


def write_sft_jsonl(mirror: Path, path: Path, n_normal: int = 20, n_abnormal: int = 4) -> Path:
    """Real BGL templates (shortest first, so every example fits the smoke max_length)."""
    frame = pd.read_csv(mirror / "logprompt" / "templates_bgl.csv", keep_default_na=False)
    frame = frame.assign(n=frame["log"].str.len()).sort_values(["n", "log"])
    rows = [record(t, 1) for t in frame[frame.label == 1].log.head(n_abnormal)]
    rows += [record(t, 0) for t in frame[frame.label == 0].log.head(n_normal)]
    rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (i * 7) % len(rows))]  # mix the classes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_project(root: Path, base_model_dir: Path, mirror: Path, overrides: dict[str, Any] | None = None) -> Path:
    """params.yaml on the smoke profile (plus `overrides` merged into it), configs/, the base model, the data."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "configs", root / "configs")
    set_profile("smoke", root / "params.yaml")
    if overrides:
        raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        for stage, values in overrides.items():
            raw["profiles"]["smoke"].setdefault(stage, {}).update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "base").symlink_to(base_model_dir.resolve(), target_is_directory=True)
    write_sft_jsonl(mirror, root / "data" / "sft" / "train.jsonl")
    return root


def stage_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RATIONANOMALY_ROOT": str(root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "RATIONANOMALY_PARENT_RUN_ID": "",
    }


def run_stage(root: Path, stage: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=root,
        env=stage_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (root / f"{stage}.stdout.log").write_text(proc.stdout, encoding="utf-8")
    return proc


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def stage_runs(root: Path, stage: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rationanomaly")
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'", order_by=["start_time ASC"])


def metric_steps(root: Path, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---- the smoke runs (shared by the tests below) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_project(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, mirror: Path) -> Path:
    """SFT on the smoke profile, killed after its first checkpoint, then rerun to the end."""
    root = make_project(tmp_path_factory.mktemp("train") / "project", base_model_dir, mirror)
    params = load_params(root / "params.yaml")["sft"]  # plain data: the values as written
    first_ckpt = root / params["checkpoint_dir"] / f"checkpoint-{params['save_steps']}" / "trainer_state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.sft"],
        cwd=root,
        env=stage_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 900
        while not first_ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first_ckpt.exists(), f"no checkpoint appeared: {proc.poll()=}\n{proc.stderr.read()[-3000:]}"
    finally:
        proc.kill()
        proc.wait()
    assert not (root / params["out_dir"]).exists(), "a killed run must not publish an adapter"
    run_stage(root, "sft")
    return root


@pytest.fixture(scope="module")
def grpo_project(sft_project: Path) -> Path:
    run_stage(sft_project, "grpo")
    return sft_project


@pytest.mark.slow
def test_killed_sft_resumes_from_its_last_checkpoint_and_ends_at_the_configured_step(sft_project: Path):
    params = load_params(sft_project / "params.yaml")["sft"]
    report = read_json(sft_project / "reports" / "sft.json")
    assert report["resumed_from_step"] == params["save_steps"]
    assert report["steps"] == params["max_steps"]
    assert not (sft_project / params["checkpoint_dir"]).exists(), "checkpoints are removed after success"


@pytest.mark.slow
def test_sft_writes_a_safetensors_adapter_tokenizer_and_training_metadata(sft_project: Path):
    params = load_params(sft_project / "params.yaml")["sft"]
    out = sft_project / "models" / "sft"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "training_meta.json",
    ):
        assert (out / name).is_file(), name
    meta = read_json(out / "training_meta.json")
    base = read_json(sft_project / "models" / "base" / "base_model.json")
    assert meta["base_model_sha256"] == base["weights_sha256"]
    assert meta["trainable_params"] > 0 and meta["trainable_params"] < meta["total_params"] / 50
    assert meta["params"]["lora"]["target_modules"] == params["lora"]["target_modules"]
    assert meta["prompt_tokens_masked_first_example"] > 100, "system+user prompt is masked from the loss"
    adapter = read_json(out / "adapter_config.json")
    assert adapter["r"] == meta["params"]["lora"]["r"]
    assert sorted(adapter["target_modules"]) == sorted(meta["params"]["lora"]["target_modules"])


@pytest.mark.slow
def test_sft_run_is_tracked_in_mlflow_with_params_loss_per_step_and_dataset(sft_project: Path):
    params = load_params(sft_project / "params.yaml")["sft"]
    run = stage_runs(sft_project, "sft")[-1]
    assert run.data.params["lora.r"] == str(params["lora"]["r"])
    assert run.data.params["learning_rate"] == str(params["learning_rate"])
    assert run.data.metrics["trainable_params"] > 0 and run.data.metrics["wall_time_s"] > 0
    resumed = params["save_steps"]
    assert metric_steps(sft_project, run.info.run_id, "loss") == list(range(resumed + 1, params["max_steps"] + 1))
    assert metric_steps(sft_project, run.info.run_id, "learning_rate")
    (dataset_input,) = run.inputs.dataset_inputs
    md5 = hashlib.md5((sft_project / "data" / "sft" / "train.jsonl").read_bytes()).hexdigest()
    assert dataset_input.dataset.name == "sft-cot" and dataset_input.dataset.digest == md5, "same entity as flows/data"


@pytest.mark.slow
def test_grpo_trains_the_sft_adapter_so_its_tensors_change(grpo_project: Path):
    from tasks.training.model import adapter_digest

    sft, grpo = grpo_project / "models" / "sft", grpo_project / "models" / "grpo"
    assert adapter_digest(grpo) != adapter_digest(sft)
    meta = read_json(grpo / "training_meta.json")
    assert meta["sft_adapter_sha256"] == adapter_digest(sft)
    assert meta["trainable_params"] > 0
    assert not (grpo / "ref").exists(), "only the trained adapter is published, not trl's frozen reference copy"


@pytest.mark.slow
def test_grpo_logs_every_reward_component_per_step_to_mlflow(grpo_project: Path):
    steps = load_params(grpo_project / "params.yaml")["grpo"]["max_steps"]
    run = stage_runs(grpo_project, "grpo")[-1]
    expected = list(range(1, steps + 1))
    for key in [metric_name(c) for c in COMPONENTS] + ["completions/mean_length", "kl", "reward"]:
        assert metric_steps(grpo_project, run.info.run_id, key) == expected, key
    per_class = [k for k in run.data.metrics if k.startswith("rewards/answer/")]
    assert per_class, "answer reward per class is logged"
    artifacts = {
        a.path
        for a in __import__("mlflow")
        .tracking.MlflowClient(tracking_uri=f"sqlite:///{grpo_project / 'mlflow.db'}")
        .list_artifacts(run.info.run_id)
    }
    assert {"grpo_rewards.csv", "grpo_rewards.png"} <= artifacts


@pytest.mark.slow
def test_grpo_writes_the_reward_curve_and_report(grpo_project: Path):
    steps = load_params(grpo_project / "params.yaml")["grpo"]["max_steps"]
    curve = pd.read_csv(grpo_project / "reports" / "grpo_rewards.csv")
    assert curve["step"].tolist() == list(range(1, steps + 1))
    assert {*COMPONENTS, "answer_abnormal", "answer_normal", "completion_length", "kl"} <= set(curve.columns)
    assert (grpo_project / "reports" / "grpo_rewards.png").read_bytes()[:4] == b"\x89PNG"
    report = read_json(grpo_project / "reports" / "grpo.json")
    assert report["steps"] == steps and report["wall_time_s"] > 0
    sft_report = read_json(grpo_project / "reports" / "sft.json")
    shared = {k for k in sft_report if k in report}
    assert {"wall_time_s", "examples", "train_loss", "mlflow_run_id", "data_sha256"} <= shared
    assert "runtime_s" not in report and "prompts" not in report and "runtime_s" not in sft_report
    assert set(COMPONENTS) <= set(report["final_rewards"]) and set(COMPONENTS) <= set(report["first_rewards"])
    assert report["final_rewards"]["format"] == curve["format"].iloc[-1]


@pytest.mark.slow
def test_training_prints_step_eta_and_current_loss_or_reward(grpo_project: Path):
    sft_log = (grpo_project / "sft.stdout.log").read_text(encoding="utf-8")
    grpo_log = (grpo_project / "grpo.stdout.log").read_text(encoding="utf-8")
    assert re.search(r"\[sft\] step 4/4 +elapsed \d+s +eta 0s +loss=\S+", sft_log), sft_log[-2000:]
    assert re.search(r"\[grpo\] step 1/2 +elapsed \d+s +eta \d+s +loss=\S+ +reward=\S+", grpo_log), grpo_log[-2000:]


@pytest.mark.slow
def test_sft_runs_through_accelerate_launch_when_a_config_is_set(tmp_path: Path, base_model_dir: Path, mirror: Path):
    root = make_project(
        tmp_path / "project",
        base_model_dir,
        mirror,
        overrides={"sft": {"accelerate_config": "configs/accelerate_cpu.yaml", "max_steps": 1, "save_steps": 10}},
    )
    proc = run_stage(root, "sft")
    assert "accelerate.commands.launch --config_file" in proc.stdout
    meta = read_json(root / "models" / "sft" / "training_meta.json")
    assert meta["launcher"] == "accelerate" and meta["steps"] == 1 and meta["world_size"] == 1


@pytest.mark.slow
def test_sft_trains_data_parallel_in_two_cpu_processes_and_publishes_one_adapter(
    tmp_path: Path, base_model_dir: Path, mirror: Path
):
    """configs/accelerate_cpu_ddp.yaml: `accelerate launch` starts two processes (torchrun) that form a gloo group."""
    steps = 2
    root = make_project(
        tmp_path / "project",
        base_model_dir,
        mirror,
        overrides={"sft": {"accelerate_config": "configs/accelerate_cpu_ddp.yaml", "max_steps": steps,
                           "save_steps": 1, "keep_checkpoints": True}},
    )
    proc = run_stage(root, "sft")
    log = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"[sft] process {rank} of 2 finished at step {steps}" in proc.stdout, log[-4000:]
    meta = read_json(root / "models" / "sft" / "training_meta.json")
    assert meta["launcher"] == "accelerate" and meta["world_size"] == 2 and meta["steps"] == steps
    # each process saw its half of the batches: an epoch is half as many steps as in one process
    state = read_json(root / "models" / "checkpoints" / "sft" / f"checkpoint-{steps}" / "trainer_state.json")
    batches = math.ceil(meta["examples"] / meta["params"]["per_device_train_batch_size"])
    assert state["epoch"] == pytest.approx(steps / math.ceil(batches / 2)), (state["epoch"], batches)
    # published once, by rank 0: one adapter, no staging leftovers, one MLflow run with every step's loss
    out = root / "models" / "sft"
    assert (out / "adapter_model.safetensors").is_file() and not list((root / "models").glob(".sft*"))
    assert read_json(root / "reports" / "sft.json")["adapter_sha256"] == meta["adapter_sha256"]
    (run,) = stage_runs(root, "sft")
    assert metric_steps(root, run.info.run_id, "loss") == list(range(1, steps + 1))


# ---- bad input fails before any training ----------------------------------------------------------------------


@pytest.fixture
def stage_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The smoke-profile sft/grpo params with every path inside tmp_path."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_profile("smoke", tmp_path / "params.yaml")
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = load_settings(tmp_path / "params.yaml")
    return {"sft": settings.sft, "grpo": settings.grpo}


def fake_base_model(root: Path) -> Path:
    """A folder that passes the path check (config.json) but holds no weights: nothing may get as far as loading."""
    base = root / "models" / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}", encoding="utf-8")
    return base


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = record("ciod: Error loading <*>", 1)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ({**GOOD, "messages": "hello"}, "train.jsonl:2 field 'messages': expected a list of 3 messages"),
        ({**GOOD, "messages": GOOD["messages"][:2]}, "train.jsonl:2 field 'messages': expected a list of 3"),
        (
            {**GOOD, "messages": [GOOD["messages"][0], {"role": "bot", "content": "x"}, GOOD["messages"][2]]},
            "train.jsonl:2 field 'messages[1].role': expected role 'user', found 'bot'",
        ),
        (
            {**GOOD, "messages": [*GOOD["messages"][:2], {"role": "assistant", "content": "abnormal"}]},
            "train.jsonl:2 field 'messages[2].content': assistant message is not",
        ),
        ({**GOOD, "label": 0}, "train.jsonl:2 field 'label': label 0 disagrees with the assistant's answer"),
        ("{not json", "train.jsonl:2: not valid JSON"),
    ],
    ids=[
        "messages-not-a-list",
        "no-assistant-turn",
        "wrong-role",
        "unparseable-completion",
        "label-mismatch",
        "not-json",
    ],
)
def test_malformed_sft_data_is_rejected_with_file_line_and_field(tmp_path, stage_params, bad_line, expected):
    from tasks.sft import run as run_sft

    fake_base_model(tmp_path)
    write_lines(tmp_path / "data" / "sft" / "train.jsonl", [GOOD, bad_line, GOOD])
    with pytest.raises(InputError) as err:
        run_sft(stage_params["sft"])
    assert str(err.value).startswith(str(tmp_path / "data" / "sft" / "train.jsonl"))
    assert expected in str(err.value)


def test_an_empty_sft_dataset_is_rejected(tmp_path, stage_params):
    from tasks.sft import run as run_sft

    fake_base_model(tmp_path)
    write_lines(tmp_path / "data" / "sft" / "train.jsonl", ["", "  "])
    with pytest.raises(InputError, match="the SFT dataset is empty"):
        run_sft(stage_params["sft"])


def test_a_missing_base_model_path_is_rejected_naming_the_param(tmp_path, stage_params):
    from tasks.sft import run as run_sft

    write_lines(tmp_path / "data" / "sft" / "train.jsonl", [GOOD])
    with pytest.raises(InputError, match=r"models/base field 'sft.base_model_dir': base model folder does not exist"):
        run_sft(stage_params["sft"])


def test_grpo_without_the_configured_sft_adapter_is_rejected(tmp_path, stage_params):
    from tasks.grpo import run as run_grpo

    fake_base_model(tmp_path)
    write_lines(tmp_path / "data" / "sft" / "train.jsonl", [GOOD])
    with pytest.raises(
        InputError,
        match=r"models/sft/adapter_config.json field 'grpo.sft_adapter_dir': "
        r"SFT adapter missing \(run `dvc repro sft` first",
    ):
        run_grpo(stage_params["grpo"])


@pytest.mark.slow
def test_a_lora_target_module_missing_from_the_model_is_rejected_with_the_available_names(
    tmp_path, stage_params, base_model_dir
):
    from tasks.sft import run as run_sft

    write_lines(tmp_path / "data" / "sft" / "train.jsonl", [GOOD])
    sft = stage_params["sft"]
    params = sft.model_copy(update={"base_model_dir": str(base_model_dir), "lora": sft.lora.model_copy(
        update={"target_modules": ["q_proj", "query_key_value"]})})
    with pytest.raises(InputError) as err:
        run_sft(params)
    message = str(err.value)
    assert "field 'sft.lora.target_modules': LoRA target modules ['query_key_value'] do not exist" in message
    assert "linear modules available: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    assert not (tmp_path / "models" / "checkpoints").exists(), "failed before any training state was made"


@pytest.mark.slow
def test_sft_masks_the_prompt_so_only_the_assistant_turn_is_trained(tmp_path, stage_params, base_model_dir):
    from tasks.sft import prepare_sft

    write_lines(tmp_path / "data" / "sft" / "train.jsonl", [GOOD, record("kernel panic", 1)])
    prep = prepare_sft(stage_params["sft"].model_copy(update={"base_model_dir": str(base_model_dir)}))
    tokenizer = prep.trainer.processing_class
    for example in prep.trainer.train_dataset:
        labels, ids = example["labels"], example["input_ids"]
        first = next(i for i, x in enumerate(labels) if x != -100)
        assert all(x == -100 for x in labels[:first]) and labels[first:] == ids[first:]
        assert tokenizer.decode(ids[first:]).strip() in {
            m["completion"][0]["content"] + "<|im_end|>" for m in (GOOD, record("kernel panic", 1))
        }
        assert "<|im_start|>assistant" in tokenizer.decode(ids[:first]), "the generation prompt is context only"


def test_balancing_repeats_anomalies_up_to_the_fraction_and_refuses_a_bad_one() -> None:
    from tasks.training.records import balance_classes

    records = [{"label": 1, "id": i} for i in range(10)] + [{"label": 0, "id": i} for i in range(10, 100)]
    balanced, added = balance_classes(records, 0.3, seed=1, field_name="sft.balance_abnormal_fraction")
    share = sum(r["label"] for r in balanced) / len(balanced)
    assert added == len(balanced) - 100 > 0 and abs(share - 0.3) < 0.01
    assert balanced[:100] == records and all(r["label"] == 1 for r in balanced[100:])
    assert balance_classes(records, 0.3, seed=1, field_name="f")[0] == balanced  # seeded
    assert balance_classes(records, 0.05, seed=1, field_name="f") == (records, 0)  # already above: nothing added
    assert balance_classes(records, None, seed=1, field_name="f") == (records, 0)
    raw = load_params(REPO / "params.yaml")
    raw["sft"]["balance_abnormal_fraction"] = 1.0
    with pytest.raises(InputError, match=r"field 'sft.balance_abnormal_fraction': .*less than 1"):
        validate_settings(raw)
    with pytest.raises(InputError, match="no abnormal example"):
        balance_classes([{"label": 0}], 0.3, seed=1, field_name="f")


def test_both_training_reports_name_each_shared_fact_alike_and_the_train_summary_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One frame writes the facts sft and grpo share (issue 19 item 5: `runtime_s` vs `wall_time_s`, `examples` vs
    `prompts`, and a `seconds` key flows/train.py read that no report wrote); each stage adds only its own fields."""
    from transformers import TrainerState

    from flows.train import reward_summary_markdown
    from tasks.common.contracts import GrpoReport, SftReport, TrainingReport
    from tasks.grpo import PreparedGrpo, grpo_fields
    from tasks.sft import PreparedSft, sft_fields
    from tasks.training.checkpoints import Resume
    from tasks.training.stage import (
        RUN_METRICS,
        SHARED_REPORT_KEYS,
        RunStats,
        TrainingInputs,
        run_metrics,
        shared_report,
        with_stage_fields,
    )

    settings = load_settings(REPO / "params.yaml")
    inputs = TrainingInputs(tmp_path / "train.jsonl", [], 3, tmp_path / "base", "d" * 64, "b" * 64)
    frame = {"inputs": inputs, "out_dir": tmp_path, "ckpt_dir": tmp_path, "resume": Resume(None, 2), "dropped": 1,
             "trainable": 10, "total": 1000}
    sft_prep = PreparedSft(trainer=None, masked=150, **frame)
    grpo_prep = PreparedGrpo(trainer=None, sft_digest="s" * 64, **frame)
    # what the stages read from the trained Trainer: its log history (a real TrainerState)
    sft_history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 4}]
    grpo_history = [{"step": 1, "reward": 0.5, metric_name("format"): 1.0}]
    sft_done = type("Trained", (), {"state": TrainerState(log_history=sft_history)})
    grpo_done = type("Trained", (), {"state": TrainerState(log_history=grpo_history)})
    reports = {}
    for stage, prep, stage_settings, own in (
        ("sft", sft_prep, settings.sft, sft_fields(sft_prep)),
        ("grpo", grpo_prep, settings.grpo, grpo_fields(grpo_prep, settings.grpo)),
    ):
        stats = RunStats(steps=4, wall_s=12.34 if stage == "sft" else 56.78, cpu_s=20.0, train_loss=1.7, examples=24,
                         launcher="in-process", world_size=1)
        shared = shared_report(stage, stage_settings, prep, stats, "run-id")
        reports[stage] = with_stage_fields(shared, own(sft_done if stage == "sft" else grpo_done))
    assert set(SHARED_REPORT_KEYS) == set(TrainingReport.__annotations__)
    assert set(reports["sft"]) == set(SftReport.__annotations__)
    assert set(reports["grpo"]) == set(GrpoReport.__annotations__)
    assert set(reports["sft"]) & set(reports["grpo"]) == set(SHARED_REPORT_KEYS)
    assert reports["sft"]["s_per_step"] == round(12.34 / 2, 3), "per step of this run: 4 steps, resumed at 2"
    assert set(run_metrics(reports["sft"])) == set(run_metrics(reports["grpo"])) == set(RUN_METRICS)
    with pytest.raises(ValueError, match=r"\['examples'\] are shared facts"):
        with_stage_fields(reports["sft"], {"examples": 3})

    (tmp_path / "reports").mkdir()
    for stage, report in reports.items():
        (tmp_path / "reports" / f"{stage}.json").write_text(json.dumps(report), encoding="utf-8")
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    summary = reward_summary_markdown([])
    assert "| sft | 4 | 12.3 |" in summary and "| grpo | 4 | 56.8 |" in summary, summary
