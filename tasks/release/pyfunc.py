"""The registered model as an MLflow pyfunc: log lines in, verdicts with rationales out.

A version's artifacts hold the LoRA adapter folder and `base_model_ref.json` (base folder + weights sha256);
`resolve_base_model` finds a local base folder with the same weights. The answer budget and engine come
from the `model_config` stored with the version (built from the evaluate settings at registration).
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from tasks.common.config import repo_root
from tasks.common.contracts import (
    BASE_REF_FILE,
    CALIBRATION_FILE,
    INDEX_ARTIFACT,
    OPEN_QUESTION_FORMAT,
    explain_verdict,
)
from tasks.common.errors import InputError
from tasks.common.prompt import ABNORMAL, NORMAL, scored_verdict
from tasks.common.retrieval import INDEX_FILE
from tasks.common.settings import EvaluateSettings
from tasks.detection.verdicts import apply_verdict_rules
from tasks.evaluation.rationales import grounded_rationale


def model_config(settings: EvaluateSettings) -> dict[str, Any]:
    """What the pyfunc model needs to answer like evaluation did: engine, batch, answer budget, dtype, threads.

    The pyfunc runs in-process on a consumer's machine, so it uses transformers (vLLM is a server concern).
    """
    return {"engine": "transformers", "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens,
            "dtype": settings.dtype, "torch_threads": settings.torch_threads}


def resolve_base_model(ref: dict[str, Any]) -> Path:
    """The base model folder a version refers to: RATIONANOMALY_BASE_MODEL, the recorded path, or models/base;
    the first whose base_model.json records the same weights sha256."""
    candidates = [os.environ.get("RATIONANOMALY_BASE_MODEL"), ref.get("path"), str(repo_root() / "models" / "base")]
    seen = []
    for candidate in filter(None, candidates):
        meta_file = Path(candidate) / "base_model.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            seen.append(f"{candidate} (sha256 {str(meta.get('weights_sha256'))[:12]})")
            if meta.get("weights_sha256") == ref.get("weights_sha256"):
                return Path(candidate)
        else:
            seen.append(f"{candidate} (missing)")
    raise InputError(BASE_REF_FILE, f"base model with weights sha256 {ref.get('weights_sha256')} not found; "
                     f"looked at {', '.join(seen)}", hint="set RATIONANOMALY_BASE_MODEL to its folder")


DEFAULT_DATASET = "system log"  # the dataset a row without one is asked as (tasks.common.prompt's default)


def is_missing(value: Any) -> bool:
    """A cell with no log: None, NaN, pd.NA, NaT, or a string of whitespace only (mlflow#4827: `astype(str)`
    turned None/NaN into the log text `nan`)."""
    import pandas as pd

    if isinstance(value, str):
        return not value.strip()
    return bool(pd.api.types.is_scalar(value) and pd.isna(value))


def read_prompt_format(adapter_dir: Path) -> int:
    """The explain prompt format a version was trained on (`prompt_format` in its calibration.json, written by
    the registry since issue 19); OPEN_QUESTION_FORMAT for a version registered before (or without the file).
    Raises InputError when the file is unreadable."""
    file = adapter_dir / CALIBRATION_FILE
    if not file.is_file():
        return OPEN_QUESTION_FORMAT
    try:
        return int(json.loads(file.read_text(encoding="utf-8")).get("prompt_format") or OPEN_QUESTION_FORMAT)
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise InputError(file, f"unreadable prompt format ({type(exc).__name__}: {exc})", field="prompt_format",
                         hint="re-register the version from a fresh `dvc repro evaluate`") from exc


def read_calibration(adapter_dir: Path) -> tuple[float | None, str | None, int]:
    """The verdict threshold, index folder and neighbour count a version was evaluated with.

    Read from `calibration.json` in the adapter folder (written by the registry) and the `index` artifact
    folder beside it; a version registered before either (or without retrieval) gives (None, None, 0). Raises
    InputError when calibration.json is unreadable or names neighbours the version's artifacts do not hold.
    """
    file = adapter_dir / CALIBRATION_FILE
    if not file.is_file():
        return None, None, 0
    try:
        calibration = json.loads(file.read_text(encoding="utf-8"))
        threshold = float(calibration["threshold"])
        neighbours = int(calibration.get("neighbours") or 0)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(file, f"unreadable verdict calibration ({type(exc).__name__}: {exc})", field="threshold",
                         hint="re-register the version from a fresh `dvc repro evaluate`") from exc
    if not 0.0 <= threshold <= 1.0:
        raise InputError(file, f"threshold {threshold} is not a probability in [0, 1]", field="threshold")
    if neighbours <= 0:
        return threshold, None, 0
    index_dir = adapter_dir.parent / INDEX_ARTIFACT
    if not (index_dir / INDEX_FILE).is_file():
        raise InputError(file, f"the version's prompts carry {neighbours} neighbours but {index_dir / INDEX_FILE} "
                         "does not exist", field="neighbours", hint="re-register the version with its index")
    return threshold, str(index_dir), neighbours


class RationAnomalyModel(mlflow.pyfunc.PythonModel):
    """Log lines in (a DataFrame column `log`, optional `dataset`), verdicts with scores and rationales out.

    A version with a verdict threshold (calibration.json) answers as the endpoint does: the scored answer word
    against the threshold, with its retrieval index's neighbours in the prompt; every row also gets a rationale.
    A version without one answers with the word its rationale ends in (score None).

    A row without a log (`is_missing`: None, NaN, empty or blank) is labelled, not judged and not refused: it
    never reaches the model and comes back with `missing` True, verdict and label null, score NaN, `valid`
    False and no rationale, so a batch scorer keeps its other rows and cannot count it as normal (mlflow#4827).
    A missing `dataset` is the default "system log".
    """

    def load_context(self, context: Any) -> None:
        from tasks.evaluation.inference import open_engine

        ref = json.loads(Path(context.artifacts["base_model_ref"]).read_text(encoding="utf-8"))
        self.adapter_dir = Path(context.artifacts["adapter"])
        config = getattr(context, "model_config", None) or {}
        missing = [k for k in ("engine", "batch_size", "max_new_tokens", "dtype", "torch_threads") if k not in config]
        if missing:
            raise InputError("MLmodel", f"model_config lacks {missing}", field="model_config",
                             hint="register the version with tasks.release.pyfunc.model_config(...)")
        self.threshold, index_dir, self.neighbours = read_calibration(self.adapter_dir)
        self.prompt_format = read_prompt_format(self.adapter_dir)
        self.index = None
        if index_dir is not None:
            from tasks.common.retrieval import TemplateIndex

            self.index = TemplateIndex.load(Path(index_dir) / INDEX_FILE)
        self.engine = open_engine(resolve_base_model(ref), str(config["engine"]),
                                  batch_size=int(config["batch_size"]), max_new_tokens=int(config["max_new_tokens"]),
                                  dtype=str(config["dtype"]), threads=config["torch_threads"])

    def predict(self, context, model_input, params=None):  # untyped on purpose: MLflow reads type hints as a schema
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"log": list(model_input)})
        cells = frame["log" if "log" in frame.columns else frame.columns[0]].tolist()
        named = frame["dataset"].tolist() if "dataset" in frame.columns else [None] * len(cells)
        rows = [i for i, cell in enumerate(cells) if not is_missing(cell)]  # only these reach the model
        logs = [str(cells[i]) for i in rows]
        datasets = [DEFAULT_DATASET if is_missing(named[i]) else str(named[i]) for i in rows]
        verdicts: list[str | None] = [None] * len(cells)
        scores: list[float | None] = [None] * len(cells)
        valid, rationales, completions = [False] * len(cells), [""] * len(cells), [""] * len(cells)
        sources: list[str | None] = [None] * len(cells)
        if rows:
            found = (self.index.shown(logs, datasets, self.neighbours)  # the index's floor, same system
                     if self.index is not None else None)
            shown = [[(n.template, n.label) for n in near] for near in found] if found is not None else None
            if self.threshold is None:
                run = self.engine.classify(logs, datasets, adapter_dir=self.adapter_dir, neighbours=shown)
                answers = [(p.verdict or NORMAL, None, p.valid) for p in run.predictions]
            else:  # the score decides; the rationale is written for that verdict (issue 19)
                scored = self.engine.score(logs, datasets, self.adapter_dir, shown).scores
                # a labelled template takes its label; an alert without evidence is none (as the endpoint's client)
                near = found if found is not None and self.neighbours else [None] * len(logs)
                answers = [(apply_verdict_rules(log, dataset, shown_here, scored_verdict(s, self.threshold)).verdict,
                            s, s is not None)
                           for s, log, dataset, shown_here in zip(scored, logs, datasets, near, strict=True)]
                run = self.engine.classify(logs, datasets, adapter_dir=self.adapter_dir, neighbours=shown,
                                           verdicts=[explain_verdict(verdict, self.prompt_format)
                                                     for verdict, _, _ in answers])
            for j, (i, (verdict, score, ok), prediction) in enumerate(zip(rows, answers, run.predictions,
                                                                            strict=True)):
                verdicts[i], scores[i], valid[i] = verdict, score, ok
                # the served guard (issue 19): a rationale failing a check is replaced by the evidence rationale
                guarded = grounded_rationale(prediction.rationale, logs[j], datasets[j],
                                             shown[j] if shown is not None else [], verdict)
                rationales[i], sources[i], completions[i] = guarded.text, guarded.source, prediction.completion
        return pd.DataFrame({
            "verdict": pd.Series(verdicts, dtype=object),  # None (JSON null) for a missing row
            "label": pd.array([None if v is None else int(v == ABNORMAL) for v in verdicts], dtype="Int64"),
            "score": [float("nan") if s is None else s for s in scores], "valid": valid,
            "rationale": rationales, "rationale_source": pd.Series(sources, dtype=object), "completion": completions,
            "missing": [verdict is None for verdict in verdicts]})


def pyfunc_signature() -> Any:
    """Input columns `log` (+ optional `dataset`); output verdict, label, score (NaN: none), valid, rationale,
    rationale_source (model | evidence: the served guard replaced the model's), completion (the model's own
    answer), missing (a row without a log: verdict and label null)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "log"), ColSpec("string", "dataset", required=False)])
    outputs = Schema([ColSpec("string", "verdict"), ColSpec("long", "label"), ColSpec("double", "score"),
                      ColSpec("boolean", "valid"), ColSpec("string", "rationale"),
                      ColSpec("string", "rationale_source", required=False), ColSpec("string", "completion"),
                      ColSpec("boolean", "missing")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pyfunc_requirements() -> list[str]:
    """Pinned versions of what loading the model needs, read from this environment."""
    reqs = []
    for package in ("torch", "transformers", "peft", "mlflow", "pandas"):
        try:
            reqs.append(f"{package}=={package_version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs
