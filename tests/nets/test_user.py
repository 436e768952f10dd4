"""--model specs for users' networks: finding them, building them, recording them, clear errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

from autodrop.cli import main
from autodrop.config import (
    config_from_options,
    config_to_options,
    is_user_model,
    parse_model_args,
    parse_model_spec,
    read_spec,
)
from autodrop.errors import ConfigError, ModelError
from autodrop.nets.build import ModelShape, build_model, check_model
from autodrop.nets.user import build_user_model
from autodrop.run import records
from autodrop.run.study import create_or_load_study

ROOT = Path(__file__).resolve().parents[2]
USER = ROOT / "tests" / "user_models.py"
SHAPE = ModelShape(1, 10, 16)


def test_model_args_from_the_command_line_become_numbers_bools_and_text():
    args = parse_model_args(["width=16", "rate=0.5", "log_probs=false", "name=wide", "extra=none"])
    assert args == {"width": 16, "rate": 0.5, "log_probs": False, "name": "wide", "extra": None}
    assert parse_model_args({"width": 8}) == {"width": 8}


@pytest.mark.parametrize("bad", [["width"], ["=3"], ["2x=3"], {"width": [1, 2]}])
def test_malformed_model_args_are_refused(bad):
    with pytest.raises(ConfigError, match="--model-arg"):
        parse_model_args(bad)


def test_user_model_specs_are_told_apart_from_built_in_names():
    assert not is_user_model("simple-cnn")
    assert parse_model_spec("torchvision:resnet18").form == "torchvision"
    assert parse_model_spec("pkg.mod:Net").form == "module"
    file_spec = parse_model_spec("studies/forum_net.py:Net")
    assert file_spec.form == "file" and Path(file_spec.source).is_absolute()
    assert file_spec.label == "forum_net.py:Net"
    with pytest.raises(ModelError, match="must end in :Name"):
        parse_model_spec("studies/forum_net.py:not-a-name")


def test_a_file_spec_is_stored_with_an_absolute_path_and_named_by_file_and_class(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = config_from_options({"model": "studies/forum_net.py:Net", "model-args": ["width=4"]})
    assert config.model == f"{ROOT / 'studies' / 'forum_net.py'}:Net"
    assert config.model_args == {"width": 4}
    assert config.study_name == "digits-forum_net-Net"
    options = config_to_options(config)
    assert options["model"] == config.model and options["model-args"] == {"width": 4}


def test_the_study_records_model_and_model_args_and_refuses_other_args(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    config = config_from_options({"model": f"{USER}:ResidualNet", "model-args": {"width": 4}})
    study = create_or_load_study(storage, "s", settings=config_to_options(config))
    stored = study.user_attrs[records.SETTINGS_KEY]
    assert stored["model"] == f"{USER}:ResidualNet" and stored["model-args"] == {"width": 4}
    other = config_from_options({"model": f"{USER}:ResidualNet", "model-args": {"width": 8}})
    with pytest.raises(ConfigError, match="model-args"):
        create_or_load_study(storage, "s", settings=config_to_options(other))


def test_a_study_made_before_model_args_existed_still_resumes(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    settings = config_to_options(config_from_options({}))
    study = create_or_load_study(storage, "old", settings=settings)
    stored = dict(study.user_attrs[records.SETTINGS_KEY])
    del stored["model-args"]
    study.set_user_attr(records.SETTINGS_KEY, stored)
    create_or_load_study(storage, "old", settings=settings)  # no error


def test_a_spec_file_names_the_model_relative_to_itself_when_not_found_from_here(tmp_path, monkeypatch):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "net.py").write_text((USER).read_text())
    (folder / "study.toml").write_text('model = "net.py:ResidualNet"\nmodel-args = { width = 4 }\n')
    monkeypatch.chdir(tmp_path)
    options = read_spec(folder / "study.toml")
    assert options["model"] == f"{folder / 'net.py'}:ResidualNet"
    assert options["model-args"] == {"width": 4}


def test_the_constructor_gets_classes_channels_and_size_where_it_takes_them():
    built = build_user_model(parse_model_spec(f"{ROOT / 'studies' / 'forum_net.py'}:Net"), {"width": 4},
                             channels=1, n_classes=7, image_size=32)
    assert built.kwargs == {"num_classes": 7, "in_channels": 1, "image_size": 32, "width": 4}
    assert built.module.fc2.out_features == 7 and built.module.conv1.in_channels == 1
    factory = build_user_model(parse_model_spec(f"{USER}:make_residual"), {}, channels=1, n_classes=4, image_size=16)
    assert factory.kwargs == {"n_classes": 4} and factory.module.head.out_features == 4


def test_a_model_arg_overrides_what_autodrop_would_pass():
    built = build_user_model(parse_model_spec(f"{USER}:ResidualNet"), {"in_channels": 3}, channels=1,
                             n_classes=10, image_size=16)
    assert built.module.stem.in_channels == 3


def test_a_module_spec_imports_from_the_working_directory(monkeypatch):
    monkeypatch.chdir(ROOT / "tests")
    check_model("user_models:ResidualNet")
    model = build_model("user_models:ResidualNet", SHAPE)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.slow
def test_torchvision_models_are_adapted_to_channels_and_classes_without_downloading():
    torch.manual_seed(0)
    built = build_user_model(parse_model_spec("torchvision:resnet18"), {}, channels=1, n_classes=5, image_size=16)
    assert built.module.conv1.in_channels == 1 and built.module.fc.out_features == 5
    assert built.first_conv is not None and built.first_conv.path == "conv1"
    assert built.kwargs["weights"] is None


def test_model_args_for_a_built_in_model_are_refused():
    with pytest.raises(ModelError, match="built-in model 'simple-cnn' takes none"):
        check_model("simple-cnn", {"width": 3})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.py:Net", "does not exist"),
        (f"{USER}:Nope", "has no class or function 'Nope'; it defines nn.Module classes ResidualNet"),
        (f"{USER}", "names a file but no class"),
        (f"{USER}:Broken", r"building Broken\(num_classes=10\) .* failed: ValueError: width must be even"),
        (f"{USER}:WrongOutputs", r"outputs of shape \(3,\) per image, but the data has 10 classes"),
        (f"{USER}:LinearOnly", "no candidate drop sites"),
        ("torchvision:resnt18", "Did you mean resnet18"),
        ("no_such_package.models:Net", "cannot import module 'no_such_package.models'"),
    ],
    ids=["no-file", "no-class", "no-class-named", "fails-to-build", "wrong-outputs", "no-sites", "torchvision-typo",
         "no-module"],
)
def test_bad_models_are_one_line_errors_with_exit_code_2(spec, message):
    result = CliRunner().invoke(main, ["sites", "--model", spec, "--channels", "1", "--image-size", "16"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1
    import re

    assert re.search(message, result.output), result.output


def test_unknown_model_arg_is_an_error_naming_the_accepted_ones():
    result = CliRunner().invoke(main, ["sites", "--model", f"{USER}:ResidualNet", "--model-arg", "depth=3"])
    assert result.exit_code == 2
    assert "depth is not a parameter of ResidualNet" in result.output
    assert "num_classes, in_channels, width" in result.output


def test_search_refuses_a_missing_model_file_before_reading_data(tmp_path):
    result = CliRunner().invoke(main, ["search", "--data", str(tmp_path / "no-data"), "--model", "nope.py:Net",
                                       "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert result.exit_code == 2
    assert "nope.py' does not exist" in result.output


def test_sites_command_prints_the_forum_networks_table():
    result = CliRunner().invoke(
        main, ["sites", "--model", f"{ROOT / 'studies' / 'forum_net.py'}:Net", "--image-size", "64"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("input 3x64x64, 10 classes")
    row = next(line.split() for line in lines if line.strip().startswith("after:conv21#2"))
    assert row == ["after:conv21#2", "conv", "conv21#2", ">", "F.relu", "16x16x16", "-"]
    row = next(line.split() for line in lines if line.strip().startswith("dropout#2"))
    assert row == ["dropout#2", "fc", "F.relu", "128", "Dropout(p=0.25)"]
    assert "18 sites, found by tracing the network with torch.fx." in result.output


def test_sites_command_reads_model_and_args_from_a_study_spec():
    result = CliRunner().invoke(main, ["sites", "--config", str(ROOT / "studies" / "forum.toml"), "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "after:conv41#3" in result.output


def test_sites_command_says_when_hooks_were_used():
    result = CliRunner().invoke(main, ["sites", "--model", f"{USER}:BranchyNet", "--channels", "1", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert "found with module hooks" in result.output
    assert "Note: torch.fx could not trace" in result.output


def test_sites_command_lists_a_built_in_models_sites():
    result = CliRunner().invoke(main, ["sites", "--model", "simple-cnn", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    row = next(line.split() for line in result.output.splitlines() if line.strip().startswith("fc1"))
    assert row == ["fc1", "fc", "flatten", "2048", "-"]


def test_sites_command_lists_each_site_of_a_built_in_model_once():
    result = CliRunner().invoke(main, ["sites", "--model", "simple-cnn"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith("  ")]
    names = [row[0] for row in rows if row[1] in ("conv", "fc")]
    assert names == ["conv1", "conv2", "conv3", "fc1", "fc2"]  # conv sites are declared in two slots each
    assert "\n5 sites, declared by the built-in model." in result.output
