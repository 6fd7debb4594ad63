"""Field cases, round 3 (issue 21): what real log files do to `detect`, against a real local OpenAI-compatible server.

Each test builds an input in the shape operators feed a detector (a rotated .gz, a UTF-16 export, coloured
console output, container and journald envelopes, outcome-bearing numbers, long stack traces, lines past the
served context, log text that looks like console markup, two runs at once) and checks the rule that makes the
failure words reach the model, or the clear refusal that names the file.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_detect import BGL, QUESTION, FakeChatServer, _Handler, detect_params, lines_file, run_detect

from serving.client import Endpoint
from serving.detect import http_detector
from tasks.common.errors import InputError
from tasks.common.tokenizers import CHAT_OVERHEAD_TOKENS, token_counter
from tasks.detection.detector import Detector, print_summary

REPO = Path(__file__).resolve().parents[1]
EXT3 = ("- 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 kernel: EXT3-fs error (device sda1): "
        "ext3_find_entry: reading directory #2 offset 0")
CRON = ("- 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 crond(pam_unix)[2915]: session closed for user "
        "root")



def kinds(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def logs_sent(server: FakeChatServer) -> list[str]:
    """The log text of every prompt the server received."""
    return [QUESTION.search(p).group("log") for p in server.prompts]  # type: ignore[union-attr]


def templates_of(records: list[dict[str, Any]]) -> set[str]:
    return {r["template"] for r in kinds(records, "template")}


def cli_detect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Any:
    from typer.testing import CliRunner

    from rationanomaly.cli import app

    monkeypatch.setenv("RATIONANOMALY_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return CliRunner().invoke(app, ["detect", *args])


# ---------------------------------------------------------------- 1. compressed files


def test_a_rotated_gzip_file_is_read_like_zcat(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    text = lines_file([CRON, EXT3, CRON])
    plain_summary, plain = run_detect(tmp_path / "plain", server.url, text)
    # two members, as `cat app.log.1.gz app.log.2.gz` makes
    summary, records = run_detect(tmp_path / "gz", server.url, gzip.compress(text) + gzip.compress(text))
    assert summary["decoded_as"] == "gzip"
    assert summary["lines"] == 6 and summary["abnormal_lines"] == 2
    assert templates_of(records) == templates_of(plain)
    assert any("EXT3-fs error" in log for log in logs_sent(server))
    assert plain_summary["decoded_as"] == ""


@pytest.mark.parametrize("compress,kind", [(bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_bzip2_and_xz_files_are_decompressed_too(tmp_path: Path, chat_server: Any, compress: Any, kind: str) -> None:
    server = chat_server()
    summary, records = run_detect(tmp_path, server.url, compress(lines_file([CRON, EXT3])))
    assert summary["decoded_as"] == kind
    assert [r["verdict"] for r in kinds(records, "line")] == ["normal", "abnormal"]


def test_a_truncated_gzip_stops_naming_the_file_and_keeps_the_lines_before_the_break(
        tmp_path: Path, chat_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = chat_server()
    lines = [f"job {i} finished with checksum {os.urandom(12).hex()}" for i in range(30000)]
    packed = gzip.compress(lines_file(lines))
    log = tmp_path / "app.log.1.gz"
    log.write_bytes(packed[: len(packed) // 2])
    out = tmp_path / "out.jsonl"
    result = cli_detect(tmp_path, monkeypatch, [str(log), "--out", str(out), "--base-url", server.url,
                                                "--model-version", "1", "--no-progress"])
    assert result.exit_code == 1
    assert str(log) in result.output and "truncated" in result.output and "gzip -t" in result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kinds(written, "line")) > 10000  # every line before the break was judged and written


def test_zstd_input_is_refused_with_the_command_that_reads_it(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    with pytest.raises(InputError, match=r"zstd.*zstdcat"):
        run_detect(tmp_path, server.url, b"\x28\xb5\x2f\xfd" + os.urandom(200))
    assert server.requests == 0


def test_binary_input_is_refused_and_never_judged(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    blob = bytes(range(256)) * 64
    with pytest.raises(InputError, match="binary data, not a text log"):
        run_detect(tmp_path, server.url, blob)
    assert server.requests == 0


# ---------------------------------------------------------------- 2. UTF-16, UTF-8 BOM, NUL bytes


@pytest.mark.parametrize("encoding,bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                          ("utf-16-le", b""), ("utf-32-le", codecs.BOM_UTF32_LE)])
def test_utf16_and_utf32_files_are_decoded(tmp_path: Path, chat_server: Any, encoding: str, bom: bytes) -> None:
    server = chat_server()
    lines = [f"worker {i} started" if i % 3 else f"worker {i} crashed: disk error" for i in range(300)]
    text = "\n".join(lines) + "\n"
    _, plain = run_detect(tmp_path / "plain", server.url, text.encode())
    summary, records = run_detect(tmp_path / "wide", server.url, bom + text.encode(encoding))
    assert summary["lines"] == 300  # not 601 lines of NUL-interleaved text
    assert templates_of(records) == templates_of(plain) == {"worker <*> started", "worker <*> crashed: disk error"}
    assert summary["decoded_as"].startswith(encoding[:6])


def test_a_utf8_bom_does_not_hide_the_first_lines_header(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    summary, records = run_detect(tmp_path, server.url, codecs.BOM_UTF8 + lines_file(BGL[:2]))
    assert summary["format"] == "bgl"
    assert templates_of(records) == {"instruction cache parity error corrected"}  # one event, one template
    assert not any("1117838570" in p or "\ufeff" in p for p in server.prompts)


def test_nul_bytes_in_a_text_log_are_dropped_and_counted(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    # a log preallocated and cut by a crash: a run of NUL bytes after the text, then the log goes on
    text = lines_file(["service started", "service stopped"] * 300)
    data = text + b"\x00" * 40 + b"\n" + lines_file(["disk \x00failed"])
    summary, records = run_detect(tmp_path, server.url, data)
    assert summary["nul_bytes"] == 41 and summary["lines"] == 601
    assert templates_of(records) == {"service started", "service stopped", "disk failed"}


# ---------------------------------------------------------------- 3. colour codes


def test_colour_codes_are_stripped_so_a_failure_is_its_own_template(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    lines = ["[\x1b[32m  OK  \x1b[0m] Started Journal Service.", "[\x1b[0;1;31mFAILED\x1b[0m] Started Journal Service.",
             "\x1b]8;;http://x\x07unit\x1b]8;;\x07 status: \x1b[31mFAILED\x1b[0m"]
    summary, records = run_detect(tmp_path, server.url, lines_file(lines))
    assert [r["verdict"] for r in kinds(records, "line")] == ["normal", "abnormal", "abnormal"]
    assert templates_of(records) == {"[ OK ] Started Journal Service.", "[FAILED] Started Journal Service.",
                                     "unit status: FAILED"}
    assert summary["escape_lines"] == 3
    assert not any("\x1b" in p or "[31m" in p for p in server.prompts)


# ---------------------------------------------------------------- 4. container and journald envelopes

JAVA_TRACE = ["java.lang.IllegalStateException: payment failed, connection pool exhausted",
              *[f"\tat com.example.Pool.take{i}(Pool.java:{i})" for i in range(12)],
              "Caused by: java.net.SocketTimeoutException: connect timed out", "\t... 9 more"]


def test_cri_lines_are_unwrapped_partials_joined_and_a_trace_joins_its_header(tmp_path: Path,
                                                                              chat_server: Any) -> None:
    server = chat_server()
    stamp = "2024-03-01T10:00:0{}.123456789Z"
    lines = [f"{stamp.format(0)} stdout F GET /healthz ok",
             f"{stamp.format(1)} stderr P volume mount /data fai",  # a line the runtime split in two pieces
             f"{stamp.format(1)} stdout F GET /healthz ok",  # another stream in between
             f"{stamp.format(2)} stderr F led: input/output error",
             *[f"{stamp.format(3)} stderr F {line}" for line in JAVA_TRACE]]
    summary, records = run_detect(tmp_path, server.url, lines_file(lines))
    assert summary["format"] == "cri"
    events = sorted(kinds(records, "line"), key=lambda e: e["line"])  # written as each event completes
    assert [(e["line"], e.get("last_line"), e["verdict"]) for e in events] == [
        (1, None, "normal"), (2, None, "abnormal"), (3, None, "normal"), (5, 19, "abnormal")]
    assert "volume mount /data failed: input/output error" in templates_of(records)
    assert not any("stderr" in log or "2024-03-01" in log for log in logs_sent(server))


def test_docker_json_file_messages_are_unwrapped_and_partials_joined(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    entries = [{"log": "GET /healthz 17 ok\n", "stream": "stdout", "time": "2024-03-01T10:00:00.1Z"},
               {"log": "payment worker ", "stream": "stderr", "time": "2024-03-01T10:00:01.1Z"},
               {"log": "aborted: fatal\n", "stream": "stderr", "time": "2024-03-01T10:00:01.2Z"}]
    summary, records = run_detect(tmp_path, server.url, lines_file([json.dumps(e) for e in entries]))
    assert summary["format"] == "docker"
    assert templates_of(records) == {"GET /healthz <*> ok", "payment worker aborted: fatal"}
    assert [r["verdict"] for r in kinds(records, "line")] == ["normal", "abnormal"]
    assert not any('"time"' in log or "Z}" in log for log in logs_sent(server))


def test_journald_json_messages_byte_arrays_nulls_and_priorities(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    ext4 = "EXT4-fs error (device sda1): ext4_find_entry:1455: inode #2: comm ls: reading directory lblock 0"
    entries = [{"__REALTIME_TIMESTAMP": "1709287200000000", "PRIORITY": "6", "SYSLOG_FACILITY": "3",
                "MESSAGE": "exit\r"},
               {"__REALTIME_TIMESTAMP": "1709287201000000", "PRIORITY": "3", "SYSLOG_FACILITY": "0",
                "MESSAGE": [*ext4.encode(), 0xFF]},  # not valid UTF-8: journald writes the bytes
               {"__REALTIME_TIMESTAMP": "1709287202000000", "PRIORITY": "6", "MESSAGE": None}]
    summary, records = run_detect(tmp_path, server.url, lines_file([json.dumps(e) for e in entries]))
    assert summary["format"] == "journald"
    found = sorted(templates_of(records))
    assert len(found) == 3
    assert found[0] == "<daemon.info> exit"
    assert found[1].startswith("<info> (empty message)")
    assert found[2].startswith("<kern.err> EXT4-fs error (device sda1)")
    assert [r["verdict"] for r in kinds(records, "line")] == ["normal", "abnormal", "normal"]


# ---------------------------------------------------------------- 5. values that decide


def test_outcome_bearing_numbers_keep_their_class_while_ids_stay_masked(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    lines = ['10.0.0.1 - - [01/Mar/2024:10:00:00 +0000] "GET /api/orders HTTP/1.1" 200 512',
             '10.0.0.2 - - [01/Mar/2024:10:00:01 +0000] "GET /api/orders HTTP/1.1" 502 173',
             '10.0.0.3 - - [01/Mar/2024:10:00:02 +0000] "GET /api/orders HTTP/1.1" 504 173',
             "nginx.service: Main process exited, code=exited, status=0/SUCCESS",
             "nginx.service: Main process exited, code=exited, status=1/FAILURE",
             "job 4411 finished with exit code 0", "job 4412 finished with exit code 137",
             "<11>1 2024-03-01T10:00:00Z web1 app 123 - - request handled",
             "<14>1 2024-03-01T10:00:00Z web1 app 124 - - request handled"]
    _, records = run_detect(tmp_path, server.url, lines_file(lines))
    ids = [r["template_id"] for r in kinds(records, "line")]
    assert ids[0] != ids[1] and ids[1] == ids[2]  # 200 vs 5xx differ; 502 and 504 share the server-error class
    assert ids[3] != ids[4] and ids[5] != ids[6] and ids[7] != ids[8]
    found = templates_of(records)
    assert '<*> - - [<*>/Mar/<*>:<*>:<*>:<*> <*>] "GET /api/orders HTTP/<*>.<*>" <server-error> <*>' in found
    assert "job <*> finished with exit code <killed-by-SIGKILL>" in found
    assert "nginx.service: Main process exited, code=exited, status=<exit-failure>/FAILURE" in found
    assert any(t.startswith("<user.err> ") for t in found) and any(t.startswith("<user.info> ") for t in found)
    assert "job <*> finished with exit code <exit-success>" in found  # the job id is still a masked value


# ---------------------------------------------------------------- 6. long events keep their error


def test_a_long_java_exception_is_judged_on_its_error_not_its_frames(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    oom = ["java.lang.OutOfMemoryError: Java heap space", *[f"\tat org.example.Cache.grow{i}(Cache.java:{i})"
                                                           for i in range(20)]]
    summary, _ = run_detect(tmp_path, server.url, lines_file(["service ready", *JAVA_TRACE, *oom]))
    assert summary["lines"] == 3
    sent = logs_sent(server)  # line breaks are spaces in a prompt (tasks.common.prompt.sanitize_log)
    trace = next(log for log in sent if log.startswith("java.lang.IllegalStateException: payment failed"))
    assert trace.count(" at com.example.Pool") == 1  # one frame kept after the header, the other 11 counted
    assert "Caused by: java.net.SocketTimeoutException: connect timed out" in trace
    assert "more frames" in trace
    memory = next(log for log in sent if log.startswith("java.lang.OutOfMemoryError: Java heap space"))
    assert memory.count(" at org.example.Cache") == 1 and len(memory) < 120


def test_a_python_traceback_takes_its_closing_exception_line(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    lines = ["worker started", "Traceback (most recent call last):", '  File "/srv/app.py", line 10, in <module>',
             "    main()", '  File "/srv/app.py", line 7, in main', "    raise ValueError(name)",
             "ValueError: order 17 failed validation", "worker stopped"]
    _, records = run_detect(tmp_path, server.url, lines_file(lines))
    events = kinds(records, "line")
    assert [(e["line"], e.get("last_line")) for e in events] == [(1, None), (2, 7), (8, None)]
    assert events[1]["verdict"] == "abnormal"
    assert any(log.startswith("Traceback") and log.endswith("ValueError: order <*> failed validation")
               for log in logs_sent(server))


# ---------------------------------------------------------------- 7. prompts within the served context


class _ContextHandler(_Handler):
    """FakeChatServer's handler with a served context: a prompt over `server.context` bytes (plus the answer
    budget) gets vLLM's HTTP 400 (vllm#20409)."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(body)
        prompt_bytes = sum(len(m["content"].encode()) for m in request["messages"])
        asked = prompt_bytes + int(request.get("max_tokens") or 0)
        if asked > self.server.context:  # type: ignore[attr-defined]
            self.server.refused += 1  # type: ignore[attr-defined]
            self._send(400, {"object": "error", "type": "BadRequestError", "code": 400,
                             "message": f"This model's maximum context length is {self.server.context} tokens. "  # type: ignore[attr-defined]
                                        f"However, you requested {asked} tokens in the messages."})
            return
        self.rfile = io.BytesIO(body)
        super().do_POST()


