"""The command line: the answer it prints, spec files with overrides, and one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import write_image_folder

from autodrop.cli import main

TINY_ARGS = ["--image-size", "16", "--train-per-class", "30", "--epochs", "2", "--batch-size", "64",
             "--pruner", "none", "--quiet"]


def run(args, tmp_path: Path):
    """Invoke the CLI in a fresh working directory; return the result and the files it left there."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(previous)
    return result, sorted(p.name for p in workdir.iterdir())


def test_search_prints_placement_baselines_importances_and_where_it_is_stored(tmp_path):
    result, written = run(["search", "--data", "digits", "--trials", "5", *TINY_ARGS], tmp_path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Best placement (trial" in out
    for site in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert f"  {site} " in out
    for recipe in ("none", "head", "everywhere-low", "conv-only"):
        assert f"  {recipe} " in out
    assert "importance" in out and "Lead over no dropout" in out
    assert "Stored as study 'digits-simple-cnn'" in out
    assert written == ["autodrop-artifacts", "autodrop.db"]  # the study, and the best trials' weights


def test_spec_file_is_read_and_command_line_options_override_it(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        'data = "digits"\nimage-size = 16\ntrain-per-class = 30\nepochs = 3\ntrials = 9\n'
        'batch-size = 64\npruner = "none"\nstudy = "from-spec"\n'
    )
    result, _ = run(["search", "--config", str(spec), "--trials", "4", "--epochs", "1", "--quiet"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "Study 'from-spec': 4 complete" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "no/such/folder"], "does not exist"),
        (["--epochs", "0"], "--epochs must be at least 1, but got 0"),
        (["--rate-range", "0.2", "1.2"], "--rate-range must satisfy 0 <= low < high < 1, but got 0.2 1.2"),
        (["--model", "vgg99"], "unknown model 'vgg99'; built-in models are: simple-cnn, seed-cnn"),
        (["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"], "cannot open storage"),
        (["--storage", "sqlite:////no/such/dir/x.db"], "does not exist"),
        (["--config", "missing.toml"], "cannot read study spec"),
    ],
    ids=["missing-path", "zero-epochs", "rate-range", "unknown-model", "unreachable-storage",
         "storage-folder-missing", "missing-spec"],
)
def test_bad_input_is_one_line_with_exit_code_2_and_writes_nothing(tmp_path, args, message):
    result, written = run(["search", *args, "--quiet"], tmp_path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert written == []


@pytest.mark.parametrize(
    "line,message",
    [("kinds = 5", "--kinds must be a comma-separated list of element, channel, branch, but got 5."),
     ("orders = true", "--slots must be a comma-separated list of after-act, before-bn, but got True."),
     ("slots = true", "--slots must be a comma-separated list of after-act, before-bn, but got True."),
     ("seed = -3", "--seed must be between 0 and 4294967295, but got -3.")],
    ids=["kinds-number", "orders-boolean", "slots-boolean", "negative-seed"],
)
def test_spec_values_of_the_wrong_kind_are_one_line_errors(tmp_path, line, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(f'data = "digits"\n{line}\n')
    result, written = run(["search", "--config", str(spec), "--quiet"], tmp_path)
    assert result.exit_code == 2 and result.output == f"Error: {message}\n" and written == []


def test_model_arg_named_by_a_python_keyword_is_a_one_line_error(tmp_path):
    result, written = run(["search", "--model", f"{Path(__file__).parent / 'user_models.py'}:ResidualNet",
                           "--model-arg", "class=3", "--quiet"], tmp_path)
    assert result.exit_code == 2 and written == []
    assert result.output == ("Error: --model-arg names must be Python identifiers other than keywords, "
                             "but got 'class'.\n")


@pytest.mark.parametrize(
    "classes,message",
    [({}, "no class subfolders"), ({"only": 4}, "only one class"), ({"a": 4, "b": 1}, "class 'b' has 1")],
    ids=["empty-folder", "one-class", "class-too-small"],
)
def test_unusable_image_folders_are_one_line_errors(tmp_path, classes, message):
    root = tmp_path / "imgs"
    root.mkdir()
    write_image_folder(root, classes)
    result, written = run(["search", "--data", str(root), "--quiet"], tmp_path)
    assert result.exit_code == 2 and message in result.output and written == []


def test_unreadable_files_are_named_in_a_warning_and_the_search_goes_on(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 6, "b": 6}, size=8)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result, _ = run(["search", "--data", str(root), "--trials", "1", "--epochs", "1", "--image-size", "8",
                     "--quiet"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "Warning: skipping" in result.output and "broken.png" in result.output


def test_python_dash_m_autodrop_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "autodrop", "--help"], capture_output=True, text=True, check=True)
    assert "search" in done.stdout


def test_search_help_shows_the_defaults():
    result = CliRunner().invoke(main, ["search", "--help"])
    assert result.exit_code == 0
    assert "--trials" in result.output and "default: 20" in result.output


def test_search_refuses_an_unknown_data_on_device():
    result = CliRunner().invoke(main, ["search", "--data-on-device", "sometimes"])
    assert result.exit_code == 2 and "--data-on-device" in result.output
