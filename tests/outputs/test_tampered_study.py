"""A study is data, never code: each stored field given a hostile value, against every command that
reads a study. Nothing is executed (a marker file a payload would create never appears), nothing is
written outside the command's own folders, and a command that would use the value refuses it with
one line and exit code 2."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from autodrop.cli import main
from autodrop.run import records

COMMANDS = ("report", "report-html", "export", "confirm", "search")


def _evil_module(folder: Path, marker: Path) -> Path:
    """A .py file whose import, or whose model's construction, creates ``marker``."""
    path = folder / "evil.py"
    path.write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__()\n"
        f"        pathlib.Path({str(marker)!r}).write_text('built')\n"
        "        self.fc = torch.nn.Linear(256, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1))\n"
    )
    return path


def _set_setting(study, key, value):
    settings = dict(study.user_attrs[records.SETTINGS_KEY])
    settings[key] = value
    study.set_user_attr(records.SETTINGS_KEY, settings)


def _tamper(field: str, study, db: Path, tmp: Path, marker: Path) -> None:
    if field == "module-spec":  # a module and arguments that would run a shell command
        _set_setting(study, "model", "os:system")
        _set_setting(study, "model-args", {"command": f"touch {marker}"})
    elif field == "py-path":  # a .py file elsewhere whose import does something
        _set_setting(study, "model", f"{_evil_module(tmp, marker)}:Net")
    elif field == "checkpoint":  # a trial's checkpoint naming a file outside any checkpoint folder
        with sqlite3.connect(db) as connection:
            connection.execute(
                "INSERT OR REPLACE INTO trial_user_attributes (trial_id, key, value_json) "
                "SELECT trial_id, 'checkpoint', ? FROM trials WHERE number = 0",
                (f'"{tmp / "victim" / "authorized_keys"}"',))
    elif field == "artifact-dir":  # a weights folder that climbs out of anything autodrop made
        study.set_user_attr(records.ARTIFACT_DIR_KEY, "../../victim")
    elif field == "site-name":
        sites = dict(study.user_attrs[records.SITES_KEY])
        sites["x); import os; ("] = sites.pop("fc2")
        study.set_user_attr(records.SITES_KEY, sites)
    elif field == "rate":
        with sqlite3.connect(db) as connection:
            connection.execute(
                "UPDATE trial_params SET param_value = 5 WHERE param_name = 'fc1.p' AND trial_id = "
                "(SELECT trial_id FROM trials WHERE number = 1)")
    elif field == "data-path":  # a folder the user never named
        _set_setting(study, "data", str(tmp / "victim"))
    else:  # pragma: no cover
        raise AssertionError(field)


def _args(command: str, url: str, tmp: Path) -> list[str]:
    if command == "report":
        return ["report", "--storage", url]
    if command == "report-html":
        return ["report", "--storage", url, "--html", str(tmp / "out" / "r.html")]
    if command == "export":
        return ["export", "--storage", url, "--out", str(tmp / "out" / "w.py"), "--weights", str(tmp / "out" / "w.pt"),
                "--artifact-dir", str(tmp / "out" / "none-kept")]
    if command == "confirm":
        return ["confirm", "--storage", url, "--seeds", "2", "--top", "1", "--quiet"]
    # A colleague resuming the shared study with the settings they meant to use.
    return ["search", "--storage", url, "--study", "tiny", "--data", "digits", "--image-size", "16",
            "--train-per-class", "30", "--epochs", "2", "--batch-size", "64", "--trials", "7", "--pruner", "none",
            "--quiet"]


# Commands that never use the field may answer (exit 0): the text report shows the stored model's
# name but never imports it, the page draws only the sites of a model it is not told to trust, and
# a study's stored data path is shown, never read.
HARMLESS = {("module-spec", "report"), ("module-spec", "report-html"), ("py-path", "report"),
            ("py-path", "report-html"), ("data-path", "report"), ("data-path", "report-html")}
# A trial holding a value autodrop does not write is left out, with a warning, and the rest of the
# study still answers: one edited trial must not take a shared study down.
LEFT_OUT = {"checkpoint", "rate"}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("field", ["module-spec", "py-path", "checkpoint", "artifact-dir", "site-name", "rate",
                                   "data-path"])
