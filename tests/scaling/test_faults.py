"""Finished work survives faults: side writes that fail, storage hiccups, repeated stops, two
studies side by side, data that changed, filesystems that refuse locks."""

from __future__ import annotations

import errno
import fcntl
import math
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState
from PIL import Image

from autodrop.api import search
from autodrop.cli import main
from autodrop.config import config_from_options
from autodrop.errors import AutodropWarning
from autodrop.run import locking, records
from autodrop.run.progress import Progress
from autodrop.run.signals import Interrupted
from autodrop.run.storage import RetryStaleTrial
from autodrop.run.study import FINISHED_STATES
from autodrop.training.loop import EpochMetrics, TrialTrainer

pytestmark = pytest.mark.slow


def _config(data: Path, db: Path, **options: object):
    return config_from_options({
        "data": str(data), "image-size": 16, "epochs": 3, "batch-size": 32, "trials": 3, "device": "cpu",
        "pruner": "none", "storage": f"sqlite:///{db}", "study": "faults", "seed": 1, **options,
    })


def _trials(config) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="faults", storage=config.storage_url).trials


class StopAtEpoch(Progress):
    """Sends this process ``signum`` when the given epoch is reported, as a scheduler's preemption would."""

    def __init__(self, epoch: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = epoch, signum

    def epoch(self, trial: int, epoch: int, epochs: int, val_accuracy: float) -> None:
        if epoch == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_checkpoint_that_cannot_be_written_warns_and_the_trials_still_complete(tiny_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_save = torch.save

    def disk_full_for_checkpoints(payload, target, *args, **kwargs):
        if str(target).endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(payload, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_for_checkpoints)
    config = _config(tiny_images, tmp_path / "s.db")
    with pytest.warns(AutodropWarning, match="could not be written.*No space left"):
        result = search(config=config)
    assert result.n_finished == 3 and all(t.state == TrialState.COMPLETE for t in _trials(config))


def test_weights_that_cannot_be_kept_warn_and_the_trials_still_complete(tiny_images, tmp_path, monkeypatch):
    import autodrop.run.artifacts as artifacts

    def disk_full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "upload_artifact", disk_full)
    config = _config(tiny_images, tmp_path / "s.db")
    with pytest.warns(AutodropWarning, match="could not be kept"):
        result = search(config=config)
    trials = _trials(config)
    assert result.n_finished == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert not any(records.WEIGHTS in t.user_attrs for t in trials)


def test_a_storage_error_while_reporting_requeues_the_trial_and_the_study_ends_with_n(tiny_images, tmp_path,
                                                                                       monkeypatch):
    import sqlalchemy.exc

    real_report = optuna.trial.Trial.report
    hiccups = {"left": 1}

    def database_locked_once(self, value, step):
        if self.number == 1 and step == 2 and hiccups["left"]:
            hiccups["left"] -= 1
            raise sqlalchemy.exc.OperationalError("UPDATE ...", {}, Exception("database is locked"))
        return real_report(self, value, step)

    monkeypatch.setattr(optuna.trial.Trial, "report", database_locked_once)
    config = _config(tiny_images, tmp_path / "s.db")
    result = search(config=config)
    trials = _trials(config)
    assert result.n_finished == 3
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1] and failed[0].user_attrs[records.FAIL_REASON].startswith("storage error")
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params


def test_three_stops_of_one_trial_do_not_use_up_its_retries(tiny_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tiny_images, tmp_path / "s.db", trials=1, epochs=5)
    for epoch in (1, 2, 3):  # a cluster preempts the worker three times, each a little further on
        with pytest.raises(Interrupted):
            search(config=config, progress=StopAtEpoch(epoch))
    result = search(config=config)
    trials = _trials(config)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    assert all(t.user_attrs[records.FAIL_REASON] == "interrupted by SIGTERM" for t in trials[:3])
    finished = trials[-1]
    assert finished.system_attrs["failed_trial"] == 0 and finished.user_attrs[records.RESUMED_AT] == 4
    assert result.n_finished == 1


def test_stops_are_retried_whatever_their_count_but_failures_only_max_retry_times():
    study = optuna.create_study(direction="maximize")
    retry = RetryStaleTrial(max_retry=2)
    trial = optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.5},
                                      distributions={"x": optuna.distributions.FloatDistribution(0, 1)})
    for _ in range(5):
        study.add_trial(trial)
        trial = study.trials[-1]
        assert retry(study, trial, counted=False)
        trial = optuna.trial.create_trial(state=TrialState.FAIL, params=trial.params, distributions=trial.distributions,
                                          system_attrs=study.trials[-1].system_attrs)
    assert retry(study, study.trials[-1])
    assert retry(study, study.trials[-1])
    assert not retry(study, study.trials[-1])  # the third counted failure is one too many


