"""Settings: one place validates them, whether they come from the CLI, a TOML spec or Python."""

from __future__ import annotations

from pathlib import Path

import pytest

from autodrop.config import SearchConfig, config_from_options, read_spec, validate
from autodrop.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"epochs": 0}, "--epochs must be at least 1, but got 0"),
        ({"rate-range": (0.5, 0.2)}, "--rate-range must satisfy 0 <= low < high < 1, but got 0.5 0.2"),
        ({"rate-range": (0.1, 1.0)}, "but got 0.1 1.0"),
        ({"rate-range": (-0.1, 0.5)}, "but got -0.1 0.5"),
        ({"val-fraction": 1.5}, "--val-fraction"),
        ({"trials": 0}, "--trials"),
        ({"lr": -1.0}, "--lr"),
        ({"image-size": 2}, "--image-size"),
        ({"pruner": "sometimes"}, "--pruner must be one of noise, median, hyperband, none"),
        ({"sampler": "grid"}, "--sampler must be one of tpe, random, but got 'grid'"),
        ({"colour": "blue"}, "unknown setting 'colour'"),
        ({"epochs": "five"}, "epochs must be a whole number, but got 'five'"),
        ({"seed": -1}, "--seed must be between 0 and 4294967295, but got -1"),
        ({"seed": 2**32}, "--seed must be between 0 and 4294967295, but got 4294967296"),
        ({"kinds": 5}, "--kinds must be a comma-separated list of element, channel, branch, but got 5"),
        ({"orders": True}, "--slots must be a comma-separated list of after-act, before-bn, but got True"),
        ({"model-args": {"class": 3}},
         "--model-arg names must be Python identifiers other than keywords, but got 'class'"),
    ],
)
def test_bad_settings_name_the_setting_and_the_value(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_options(options)


def test_python_names_and_option_names_both_work():
    config = config_from_options({"image_size": 16, "rate-range": [0.1, 0.3], "data": "digits"})
    assert config.data.image_size == 16 and config.rate_range == (0.1, 0.3)


def test_default_study_name_comes_from_data_and_model(tmp_path):
    assert SearchConfig().study_name == "digits-simple-cnn"
    config = config_from_options({"data": str(tmp_path / "my photos"), "model": "seed-cnn"})
    assert config.study_name == "my-photos-seed-cnn"


def test_default_storage_is_an_sqlite_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SearchConfig().storage_url == f"sqlite:///{tmp_path / 'autodrop.db'}"


def test_spec_with_an_unknown_key_is_refused(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('data = "digits"\nepocs = 3\n')
    with pytest.raises(ConfigError, match="unknown setting 'epocs'"):
        read_spec(spec)


def test_spec_that_is_not_toml_is_refused(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("data = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_spec(spec)


@pytest.mark.parametrize("spec", sorted((REPO / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_study_specs_are_valid(spec):
    config = config_from_options(read_spec(spec))
    assert config.trials >= 1


def test_largest_seed_is_accepted():
    assert config_from_options({"seed": 2**32 - 1}).seed == 2**32 - 1


def test_model_argument_named_by_a_keyword_is_refused_from_python_too():
    with pytest.raises(ConfigError, match="other than keywords, but got 'lambda'"):
        validate(SearchConfig(model_args={"lambda": 0.1}))


def test_data_on_device_is_a_training_setting_checked_once():
    assert config_from_options({"data-on-device": "no"}).train.data_on_device == "no"
    assert config_from_options({}).train.data_on_device == "auto"
    with pytest.raises(ConfigError, match="--data-on-device must be one of auto, yes, no, but got 'maybe'"):
        config_from_options({"data-on-device": "maybe"})
