"""MLflow tracking beyond the local SQLite file: pointed at a remote tracking server (MLFLOW_TRACKING_URI, README
"Scaling out"), runs store their artifacts in the server's artifact store, not in the client's mlartifacts/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROBE = """
import mlflow
from tasks.common.tracking import stage_run
with stage_run("probe"):
    mlflow.log_text("hello from a stage", "note.txt")
print("ARTIFACT_URI " + mlflow.get_experiment_by_name("rationanomaly").artifact_location)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_remote_tracking_server_keeps_the_runs_artifacts_in_its_artifact_store(tmp_path: Path) -> None:
    port, store, project = free_port(), tmp_path / "object-store", tmp_path / "project"
    project.mkdir()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(store),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(1)
        env = {**os.environ, "RATIONANOMALY_ROOT": str(project), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
               "RATIONANOMALY_PARENT_RUN_ID": ""}
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=project, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    assert "ARTIFACT_URI mlflow-artifacts:" in proc.stdout, "the server chooses where artifacts go"
    (note,) = store.rglob("note.txt")
    assert note.read_text() == "hello from a stage"
    assert not (project / "mlartifacts").exists(), "nothing lands on the client's disk"
