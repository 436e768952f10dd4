"""What a retry takes from storage: its earlier attempts and the checkpoint of the attempt it
replaces. Anyone can write those records; garbage counts as no earlier attempt, and no two trials
ever share a checkpoint file."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from tiny import tiny_options

import autodrop
from autodrop.run.checkpoints import retried_from
from autodrop.run.storage import STOPS_ATTR, RetryStaleTrial
from autodrop.training.loop import TrialTrainer

X = {"x": optuna.distributions.FloatDistribution(0, 1)}


def _failed(study: optuna.Study, **system_attrs: object) -> optuna.trial.FrozenTrial:
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=X,
                                              system_attrs=system_attrs))
    return study.trials[-1]


@pytest.mark.parametrize("attrs", [
    {"retry_history": 5, STOPS_ATTR: "abc", "failed_trial": "x"},
    {"retry_history": "abc", STOPS_ATTR: {"a": 1}, "failed_trial": 2**80},
    {"retry_history": [0, -1, 2**80], STOPS_ATTR: [True], "failed_trial": None},
    {"retry_history": list(range(5000)), STOPS_ATTR: list(range(5000))},
])
def test_garbage_retry_records_count_as_no_earlier_attempt(attrs):
    study = optuna.create_study(direction="maximize")
    for _ in range(3):
        _failed(study)
    trial = _failed(study, **attrs)
    assert RetryStaleTrial(max_retry=2)(study, trial)
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == trial.number
    assert retry.system_attrs["retry_history"] == [trial.number] and retry.system_attrs[STOPS_ATTR] == []


def test_stops_listed_over_and_over_do_not_stretch_the_budget():
    study = optuna.create_study(direction="maximize")
    trial = _failed(study)
    retry = RetryStaleTrial(max_retry=2)
    queued = 0
    while retry(study, trial) and queued < 10:
        queued += 1
        planted = {**study.trials[-1].system_attrs, STOPS_ATTR: [0] * 50}  # "attempt 0 was a stop", fifty times
        trial = _failed(study, **planted)
    assert queued == 3  # attempt 0 counted as one stop, then two counted failures: no more


def _queue_claiming(study: optuna.Study, first: int, history: list[int]) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params={"x": 0.5}, distributions=X,
        system_attrs={"failed_trial": first, "retry_history": history}))


def test_a_retry_resumes_only_the_attempt_it_alone_replaces():
    study = optuna.create_study(direction="maximize")
    _failed(study)  # 0
    _queue_claiming(study, 0, [0])  # 1: its honest retry
    assert retried_from(study.ask()) == 0

    study = optuna.create_study(direction="maximize")
    _failed(study)
    _queue_claiming(study, 0, [0])
    _queue_claiming(study, 0, [0])  # a second trial claiming the same attempt: neither takes its file
    assert retried_from(study.ask()) is None and retried_from(study.ask()) is None

    study = optuna.create_study(direction="maximize")
    running = study.ask()  # 0, still running: its checkpoint is in use
    _queue_claiming(study, 0, [0])
    _queue_claiming(study, 5, [0])  # a history that does not start at its first attempt
    assert retried_from(study.ask()) is None and retried_from(study.ask()) is None
    assert running.number == 0


def test_a_trial_that_fails_for_good_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_epoch = TrialTrainer.train_epoch

    def breaks_in_epoch_two(self):
        if self.epoch == 1:
            raise RuntimeError("the GPU fell off")
        return real_epoch(self)

    monkeypatch.setattr(TrialTrainer, "train_epoch", breaks_in_epoch_two)
    options = tiny_options(tmp_path, trials=1, epochs=3, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(RuntimeError, match="fell off"):
        autodrop.search(**options)
    study = optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert not list((tmp_path / "ckpt").rglob("*.pt"))  # the epoch-1 checkpoint went with the trial
