"""`rationanomaly detect` against the live endpoint: the detector (tasks.detection) with the HTTP client."""

from __future__ import annotations

import os
from collections.abc import Callable

from serving.client import Endpoint, client_for, endpoint_from_state
from serving.resolve import local_model_ref
from tasks.common.config import resolve_path
from tasks.common.settings import DetectSettings, ServeSettings
from tasks.common.tokenizers import special_tokens_in
from tasks.detection.detector import Detector


def default_endpoint(settings: DetectSettings, serve: ServeSettings, model_name: str, base_model_dir: str,
                     ) -> Endpoint | Callable[[], Endpoint]:
    """detect.base_url when set (a remote endpoint serving `detect.model`, default the registered `model_name`),
    else the live server of serve.state_file, re-read before every retry (follows a blue/green switch).

    For base_url the served tokenizer's special tokens are read from detect.tokenizer_dir (null: the project's
    base model folder `base_model_dir`); a folder without tokenizer files leaves the generic `<|...|>` rule.
    The threshold and neighbours come from detect.version_dir (serving.resolve.local_model_ref); without it
    the word each rationale ends in decides. Raises InputError for an unreadable version_dir.
    """
    key_env = serve.api_key_env
    if settings.base_url:
        tokenizer_dir = settings.tokenizer_dir or base_model_dir
        threshold, index_dir, neighbours = None, None, 0
        if settings.version_dir:
            ref = local_model_ref(model_name, "remote", base_model_dir, resolve_path(settings.version_dir))
            threshold, index_dir, neighbours = ref.threshold, ref.index_dir, ref.neighbours
        return Endpoint(settings.base_url.rstrip("/"), settings.model or model_name,
                        settings.model_version or "unknown", os.environ.get(key_env) if key_env else None,
                        special_tokens_in(resolve_path(tokenizer_dir)), threshold, index_dir, neighbours)
    state_file = resolve_path(serve.state_file)
    return lambda: endpoint_from_state(state_file, key_env)




def http_detector(settings: DetectSettings, endpoint: Endpoint | Callable[[], Endpoint], *,
                  model_version: str | None = None, progress: bool = True) -> Detector:
    """A Detector asking `endpoint` over HTTP with the `detect` settings' concurrency, retries, answer budget and
    rationale policy. Its verdict cache is scoped by the endpoint's threshold, index and neighbour count too
    (with `--base-url` they come from `detect.version_dir`, which may change under one version label).

    Raises EndpointError when `endpoint` is the live server's state and none is recorded.
    """
    client = client_for(endpoint, settings)
    try:
        now = client.endpoint()
    except BaseException:
        client.close()
        raise
    scope = {"threshold": now.threshold, "index_dir": now.index_dir, "neighbours": now.neighbours}
    return Detector(settings, client, model_version=model_version, progress=progress, answer_scope=scope)
