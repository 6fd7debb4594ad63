"""Client for the OpenAI-compatible endpoint: bounded concurrency, retries with backoff, verdicts via tasks.prompt.

The endpoint can be a callable that is asked again before every retry, so a client that reads it from
the serve state file follows a blue/green switch instead of failing on the old port.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tasks.common.prompt import (
    ABNORMAL,
    TOP_LOGPROBS,
    parse_completion,
    prompt_messages,
    scored_verdict,
    scoring_messages,
    token_logprobs,
    verdict_score,
)
from tasks.common.retrieval import INDEX_FILE, TemplateIndex
from tasks.common.settings import DetectSettings
from tasks.common.tokenizers import special_tokens_in
from tasks.detection.verdicts import ClassifierError, TemplateVerdict

ANSWER_CLOSE = "</answer>"


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests and which model version answers there.

    `special_tokens`: the served tokenizer's special-token strings, defanged in every log text sent there
    (tasks.common.prompt); empty leaves only the generic `<|...|>` rule. `threshold`: the served version's
    verdict threshold (calibration.json); with it the verdict is the scored answer word, without it (a model
    registered before scores) the word the rationale ended in. `index_dir` and `neighbours`: the served
    version's retrieval index and how many labelled neighbours its prompts carry (0: none).
    """

    base_url: str  # ".../v1"
    model: str
    version: str
    api_key: str | None = None
    special_tokens: tuple[str, ...] = ()
    threshold: float | None = None
    index_dir: str | None = None
    neighbours: int = 0


@functools.lru_cache(maxsize=8)
def _folder_special_tokens(folder: str) -> tuple[str, ...]:
    return special_tokens_in(folder)


def endpoint_from_state(state_file: str | Path, api_key_env: str | None = None) -> Endpoint:
    """The live server recorded by `rationanomaly serve`, with the special tokens of the tokenizer it serves.

    Those are recorded at deploy; a state file written before that names the model folder they are read from.
    """
    path = Path(state_file)
    if not path.exists():
        raise EndpointError(f"no live server: {path} does not exist (run `rationanomaly serve`, or pass --base-url)")
    state = json.loads(path.read_text(encoding="utf-8"))
    env_name = api_key_env or state.get("api_key_env")
    special = state.get("special_tokens")
    if special is None:
        folder = state.get("model_dir") or state.get("base")
        special = _folder_special_tokens(str(folder)) if folder else ()
    return Endpoint(f"http://{state['host']}:{state['port']}/v1", state["served_model"], str(state["version"]),
                    os.environ.get(env_name) if env_name else None, tuple(special), state.get("threshold"),
                    state.get("index_dir"), int(state.get("neighbours") or 0))


@functools.lru_cache(maxsize=4)
def load_index(index_dir: str) -> TemplateIndex:
    """The retrieval index of a served version, loaded once per process."""
    return TemplateIndex.load(Path(index_dir) / INDEX_FILE)


class EndpointError(ClassifierError):
    """The endpoint could not answer (after retries), or refused the request."""


