"""Turn `models:/<name>@champion` into local folders vLLM can load: kept small and apart so registry changes stay here.

Registry convention (tasks/registry.py): a version is a pyfunc model whose artifacts hold the LoRA adapter
folder (the one with adapter_config.json) and `base_model_ref.json` (base path + weights sha256), which
tasks.release.registry resolves to a local base folder with the same weights. Without that file: the version tag
`base_model_dir`, else the adapter's `base_model_name_or_path`, else params base_model.out_dir.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.common.config import repo_root
from tasks.common.contracts import BASE_REF_FILE, OPEN_QUESTION_FORMAT
from tasks.common.errors import InputError
from tasks.common.files import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR_TAGS = ("base_model_dir", "base_model_path", "base_model")


@dataclass(frozen=True)
class ModelRef:
    """What the launcher serves: a registered model version as local folders."""

    name: str
    version: str
    base_model_dir: str
    adapter_dir: str | None  # None serves the base model alone (no smoke "adapter active" rule)
    threshold: float | None = None  # the version's verdict threshold (calibration.json); None: the rationale decides
    index_dir: str | None = None  # the version's retrieval index (its `index` artifact)
    neighbours: int = 0  # labelled neighbours per prompt (0: the version's prompts carry none)
    prompt_format: int = OPEN_QUESTION_FORMAT  # the explain prompt it was trained on (tasks.common.prompt)

    def to_dict(self) -> dict[str, Any]:
        """As plain data."""
        return asdict(self)


def find_adapter_dir(root: Path) -> Path:
    """The shallowest folder under `root` that holds an adapter_config.json."""
    hits = sorted(root.rglob(ADAPTER_CONFIG), key=lambda p: (len(p.parts), str(p)))
    if not hits:
        raise InputError(root, f"no {ADAPTER_CONFIG} among the model version's artifacts",
                         hint="register the LoRA adapter folder as the version's artifacts")
    return hits[0].parent


def _base_dir(tags: dict[str, str], adapter_dir: Path, root: Path, fallback: Path) -> str:
    refs = sorted(root.rglob(BASE_REF_FILE), key=lambda p: len(p.parts))
    if refs:
        from tasks.release.pyfunc import resolve_base_model  # the registry convention owns the sha256 match

        return str(resolve_base_model(json.loads(refs[0].read_text(encoding="utf-8"))).resolve())
    for key in BASE_DIR_TAGS:
        value = tags.get(key)
        if value and Path(value).exists():
            return str(Path(value).resolve())
        if value and (repo_root() / value).exists():
            return str((repo_root() / value).resolve())
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    if recorded and Path(recorded).exists():
        return str(Path(recorded).resolve())
    return str(fallback.resolve())


def local_model_ref(name: str, version: str, base_model_dir: str | Path, folder: str | Path) -> ModelRef:
    """A ModelRef for a local adapter folder, or a downloaded version's artifacts folder holding one.

    The verdict threshold and index are read as for a registered version (calibration.json in the adapter
    folder, the `index` folder beside it); an adapter without calibration.json gets none. Raises InputError when the
    folder holds no adapter or its calibration is unreadable.
    """
    from tasks.release.pyfunc import read_calibration, read_prompt_format  # the registry convention owns the file

    folder = Path(folder).resolve()
    adapter = find_adapter_dir(folder)
    threshold, index_dir, neighbours = read_calibration(adapter)
    return ModelRef(name, version, str(Path(base_model_dir).resolve()), str(adapter), threshold, index_dir,
                    neighbours, read_prompt_format(adapter))


def resolve_champion(model_name: str, alias: str = "champion", dest_root: str | Path | None = None, *,
                     fallback_base_dir: Path) -> ModelRef:
    """Resolve `models:/<model_name>@<alias>` and download its artifacts once into .serve/models/<name>/<version>.

    The base model is the one `base_model_ref.json` names (same weights sha256), else a version tag, else the
    adapter's recorded base, else `fallback_base_dir` (the project's base_model.out_dir). Raises InputError
    when the alias does not exist or the version holds no adapter.
    """
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from tasks.common.tracking import setup_mlflow

    setup_mlflow()
    try:
        version = MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        raise InputError(f"models:/{model_name}@{alias}", "no such registered model version",
                         hint="run the release flow first (it registers and promotes a champion)") from exc
    dest = Path(dest_root or repo_root() / ".serve" / "models") / model_name / str(version.version)
    if not (dest / ".complete").exists():
        with atomic_dir(dest) as staging:
            download_artifacts(artifact_uri=f"models:/{model_name}/{version.version}", dst_path=str(staging))
            (staging / ".complete").write_text(json.dumps({"source": version.source}) + "\n", encoding="utf-8")
    adapter = find_adapter_dir(dest)
    base = _base_dir(dict(version.tags or {}), adapter, dest, Path(fallback_base_dir))
    from tasks.release.pyfunc import read_calibration, read_prompt_format  # the registry convention owns the file

    threshold, index_dir, neighbours = read_calibration(adapter)
    return ModelRef(model_name, str(version.version), base, str(adapter), threshold, index_dir, neighbours,
                    read_prompt_format(adapter))
