"""The real retrain flow end to end on the smoke profile: real Prefect, DVC, MLflow, trl and vLLM.

The tests share one project copy and run in order: first run → unchanged re-run → scheduled run →
failed gate → failed deploy → killed-and-resumed training. Each later test builds on the state before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect_server import prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "rationanomaly"


def cli(project: Path, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: int = 2400):
    """Run `rationanomaly ...` as a user would, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "rationanomaly.cli", *args], cwd=project, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=timeout)
    sys.stdout.write(proc.stdout[-6000:])
    sys.stderr.write(proc.stderr[-6000:])
    if check:
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, f"rationanomaly {' '.join(args)} failed:\n{output}"
    return proc


def edit_smoke_profile(project: Path, **sections: dict) -> None:
    """Change the smoke overlay in the copy's params.yaml (DVC sees it as a params change)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        params["profiles"]["smoke"].setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def aliases(project: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    model = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_registered_model(MODEL)
    return {alias: str(version) for alias, version in model.aliases.items()}


def serve_state(project: Path) -> dict:
    return json.loads((project / ".serve/state.json").read_text())


def ask_endpoint(state: dict) -> str:
    """One chat request to the live endpoint; returns the completion text."""
    from tasks.common.prompt import prompt_messages

    response = httpx.post(
        f"http://{state['host']}:{state['port']}/v1/chat/completions", timeout=120,
        json={"model": state["served_model"], "max_tokens": 48, "temperature": 0,
              "messages": prompt_messages("ciod: failed to read message prefix on control stream", "bgl")},
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def e2e(module_project: Path):
    """First retrain on a fresh copy; stops the endpoint when the module ends."""
    start = time.monotonic()
    cli(module_project, "retrain", "--profile", "smoke")
    elapsed = time.monotonic() - start
    timing = os.environ.get("E2E_TIMING_FILE")
    if timing:
        Path(timing).write_text(f"{elapsed:.0f}\n")
    print(f"\nend-to-end retrain (smoke) wall time: {elapsed:.0f} s")
    yield module_project
    cli(module_project, "serve", "--stop", check=False)


def test_first_run_promotes_and_serves_a_champion_that_answers(e2e: Path):
    assert aliases(e2e)["champion"] == "1"
    summary = (e2e / "reports/retrain_summary.md").read_text()
    assert "**Promoted**: version 1" in summary
    state = serve_state(e2e)
    assert state["version"] == "1"
    assert ask_endpoint(state).strip()


def test_unchanged_rerun_skips_every_stage_and_keeps_the_endpoint(e2e: Path):
    pid = serve_state(e2e)["pid"]
    cli(e2e, "retrain", "--profile", "smoke")
    summary = (e2e / "reports/retrain_summary.md").read_text()
    assert "| yes |" not in summary, summary
    assert "candidate unchanged (already registered as version 1 and @champion)" in summary
    assert serve_state(e2e)["pid"] == pid


def test_scheduled_deployment_runs_through_the_prefect_api(e2e: Path, tmp_path: Path):
    with prefect_server(e2e, tmp_path / "prefect", port=4297) as env:
        served = subprocess.Popen([sys.executable, "-m", "rationanomaly.cli", "schedule", "--profile", "smoke"],
                                  cwd=e2e, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            code = (
                "import time\nfrom prefect.deployments import run_deployment\n"
                "from prefect.exceptions import ObjectNotFound\n"
                "for _ in range(60):\n"
                "    try:\n"
                "        run = run_deployment('retrain/retrain-weekly', parameters={'profile': 'smoke'}, timeout=900)\n"
                "        break\n"
                "    except ObjectNotFound:\n"
                "        time.sleep(2)\n"
                "print(run.state.type.value)\n"
            )
            proc = subprocess.run([sys.executable, "-c", code], cwd=e2e, env=env, capture_output=True, text=True,
                                  timeout=1200)
            assert proc.stdout.strip().endswith("COMPLETED"), proc.stdout[-2000:] + proc.stderr[-3000:]
        finally:
            os.killpg(served.pid, signal.SIGTERM)
            served.wait(timeout=60)


def test_failed_gate_promotes_nothing_and_leaves_the_endpoint(e2e: Path):
    before, pid = aliases(e2e), serve_state(e2e)["pid"]
    edit_smoke_profile(e2e, grpo={"seed": 7}, gate={"min_f1": {"template_bgl": 1.01, "template_spirit": 0.0}})
    cli(e2e, "retrain")  # green: a refused candidate is a normal outcome
    summary = (e2e / "reports/retrain_summary.md").read_text()
    assert "**Not promoted**: gate failed: min_f1.template_bgl" in summary
    assert aliases(e2e) == before
    assert serve_state(e2e)["pid"] == pid and ask_endpoint(serve_state(e2e)).strip()


def test_failed_deploy_fails_the_run_and_the_old_endpoint_keeps_serving(e2e: Path):
    old = serve_state(e2e)
    edit_smoke_profile(e2e, grpo={"seed": 8}, gate={"min_f1": {"template_bgl": 0.0, "template_spirit": 0.0}},
                       serve={"health_timeout_s": 1})
    proc = cli(e2e, "retrain", check=False)
    assert proc.returncode != 0
    assert serve_state(e2e)["pid"] == old["pid"]
    assert ask_endpoint(old).strip()
    edit_smoke_profile(e2e, serve={"health_timeout_s": 240})


def test_killed_training_resumes_from_its_checkpoint_and_redoes_no_finished_stage(e2e: Path):
    edit_smoke_profile(e2e, sft={"seed": 9, "max_steps": 6, "save_steps": 2})
    checkpoints = e2e / "models/checkpoints/sft"
    proc = subprocess.Popen([sys.executable, "-m", "rationanomaly.cli", "train"], cwd=e2e, env=os.environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        # trainer_state.json is the last file the Trainer writes into a checkpoint: it is complete
        while time.monotonic() < deadline and not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            time.sleep(1)
        assert list(checkpoints.glob("checkpoint-*/trainer_state.json")), "no complete SFT checkpoint appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rerun = cli(e2e, "train")
    assert "resuming from checkpoint-" in rerun.stdout + rerun.stderr
    report = json.loads((e2e / "reports/sft.json").read_text())
    assert report["steps"] == 6
