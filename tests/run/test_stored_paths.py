"""Paths near a study that anyone who can write to it could plant or edit: a symbolic link at the
lock file's path is refused, and a model path read from a study is never looked up on this machine."""

from __future__ import annotations

import errno
import fcntl

import optuna
import pytest

from autodrop.errors import StorageError
from autodrop.run import locking, records


def test_a_symbolic_link_at_the_lock_files_path_is_refused_not_followed(tmp_path, monkeypatch):
    def no_flock(descriptor, operation):  # NFS: the lock file is used
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / locking.LOCK_FILE_NAME).symlink_to(victim)
    lock = locking.StorageLock(f"sqlite:///{tmp_path / 'study' / 's.db'}", "admit")
    with pytest.raises(StorageError, match="symbolic link"):
        with lock.hold():
            pass
    assert not victim.exists()


def test_a_model_path_read_from_a_study_is_kept_as_stored(tiny_digits_study, tmp_path):
    real = tmp_path / "real.py"
    real.write_text("")
    link = tmp_path / "link.py"
    link.symlink_to(real)
    study = tiny_digits_study
    settings = dict(study.user_attrs[records.SETTINGS_KEY], model=f"{link}:Net")
    study.set_user_attr(records.SETTINGS_KEY, settings)
    assert records.read_study(study).config.model == f"{link}:Net"  # not followed to real.py
    settings["model"] = "relative/evil.py:Net"
    study.set_user_attr(records.SETTINGS_KEY, settings)
    assert records.read_study(study).config.model == "relative/evil.py:Net"  # not looked up from here


@pytest.fixture
def tiny_digits_study(tmp_path):
    from tiny import tiny_options

    import autodrop

    options = tiny_options(tmp_path, trials=1, epochs=1)
    autodrop.search(**options)
    return optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])


def test_a_dashboard_note_that_cannot_be_written_warns_and_the_trials_complete(tmp_path):
    from tiny import tiny_options

    import autodrop
    from autodrop.errors import AutodropWarning

    options = tiny_options(tmp_path, trials=1, epochs=1)
    autodrop.search(**options)
    study = optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])
    storage = study._storage
    for trial_id in range(1, 12):  # the note versions of the trials still to come, edited by someone
        storage.set_study_system_attr(study._study_id, f"dashboard:{trial_id}:note_ver", "not a number")
    with pytest.warns(AutodropWarning, match="dashboard note of trial"):
        result = autodrop.search(**{**options, "trials": 3})
    assert result.n_finished == 3
    states = [t.state for t in optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"]).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