class ContextServer(FakeChatServer):
    def __init__(self, context: int) -> None:
        self.context, self.refused = context, 0
        super().__init__()
        self.RequestHandlerClass = _ContextHandler


def test_a_prompt_longer_than_the_context_is_fitted_and_never_refused(tmp_path: Path) -> None:
    server = ContextServer(context=1024)
    try:
        huge_json = json.dumps({"event": "order", "items": [{"sku": f"A{i}", "qty": i} for i in range(120)],
                                "status": "payment failed"})
        cjk = "磁盘错误 " * 500 + " device sda1 failed"
        lines = [huge_json, cjk, "service ready"]
        params = detect_params(tmp_path, rationales="all", max_tokens=160)
        endpoint = Endpoint(server.url, "m", "1", max_model_len=1024)  # no tokenizer here: UTF-8 bytes bound it
        out = io.StringIO()
        with http_detector(params, endpoint, progress=False) as detector:
            summary = detector.run(io.BytesIO(lines_file(lines)), out)
        assert server.refused == 0
        assert summary["lines"] == 3 and summary["invalid_answer_lines"] == 0
        assert all(len(p.encode()) < 1024 for p in server.prompts)
        assert any("payment failed" in p for p in server.prompts)  # the cut keeps the end of a long line
    finally:
        server.stop()


