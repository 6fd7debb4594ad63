"""The vLLM launcher: adapter checks (fast), then a real vLLM server with the base model and a tiny adapter (slow).

The slow tests share one module-scoped live server and run in file order: deploy → load → broken
candidates → blue/green switch → kill mid-stream and resume. Each vLLM start costs about a minute.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from workspace import free_port_pair

from serving import server
from serving.client import EndpointError, client_for, endpoint_from_state
from serving.detect import http_detector
from serving.resolve import ModelRef
from serving.smoke import SMOKE_SET
from tasks.common.errors import InputError
from tasks.common.files import write_json_atomic
from tasks.common.settings import ServeSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
DETECT = load_settings(REPO / "params.yaml").detect  # the shipped detect knobs
TEST_CACHE = REPO / ".cache" / "test-assets"
HIDDEN = 576


def write_adapter(folder: Path, rank: int = 8, config_rank: int | None = None, width: int = HIDDEN) -> Path:
    """A small real LoRA adapter file set (two layers of q_proj), enough for the file checks."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(width, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": config_rank or rank, "lora_alpha": 16,
                                                            "target_modules": ["q_proj"], "peft_type": "LORA"}))
    return folder


@pytest.fixture
def small_base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "model_type": "llama"}))
    return base


def serve_params(tmp_path: Path, port: int = 1, **overrides: Any) -> ServeSettings:
    """The shipped `serve` settings with a private state file, logs and merge folder, on `port`."""
    shipped = load_settings(REPO / "params.yaml").serve
    return shipped.model_copy(update={"state_file": str(tmp_path / "state.json"), "log_dir": str(tmp_path / "logs"),
                                      "port": port, "merged_dir": str(tmp_path / "merged"), **overrides})


# ---------------------------------------------------------------- fast: checks before any start


def test_a_truncated_adapter_is_rejected_naming_the_file(tmp_path: Path, small_base: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match=r"adapter_model\.safetensors: adapter weights unreadable"):
        server.validate_adapter(adapter, small_base)


