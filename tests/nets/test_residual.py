"""Residual networks: the branch drop, the built-in wide ResNet, and packing its blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autodrop.errors import ModelError
from autodrop.nets.build import ModelShape, build_model, check_model
from autodrop.nets.packed import PackedBranchDrop, PackedNet, packing_problem
from autodrop.nets.residual import Residual
from autodrop.nets.sites import BranchDrop, apply_placement, branch_sites, iter_sites, site_kinds


def _block(drop: BranchDrop) -> Residual:
    torch.manual_seed(0)
    pre = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    return Residual(pre, branch, None, drop)


def test_branch_drop_at_rate_0_leaves_the_block_unchanged_and_at_rate_1_leaves_the_shortcut():
    drop = BranchDrop("b")
    block = _block(drop).train()
    x = torch.randn(8, 4, 6, 6)
    torch.manual_seed(1)
    plain = block(x)
    drop.p = 0.0
    torch.manual_seed(1)
    assert torch.equal(block(x), plain)
    drop.p = 1.0
    assert torch.equal(block(x), x)  # every branch dropped: the block passes its shortcut


def test_branch_drop_is_per_image_scaled_in_training_and_the_identity_in_eval():
    drop = BranchDrop("b")
    drop.p = 0.5
    x = torch.rand(400, 3, 4, 4) + 0.5
    torch.manual_seed(2)
    out = drop.train()(x)
    dropped = (out == 0).flatten(1).all(dim=1)
    kept = torch.isclose(out, 2 * x).flatten(1).all(dim=1)
    assert bool((dropped ^ kept).all())  # each image wholly dropped, or kept and scaled by 1 / (1 - p)
    assert 0.4 < dropped.float().mean() < 0.6  # masks differ across the batch, about half dropped
    assert torch.equal(drop.eval()(x), x)


def test_the_branch_kind_switches_the_branch_drop_on_instead_of_the_site_after_the_block():
    model = build_model("wrn", ModelShape(1, 10, 16))
    assert branch_sites(model) == {"block1.1", "block2.1", "block3.1"}
    apply_placement(model, {"block2.1": 0.3}, {"block2.1": {"dropout": "branch"}})
    active = {(type(s).__name__, s.site_name) for s in iter_sites(model) if s.p is not None}
    assert active == {("BranchDrop", "block2.1")}
    apply_placement(model, {"block2.1": 0.3})
    active = {(type(s).__name__, s.site_name) for s in iter_sites(model) if s.p is not None}
    assert active == {("DropSite", "block2.1")}
    with pytest.raises(ModelError, match="cannot use dropout kind 'branch'"):
        apply_placement(model, {"fc": 0.3}, {"fc": {"dropout": "branch"}})


def test_the_builtin_wide_resnet_takes_depth_and_width():
    small = build_model("wrn", ModelShape(3, 10, 32))
    deeper = build_model("wrn", ModelShape(3, 10, 32), model_args={"depth": 16, "width": 1})
    assert list(site_kinds(small)) == ["in:stage1:conv1", "block1.1", "in:stage2:conv1", "block2.1",
                                       "in:stage3:conv1", "block3.1", "fc"]
    assert [s for s in site_kinds(deeper) if s.startswith("block")] == [
        "block1.1", "block1.2", "block2.1", "block2.2", "block3.1", "block3.2"]
    assert deeper.fc.in_features == 64 and small.fc.in_features == 128
    assert sum(s.site_name == "in:stage2:conv1" for s in iter_sites(deeper)) == 2
    with pytest.raises(ModelError, match="depth of 'wrn' .* must be one of 10, 16, 22, 28, 40, but got 12"):
        check_model("wrn", {"depth": 12})
    with pytest.raises(ModelError, match="takes depth, width, but got --model-arg dropout"):
        check_model("wrn", {"dropout": 1})
    with pytest.raises(ModelError, match="takes none"):
        check_model("simple-cnn", {"width": 2})


def test_in_block_sites_of_one_stage_act_in_that_stage_only():
    model = build_model("wrn", ModelShape(1, 10, 16), model_args={"depth": 16})
    apply_placement(model, {"in:stage2:conv1": 0.4})
    on = [path for path, m in model.named_modules() if getattr(m, "p", None) is not None and hasattr(m, "site_name")]
    assert on == ["block2_1.branch.drop", "block2_2.branch.drop"]


@pytest.mark.parametrize("in_block", ["per-stage", "per-call"])
def test_packed_wide_resnets_equal_the_separate_ones(in_block: str) -> None:
    shape = ModelShape(3, 5, 16)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("wrn", shape, model_args={"depth": 16, "width": 1}, in_block=in_block)
        for module in model.modules():  # non-trivial batch-norm state, so eval mode tests it
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        members.append(model)
    assert packing_problem(members[0]) is None
    packed = PackedNet(members).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = packed(x)
        for k, model in enumerate(members):
            torch.testing.assert_close(out[k], model.eval()(x), atol=1e-5, rtol=1e-5)
    # Each member's weights come back out under its own names.
    restored = packed.unpack(1, build_model("wrn", shape, model_args={"depth": 16, "width": 1}, in_block=in_block))
    for key, value in members[1].state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_packed_branch_drop_gives_each_member_its_own_rate_and_images():
    shape = ModelShape(1, 4, 16)
    members = [build_model("wrn", shape, model_args={"width": 1}) for _ in range(3)]
    apply_placement(members[0], {"block2.1": 0.5}, {"block2.1": {"dropout": "branch"}})
    apply_placement(members[2], {"block2.1": 0.2}, {"block2.1": {"dropout": "branch"}})
    packed = PackedNet(members).train()
    drop = next(m for m in packed.modules() if isinstance(m, PackedBranchDrop) and m.site_name == "block2.1")
    assert drop.rates == [0.5, 0.0, 0.2]
    x = torch.rand(2000, 3 * 32, 2, 2) + 0.5
    torch.manual_seed(0)
    out = drop(x).view(2000, 3, 32, 2, 2)
    dropped = (out == 0).flatten(2).all(dim=2).float().mean(dim=0)  # share of images dropped, per member
    torch.testing.assert_close(dropped, torch.tensor([0.5, 0.0, 0.2]), atol=0.04, rtol=0)
    kept0 = out[:, 0][(out[:, 0] != 0).flatten(1).all(dim=1)]
    torch.testing.assert_close(kept0, 2 * x.view(2000, 3, 32, 2, 2)[:, 0][(out[:, 0] != 0).flatten(1).all(dim=1)])
    # copy_sites_to gives each member back its own branch rate.
    fresh = build_model("wrn", shape, model_args={"width": 1})
    packed.copy_sites_to(2, fresh)
    assert [(type(s).__name__, s.site_name, s.p) for s in iter_sites(fresh) if s.p] == [
        ("BranchDrop", "block2.1", 0.2)]
