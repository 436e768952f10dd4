"""Site discovery in users' networks: which sites, named how, and that each acts only where it is."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from autodrop.config import DataConfig, TrainConfig, parse_model_spec
from autodrop.errors import AutodropWarning, ModelError
from autodrop.nets.build import ModelShape, build_model, describe_model_sites
from autodrop.nets.discovery import Discovery, ReplacedDropout, discovery_of, insert_sites
from autodrop.nets.sites import BranchDrop, apply_placement, branch_sites, iter_sites, site_kinds
from autodrop.nets.user import build_user_model
from autodrop.training.data import load_data
from autodrop.training.loop import train_trial
from autodrop.training.normaliser import Normaliser

ROOT = Path(__file__).resolve().parents[2]
FORUM = f"{ROOT / 'studies' / 'forum_net.py'}:Net"
USER = ROOT / "tests" / "user_models.py"
RESIDUAL = f"{USER}:ResidualNet"
BRANCHY = f"{USER}:BranchyNet"

FORUM_SITES = [
    "after:conv1", "after:conv11#1", "after:conv11#2", "after:conv11#3",
    "after:conv2", "after:conv21#1", "after:conv21#2", "after:conv21#3",
    "after:conv3", "after:conv31#1", "after:conv31#2", "after:conv31#3",
    "after:conv4", "after:conv41#1", "after:conv41#2", "after:conv41#3",
    "dropout#1", "dropout#2",
]
RESIDUAL_SITES = {"after:stem": "conv", "after:conv_a": "conv", "after:add": "conv", "F.dropout": "fc"}
RESNET18_SITES = [
    "after:conv1", "in:layer1:conv1", "after:layer1.0", "after:layer1.1", "in:layer2:conv1", "after:layer2.0",
    "after:layer2.1", "in:layer3:conv1", "after:layer3.0", "after:layer3.1", "in:layer4:conv1", "after:layer4.0",
    "after:layer4.1", "before:fc",
]
RESNET18_BRANCHES = {f"after:layer{stage}.{block}" for stage in (1, 2, 3, 4) for block in (0, 1)}
WIDE_RESNET50_SITES = (
    ["after:conv1"]
    + [site for stage, blocks in ((1, 3), (2, 4), (3, 6), (4, 3))
       for site in [f"in:layer{stage}:conv1", f"in:layer{stage}:conv2"]
       + [f"after:layer{stage}.{block}" for block in range(blocks)]]
    + ["before:fc"]
)
WRN = f"{USER}:WideResNet"
WRN16_SITES = [
    "in:block1.layer:conv1", "after:block1", "in:block2.layer:conv1", "after:block2",
    "in:block3.layer:conv1", "after:block3", "before:fc",
]


def _build(spec: str, shape: ModelShape, **model_args):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutodropWarning)
        return build_model(spec, shape, model_args=model_args)


def test_forum_network_gets_a_site_per_call_of_its_reused_layers():
    model = _build(FORUM, ModelShape(1, 10, 16), width=4)
    kinds = site_kinds(model)
    assert list(kinds) == FORUM_SITES
    assert {kinds[name] for name in FORUM_SITES[:16]} == {"conv"}
    assert kinds["dropout#1"] == kinds["dropout#2"] == "fc"
    assert discovery_of(model).method == "fx"


def test_forum_sites_say_what_they_follow_and_which_dropout_they_replace():
    found = describe_model_sites(FORUM, ModelShape(3, 10, 64))
    by_name = {site.name: site for site in found.sites}
    assert by_name["after:conv1"].follows == "conv1 > pool#1 > F.relu > bn1"
    assert by_name["after:conv1"].shape == (8, 32, 32)
    assert by_name["after:conv21#2"].follows == "conv21#2 > F.relu"
    assert by_name["after:conv41#3"].shape == (64, 4, 4)
    assert by_name["dropout#1"].follows == ".view()"
    assert by_name["dropout#1"].existing == "Dropout(p=0.25)"
    assert by_name["dropout#1"].shape == (1024,)
    assert by_name["after:conv1"].existing is None


def test_residual_network_with_functional_activations_is_traced():
    model = _build(RESIDUAL, ModelShape(1, 10, 16))
    assert site_kinds(model) == RESIDUAL_SITES
    found = discovery_of(model)
    follows = {site.name: site.follows for site in found.sites}
    assert follows["after:stem"] == "stem > bn > F.relu > F.max_pool2d"
    assert follows["after:conv_a"] == "conv_a > torch.relu"
    assert follows["after:add"] == "add > F.relu"
    assert found.sites[-1].existing == "F.dropout(p=0.2)"


@pytest.mark.slow
def test_resnet18_gets_a_site_per_block_one_inside_each_stage_and_one_before_fc():
    model = _build("torchvision:resnet18", ModelShape(1, 10, 16))
    kinds = site_kinds(model)
    assert list(kinds) == RESNET18_SITES
    assert kinds["before:fc"] == "fc" and kinds["after:layer2.1"] == "conv" and kinds["in:layer3:conv1"] == "conv"
    assert branch_sites(model) == RESNET18_BRANCHES
    # One in-block site per stage stands in every block of it, between its two convolutions.
    tied = [site for site in iter_sites(model) if site.site_name == "in:layer2:conv1"]
    assert len(tied) == 2 and all(site.tied for site in tied)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10


@pytest.mark.slow
def test_in_block_sites_per_call_or_none():
    per_call = site_kinds(build_model("torchvision:resnet18", ModelShape(1, 10, 16), in_block="per-call"))
    assert [s for s in per_call if s.startswith("in:")] == [
        f"in:layer{stage}.{block}:conv1" for stage in (1, 2, 3, 4) for block in (0, 1)]
    off = site_kinds(build_model("torchvision:resnet18", ModelShape(1, 10, 16), in_block="off"))
    assert not any(s.startswith("in:") for s in off) and len(off) == 10


@pytest.mark.slow
def test_wide_resnet50_gets_two_in_block_sites_per_stage_and_a_branch_drop_per_block():
    model = _build("torchvision:wide_resnet50_2", ModelShape(3, 10, 32))
    assert list(site_kinds(model)) == WIDE_RESNET50_SITES
    assert branch_sites(model) == {s for s in WIDE_RESNET50_SITES if s.startswith("after:layer")}


def test_a_hand_written_wide_resnet_gets_its_in_block_sites_and_branch_drops():
    model = _build(WRN, ModelShape(1, 10, 16), depth=16)
    assert list(site_kinds(model)) == WRN16_SITES
    # Its stages are a class of their own, repeated: the site after each stage (and its branch drop,
    # on the stage's last block) stands for the stage; in-block sites are per stage of WideBasic blocks.
    assert branch_sites(model) == {"after:block1", "after:block2", "after:block3"}
    assert sum(site.site_name == "in:block2.layer:conv1" for site in iter_sites(model)) == 2
    # Where the blocks have a dropout of their own, it is the in-block site.
    with_dropout = site_kinds(_build(WRN, ModelShape(1, 10, 16), drop_rate=0.3))
    assert [s for s in with_dropout if "dropout" in s] == ["F.dropout#1", "F.dropout#2", "F.dropout#3"]
    assert not any(s.startswith("in:") for s in with_dropout)


def test_untraceable_network_falls_back_to_hooks_and_says_so():
    parsed = parse_model_spec(BRANCHY)
    built = build_user_model(parsed, {}, channels=1, n_classes=10, image_size=16)
    with pytest.warns(AutodropWarning, match="torch.fx could not trace .*module hooks"):
        model = insert_sites(built.module, torch.randn(2, 1, 16, 16), label=parsed.label)
    found = discovery_of(model)
    assert found.method == "hooks" and "control flow" in found.note
    # conv1's block ends in the model's own Dropout2d, which is the site there.
    assert site_kinds(model) == {"drop": "conv", "after:conv2": "conv", "before:fc": "fc"}
    drop = next(site for site in iter_sites(model) if site.site_name == "drop")
    assert isinstance(drop, ReplacedDropout) and drop.function == "dropout2d"


def _site_records(model: torch.nn.Module, x: torch.Tensor, seed: int = 0):
    """Run ``model`` in train mode; return its output and (site, is a branch drop, input, output)
    per site call."""
    records = []
    handles = [
        site.register_forward_hook(
            lambda module, args, out: records.append(
                (module.site_name, isinstance(module, BranchDrop), args[0].detach().clone(), out.detach().clone()))
        )
        for site in iter_sites(model)
    ]
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    return out, records


@pytest.mark.parametrize(
    "spec, shape, args",
    [
        (FORUM, ModelShape(1, 10, 16), {"width": 4}),
        (RESIDUAL, ModelShape(1, 10, 16), {}),
        pytest.param("torchvision:resnet18", ModelShape(1, 10, 16), {}, marks=pytest.mark.slow),
        (WRN, ModelShape(1, 10, 16), {"depth": 16}),
        (BRANCHY, ModelShape(1, 10, 16), {}),
    ],
    ids=["forum", "residual", "resnet18", "wrn", "hooks"],
)
def test_turning_one_site_on_changes_the_forward_pass_only_there(spec, shape, args):
    model = _build(spec, shape, **args)
    x = torch.randn(4, shape.channels, shape.image_size, shape.image_size, generator=torch.Generator().manual_seed(1))
    apply_placement(model, {})
    base_out, base = _site_records(model, x)
    names = [name for name, _, _, _ in base]
    # Each site runs in forward order: once, or once per block of its stage (an in-block site).
    assert list(dict.fromkeys(names)) == list(site_kinds(model))
    branches = branch_sites(model)
    for site_name in site_kinds(model):
        for kind in ("element", "branch") if site_name in branches else ("element",):
            apply_placement(model, {site_name: 0.5}, {site_name: {"dropout": kind}})
            out, records = _site_records(model, x)
            assert [name for name, _, _, _ in records] == names
            at = names.index(site_name)
            for i, ((name, branch, inp, outp), (_, _, base_inp, _)) in enumerate(zip(records, base)):
                if i <= at:  # nothing upstream of the site (nor its own input) changes
                    assert torch.equal(inp, base_inp), f"{site_name} on changed the input of {name}"
                if name == site_name and branch == (kind == "branch"):  # every copy of it drops
                    assert not torch.equal(outp, inp), f"{site_name} ({kind}) on did not drop anything"
                else:
                    assert torch.equal(outp, inp), f"{name} acted while only {site_name} ({kind}) was on"
            assert not torch.equal(out, base_out), f"{site_name} on did not change the output"


@pytest.mark.parametrize("spec, args", [(FORUM, {}), (RESIDUAL, {}), (WRN, {"depth": 16}), (BRANCHY, {})],
                         ids=["forum", "residual", "wrn", "hooks"])
def test_all_sites_off_computes_exactly_what_the_users_network_does(spec, args):
    parsed = parse_model_spec(spec)
    torch.manual_seed(0)
    built = build_user_model(parsed, args, channels=1, n_classes=10, image_size=16)
    original = copy.deepcopy(built.module).eval()
    example = torch.randn(2, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutodropWarning)
        model = insert_sites(built.module, example, label=parsed.label)
    model.eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    # The weights keep the names they have in the user's network, so its state dict loads as is.
    assert set(model.state_dict()) <= set(original.state_dict())


def test_building_a_user_network_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    _build(RESIDUAL, ModelShape(1, 10, 16))  # first build: probes and traces
    torch.manual_seed(7)
    first = build_model(RESIDUAL, ModelShape(1, 10, 16))
    after_first = torch.rand(1)
    torch.manual_seed(7)
    plain = build_user_model(parse_model_spec(RESIDUAL), {}, channels=1, n_classes=10, image_size=16).module
    after_plain = torch.rand(1)
    # Same weights as the network built without sites, and the same random stream after it.
    assert torch.equal(first.stem.weight, plain.stem.weight)
    assert torch.equal(after_first, after_plain)


def test_later_builds_reuse_the_sites_found_first():
    shape = ModelShape(1, 10, 16)
    first = _build(RESIDUAL, shape, width=4)
    second = _build(RESIDUAL, shape, width=4)
    assert discovery_of(second) == discovery_of(first)
    assert second is not first and second.stem is not first.stem


def test_a_repeated_block_is_one_site_and_its_inner_dropout_stays_searchable():
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv1 = nn.Conv2d(width, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return F.relu(self.conv2(self.drop(F.relu(self.conv1(x)))) + x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.blocks = nn.Sequential(Block(4), Block(4))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = self.blocks(F.relu(self.stem(x)))
            return self.head(x.mean((2, 3)))

    model = insert_sites(Net(), torch.randn(2, 1, 8, 8), label="Net")
    assert list(site_kinds(model)) == [
        "after:stem", "blocks.0.drop", "after:blocks.0", "blocks.1.drop", "after:blocks.1", "before:head",
    ]


def test_network_without_candidates_is_refused():
    with pytest.raises(ModelError, match="no candidate drop sites"):
        _build(f"{USER}:LinearOnly", ModelShape(1, 10, 16))


def test_untraceable_network_using_view_is_refused_with_advice():
    with pytest.raises(ModelError, match="channels-last.*reshape"):
        _build(f"{USER}:BranchyViewNet", ModelShape(1, 10, 16))


def test_traced_view_on_feature_maps_trains_in_channels_last():
    # The forum network flattens with .view(); autodrop trains in channels-last layout.
    model = _build(FORUM, ModelShape(1, 10, 16), width=4).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)


def test_log_probability_output_trains_like_raw_scores():
    """cross_entropy(log_softmax(z)) equals cross_entropy(z): no double softmax for log-prob models."""
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=20))
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    config = TrainConfig(epochs=3, batch_size=32, lr=5e-3, device="cpu")
    results = []
    for log_probs in (True, False):
        torch.manual_seed(0)
        model = build_model(f"{USER}:LogProbNet", shape, model_args={"log_probs": log_probs})
        results.append(
            train_trial(model, data, Normaliser(data.train_images), config, seed=0, device=torch.device("cpu"))
        )
    with_log_probs, raw = results
    assert with_log_probs.val_accuracy == pytest.approx(raw.val_accuracy, abs=1e-9)
    assert with_log_probs.train_loss == pytest.approx(raw.train_loss, rel=1e-4)
    assert with_log_probs.val_accuracy > 0.5  # it learned (10 classes: chance is 0.1)


def test_discovery_records_method_and_sites():
    found = describe_model_sites(RESIDUAL, ModelShape(1, 10, 16))
    assert isinstance(found, Discovery)
    assert [site.name for site in found.sites] == list(RESIDUAL_SITES)
    assert found.note is None