def test_a_tampered_study_runs_nothing_writes_nothing_and_is_refused_where_used(tiny_study, tmp_path, monkeypatch,
                                                                                field, command):
    copy = tiny_study.copy_to(tmp_path / "study")
    (tmp_path / "out").mkdir()
    marker = tmp_path / "marker"
    _tamper(field, copy.load(), copy.db, tmp_path, marker)
    monkeypatch.chdir(tmp_path / "out")  # the command's own folder
    before = {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts[:1]}
    result = CliRunner().invoke(main, _args(command, copy.url, tmp_path))
    assert not marker.exists(), f"{field} made {command} run its payload"
    assert not (tmp_path / "victim").exists()
    after = {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts[:1]}
    own = {copy.db.with_name("study.db-journal")}
    if command == "search":  # a search that goes on keeps weights in its own folder beside the database
        own |= {copy.folder / "study-artifacts", *(copy.folder / "study-artifacts").rglob("*")}
    assert after - before <= own, sorted(map(str, after - before))
    if (field, command) in HARMLESS:
        assert result.exit_code in (0, 2), result.output
    elif field in LEFT_OUT:
        assert "are left out" in result.output, result.output[-2000:]
        # Confirm needs the no-dropout baseline, which is the trial edited for "checkpoint".
        assert result.exit_code == (2 if (field, command) == ("checkpoint", "confirm") else 0), result.output[-2000:]
    else:
        lines = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2, (field, command, result.output[-2000:])
        assert len(lines) == 1, result.output


def test_naming_the_users_model_again_is_what_lets_export_import_it(tmp_path, monkeypatch):
    import autodrop

    marker = tmp_path / "marker"
    model = _evil_module(tmp_path, marker)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    autodrop.search(data="digits", image_size=16, train_per_class=10, epochs=1, batch_size=64, trials=1,
                    pruner="none", model=f"{model}:Net", storage=storage, study="mine")
    marker.unlink()
    refused = CliRunner().invoke(main, ["export", "--storage", storage, "--out", str(tmp_path / "w.py")])
    assert refused.exit_code == 2 and "name the model again with --model" in refused.output and not marker.exists()
    assert f"--model {model}" not in refused.output  # a stored spec is never offered as a command to copy
    other = CliRunner().invoke(main, ["export", "--storage", storage, "--out", str(tmp_path / "w.py"),
                                      "--model", str(tmp_path / "other.py") + ":Net"])
    assert other.exit_code == 2 and "records the model" in other.output and not marker.exists()
    named = CliRunner().invoke(main, ["export", "--storage", storage, "--out", str(tmp_path / "w.py"),
                                      "--model", f"{model}:Net"])
    assert named.exit_code == 0, named.output
    assert marker.exists()  # the user named it: autodrop imported it, as the user asked


def test_an_absolute_recorded_weights_folder_is_never_written_or_read(tiny_study, tmp_path, monkeypatch):
    copy = tiny_study.copy_to(tmp_path / "study")
    elsewhere = tmp_path / "elsewhere"
    copy.load().set_user_attr(records.ARTIFACT_DIR_KEY, str(elsewhere))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "--storage", copy.url, "--out", str(tmp_path / "w.py"),
                                       "--weights", str(tmp_path / "w.pt")])
    # No weights beside the copied database: the recorded folder is named, never looked in.
    assert result.exit_code == 2 and str(elsewhere) in result.output and "--artifact-dir" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not elsewhere.exists()
    retrained = CliRunner().invoke(main, ["export", "--storage", copy.url, "--out", str(tmp_path / "w.py"),
                                          "--weights", str(tmp_path / "w.pt"), "--artifact-dir", str(tmp_path / "none")])
    assert retrained.exit_code == 0 and "retrained" in retrained.output, retrained.output
    assert not elsewhere.exists()
    assert os.path.getsize(tmp_path / "w.pt") > 0


def test_weights_kept_in_a_folder_moved_since_are_used_from_the_artifact_dir_given(tiny_study, tmp_path,
                                                                                    monkeypatch):
    import shutil

    copy = tiny_study.copy_to(tmp_path / "study")
    moved = tmp_path / "moved-weights"
    shutil.copytree(tiny_study.artifact_dir, moved)  # the search kept them beside the original database
    monkeypatch.chdir(tmp_path)
    out = ["export", "--storage", copy.url, "--out", str(tmp_path / "w.py"), "--weights", str(tmp_path / "w.pt")]
    refused = CliRunner().invoke(main, out)
    assert refused.exit_code == 2 and str(tiny_study.artifact_dir) in refused.output, refused.output
    used = CliRunner().invoke(main, [*out, "--artifact-dir", str(moved)])
    assert used.exit_code == 0 and "retrained" not in used.output, used.output
    for kept in moved.rglob("*"):  # another file under the kept one's id: its digest gives it away
        if kept.is_file():
            kept.write_bytes(kept.read_bytes()[:-1] + b"x")
    tampered = CliRunner().invoke(main, [*out, "--artifact-dir", str(moved)])
    assert tampered.exit_code == 2 and "digest differs" in tampered.output, tampered.output


