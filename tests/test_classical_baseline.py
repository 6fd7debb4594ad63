"""The classical baseline (issue 18 item 1): C and thresholds cross-fitted per dataset on training templates only,
and the paired "best baseline" difference using it when it is best. Real LogPrompt templates, no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluate import params, write_split

from tasks.common.config import load_params
from tasks.common.errors import InputError
from tasks.common.settings import validate_settings
from tasks.evaluate import differences, rule_baselines
from tasks.evaluation.baselines import POOLED
from tasks.evaluation.intervals import BootstrapSettings
from tasks.evaluation.metrics import MethodResult, score
from tasks.evaluation.report import classical_lines
from tasks.evaluation.testdata import EvalData, load_test_data, template_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path: Path, mirror: Path) -> EvalData:
    """write_split's layout: per dataset 36 training templates (6 abnormal) and 8 validation (2 abnormal)."""
    write_split(mirror, tmp_path / "data" / "split", per_dataset=6)
    return load_test_data(params(), tmp_path)


def test_c_and_thresholds_are_cross_fitted_on_training_and_validation_templates_never_a_test_item(
        data: EvalData) -> None:
    settings = params()
    keys = [(d, t) for d, frame in data.templates.items() for t in frame["template"]] + [("hdfs", "x <*> y")]
    rules, fits = rule_baselines(settings, ["classical"], data, keys, None)

    assert set(fits) == {"bgl", "spirit", POOLED}  # HDFS has no training template: the pooled model answers it
    assert (fits["bgl"]["n"], fits["bgl"]["abnormal"]) == (36 + 8, 6 + 2)  # training split + validation fold
    assert (fits[POOLED]["n"], fits[POOLED]["abnormal"]) == (88, 16)
    for fit in fits.values():
        assert fit["folds"] == settings.classical.folds and len(fit["fold_thresholds"]) == fit["folds"]
        assert fit["c"] in settings.classical.C
        assert fit["average_precision_by_c"][f"{fit['c']:g}"] == max(fit["average_precision_by_c"].values())
        assert fit["oof"]["average_precision"] == fit["average_precision_by_c"][f"{fit['c']:g}"]
        low, high = fit["threshold_ci"]
        assert 0.0 <= low <= high <= 1.0 and 0.0 <= fit["threshold"] <= 1.0
    verdicts = rules["classical"].verdicts
    for key, v in verdicts.items():  # each key against its own dataset's threshold
        threshold = fits.get(key[0], fits[POOLED])["threshold"]
        assert v["label"] == int(v["score"] >= threshold), key

    # The test split never shapes the fit: flip every test label and the fits and verdicts stay the same.
    flipped = EvalData(data.train, {d: f.assign(label=1 - f["label"]) for d, f in data.templates.items()},
                       data.sessions, data.seen, data.validation)
    rules_flipped, fits_flipped = rule_baselines(settings, ["classical"], flipped, keys, None)
    assert fits_flipped == {s: {**f, "seconds": fits_flipped[s]["seconds"]} for s, f in fits.items()}
    assert rules_flipped["classical"].verdicts == verdicts
    # ...while the validation fold does: it is training data for this baseline.
    _, without_validation = rule_baselines(settings, ["classical"], EvalData(
        data.train, data.templates, data.sessions, data.seen, None), keys, None)
    assert without_validation["bgl"]["n"] == 36

    report = "\n".join(classical_lines({"classical": fits}))
    bgl = fits["bgl"]
    assert f"| bgl | 44 (8) | {bgl['folds']} | {bgl['c']:g} | {bgl['threshold']:.3f} [" in report