def test_a_failed_baseline_is_queued_again_on_the_next_run(tiny_images, tmp_path, monkeypatch):
    real_epoch = TrialTrainer.train_epoch
    trainers: list = []

    def head_diverges(self):
        if not any(t is self for t in trainers):
            trainers.append(self)
        metrics = real_epoch(self)
        first_run_head = len(trainers) == 2 and self is trainers[1]  # trial 1 is the head recipe
        return EpochMetrics(metrics.epoch, math.nan, math.nan, math.nan) if first_run_head else metrics

    monkeypatch.setattr(TrialTrainer, "train_epoch", head_diverges)
    config = _config(tiny_images, tmp_path / "s.db", trials=4)
    search(config=config)
    monkeypatch.undo()
    head = [t for t in _trials(config) if t.user_attrs.get(records.BASELINE) == "head"]
    assert [t.state for t in head] == [TrialState.FAIL]
    result = search(config=_config(tiny_images, tmp_path / "s.db", trials=5))
    head = [t for t in _trials(config) if t.user_attrs.get(records.BASELINE) == "head"]
    assert [t.state for t in head] == [TrialState.FAIL, TrialState.COMPLETE]
    assert {b.baseline for b in result.baselines if b.state == "complete"} >= {"none", "head"}


def test_a_resume_on_other_images_is_refused_with_one_line(tiny_images, tmp_path):
    data = tmp_path / "images"
    shutil.copytree(tiny_images, data)
    options = ["search", "--data", str(data), "--image-size", "16", "--epochs", "1", "--pruner", "none",
               "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet", "--device", "cpu"]
    assert CliRunner().invoke(main, [*options, "--trials", "2"]).exit_code == 0
    victim = next((data / "train" / "a").iterdir())
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(victim)  # the same counts, one pixel different
    result = CliRunner().invoke(main, [*options, "--trials", "3"])
    assert result.exit_code == 2 and "not the data it was searched on" in result.output
    assert "other pixels or labels" in result.output and len(result.output.strip().splitlines()) == 1


