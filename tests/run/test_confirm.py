"""autodrop confirm: fresh seeds per placement, a paired test, and plain words about the noise."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from tiny import tiny_options

import autodrop
from autodrop.cli import main
from autodrop.config import config_from_options
from autodrop.run.confirm import Candidate, summarize, train_candidates
from autodrop.training.data import load_data

ALL_SITES = ("conv1", "conv2", "conv3", "fc1", "fc2")


def _candidate(label, rates, baseline=None):
    placement = {s: rates.get(s) for s in ALL_SITES}
    return Candidate(label=label, trial=0, baseline=baseline, placement=placement, variants={})


@pytest.fixture(scope="module")
def scarce_digits():
    # 20 training images per class: where placement can matter, and each run takes a second.
    config = config_from_options(dict(data="digits", image_size=16, train_per_class=20, epochs=3, batch_size=32))
    return config, load_data(config.data)


def test_a_placement_no_better_than_no_dropout_comes_out_within_noise(scarce_digits):
    config, data = scarce_digits
    candidates = [_candidate("trial 1", {"fc2": 0.05}), _candidate("none", {}, baseline="none")]
    confirmation = summarize(train_candidates(config, data, candidates, n_seeds=5), seeds=list(range(5)))
    assert not confirmation.comparison.significant
    assert confirmation.verdict.startswith("Within noise")


def test_a_truly_different_placement_comes_out_significant(scarce_digits):
    config, data = scarce_digits
    candidates = [_candidate("trial 1", {s: 0.65 for s in ALL_SITES}), _candidate("none", {}, baseline="none")]
    confirmation = summarize(train_candidates(config, data, candidates, n_seeds=5), seeds=list(range(5)))
    heavy, none = confirmation.candidates
    assert heavy.mean < none.mean
    assert confirmation.comparison.significant and confirmation.comparison.p_value < 0.05
    assert confirmation.verdict.startswith("Not confirmed: no dropout beats")


def test_identical_runs_are_within_noise_not_significant(scarce_digits):
    config, data = scarce_digits
    candidates = [_candidate("trial 1", {}), _candidate("none", {}, baseline="none")]
    confirmation = summarize(train_candidates(config, data, candidates, n_seeds=2), seeds=[0, 1])
    assert confirmation.comparison.mean_difference == 0 and confirmation.comparison.p_value is None
    assert not confirmation.comparison.significant


def test_confirm_command_retrains_top_and_baselines_and_report_shows_it(tmp_path):
    options = tiny_options(tmp_path, trials=6)
    autodrop.search(**options)
    result = CliRunner().invoke(
        main, ["confirm", "--study", "digits-simple-cnn", "--storage", options["storage"], "--seeds", "2",
               "--top", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    for label in ("none", "head", "everywhere-low", "conv-only"):
        assert f"  {label} " in result.output
    assert result.output.count("  trial ") == 1
    stored = autodrop.load_results("digits-simple-cnn", storage=options["storage"])
    assert stored.confirmation is not None and len(stored.confirmation["seeds"]) == 2
    assert stored.verdict == stored.confirmation["verdict"]


@pytest.mark.parametrize(
    "args,message",
    [(["--study", "nope"], "no study named 'nope'"), (["--seeds", "1"], "--seeds must be at least 2")],
)
def test_confirm_bad_input_is_one_line(tmp_path, args, message):
    options = tiny_options(tmp_path, trials=1)
    autodrop.search(**options)
    result = CliRunner().invoke(main, ["confirm", "--storage", options["storage"], *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_confirm_on_a_missing_study_file_creates_nothing(tmp_path):
    missing = tmp_path / "none.db"
    result = CliRunner().invoke(main, ["confirm", "--storage", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and "which does not exist" in result.output and not missing.exists()
