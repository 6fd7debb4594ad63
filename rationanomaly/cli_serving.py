"""`rationanomaly serve` and `rationanomaly detect`: plain typer command functions the main CLI registers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from serving.ui import HOST, MLFLOW_PORT, PREFECT_PORT


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


def _show(state: dict[str, Any]) -> None:
    keys = ("action", "relaunched_for", "model", "version", "url", "port", "pid", "alive", "healthy", "started_at",
            "ready_s", "adapter", "base", "log", "state_file")
    typer.echo(json.dumps({k: state[k] for k in keys if k in state}, indent=2))


def serve(
    status: Annotated[bool, typer.Option("--status", help="Show the live server (exit 1 if none healthy).")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the live server.")] = False,
    model_name: Annotated[str | None, typer.Option(help="Registered model (default: registry.model_name).")] = None,
    alias: Annotated[str, typer.Option(help="Registry alias to serve.")] = "champion",
    adapter: Annotated[Path | None, typer.Option(
        help="Serve this LoRA adapter folder instead (or a downloaded version's artifacts folder: its "
             "calibration.json and index come along).")] = None,
    base: Annotated[Path | None, typer.Option(help="Base model for --adapter (default: base_model.out_dir).")] = None,
    version: Annotated[str, typer.Option(help="Version label for --adapter.")] = "local",
    merged: Annotated[bool | None, typer.Option("--merged/--lora", help="Merge the adapter into the weights.")] = None,
    force: Annotated[bool, typer.Option(
        help="Redeploy even if this version is already live with the same serve settings.")] = False,
) -> None:
    """Deploy models:/<name>@champion with health and smoke checks and a blue/green switch (or --status/--stop)."""
    from serving import server
    from serving.resolve import local_model_ref, resolve_champion
    from tasks.common.config import repo_root
    from tasks.common.errors import InputError
    from tasks.common.settings import load_settings

    settings = load_settings()
    serve_settings = settings.serve
    if status:
        state = server.status(serve_settings)
        _show(state)
        raise typer.Exit(0 if state.get("healthy") else 1)
    if stop:
        state = server.stop(serve_settings)
        typer.echo(f"stopped {state.get('model')} v{state.get('version')} (pid {state.get('pid')})"
                   if state.get("stopped") else "no live server")
        return
    if merged is not None:
        serve_settings = serve_settings.model_copy(update={"merged": merged})
    name = model_name or settings.registry.model_name
    try:
        if adapter is not None:
            base_dir = base or repo_root() / settings.base_model.out_dir
            ref = local_model_ref(name, version, base_dir, adapter)
        else:
            ref = resolve_champion(name, alias, fallback_base_dir=repo_root() / settings.base_model.out_dir)
        typer.echo(f"deploying {ref.name} v{ref.version} (adapter {ref.adapter_dir}); vLLM takes about a minute…",
                   err=True)
        state = server.deploy(ref, serve_settings, force=force)
    except (server.ServeError, InputError) as exc:
        _fail(f"serve failed, the previous server (if any) keeps serving: {exc}")
    _show(state)


def detect(
    file: Annotated[str, typer.Argument(help="Log file, or - for stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", help="JSON-lines output ('-' = stdout).")] = "-",
    fmt: Annotated[str, typer.Option("--format", help=(
        "auto | bgl | spirit | thunderbird | hdfs | generic | cri (containerd/CRI-O) | docker (json-file) | "
        "journald (journalctl -o json). gzip, bzip2, xz, UTF-16 and BOM input is decoded whatever the format."))
    ] = "auto",
    base_url: Annotated[str | None, typer.Option(help="Endpoint .../v1 (default: the live server).")] = None,
    model: Annotated[str | None, typer.Option(help="Served model name for --base-url.")] = None,
    model_version: Annotated[str | None, typer.Option(help="Model version for --base-url (keys the cache).")] = None,
    summary: Annotated[Path | None, typer.Option(help="Also write the summary as JSON here.")] = None,
    window_lines: Annotated[int | None, typer.Option(help="Lines per window (default: detect.window_lines).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Parallel requests (default: detect.concurrency).")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Attempts per request (default: detect.max_retries).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar on files.")] = True,
    drain_state: Annotated[str | None, typer.Option(
        help="drain3 state file of this run (default: detect.drain_state); one run holds a state at a time, so give "
             "a second concurrent run (a `tail -f | detect -` beside a batch) its own.")] = None,
) -> None:
    """Verdicts with rationales for raw log lines; new templates only go to the model, the rest come from the cache."""
    from serving.detect import default_endpoint, http_detector
    from tasks.common.errors import InputError
    from tasks.common.settings import load_settings
    from tasks.detection.detector import print_summary
    from tasks.detection.verdicts import ClassifierError

    try:
        settings = load_settings()
    except InputError as exc:
        _fail(f"detect stopped: {exc}")
    overrides = {"base_url": base_url, "model": model, "model_version": model_version, "window_lines": window_lines,
                 "concurrency": concurrency, "max_retries": max_retries, "drain_state": drain_state}
    detect_settings = settings.detect.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    endpoint = default_endpoint(detect_settings, settings.serve, settings.registry.model_name,
                                settings.base_model.out_dir)
    try:
        with http_detector(detect_settings, endpoint, progress=progress) as detector:
            if out == "-":
                result = detector.run(file, sys.stdout, fmt)
            else:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                with Path(out).open("w", encoding="utf-8") as handle:
                    result = detector.run(file, handle, fmt)
    except (ClassifierError, InputError) as exc:
        _fail(f"detect stopped: {exc}")
    print_summary(result, output=out)
    if summary is not None:
        summary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")



def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def ui(
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect server and its UI.")] = PREFECT_PORT,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = MLFLOW_PORT,
    host: Annotated[str, typer.Option(help="Address both listen on.")] = HOST,
) -> None:
    """Open the tools' own UIs: a self-hosted Prefect server with its UI, and the MLflow UI on this project's
    store (mlflow.db, mlartifacts/). Prints both URLs; Ctrl-C stops both."""
    import signal

    from serving import ui as uis
    from tasks.common.config import repo_root

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the UIs too: in their own sessions they would outlive us
    root = repo_root()
    try:
        started = uis.open_uis(root, host, prefect_port, mlflow_port)
        with uis.running(*started) as (prefect, mlflow):
            typer.echo(f"Prefect UI  {prefect.url}   flow runs, subflow runs, task runs, Markdown artifacts")
            typer.echo(f"MLflow UI   {mlflow.url}   runs and metrics, registered models with aliases, tags, model card")
            typer.echo("Runs started elsewhere show up live when they use this server:\n"
                       f"  export PREFECT_API_URL={prefect.url}/api")
            typer.echo(f"Logs in {prefect.log.parent}. Ctrl-C stops both.")
            ended = uis.wait_until_one_exits((prefect, mlflow))
            _fail(f"{ended.name} UI exited with code {ended.process.poll()}; see {ended.log}")
    except uis.UiError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("stopped both UIs")