def test_an_uploaded_file_named_like_weights_is_never_taken_for_a_trials_weights(tiny_study, tmp_path, monkeypatch):
    """optuna-dashboard lets anyone who reaches it upload artifacts; export trusts only the artifact
    whose id and digest the search recorded with the trial."""
    import json
    import shutil

    import torch

    copy = tiny_study.copy_to(tmp_path / "study")
    shutil.copytree(tiny_study.artifact_dir, copy.folder / "study-artifacts")
    study = copy.load()
    trial = next(t for t in study.trials if records.WEIGHTS in t.user_attrs)
    with sqlite3.connect(copy.db) as connection:  # as if the search had kept none for this trial
        connection.execute("DELETE FROM trial_user_attributes WHERE key = 'weights' AND trial_id = "
                           "(SELECT trial_id FROM trials WHERE number = ?)", (trial.number,))
    # What the dashboard's upload leaves: a file in the store and its description on the trial.
    artifact_id = "0123456789abcdef0123456789abcdef"
    torch.save({"planted": torch.zeros(1)}, copy.folder / "study-artifacts" / artifact_id)
    meta = {"artifact_id": artifact_id, "filename": f"trial-{trial.number}-weights.pt",
            "mimetype": "application/octet-stream", "encoding": None}
    with sqlite3.connect(copy.db) as connection:
        connection.execute(
            "INSERT INTO trial_system_attributes (trial_id, key, value_json) SELECT trial_id, ?, ? FROM trials "
            "WHERE number = ?", (f"artifacts:{artifact_id}", json.dumps(meta), trial.number))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "--storage", copy.url, "--trial", str(trial.number), "--out",
                                       str(tmp_path / "w.py"), "--weights", str(tmp_path / "w.pt")])
    assert result.exit_code == 0, result.output
    assert "retrained it with its seed" in result.output  # the uploaded file was not used
    assert "planted" not in torch.load(tmp_path / "w.pt", weights_only=True)


GOOD_CANDIDATE = {"label": "none", "trial": 0, "baseline": "none", "description": "no dropout",
                  "seeds": [900_000_000, 900_000_001], "accuracies": [0.5, 0.6], "gaps": [0.0, 0.1], "mean": 0.55,
                  "ci_low": 0.4, "ci_high": 0.7, "mean_gap": 0.05}
GOOD_CONFIRMATION = {"seeds": [900_000_000, 900_000_001], "candidates": [GOOD_CANDIDATE], "comparison": None,
                     "against_best_baseline": None, "stopped": "fixed", "verdict": "a verdict"}


@pytest.mark.parametrize("confirmation", [
    {"candidates": 5},
    {**GOOD_CONFIRMATION, "candidates": [{**GOOD_CANDIDATE, "seeds": [5, 2**80]}]},
    {**GOOD_CONFIRMATION, "candidates": [{**GOOD_CANDIDATE, "ci_low": "x"}]},
    {**GOOD_CONFIRMATION, "comparison": {"winner": 1}},
    {**GOOD_CONFIRMATION, "verdict": None},
])
def test_a_confirmation_autodrop_does_not_write_is_left_out_and_the_report_answers(tiny_study, tmp_path,
                                                                                   confirmation):
    copy = tiny_study.copy_to(tmp_path / "study")
    copy.load().set_user_attr(records.CONFIRMATION_KEY, confirmation)
    result = CliRunner().invoke(main, ["report", "--storage", copy.url])
    assert result.exit_code == 0, result.output
    assert "confirmation autodrop confirm does not write" in result.output and "Confirmation (" not in result.output
    copy.load().set_user_attr(records.CONFIRMATION_KEY, GOOD_CONFIRMATION)  # what confirm writes is shown
    shown = CliRunner().invoke(main, ["report", "--storage", copy.url])
    assert shown.exit_code == 0 and "Confirmation (2 fresh seeds" in shown.output, shown.output


