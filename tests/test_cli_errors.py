"""Every command that reads params.yaml answers a bad field with one line naming the file and the field, exit 1,
no traceback (issue 22, item 8: `gate` and `serve` printed a traceback where the others printed one line).

Each command runs as a user runs it, in a subprocess, in a folder whose params.yaml has one wrong value.
`lineage` and `ui` do not read params.yaml (a model reference names the model; the UIs take ports), so a bad
file cannot stop them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "data": [], "train": [], "release": [], "deploy": [], "retrain": [], "schedule": [],
    "review": [], "gate": [], "gate --json": ["--json"], "serve": [], "serve --status": ["--status"],
    "serve --stop": ["--stop"], "detect": ["-"], "rollback": ["--reason", "test"],
}


@pytest.fixture(scope="module")
def bad_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-params")
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert "  max_new_tokens: " in text
    lines = [("  max_new_tokens: many" if line.startswith("  max_new_tokens: ") else line)
             for line in text.splitlines()]
    (root / "params.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_bad_params_yaml_is_one_line_naming_the_field(name: str, bad_project: Path) -> None:
    env = {**os.environ, "RATIONANOMALY_ROOT": str(bad_project), "PREFECT_HOME": str(bad_project / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{bad_project / 'mlflow.db'}"}
    command = [sys.executable, "-m", "rationanomaly.cli", name.split()[0], *COMMANDS[name]]
    proc = subprocess.run(command, cwd=bad_project, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1, output[-3000:]
    assert len(output.splitlines()) == 1 and "Traceback" not in output, output[-3000:]
    assert f"{bad_project / 'params.yaml'} field 'evaluate.max_new_tokens'" in output and "'many'" in output
