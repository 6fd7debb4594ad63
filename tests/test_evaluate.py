"""The evaluate stage on real (small) data: inputs checked first, outputs all-or-nothing, a real adapter smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.config import load_params
from tasks.common.errors import InputError
from tasks.common.settings import EvaluateSettings, load_settings, validate_settings
from tasks.evaluate import CANDIDATE, METHODS, run

BGL_STRUCTURED = "loghub/BGL/BGL_2k.log_structured.csv"


def write_split(mirror: Path, split: Path, per_dataset: int = 2) -> None:
    """Real templates (LogPrompt lists, BGL_2k lines, HDFS sessions) in the split stage's layout, kept small."""
    split.mkdir(parents=True)
    train, test, validation = [], [], []
    for dataset in ("bgl", "spirit"):
        frame = pd.read_csv(mirror / f"logprompt/templates_{dataset}.csv", keep_default_na=False)
        abnormal, normal = frame[frame["label"] == 1], frame[frame["label"] == 0]
        rows = lambda part, name: pd.DataFrame({"dataset": name, "template": part["log"],  # noqa: E731
                                                "label": part["label"]})
        train += [rows(abnormal.iloc[:6], dataset), rows(normal.iloc[:30], dataset)]
        test += [rows(abnormal.iloc[6:6 + per_dataset], dataset), rows(normal.iloc[30:30 + per_dataset], dataset)]
        validation += [rows(abnormal.iloc[-2:], dataset), rows(normal.iloc[-6:], dataset)]
    pd.concat(train).to_parquet(split / "train.parquet", index=False)
    pd.concat(test).to_parquet(split / "test.parquet", index=False)
    pd.concat(validation).to_parquet(split / "validation.parquet", index=False)
    lines = pd.read_csv(mirror / BGL_STRUCTURED, keep_default_na=False)
    first_abnormal = int((lines["Label"] != "-").to_numpy().argmax())
    windows = []
    for window_id, start in enumerate((0, first_abnormal)):
        part = lines.iloc[start:start + 3]
        labels = [int(v != "-") for v in part["Label"]]
        windows.append({"window_id": window_id, "templates": part["EventTemplate"].tolist(), "line_labels": labels,
                        "label": int(any(labels))})
    (split / "sessions_bgl2k.jsonl").write_text("".join(json.dumps(w) + "\n" for w in windows))
    sessions = [json.loads(line) for line in (mirror / "hdfs_sessions/session_test.jsonl").open()]
    sessions.sort(key=lambda s: len(set(s["templates"])))
    picked = [next(s for s in sessions if s["label"] == 1), next(s for s in sessions if s["label"] == 0)]
    (split / "sessions_hdfs.jsonl").write_text("".join(
        json.dumps({"session_id": s["block_id"], "templates": s["templates"], "label": s["label"]}) + "\n"
        for s in picked))


