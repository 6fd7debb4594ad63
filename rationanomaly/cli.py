"""`rationanomaly`: run the pipeline's flows, serve the champion, detect anomalies, audit lineage.

Heavy imports (Prefect, MLflow, torch) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

import typer

from tasks.common.errors import Busy, InputError

# Local by default: no usage reporting from the embedded Prefect server or MLflow (and no network here).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The temporary Prefect server starts in ~10 s; give a busy 2-core machine more than the default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    name="rationanomaly",
    help="Explainable LLM log anomaly detection: data → CoT-SFT → GRPO → evaluate → gate → registry → vLLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

P = ParamSpec("P")
R = TypeVar("R")


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """`command` with bad input, or a lock another running process holds, reported as one line on stderr and exit
    code 1, never a traceback.

    InputError's message names the file and the field or line, Busy's the lock and its holder
    (tasks.common.errors); every command of this CLI is registered through this wrapper (issue 22, item 8: `gate`
    and `serve` printed a traceback on a bad params.yaml).
    """
    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (InputError, Busy) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return run


def command(name: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """`app.command`, with one-line errors (`one_line_errors`)."""
    def register(function: Callable[P, R]) -> Callable[P, R]:
        app.command(name=name)(one_line_errors(function))
        return function

    return register


def check_params(profile: str | None = None) -> None:
    """Validate params.yaml (with `profile` merged) before a flow starts: a bad field is then one line naming it,
    instead of a failed flow run whose log carries a traceback (and a temporary Prefect server started for
    nothing). Raises InputError."""
    from tasks.common.settings import load_settings

    load_settings(profile=profile)


ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="params.yaml profile: smoke | default | gpu (kept in params.yaml)."),
]


@command()
def data(profile: ProfileOption = None) -> None:
    """Run the data flow: fetch → base_model → correct → split → distill (DVC skips what is up to date)."""
    check_params(profile)
    from flows.data import data_flow

    data_flow(profile=profile)


@command()
def train(profile: ProfileOption = None) -> None:
    """Run the train flow: CoT-SFT then multi-reward GRPO (LoRA), tracked in MLflow."""
    check_params(profile)
    from flows.train import train_flow

    train_flow(profile=profile)


@command()
def release(profile: ProfileOption = None, index_only: Annotated[bool, typer.Option(
        "--index-only", help="Keep @champion's adapter; rebuild the index and threshold from the review files "
        "(no retraining), then gate → register → promote")] = False) -> None:
    """Run the release flow: evaluate → gate → register → (approve) → promote."""
    check_params(profile)
    if index_only:
        from flows.release import release_index_only_flow

        release_index_only_flow(profile=profile)
        return
    from flows.release import release_flow

    release_flow(profile=profile)


@command()
def deploy() -> None:
    """Run the deploy flow: serve the current @champion behind vLLM (no-op if already live)."""
    check_params()
    from flows.deploy import deploy_flow

    if deploy_flow()["url"] is None:
        raise typer.Exit(1)  # asked to serve, but there is no champion (the flow said why)


@command()
def retrain(profile: ProfileOption = None) -> None:
    """Run the whole pipeline as one flow: data → train → release → deploy, with a summary."""
    check_params(profile)
    from flows.retrain import retrain_flow

    retrain_flow(profile=profile)


@command()
def schedule(
    profile: Annotated[str, typer.Option(help="Profile the scheduled runs use.")] = "default",
    cron: Annotated[str, typer.Option(help="Cron schedule (default weekly, Sunday 02:00).")] = "0 2 * * 0",
) -> None:
    """Serve the retrain deployment on its cron schedule (Ctrl-C stops it)."""
    check_params(profile)
    from flows.retrain import serve_schedule

    serve_schedule(profile=profile, cron=cron)


def _register_commands() -> None:
    """Attach the commands defined beside the code they drive (each module imports its work lazily)."""
    from rationanomaly import cli_data, cli_registry, cli_serving

    app.add_typer(cli_data.review_app(one_line_errors), name="review")  # review [FOLDER] | review export
    command("gate")(cli_registry.gate)
    command("serve")(cli_serving.serve)
    command("detect")(cli_serving.detect)
    command("ui")(cli_serving.ui)
    command("lineage")(cli_registry.lineage)
    command("rollback")(cli_registry.rollback)


_register_commands()


if __name__ == "__main__":
    app()
