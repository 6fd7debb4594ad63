"""distill: grounded lexicon rationales, and the OpenAI teacher against a real local chat-completions server."""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.errors import InputError
from tasks.common.prompt import CATEGORIES, parse_completion, training_messages
from tasks.common.settings import DistillSettings, load_settings
from tasks.correct import correct_templates
from tasks.data.teachers import LexiconTeacher, OpenAITeacher, expert_notes, lexicon_rationale, make_teacher
from tasks.distill import REJECTIONS, distill, judge
from tasks.evaluation.rationales import check_rationale, cited_neighbours
from tasks.split import split_all

LOGS = [
    ("bgl", "instruction cache parity error corrected", 0),
    ("bgl", "<*> error detected in EDRAM bank <*>", 1),
    ("bgl", "rts tree/torus link training failed: wanted: <*> C X+ X- Y+ Y- Z+ Z- got: <*> C <*> <*> <*> <*>", 1),
    ("bgl", "ciod: Error reading message prefix on CioStream socket to <*> <*> <*> <*> <*>", 1),
    ("bgl", "r08=0x008b5208 r09=0xffff91d4 r10=0x00350000 r11=0x00350000", 0),
    ("spirit", ">> mount: RPC: Timed out", 1),
    ("spirit", "Failed password for illegal user Administrator from 172.30.80.241 port 45217 ssh2", 1),
    ("spirit", "ACPI: Interpreter enabled", 0),
    ("spirit", "GM: The NIC ISR is reporting an SRAM parity error.", 1),
    ("spirit", "<*> <*> <*> <*> <*> status=sent (250 2.0.0 <*> Message accepted for delivery)", 0),
]


def test_lexicon_rationales_are_grounded_in_three_parts_and_end_in_the_label():
    for dataset, log, label in LOGS:
        rationale = lexicon_rationale(log, label, dataset)
        parts = re.fullmatch(r"Domain knowledge: (.+) Core information: (.+) Deduction: (.+)", rationale)
        assert parts, rationale
        assert rationale.endswith(f"So the log is {'abnormal' if label else 'normal'}.")
        assert log.split()[0] in parts.group(2), "core information quotes the log"
        if label:
            assert any(category in parts.group(3) for category in CATEGORIES), rationale
        assert 30 <= len(rationale.split()) <= 90


def test_lexicon_rationales_vary_with_the_log_not_only_with_the_label():
    rationales = [lexicon_rationale(log, label, dataset) for dataset, log, label in LOGS]
    assert len(set(rationales)) == len(LOGS)
    abnormal = [r for r, (_, _, label) in zip(rationales, LOGS, strict=True) if label]
    domains = {r.split(" Core information:")[0] for r in abnormal}
    assert len(domains) >= 5, "domain knowledge depends on the component"
    assert "EDRAM" in rationales[1] and "hardware failure" in rationales[1]
    assert "torus" in rationales[2] and "network issue" in rationales[2]
    assert "register" in rationales[4] and "normal" in rationales[4]