def test_the_paired_difference_is_taken_against_the_classical_baseline_when_it_scores_best() -> None:
    frame = pd.DataFrame({"template": [f"t{i}" for i in range(8)], "label": [1, 1, 1, 0, 0, 0, 0, 0]})
    eval_set = template_set("template_bgl", frame, "bgl")

    def method(name: str, predicted: list[int]) -> MethodResult:
        return MethodResult(name, {("bgl", f"t{i}"): {"label": y, "score": None, "valid": None}
                                   for i, y in enumerate(predicted)}, 1.0, "table", False)

    results = {"keywords": method("keywords", [1, 0, 0, 1, 1, 0, 0, 0]),
               "classical": method("classical", [1, 1, 1, 0, 0, 0, 0, 0]),
               "rationanomaly": method("rationanomaly", [1, 1, 0, 0, 0, 0, 0, 0])}
    bootstrap = BootstrapSettings(1000, 0.95, 1)
    metrics = {name: score(r, [eval_set], bootstrap) for name, r in results.items()}
    rows = differences(results, [eval_set], metrics, bootstrap)["template_bgl"]
    assert rows["best_baseline"] == "classical"
    assert rows["vs_best_baseline"]["method"] == "classical"
    assert rows["vs_best_baseline"]["f1_difference"] == pytest.approx(0.8 - 1.0)


def test_classical_settings_refuse_unknown_keys_and_bad_ranges() -> None:
    raw = load_params(REPO / "params.yaml")
    assert "classical" in validate_settings(raw).evaluate.baselines
    raw["evaluate"]["classical"]["window"] = 3
    with pytest.raises(InputError, match=r"field 'evaluate.classical.window'"):
        validate_settings(raw)
    raw = load_params(REPO / "params.yaml")
    raw["evaluate"]["classical"]["char_ngrams"] = [5, 2]
    with pytest.raises(InputError, match=r"evaluate.classical.*char_ngrams must be \[low, high\]"):
        validate_settings(raw)


def test_a_dataset_with_too_few_anomalies_falls_back_to_the_pooled_model(data: EvalData) -> None:
    train = data.train[~((data.train["dataset"] == "spirit") & (data.train["label"] == 1))]
    validation = data.validation
    one = validation[(validation["dataset"] == "spirit") & (validation["label"] == 1)].iloc[:1]
    validation = pd.concat([validation[~((validation["dataset"] == "spirit") & (validation["label"] == 1))], one])
    sparse = EvalData(train, data.templates, data.sessions, data.seen, validation)
    keys = [("spirit", t) for t in data.templates["spirit"]["template"]]
    rules, fits = rule_baselines(params(), ["classical"], sparse, keys, None)
    assert "spirit" not in fits and fits[POOLED]["abnormal"] == 6 + 2 + 1
    scores = np.asarray([rules["classical"].verdicts[k]["score"] for k in keys])
    labels = np.asarray([rules["classical"].verdicts[k]["label"] for k in keys])
    assert (labels == (scores >= fits[POOLED]["threshold"])).all()


def test_the_llm_threshold_carries_its_bootstrap_spread_and_it_narrows_with_more_anomalies() -> None:
    """Issue 18 item 5: the validation fold's threshold is reported with its spread; on 13 anomalies it is wide,
    on ten times as many drawn from the same scores it is narrower."""
    import numpy as np

    from tasks.evaluation.calibration import threshold_interval

    rng = np.random.default_rng(0)

    def draw(n_abnormal: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.r_[np.ones(n_abnormal), np.zeros(10 * n_abnormal)].astype(int)
        scores = np.r_[rng.beta(5, 2, n_abnormal), rng.beta(2, 5, 10 * n_abnormal)]
        return labels, scores

    few = threshold_interval(*draw(13), resamples=300, confidence=0.95, seed=1)
    many = threshold_interval(*draw(130), resamples=300, confidence=0.95, seed=1)
    assert few is not None and many is not None and few[0] <= few[1] and many[0] <= many[1]
    assert many[1] - many[0] < few[1] - few[0]
    assert threshold_interval([1, 0, 0], [0.9, 0.1, 0.2], resamples=100, confidence=0.95, seed=1) is None


def test_a_threshold_never_flags_what_the_first_stage_called_normal() -> None:
    """The first stage gives score 0.0 without a model call; a threshold of 0 (the best F1 of a model that scores
    everything low, as a 4-step smoke model did) would flag those templates. Thresholds start above 0."""
    from tasks.evaluation.calibration import apply_threshold, choose_threshold

    labels, scores = [1, 1, 1, 0], [0.0, 0.0, 0.3, 0.0]  # F1 at 0: 0.857, at 0.3: 0.5
    chosen = choose_threshold(labels, scores)
    assert chosen.threshold == 0.3 and apply_threshold([0.0], chosen.threshold).tolist() == [0]
