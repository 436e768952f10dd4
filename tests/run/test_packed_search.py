"""The search with several trials packed into one network (--pack K): every member a normal trial."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState
from tiny import tiny_options

import autodrop
from autodrop.cli import main
from autodrop.config import DataConfig
from autodrop.run.study import FINISHED_STATES
from autodrop.training.data import load_data
from autodrop.training.packed import auto_pack_size

USER_MODELS = Path(__file__).resolve().parents[1] / "user_models.py"


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


def test_an_error_in_the_pack_requeues_the_members_and_fails_only_its_cause(tmp_path, monkeypatch):
    from autodrop.run.trials import StudyTrials

    real_set_up = StudyTrials.set_up

    def set_up(self, trial):
        if trial.number == 6:
            raise RuntimeError("bad setup of trial 6")
        return real_set_up(self, trial)

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 4)
    monkeypatch.setattr(StudyTrials, "set_up", set_up)
    options = tiny_options(tmp_path, trials=8, epochs=3, pack=3)
    with pytest.raises(RuntimeError, match="bad setup of trial 6"):
        autodrop.search(**options)
    trials = _trials(options)
    assert trials[6].state == TrialState.FAIL and "bad setup" in trials[6].user_attrs["fail_reason"]
    # Trials 3 (a baseline) and 5 were training beside it: they go back to the queue, not to FAIL for good.
    for number in (3, 5):
        assert trials[number].state == TrialState.FAIL
        assert trials[number].user_attrs["fail_reason"].startswith("its pack stopped on RuntimeError")
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == number)
        assert retry.state == TrialState.WAITING and retry.params == trials[number].params
        assert retry.intermediate_values == {}  # a packed member starts over: no steps inherited
    monkeypatch.undo()
    result = autodrop.search(**options)
    assert result.n_finished == 8
    assert {b.baseline for b in result.baselines if b.state == "complete"} == {"none", "head", "everywhere-low",
                                                                               "conv-only"}


def test_a_member_taken_for_dead_inside_tell_is_told_once_and_the_pack_goes_on(tmp_path, monkeypatch):
    real_tell = optuna.Study.tell
    raced = []

    def tell(self, trial, *args, **kwargs):
        number = trial.number if hasattr(trial, "number") else trial
        if number == 1 and not raced:  # another worker fails it between the check and the write
            raced.append(number)
            self._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            raise optuna.exceptions.UpdateFinishedTrialError("Trial#1 has already finished")
        return real_tell(self, trial, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "tell", tell)
    options = tiny_options(tmp_path, trials=5, epochs=2, pack=2)
    result = autodrop.search(**options)
    trials = _trials(options)
    assert raced == [1] and trials[1].state == TrialState.FAIL
    assert result.n_finished == 5


def test_workers_share_a_gpus_automatic_pack_and_an_unpackable_model_is_not_packed():
    from autodrop.config import SearchConfig
    from autodrop.errors import AutodropWarning
    from autodrop.run.search import worker_pack_sizes

    one_gpu, two_gpus = [torch.device("cuda:0")] * 2, [torch.device("cuda:0"), torch.device("cuda:1")]
    assert worker_pack_sizes(SearchConfig(trials=100), one_gpu, None) == [4, 4]
    assert worker_pack_sizes(SearchConfig(trials=100), two_gpus, None) == [8, 8]
    assert worker_pack_sizes(SearchConfig(trials=100, pack=3), one_gpu, "a reason") == [3, 3]
    assert worker_pack_sizes(SearchConfig(trials=100), [torch.device("cpu")] * 2, "a reason") == [1, 1]
    with pytest.warns(AutodropWarning, match="cannot be packed \\(a reason\\)"):
        assert worker_pack_sizes(SearchConfig(trials=100), one_gpu, "a reason") == [1, 1]


def test_packed_search_with_the_full_recipe_trains_every_member_as_a_trial(tmp_path):
    options = tiny_options(tmp_path, trials=4, epochs=2, pack=2, optimizer="sgd", augment="flip,crop,cutout",
                           weight_decay=5e-4, lr_schedule="cosine", label_smoothing=0.1)
    result = autodrop.search(**options)
    trials = _trials(options)
    assert result.n_finished == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)
    assert "flip+crop+cutout" in result.recipe and "SGD" in result.recipe
    assert max(t.value for t in trials) > 0.3  # ten classes, two short epochs of a strong recipe: learning