def write_served_inputs(mirror: Path, root: Path) -> None:
    """The labelled raw logs and the corrected templates the served path reads, where the stages put them."""
    for name in ("loghub/BGL/BGL_2k.log", "loghub/Thunderbird/Thunderbird_2k.log"):
        (root / "data/raw" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data/raw" / name).write_bytes((mirror / name).read_bytes())
    frames = [pd.read_csv(mirror / f"logprompt/templates_{d}.csv", keep_default_na=False).assign(dataset=d)
              for d in ("bgl", "spirit")]
    (root / "data/corrected").mkdir(parents=True)
    corrected = pd.concat(frames).rename(columns={"log": "template"}).assign(correction="none")
    corrected.loc[corrected["template"] == THUNDERBIRD_EXPERT_TEMPLATE, "correction"] = "exact"
    corrected.loc[corrected["template"] == THUNDERBIRD_EXPERT_TEMPLATE, "label"] = 1
    corrected.to_parquet(root / "data/corrected/templates.parquet")


# Corrected to abnormal by the experts (Spirit); 8 of the first 60 Thunderbird_2k lines are of this template.
THUNDERBIRD_EXPERT_TEMPLATE = "data_thread() got not answer from any <*> <*> datasource"


def write_index(root: Path) -> None:
    """The index stage's output from the fixture's training templates."""
    from tasks.index import run as build_index

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RATIONANOMALY_ROOT", str(root))
        build_index(RETRIEVAL)


@pytest.fixture
def eval_root(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    write_split(mirror, root / "data" / "split")
    write_served_inputs(mirror, root)
    write_index(root)
    monkeypatch.setenv("RATIONANOMALY_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


REPO = Path(__file__).resolve().parents[1]


def params(**overrides: object) -> EvaluateSettings:
    """The shipped `evaluate` settings, uncapped, 8 answer tokens on transformers, the first 60 lines of each
    served log, with `overrides`."""
    shipped = load_settings(REPO / "params.yaml").evaluate
    base = {"max_templates_per_dataset": None, "max_sessions_per_dataset": None, "batch_size": 16,
            "max_new_tokens": 8, "engine": "transformers", "dtype": "bfloat16", "torch_threads": None,
            "zero_shot_sample": 2, "served": shipped.served.model_copy(update={"max_lines": 60}),
            "baselines": ["keywords", "tfidf_lr", "classical", "knn_1", "knn_vote", "zero_shot", "sft_only"]}
    return shipped.model_copy(update={**base, **overrides})


DETECT = load_settings(REPO / "params.yaml").detect
RETRIEVAL = load_settings(REPO / "params.yaml").index  # k neighbours from models/index, built by the fixture


def folders_that_look_like_models(root: Path) -> None:
    """Model folders that pass the cheap checks; loading them would fail, which these tests never reach."""
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "config.json").write_text("{}")
    for adapter in ("sft", "grpo"):
        (root / "models" / adapter).mkdir()
        (root / "models" / adapter / "adapter_config.json").write_text("{}")


def test_bad_test_labels_are_reported_before_any_model_loads(eval_root: Path) -> None:
    frame = pd.read_parquet(eval_root / "data/split/test.parquet")
    frame.loc[2, "label"] = 2
    frame.to_parquet(eval_root / "data/split/test.parquet", index=False)
    folders_that_look_like_models(eval_root)
    with pytest.raises(InputError, match=r"test\.parquet:3 field 'label': label 2 is not 0/1"):
        run(params(), DETECT, RETRIEVAL, eval_root)


def test_missing_adapter_and_unknown_baseline_are_named(eval_root: Path, base_model_dir: Path) -> None:
    (eval_root / "models").mkdir(exist_ok=True)
    (eval_root / "models" / "base").symlink_to(base_model_dir)
    with pytest.raises(InputError, match=r"models/sft: not a LoRA adapter folder"):
        run(params(), DETECT, RETRIEVAL, eval_root)
    raw = load_params(REPO / "params.yaml")
    raw["evaluate"]["baselines"] = ["keywords", "magic"]
    with pytest.raises(InputError, match=r"field 'evaluate.baselines.1': .*found 'magic'"):
        validate_settings(raw)


def test_a_failed_run_leaves_the_last_good_report(eval_root: Path) -> None:
    out = eval_root / "reports" / "eval"
    out.mkdir(parents=True)
    (out / "eval.md").write_text("last good report")
    folders_that_look_like_models(eval_root)
    (eval_root / "data/split/sessions_hdfs.jsonl").write_text('{"session_id": "b", "templates": "oops", "label": 0}\n')
    with pytest.raises(InputError, match=r"sessions_hdfs\.jsonl:1 field 'templates'"):
        run(params(), DETECT, RETRIEVAL, eval_root)
    assert (out / "eval.md").read_text() == "last good report"


@pytest.mark.slow
def test_smoke_evaluation_of_a_real_adapter(eval_root: Path, base_model_dir: Path) -> None:
    from registry_world import make_adapter

    models = eval_root / "models"
    models.mkdir(exist_ok=True)
    (models / "base").symlink_to(base_model_dir)
    make_adapter(base_model_dir, models / "sft", seed=1)
    make_adapter(base_model_dir, models / "grpo", seed=2)
    metrics = run(params(), DETECT, RETRIEVAL, eval_root)

    assert metrics["engine"] == "transformers" and metrics["candidate"] == "rationanomaly"
    assert list(metrics["methods"]) == list(METHODS)
    assert set(metrics["calibration"]) == {"rationanomaly", "rationanomaly_no_retrieval",
                                           "rationanomaly_no_first_stage", "sft_only"}
    assert 0.0 <= metrics["calibration"]["rationanomaly"]["threshold"] <= 1.0
    # what the registry stores with the adapter: the candidate's threshold and the neighbours its prompts carry
    assert json.loads((eval_root / "reports/eval/calibration.json").read_text()) == \
        {**metrics["calibration"]["rationanomaly"], "neighbours": RETRIEVAL.k}
    template_sets = {"template_bgl", "template_spirit", "session_bgl2k", "session_hdfs", "session_bgl2k_unseen",
                     "session_hdfs_unseen"}
    served = {"served_bgl2k_lines", "served_bgl2k_windows", "served_bgl2k_lines_corrected",
              "served_thunderbird_lines", "served_thunderbird_templates"}
    samples = {"template_bgl_sample", "template_spirit_sample"}  # the zero-shot model's fixed sample, all answer it
    assert set(metrics["methods"]["zero_shot"]) == samples
    for method in ("sft_only", "rationanomaly_no_retrieval", "rationanomaly_no_first_stage",
                   "rationanomaly_answer_word"):
        assert set(metrics["methods"][method]) == template_sets | samples  # the served path: candidate and rules
    assert "average_precision" in metrics["methods"]["sft_only"]["template_bgl"]
    answer_word = metrics["methods"]["rationanomaly_answer_word"]["template_bgl"]
    assert "average_precision" not in answer_word and "disagreement_rate" not in answer_word  # no score of its own
    for method in ("keywords", "tfidf_lr", "classical", "knn_1", "knn_vote", "rationanomaly"):
        blocks = metrics["methods"][method]
        assert set(blocks) == template_sets | samples | served, method
        assert blocks["template_bgl"]["n"] == 4 and blocks["template_bgl"]["n_abnormal"] == 2
        assert blocks["session_hdfs"]["confusion_matrix"][0][0] + blocks["session_hdfs"]["confusion_matrix"][0][1] == 1
        assert blocks["served_bgl2k_lines"]["n"] == 60 and "false_alarm_rate" in blocks["served_thunderbird_lines"]
        assert blocks["served_thunderbird_lines"]["n"] == 60 - 8  # the experts' abnormal template left out
        low, high = blocks["template_bgl"]["f1_ci"]
        assert low <= blocks["template_bgl"]["f1"] <= high
    cand = metrics["methods"]["rationanomaly"]["template_bgl"]
    assert 0.0 <= cand["format_valid_rate"] <= 1.0 and cand["templates_per_s"] > 0
    assert metrics["methods"]["keywords"]["template_bgl"]["format_valid_rate"] is None
    # one generation per unique template per LLM method, shared by template and session sets
    unique = metrics["test_data"]["unique_templates_classified"]
    assert metrics["speed"]["sft_only"]["unique_templates"] == unique
    assert metrics["speed"]["zero_shot"]["unique_templates"] == 4
    assert metrics["differences"]["template_bgl"]["best_baseline"] in ("keywords", "tfidf_lr", "classical", "knn_1",
                                                                        "knn_vote")
    assert set(metrics["classical"]) == {"bgl", "spirit", "*"}  # C and threshold per dataset, and the default

    out = eval_root / "reports" / "eval"
    report = (out / "eval.md").read_text()
    assert "Engine: **transformers**" in report and "| **rationanomaly** (candidate) |" in report
    assert "## The classical baseline: C and threshold cross-fitted per dataset" in report
    assert (out / "confusion_matrices.png").stat().st_size > 10_000 and (out / "f1_by_method.png").is_file()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    served_templates = metrics["speed"]["rationanomaly"]["unique_templates"] - unique
    assert served_templates > 0, "the served path asks the candidate about the templates detect mined"
    assert sum(r["kind"] == "template" and r["method"] == "rationanomaly" for r in rows) == unique + served_templates
    items = json.loads((out / "candidate_predictions.json").read_text())
    assert set(items) >= {"template_bgl", "served_bgl2k_lines"} and len(items["served_bgl2k_lines"]["pred"]) == 60
    assert all(isinstance(r["completion"], str) for r in rows if r["kind"] == "template" and r["method"] == CANDIDATE)
    assert all(r["completion"] is None for r in rows if r["kind"] == "template" and r["method"] == "sft_only")
    on_disk = json.loads((eval_root / "reports/metrics.json").read_text())
    assert on_disk["methods"] == metrics["methods"] and on_disk["mlflow_run_id"] == metrics["mlflow_run_id"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{eval_root / 'mlflow.db'}")
    logged = mlflow.get_run(metrics["mlflow_run_id"])
    assert logged.data.tags["stage"] == "evaluate" and logged.data.tags["engine"] == "transformers"
    assert logged.data.metrics["rationanomaly.template_bgl.f1"] == pytest.approx(cand["f1"])
    assert {d.dataset.name for d in logged.inputs.dataset_inputs} >= {"train_templates", "test_templates_bgl",
                                                                       "test_sessions_hdfs"}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(logged.info.run_id, "eval")}
    assert {"eval/eval.md", "eval/confusion_matrices.png", "eval/predictions.jsonl"} <= artifacts
