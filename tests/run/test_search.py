"""The whole search on real (tiny) digits: baselines, pruning, resume, determinism, failures."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState
from tiny import tiny_options

import autodrop
import autodrop.run.search as search_module
from autodrop.errors import ConfigError
from autodrop.training.loop import EpochMetrics, TrainingDiverged, TrialTrainer


def _study(options: dict) -> optuna.Study:
    return optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])


def test_search_answers_with_best_placement_baselines_and_importances(tmp_path):
    options = tiny_options(tmp_path, trials=6)
    result = autodrop.search(**options)
    assert result.n_finished == 6
    assert set(result.best_placement) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert [b.baseline for b in result.baselines] == ["none", "head", "everywhere-low", "conv-only"]
    assert all(b.state == "complete" and b.val_accuracy > 0.3 for b in result.baselines)
    assert set(result.importances) == set(result.best_placement)
    assert sum(result.importances.values()) == pytest.approx(1.0, abs=1e-6)
    assert "rough" in result.importance_note  # 6 trials are far too few, and it says so
    assert result.margin is not None and result.margin.n_val == 360
    trial = _study(options).best_trial
    for key in ("train_accuracy", "train_loss", "val_loss", "gap", "seed"):
        assert key in trial.user_attrs


def test_baselines_are_enqueued_once_and_tagged(tmp_path):
    options = tiny_options(tmp_path, trials=4)
    autodrop.search(**options)
    autodrop.search(**{**options, "trials": 6})
    tags = [t.user_attrs.get("baseline") for t in _study(options).trials]
    assert tags[:4] == ["none", "head", "everywhere-low", "conv-only"]
    assert tags.count("none") == 1 and tags.count("head") == 1
    none_trial = _study(options).trials[0]
    assert none_trial.params == {s: "off" for s in ("conv1", "conv2", "conv3", "fc1", "fc2")}


def test_resume_keeps_finished_trials_and_reaches_exactly_n(tmp_path):
    options = tiny_options(tmp_path, trials=5)
    autodrop.search(**options)
    before = {t.number: (t.value, t.datetime_complete) for t in _study(options).trials}
    result = autodrop.search(**{**options, "trials": 7})
    assert result.n_finished == 7
    after = _study(options).trials
    assert len(after) == 7
    assert {t.number: (t.value, t.datetime_complete) for t in after[:5]} == before
    again = autodrop.search(**{**options, "trials": 7})  # already done: nothing runs
    assert again.n_finished == 7 and len(_study(options).trials) == 7


def test_same_seed_gives_the_same_first_trials(tmp_path):
    runs = []
    for name in ("one", "two"):
        options = tiny_options(tmp_path / name, trials=6, seed=3)
        (tmp_path / name).mkdir()
        autodrop.search(**options)
        runs.append([(t.params, t.value) for t in _study(options).trials])
    assert runs[0] == runs[1]
    assert runs[0][4][0] != runs[0][0][0]  # the first sampled trial is not a baseline


def test_trials_are_pruned_when_the_pruner_says_so_but_baselines_never(tmp_path, monkeypatch):
    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    monkeypatch.setattr(search_module, "make_pruner", lambda name, epochs, n_val: AlwaysPrune())
    options = tiny_options(tmp_path, trials=7, epochs=3)
    result = autodrop.search(**options)
    trials = _study(options).trials
    states = [(t.user_attrs.get("baseline"), t.state) for t in trials]
    assert all(state == TrialState.COMPLETE for name, state in states if name)
    sampled = [t for t in trials if "baseline" not in t.user_attrs]
    assert sampled and all(t.state == TrialState.PRUNED for t in sampled)
    assert all(list(t.intermediate_values) == [1] for t in sampled)  # stopped after the first epoch
    assert "pruned_reason" in sampled[0].user_attrs
    assert result.n_pruned == len(sampled)


def test_the_default_pruner_prunes_a_real_search_but_never_a_baseline(tmp_path):
    # Rates up to 0.95 make some placements hopeless: the noise pruner stops them at epoch 2 of 3.
    options = tiny_options(tmp_path, trials=12, epochs=3, rate_range=(0.05, 0.95))
    options.pop("pruner")
    result = autodrop.search(**options)
    trials = _study(options).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and result.n_pruned == len(pruned)
    assert all("baseline" not in t.user_attrs for t in pruned)
    assert all(sorted(t.intermediate_values) == [1, 2] for t in pruned)  # not before two thirds of the epochs
    assert all(t.state == TrialState.COMPLETE for t in trials if "baseline" in t.user_attrs)


def _diverge_trials(monkeypatch, which) -> None:
    """Make the loss of the ``which(k)``-th trial trained (counted from 0) turn NaN in its first epoch."""
    real_epoch = TrialTrainer.train_epoch
    trainers: list = []

    def train_epoch(self):
        if not any(t is self for t in trainers):
            trainers.append(self)
        metrics = real_epoch(self)
        k = next(i for i, t in enumerate(trainers) if t is self)
        return EpochMetrics(metrics.epoch, float("nan"), math.nan, math.nan) if which(k) else metrics

    monkeypatch.setattr(TrialTrainer, "train_epoch", train_epoch)


def test_a_diverged_trial_is_recorded_as_failed_and_the_study_carries_on(tmp_path, monkeypatch):
    _diverge_trials(monkeypatch, lambda k: k == 1)
    options = tiny_options(tmp_path, trials=5)
    result = autodrop.search(**options)
    failed = [t for t in _study(options).trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "nan" in failed[0].user_attrs["fail_reason"]
    assert result.n_finished == 5 and result.n_failed == 1


def test_loss_that_turns_nan_raises_training_diverged():
    import torch
    from torch import nn

    from autodrop.config import DataConfig, TrainConfig
    from autodrop.training.data import load_data
    from autodrop.training.loop import train_trial
    from autodrop.training.normaliser import Normaliser

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) * float("nan")

    data = load_data(DataConfig(source="digits", image_size=8))
    with pytest.raises(TrainingDiverged, match="nan"):
        train_trial(Broken(), data, Normaliser(data.train_images), TrainConfig(epochs=1), seed=0,
                    device=torch.device("cpu"))


def test_trials_failing_in_a_row_stop_the_search_with_the_reason(tmp_path, monkeypatch):
    _diverge_trials(monkeypatch, lambda k: True)
    with pytest.raises(ConfigError, match="5 trials failed in a row.*nan"):
        autodrop.search(**tiny_options(tmp_path, trials=8))


def test_resuming_with_other_trial_settings_is_refused(tmp_path):
    options = tiny_options(tmp_path, trials=1)
    autodrop.search(**options)
    with pytest.raises(ConfigError, match="epochs 2 \\(now 3\\)"):
        autodrop.search(**{**options, "epochs": 3})


def test_load_results_reads_the_same_answer_from_storage(tmp_path):
    options = tiny_options(tmp_path, trials=5)
    result = autodrop.search(**options)
    again = autodrop.load_results("digits-simple-cnn", storage=options["storage"])
    assert again.best.number == result.best.number and again.verdict == result.verdict
