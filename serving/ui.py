"""The tools' own UIs: a self-hosted Prefect server with its UI, and the MLflow UI on the project's store.

`rationanomaly ui` starts both, waits until each answers its health check, prints their URLs and stops both
on Ctrl-C. The Prefect server keeps its database in PREFECT_HOME (Prefect's default, `~/.prefect`, unless set):
the same database the temporary server of every earlier `rationanomaly` run wrote to, so those runs are listed.
Point later runs at the server (PREFECT_API_URL, printed) and they show up live. Its UI asks the API at the
address the *server* was told (PREFECT_API_URL in the server's own environment, default port 4200): a server on
another port without it shows "Can't connect to Server API".
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PREFECT_PORT = 4200  # Prefect's and MLflow's own defaults, so their docs' URLs work as written
MLFLOW_PORT = 5000
HOST = "127.0.0.1"


class UiError(RuntimeError):
    """A UI process that did not come up (its log file says why) or a port already taken."""


@dataclass
class UiProcess:
    """One running UI server: what it is, where it answers, its process and its log file."""

    name: str
    url: str
    health_url: str
    log: Path
    process: subprocess.Popen = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None


def prefect_server_env(port: int, host: str = HOST, home: Path | None = None, ui: bool = True) -> dict[str, str]:
    """The environment of a self-hosted Prefect server; processes given it run their flows through that server.

    PREFECT_API_URL is set in the server's own environment too: its UI reads the API address from it.
    """
    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://{host}:{port}/api",
        "PREFECT_UI_ENABLED": "true" if ui else "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return env


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) != 0


def _start(name: str, cmd: list[str], env: dict[str, str], url: str, health: str, log: Path, cwd: Path) -> UiProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:  # the child keeps its own handle
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return UiProcess(name, url, health, log, process)


def start_prefect_server(port: int, log: Path, cwd: Path, host: str = HOST, home: Path | None = None,
                         ui: bool = True) -> UiProcess:
    """`prefect server start` on host:port (with its UI unless `ui` is False); returns at once (see `wait_ready`)."""
    if not port_free(port, host):
        raise UiError(f"port {port} is taken (another Prefect server or `rationanomaly ui`?); choose --prefect-port")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    base = f"http://{host}:{port}"
    return _start("Prefect", cmd, prefect_server_env(port, host, home, ui), base, f"{base}/api/health", log, cwd)


def start_mlflow_ui(root: Path, port: int, log: Path, host: str = HOST) -> UiProcess:
    """`mlflow ui` on the project's SQLite store (`mlflow.db`) and artifact folder (`mlartifacts/`)."""
    if not port_free(port, host):
        raise UiError(f"port {port} is taken (another MLflow UI or `rationanomaly ui`?); choose --mlflow-port")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(root / "mlartifacts"), "--host", host, "--port", str(port)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    base = f"http://{host}:{port}"
    return _start("MLflow", cmd, env, base, f"{base}/health", log, root)


def wait_ready(ui: UiProcess, timeout_s: float = 180) -> float:
    """Wait until the UI's health URL answers 200; returns the seconds it took. Raises UiError (with the log's
    tail) when the process exits or the time runs out."""
    import httpx

    start = time.monotonic()
    while True:
        try:
            if httpx.get(ui.health_url, timeout=3).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if not ui.alive() or time.monotonic() - start > timeout_s:
            tail = ui.log.read_text(encoding="utf-8", errors="replace")[-2000:] if ui.log.exists() else ""
            state = f"exited with code {ui.process.poll()}" if not ui.alive() else f"no answer in {timeout_s:.0f} s"
            raise UiError(f"{ui.name} UI at {ui.url} {state}; log {ui.log}:\n{tail}")
        time.sleep(1)


def stop(ui: UiProcess, timeout_s: float = 30) -> None:
    """SIGTERM the UI's process group, SIGKILL it when it has not exited after `timeout_s`."""
    if not ui.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(ui.process.pid, signal.SIGTERM)
    try:
        ui.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.process.pid, signal.SIGKILL)
        ui.process.wait()


@contextlib.contextmanager
def running(*uis: UiProcess, timeout_s: float = 180) -> Iterator[tuple[UiProcess, ...]]:
    """Wait for every UI to be ready, yield them, stop them all on the way out (also when one failed to start)."""
    try:
        for ui in uis:
            wait_ready(ui, timeout_s)
        yield uis
    finally:
        for ui in uis:
            stop(ui)


def open_uis(root: Path, host: str = HOST, prefect_port: int = PREFECT_PORT, mlflow_port: int = MLFLOW_PORT,
             prefect_home: Path | None = None) -> tuple[UiProcess, UiProcess]:
    """Start the Prefect server (with UI) and the MLflow UI for the project at `root`; logs in `.cache/ui/`."""
    logs = root / ".cache" / "ui"
    prefect = start_prefect_server(prefect_port, logs / "prefect.log", root, host, prefect_home)
    try:
        mlflow = start_mlflow_ui(root, mlflow_port, logs / "mlflow.log", host)
    except BaseException:
        stop(prefect)
        raise
    return prefect, mlflow


def wait_until_one_exits(uis: tuple[UiProcess, ...], poll_s: float = 1.0) -> UiProcess:
    """Block until one of the UI processes exits (Ctrl-C raises KeyboardInterrupt here); returns that one."""
    while True:
        for ui in uis:
            if not ui.alive():
                return ui
        time.sleep(poll_s)
