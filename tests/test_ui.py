"""`rationanomaly ui`: the tools' own UIs for a project, started and stopped as a user does.

The browser checks of what the UIs show after a real retrain are in tests/test_retrain_e2e.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.ui import port_free


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ui_command(project: Path, prefect_port: int, mlflow_port: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "RATIONANOMALY_ROOT": str(project), "PREFECT_HOME": str(project / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen([sys.executable, "-m", "rationanomaly.cli", "ui", "--prefect-port", str(prefect_port),
                             "--mlflow-port", str(mlflow_port)], cwd=project, env=env, text=True, **popen)


def test_ui_refuses_a_port_that_is_taken_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ui_command(tmp_path, port, free_port(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"port {port} is taken" in stderr and "--prefect-port" in stderr


@pytest.mark.slow
def test_ui_serves_both_uis_for_the_project_and_sigterm_stops_both(tmp_path: Path) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = ui_command(tmp_path, prefect_port, mlflow_port, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops both" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        printed = log.read_text()
        prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        assert f"Prefect UI  {prefect}" in printed and f"MLflow UI   {mlflow}" in printed
        assert f"export PREFECT_API_URL={prefect}/api" in printed
        # the UI asks the API on the chosen port (without PREFECT_API_URL in the server's env it would ask :4200)
        assert httpx.get(f"{prefect}/ui-settings", timeout=30).json()["api_url"] == f"{prefect}/api"
        assert "<html" in httpx.get(f"{prefect}/", timeout=30).text.lower()
        assert httpx.get(f"{mlflow}/health", timeout=30).status_code == 200
        assert (tmp_path / "mlflow.db").is_file(), "the MLflow UI serves the project's own SQLite store"
    finally:
        proc.terminate()
        proc.wait(timeout=90)
    assert "stopped both UIs" in log.read_text()
    assert port_free(prefect_port) and port_free(mlflow_port), "both UI servers stopped with the command"
