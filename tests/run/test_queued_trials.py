"""Anyone who can write to a shared study can queue trials: a queued trial asking for what no search
would (a rate of 7, an unknown kind, a seed that is not a number) fails with its reason, and the
workers, the report, export and confirm go on without it."""

from __future__ import annotations

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from tiny import tiny_options

import autodrop
from autodrop.cli import main
from autodrop.errors import AutodropWarning
from autodrop.run import records

HOSTILE = [
    ({"fc1": "on", "fc1.p": 7.0}, {}),
    ({"conv1": "on", "conv1.p": 0.3, "conv1.kind": "laser"}, {}),
    ({"fc1": "maybe"}, {}),
    ({"rm -rf": "on"}, {}),
    ({}, {"seed": "x"}),
    ({}, {"seed": 2**80}),
    ({}, {"baseline": "x\x1b[2J"}),
]


def _study(options: dict) -> optuna.Study:
    return optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])


def test_queued_trials_autodrop_would_not_ask_for_fail_with_a_reason_and_the_workers_go_on(tmp_path):
    options = tiny_options(tmp_path, trials=1)
    autodrop.search(**options)
    study = _study(options)
    for params, attrs in HOSTILE:
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    # Queued as a retry is, with the parameters already set: Optuna's own checks never see them.
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params={"fc1": "on", "fc1.p": 7.0},
        distributions={"fc1": CategoricalDistribution(["off", "on"]), "fc1.p": FloatDistribution(0.0, 10.0)},
    ))
    with pytest.warns(AutodropWarning, match="left out"):
        result = autodrop.search(**{**options, "trials": 3})
    assert result.n_finished == 3
    trials = _study(options).trials
    refused = [t for t in trials if t.number >= 1 and t.number <= len(HOSTILE) + 1]
    assert all(t.state == TrialState.FAIL for t in refused), [t.state for t in refused]
    assert all(t.user_attrs[records.FAIL_REASON].startswith("queued trial") for t in refused)
    assert "7.0" in refused[0].user_attrs[records.FAIL_REASON]
    assert not any("p" in t.params and t.params.get("fc1.p") == 7.0 for t in refused[:-1])  # never taken as params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    # The reader leaves the one that kept its parameters out, with a warning, and answers.
    report = CliRunner().invoke(main, ["report", "--storage", options["storage"]])
    assert report.exit_code == 0, report.output
    assert "left out" in report.output and "\x1b" not in report.output


def test_a_reader_leaves_an_edited_trial_out_and_counts_it(tmp_path):
    options = tiny_options(tmp_path, trials=2)
    autodrop.search(**options)
    study = _study(options)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=0.99, params={"fc1": "on", "fc1.p": 7.0},
        distributions={"fc1": CategoricalDistribution(["off", "on"]), "fc1.p": FloatDistribution(0.0, 10.0)},
        user_attrs={records.SEED: "x"},
    ))
    record = records.read_study(study)
    with pytest.warns(AutodropWarning, match="1 trial"):
        read = records.read_trials(study, record)
    assert [t.number for t in read] == [0, 1]
    exported = CliRunner().invoke(main, ["export", "--storage", options["storage"], "--out", str(tmp_path / "w.py")])
    assert exported.exit_code == 0, exported.output  # the edited trial "at 0.99" is not taken for the best
    assert "trial 2" not in exported.output.split("Warning")[0]
