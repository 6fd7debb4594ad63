"""params.yaml profiles: one `profile` field selects an overlay merged over the stage sections."""

from pathlib import Path

import pytest
import yaml

from tasks.common.config import load_params, set_profile
from tasks.common.errors import InputError
from tasks.common.settings import Section, Settings, load_settings, validate_settings

REPO = Path(__file__).resolve().parents[1]


def copy_params(tmp_path: Path) -> Path:
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    return target


def test_smoke_profile_overrides_only_what_it_lists(tmp_path):
    path = copy_params(tmp_path)
    default = load_params(path)
    set_profile("smoke", path)
    smoke = load_params(path)
    raw = yaml.safe_load(path.read_text())
    assert smoke["sft"]["max_steps"] == raw["profiles"]["smoke"]["sft"]["max_steps"]
    assert smoke["sft"]["lora"]["target_modules"] == default["sft"]["lora"]["target_modules"]
    assert smoke["correct"] == default["correct"]


def test_set_profile_keeps_comments_and_rejects_unknown_names(tmp_path):
    path = copy_params(tmp_path)
    assert set_profile("smoke", path) is True
    assert set_profile("smoke", path) is False
    text = path.read_text()
    assert "profile: smoke" in text and text.startswith("# Every knob")
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        set_profile("huge", path)


def test_a_project_copy_serves_on_its_own_port_and_nothing_else_changes(tmp_path):
    from workspace import set_serve_port

    path = copy_params(tmp_path)
    before = load_params(path)
    set_serve_port(path, 40123)
    after = load_params(path)
    assert after["serve"]["port"] == 40123 and before["serve"]["port"] != 40123
    assert {**after, "serve": {**after["serve"], "port": before["serve"]["port"]}} == before
    assert len(path.read_text().splitlines()) == len((REPO / "params.yaml").read_text().splitlines())


def test_unknown_profile_in_file_names_the_field(tmp_path):
    path = copy_params(tmp_path)
    path.write_text(path.read_text().replace("profile: default", "profile: nope", 1))
    with pytest.raises(ValueError, match="field 'profile': profile 'nope' is not defined"):
        load_params(path)


def test_every_profile_gives_one_answer_budget_to_evaluate_serve_and_detect():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for profile, overlay in raw["profiles"].items():
        settings = load_settings(REPO / "params.yaml", profile=profile)
        budget = settings.evaluate.max_new_tokens
        serve_set = (overlay.get("serve") or {}).get("smoke_max_tokens")
        detect_set = (overlay.get("detect") or {}).get("max_tokens")
        assert settings.serve.smoke_max_tokens == (serve_set or budget), profile
        assert settings.detect.max_tokens == (detect_set or budget), profile
    gpu = load_settings(REPO / "params.yaml", profile="gpu")
    assert gpu.evaluate.max_new_tokens == gpu.serve.smoke_max_tokens == gpu.detect.max_tokens == 256


def test_an_unknown_key_is_refused_naming_params_yaml_and_the_field():
    params = load_params(REPO / "params.yaml")
    params["sft"]["lora"]["rank"] = 8
    with pytest.raises(InputError, match=r"params.yaml field 'sft.lora.rank': unknown key"):
        validate_settings(params)


def test_a_wrong_type_is_refused_naming_the_field_and_the_value():
    params = load_params(REPO / "params.yaml")
    params["evaluate"]["max_new_tokens"] = "many"
    with pytest.raises(InputError, match=r"field 'evaluate.max_new_tokens': .*found 'many'"):
        validate_settings(params)


def test_a_missing_key_is_refused_naming_the_field():
    params = load_params(REPO / "params.yaml")
    del params["split"]["seed"]
    with pytest.raises(InputError, match=r"field 'split.seed': missing"):
        validate_settings(params)


def test_no_settings_field_carries_a_default_that_could_differ_from_params_yaml():
    def classes(model: type[Section]) -> list[type[Section]]:
        found = [model]
        for field in model.model_fields.values():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                found += classes(annotation)
        return found

    for model in classes(Settings):
        defaulted = [name for name, field in model.model_fields.items() if not field.is_required()]
        assert defaulted == [], f"{model.__name__} has defaults for {defaulted}"
