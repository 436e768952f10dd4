"""A search stopped mid-trial resumes that trial from its checkpoint, as if it had never stopped."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autodrop.api import search as run_search
from autodrop.config import config_from_options
from autodrop.run import records
from autodrop.run.progress import Progress
from autodrop.run.signals import Interrupted

pytestmark = pytest.mark.slow


class EpochLog(Progress):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None:
        self.epochs.append(epoch)


class StopAtEpoch(Progress):
    """Sends this process SIGINT when the given epoch is reported, as a user's Ctrl-C would."""

    def __init__(self, epoch: int) -> None:
        self.at = epoch

    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None:
        if epoch == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def _config(data: Path, db: Path, **options: object):
    return config_from_options({
        "data": str(data), "image-size": 16, "epochs": 4, "batch-size": 32, "trials": 1, "device": "cpu",
        "pruner": "none", "storage": f"sqlite:///{db}", "study": "resume", "seed": 3, **options,
    })


def test_interrupted_trial_resumes_from_its_checkpoint_to_the_same_result(tiny_images: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    import torch

    torch.set_num_threads(1)
    straight = run_search(config=_config(tiny_images, tmp_path / "straight.db"), progress=Progress())
    expected = optuna.load_study(study_name="resume", storage=straight.storage_url).trials[0]

    config = _config(tiny_images, tmp_path / "stopped.db")
    with pytest.raises(Interrupted):
        run_search(config=config, progress=StopAtEpoch(2))
    study = optuna.load_study(study_name="resume", storage=config.storage_url)
    stopped, retry = study.trials
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs[records.FAIL_REASON] == "interrupted by SIGINT"
    assert sorted(stopped.intermediate_values) == [1, 2]
    checkpoint = Path(stopped.user_attrs[records.CHECKPOINT])
    assert checkpoint.exists() and checkpoint.is_relative_to(tmp_path / "autodrop-checkpoints")
    assert retry.state == TrialState.WAITING

    log = EpochLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # re-reporting a step would warn
        result = run_search(config=config, progress=log)
    assert log.epochs == [2, 3, 4]  # the checkpointed epoch is replayed to the pruner, then training goes on
    resumed = optuna.load_study(study_name="resume", storage=config.storage_url).trials[1]
    assert resumed.state == TrialState.COMPLETE
    assert resumed.user_attrs[records.RESUMED_AT] == 3
    assert resumed.intermediate_values == expected.intermediate_values
    assert resumed.value == expected.value
    assert resumed.user_attrs["train_accuracy"] == expected.user_attrs["train_accuracy"]
    assert result.n_finished == 1
    assert not checkpoint.exists()  # removed once the trial finished, with the folders autodrop made
    assert not (tmp_path / "autodrop-checkpoints").exists()


def test_a_stop_while_the_next_to_last_epoch_is_recorded_lets_the_last_epoch_finish(
        tiny_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _config(tiny_images, tmp_path / "finishing.db")
    with pytest.raises(Interrupted):
        run_search(config=config, progress=StopAtEpoch(3))  # 4 epochs: the signal comes as epoch 3 is recorded
    (trial,) = optuna.load_study(study_name="resume", storage=config.storage_url).trials
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == [1, 2, 3, 4]
