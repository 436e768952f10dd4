"""The search space: placements to and from trial parameters, and the baseline recipes."""

from __future__ import annotations

import optuna
import pytest
import torch

from autodrop.errors import StorageError
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.sites import apply_placement, iter_sites
from autodrop.run.records import describe_placement, placement_from_params
from autodrop.run.space import baseline_placements, placement_to_params, suggest_placement

SITES = {"conv1": "conv", "conv2": "conv", "fc1": "fc"}


def test_suggested_placement_has_a_rate_exactly_for_the_sites_that_are_on():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        placement = suggest_placement(trial, list(SITES), (0.1, 0.4))
        for site, rate in placement.items():
            assert trial.params[site] == ("off" if rate is None else "on")
            if rate is None:
                assert f"{site}.p" not in trial.params
            else:
                assert 0.1 <= rate <= 0.4 and trial.params[f"{site}.p"] == rate
        study.tell(trial, 0.5)


def test_off_sites_leave_the_forward_pass_untouched_and_on_sites_apply_the_sampled_rate():
    model = build_model("simple-cnn", ModelShape(1, 10, 16)).train()
    x = torch.randn(8, 1, 16, 16)
    apply_placement(model, {s: None for s in ("conv1", "conv2", "conv3", "fc1", "fc2")})
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x)), "with every site off, the random seed must not matter"
    apply_placement(model, {"fc2": 0.6})
    rates = {site.site_name: site.p for site in iter_sites(model)}
    assert rates == {"conv1": None, "conv2": None, "conv3": None, "fc1": None, "fc2": 0.6}
    torch.manual_seed(1)
    assert not torch.equal(first, model(x))


def test_params_round_trip_to_the_same_placement():
    placement = {"conv1": None, "conv2": 0.33, "fc1": 0.5}
    assert placement_from_params(placement_to_params(placement), list(SITES)) == placement


def test_tampered_params_are_refused():
    with pytest.raises(StorageError, match="conv2"):
        placement_from_params({"conv1": "off", "conv2": "on", "conv2.p": 3.0, "fc1": "off"}, list(SITES))
    with pytest.raises(StorageError):
        placement_from_params({"conv1": "maybe"}, list(SITES))


def test_baselines_follow_the_usual_recipes():
    baselines = dict(baseline_placements(SITES, (0.05, 0.7)))
    assert baselines["none"] == {"conv1": None, "conv2": None, "fc1": None}
    assert baselines["head"] == {"conv1": None, "conv2": None, "fc1": 0.5}
    assert baselines["everywhere-low"] == {"conv1": 0.1, "conv2": 0.1, "fc1": 0.1}
    assert baselines["conv-only"] == {"conv1": 0.2, "conv2": 0.2, "fc1": None}
    assert list(baselines)[0] == "none"


def test_baseline_rates_are_clipped_into_the_searched_range():
    baselines = dict(baseline_placements(SITES, (0.2, 0.4)))
    assert baselines["head"]["fc1"] == 0.4 and baselines["everywhere-low"]["conv1"] == 0.2


def test_a_recipe_with_nothing_to_act_on_is_left_out():
    names = [name for name, _ in baseline_placements({"conv1": "conv"}, (0.05, 0.7))]
    assert names == ["none", "everywhere-low", "conv-only"]


def test_placement_in_words():
    assert describe_placement({"a": None}) == "no dropout"
    assert describe_placement({"a": 0.3, "b": None, "c": 0.512}) == "a at 0.30, c at 0.51"
