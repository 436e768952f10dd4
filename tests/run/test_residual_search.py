"""A search on a residual network: in-block sites, the branch kind and the literature's recipes."""

from __future__ import annotations

import optuna
import pytest
from tiny import tiny_options

import autodrop
from autodrop.errors import ConfigError
from autodrop.outputs.text import format_result

WRN = dict(model="wrn", model_args={"width": 1}, train_per_class=10, epochs=1, trials=6)


def test_a_wide_resnet_search_runs_the_wrn_and_stochastic_depth_recipes_once(tmp_path):
    options = tiny_options(tmp_path, **WRN)
    result = autodrop.search(**options)
    assert [b.baseline for b in result.baselines] == [
        "none", "head", "everywhere-low", "conv-only", "wrn", "stochastic-depth"]
    answer = format_result(result)
    assert "  wrn " in answer and "  stochastic-depth " in answer and "(branch)" in answer
    study = optuna.load_study(study_name="digits-wrn", storage=options["storage"])
    by_recipe = {t.user_attrs["baseline"]: t for t in study.trials}
    assert {k: v for k, v in by_recipe["stochastic-depth"].params.items() if k.endswith(".kind")} == {
        "block1.1.kind": "branch", "block2.1.kind": "branch", "block3.1.kind": "branch"}
    assert {k: v for k, v in by_recipe["wrn"].params.items() if k.endswith(".p")} == {
        "in:stage1:conv1.p": 0.3, "in:stage2:conv1.p": 0.3, "in:stage3:conv1.p": 0.3}
    autodrop.search(**{**options, "trials": 6})  # a rerun queues no recipe again
    assert len(optuna.load_study(study_name="digits-wrn", storage=options["storage"]).trials) == 6
    stored = study.user_attrs["autodrop.config"]
    assert stored["in-block"] == "per-stage" and "branch" in stored["kinds"]
    with pytest.raises(ConfigError, match="in-block 'per-stage' \\(now 'per-call'\\)"):
        autodrop.search(**{**options, "in_block": "per-call"})


def test_settings_that_find_nothing_in_the_model_are_stored_as_off(tmp_path):
    options = tiny_options(tmp_path, trials=1, epochs=1)
    autodrop.search(**options)
    study = optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])
    stored = study.user_attrs["autodrop.config"]
    # simple-cnn has no repeated block and no residual sum: a study made before these settings
    # existed stored exactly this, so it resumes with the defaults.
    assert stored["in-block"] == "off" and stored["kinds"] == ["element", "channel"]
    autodrop.search(**{**options, "in_block": "per-call", "trials": 2})


def test_the_readme_residual_search_runs_and_answers_with_the_literature_recipes(tmp_path, monkeypatch):
    import re
    import shlex
    from pathlib import Path

    from click.testing import CliRunner

    from autodrop.cli import main

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = re.search(r"^\$ (autodrop search --data digits --model wrn\b.*)$", readme, flags=re.M)
    assert command, "the README shows a search on the built-in residual model"
    monkeypatch.chdir(tmp_path)
    # The README's command, shortened (later options win): a narrow network, little data, 1 epoch.
    args = shlex.split(command.group(1))[1:] + [
        "--trials", "7", "--epochs", "1", "--train-per-class", "10", "--model-arg", "width=1", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ")}
    assert {"wrn", "stochastic-depth", "none"} <= rows
    assert "in:stage1:conv1" in result.output
