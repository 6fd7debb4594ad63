"""Client for the OpenAI-compatible endpoint: bounded concurrency, retries with backoff, verdicts via tasks.prompt.

The endpoint can be a callable that is asked again before every retry, so a client that reads it from
the serve state file follows a blue/green switch instead of failing on the old port.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tasks.common.contracts import OPEN_QUESTION_FORMAT, PROMPT_FORMAT, explain_verdict
from tasks.common.prompt import (
    FIRST_STAGE_SCORE,
    NORMAL,
    TOP_LOGPROBS,
    first_stage_normal,
    fit_prompt,
    parse_completion,
    prompt_messages,
    scored_verdict,
    scoring_messages,
    token_logprobs,
    verdict_score,
)
from tasks.common.retrieval import INDEX_FILE, Neighbour, TemplateIndex
from tasks.common.settings import DetectSettings
from tasks.common.tokenizers import chat_tokens, special_tokens_in, token_counter
from tasks.detection.verdicts import (
    ClassifierError,
    TemplateVerdict,
    apply_verdict_rules,
    own_system_shown,
    shows_rationale,
)
from tasks.evaluation.rationales import grounded_rationale

ANSWER_CLOSE = "</answer>"
# Where a server started with a reasoning parser puts the text between <think> and </think> (vllm#13375):
# `reasoning` in vLLM since its rename, `reasoning_content` before it (and in servers that copied that name).
REASONING_FIELDS = ("reasoning", "reasoning_content")


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests and which model version answers there.

    `special_tokens`: the served tokenizer's special-token strings, defanged in every log text sent there
    (tasks.common.prompt); empty leaves only the generic `<|...|>` rule. `threshold`: the served version's
    verdict threshold (calibration.json); with it the verdict is the scored answer word, without it (a model
    registered before scores) the word the rationale ended in. `index_dir` and `neighbours`: the served
    version's retrieval index and how many labelled neighbours its prompts carry (0: none). `max_model_len`: the
    served context in tokens (prompt and answer); with it every prompt is fitted to it (tasks.common.prompt.
    fit_prompt), counted with the tokenizer in `tokenizer_dir` (None: UTF-8 bytes, an upper bound).
    `prompt_format`: the explain prompt the version was trained on (tasks.common.prompt: 1 the open question,
    2 given the verdict); its rationale request follows it.
    """

    base_url: str  # ".../v1"
    model: str
    version: str
    api_key: str | None = None
    special_tokens: tuple[str, ...] = ()
    threshold: float | None = None
    index_dir: str | None = None
    neighbours: int = 0
    max_model_len: int | None = None
    tokenizer_dir: str | None = None
    prompt_format: int = PROMPT_FORMAT  # the explain prompt the version was trained on (tasks.common.prompt)


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
    context = (state.get("launch") or {}).get("max_model_len")
    folder = state.get("model_dir") or state.get("base")
    return Endpoint(f"http://{state['host']}:{state['port']}/v1", state["served_model"], str(state["version"]),
                    os.environ.get(env_name) if env_name else None, tuple(special), state.get("threshold"),
                    state.get("index_dir"), int(state.get("neighbours") or 0),
                    int(context) if context else None, str(folder) if folder else None,
                    int(state.get("prompt_format") or OPEN_QUESTION_FORMAT))  # a state file before issue 19: 1


@functools.lru_cache(maxsize=4)
def load_index(index_dir: str) -> TemplateIndex:
    """The retrieval index of a served version, loaded once per process."""
    return TemplateIndex.load(Path(index_dir) / INDEX_FILE)


class EndpointError(ClassifierError):
    """The endpoint could not answer (after retries), or refused the request."""


_T = TypeVar("_T")
# How servers word a prompt longer than their context (vLLM: "This model's maximum context length is 1024 tokens.
# However, you requested 1439 tokens ...", vllm#20409; OpenAI: "context_length_exceeded").
_CONTEXT_WORDS = ("maximum context length", "context_length_exceeded", "max_model_len", "context length", "too long")


def _context_refusal(exc: EndpointError) -> bool:
    """Whether `exc` is the endpoint's HTTP 400 for a prompt longer than its context."""
    text = str(exc).lower()
    return "http 400" in text and any(word in text for word in _CONTEXT_WORDS)


class _Retryable(Exception):
    """A server-side failure worth retrying (5xx, 429)."""


