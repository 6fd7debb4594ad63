"""The pyfunc model and missing values (issue 22, item 4; mlflow#4827): a row without a log is labelled, not judged.

Real base model and a real (untrained) LoRA adapter through the transformers engine, saved and loaded back as an
MLflow pyfunc model with the registered signature and model_config (MLflow's own input-schema enforcement runs);
no registry is needed for that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from registry_world import make_adapter

from tasks.common.contracts import CALIBRATION_FILE
from tasks.common.settings import load_settings
from tasks.release.pyfunc import RationAnomalyModel, model_config, pyfunc_signature

REPO = Path(__file__).resolve().parents[1]
LOGS = ["ciod: failed to read message prefix", None, float("nan"), "", "   \t", "job 7 finished"]
DATASETS = ["bgl", "bgl", "bgl", None, "bgl", float("nan")]
MISSING = [False, True, True, True, True, False]


@pytest.fixture(scope="module")
def adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(base_model_dir, tmp_path_factory.mktemp("pyfunc") / "adapter", seed=3, scale=0.01)


def load(base_model_dir: Path, adapter: Path, folder: Path, threshold: float | None = None) -> Any:
    """The model as MLflow saves and loads a registered version: its artifacts, signature and model_config."""
    import mlflow.pyfunc

    folder.mkdir(parents=True, exist_ok=True)
    version_adapter = shutil.copytree(adapter, folder / "adapter")
    if threshold is not None:
        (version_adapter / CALIBRATION_FILE).write_text(json.dumps({"threshold": threshold}))
    ref = folder / "base_model_ref.json"
    meta = json.loads((base_model_dir / "base_model.json").read_text())
    ref.write_text(json.dumps({"path": str(base_model_dir), "weights_sha256": meta["weights_sha256"]}))
    config = {**model_config(load_settings(REPO / "params.yaml").evaluate), "engine": "transformers",
              "max_new_tokens": 6, "dtype": "float32", "batch_size": 8}
    mlflow.pyfunc.save_model(str(folder / "model"), python_model=RationAnomalyModel(), signature=pyfunc_signature(),
                             artifacts={"base_model_ref": str(ref), "adapter": str(version_adapter)},
                             model_config=config)
    return mlflow.pyfunc.load_model(str(folder / "model"))


def check_labelled(out: Any, reference: Any) -> None:
    """Missing rows: flagged, no verdict or label, no model output; the others as if the missing were absent."""
    assert list(out.columns) == ["verdict", "label", "score", "valid", "rationale", "rationale_source", "completion",
                                 "missing"]
    assert out["missing"].tolist() == MISSING
    gaps = out[out["missing"]]
    assert gaps["verdict"].isna().all() and gaps["label"].isna().all() and gaps["score"].isna().all()
    assert not gaps["valid"].any() and (gaps["rationale"] == "").all() and (gaps["completion"] == "").all()
    assert gaps["rationale_source"].isna().all()
    present = out[~out["missing"]].reset_index(drop=True)
    for column in ("verdict", "label", "valid", "completion"):
        assert present[column].tolist() == reference[column].tolist(), column
    assert present["score"].fillna(-1).tolist() == pytest.approx(reference["score"].fillna(-1).tolist(), abs=1e-6)
    assert present["verdict"].isin(["normal", "abnormal"]).all()
    # the served guard (issue 19): every row's rationale is the model's own or the evidence one for its verdict
    assert present["rationale_source"].isin(["model", "evidence"]).all()
    for text, verdict in zip(present["rationale"], present["verdict"], strict=True):
        assert text.rstrip().endswith(f"the log is {verdict}.") or text.rstrip().endswith(f"log is {verdict}.")


@pytest.mark.parametrize("threshold", [None, 0.5], ids=["rationale-word", "calibrated"])
def test_rows_without_a_log_are_labelled_missing_and_never_judged(base_model_dir: Path, adapter: Path,
                                                                 tmp_path: Path, threshold: float | None) -> None:
    """Before: None/NaN were judged as the text `nan` (a verdict, a score and a rationale for nothing), and an
    empty string as an empty log."""
    import pandas as pd

    model = load(base_model_dir, adapter, tmp_path / "version", threshold)
    out = model.predict(pd.DataFrame({"log": LOGS, "dataset": DATASETS}))
    # the present rows alone (a missing dataset is the default "system log")
    reference = model.predict(pd.DataFrame({"log": [LOGS[0], LOGS[5]], "dataset": ["bgl", "system log"]}))
    check_labelled(out, reference)
    assert str(out["label"].dtype) == "Int64"  # nullable: a missing row has no label, not 0 (normal)

    nothing = model.predict(pd.DataFrame({"log": [None, ""]}))  # no row to judge: no model call at all
    assert nothing["missing"].all() and nothing["verdict"].isna().all() and len(nothing) == 2
