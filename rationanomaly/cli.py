"""`rationanomaly`: run the pipeline's flows, serve the champion, detect anomalies, audit lineage.

Heavy imports (Prefect, MLflow, torch) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

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

ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="params.yaml profile: smoke | default | gpu (kept in params.yaml)."),
]


@app.command()
def data(profile: ProfileOption = None) -> None:
    """Run the data flow: fetch → base_model → correct → split → distill (DVC skips what is up to date)."""
    from flows.data import data_flow

    data_flow(profile=profile)


@app.command()
def train(profile: ProfileOption = None) -> None:
    """Run the train flow: CoT-SFT then multi-reward GRPO (LoRA), tracked in MLflow."""
    from flows.train import train_flow

    train_flow(profile=profile)


@app.command()
def release(profile: ProfileOption = None) -> None:
    """Run the release flow: evaluate → gate → register → (approve) → promote."""
    from flows.release import release_flow

    release_flow(profile=profile)


@app.command()
def deploy() -> None:
    """Run the deploy flow: serve the current @champion behind vLLM (no-op if already live)."""
    from flows.deploy import deploy_flow

    if deploy_flow()["url"] is None:
        raise typer.Exit(1)  # asked to serve, but there is no champion (the flow said why)


@app.command()
def retrain(profile: ProfileOption = None) -> None:
    """Run the whole pipeline as one flow: data → train → release → deploy, with a summary."""
    from flows.retrain import retrain_flow

    retrain_flow(profile=profile)


@app.command()
def schedule(
    profile: Annotated[str, typer.Option(help="Profile the scheduled runs use.")] = "default",
    cron: Annotated[str, typer.Option(help="Cron schedule (default weekly, Sunday 02:00).")] = "0 2 * * 0",
) -> None:
    """Serve the retrain deployment on its cron schedule (Ctrl-C stops it)."""
    from flows.retrain import serve_schedule

    serve_schedule(profile=profile, cron=cron)


def _register_commands() -> None:
    """Attach the commands defined beside the code they drive (each module imports its work lazily)."""
    from rationanomaly import cli_data, cli_registry, cli_serving

    app.command(name="review")(cli_data.review)
    app.command(name="gate")(cli_registry.gate)
    app.command(name="serve")(cli_serving.serve)
    app.command(name="detect")(cli_serving.detect)
    app.command(name="ui")(cli_serving.ui)
    app.command(name="lineage")(cli_registry.lineage)
    app.command(name="rollback")(cli_registry.rollback)


_register_commands()


if __name__ == "__main__":
    app()
