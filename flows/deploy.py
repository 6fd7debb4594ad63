"""Prefect flow `deploy`: serve the current `@champion` behind vLLM, blue/green, after health and smoke checks."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import publish_markdown
from serving.resolve import ModelRef, resolve_champion
from serving.server import deploy
from tasks.common.config import repo_root
from tasks.common.settings import ServeSettings, load_settings
from tasks.release import registry


@task(name="champion-version", retries=2, retry_delay_seconds=5)
def champion_version(model_name: str) -> str | None:
    """The version `@champion` points at, None before any promotion (retried: the registry may be remote)."""
    return registry.aliases(model_name).get(registry.CHAMPION)


@task(name="resolve-champion", retries=2, retry_delay_seconds=5)
def resolve(model_name: str, base_model_dir: str) -> ModelRef:
    """models:/<name>@champion → local base + adapter folders (retried: the registry may be remote)."""
    return resolve_champion(model_name, fallback_base_dir=repo_root() / base_model_dir)


@task(name="deploy-endpoint")
def deploy_endpoint(ref: ModelRef, settings: ServeSettings) -> dict[str, Any]:
    """Start the new server beside the old one; switch only if it passes; otherwise the old one keeps serving."""
    return deploy(ref, settings)


@flow(name="deploy", log_prints=True)
def deploy_flow() -> dict[str, Any]:
    """resolve @champion → deploy (a no-op when that version is already live) → endpoint artifact.

    Before any candidate has passed the gate there is no champion: nothing is served, and that is
    not a failure of this run (the summary says so).
    """
    settings = load_settings()
    model_name = settings.registry.model_name
    if champion_version(model_name) is None:
        reason = f"no `{model_name}@champion` yet (no candidate has passed the gate): nothing to serve"
        publish_markdown("endpoint", f"# Endpoint\n\n- none: {reason}", "The live vLLM endpoint")
        print(reason)
        return {"url": None, "version": None, "action": "none", "reason": reason}
    ref = resolve(model_name, settings.base_model.out_dir)
    state = deploy_endpoint(ref, settings.serve)
    url = f"http://{state['host']}:{state['port']}/v1"
    action = state["action"] + (f" (serve settings changed: {', '.join(state['relaunched_for'])})"
                                if state.get("relaunched_for") else "")
    publish_markdown(
        "endpoint",
        f"# Endpoint\n\n- url: `{url}`\n- model: `{state['model']}` version {state['version']}\n"
        f"- action: {action}\n- pid: {state['pid']}, started {state['started_at']}",
        "The live vLLM endpoint",
    )
    print(f"endpoint {url}: {ref.name} v{ref.version} ({action})")
    return {"url": url, "version": state["version"], "action": state["action"], "port": state["port"],
            "relaunched_for": state.get("relaunched_for", [])}


if __name__ == "__main__":
    deploy_flow()
