"""`rationanomaly lineage`, `rollback` and `gate`: plain typer command functions the main CLI registers."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def _console() -> Console:
    """A console for this call's stdout; piped output is not wrapped at 80 columns (hashes stay on one line)."""
    return Console() if sys.stdout.isatty() else Console(width=240)


def lineage(
    ref: Annotated[str | None, typer.Argument(help="Model version: <name>@<alias> or <name>/<version>, e.g. "
                                                   "rationanomaly@champion")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Reverse lookup: every version trained on data with "
                                                            "this hash (dvc.lock md5 or source sha256, prefix ok)")]
    = None,
    json_: Annotated[bool, typer.Option("--json", help="Emit JSON instead of a tree")] = False,
) -> None:
    """Walk a model version back to its runs, params, data, corrections, base model, code and gate decision."""
    from tasks.release.lineage import LineageError, lineage_by_data, render_by_data, render_lineage
    from tasks.release.lineage import lineage as build_lineage

    if (ref is None) == (data is None):
        raise typer.BadParameter("give either a model reference (e.g. rationanomaly@champion) or --data <hash>")
    try:
        if ref is not None:
            chain = build_lineage(ref)
            if json_:
                typer.echo(json.dumps(chain, indent=2, default=str))
            else:
                _console().print(render_lineage(chain))
        else:
            hits = lineage_by_data(str(data))
            if json_:
                typer.echo(json.dumps(hits, indent=2, default=str))
            else:
                _console().print(render_by_data(str(data), hits))
    except LineageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why the champion is rolled back (recorded)")],
    actor: Annotated[str | None, typer.Option("--actor", help="Who rolls back (default: the current user)")] = None,
) -> None:
    """Move @champion back to @previous, recording who did it and why."""
    from tasks.common.settings import load_settings

    name = load_settings().registry.model_name  # a bad params.yaml is one line, before the registry loads
    from tasks.release.registry import RegistryError
    from tasks.release.registry import rollback as do_rollback

    who = actor or getpass.getuser()
    try:
        result = do_rollback(who, reason, name=name)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    _console().print(f"@champion → v{result['champion']} (was v{result['rolled_back']}); "
                  f"@previous → {('v' + result['previous']) if result['previous'] else 'none'}; by {who}: {reason}")


def gate(
    metrics: Annotated[Path | None, typer.Option(help="metrics.json to judge (default: evaluate.metrics_file).")]
    = None,
    predictions: Annotated[Path | None, typer.Option(
        help="The candidate's per-item predictions (default: candidate_predictions.json in evaluate.out_dir).")]
    = None,
    json_: Annotated[bool, typer.Option("--json", help="Emit the verdict as JSON.")] = False,
) -> None:
    """Judge the evaluated candidate as the release flow does (its per-item predictions against @champion's, on the
    same test data; a candidate already registered shows the verdict it was registered with); exit 1 when a rule
    fails."""
    import contextlib

    from tasks.common.config import repo_root
    from tasks.common.settings import load_settings

    settings = load_settings()
    path = metrics or repo_root() / settings.evaluate.metrics_file
    if not path.is_file():
        typer.echo(f"error: {path}: no metrics yet (run `rationanomaly release` or `dvc repro evaluate`)", err=True)
        raise typer.Exit(1)
    if predictions is not None and not predictions.is_file():
        typer.echo(f"error: {predictions}: no such predictions file", err=True)
        raise typer.Exit(1)
    from flows.release import judge
    from tasks.release.registry import RegistryError

    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout carries the verdict (--json)
            decided = judge(settings, path, predictions)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if decided.reason:
        typer.echo(decided.reason, err=True)
    if decided.verdict is None:
        typer.echo(f"error: version {decided.known} carries no gate verdict", err=True)
        raise typer.Exit(1)
    if json_:
        typer.echo(json.dumps(decided.verdict.to_dict(), indent=2))
    else:
        _console().print(decided.verdict.to_markdown())
    if not decided.verdict.passed:
        raise typer.Exit(1)