class _Retryable(Exception):
    """A server-side failure worth retrying (5xx, 429)."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _Retryable)


class Client:
    """Chat-completions client with a bounded thread pool and tenacity retries.

    Knobs come from the `detect` settings (serving.detect.http_detector) or the deploy's smoke test: no default
    here can drift from params.yaml. `max_tokens` must cover a whole rationale and the answer (a cut completion
    parses as invalid); `rationales` (abnormal | all | none) says which scored verdicts also get one.
    """

    def __init__(
        self,
        endpoint: Endpoint | Callable[[], Endpoint],
        *,
        concurrency: int,
        max_retries: int,
        backoff_s: float,
        timeout_s: float,
        max_tokens: int,
        max_log_chars: int,
        rationales: str,
        backoff_max_s: float = 8.0,
    ) -> None:
        self._endpoint = endpoint if callable(endpoint) else (lambda: endpoint)
        self.concurrency = max(1, int(concurrency))
        self.max_retries, self.backoff_s, self.backoff_max_s = int(max_retries), backoff_s, backoff_max_s
        self.max_tokens, self.max_log_chars = int(max_tokens), int(max_log_chars)
        self.rationales = rationales  # abnormal | all | none: which verdicts also get a written rationale
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), limits=limits)
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent, retries included

    def endpoint(self) -> Endpoint:
        """The endpoint now (re-read on every request: follows a blue/green switch)."""
        return self._endpoint()

    def model_version(self) -> str:
        """The version the endpoint serves (the detector keys its verdict cache with it)."""
        return self.endpoint().version

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, payload: dict[str, Any], model: str | None) -> tuple[dict[str, Any], Endpoint]:
        endpoint = self.endpoint()  # asked again on every attempt: follows a blue/green switch
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        with self._lock:
            self.requests += 1
        response = self._http.post(f"{endpoint.base_url}/chat/completions",
                                   json={**payload, "model": model or endpoint.model}, headers=headers)
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code} from {endpoint.base_url}: {response.text[:200]}")
        if response.status_code >= 400:
            raise EndpointError(f"{endpoint.base_url} refused the request: HTTP {response.status_code} "
                                f"{response.text[:300]}" + (" (check the API key env var)"
                                                            if response.status_code == 401 else ""))
        return response.json(), endpoint

    def _request(self, payload: dict[str, Any], model: str | None) -> tuple[dict[str, Any], Endpoint]:
        """POST with exponential backoff and jitter on transport/5xx errors; EndpointError after the retries."""
        started = time.monotonic()
        retrying = Retrying(stop=stop_after_attempt(self.max_retries),
                            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=self.backoff_max_s,
                                                         jitter=self.backoff_s),
                            retry=retry_if_exception(_retryable), reraise=False)
        try:
            return retrying(self._post, payload, model)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise EndpointError(
                f"endpoint {self.endpoint().base_url} did not answer after {self.max_retries} attempts over "
                f"{time.monotonic() - started:.1f} s: {type(cause).__name__}: {cause}"
            ) from cause

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                 model: str | None = None) -> tuple[str, Endpoint]:
        """One chat completion (greedy) of the explain task: the rationale and the answer word."""
        payload = {"messages": messages, "temperature": 0.0, "max_tokens": max_tokens or self.max_tokens,
                   "stop": [ANSWER_CLOSE]}
        body, endpoint = self._request(payload, model)
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
        # The stop string is cut from the output; put it back so the strict parser sees the whole answer.
        stopped_on_close = choice.get("stop_reason") == ANSWER_CLOSE or (
            "stop_reason" not in choice and choice.get("finish_reason") == "stop" and "<answer>" in text
        )
        if stopped_on_close and not text.rstrip().endswith(ANSWER_CLOSE):
            text += ANSWER_CLOSE
        return text, endpoint

    def next_token_logprobs(self, messages: list[dict[str, str]], *, model: str | None = None,
                            continue_final_message: bool = False) -> tuple[dict[str, float], Endpoint]:
        """The top `TOP_LOGPROBS` alternatives for the first generated token, as {token text: log-probability}.

        `continue_final_message` continues the last (assistant) message instead of opening a new turn.
        """
        payload = {"messages": messages, "temperature": 0.0, "max_tokens": 1, "logprobs": True,
                   "top_logprobs": TOP_LOGPROBS, "add_generation_prompt": not continue_final_message,
                   "continue_final_message": continue_final_message}
        body, endpoint = self._request(payload, model)
        content = ((body["choices"][0].get("logprobs") or {}).get("content") or [{}])[0]
        return token_logprobs((alt["token"], alt["logprob"]) for alt in content.get("top_logprobs") or []), endpoint

    def score(self, messages: list[dict[str, str]], *, model: str | None = None) -> tuple[float | None, Endpoint]:
        """The verdict score of a scoring prompt (ending in an open `<answer>`): one token, its top log-probs."""
        alternatives, endpoint = self.next_token_logprobs(messages, model=model, continue_final_message=True)
        return verdict_score(alternatives), endpoint

    def neighbours_of(self, template: str, endpoint: Endpoint) -> list[tuple[str, int]]:
        """The served version's labelled neighbours of a template ([] when its prompts carry none)."""
        if not endpoint.index_dir or endpoint.neighbours <= 0:
            return []
        return load_index(endpoint.index_dir).prompt_neighbours([template], endpoint.neighbours)[0]

    def explain_messages(self, template: str, dataset: str, endpoint: Endpoint,
                         neighbours: list[tuple[str, int]] | None = None) -> list[dict[str, str]]:
        """The explain-task chat messages the served version answers with a rationale and an answer word;
        `neighbours` None looks them up in the version's index."""
        near = self.neighbours_of(template, endpoint) if neighbours is None else neighbours
        return prompt_messages(template, dataset, self.max_log_chars, endpoint.special_tokens, neighbours=near)

    def scoring_messages(self, template: str, dataset: str, endpoint: Endpoint,
                         neighbours: list[tuple[str, int]] | None = None) -> list[dict[str, str]]:
        """The verdict-task chat messages, ending in an open `<answer>` (continue the final message to score);
        `neighbours` None looks them up in the version's index."""
        near = self.neighbours_of(template, endpoint) if neighbours is None else neighbours
        return scoring_messages(template, dataset, self.max_log_chars, endpoint.special_tokens, neighbours=near)

    def classify_one(self, template: str, dataset: str = "system log", *, max_tokens: int | None = None,
                     model: str | None = None) -> TemplateVerdict:
        """The verdict for one template: the scored answer word against the version's threshold, and a rationale
        when `rationales` asks for it (always when the version has no threshold). Only the model's output is
        parsed, never the log text."""
        started = time.monotonic()
        endpoint = self.endpoint()
        near = self.neighbours_of(template, endpoint)
        score, verdict = None, None
        if endpoint.threshold is not None:
            score, endpoint = self.score(self.scoring_messages(template, dataset, endpoint, near), model=model)
            verdict = scored_verdict(score, endpoint.threshold)
        explain = endpoint.threshold is None or self.rationales == "all" or (
            self.rationales == "abnormal" and verdict == ABNORMAL)
        if not explain:
            return TemplateVerdict(template, dataset, verdict, score is not None, "", "", endpoint.version,
                                   time.monotonic() - started, score)
        text, endpoint = self.complete(self.explain_messages(template, dataset, endpoint, near), max_tokens=max_tokens,
                                       model=model)
        parsed = parse_completion(text)
        return TemplateVerdict(template, dataset, verdict if verdict is not None else parsed.answer,
                               parsed.valid if verdict is None else score is not None, parsed.think, text,
                               endpoint.version, time.monotonic() - started, score, parsed.answer)

    def classify(
        self,
        items: Sequence[tuple[str, str]],
        *,
        on_result: Callable[[TemplateVerdict], None] | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
    ) -> list[TemplateVerdict]:
        """Verdicts for (dataset, template) pairs, `concurrency` at a time, in input order.

        `on_result` runs in the calling thread as each answer arrives (the detector stores it at once),
        so when the endpoint goes down, every answer received before is kept; then EndpointError is raised.
        """
        results: list[TemplateVerdict | None] = [None] * len(items)
        error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="classify") as pool:
            pending: dict[Future[TemplateVerdict], int] = {}
            queue = iter(enumerate(items))

            def submit_next() -> None:
                for index, (dataset, template) in queue:
                    pending[pool.submit(self.classify_one, template, dataset, max_tokens=max_tokens,
                                        model=model)] = index
                    return

            for _ in range(self.concurrency):
                submit_next()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    try:
                        verdict = future.result()
                    except BaseException as exc:  # keep draining: answers already in flight are not lost
                        error = error or exc
                        continue
                    results[index] = verdict
                    if on_result is not None:
                        on_result(verdict)
                    if error is None:
                        submit_next()
        if error is not None:
            raise error
        return [r for r in results if r is not None]


def client_for(endpoint: Endpoint | Callable[[], Endpoint], settings: DetectSettings, **overrides: Any) -> Client:
    """A Client with the `detect` settings' concurrency, retries, answer budget and rationale policy (`overrides`
    replace any of Client's knobs)."""
    knobs: dict[str, Any] = {"concurrency": settings.concurrency, "max_retries": settings.max_retries,
                             "backoff_s": settings.backoff_s, "timeout_s": settings.timeout_s,
                             "max_tokens": int(settings.max_tokens),  # type: ignore[arg-type]  # resolved by Settings
                             "max_log_chars": settings.max_line_chars, "rationales": settings.rationales}
    return Client(endpoint, **{**knobs, **overrides})
