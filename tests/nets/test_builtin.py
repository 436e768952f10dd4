"""Built-in models: the sites each declares, and that each fits the data it is given."""

from __future__ import annotations

import pytest
import torch

from autodrop.errors import ModelError
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.builtin import BUILTIN_MODELS
from autodrop.nets.sites import DropSite, apply_placement, iter_sites, site_kinds


def test_simple_cnn_declares_a_site_after_each_block_and_before_each_fc():
    model = build_model("simple-cnn", ModelShape(channels=1, n_classes=10, image_size=32))
    assert site_kinds(model) == {"conv1": "conv", "conv2": "conv", "conv3": "conv", "fc1": "fc", "fc2": "fc"}


def test_seed_cnn_declares_sites_after_each_stage_each_inner_conv_and_before_each_fc():
    model = build_model("seed-cnn", ModelShape(channels=3, n_classes=4, image_size=64))
    expected = {}
    for stage in range(1, 5):
        expected[f"stage{stage}"] = "conv"
        for inner in range(1, 4):
            expected[f"conv{stage}{inner}"] = "conv"
    expected.update({"fc1": "fc", "fc2": "fc"})
    assert site_kinds(model) == expected


def test_seed_cnn_outputs_log_probabilities():
    model = build_model("seed-cnn", ModelShape(channels=1, n_classes=5, image_size=64)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 64, 64))
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 32)])
def test_every_registered_model_gives_one_score_per_class(name, channels, size):
    model = build_model(name, ModelShape(channels=channels, n_classes=7, image_size=size)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ModelError, match="simple-cnn.*seed-cnn|seed-cnn.*simple-cnn"):
        build_model("resnet9000", ModelShape(1, 10, 32))


def test_every_site_starts_off_and_shows_its_rate():
    model = build_model("simple-cnn", ModelShape(1, 10, 16))
    assert all(site.p is None for site in iter_sites(model))
    apply_placement(model, {"fc1": 0.25})
    assert "p=0.25" in repr(model.drop_fc1) and "off" in repr(model.drop_conv1)


def test_site_off_is_identity_and_site_on_zeroes_about_its_rate():
    site = DropSite("x", "conv").train()
    x = torch.ones(200, 8, 8, 8)
    assert torch.equal(site(x), x)
    site.p = 0.3
    zeros = (site(x) == 0).float().mean().item()
    assert zeros == pytest.approx(0.3, abs=0.02)
    site.eval()
    assert torch.equal(site(x), x)  # dropout never acts at evaluation


def test_placement_with_an_unknown_site_or_bad_rate_is_refused():
    model = build_model("simple-cnn", ModelShape(1, 10, 16))
    with pytest.raises(ModelError, match="unknown sites"):
        apply_placement(model, {"conv9": 0.1})
    with pytest.raises(ModelError, match="rate in"):
        apply_placement(model, {"conv1": 1.5})


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_registered_model_packs_and_is_listed_in_the_help(name):
    from click.testing import CliRunner

    from autodrop.cli import main
    from autodrop.nets.packed import packing_problem

    assert packing_problem(build_model(name, ModelShape(channels=3, n_classes=5, image_size=32))) is None
    help_text = " ".join(CliRunner().invoke(main, ["search", "--help"]).output.split())
    assert name in help_text and " ".join(BUILTIN_MODELS[name].summary.split()) in help_text


def test_a_model_too_small_for_its_image_size_says_what_it_needs():
    with pytest.raises(ModelError, match="seed-cnn needs --image-size of at least 16, but got 8"):
        build_model("seed-cnn", ModelShape(1, 10, 8))
