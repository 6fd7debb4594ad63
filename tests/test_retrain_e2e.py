"""The real retrain flow end to end on the smoke profile: real Prefect, DVC, MLflow, trl and vLLM.

The tests share one project copy and run in order: first run → both UIs in a browser → unchanged re-run →
scheduled run → a worker on a process pool runs the deployment → failed gate → failed deploy →
killed-and-resumed training. Each later test builds on the state before it. `rationanomaly ui` runs for the
whole module, as a user opens it: every run goes through its self-hosted Prefect server (PREFECT_API_URL).
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

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "rationanomaly"
PREFECT_PORT, MLFLOW_PORT = 4296, 5296
# git-ignored, at the root of the clone running the tests; CI keeps them as test artifacts
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"  # Debian's (`make test` installs it); playwright drives it, downloads nothing
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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
def uis(module_project: Path, tmp_path_factory: pytest.TempPathFactory):
    """`rationanomaly ui` in the project copy (its own PREFECT_HOME); the module's runs go through its server."""
    home = tmp_path_factory.mktemp("prefect-home")
    log = home / "ui.log"
    urls = {"prefect": f"http://127.0.0.1:{PREFECT_PORT}", "mlflow": f"http://127.0.0.1:{MLFLOW_PORT}"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rationanomaly.cli", "ui", "--prefect-port", str(PREFECT_PORT),
                                 "--mlflow-port", str(MLFLOW_PORT)], cwd=module_project, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_HOME": str(home)})
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops both" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, f"rationanomaly ui:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("PREFECT_API_URL", f"{urls['prefect']}/api")
            monkeypatch.setenv("PREFECT_HOME", str(home))
            yield urls
    finally:
        proc.terminate()  # SIGTERM: the command stops both UIs
        proc.wait(timeout=90)
    assert "stopped both UIs" in log.read_text(), log.read_text()[-2000:]


@pytest.fixture(scope="module")
def e2e(module_project: Path, uis: dict[str, str]):
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


