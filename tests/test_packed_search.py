"""The search with several trials packed into one network (--pack K): every member a normal trial."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState

import autodrop
from autodrop.cli import main
from autodrop.config import DataConfig
from autodrop.data import load_data
from autodrop.packed import auto_pack_size
from autodrop.study import FINISHED_STATES

from tiny import tiny_options

USER_MODELS = Path(__file__).resolve().parent / "user_models.py"


def _trials(options: dict) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"]).trials


def test_packed_search_ends_with_exactly_n_trials_each_reported_every_epoch(tmp_path):
    options = tiny_options(tmp_path, trials=7, epochs=2, pack=3, kinds="element,channel")
    result = autodrop.search(**options)
    trials = _trials(options)
    assert result.n_finished == 7 and len(trials) == 7
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)
    assert [b.baseline for b in result.baselines] == ["none", "head", "everywhere-low", "conv-only"]
    for t in trials:
        for key in ("train_accuracy", "val_loss", "gap", "seed", "worker"):
            assert key in t.user_attrs, (t.number, key)
    # Members are separate trials with their own parameters, each trained as its own network.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 7
    assert all(t.value > 0.3 for t in trials)


def test_packed_trial_is_pruned_alone_and_its_slot_goes_to_the_next_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 4)
    options = tiny_options(tmp_path, trials=7, epochs=3, pack=3)
    autodrop.search(**options)
    trials = _trials(options)
    assert [t.state for t in trials].count(TrialState.PRUNED) == 1
    pruned = trials[4]
    assert pruned.state == TrialState.PRUNED and sorted(pruned.intermediate_values) == [1]
    assert "pruned_reason" in pruned.user_attrs
    others = [t for t in trials if t.number != 4]
    assert all(t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == [1, 2, 3] for t in others)
    # Packs of three: trials 0-2, then 3-5. Trial 6 took pruned trial 4's slot as soon as it was
    # freed, while trials 3 and 5 were still training.
    assert trials[4].datetime_complete <= trials[6].datetime_start < trials[3].datetime_complete


def test_a_member_given_up_for_stale_is_left_to_others_and_the_pack_goes_on(tmp_path, monkeypatch):
    real_report = optuna.trial.Trial.report

    def report(self, value, step):
        if self.number == 3 and step == 1:  # another worker took this member for dead just now
            self.storage.set_trial_state_values(self._trial_id, state=TrialState.FAIL)
        return real_report(self, value, step)

    monkeypatch.setattr(optuna.trial.Trial, "report", report)
    options = tiny_options(tmp_path, trials=5, epochs=2, pack=2)
    result = autodrop.search(**options)
    trials = _trials(options)
    assert trials[3].state == TrialState.FAIL and sorted(trials[3].intermediate_values) == []
    assert result.n_finished == 5 and sum(t.state in FINISHED_STATES for t in trials) == 5


def test_packed_winner_exports_with_the_weights_it_was_measured_with(tmp_path):
    options = tiny_options(tmp_path, trials=5, epochs=2, pack=5)
    autodrop.search(**options)
    best = optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"]).best_trial
    out, weights = tmp_path / "winner.py", tmp_path / "winner.pt"
    exported = autodrop.export_model(storage=options["storage"], out=out, weights=weights)
    assert exported.weights_from == "stored" and exported.trial == best.number
    spec = importlib.util.spec_from_file_location("winner", out)
    winner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(winner)
    model = getattr(winner, exported.class_name)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=30))
    with torch.no_grad():
        predicted = model.eval()(winner.normalise(data.val_images)).argmax(dim=1)
    correct = int((predicted == data.val_labels).sum())
    # The packed member and the separate network differ only in float rounding: at most one
    # image of 360 may land on the other side of a tie.
    assert abs(correct - round(best.value * len(data.val_labels))) <= 1


def test_pack_on_a_model_that_cannot_be_packed_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, [
        "search", "--data", "digits", "--image-size", "16", "--model", f"{USER_MODELS}:ResidualNet",
        "--pack", "2", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--quiet",
    ])
    assert result.exit_code == 2
    assert result.output.startswith("Error: --pack 2: this model's trials cannot be packed (")
    assert "use --pack 1" in result.output and "Traceback" not in result.output


def test_pack_must_be_positive(tmp_path):
    result = CliRunner().invoke(main, ["search", "--data", "digits", "--pack", "0"])
    assert result.exit_code == 2 and "--pack" in result.output
    with pytest.raises(autodrop.AutodropError, match="--pack must be at least 1, but got 0"):
        autodrop.search(**tiny_options(tmp_path, pack=0))


def test_automatic_pack_size_packs_on_gpus_only_and_splits_among_workers():
    assert auto_pack_size(torch.device("cpu"), 100) == 1
    assert auto_pack_size(torch.device("cuda"), 100) == 8
    assert auto_pack_size(torch.device("cuda"), 100, n_workers=2) == 4
    assert auto_pack_size(torch.device("cuda"), 3) == 3  # never more members than trials
    assert auto_pack_size(torch.device("cuda"), 100, n_workers=16) == 1


@pytest.mark.slow
def test_packed_early_schedule_and_variants_run_end_to_end(tmp_path):
    options = tiny_options(tmp_path, trials=6, epochs=2, pack=2, schedule="early", model="seed-cnn", image_size=16)
    result = autodrop.search(**options)
    study = optuna.load_study(study_name="digits-seed-cnn", storage=options["storage"])
    assert result.n_finished == 6
    assert all(t.state in FINISHED_STATES for t in study.trials)