@pytest.fixture(scope="module")
def train_file(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real training templates: mirror → correct → split."""
    folder = tmp_path_factory.mktemp("data")
    result = correct_templates(mirror / "rationanomaly/anomaly_patch.json",
                               {"bgl": mirror / "logprompt/templates_bgl.csv",
                                "spirit": mirror / "logprompt/templates_spirit.csv"})
    result.templates.to_parquet(folder / "templates.parquet", index=False)
    shipped = load_settings(Path(__file__).resolve().parents[1] / "params.yaml").split
    split_all(folder / "templates.parquet", mirror / "loghub/BGL/BGL_2k.log_structured.csv",
              mirror / "hdfs_sessions/session_test.jsonl", folder / "split", folder / "split.json",
              seed=shipped.seed, test_fraction=shipped.test_fraction, validation_fraction=shipped.validation_fraction,
              train_anomaly_rate=shipped.train_anomaly_rate, window_lines=shipped.window_lines)
    return folder / "split/train.parquet"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lexicon_distills_every_real_training_template(train_file: Path, tmp_path: Path):
    report = distill(train_file, tmp_path / "train.jsonl", tmp_path / "distill.json", LexiconTeacher(),
                     hard_negative_repeats=3)
    # 340 of the 907 training templates hold no letter word: the first stage decides them, the model never sees one
    assert report["first_stage"] == 340 and report["total"] == report["accepted"] == 567
    assert report["rejected_total"] == 0
    assert report["per_dataset"]["bgl"]["accepted"] == 119 and report["accepted_abnormal"] == 54 + 82
    hard = report["hard_negatives"]  # error-worded normals, written three times each (issue 18 item 3)
    assert hard > 0 and report["examples"] == {"explain": 567 + 2 * hard, "verdict": 567 + 2 * hard}
    assert report["examples_with_neighbours"] == 0
    assert 40 <= report["mean_rationale_words"] <= 70
    rows = read_jsonl(tmp_path / "train.jsonl")
    explain = [row for row in rows if row["task"] == "explain"]
    assert len({row["rationale"] for row in explain}) >= 0.99 * len({(r["dataset"], r["template"]) for r in explain})
    for row in rows[:50]:
        assert row["messages"] == training_messages(row["template"], row["rationale"], row["label"], row["dataset"],
                                                    task=row["task"])
        assert row["prompt"] + row["completion"] == row["messages"]
        answer = row["completion"][0]["content"]
        if row["task"] == "explain":
            parsed = parse_completion(answer)
            assert parsed.valid and parsed.label == row["label"] and parsed.think == row["rationale"]
        else:
            assert answer == f"<answer>{('normal', 'abnormal')[row['label']]}</answer>"
    assert json.loads((tmp_path / "distill.json").read_text()) == report


# --- the openai teacher against a real server on 127.0.0.1 ------------------------------------------------------------


class ChatServer:
    """Speaks POST /v1/chat/completions. It answers with the expert label given in the prompt, except:
    logs containing DISAGREE get the other label, BADFORMAT gets no tags, FLAKY fails once with a 500."""

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                log = user.split("\n")[1]
                server.requests[log] += 1
                server.bodies.append(body)
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer sk-test":
                    return self.reply(404, {"error": {"message": "not found"}})
                if "FLAKY" in log and server.requests[log] == 1:
                    return self.reply(500, {"error": {"message": "try again"}})
                label = re.search(r"The expert label is: (\w+)", user).group(1)
                if "DISAGREE" in log:
                    label = "normal" if label == "abnormal" else "abnormal"
                text = f"<think>Domain knowledge: test. Core information: {log}. Deduction: {label}.</think>" \
                       f"<answer>{label}</answer>"
                if "BADFORMAT" in log:
                    text = f"I think it is {label}."
                if "NOFAILWORD" in log:  # the issue-19 fault: a claim the log's own `failed` contradicts
                    text = (f"<think>`mount` reports a routine step without any failure word, so the log is {label}."
                            f"</think><answer>{label}</answer>")
                if "INVENTED" in log:  # a component the log does not name
                    text = f"<think>`MidplaneSwitch` loads jobs, so the log is {label}.</think><answer>{label}</answer>"
                self.reply(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # keep-alive client connections must not block server_close()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = ChatServer()
    yield server
    server.close()


def small_train(path: Path) -> Path:
    rows = [("bgl", "<*> error detected in EDRAM bank <*>", 1), ("bgl", "ciod: generated <*> core files", 0),
            ("spirit", "DISAGREE node link is down", 1), ("spirit", "BADFORMAT kernel started", 0),
            ("spirit", "FLAKY mount: RPC: Timed out", 1)]
    pd.DataFrame(rows, columns=["dataset", "template", "label"]).to_parquet(path, index=False)
    return path


def openai_params(server: ChatServer, cache: Path) -> DistillSettings:
    """The shipped `distill` settings pointed at the fake chat server, with its own cache."""
    shipped = load_settings(Path(__file__).resolve().parents[1] / "params.yaml").distill
    teacher = shipped.openai.model_copy(update={"base_url": server.base_url, "model": "teacher-test",
                                                "api_key_env": "TEACHER_TEST_KEY", "cache_dir": str(cache),
                                                "max_retries": 2, "timeout_s": 10, "temperature": 0.0,
                                                "concurrency": 2})
    return shipped.model_copy(update={"teacher": "openai", "openai": teacher})


def test_openai_teacher_rejects_disagreeing_labels_and_caches_every_answer(chat_server: ChatServer, tmp_path: Path):
    train = small_train(tmp_path / "train.parquet")
    params = openai_params(chat_server, tmp_path / "cache")
    report = distill(train, tmp_path / "sft.jsonl", tmp_path / "distill.json", make_teacher(params, tmp_path))
    assert report["teacher"] == "openai" and report["model"] == "teacher-test"
    assert (report["accepted"], report["rejected"]) == (3, {**dict.fromkeys(REJECTIONS, 0), "format_invalid": 1,
                                                             "label_disagrees": 1})
    assert report["requests"] == 5 and report["cache_hits"] == 0
    assert chat_server.requests["FLAKY mount: RPC: Timed out"] == 2, "a 500 is retried by the client"
    edram = next(b["messages"][-1]["content"] for b in chat_server.bodies if "EDRAM" in b["messages"][-1]["content"])
    assert "The expert label is: abnormal" in edram, "the teacher is conditioned on the corrected label"
    rows = [row for row in read_jsonl(tmp_path / "sft.jsonl") if row["task"] == "explain"]
    assert [row["template"] for row in rows] == ["<*> error detected in EDRAM bank <*>",
                                                  "ciod: generated <*> core files", "FLAKY mount: RPC: Timed out"]
    first_output = (tmp_path / "sft.jsonl").read_bytes()

    served = sum(chat_server.requests.values())
    again = distill(train, tmp_path / "sft.jsonl", tmp_path / "distill.json", make_teacher(params, tmp_path))
    assert sum(chat_server.requests.values()) == served, "a rerun makes zero requests"
    assert (again["requests"], again["cache_hits"]) == (0, 5)
    assert (tmp_path / "sft.jsonl").read_bytes() == first_output
    assert len(list((tmp_path / "cache").glob("*.json"))) == 5


def test_openai_teacher_needs_its_key_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TEACHER_TEST_KEY", raising=False)
    shipped = load_settings(Path(__file__).resolve().parents[1] / "params.yaml").distill
    params = shipped.model_copy(update={"teacher": "openai", "openai": shipped.openai.model_copy(
        update={"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "TEACHER_TEST_KEY",
                "cache_dir": str(tmp_path)})})
    with pytest.raises(InputError, match=r"'distill\.openai\.api_key_env': environment variable TEACHER_TEST_KEY"):
        make_teacher(params, tmp_path)


def test_unreachable_endpoint_rejects_and_counts_instead_of_writing_half_a_dataset(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")
    teacher = OpenAITeacher("http://127.0.0.1:9/v1", "m", "TEACHER_TEST_KEY", tmp_path / "cache", max_retries=0,
                            timeout_s=2, temperature=0.2, concurrency=1, max_log_chars=2000)
    (tmp_path / "sft.jsonl").write_text("previous good output\n")
    with pytest.raises(RuntimeError, match=r"no acceptable rationale .*request_failed': 5"):
        distill(small_train(tmp_path / "train.parquet"), tmp_path / "sft.jsonl", tmp_path / "d.json", teacher)
    assert (tmp_path / "sft.jsonl").read_text() == "previous good output\n"


def test_bad_training_file_fails_before_distilling_and_keeps_the_last_output(tmp_path: Path):
    out = tmp_path / "sft.jsonl"
    distill(small_train(tmp_path / "train.parquet"), out, tmp_path / "d.json", LexiconTeacher())
    before = out.read_bytes()
    pd.DataFrame({"dataset": ["bgl"], "template": ["x"], "label": [3]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet:\d+ field 'label': label 3 is not 0/1"):
        distill(tmp_path / "bad.parquet", out, tmp_path / "d.json", LexiconTeacher())
    assert out.read_bytes() == before


def test_training_neighbours_never_show_the_example_itself_or_a_near_twin():
    from tasks.common.retrieval import TemplateIndex
    from tasks.distill import training_neighbours

    templates = [log for _, log, _ in LOGS] + ["instruction cache parity error corrected!", "ACPI: Interpreter on"]
    labels = [y for _, _, y in LOGS] + [0, 0]
    index = TemplateIndex(templates, labels, ["bgl"] * len(templates))
    settings = load_settings(Path(__file__).resolve().parents[1] / "params.yaml").index.model_copy(
        update={"k": 3, "bare_fraction": 0.0})
    shown = training_neighbours(index, templates, settings, seed=0)
    for template, near in zip(templates, shown, strict=True):
        assert len(near) == 3 and template not in [t for t, _ in near]
        similarity = {n.template: n.similarity for n in index.search([template], len(templates))[0]}
        assert all(similarity[other] < settings.near_duplicate_similarity for other, _ in near)
    # the near-twin (only punctuation differs) is the closest template, yet never shown
    assert "instruction cache parity error corrected!" not in [t for t, _ in shown[0]]
    bare = training_neighbours(index, templates * 20, settings.model_copy(update={"bare_fraction": 0.3}), seed=1)
    assert 0.15 < sum(not near for near in bare) / len(bare) < 0.45  # a share trained without neighbours


# --- issue 19: the distill stage checks every teacher's rationale ----------------------------------------------------


def test_openai_answers_failing_the_rationale_checks_are_rejected_and_counted(chat_server: ChatServer,
                                                                              tmp_path: Path):
    rows = [("spirit", "NOFAILWORD mount failed for /home", 1), ("bgl", "INVENTED ciod: Error loading <*>", 1),
            ("bgl", "<*> error detected in EDRAM bank <*>", 1)]
    train = tmp_path / "train.parquet"
    pd.DataFrame(rows, columns=["dataset", "template", "label"]).to_parquet(train, index=False)
    report = distill(train, tmp_path / "sft.jsonl", tmp_path / "d.json",
                     make_teacher(openai_params(chat_server, tmp_path / "cache"), tmp_path))
    assert report["accepted"] == 1 and report["rejected_total"] == 2
    assert report["rejected"]["check_failed:false_no_failure_word"] == 1
    assert report["rejected"]["check_failed:component_in_log"] == 1


def test_judge_rejects_a_rationale_under_the_wrong_conclusion_or_citing_an_unshown_neighbour():
    log = "ciod: Error loading <*>: invalid or missing program image"
    cites = ('<think>`ciod` says "Error loading". An expert labelled the similar log "ciod: Error reading <*>" '
             'abnormal. So the log is abnormal.</think><answer>abnormal</answer>')
    assert judge(cites, 1, log, "bgl", [("ciod: Error reading <*> socket", 1)])[1] is None
    assert judge(cites, 1, log, "bgl", [])[1] == "check_failed:quotes_grounded"
    assert judge(cites, 1, log, "bgl", [("ciod: Error reading <*> socket", 0)])[1] == \
        "check_failed:cited_neighbour_shown"
    normal_story = cites.replace("So the log is abnormal.", "So the log is normal.")
    assert judge(normal_story, 1, log, "bgl", [("ciod: Error reading <*> socket", 1)])[1] == "check_failed:agrees"
    assert judge(cites, 1)[1] is None, "without the log only format and label are judged"


def test_the_lexicon_teacher_passes_every_check_on_the_real_training_data_with_the_neighbours_shown(
        train_file: Path, tmp_path: Path):
    from tasks.common.retrieval import TemplateIndex

    frame = pd.read_parquet(train_file)
    index = TemplateIndex(frame["template"].tolist(), frame["label"].tolist(), frame["dataset"].tolist())
    retrieval = load_settings(Path(__file__).resolve().parents[1] / "params.yaml").index
    notes = expert_notes(train_file.parents[1] / "templates.parquet")
    report = distill(train_file, tmp_path / "train.jsonl", tmp_path / "d.json", LexiconTeacher(notes), index,
                     retrieval, seed=0)
    assert report["rejected_total"] == 0 and report["accepted"] == len(frame) - report["first_stage"]
    assert 40 <= report["mean_rationale_words"] <= 70
    explain = [row for row in read_jsonl(tmp_path / "train.jsonl") if row["task"] == "explain"]
    cited = [row for row in explain if cited_neighbours(row["rationale"])]
    assert len(cited) >= 0.3 * len(explain), "a shown same-label neighbour is cited"
    for row in explain:
        shown = [tuple(n) for n in row["neighbours"]]
        assert check_rationale(row["rationale"], row["template"], row["dataset"], shown, row["label"]).passed
    assert any("the experts corrected its label" in row["rationale"] for row in explain), "expert notes are used"