@pytest.mark.parametrize("by_seed", [{"5": [0.5, 0.0]}, {"٩٠٠٠٠٠٠٠٠": [0.5, 0.0]}, {"0900000000": [0.5, 0.0]},
                                     {str(10**30): [0.5, 0.0]}])
def test_confirmation_runs_under_seeds_confirm_never_uses_are_refused(tiny_study, tmp_path, by_seed):
    from autodrop.errors import StorageError

    study = tiny_study.copy_to(tmp_path / "study").load()
    study.set_user_attr(records.CONFIRMATION_RUNS_KEY, {"none": by_seed})
    with pytest.raises(StorageError, match="confirmation runs"):
        records.read_confirmation_runs(study)


def test_a_storage_that_fails_while_it_is_read_is_a_one_line_error(tiny_study, tmp_path, monkeypatch):
    import optuna
    import sqlalchemy.exc

    copy = tiny_study.copy_to(tmp_path / "study")

    def connection_dropped(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT ...", {"secret": 1}, Exception("server closed the connection"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "get_study_user_attrs", connection_dropped)
    for args in (["report", "--storage", copy.url],
                 ["export", "--storage", copy.url, "--out", str(tmp_path / "w.py")],
                 ["confirm", "--storage", copy.url, "--seeds", "2", "--quiet"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: the study's storage failed while it was read: ")
        assert "server closed the connection" in result.output
        assert len(result.output.strip().splitlines()) == 1 and "secret" not in result.output


def test_stored_text_reaches_the_terminal_without_control_characters(tiny_study, tmp_path):
    copy = tiny_study.copy_to(tmp_path / "study")
    study = copy.load()
    data = dict(study.user_attrs[records.DATA_KEY], name="digits\x1b[2J\x1b[31m\rall good\u202e")
    study.set_user_attr(records.DATA_KEY, data)
    study.set_user_attr(records.CONFIRMATION_KEY, {**GOOD_CONFIRMATION, "verdict": "\x1b]0;owned\x07\rfine",
                                                   "candidates": [{**GOOD_CANDIDATE, "description": "\x1b[1A"}]})
    with sqlite3.connect(copy.db) as connection:
        connection.execute("UPDATE studies SET study_name = ?", ("tiny\x1b[2K\r",))
    for args in (["report", "--storage", copy.url],
                 ["export", "--storage", copy.url, "--out", str(tmp_path / "w.py"), "--trial", "99"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code in (0, 2), result.output
        assert not any(c in result.output for c in "\x1b\r\x07\u202e"), repr(result.output[-500:])
    report = CliRunner().invoke(main, ["report", "--storage", copy.url])
    assert "all good" in report.output and "fine" in report.output


def test_a_users_model_gets_only_the_arguments_the_user_gives_again(tmp_path):
    import autodrop

    marker = tmp_path / "marker"
    model = f"{_evil_module(tmp_path, marker)}:Net"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    autodrop.search(data="digits", image_size=16, train_per_class=10, epochs=1, batch_size=64, trials=1,
                    pruner="none", model=model, model_args={"width": 4}, storage=storage, study="mine")
    marker.unlink()
    export = ["export", "--storage", storage, "--out", str(tmp_path / "w.py"), "--model", model]
    for given in ([], ["--model-arg", "width=5"], ["--model-arg", "width=true"]):
        refused = CliRunner().invoke(main, [*export, *given])
        assert refused.exit_code == 2 and "records the model arguments 'width=4'" in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and not marker.exists()
    # Someone adds an argument to the stored ones: the user's own --model-arg no longer matches them.
    study = optuna.load_study(study_name="mine", storage=storage)
    _set_setting(study, "model-args", {"width": 4, "path": "/home/u/.ssh/id_rsa"})
    for command in (export, ["report", "--storage", storage, "--html", str(tmp_path / "r.html"), "--model", model]):
        refused = CliRunner().invoke(main, [*command, "--model-arg", "width=4"])
        assert refused.exit_code == 2 and "--model-arg" in refused.output, refused.output
        assert not marker.exists()
    _set_setting(study, "model-args", {"width": 4})
    named = CliRunner().invoke(main, [*export, "--model-arg", "width=4"])
    assert named.exit_code == 0, named.output
    assert marker.exists()  # the user named the model and its arguments: autodrop built it, as asked
