"""A flow killed with `kill -9` (issue 22, item 3; Prefect issues 16746, 7239): the next run marks it Crashed and
stops the temporary Prefect server it left behind.

Real Prefect: each run is a subprocess on its own temporary server, as the CLI runs flows, sharing one Prefect
database (PREFECT_HOME); the first is killed while it holds the pipeline lock inside a running task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flows.recovery import RUN_RECORD, same_process_running

KILLED = """
import time
from prefect import flow, task
from flows.common import pipeline_lock

@task(name="long-stage")
def long_stage():
    print("RUNNING", flush=True)
    time.sleep(600)

@flow(name="killed-probe")
def probe():
    with pipeline_lock():
        long_stage()

probe()
"""
NEXT = """
import sys
from uuid import UUID
from prefect import flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from flows.common import pipeline_lock

@flow(name="next-probe")
def probe(killed: str) -> None:
    with pipeline_lock():
        pass
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(killed))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(killed)])))
    print("STATES", run.state.type.value, *sorted(t.state.type.value for t in tasks), flush=True)

probe(sys.argv[1])
"""


def test_a_killed_run_is_marked_crashed_and_its_orphaned_server_stopped(repo_root: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},  # a temporary server, as the CLI's
           "RATIONANOMALY_ROOT": str(project), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    killed = subprocess.Popen([sys.executable, "-c", KILLED], cwd=repo_root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    record_file = project / RUN_RECORD
    server = None
    try:
        assert killed.stdout is not None
        deadline = time.monotonic() + 300
        while (line := killed.stdout.readline()) and line.strip() != "RUNNING":
            assert time.monotonic() < deadline
        assert line.strip() == "RUNNING", "the flow never reached its task"
        record = json.loads(record_file.read_text())
        (flow_run,), (server,) = record["flow_runs"], record["servers"]
        time.sleep(5)  # the task run reaches the server as events, sent in the background
        killed.kill()  # kill -9 of the flow's process, which this test started
        killed.wait()
        time.sleep(1)
        assert same_process_running(server) is not None  # orphaned, still serving

        proc = subprocess.run([sys.executable, "-c", NEXT, flow_run["id"]], cwd=repo_root, env=env, text=True,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = [line for line in proc.stdout.splitlines() if "the previous pipeline run" in line]
        assert len(said) == 1 and f"PID {killed.pid}" in said[0], proc.stdout
        assert f"flow runs marked Crashed: {flow_run['name']} (Running)" in said[0]
        assert f"temporary Prefect server stopped (PID {server['pid']})" in said[0]
        assert "STATES CRASHED CRASHED" in proc.stdout  # the flow run and its task run
        assert same_process_running(server) is None
        assert not record_file.exists()
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
        if server is not None and (orphan := same_process_running(server)) is not None:
            orphan.kill()  # the temporary server the killed flow started, if the run under test left it
