"""The default pruner's rule on hand-made curves: behind by more than the noise, and late enough."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from autodrop.errors import ConfigError
from autodrop.run.noise import binomial_variance, chance_lead, curve_wobble, spread_within_noise
from autodrop.run.pruning import NoisePruner, default_min_epoch, make_pruner

N_VAL = 360


def _study_with(curves: list[dict[int, float]]) -> optuna.Study:
    """An in-memory study whose completed trials have these learning curves."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for curve in curves:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=curve[max(curve)], params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)}, intermediate_values=curve,
        ))
    return study


def _running(curve: dict[int, float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=TrialState.RUNNING, params={"x": 0.5},
                                     distributions={"x": FloatDistribution(0, 1)}, intermediate_values=curve)


# Smooth curves that end at 90%: epoch-to-epoch wobble is negligible, so the binomial noise rules.
REFERENCE = [{1: 0.70, 2: 0.80, 3: 0.85, 4: 0.90 + d} for d in (-0.002, 0.0, 0.0, 0.001, 0.002)]


def _noise_gap() -> float:
    return 2.0 * math.sqrt(2 * binomial_variance(0.85, N_VAL))


def test_a_trial_behind_by_less_than_the_noise_is_kept_and_by_more_is_pruned():
    pruner = NoisePruner(N_VAL, min_epoch=3)
    study = _study_with(REFERENCE)
    gap = _noise_gap()  # about 5.3 points at 85% on 360 images
    assert not pruner.prune(study, _running({1: 0.6, 2: 0.7, 3: 0.85 - 0.6 * gap}))
    assert pruner.prune(study, _running({1: 0.6, 2: 0.7, 3: 0.85 - 1.4 * gap}))


def test_nothing_is_pruned_before_the_warm_up_however_far_behind():
    pruner = NoisePruner(N_VAL, min_epoch=3)
    study = _study_with(REFERENCE)
    assert not pruner.prune(study, _running({1: 0.10}))
    assert not pruner.prune(study, _running({1: 0.10, 2: 0.10}))
    assert pruner.prune(study, _running({1: 0.10, 2: 0.10, 3: 0.10}))


def test_nothing_is_pruned_until_enough_trials_completed_that_epoch():
    pruner = NoisePruner(N_VAL, min_epoch=1, n_startup_trials=4)
    assert not pruner.prune(_study_with(REFERENCE[:3]), _running({1: 0.1}))
    assert pruner.prune(_study_with(REFERENCE[:4]), _running({1: 0.1}))


def test_a_trial_is_judged_by_its_best_epoch_so_far():
    pruner = NoisePruner(N_VAL, min_epoch=3)
    study = _study_with(REFERENCE)
    # Good at epoch 2, a dip at epoch 3: one bad reading does not stop it.
    assert not pruner.prune(study, _running({1: 0.7, 2: 0.86, 3: 0.6}))


def test_curves_that_wobble_widen_the_margin():
    wobbly = [{1: 0.7, 2: 0.8, 3: 0.85 + d, 4: 0.9 - d} for d in (-0.08, 0.08, -0.06, 0.06, 0.0)]
    trial = _running({1: 0.6, 2: 0.7, 3: 0.85 - 1.4 * _noise_gap()})
    assert curve_wobble([t.intermediate_values for t in _study_with(wobbly).trials], 3) > 0.05
    assert NoisePruner(N_VAL, min_epoch=3).prune(_study_with(REFERENCE), trial)
    assert not NoisePruner(N_VAL, min_epoch=3).prune(_study_with(wobbly), trial)


def test_default_warm_up_is_two_thirds_of_the_epochs_and_never_the_last():
    assert [default_min_epoch(e) for e in (1, 2, 3, 4, 6, 9, 12)] == [1, 1, 2, 3, 4, 6, 8]


def test_make_pruner_knows_every_name_and_refuses_others():
    assert isinstance(make_pruner("noise", 6, n_val=100), NoisePruner)
    assert make_pruner("noise", 6, n_val=100).min_epoch == 4
    median = make_pruner("median", 8, n_val=100)
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_warmup_steps == 2
    assert isinstance(make_pruner("hyperband", 8, n_val=100), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none", 8, n_val=100), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match="but got 'sometimes'"):
        make_pruner("sometimes", 8, n_val=100)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_val=0, min_epoch=1), "n_val=0"), (dict(n_val=10, min_epoch=0), "min_epoch=0"),
    (dict(n_val=10, min_epoch=1, quantile=1.0), "quantile=1.0"), (dict(n_val=10, min_epoch=1, z=-1.0), "z=-1.0"),
])
def test_bad_pruner_settings_show_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoisePruner(**kwargs)


def test_the_best_of_more_runs_leads_further_by_luck():
    assert chance_lead(1) == pytest.approx(1.645 * math.sqrt(2), abs=0.01)
    leads = [chance_lead(n) for n in (1, 5, 20, 50)]
    assert leads == sorted(leads) and 3.5 < chance_lead(20) < 4.0


def test_a_spread_like_one_placements_is_within_noise_and_a_wide_one_is_not():
    import numpy as np

    rng = np.random.default_rng(0)
    noise = math.sqrt(binomial_variance(0.9, N_VAL))
    same = list(rng.normal(0.9, noise, 25))
    assert spread_within_noise(same, noise)
    assert not spread_within_noise(same[:20] + [0.6, 0.7, 0.75], noise)
