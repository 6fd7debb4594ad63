"""The layout a newcomer can rely on: layers import downward only, no cycles, tasks/ free of Prefect and typer,
one top-level tasks module per DVC stage, and every profile accepted by the typed settings."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
import yaml

from tasks.common.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "serving", "flows", "rationanomaly")
# What each layer may import from the project: flows and the CLI compose tasks and serving; serving uses tasks.
ALLOWED = {"tasks": {"tasks"}, "serving": {"tasks", "serving"}, "flows": {"tasks", "serving", "flows"},
           "rationanomaly": {"tasks", "serving", "flows", "rationanomaly"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module this file imports, at module level or inside a function (a lazy import is still a
    dependency), resolved to a project module or, for third-party code, its top-level package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_no_import_cycles_among_the_projects_modules(graph: dict[str, set[str]]) -> None:
    packages = {name for name, path in project_modules().items() if path.name == "__init__.py"}  # docstrings only
    edges = {name: {dep for dep in deps if dep in graph and dep not in packages and dep != name}
             for name, deps in graph.items() if name not in packages}
    try:
        tuple(TopologicalSorter(edges).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' → '.join(exc.args[1])}")


def test_each_layer_imports_only_downward(graph: dict[str, set[str]]) -> None:
    wrong = [f"{name} imports {dep}" for name, deps in graph.items() for dep in deps
             if dep.split(".")[0] in PACKAGES and dep.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert wrong == []


def test_tasks_import_neither_prefect_nor_typer(graph: dict[str, set[str]]) -> None:
    wrong = [f"{name} imports {dep}" for name, deps in graph.items() if name.startswith("tasks")
             for dep in deps if dep.split(".")[0] in ("prefect", "typer")]
    assert wrong == []


def test_the_top_of_tasks_is_exactly_the_dvc_stages() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    commands = {name: stage["cmd"] for name, stage in stages.items()}
    assert all(cmd == f"python -m tasks.{name}" for name, cmd in commands.items()), commands
    top = {p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__"}
    assert top == set(stages)
    for name in stages:
        assert "def run(" in (REPO / "tasks" / f"{name}.py").read_text(encoding="utf-8"), name
        assert 'if __name__ == "__main__":' in (REPO / "tasks" / f"{name}.py").read_text(encoding="utf-8"), name


def test_every_code_dependency_in_dvc_yaml_exists() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    code = [dep for stage in stages.values() for dep in stage.get("deps", []) if str(dep).startswith("tasks/")]
    assert code and [dep for dep in code if not (REPO / dep).exists()] == []


def test_every_profile_merges_into_settings_the_classes_accept() -> None:
    profiles = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["profiles"]
    assert set(profiles) >= {"smoke", "default", "gpu"}
    for name in profiles:
        assert load_settings(REPO / "params.yaml", profile=name).profile == name
