"""The search space: placements to and from trial parameters, and the baseline recipes."""

from __future__ import annotations

import optuna
import pytest
import torch

from autodrop.errors import StorageError
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.sites import apply_placement, iter_sites
from autodrop.run.records import describe_placement, placement_from_params
from autodrop.run.space import (
    baseline_placements,
    baseline_variants,
    placement_to_params,
    stochastic_depth_rates,
    suggest_placement,
    suggest_variants,
    variant_choices,
)

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


RESIDUAL_SITES = {"in:stage1:conv1": "conv", "block1.1": "conv", "block1.2": "conv", "in:stage2:conv1": "conv",
                  "block2.1": "conv", "block2.2": "conv", "fc": "fc"}
BRANCHES = {"block1.1", "block1.2", "block2.1", "block2.2"}


def test_residual_networks_get_the_wrn_and_stochastic_depth_recipes():
    baselines = dict(baseline_placements(RESIDUAL_SITES, (0.01, 0.7), branches=BRANCHES))
    assert list(baselines) == ["none", "head", "everywhere-low", "conv-only", "wrn", "stochastic-depth"]
    # wrn: 0.3 between the two convolutions of every block, nowhere else.
    assert {s: r for s, r in baselines["wrn"].items() if r} == {"in:stage1:conv1": 0.3, "in:stage2:conv1": 0.3}
    # stochastic depth: rising linearly with depth, block by block, to 0.1 at the last block.
    assert {s: r for s, r in baselines["stochastic-depth"].items() if r} == pytest.approx(
        {"block1.1": 0.025, "block1.2": 0.05, "block2.1": 0.075, "block2.2": 0.1})
    assert stochastic_depth_rates(16)[-1] == pytest.approx(0.2) and stochastic_depth_rates(8)[-1] == pytest.approx(0.1)
    # Clipped into the searched range like the others.
    clipped = dict(baseline_placements(RESIDUAL_SITES, (0.05, 0.7), branches=BRANCHES))["stochastic-depth"]
    assert clipped["block1.1"] == 0.05 and clipped["block2.2"] == pytest.approx(0.1)


def test_the_literature_recipes_need_their_sites():
    names = [name for name, _ in baseline_placements(SITES, (0.05, 0.7), branches=set())]
    assert "wrn" not in names and "stochastic-depth" not in names


def test_stochastic_depth_asks_for_the_branch_kind_and_is_left_out_when_it_is_not_searched():
    placement = dict(baseline_placements(RESIDUAL_SITES, (0.01, 0.7), branches=BRANCHES))["stochastic-depth"]
    with_branch = variant_choices(RESIDUAL_SITES, {}, ("element", "channel", "branch"), ("after-act",),
                                  branches=BRANCHES)
    assert with_branch["block1.1"]["dropout"] == ("element", "channel", "branch")
    assert with_branch["in:stage1:conv1"]["dropout"] == ("element", "channel")  # not after a sum
    variants = baseline_variants("stochastic-depth", placement, with_branch)
    assert variants == {site: {"dropout": "branch"} for site in BRANCHES}
    without = variant_choices(RESIDUAL_SITES, {}, ("element", "channel"), ("after-act",), branches=BRANCHES)
    assert baseline_variants("stochastic-depth", placement, without) is None
    wrn = dict(baseline_placements(RESIDUAL_SITES, (0.01, 0.7), branches=BRANCHES))["wrn"]
    assert baseline_variants("wrn", wrn, with_branch) == {
        "in:stage1:conv1": {"dropout": "element"}, "in:stage2:conv1": {"dropout": "element"}}


def test_a_branch_kind_asks_for_no_slot():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    choices = {"block1.1": {"dropout": ("element", "branch"), "slot": ("after-act", "before-bn")}}
    seen = set()
    for _ in range(30):
        trial = study.ask()
        variants = suggest_variants(trial, {"block1.1": 0.2}, choices)
        seen.add(variants["block1.1"]["dropout"])
        assert ("slot" in variants["block1.1"]) == (variants["block1.1"]["dropout"] != "branch")
        study.tell(trial, 0.5)
    assert seen == {"element", "branch"}
