"""fetch stage: every raw input, copied from the mirror or downloaded, pinned by sha256, written all-or-nothing.

`sources.yaml` lists each file (name, url, sha256, licence, optional `converted_from`). With
RATIONANOMALY_MIRROR set, `<mirror>/<name>` is copied; otherwise `url` is downloaded. For
`converted_from: xlsx` the spreadsheet is converted to CSV with pandas, for `converted_from: pkl`
the pickled HDFS sessions become JSON lines: **the sha256 pins the converted file**, so a
conversion that differs by one byte fails loudly instead of feeding the pipeline different data.
Files are staged in a temporary folder and swapped in only when every one verified, so a failure
leaves the previous `data/raw` untouched. `data/raw/MANIFEST.json` records where each came from.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import httpx
import yaml
from rich.progress import track
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from tasks.common.config import repo_root
from tasks.common.errors import InputError
from tasks.common.files import atomic_dir, sha256_bytes
from tasks.common.settings import FetchSettings, load_settings
from tasks.common.tracking import stage_run

MIRROR_ENV = "RATIONANOMALY_MIRROR"
MANIFEST = "MANIFEST.json"
REQUIRED_FIELDS = ("name", "url", "sha256", "licence")
CONVERTERS = ("xlsx", "pkl")


@dataclass(frozen=True)
class Source:
    """One raw input of sources.yaml: where it lives in data/raw, its public URL, sha256 and licence."""
    name: str
    url: str
    sha256: str
    licence: str
    converted_from: str | None = None


def load_sources(path: Path) -> list[Source]:
    """Read and check the sources file before anything is fetched."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise InputError(path, "sources file not found") from exc
    except yaml.YAMLError as exc:
        line = exc.problem_mark.line + 1 if getattr(exc, "problem_mark", None) else None
        raise InputError(path, f"not valid YAML: {exc}", line=line) from exc
    entries = raw.get("sources") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(path, "expected a non-empty list under 'sources:'", field="sources")
    sources, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(path, "each source must be a mapping", field=f"sources[{i}]")
        for key in REQUIRED_FIELDS:
            if not str(entry.get(key) or "").strip():
                raise InputError(path, f"missing '{key}'", field=f"sources[{i}].{key}")
        name = str(entry["name"])
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or name == MANIFEST:
            raise InputError(path, f"name {name!r} must be a relative path inside data/raw", field=f"sources[{i}].name")
        if name in seen:
            raise InputError(path, f"name {name!r} is listed twice", field=f"sources[{i}].name")
        seen.add(name)
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InputError(path, f"sha256 {digest!r} is not 64 hex digits", field=f"sources[{i}].sha256")
        converted = entry.get("converted_from")
        if converted is not None and converted not in CONVERTERS:
            raise InputError(path, f"unknown converter {converted!r}; expected one of {CONVERTERS}",
                             field=f"sources[{i}].converted_from")
        sources.append(Source(name, str(entry["url"]), digest, str(entry["licence"]), converted))
    return sources


def _retryable(exc: BaseException) -> bool:
    """Network hiccups and server-side errors are worth another try; a 404 is not."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


@retry(retry=retry_if_exception(_retryable), stop=stop_after_attempt(4),
       wait=wait_exponential(multiplier=1, max=20), reraise=True)
def download(url: str, timeout_s: float) -> bytes:
    """GET a public file, retried with exponential backoff on transient failures."""
    response = httpx.get(url, follow_redirects=True, timeout=timeout_s)
    response.raise_for_status()
    return response.content


def xlsx_to_csv(data: bytes) -> bytes:
    """The LogPrompt spreadsheets as CSV (`log,label`), byte-identical to the mirror's conversion."""
    import pandas as pd

    frame = pd.read_excel(io.BytesIO(data), keep_default_na=False)
    return frame.to_csv(index=False, lineterminator="\n").encode("utf-8")


class _SessionUnpickler(pickle.Unpickler):
    """Unpickles only the plain containers and numpy scalars deep-loglizer writes: never arbitrary code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("collections", "defaultdict"), ("collections", "OrderedDict"), ("builtins", "list"), ("builtins", "dict"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a downloaded pickle")
        return super().find_class(module, name)


def pkl_to_jsonl(data: bytes) -> bytes:
    """deep-loglizer sessions `{block_id: {templates, label}}` → JSON lines `{block_id, templates, label}`."""
    sessions = _SessionUnpickler(io.BytesIO(data)).load()
    lines = [
        json.dumps({"block_id": str(block), "templates": [str(t) for t in value["templates"]],
                    "label": int(value["label"])})
        for block, value in sessions.items()
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def obtain(source: Source, mirror: Path | None, timeout_s: float) -> tuple[bytes, str, str]:
    """The bytes of one source, where they came from (mirror|download) and a printable location."""
    if mirror is not None:
        path = mirror / source.name
        if not path.is_file():
            raise InputError(path, "file missing from the mirror", hint=f"unset {MIRROR_ENV} to download it")
        return path.read_bytes(), "mirror", str(path)
    try:
        data = download(source.url, timeout_s)
    except httpx.HTTPError as exc:
        raise InputError(source.url, f"download of {source.name} failed: {exc}", hint=f"or set {MIRROR_ENV}") from exc
    converter = {"xlsx": xlsx_to_csv, "pkl": pkl_to_jsonl}.get(source.converted_from or "")
    if converter is not None:
        try:
            data = converter(data)
        except Exception as exc:  # any parse failure of a downloaded file is bad input, named as such
            raise InputError(source.url, f"could not convert {source.converted_from} to {source.name}: {exc}") from exc
    return data, "download", source.url


def fetch_sources(sources_file: Path, raw_dir: Path, mirror: Path | None = None,
                  timeout_s: float = 60) -> dict[str, Any]:
    """Fetch, verify and install every source; returns the manifest written to `raw_dir/MANIFEST.json`."""
    sources = load_sources(sources_file)
    with atomic_dir(raw_dir) as staging:
        entries = []
        for source in track(sources, description="fetch", transient=True):
            data, origin, location = obtain(source, mirror, timeout_s)
            found = sha256_bytes(data)
            if found != source.sha256:
                raise InputError(
                    location, f"sha256 mismatch for {source.name}: expected {source.sha256}, found {found}",
                    hint=f"the file changed or is corrupt; if the change is intended, update {sources_file}",
                )
            dest = staging / source.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            entries.append({**asdict(source), "origin": origin, "bytes": len(data)})
        manifest = {"sources_file": sources_file.name, "files": entries}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def mirror_from_env() -> Path | None:
    """The local data mirror named by RATIONANOMALY_MIRROR (None when unset)."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


def run(settings: FetchSettings) -> dict[str, Any]:
    """The stage (paths relative to the repo root); returns the manifest. Raises InputError on a bad sources
    file, a missing or unreachable source, or a sha256 mismatch (naming the file and both hashes)."""
    root = repo_root()
    return fetch_sources(root / settings.sources_file, root / settings.raw_dir, mirror_from_env(),
                         settings.download_timeout_s)


def main() -> None:
    settings = load_settings().fetch
    manifest = run(settings)
    origins = sorted({entry["origin"] for entry in manifest["files"]})
    with stage_run("fetch") as active:
        import mlflow

        mlflow.log_params({"sources_file": settings.sources_file, "origin": ",".join(origins)})
        mlflow.log_metric("files", len(manifest["files"]))
        mlflow.log_dict(manifest, "manifest.json")
    print(f"fetch: {len(manifest['files'])} files verified into {settings.raw_dir} "
          f"(origin: {', '.join(origins)}; MLflow run {active.info.run_id})")


if __name__ == "__main__":
    main()
