"""Human approval through Prefect for real: the flow pauses, a person answers through the API, the flow goes on.

A self-hosted Prefect server is started so the paused flow (one process) and the approver (this test)
talk through the same API, as the release flow and the Prefect UI do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect_server import prefect_server

pytestmark = pytest.mark.slow

PAUSING_FLOW = """
import json
from prefect import flow
from flows.release import request_approval
from tasks.release.gate import GateVerdict, Rule

@flow(name="approval-probe")
def probe():
    verdict = GateVerdict(rules=[Rule("min_f1.template_bgl", 0.5, 0.8, True)], require_approval=True)
    answer = request_approval(verdict, timeout_s=600)
    print("ANSWER " + json.dumps({"approver": answer.approver, "approve": answer.approve, "reason": answer.reason}))

probe()
"""


def paused_run(api: str, deadline_s: float = 300) -> dict:
    """The first flow run in state PAUSED, waiting for it to appear."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=10,
                          json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}).json()
        if runs:
            return runs[0]
        time.sleep(1)
    raise AssertionError("no flow run paused for approval")


def test_release_approval_pauses_the_flow_and_records_the_answer(repo_root: Path, tmp_path: Path) -> None:
    with prefect_server(repo_root, tmp_path / "prefect", port=4298) as env:
        api = env["PREFECT_API_URL"]
        flow_proc = subprocess.Popen([sys.executable, "-c", PAUSING_FLOW], cwd=repo_root, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            run = paused_run(api)
            assert run["state"]["state_details"]["pause_key"] == "approval"

            # An answer without a named approver is refused by the server; the flow stays paused.
            for anonymous in ({"approve": True, "reason": "looks fine"}, {"approver": "", "approve": True}):
                refused = httpx.post(f"{api}/flow_runs/{run['id']}/resume", timeout=30,
                                     json={"run_input": anonymous}).json()
                assert refused["status"] == "REJECT", refused
                assert httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()["state"]["type"] == "PAUSED"

            answer = {"approver": "erin", "approve": True, "reason": "read the report; recall is up"}
            accepted = httpx.post(f"{api}/flow_runs/{run['id']}/resume", timeout=30,
                                  json={"run_input": answer}).json()
            assert accepted["status"] == "ACCEPT", accepted
            stdout, stderr = flow_proc.communicate(timeout=300)
        finally:
            if flow_proc.poll() is None:
                flow_proc.kill()
        assert flow_proc.returncode == 0, stderr[-3000:]
        line = next(x for x in stdout.splitlines() if x.startswith("ANSWER "))
        assert json.loads(line.removeprefix("ANSWER ")) == answer