def test_an_adapter_whose_rank_disagrees_with_its_config_is_rejected(tmp_path: Path, small_base: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter", rank=8, config_rank=16)
    with pytest.raises(InputError, match="has rank 8, config says r=16"):
        server.validate_adapter(adapter, small_base)


def test_an_adapter_for_another_base_model_is_rejected(tmp_path: Path, small_base: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter", width=1024)
    with pytest.raises(InputError, match="trained on another base model"):
        server.validate_adapter(adapter, small_base)


def test_a_sound_adapter_passes_the_file_checks(tmp_path: Path, small_base: Path) -> None:
    assert server.validate_adapter(write_adapter(tmp_path / "adapter"), small_base) == {"rank": 8, "tensors": 4}


def test_deploying_a_corrupt_adapter_starts_nothing_and_leaves_the_state_file(tmp_path: Path,
                                                                               small_base: Path) -> None:
    params = serve_params(tmp_path, port=free_port_pair())
    state = {"model": "m", "version": "1", "host": "127.0.0.1", "port": params.port, "pid": 1}
    Path(params.state_file).write_text(json.dumps(state))
    adapter = write_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError):
        server.deploy(ModelRef("m", "2", str(small_base), str(adapter)), params)
    assert json.loads(Path(params.state_file).read_text()) == state
    assert not (tmp_path / "logs").exists()  # no server was started


def test_status_and_stop_without_a_server(tmp_path: Path) -> None:
    params = serve_params(tmp_path)
    assert server.status(params)["alive"] is False
    assert server.stop(params)["stopped"] is False


def test_deploy_without_a_champion_serves_nothing_and_says_why(project: Path) -> None:
    """Before any candidate passed the gate: the retrain run stays green, `rationanomaly deploy` exits 1."""
    import subprocess
    import sys

    from flows.deploy import deploy_flow

    result = deploy_flow()
    assert result["url"] is None and "no `rationanomaly@champion` yet" in result["reason"]
    assert not (project / ".serve" / "state.json").exists()
    proc = subprocess.run([sys.executable, "-m", "rationanomaly.cli", "deploy"], cwd=project, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 1 and "nothing to serve" in proc.stdout + proc.stderr


def test_distribution_shift_is_zero_for_one_distribution_and_one_for_disjoint_tops() -> None:
    import math
    base = {"The": math.log(0.7), "<": math.log(0.2), "A": math.log(0.1)}
    assert server.distribution_shift(base, dict(base)) == pytest.approx(0.0)
    assert server.distribution_shift(base, {"x": 0.0}) == pytest.approx(1.0)
    moved = {"The": math.log(0.2), "<": math.log(0.7), "A": math.log(0.1)}
    assert server.distribution_shift(moved, base) == pytest.approx(0.5)


def test_launch_settings_survive_the_state_file_and_change_with_what_decides_the_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy compares the live state's `launch` (read back from JSON) with the new one: a float threshold must
    compare equal after the round trip, and a new threshold, merge mode or API key must not."""
    params = serve_params(tmp_path, port=8000)
    ref = ModelRef("rationanomaly", "3", "/base", "/adapter", threshold=0.1 + 0.2, index_dir="/index", neighbours=3)
    monkeypatch.setenv(params.api_key_env, "first-key")
    launch = server.launch_settings(ref, params)
    state = tmp_path / "launch.json"
    write_json_atomic(state, {"launch": launch})
    assert json.loads(state.read_text())["launch"] == launch
    assert "first-key" not in state.read_text()  # only a digest of the key is written
    changed = {
        "threshold": server.launch_settings(ModelRef(**{**ref.to_dict(), "threshold": 0.25}), params),
        "merged": server.launch_settings(ref, params.model_copy(update={"merged": not params.merged})),
        "port": server.launch_settings(ref, params.model_copy(update={"port": 9000})),
    }
    monkeypatch.setenv(params.api_key_env, "second-key")
    changed["api_key_sha256"] = server.launch_settings(ref, params)
    for key, other in changed.items():
        assert [k for k in launch if launch[k] != other[k]] == [key]
    base_only = server.launch_settings(ModelRef("rationanomaly", "3", "/base", None), params)
    assert base_only["merged"] is False  # nothing to merge without an adapter, whatever serve.merged says


def test_blue_green_ports_alternate(tmp_path: Path) -> None:
    first = free_port_pair()
    params = serve_params(tmp_path, port=first)
    assert server._choose_port(params, None) == first
    assert server._choose_port(params, {"port": first}) == first + 1
    assert server._choose_port(params, {"port": first + 1}) == first


def test_the_champion_resolves_to_local_adapter_and_base_folders(tmp_path: Path, small_base: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from serving.resolve import resolve_champion
    from tasks.common.tracking import setup_mlflow

    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (small_base / "base_model.json").write_text(json.dumps({"weights_sha256": "abc"}))
    ref_file = tmp_path / "base_model_ref.json"
    ref_file.write_text(json.dumps({"path": str(small_base), "weights_sha256": "abc"}))
    adapter = write_adapter(tmp_path / "adapter")
    mlflow = setup_mlflow()
    # the layout tasks.release.registry logs: model/artifacts/{adapter,base_model_ref.json}
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(adapter), "model/artifacts/adapter")
        mlflow.log_artifact(str(ref_file), "model/artifacts")
    client = MlflowClient()
    client.create_registered_model("rationanomaly")
    for _ in range(2):
        version = client.create_model_version("rationanomaly", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("rationanomaly", "champion", version.version)

    ref = resolve_champion("rationanomaly", fallback_base_dir=small_base)
    assert ref.version == "2" and ref.base_model_dir == str(small_base.resolve())
    assert Path(ref.adapter_dir) == tmp_path / ".serve/models/rationanomaly/2/artifacts/adapter"
    assert server.validate_adapter(ref.adapter_dir, ref.base_model_dir)["rank"] == 8
    with pytest.raises(InputError, match="no such registered model version"):
        resolve_champion("rationanomaly", alias="nobody", fallback_base_dir=small_base)


def test_cli_serve_status_without_a_server_exits_1_and_a_corrupt_adapter_is_refused(
    tmp_path: Path, small_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from rationanomaly.cli import app

    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["serve", "--status"])
    assert result.exit_code == 1 and '"alive": false' in result.output
    adapter = write_adapter(tmp_path / "adapter", config_rank=4)
    result = CliRunner().invoke(app, ["serve", "--adapter", str(adapter), "--base", str(small_base)])
    assert result.exit_code == 1
    assert "serve failed, the previous server (if any) keeps serving" in result.output
    assert "config says r=4" in result.output
    assert not (tmp_path / ".serve" / "state.json").exists()


@pytest.mark.slow
def test_merging_an_adapter_that_changes_nothing_is_refused(tmp_path: Path, base_model_dir: Path) -> None:
    inert = write_adapter(tmp_path / "inert")  # real layer names, all-zero B: merged it would be the base model
    with pytest.raises(server.ServeError, match="changes no weight"):
        server.merge_adapter(ModelRef("m", "1", str(base_model_dir), str(inert)), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------- slow: a real vLLM server


@pytest.fixture(scope="session")
def tiny_adapter(base_model_dir: Path) -> Path:
    """A real LoRA adapter trained for a few steps on the smoke set (built once per machine, ~1-4 min)."""
    from serving.tiny_adapter import cached_tiny_adapter

    return cached_tiny_adapter(base_model_dir, TEST_CACHE)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, tiny_adapter: Path) -> Any:
    """One deployed server shared by the slow tests; stopped at the end."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("serve")
    params = serve_params(folder, port=free_port_pair(), smoke_min_valid_rate=0.75, smoke_max_tokens=64,
                          health_timeout_s=400, merged=False)  # the LoRA path: its "adapter active" rule
    ref = ModelRef("rationanomaly", "1", str(base_model_dir), str(tiny_adapter))
    state = server.deploy(ref, params)
    yield {"params": params, "ref": ref, "state": state, "folder": folder}
    server.stop(params)


def ask(state_file: str, template: str = "instruction cache parity error corrected", max_tokens: int = 16) -> str:
    with client_for(endpoint_from_state(state_file), DETECT, max_retries=2, max_tokens=max_tokens,
                    rationales="all") as client:
        return client.classify_one(template, "bgl").raw


@pytest.mark.slow
def test_deploy_passes_health_and_smoke_and_records_the_live_server(live: dict[str, Any]) -> None:
    state, params = live["state"], live["params"]
    assert state["action"] == "deployed" and state["port"] == params.port
    smoke = state["smoke"]
    assert smoke["passed"] and smoke["valid_rate"] >= 0.75
    assert smoke["largest_shift"] >= params.smoke_min_distribution_shift
    assert len(smoke["rows"]) == len(SMOKE_SET)
    now = server.status(params)
    assert now["alive"] and now["healthy"] and now["version"] == "1" and now["pid"] == state["pid"]
    recorded = json.loads(Path(params.state_file).read_text())
    assert {"model", "version", "port", "pid", "started_at", "base", "adapter"} <= recorded.keys()
    assert {"<|im_start|>", "<|im_end|>"} <= set(recorded["special_tokens"])  # defanged in log text by clients
    print(f"\nvLLM ready in {state['ready_s']} s; smoke valid rate {smoke['valid_rate']:.2f}")


@pytest.mark.slow
def test_32_concurrent_clients_get_answers_with_zero_errors(live: dict[str, Any]) -> None:
    state_file = live["params"].state_file
    templates = [template for _, template, _, _ in SMOKE_SET] * 4

    def one_client(template: str) -> float:
        started = time.perf_counter()
        with client_for(endpoint_from_state(state_file), DETECT, max_retries=1, max_tokens=16, timeout_s=300) as client:
            client.classify_one(template, "bgl")
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=32) as pool:
        latencies = sorted(pool.map(one_client, templates))  # raises on the first error
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99 = cuts[49], cuts[98]
    print(f"\n32 concurrent clients: 0 errors, p50 {p50:.2f} s, p99 {p99:.2f} s")
    assert len(latencies) == 32


@pytest.mark.slow
def test_deploying_the_live_version_again_changes_nothing(live: dict[str, Any]) -> None:
    again = server.deploy(live["ref"], live["params"])
    assert again["action"] == "already_live" and again["pid"] == live["state"]["pid"]


@pytest.mark.slow
def test_a_corrupt_candidate_is_refused_and_the_live_server_keeps_answering(live: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / name).write_bytes((Path(live["ref"].adapter_dir) / name).read_bytes())
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(InputError, match="truncated or corrupt"):
        server.deploy(ModelRef("rationanomaly", "2", live["ref"].base_model_dir, str(broken)), live["params"])
    assert server.status(live["params"])["version"] == "1"
    assert "<think>" in ask(live["params"].state_file)


@pytest.mark.slow
def test_an_adapter_that_changes_nothing_fails_the_smoke_test_and_the_old_server_keeps_serving(
    live: dict[str, Any], tmp_path: Path
) -> None:
    """vllm issue 55193: a mismatched adapter silently serves the base model; the smoke test must catch it."""
    inert = tmp_path / "inert"
    inert.mkdir()
    (inert / "adapter_config.json").write_bytes((Path(live["ref"].adapter_dir) / "adapter_config.json").read_bytes())
    tensors = load_file(str(Path(live["ref"].adapter_dir) / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(inert / "adapter_model.safetensors"))
    params = live["params"]
    # judged on the next-token distribution, not the answer text (which drifted at a near-tie in CI)
    with pytest.raises(server.ServeError, match=r"unchanged on every smoke template \(largest shift 0\.0"):
        server.deploy(ModelRef("rationanomaly", "2", live["ref"].base_model_dir, str(inert)), params)
    now = server.status(params)
    assert now["healthy"] and now["version"] == "1" and now["pid"] == live["state"]["pid"]
    assert server._port_free(params.host, params.port + 1)  # the candidate was stopped
    assert "<think>" in ask(params.state_file)


@pytest.mark.slow
def test_the_live_version_with_changed_serve_settings_switches_blue_green_and_stops_the_old_server(
    live: dict[str, Any]
) -> None:
    params, old = live["params"], server.status(live["params"])
    wider = params.model_copy(update={"max_model_len": params.max_model_len + 512})
    new = server.deploy(live["ref"], wider)  # same version: only the serve settings changed
    assert new["action"] == "deployed" and new["relaunched_for"] == ["max_model_len"]
    assert new["port"] != old["port"] and new["launch"]["max_model_len"] == wider.max_model_len
    assert new["previous"]["pid"] == old["pid"]
    assert server.status(params)["healthy"] and server.status(params)["pid"] == new["pid"]
    assert not server._pid_alive(old["pid"])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{params.host}:{old['port']}/health", timeout=5)
    assert "<think>" in ask(params.state_file)


@pytest.mark.slow
def test_killing_the_server_mid_stream_is_reported_and_detection_resumes_after_a_restart(
    live: dict[str, Any], tmp_path: Path
) -> None:
    params = live["params"]
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
             "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    data = "".join(f"{w} daemon reported status {i} on node {i * 7}\n" for i, w in enumerate(words)).encode()
    detect = load_settings(REPO / "params.yaml").detect.model_copy(update={
        "cache_file": str(tmp_path / "cache.sqlite"), "drain_state": str(tmp_path / "drain.bin"), "concurrency": 2,
        "max_retries": 3, "backoff_s": 0.2, "max_tokens": 32, "timeout_s": 60})

    def run() -> dict[str, Any]:
        with http_detector(detect, lambda: endpoint_from_state(params.state_file), progress=False) as det:
            return det.run(io.BytesIO(data), io.StringIO())

    failure: list[BaseException] = []
    worker = threading.Thread(target=lambda: failure.extend(_raises(run)))
    worker.start()
    cached = 0
    for _ in range(600):  # wait (bounded) until some answers are in the cache
        time.sleep(0.5)
        if (tmp_path / "cache.sqlite").exists():
            with sqlite3.connect(tmp_path / "cache.sqlite") as db:
                cached = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        if cached >= 3:
            break
    assert cached >= 3, "no answers arrived before the kill"
    launched_context = json.loads(Path(params.state_file).read_text())["launch"]["max_model_len"]
    os.killpg(server.status(params)["pid"], signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert failure and isinstance(failure[0], EndpointError)
    assert "did not answer" in str(failure[0]) and "rerun" in str(failure[0])
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        kept = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
    assert 3 <= kept < len(words)

    assert not server.status(params)["alive"]
    # restarted as it ran (an earlier test may have relaunched it with a wider context, which scopes the cache)
    restarted = server.deploy(live["ref"], params.model_copy(update={"max_model_len": launched_context}))
    assert restarted["action"] == "deployed"
    summary = run()
    assert summary["lines"] == len(words) and summary["templates"] == len(words)
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:  # on failure: which key a rerun missed
        rows = db.execute("SELECT scope, dataset, template, valid FROM verdicts ORDER BY created_at").fetchall()
    assert summary["requested"] == len(words) - kept, rows  # what was answered before the kill is not asked again
    print(f"\nkilled after {kept} answers; the rerun asked only the remaining {summary['requested']}")


def _raises(fn: Any) -> list[BaseException]:
    try:
        fn()
    except BaseException as exc:
        return [exc]
    return []