def _retryable(exc: BaseException, *, timeouts: bool = True) -> bool:
    """Transport errors, 5xx and 429 are retried; a read timeout (the server got the request and did not answer
    in time) only when `timeouts`."""
    if isinstance(exc, httpx.ReadTimeout):
        return timeouts
    return isinstance(exc, httpx.TransportError | _Retryable)


def _one_line(text: str, limit: int = 200) -> str:
    """`text` with every run of whitespace as one space, cut at `limit` characters: fit for a one-line error."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _outside_contract(endpoint: Endpoint, what: str) -> EndpointError:
    """The error for an answer the verdict cannot be read from: names the endpoint and what is missing."""
    return EndpointError(f"endpoint {endpoint.base_url} answered outside the chat-completions contract: {what}")


def _server_side(code: object) -> bool:
    """Whether an error object's `code` is an HTTP status worth retrying (5xx, 429); names ('not_found') are not."""
    try:
        status = int(code)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return status == 429 or status >= 500


def _completion_object(response: httpx.Response, endpoint: Endpoint) -> dict[str, Any]:
    """The JSON object of a 2xx answer. A gateway's HTML page or another non-JSON body, a JSON value that is not an
    object, or an error object without choices (mini-swe-agent PR 902, langchain PR 31619: `KeyError: 'choices'`)
    raise EndpointError naming the endpoint; an error object whose code is a 5xx or 429 is retried like that
    status."""
    try:
        body = response.json()
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        kind = response.headers.get("content-type") or "no content type"
        raise _outside_contract(endpoint, f"HTTP {response.status_code} with a body that is not JSON ({kind}): "
                                          f"{_one_line(response.text, 120)!r}") from None
    if not isinstance(body, dict):
        raise _outside_contract(endpoint, f"HTTP {response.status_code} with a JSON {type(body).__name__}, "
                                          "not a chat.completion object")
    error = body.get("error")
    if error is not None and not body.get("choices"):
        detail, code = (error.get("message", error), error.get("code")) if isinstance(error, dict) else (error, None)
        what = f"HTTP {response.status_code} with an error instead of choices: {_one_line(str(detail), 300)}"
        if _server_side(code):
            raise _Retryable(f"{endpoint.base_url} answered {what}")
        raise _outside_contract(endpoint, what)
    return body


