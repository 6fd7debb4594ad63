"""A real, self-hosted Prefect server for tests that need the Prefect API from two processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.ui import prefect_server_env, running, start_prefect_server


@contextmanager
def prefect_server(cwd: Path, home: Path, port: int, startup_s: int = 180, ui: bool = False
                   ) -> Iterator[dict[str, str]]:
    """Start `prefect server start` with its own PREFECT_HOME (and its UI when `ui`), as `rationanomaly ui` does;
    yields the env that points a process at it. Its log is `home/server.log`."""
    server = start_prefect_server(port, home / "server.log", cwd, home=home, ui=ui)
    with running(server, timeout_s=startup_s):
        yield prefect_server_env(port, home=home, ui=ui)
