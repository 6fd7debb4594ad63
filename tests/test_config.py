"""params.yaml profiles: one `profile` field selects an overlay merged over the stage sections."""

from pathlib import Path

import pytest
import yaml

from tasks.config import load_params, set_profile

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


def test_unknown_profile_in_file_names_the_field(tmp_path):
    path = copy_params(tmp_path)
    path.write_text(path.read_text().replace("profile: default", "profile: nope", 1))
    with pytest.raises(ValueError, match="field 'profile' is 'nope'"):
        load_params(path)