def test_two_studies_side_by_side_never_resume_each_others_checkpoints(tiny_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _config(tiny_images, tmp_path / "a.db", trials=1, epochs=4)
    b = _config(tiny_images, tmp_path / "b.db", trials=1, epochs=4)
    for config in (a, b):
        with pytest.raises(Interrupted):
            search(config=config, progress=StopAtEpoch(2, signal.SIGINT))
    folders = sorted((tmp_path / "autodrop-checkpoints").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("faults-") for f in folders)  # same name, two studies
    uuid_a = optuna.load_study(study_name="faults", storage=a.storage_url).user_attrs[records.UUID_KEY]
    a_folder = next(f for f in folders if f.name.endswith(uuid_a[:12]))
    b_folder = next(f for f in folders if f != a_folder)
    # Put study A's checkpoint where study B's retry will look: B must not resume from it.
    shutil.copy(a_folder / "trial-0.pt", b_folder / "trial-0.pt")
    with pytest.warns(AutodropWarning, match="belongs to another study"):
        search(config=b)
    search(config=a)
    assert _trials(b)[-1].user_attrs[records.RESUMED_AT] == 1  # started over
    assert _trials(a)[-1].user_attrs[records.RESUMED_AT] == 3  # resumed from its own


def test_a_filesystem_that_refuses_flock_falls_back_to_a_lock_file(tiny_images, tmp_path, monkeypatch):
    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    result = search(config=_config(tiny_images, tmp_path / "s.db", trials=2, epochs=1))
    assert result.n_finished == 2 and (tmp_path / locking.LOCK_FILE_NAME).exists()


def test_a_filesystem_that_refuses_every_lock_is_a_one_line_error(tmp_path, monkeypatch):
    def refuse(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(fcntl, "lockf", refuse)
    result = CliRunner().invoke(main, ["search", "--data", "digits", "--image-size", "8", "--epochs", "1", "--trials",
                                       "1", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet"])
    assert result.exit_code == 2 and "use PostgreSQL" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_search_and_create_only_never_print_the_storage_password(postgres_url):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["search", "--data", "digits", "--image-size", "8", "--storage", url,
                                       "--study", "pw", "--create-only"])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output and "***" in result.output


def test_the_data_record_of_a_study_made_before_fingerprints_gains_one(tiny_images, tmp_path):
    config = _config(tiny_images, tmp_path / "s.db", trials=1, epochs=1)
    search(config=config)
    study = optuna.load_study(study_name="faults", storage=config.storage_url)
    data = dict(study.user_attrs[records.DATA_KEY])
    fingerprint = data.pop("fingerprint")
    study.set_user_attr(records.DATA_KEY, data)
    search(config=_config(tiny_images, tmp_path / "s.db", trials=2, epochs=1))
    assert optuna.load_study(study_name="faults", storage=config.storage_url).user_attrs[
        records.DATA_KEY]["fingerprint"] == fingerprint


def test_a_checkpoint_file_of_a_finished_study_is_kept_out_of_the_next_one(tiny_images, tmp_path, monkeypatch):
    """A study deleted and made again under the same name gets a new identity, so the old one's
    stale checkpoints are never found."""
    monkeypatch.chdir(tmp_path)
    config = _config(tiny_images, tmp_path / "s.db", trials=1, epochs=4)
    with pytest.raises(Interrupted):
        search(config=config, progress=StopAtEpoch(2, signal.SIGINT))
    old = optuna.load_study(study_name="faults", storage=config.storage_url).user_attrs[records.UUID_KEY]
    optuna.delete_study(study_name="faults", storage=config.storage_url)
    search(config=config)
    new = optuna.load_study(study_name="faults", storage=config.storage_url).user_attrs[records.UUID_KEY]
    assert new != old
    assert any(old[:12] in p.name for p in (tmp_path / "autodrop-checkpoints").iterdir())  # left alone, unused
    assert sqlite3.connect(tmp_path / "s.db").execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 1
    assert _trials(config)[0].state in FINISHED_STATES


def test_a_trial_whose_last_epoch_was_saved_but_not_told_finishes_on_resume_without_training(tiny_images, tmp_path,
                                                                                             monkeypatch):
    from autodrop.run.trials import StudyTrials

    monkeypatch.chdir(tmp_path)
    real_finish = StudyTrials.record_finish

    def killed_before_telling(self, setup, metrics, model):
        raise KeyboardInterrupt  # the last epoch's checkpoint is written; the trial was never told

    monkeypatch.setattr(StudyTrials, "record_finish", killed_before_telling)
    config = _config(tiny_images, tmp_path / "s.db", trials=1, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        search(config=config)
    monkeypatch.setattr(StudyTrials, "record_finish", real_finish)
    epochs_trained: list[int] = []
    real_epoch = TrialTrainer.train_epoch
    monkeypatch.setattr(TrialTrainer, "train_epoch", lambda self: epochs_trained.append(1) or real_epoch(self))
    result = search(config=config)
    trials = _trials(config)
    assert result.n_finished == 1 and epochs_trained == []
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs[records.RESUMED_AT] == 3 and records.TRAIN_ACCURACY in trials[1].user_attrs
    assert not list((tmp_path / "autodrop-checkpoints").rglob("*.pt"))


def test_a_storage_error_while_telling_requeues_the_trial_without_using_its_retries(tiny_images, tmp_path,
                                                                                   monkeypatch):
    import sqlalchemy.exc

    from autodrop.run.storage import STOPS_ATTR

    monkeypatch.chdir(tmp_path)
    real_tell = optuna.Study.tell
    hiccups = {"left": 1}

    def connection_dropped_once(self, trial, values=None, state=None, skip_if_finished=False):
        if state == TrialState.COMPLETE and trial.number == 1 and hiccups["left"]:
            hiccups["left"] -= 1
            raise sqlalchemy.exc.OperationalError("UPDATE trials ...", {}, Exception("server closed the connection"))
        return real_tell(self, trial, values, state=state, skip_if_finished=skip_if_finished)

    monkeypatch.setattr(optuna.Study, "tell", connection_dropped_once)
    config = _config(tiny_images, tmp_path / "s.db", trials=3)
    result = search(config=config)
    trials = _trials(config)
    assert result.n_finished == 3 and hiccups["left"] == 0
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1] and failed[0].user_attrs[records.FAIL_REASON].startswith("storage error")
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.state == TrialState.COMPLETE and retry.system_attrs[STOPS_ATTR] == [1]  # not a counted failure
    assert retry.user_attrs[records.RESUMED_AT] == 4  # its last epoch was kept: it was only told
