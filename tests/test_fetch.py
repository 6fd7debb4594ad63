"""fetch: sources pinned by sha256, from the mirror or a real local HTTP server, installed all-or-nothing."""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.common.errors import InputError
from tasks.fetch import MANIFEST, fetch_sources, load_sources

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "sources.yaml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def mirror_copy(mirror: Path, dest: Path) -> Path:
    """A writable copy of the mirror (the real one is read-only and must never change)."""
    shutil.copytree(mirror, dest, ignore=shutil.ignore_patterns("*.xlsx"))
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def test_mirror_fetch_installs_every_source_verified_with_a_manifest(mirror: Path, tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    manifest = fetch_sources(SOURCES, raw, mirror)
    sources = load_sources(SOURCES)
    assert len(manifest["files"]) == len(sources) == 8
    for source in sources:
        assert sha256(raw / source.name) == source.sha256 == sha256(mirror / source.name)
    written = json.loads((raw / MANIFEST).read_text())
    assert written == manifest
    assert {entry["origin"] for entry in written["files"]} == {"mirror"}
    assert {entry["licence"] for entry in written["files"]} >= {"Apache-2.0"}
    assert [p.name for p in raw.parent.iterdir()] == ["raw"], "no staging folder left behind"


def test_missing_mirror_file_stops_with_its_name(mirror: Path, tmp_path: Path):
    broken = mirror_copy(mirror, tmp_path / "mirror")
    (broken / "loghub/BGL/BGL_2k.log").unlink()
    with pytest.raises(InputError, match=r"loghub/BGL/BGL_2k\.log: file missing from the mirror"):
        fetch_sources(SOURCES, tmp_path / "raw", broken)


def test_corrupt_mirror_file_names_the_file_and_both_hashes(mirror: Path, tmp_path: Path):
    broken = mirror_copy(mirror, tmp_path / "mirror")
    patch = broken / "rationanomaly/anomaly_patch.json"
    patch.write_bytes(patch.read_bytes().replace(b'"abnormal"', b'"normal"', 1))
    expected = next(s.sha256 for s in load_sources(SOURCES) if s.name == "rationanomaly/anomaly_patch.json")
    with pytest.raises(InputError) as error:
        fetch_sources(SOURCES, tmp_path / "raw", broken)
    message = str(error.value)
    assert "anomaly_patch.json" in message and "sha256 mismatch" in message
    assert f"expected {expected}" in message and f"found {sha256(patch)}" in message


def test_failed_fetch_leaves_the_last_good_raw_data_untouched(mirror: Path, tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    fetch_sources(SOURCES, raw, mirror)
    before = tree_digest(raw)
    broken = mirror_copy(mirror, tmp_path / "mirror")
    (broken / "hdfs_sessions/session_test.jsonl").write_text("{}\n")  # late in the list: earlier files were staged
    with pytest.raises(InputError, match="sha256 mismatch"):
        fetch_sources(SOURCES, raw, broken)
    assert tree_digest(raw) == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]


def test_sources_file_errors_name_the_field(tmp_path: Path):
    sources = yaml.safe_load(SOURCES.read_text())
    del sources["sources"][2]["sha256"]
    bad = tmp_path / "sources.yaml"
    bad.write_text(yaml.safe_dump(sources))
    with pytest.raises(InputError, match=r"field 'sources\[2\]\.sha256': missing 'sha256'"):
        load_sources(bad)


# --- downloads, from a real HTTP server on 127.0.0.1 ---------------------------------------------------------------


class FileServer:
    """Serves a folder; `fail_first[path] = n` answers the first n requests of that path with 503."""

    def __init__(self, root: Path) -> None:
        self.root, self.hits, self.fail_first = root, collections.Counter(), {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                server.hits[path] += 1
                if server.fail_first.get(path, 0) >= server.hits[path]:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = server.root / path
                body = target.read_bytes() if target.is_file() else b""
                self.send_response(200 if target.is_file() else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # keep-alive client connections must not block server_close()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    (tmp_path / "www").mkdir()
    server = FileServer(tmp_path / "www")
    yield server
    server.close()


def deep_loglizer_pickle(jsonl_lines: list[str]) -> bytes:
    """Sessions pickled the way deep-loglizer's preprocess_hdfs.py does (numpy keys, defaultdict values)."""
    sessions = {}
    for line in jsonl_lines:
        record = json.loads(line)
        value = collections.defaultdict(list)
        value["templates"].extend(record["templates"])
        value["label"] = np.int64(record["label"])
        sessions[np.str_(record["block_id"])] = value
    return pickle.dumps(sessions)


def write_sources(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"sources": entries}, sort_keys=False))
    return path


def test_download_converts_xlsx_and_pickle_and_pins_the_converted_files(
    mirror: Path, tmp_path: Path, file_server: FileServer
):
    www = file_server.root
    shutil.copy(mirror / "logprompt/templates_bgl.xlsx", www / "templates_bgl.xlsx")
    lines = (mirror / "hdfs_sessions/session_test.jsonl").read_text().splitlines(keepends=True)[:3]
    (www / "session_test.pkl").write_bytes(deep_loglizer_pickle(lines))
    shutil.copy(mirror / "rationanomaly/anomaly_patch.json", www / "anomaly_patch.json")
    sources = write_sources(tmp_path / "sources.yaml", [
        {"name": "logprompt/templates_bgl.csv", "url": f"{file_server.url}/templates_bgl.xlsx",
         "converted_from": "xlsx", "sha256": sha256(mirror / "logprompt/templates_bgl.csv"), "licence": "x"},
        {"name": "hdfs_sessions/session_test.jsonl", "url": f"{file_server.url}/session_test.pkl",
         "converted_from": "pkl", "sha256": hashlib.sha256("".join(lines).encode()).hexdigest(), "licence": "x"},
        {"name": "rationanomaly/anomaly_patch.json", "url": f"{file_server.url}/anomaly_patch.json",
         "sha256": sha256(mirror / "rationanomaly/anomaly_patch.json"), "licence": "Apache-2.0"},
    ])
    file_server.fail_first["anomaly_patch.json"] = 1  # a transient 503 is retried with backoff
    raw = tmp_path / "raw"
    manifest = fetch_sources(sources, raw, mirror=None, timeout_s=10)
    assert (raw / "logprompt/templates_bgl.csv").read_bytes() == (mirror / "logprompt/templates_bgl.csv").read_bytes()
    assert (raw / "hdfs_sessions/session_test.jsonl").read_text() == "".join(lines)
    assert {entry["origin"] for entry in manifest["files"]} == {"download"}
    assert file_server.hits["anomaly_patch.json"] == 2


def test_download_of_a_missing_url_names_it_without_retrying(tmp_path: Path, file_server: FileServer):
    sources = write_sources(tmp_path / "sources.yaml", [
        {"name": "a.json", "url": f"{file_server.url}/gone.json", "sha256": "0" * 64, "licence": "x"}])
    with pytest.raises(InputError, match=r"gone\.json: download of a\.json failed: .*404"):
        fetch_sources(sources, tmp_path / "raw", mirror=None, timeout_s=10)
    assert file_server.hits["gone.json"] == 1


def test_a_downloaded_pickle_that_carries_code_is_refused(tmp_path: Path, file_server: FileServer):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (file_server.root / "evil.pkl").write_bytes(pickle.dumps({"blk_1": Exploit()}))
    sources = write_sources(tmp_path / "sources.yaml", [
        {"name": "s.jsonl", "url": f"{file_server.url}/evil.pkl", "converted_from": "pkl", "sha256": "0" * 64,
         "licence": "x"}])
    with pytest.raises(InputError, match=r"refusing to load builtins\.print"):
        fetch_sources(sources, tmp_path / "raw", mirror=None, timeout_s=10)