def _first_choice(body: dict[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    """`choices[0]` of a chat.completion object; EndpointError when there is none."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _outside_contract(endpoint, f"no choices[0] (the answer's keys: {', '.join(sorted(body)) or 'none'})")
    return choices[0]


def _message_text(choice: dict[str, Any], endpoint: Endpoint) -> str:
    """The completion text of `choice` as the model wrote it, for the strict parser (tasks.common.prompt).

    A reasoning parser's split (vllm#13375: the think text in `reasoning` or `reasoning_content`, the rest in
    `content`) is joined back as `<think>{reasoning}</think>{content}`. A null content without reasoning is an
    empty answer (it parses as invalid, like vLLM's "" for an empty generation). EndpointError when the message or
    its `content` key is missing, the content is not text, or the endpoint answered with a `refusal`.
    """
    message = choice.get("message")
    if not isinstance(message, dict) or "content" not in message:
        raise _outside_contract(endpoint, "no choices[0].message.content")
    content = message["content"]
    if content is not None and not isinstance(content, str):
        raise _outside_contract(endpoint, f"choices[0].message.content is a {type(content).__name__}, not text")
    if message.get("refusal"):
        raise _outside_contract(endpoint, f"a refusal instead of an answer: {_one_line(str(message['refusal']))}")
    reasoning = next((message[f] for f in REASONING_FIELDS if isinstance(message.get(f), str) and message[f]), None)
    return f"<think>{reasoning}</think>{content or ''}" if reasoning is not None else content or ""


def _top_logprobs(choice: dict[str, Any], endpoint: Endpoint) -> list[tuple[str, float]]:
    """The first generated token's top alternatives of `choice` as (token text, log-probability) pairs.

    EndpointError when `logprobs` is missing (an endpoint that drops the request field: ollama#16117), when there
    are no top alternatives, when every alternative has an empty token string (an endpoint that drops them), or
    when one has no numeric log-probability: the verdict score could not tell the answer word among them, and
    would count as normal. A few empty strings among readable ones are what real vLLM 0.32 returns for byte-level
    tokens that decode to no text on their own (part of a multi-byte character, vllm#9463: 1 of 20 on a Spirit
    template, measured this session); the answer words are ASCII tokens, never among them, so those are skipped.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        raise _outside_contract(endpoint, "no log-probabilities (choices[0].logprobs is missing), which the "
                                          "verdict score needs: use an endpoint that returns `logprobs` with "
                                          "`top_logprobs` (vLLM does), or judge by the rationale's answer word "
                                          "(no detect.version_dir)")
    content = logprobs.get("content")
    first = content[0] if isinstance(content, list) and content else None
    top = first.get("top_logprobs") if isinstance(first, dict) else None
    where = "choices[0].logprobs.content[0].top_logprobs"
    if not isinstance(top, list) or not top:
        raise _outside_contract(endpoint, f"no top log-probabilities in {where}")
    pairs, empty = [], 0
    for alt in top:
        token, logprob = (alt.get("token"), alt.get("logprob")) if isinstance(alt, dict) else (None, None)
        if not isinstance(token, str) or not token:
            empty += 1
            continue
        if isinstance(logprob, bool) or not isinstance(logprob, int | float) or math.isnan(logprob):
            raise _outside_contract(endpoint, f"{where} gives {token!r} the log-probability {logprob!r}")
        pairs.append((token, float(logprob)))
    if not pairs:
        raise _outside_contract(endpoint, f"empty token strings in {where} ({empty} of {len(top)}; vllm#9463): the "
                                          "answer word cannot be told among them")
    return pairs


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
            raise _Retryable(f"HTTP {response.status_code} from {endpoint.base_url}: {_one_line(response.text)}")
        if response.status_code >= 400:
            raise EndpointError(f"{endpoint.base_url} refused the request: HTTP {response.status_code} "
                                f"{_one_line(response.text, 300)}" + (" (check the API key env var)"
                                                                      if response.status_code == 401 else ""))
        return _completion_object(response, endpoint), endpoint

    def _request(self, payload: dict[str, Any], model: str | None, *,
                 retry_timeouts: bool = True) -> tuple[dict[str, Any], Endpoint]:
        """POST with exponential backoff and jitter on transport errors, 5xx and 429; EndpointError after the
        retries, or at once for a 4xx, an answer that is not a chat.completion object, any other httpx error, and
        (`retry_timeouts` False) a read timeout.

        A timed-out request is abandoned on a closed connection: httpx closes a connection whose response did not
        complete, and vLLM aborts the request of a client that disconnected (`with_cancellation` on its chat
        endpoint; vllm#9428 was a server that did not), so no retry runs beside the request it replaces
        (tests/test_endpoint_contract.py has a real server see the close before the retry arrives).
        """
        started = time.monotonic()
        retrying = Retrying(stop=stop_after_attempt(self.max_retries),
                            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=self.backoff_max_s,
                                                         jitter=self.backoff_s),
                            retry=retry_if_exception(functools.partial(_retryable, timeouts=retry_timeouts)),
                            reraise=False)
        try:
            return retrying(self._post, payload, model)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise EndpointError(
                f"endpoint {self.endpoint().base_url} did not answer after {self.max_retries} attempts over "
                f"{time.monotonic() - started:.1f} s: {type(cause).__name__}: {_one_line(str(cause), 300)}"
            ) from cause
        except httpx.ReadTimeout as exc:  # only when retry_timeouts is False
            raise EndpointError(
                f"endpoint {self.endpoint().base_url} gave no answer within the client timeout of "
                f"{self._http.timeout.read:g} s; the request was abandoned on a closed connection (vLLM aborts it) "
                "and not sent again, since the same greedy generation takes as long again: raise the timeout "
                "(detect.timeout_s; serve.smoke_timeout_s for the deploy's smoke test) or lower the answer budget"
            ) from exc
        except httpx.HTTPError as exc:  # not a transport error: one line, not a traceback
            raise EndpointError(f"endpoint {self.endpoint().base_url}: {type(exc).__name__}: "
                                f"{_one_line(str(exc), 300)}") from exc

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                 model: str | None = None) -> tuple[str, Endpoint]:
        """One chat completion (greedy) of the explain task: the rationale and the answer word.

        A reasoning parser's split answer is joined back (`_message_text`). Raises EndpointError for an answer
        outside the contract (no `choices[0].message.content`...) and, without retrying, for a read timeout: a
        greedy generation sent again takes as long again, for `max_retries` x `timeout_s` of server time.
        """
        payload = {"messages": messages, "temperature": 0.0, "max_tokens": max_tokens or self.max_tokens,
                   "stop": [ANSWER_CLOSE]}
        body, endpoint = self._request(payload, model, retry_timeouts=False)
        choice = _first_choice(body, endpoint)
        text = _message_text(choice, endpoint)
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

        `continue_final_message` continues the last (assistant) message instead of opening a new turn. Raises
        EndpointError when the answer has no `choices[0].logprobs.content[0].top_logprobs`, or any of them an empty
        token string (`_top_logprobs`); the message content is not needed (a reasoning parser may move it). A read
        timeout is retried: one token's time is mostly queueing, which a backoff may outlast.
        """
        payload = {"messages": messages, "temperature": 0.0, "max_tokens": 1, "logprobs": True,
                   "top_logprobs": TOP_LOGPROBS, "add_generation_prompt": not continue_final_message,
                   "continue_final_message": continue_final_message}
        body, endpoint = self._request(payload, model)
        return token_logprobs(_top_logprobs(_first_choice(body, endpoint), endpoint)), endpoint

    def score(self, messages: list[dict[str, str]], *, model: str | None = None) -> tuple[float | None, Endpoint]:
        """The verdict score of a scoring prompt (ending in an open `<answer>`): one token, its top log-probs."""
        alternatives, endpoint = self.next_token_logprobs(messages, model=model, continue_final_message=True)
        return verdict_score(alternatives), endpoint

    def neighbours_of(self, template: str, endpoint: Endpoint, dataset: str | None = None) -> list[tuple[str, int]]:
        """The served version's labelled neighbours of a template of `dataset` (None: unknown), under its index's
        policy (same system, similarity floor; tasks.common.retrieval); [] when its prompts carry none."""
        return [(n.template, n.label) for n in self.shown_neighbours(template, endpoint, dataset)]

    @staticmethod
    def shown_neighbours(template: str, endpoint: Endpoint, dataset: str | None = None) -> list[Neighbour]:
        """`neighbours_of` with each neighbour's system and similarity (tasks.common.retrieval.Neighbour)."""
        if not endpoint.index_dir or endpoint.neighbours <= 0:
            return []
        return load_index(endpoint.index_dir).shown([template], [dataset], endpoint.neighbours)[0]

    def explain_messages(self, template: str, dataset: str, endpoint: Endpoint,
                         neighbours: list[tuple[str, int]] | None = None, *, squeeze: float = 1.0,
                         max_tokens: int | None = None, verdict: str | None = None) -> list[dict[str, str]]:
        """The explain-task chat messages the served version answers with a rationale and an answer word, the
        rationale written for `verdict` when given (the scored verdict; None: the model's open answer);
        `neighbours` None looks them up in the version's index. Fitted to the served context less the answer
        budget (`max_tokens`, default the client's), times `squeeze` (see `fit_to_context`)."""
        near = self.neighbours_of(template, endpoint, dataset) if neighbours is None else neighbours
        return self.fit_to_context(
            lambda log, shown: prompt_messages(log, dataset, self.max_log_chars, endpoint.special_tokens,
                                               neighbours=shown, verdict=verdict),
            template, near, endpoint, max_tokens or self.max_tokens, squeeze)

    def scoring_messages(self, template: str, dataset: str, endpoint: Endpoint,
                         neighbours: list[tuple[str, int]] | None = None, *,
                         squeeze: float = 1.0) -> list[dict[str, str]]:
        """The verdict-task chat messages, ending in an open `<answer>` (continue the final message to score);
        `neighbours` None looks them up in the version's index. Fitted to the served context less one token."""
        near = self.neighbours_of(template, endpoint, dataset) if neighbours is None else neighbours
        return self.fit_to_context(
            lambda log, shown: scoring_messages(log, dataset, self.max_log_chars, endpoint.special_tokens,
                                                neighbours=shown),
            template, near, endpoint, 1, squeeze)

    @staticmethod
    def fit_to_context(build: Callable[[str, list[tuple[str, int]]], list[dict[str, str]]], template: str,
                       near: list[tuple[str, int]], endpoint: Endpoint, answer_tokens: int,
                       squeeze: float = 1.0) -> list[dict[str, str]]:
        """`build(template, near)` within the endpoint's context (issue 21, case 7): at most `squeeze` x
        (max_model_len - answer_tokens) tokens, neighbours dropped first, then the middle of the log text cut
        (tasks.common.prompt.fit_prompt). Unchanged when the endpoint's context is unknown. Raises EndpointError
        when the context cannot hold even a short prompt and the answer."""
        if endpoint.max_model_len is None:
            return build(template, near)
        count = token_counter(endpoint.tokenizer_dir)
        budget = int((endpoint.max_model_len - answer_tokens) * squeeze)
        try:
            messages, _ = fit_prompt(build, template, near, lambda m: chat_tokens(m, count), budget)
        except ValueError as exc:
            raise EndpointError(f"endpoint {endpoint.base_url} (context {endpoint.max_model_len} tokens, answer "
                                f"budget {answer_tokens}): {exc}") from exc
        return messages

    def classify_one(self, template: str, dataset: str = "system log", *, max_tokens: int | None = None,
                     model: str | None = None) -> TemplateVerdict:
        """The verdict for one template: the scored answer word against the version's threshold, and a rationale
        when `rationales` asks for it (always when the version has no threshold), written for that verdict (the
        explain task given the verdict, issue 19: one verdict, one reason), and shown only when it passes the
        rationale checks (else the evidence rationale for that verdict, `rationale_source` 'evidence'; the
        neighbours the prompt was built with count as shown). Only the model's output is parsed,
        never the log text. The verdict says whether a labelled neighbour of the template's own system was shown
        (`neighbour_shown`, issue 20 item 4), whether the first stage decided it (`first_stage`) and whether a rule
        on the shown neighbours did (`labelled_template`, `no_evidence_rule`: tasks.detection.verdicts.
        apply_verdict_rules, for a version with a threshold and an index)."""
        started = time.monotonic()
        endpoint = self.endpoint()
        found = self.shown_neighbours(template, endpoint, dataset)
        near = [(n.template, n.label) for n in found]
        own = own_system_shown(found, dataset)
        score, verdict = None, None
        first = endpoint.threshold is not None and first_stage_normal(template)
        if first:  # normal without a model call
            score, verdict = FIRST_STAGE_SCORE, NORMAL
        elif endpoint.threshold is not None:
            score, endpoint = self._within_context(
                lambda squeeze: self.score(self.scoring_messages(template, dataset, endpoint, near, squeeze=squeeze),
                                           model=model))
            verdict = scored_verdict(score, endpoint.threshold)
        ruled_by_index = bool(endpoint.index_dir) and endpoint.neighbours > 0 and endpoint.threshold is not None
        # a labelled template takes its label; an alert without evidence is none (tasks.detection.verdicts)
        ruled = apply_verdict_rules(template, dataset, found if ruled_by_index else None, verdict)
        verdict = ruled.verdict
        explain = shows_rationale(self.rationales, verdict, endpoint.threshold is not None)
        if not explain:
            return TemplateVerdict(template, dataset, verdict, score is not None, "", "", endpoint.version,
                                   time.monotonic() - started, score, neighbour_shown=own and not first,
                                   first_stage=first, no_evidence_rule=ruled.no_evidence,
                                   labelled_template=ruled.labelled)
        given = explain_verdict(verdict, endpoint.prompt_format)  # an older version is asked the open question
        text, endpoint = self._within_context(
            lambda squeeze: self.complete(self.explain_messages(template, dataset, endpoint, near, squeeze=squeeze,
                                                                max_tokens=max_tokens, verdict=given),
                                          max_tokens=max_tokens, model=model))
        parsed = parse_completion(text)
        final = verdict if verdict is not None else parsed.answer
        # the guard (issue 19): a rationale failing a check against its log, neighbours and verdict is not shown
        shown = grounded_rationale(parsed.think, template, dataset, near, final) if final is not None else None
        return TemplateVerdict(template, dataset, final, parsed.valid if verdict is None else score is not None,
                               shown.text if shown else parsed.think, text, endpoint.version,
                               time.monotonic() - started, score, parsed.answer, neighbour_shown=own,
                               first_stage=first, rationale_source=shown.source if shown else None,
                               no_evidence_rule=ruled.no_evidence, labelled_template=ruled.labelled)

    @staticmethod
    def _within_context(ask: Callable[[float], _T]) -> _T:
        """`ask(1.0)`; when the endpoint still refuses the prompt as longer than its context (HTTP 400: its
        tokenizer or chat template counts more than ours), once more at half the budget, never a stopped run."""
        try:
            return ask(1.0)
        except EndpointError as exc:
            if not _context_refusal(exc):
                raise
            return ask(0.5)

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
