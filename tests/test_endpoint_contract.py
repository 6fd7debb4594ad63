"""Endpoints that answer outside the chat-completions contract (issue 22, item 1), against a real local server.

The verdict needs `choices[0]`, its message's content (or a reasoning parser's split of it) and, when scoring,
the answer token's top log-probabilities with their token strings. An answer without them stops the run with
one line naming the endpoint and what is missing, never a silent "normal"; answers stored before stay.
A timed-out request is abandoned on a closed connection (vLLM aborts it); a generation is not retried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_detect import BGL, DETECT, fake_rationale, lines_file, run_detect

from serving.client import Endpoint, EndpointError, client_for

REPO = Path(__file__).resolve().parents[1]
SCORED = {"threshold": 0.5}  # a version with a verdict threshold: every template is scored from log-probs



def wait_for(condition: Any, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


# ---------------------------------------------------------------- answers outside the contract stop the run


@pytest.mark.parametrize(("mode", "endpoint", "missing"), [
    ("html", None, r"HTTP 200 with a body that is not JSON \(text/html.*Bad Gateway"),
    ("error_body", None, r"an error instead of choices: The model `rationanomaly` does not exist"),
    ("no_choices", None, r"no choices\[0\]"),
    ("no_logprobs", SCORED, r"no log-probabilities \(choices\[0\]\.logprobs is missing\)"),
    ("empty_tokens", SCORED, r"empty token strings in choices\[0\]\.logprobs\.content\[0\]\.top_logprobs"),
])
def test_an_answer_outside_the_contract_stops_the_run_with_one_line_naming_the_endpoint(
        tmp_path: Path, chat_server: Any, mode: str, endpoint: dict[str, Any] | None, missing: str) -> None:
    """Before: KeyError / JSONDecodeError tracebacks, or every verdict unscored, counted normal, exit 0."""
    server = chat_server(mode=mode)
    with pytest.raises(EndpointError, match=missing) as raised:
        run_detect(tmp_path, server.url, lines_file(BGL), endpoint=endpoint)
    message = str(raised.value)
    assert "\n" not in message and server.url in message
    assert server.requests == 1  # a broken contract is not transient: not retried, and nothing more is asked


def test_answers_stored_before_the_violation_stay_and_a_rerun_asks_only_the_rest(tmp_path: Path,
                                                                                 chat_server: Any) -> None:
    good = chat_server()
    run_detect(tmp_path, good.url, lines_file(BGL[:2]), endpoint=SCORED)  # one template, cached
    broken = chat_server(mode="no_logprobs")
    with pytest.raises(EndpointError, match=r"kept in .*cache\.sqlite; rerun"):
        run_detect(tmp_path, broken.url, lines_file(BGL), endpoint=SCORED)
    summary, records = run_detect(tmp_path, good.url, lines_file(BGL), endpoint=SCORED)
    assert summary["cache_hits"] == 1 and summary["requested"] == 2  # nothing unscored was stored
    assert all(r["score"] is not None for r in records if r["kind"] == "template")


def test_the_cli_prints_one_line_and_exits_1_for_an_html_answer(tmp_path: Path, chat_server: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rationanomaly.cli import app

    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    log = tmp_path / "bgl.log"
    log.write_bytes(lines_file(BGL))
    server = chat_server(mode="html")
    result = CliRunner().invoke(app, ["detect", str(log), "--out", str(tmp_path / "out.jsonl"), "--base-url",
                                      server.url, "--model-version", "7", "--no-progress"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detect stopped:") and server.url in lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- a reasoning parser's split answer


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])  # vLLM now / before its rename
def test_a_reasoning_parser_endpoint_gives_the_same_verdicts_and_rationales(tmp_path: Path, chat_server: Any,
                                                                            field: str) -> None:
    """vllm#13375: the think text moves to `reasoning` (`reasoning_content` before); rebuilt as the trained
    `<think>...</think><answer>...</answer>` the strict parser reads. Before: every answer invalid, or (scored)
    every rationale empty."""
    server = chat_server(mode=field)
    summary, records = run_detect(tmp_path / "words", server.url, lines_file(BGL))  # the rationale decides
    assert summary["abnormal_lines"] == 3 and summary["invalid_answer_lines"] == 0
    summary, records = run_detect(tmp_path / "scored", server.url, lines_file(BGL), endpoint=SCORED)
    templates = {r["template"]: r for r in records if r["kind"] == "template"}
    tlb = templates["data TLB error interrupt"]
    assert tlb["verdict"] == "abnormal" and tlb["rationale"] == fake_rationale("data TLB error interrupt")
    assert summary["abnormal_lines"] == 3


# ---------------------------------------------------------------- timeouts: abandoned, cancelled, not retried


def test_a_generation_that_times_out_is_cancelled_and_not_retried(chat_server: Any) -> None:
    """A greedy generation asked again takes as long again: one attempt, its connection closed at the
    timeout (the server sees the disconnect, as vLLM does before aborting), then one line saying so.
    Before: the same generation was sent `max_retries` times."""
    server = chat_server(mode="slow", delay_s=5.0)
    started = time.monotonic()
    with (client_for(Endpoint(server.url, "m", "1"), DETECT, timeout_s=0.5, max_retries=3,
                     backoff_s=0.01) as client,
          pytest.raises(EndpointError, match=r"no answer within the client timeout of 0\.5 s") as raised):
        client.complete(client.explain_messages("disk sda failed", "bgl", client.endpoint()))
    assert time.monotonic() - started < 3.0 and "\n" not in str(raised.value)
    assert server.requests == 1
    assert wait_for(lambda: server.disconnects == 1)  # the abandoned request is cancelled, not left running


def test_a_timed_out_scoring_request_is_retried_only_after_its_connection_is_closed(chat_server: Any) -> None:
    """A one-token scoring request is retried (its time is queueing, which a backoff may outlast), each retry
    on a new connection after the abandoned one was closed: no abandoned request is still running."""
    server = chat_server(mode="slow", delay_s=5.0)
    with (client_for(Endpoint(server.url, "m", "1", threshold=0.5), DETECT, timeout_s=0.5, max_retries=3,
                     backoff_s=0.01) as client,
          pytest.raises(EndpointError, match="did not answer after 3 attempts")):
        client.score(client.scoring_messages("disk sda failed", "bgl", client.endpoint()))
    assert server.requests == 3 and server.open_at_arrival == [0, 0, 0]
    assert wait_for(lambda: server.disconnects == 3)


def test_an_error_object_under_http_200_with_a_server_error_code_is_retried_like_a_502(chat_server: Any) -> None:
    """A gateway reporting its upstream's transient failure as `{"error": {"code": 502}}` under HTTP 200 is
    retried like that status; an error object with another code (404: unknown model) is not."""
    server = chat_server(mode="upstream_error")
    with (client_for(Endpoint(server.url, "m", "1"), DETECT, max_retries=2, backoff_s=0.01) as client,
          pytest.raises(EndpointError, match=r"did not answer after 2 attempts.*upstream overloaded")):
        client.classify_one("disk failed")
    assert server.requests == 2


def test_a_few_empty_token_strings_beside_readable_ones_are_skipped_as_real_vllm_sends_them(
        tmp_path: Path, chat_server: Any) -> None:
    """Real vLLM 0.32 gave 1 empty token string of 20 on a Spirit test template (a byte-level token that decodes
    to no text alone); stopping there stopped `detect` on our own endpoint. Only an answer whose every token
    string is empty breaks the contract (the test above)."""
    server = chat_server(mode="one_empty_token")
    summary, records = run_detect(tmp_path, server.url, lines_file(BGL), endpoint=SCORED)
    assert summary["invalid_answer_lines"] == 0
    assert {r["verdict"] for r in records if r["kind"] == "template"} == {"normal", "abnormal"}
    assert all(r["score"] is not None for r in records if r["kind"] == "template")
