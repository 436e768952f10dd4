"""Issue 7's search dimensions: dropout kind (element or channel), order against batch norm, schedule."""

from __future__ import annotations

import optuna
import pytest
import torch
from tiny import tiny_options

import autodrop
from autodrop.config import TrainConfig
from autodrop.errors import ModelError
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.sites import DropSite, apply_placement, iter_sites, site_slots
from autodrop.run.records import describe_placement, variants_from_params
from autodrop.run.space import (
    default_variants,
    placement_to_params,
    suggest_placement,
    suggest_variants,
    variant_choices,
)

SHAPE = ModelShape(1, 10, 16)


def test_a_channel_site_zeroes_whole_feature_maps():
    site = DropSite("c", "conv").train()
    site.p, site.dropout_kind = 0.5, "channel"
    out = site(torch.ones(64, 16, 6, 6))
    per_map = out.flatten(2)
    zero_maps = (per_map == 0).all(dim=2)
    assert zero_maps.float().mean().item() == pytest.approx(0.5, abs=0.08)
    assert ((per_map == 0).any(dim=2) == zero_maps).all(), "a map is either all zero or not zeroed at all"


def test_element_dropout_zeroes_single_activations():
    site = DropSite("c", "conv").train()
    site.p = 0.5
    per_map = site(torch.ones(64, 16, 6, 6)).flatten(2)
    assert ((per_map == 0).any(dim=2) & ~(per_map == 0).all(dim=2)).any()


def test_order_moves_the_active_dropout_before_batch_norm():
    model = build_model("simple-cnn", SHAPE)
    names = list(dict(model.named_children()))
    assert names.index("drop_conv1_before_bn") < names.index("bn1") < names.index("drop_conv1")
    assert site_slots(model)["conv1"] == ("after-act", "before-bn")
    assert "fc1" not in site_slots(model)
    apply_placement(model, {"conv1": 0.3}, {"conv1": {"slot": "before-bn"}})
    assert model.drop_conv1_before_bn.p == 0.3 and model.drop_conv1.p is None
    apply_placement(model, {"conv1": 0.3}, {"conv1": {"slot": "after-act"}})
    assert model.drop_conv1_before_bn.p is None and model.drop_conv1.p == 0.3


def test_channel_dropout_at_a_fully_connected_site_is_refused():
    model = build_model("simple-cnn", SHAPE)
    with pytest.raises(ModelError, match="cannot use dropout kind 'channel'"):
        apply_placement(model, {"fc1": 0.3}, {"fc1": {"dropout": "channel"}})


def test_kind_and_order_are_searched_only_for_sites_that_are_on_and_have_the_choice():
    model = build_model("simple-cnn", SHAPE)
    sites = {s: k for s, k in (("conv1", "conv"), ("conv2", "conv"), ("conv3", "conv"), ("fc1", "fc"), ("fc2", "fc"))}
    choices = variant_choices(sites, site_slots(model), ("element", "channel"), ("after-act", "before-bn"))
    assert set(choices) == {"conv1", "conv2", "conv3"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        placement = suggest_placement(trial, list(sites), (0.1, 0.5))
        variants = suggest_variants(trial, placement, choices)
        for site in sites:
            on = placement[site] is not None and site in choices
            assert (f"{site}.kind" in trial.params) == on and (f"{site}.order" in trial.params) == on
        assert variants_from_params(trial.params, list(sites)) == variants
        study.tell(trial, 0.5)


def test_switching_a_dimension_off_removes_its_parameter():
    model = build_model("simple-cnn", SHAPE)
    choices = variant_choices({"conv1": "conv"}, site_slots(model), ("element",), ("after-act",))
    assert choices == {}


def test_baselines_are_plain_dropout_in_the_usual_slot(tmp_path):
    options = tiny_options(tmp_path, trials=4)
    autodrop.search(**options)
    study = optuna.load_study(study_name="digits-simple-cnn", storage=options["storage"])
    everywhere = next(t for t in study.trials if t.user_attrs.get("baseline") == "everywhere-low")
    assert everywhere.params["conv1.kind"] == "element" and everywhere.params["conv1.order"] == "after-act"


def test_variants_round_trip_and_read_in_words():
    placement = {"conv1": 0.3, "fc1": None}
    variants = {"conv1": {"dropout": "channel", "slot": "before-bn"}}
    assert variants_from_params(placement_to_params(placement, variants), ["conv1", "fc1"]) == variants
    assert describe_placement(placement, variants) == "conv1 at 0.30 (channel, before-bn)"
    assert default_variants(placement, {"conv1": {"dropout": ("element", "channel"), "slot": ("after-act", "before-bn")}}) == {
        "conv1": {"dropout": "element", "slot": "after-act"}
    }


def test_early_schedule_switches_dropout_off_for_the_second_half():
    from autodrop.config import DataConfig
    from autodrop.training.data import load_data
    from autodrop.training.loop import train_trial
    from autodrop.training.normaliser import Normaliser

    data = load_data(DataConfig(source="digits", image_size=8, train_per_class=5))
    seen = []
    model = build_model("simple-cnn", ModelShape(1, 10, 8))
    apply_placement(model, {"fc1": 0.5})
    train_trial(model, data, Normaliser(data.train_images), TrainConfig(epochs=4, schedule="early"), seed=0,
                device=torch.device("cpu"),
                on_epoch=lambda m: seen.append([s.p for s in iter_sites(model) if s.site_name == "fc1"][0]))
    assert seen == [0.5, 0.5, None, None]
