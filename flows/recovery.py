"""A pipeline run killed before it finished (`kill -9`, the OOM killer, a lost machine): the next run marks its
Prefect flow runs Crashed and stops the temporary Prefect server it left behind (issue 22, item 3; Prefect issues
16746 and 7239: such a run stays RUNNING forever).

Why our own check at the next start rather than Prefect's: Prefect 3.7.7 flow runs send a heartbeat event every
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (180), but the open-source server has no service that acts on a missing
one; it takes an automation with a proactive trigger ("expect a heartbeat within N s, else set Crashed"), which only
fires while a server runs and N seconds after the last heartbeat. The CLI's flows run on a temporary server that
lives as long as the run (or, after `kill -9`, lives on orphaned), so that automation would mark the run Crashed
late or never. The pipeline lock (flows.common.pipeline_lock) already tells the next run for certain that the last
one ended: it writes what it is (its process, its flow runs, its temporary server) into RUN_RECORD while it holds
the lock and deletes it when it lets go; a record found by the next holder belongs to a run that died.

The orphaned server is stopped only when it is provably that run's: the same PID, start time and command line as
recorded (so not a recycled PID), a `prefect.server.api.server:create_app` command line, and its owner gone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil

from tasks.common.files import write_json_atomic

RUN_RECORD = ".cache/pipeline-run.json"
SERVER_APP = "prefect.server.api.server:create_app"  # what Prefect's SubprocessASGIServer runs under uvicorn


def describe(process: psutil.Process) -> dict[str, Any]:
    """A process as recorded: PID, start time (s since the epoch) and command line."""
    return {"pid": process.pid, "started": process.create_time(), "cmdline": process.cmdline()}


def same_process_running(recorded: dict[str, Any]) -> psutil.Process | None:
    """The recorded process when it still runs (same PID, start time and command line; not a zombie), else None."""
    try:
        process = psutil.Process(int(recorded["pid"]))
        if (abs(process.create_time() - float(recorded["started"])) < 0.05 and process.cmdline() == recorded["cmdline"]
                and process.status() != psutil.STATUS_ZOMBIE):
            return process
    except (psutil.Error, KeyError, TypeError, ValueError):
        pass
    return None


def temporary_servers() -> list[dict[str, Any]]:
    """The temporary Prefect servers this process started (children running SERVER_APP), as recorded."""
    servers = []
    for child in psutil.Process().children():
        try:
            if SERVER_APP in child.cmdline():
                servers.append(describe(child))
        except psutil.Error:
            continue
    return servers


def current_flow_run() -> dict[str, str] | None:
    """The flow run this code runs in ({"id", "name", "flow"}), None outside one."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return {"id": str(context.flow_run.id), "name": context.flow_run.name,
            "flow": context.flow.name if context.flow else ""}


def record_run(path: Path) -> None:
    """Write RUN_RECORD for the run that has just taken the pipeline lock."""
    run = current_flow_run()
    write_json_atomic(path, {"owner": describe(psutil.Process()), "flow_runs": [run] if run else [],
                             "servers": temporary_servers()})


def record_nested_run(path: Path) -> None:
    """Add the flow run entering the lock again (a subflow of the retrain flow) to RUN_RECORD."""
    run = current_flow_run()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if run and run not in record.get("flow_runs", []):
        record.setdefault("flow_runs", []).append(run)
        write_json_atomic(path, record)


def _crash_flow_runs(runs: list[dict[str, str]], pid: int) -> tuple[list[str], list[str]]:
    """Set Crashed on every recorded flow run, its subflow runs and their task runs not in a final state;
    returns (names marked, problems)."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    message = (f"the process running it (PID {pid}) ended without reporting a final state (killed?); "
               "marked by the next pipeline run")
    marked, problems = [], []
    with get_client(sync_client=True) as client:
        ids = []
        for run in runs:
            try:
                client.read_flow_run(UUID(run["id"]))
                ids.append(UUID(run["id"]))
            except ObjectNotFound:
                problems.append(f"flow run {run.get('name')} ({run['id']}) is not in this Prefect API")
        if ids:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids)))
            for flow_run in [*client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))),
                             *children]:
                if flow_run.state is None or flow_run.state.is_final():
                    continue
                client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                marked.append(f"{flow_run.name} ({flow_run.state.name})")
                for task_run in client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))):
                    if task_run.state is not None and not task_run.state.is_final():
                        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    return marked, problems


def _stop(process: psutil.Process, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; a zombie left for PID 1 to reap counts as stopped."""
    process.terminate()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    process.kill()


def recover_killed_run(path: Path) -> str | None:
    """When RUN_RECORD is left by a run that died holding the pipeline lock: mark its flow runs Crashed, stop its
    orphaned temporary Prefect servers, remove the record; returns the one line said about it (None when there
    was nothing to recover). Call it holding the pipeline lock. A record whose owner still runs (the lock file
    was deleted under it) is left alone."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        owner = record["owner"]
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return f"removed an unreadable {path} (a run record cut short)"
    if same_process_running(owner):
        return None
    marked, problems = _crash_flow_runs(record.get("flow_runs") or [], int(owner["pid"]))
    stopped = []
    for server in record.get("servers") or []:
        process = same_process_running(server)
        if process is not None and SERVER_APP in server["cmdline"] and process.ppid() != owner["pid"]:
            _stop(process)
            stopped.append(f"PID {process.pid}")
    path.unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["started"])))
    said = [f"flow runs marked Crashed: {', '.join(marked)}" if marked else "no flow run left unfinished",
            *([f"its temporary Prefect server stopped ({', '.join(stopped)})"] if stopped else []), *problems]
    return f"the previous pipeline run (PID {owner['pid']}, started {started}) ended without finishing: " + \
        "; ".join(said)
