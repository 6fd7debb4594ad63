"""`rationanomaly detect` against the live endpoint: the detector (tasks.detection) with the HTTP client."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.client import Endpoint, EndpointError, client_for, endpoint_from_state
from serving.resolve import local_model_ref
from tasks.common.config import resolve_path
from tasks.common.contracts import PROMPT_FORMAT
from tasks.common.files import sha256_file
from tasks.common.retrieval import INDEX_FILE
from tasks.common.settings import DetectSettings, ServeSettings
from tasks.common.tokenizers import special_tokens_in
from tasks.detection.detector import Detector


def default_endpoint(settings: DetectSettings, serve: ServeSettings, model_name: str, base_model_dir: str,
                     ) -> Endpoint | Callable[[], Endpoint]:
    """detect.base_url when set (a remote endpoint serving `detect.model`, default the registered `model_name`),
    else the live server of serve.state_file, re-read before every retry (follows a blue/green switch).

    For base_url the served tokenizer's special tokens are read from detect.tokenizer_dir (null: the project's
    base model folder `base_model_dir`); a folder without tokenizer files leaves the generic `<|...|>` rule.
    Prompts are fitted to the context the endpoint reports (`served_context`), else serve.max_model_len.
    The threshold and neighbours come from detect.version_dir (serving.resolve.local_model_ref); without it
    the word each rationale ends in decides. Raises InputError for an unreadable version_dir.
    """
    key_env = serve.api_key_env
    if settings.base_url:
        tokenizer_dir = settings.tokenizer_dir or base_model_dir
        threshold, index_dir, neighbours, prompt_format = None, None, 0, PROMPT_FORMAT
        if settings.version_dir:
            ref = local_model_ref(model_name, "remote", base_model_dir, resolve_path(settings.version_dir))
            threshold, index_dir, neighbours = ref.threshold, ref.index_dir, ref.neighbours
            prompt_format = ref.prompt_format
        base_url, model = settings.base_url.rstrip("/"), settings.model or model_name
        api_key = os.environ.get(key_env) if key_env else None
        return Endpoint(base_url, model, settings.model_version or "unknown", api_key,
                        special_tokens_in(resolve_path(tokenizer_dir)), threshold, index_dir, neighbours,
                        served_context(base_url, model, api_key) or serve.max_model_len,
                        str(resolve_path(tokenizer_dir)), prompt_format)
    state_file = resolve_path(serve.state_file)
    return lambda: endpoint_from_state(state_file, key_env)




def served_context(base_url: str, model: str, api_key: str | None, timeout_s: float = 5.0) -> int | None:
    """The context length in tokens that an OpenAI-compatible endpoint reports for `model` in `GET /models`
    (vLLM's `max_model_len` field); None when it reports none or cannot be asked now."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        listed = httpx.get(f"{base_url}/models", headers=headers, timeout=timeout_s).json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for entry in listed:
        if isinstance(entry, dict) and entry.get("id") == model and isinstance(entry.get("max_model_len"), int):
            return int(entry["max_model_len"])
    return None


def http_detector(settings: DetectSettings, endpoint: Endpoint | Callable[[], Endpoint], *,
                  model_version: str | None = None, progress: bool = True) -> Detector:
    """A Detector asking `endpoint` over HTTP with the `detect` settings' concurrency, retries, answer budget and
    rationale policy. Its verdict cache is scoped by `answer_scope` too (with `--base-url` the threshold and index
    come from `detect.version_dir`, which may change under one version label), and a run stops with
    EndpointError when the endpoint's scope changes under it (a relaunch of the same version).

    Raises EndpointError when `endpoint` is the live server's state and none is recorded.
    """
    read = endpoint if callable(endpoint) else (lambda: endpoint)
    start = read()
    scope = answer_scope(start)

    def same_answers() -> Endpoint:  # asked before every request: a relaunch mid-run must not mix verdicts
        now = read()
        if now.version != start.version:
            raise EndpointError(f"the live model changed from version {start.version} to {now.version} during "
                                "the run; rerun to use the new model (verdicts already written are kept)")
        if answer_scope(now) != scope:
            raise EndpointError(f"the endpoint now answers under other settings than at the start of this run "
                                f"(version {now.version}: threshold, index or tokenizer changed by a relaunch); "
                                "rerun to use them")
        return now

    return Detector(settings, client_for(same_answers, settings), model_version=model_version, progress=progress,
                    answer_scope=scope)


def answer_scope(endpoint: Endpoint) -> dict[str, Any]:
    """What an endpoint contributes to a verdict besides its version label: the served model name, the special
    tokens defanged in prompts, the threshold, the index (by content digest) with its neighbour count, and the
    context prompts are fitted to."""
    index_file = Path(endpoint.index_dir) / INDEX_FILE if endpoint.index_dir else None
    return {"model": endpoint.model, "special_tokens": sorted(endpoint.special_tokens),
            "threshold": endpoint.threshold, "neighbours": endpoint.neighbours,
            "max_model_len": endpoint.max_model_len,  # prompts are fitted to it
            "index_sha256": _digest(str(index_file), *_stamp(index_file)) if index_file else None}


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return -1, -1
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=16)
def _digest(path: str, mtime_ns: int, size: int) -> str | None:
    """sha256 of a file, computed once per (path, modification time, size): answer_scope runs per request."""
    return None if size < 0 else sha256_file(path)