# ---- the tools' own UIs, in a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by playwright through its executable path."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def show(page, url: str, shot: str, texts: list[str], exact: bool = False, tab: str | None = None) -> str:
    """Open `url` (and click its `tab`), wait until each of `texts` is visible, save a full-page screenshot as
    `shot` (also on failure); returns the page's text. A text that never shows fails the test naming it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    missing = None
    try:
        if tab:
            missing = f"tab {tab}"
            page.get_by_text(tab, exact=True).filter(visible=True).first.click(timeout=90_000)
        for text in texts:
            missing = text
            page.get_by_text(text, exact=exact).filter(visible=True).first.wait_for(timeout=90_000)
        missing = None
    except PlaywrightTimeout:
        pass
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / shot), full_page=True)
        print(f"screenshot: {SCREENSHOTS / shot}")
    body = page.inner_text("body")
    assert missing is None, f"{url} never showed {missing!r} (screenshot {SCREENSHOTS / shot}):\n{body[:3000]}"
    return body


def flow_runs(api: str, flow: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", timeout=30, json={"flows": {"name": {"any_": [flow]}}}).json()


def test_the_prefect_ui_shows_the_retrain_run_its_subflows_and_its_markdown_artifacts(e2e: Path, uis, browser):
    api = f"{uis['prefect']}/api"
    (run,) = flow_runs(api, "retrain")
    (release,) = flow_runs(api, "release")
    (summary,) = httpx.post(f"{api}/artifacts/filter", timeout=30,
                            json={"artifacts": {"key": {"any_": ["retrain-summary"]}}}).json()
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    show(page, f"{uis['prefect']}/runs", "prefect-runs.png", ["retrain", run["name"]])
    run_page = f"{uis['prefect']}/runs/flow-run/{run['id']}"
    show(page, run_page, "prefect-retrain-subflows.png", [run["name"], "Completed", "data", "train", "release",
                                                          "deploy"], exact=True, tab="Subflow Runs")
    show(page, run_page, "prefect-retrain-artifacts.png", ["retrain-summary"], exact=True, tab="Artifacts")
    show(page, f"{uis['prefect']}/runs/flow-run/{release['id']}", "prefect-release-artifacts.png",
         ["evaluation-report", "gate-verdict", "model-card"], exact=True, tab="Artifacts")
    show(page, f"{uis['prefect']}/artifacts/artifact/{summary['id']}", "prefect-retrain-summary.png",
         ["Retrain summary", "Promoted"])
    assert page.locator("h1", has_text="Retrain summary").is_visible(), "the summary is rendered as Markdown"
    assert summary["flow_run_id"] == run["id"]


def test_the_mlflow_ui_shows_the_champion_its_lineage_tags_and_model_card(e2e: Path, uis, browser):
    from mlflow import MlflowClient

    champion = MlflowClient(tracking_uri=f"sqlite:///{e2e / 'mlflow.db'}").get_model_version_by_alias(MODEL, "champion")
    assert champion.description.startswith("# Model card")
    lineage = {key: champion.tags[key] for key in ("git.commit", "data.corrected.md5", "gate.passed")}
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    show(page, f"{uis['mlflow']}/#/models", "mlflow-models.png", [MODEL, "champion"])
    show(page, f"{uis['mlflow']}/#/models/{MODEL}/versions/{champion.version}", "mlflow-champion-version.png",
         [f"Version {champion.version}", "champion", f"Model card: {MODEL}", "Limits", *lineage, *lineage.values()])
    for heading in (f"Model card: {MODEL}", "Metrics", "Limits"):  # the card rendered as Markdown, not raw text
        assert page.locator("h1, h2", has_text=heading).first.is_visible(), heading


def test_unchanged_rerun_skips_every_stage_and_keeps_the_endpoint(e2e: Path):
    pid = serve_state(e2e)["pid"]
    cli(e2e, "retrain", "--profile", "smoke")
    summary = (e2e / "reports/retrain_summary.md").read_text()
    assert "| yes |" not in summary, summary
    assert "candidate unchanged (already registered as version 1 and @champion)" in summary
    assert serve_state(e2e)["pid"] == pid


def test_scheduled_deployment_runs_through_the_prefect_api(e2e: Path, uis):
    """`rationanomaly schedule` (flow.serve) picks up a run of its deployment requested through the API."""
    served = subprocess.Popen([sys.executable, "-m", "rationanomaly.cli", "schedule", "--profile", "smoke"],
                              cwd=e2e, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
        proc = subprocess.run([sys.executable, "-c", code], cwd=e2e, env=os.environ, capture_output=True, text=True,
                              timeout=1200)
        assert proc.stdout.strip().endswith("COMPLETED"), proc.stdout[-2000:] + proc.stderr[-3000:]
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=60)


def prefect_cli(project: Path, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=project, env=os.environ, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_worker_on_a_process_pool_runs_the_deployment_of_prefect_yaml(e2e: Path, uis):
    """The scale-out path: `prefect deploy` from prefect.yaml to a work pool, a run requested through the REST
    API, a process worker that pulls (working directory from $RATIONANOMALY_ROOT) and runs it."""
    api = f"{uis['prefect']}/api"
    prefect_cli(e2e, "work-pool", "create", "rationanomaly", "--type", "process")
    prefect_cli(e2e, "--no-prompt", "deploy", "--all")
    deployment = httpx.get(f"{api}/deployments/name/retrain/retrain-weekly", timeout=30).json()
    assert deployment["work_pool_name"] == "rationanomaly", deployment
    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=30,
                     json={"parameters": {"profile": "smoke"}}).json()
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "rationanomaly",
                             "--name", "e2e-worker", "--run-once"], cwd=e2e, env=os.environ, capture_output=True,
                            text=True, timeout=1500)
    log = worker.stdout + worker.stderr
    assert worker.returncode == 0, log[-4000:]
    final = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=30).json()
    assert final["state_type"] == "COMPLETED", (final["state"], log[-4000:])
    assert final["work_pool_name"] == "rationanomaly" and final["parameters"]["profile"] == "smoke"
    assert f"Worker 'e2e-worker' submitting flow run '{run['id']}'" in log, log[-4000:]
    assert "Deployment step 'set_working_directory' completed successfully" in log, log[-4000:]
    assert final["infrastructure_pid"], "a process worker records the process it started"
    summary = (e2e / "reports/retrain_summary.md").read_text()
    assert "candidate unchanged (already registered as version 1 and @champion)" in summary


def test_failed_gate_promotes_nothing_and_leaves_the_endpoint(e2e: Path):
    before, pid = aliases(e2e), serve_state(e2e)["pid"]
    edit_smoke_profile(e2e, grpo={"seed": 7}, gate={"min_f1": {"template_bgl": 1.01, "template_spirit": 0.0,
                                                              "served_bgl2k_lines_corrected": 0.0}})
    cli(e2e, "retrain")  # green: a refused candidate is a normal outcome
    summary = (e2e / "reports/retrain_summary.md").read_text()
    assert "**Not promoted**: gate failed: min_f1.template_bgl" in summary
    assert aliases(e2e) == before
    assert serve_state(e2e)["pid"] == pid and ask_endpoint(serve_state(e2e)).strip()


def test_failed_deploy_fails_the_run_and_the_old_endpoint_keeps_serving(e2e: Path):
    old = serve_state(e2e)
    edit_smoke_profile(e2e, grpo={"seed": 8}, gate={"min_f1": {"template_bgl": 0.0, "template_spirit": 0.0,
                                                              "served_bgl2k_lines_corrected": 0.0}},
                       serve={"health_timeout_s": 1})
    proc = cli(e2e, "retrain", check=False)
    assert proc.returncode != 0
    assert serve_state(e2e)["pid"] == old["pid"]
    assert ask_endpoint(old).strip()
    edit_smoke_profile(e2e, serve={"health_timeout_s": 240})


def wait_until_group_ended(group: int, timeout: float = 60.0) -> None:
    """SIGKILL is delivered at once but a process takes a moment to end: wait until none of the group runs
    (orphans left as zombies count as ended, as they would on a host whose PID 1 does not reap them)."""
    import psutil

    def running() -> list[int]:
        alive = []
        for process in psutil.process_iter(["status"]):
            try:
                if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(process.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return alive

    deadline = time.monotonic() + timeout
    while running():
        assert time.monotonic() < deadline, f"processes of the killed run still running: {running()}"
        time.sleep(0.2)


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
        wait_until_group_ended(proc.pid)
    rerun = cli(e2e, "train")
    assert "resuming from checkpoint-" in rerun.stdout + rerun.stderr
    report = json.loads((e2e / "reports/sft.json").read_text())
    assert report["steps"] == 6
