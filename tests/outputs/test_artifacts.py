"""What the search keeps for report, export and dashboard: notes, the best weights, their folder."""

from __future__ import annotations

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore

from autodrop.errors import StorageError
from autodrop.run import records
from autodrop.run.artifacts import artifact_dir, default_artifact_dir, keep_weights_if_top, load_weights, trial_note
from autodrop.run.storage import find_study, open_storage


def test_note_gives_placement_accuracies_gap_and_baseline():
    note = trial_note({"conv1": None, "fc1": 0.4213}, baseline="head", val_accuracy=0.9, train_accuracy=0.975)
    assert "**Dropout:** `fc1` at 0.42" in note
    assert "**Off:** `conv1`" in note
    assert "**Baseline recipe:** head" in note
    assert "validation 90.0%, train 97.5%, gap +7.5 points" in note


def test_note_of_pruned_and_failed_trials_says_so():
    assert "**Pruned** after epoch 2 with validation accuracy 51.0%" in trial_note(
        {"fc1": None}, val_accuracy=0.51, pruned_at=2
    )
    assert "**Failed:** training loss became nan" in trial_note({"fc1": None}, failure="training loss became nan")
    assert "**Dropout:** none" in trial_note({"fc1": None})


def test_default_artifact_dir_sits_beside_the_sqlite_file(tmp_path, monkeypatch):
    assert default_artifact_dir(f"sqlite:///{tmp_path / 'runs.db'}") == tmp_path / "runs-artifacts"
    monkeypatch.chdir(tmp_path)
    assert default_artifact_dir("postgresql://u@h/db") == tmp_path / "autodrop-artifacts"


def test_weights_are_kept_only_for_the_best_few(tmp_path):
    import torch

    study = optuna.create_study(direction="maximize")
    store = FileSystemArtifactStore(tmp_path)
    kept = {}
    # The fifth trial (0.5) ranks behind three better ones and is not kept; the sixth (0.95) leads.
    for value in (0.9, 0.8, 0.7, 0.85, 0.5, 0.95):
        trial = study.ask()
        model = torch.nn.Linear(2, 2)
        kept[trial.number] = keep_weights_if_top(study, trial, model, value, store=store, keep=3) is not None
        study.tell(trial, value)
    assert kept == {0: True, 1: True, 2: True, 3: True, 4: False, 5: True}
    kept_record = study.trials[5].user_attrs[records.WEIGHTS]
    state = load_weights(store, (kept_record["artifact"], kept_record["sha256"]))
    assert set(state) == {"weight", "bias"}
    assert records.WEIGHTS not in study.trials[4].user_attrs


def test_weights_whose_file_was_swapped_are_refused(tmp_path):
    import torch

    study = optuna.create_study(direction="maximize")
    store = FileSystemArtifactStore(tmp_path)
    trial = study.ask()
    artifact = keep_weights_if_top(study, trial, torch.nn.Linear(2, 2), 0.9, store=store)
    digest = trial.user_attrs[records.WEIGHTS]["sha256"]
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / artifact)  # someone else's file under its name
    with pytest.raises(StorageError, match="not the one the search kept"):
        load_weights(store, (artifact, digest))


def test_a_failure_to_keep_weights_is_a_warning_not_the_trials_end(tmp_path):
    import torch

    from autodrop.errors import AutodropWarning

    study = optuna.create_study(direction="maximize")
    gone = FileSystemArtifactStore(tmp_path / "store")
    (tmp_path / "store").rmdir() if (tmp_path / "store").exists() else None
    (tmp_path / "store").write_text("a file where the folder should be")
    trial = study.ask()
    with pytest.warns(AutodropWarning, match="could not be kept"):
        assert keep_weights_if_top(study, trial, torch.nn.Linear(2, 2), 0.9, store=gone) is None
    assert records.WEIGHTS not in trial.user_attrs


def test_search_records_artifact_dir_scaling_notes_and_weights(tiny_study):
    from optuna_dashboard._note import get_note_from_system_attrs

    study = tiny_study.load()
    assert study.user_attrs[records.ARTIFACT_DIR_KEY] == str(tiny_study.artifact_dir)
    assert len(study.user_attrs[records.NORMALISER_KEY]["scale"]) == 1
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    for trial in study.trials:
        assert "**Dropout:**" in get_note_from_system_attrs(system_attrs, trial._trial_id)["body"]
    store = FileSystemArtifactStore(tiny_study.artifact_dir)
    best = study.best_trial
    kept_record = best.user_attrs[records.WEIGHTS]
    assert load_weights(store, (kept_record["artifact"], kept_record["sha256"])) is not None
    kept = [t.number for t in study.trials if records.WEIGHTS in t.user_attrs]
    assert kept[:3] == [0, 1, 2] and best.number in kept  # the first three always rank in the top three


def test_the_artifact_folder_is_derived_never_taken_from_the_study(tiny_study, tmp_path):
    study = tiny_study.copy_to(tmp_path / "copy").load()
    study.set_user_attr(records.ARTIFACT_DIR_KEY, str(tmp_path / "elsewhere"))
    url = f"sqlite:///{tmp_path / 'copy' / 'study.db'}"
    assert artifact_dir(url, None) == tmp_path / "copy" / "study-artifacts"
    assert artifact_dir(url, tmp_path / "chosen") == tmp_path / "chosen"


def test_read_only_open_does_not_create_a_missing_sqlite_file(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{missing}", must_exist=True)
    assert not missing.exists()


def test_find_study_picks_the_only_study_and_lists_them_otherwise(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="one", storage=url)
    storage = open_storage(url, must_exist=True)
    assert find_study(storage, None).study_name == "one"
    optuna.create_study(study_name="two", storage=url)
    with pytest.raises(StorageError, match="several studies; pick one with --study: one, two"):
        find_study(storage, None)
    with pytest.raises(StorageError, match="no study named 'three' in this storage; studies there: one, two"):
        find_study(storage, "three")