def test_a_refusal_still_met_is_asked_again_at_half_the_budget(tmp_path: Path) -> None:
    server = ContextServer(context=1400)  # the endpoint counts more than the context it reports
    try:
        params = detect_params(tmp_path, rationales="all", max_tokens=100)
        endpoint = Endpoint(server.url, "m", "1", max_model_len=2000)
        with http_detector(params, endpoint, progress=False) as detector:
            summary = detector.run(io.BytesIO(lines_file(["disk failure at sector " + "bad " * 700])),
                                  io.StringIO())
        assert server.refused == 1 and summary["lines"] == 1 and summary["abnormal_lines"] == 1
    finally:
        server.stop()


def test_token_counter_reads_the_tokenizer_json_and_falls_back_to_bytes(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"disk": 0, "failed": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert token_counter(str(tmp_path))("disk sda1 failed") == 3
    assert token_counter(None)("磁盘") == 6  # UTF-8 bytes: an upper bound for byte-level tokenizers
    assert CHAT_OVERHEAD_TOKENS >= 5  # ChatML's markers per message with SmolLM2's tokenizer


# ---------------------------------------------------------------- 8. log text is never console markup


def test_log_text_that_looks_like_markup_is_printed_as_plain_text(tmp_path: Path, chat_server: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    server = chat_server()
    lines = ["PUT [/mnt_projects/scratch] failed", "GET [/api/v1/orders] error [bold]x[/] [/]"]
    summary, _ = run_detect(tmp_path, server.url, lines_file(lines))
    buffer = io.StringIO()
    print_summary(summary, Console(file=buffer, width=200))
    shown = buffer.getvalue()
    assert "[/mnt_projects/scratch]" in shown and "[bold]x[/] [/]" in shown

    log = tmp_path / "app.log"
    log.write_bytes(lines_file(lines))
    summary_file = tmp_path / "summary.json"
    result = cli_detect(tmp_path, monkeypatch, [str(log), "--out", str(tmp_path / "o.jsonl"), "--base-url",
                                                server.url, "--summary", str(summary_file), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(summary_file.read_text())["abnormal_lines"] == 2


# ---------------------------------------------------------------- 9. state shared between runs


def test_a_second_run_on_one_drain_state_is_refused_naming_the_holder(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    params = detect_params(tmp_path)
    with http_detector(params, Endpoint(server.url, "m", "1"), progress=False):
        with pytest.raises(InputError, match=rf"drain.bin: the drain state is in use by pid {os.getpid()}") as err:
            http_detector(params, Endpoint(server.url, "m", "1"), progress=False)
        assert "--drain-state" in str(err.value)
        # its own state: both run
        other = params.model_copy(update={"drain_state": str(tmp_path / "other.bin")})
        with http_detector(other, Endpoint(server.url, "m", "1"), progress=False) as second:
            assert second.run(io.BytesIO(lines_file(["disk failed"])), io.StringIO())["lines"] == 1
    with http_detector(params, Endpoint(server.url, "m", "1"), progress=False) as again:  # released at close
        assert again.run(io.BytesIO(lines_file(["disk failed"])), io.StringIO())["lines"] == 1


def test_the_same_template_text_of_another_system_is_asked_again(tmp_path: Path, chat_server: Any) -> None:
    server = chat_server()
    hdfs = "081109 203615 148 INFO dfs.DataNode$PacketResponder: Received block blk_1 of size 67108864"
    bgl = ("- 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL "
           "INFO Received block blk_1 of size 67108864")
    run_detect(tmp_path, server.url, lines_file([bgl]))
    asked = server.requests
    run_detect(tmp_path, server.url, lines_file([bgl]))
    assert server.requests == asked  # same system: from the cache
    summary, _ = run_detect(tmp_path, server.url, lines_file([hdfs]))
    assert summary["format"] == "hdfs" and server.requests == asked + 1  # same text, another system: asked
    assert "Log (hdfs)" in server.prompts[-1]


def test_a_pipe_whose_first_line_is_odd_still_reads_bgl_and_never_sends_alert_tags(tmp_path: Path,
                                                                                   chat_server: Any) -> None:
    server = chat_server()
    params = detect_params(tmp_path, flush_s=0.3)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(b"--- log rotated ---\n")
            pipe.flush()
            time.sleep(1.0)  # the detector releases the first chunk: one line that looks like nothing
            pipe.write(lines_file(BGL))

    writer = threading.Thread(target=feed)
    writer.start()
    out = io.StringIO()
    with os.fdopen(read_fd, "rb") as pipe, http_detector(params, Endpoint(server.url, "m", "1"),
                                                           progress=False) as detector:
        summary = detector.run(pipe, out)
    writer.join()
    assert summary["format"] == "bgl"
    assert summary["lines"] == 6
    assert not any(p.startswith(("KERNDTLB", "- ")) or "KERNDTLB" in p for p in logs_sent(server))
    assert "data TLB error interrupt" in logs_sent(server)


def test_a_detector_closes_its_state_lock_when_its_setup_fails(tmp_path: Path) -> None:
    params = detect_params(tmp_path, cache_file=str(tmp_path))  # a folder: the cache cannot open

    class Never:
        def model_version(self) -> str:
            return "1"

        def close(self) -> None:
            pass

    with pytest.raises(Exception, match=r"unable to open|directory"):
        Detector(params, Never(), progress=False)  # type: ignore[arg-type]
    fine = params.model_copy(update={"cache_file": str(tmp_path / "c.sqlite")})
    Detector(fine, Never(), progress=False).close()  # type: ignore[arg-type]  # the lock was released
