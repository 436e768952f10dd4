"""Packed trials: K members trained as one network, each equal to the model it stands for."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import DataConfig, TrainConfig
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.packed import PackedNet, packing_problem
from autodrop.nets.sites import DropSite, apply_placement, iter_sites
from autodrop.training.data import load_data
from autodrop.training.loop import Member
from autodrop.training.normaliser import Normaliser
from autodrop.training.optim import PackedOptimizer
from autodrop.training.packed import PackTrainer


def _members(name: str, shape: ModelShape, k: int) -> list[nn.Sequential]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = build_model(name, shape)
        for module in model.modules():  # non-trivial batch-norm state, so eval mode tests it
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.normal_()
                module.bias.data.normal_()
        models.append(model)
    return models


@pytest.mark.parametrize("name", ["simple-cnn", "seed-cnn"])
def test_packed_eval_outputs_equal_separate_models(name: str) -> None:
    shape = ModelShape(3, 5, 16)
    members = _members(name, shape, 3)
    packed = PackedNet(members).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out = packed(x)
        assert out.shape == (3, 6, 5)
        for k, model in enumerate(members):
            torch.testing.assert_close(out[k], model.eval()(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x.contiguous(memory_format=torch.channels_last)), out, atol=1e-5, rtol=1e-5)


def test_unpacked_member_has_its_own_weights() -> None:
    shape = ModelShape(1, 4, 16)
    members = _members("simple-cnn", shape, 3)
    packed = PackedNet(members)
    restored = packed.unpack(2, build_model("simple-cnn", shape))
    for key, value in members[2].state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_packed_gradients_are_each_members_own() -> None:
    shape = ModelShape(1, 4, 16)
    members = _members("simple-cnn", shape, 3)
    packed = PackedNet(members).train()
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 4, (16,))
    out = packed(x)
    F.cross_entropy(out.reshape(-1, 4), y.repeat(3), reduction="none").view(3, -1).mean(1).sum().backward()
    packed_grads = {name: p.grad for name, p in packed.named_parameters()}
    for k, model in enumerate(members):
        model.train()
        F.cross_entropy(model(x), y).backward()
        for key in packed._keys:
            if key.packed_key in packed_grads:
                member_grad = packed_grads[key.packed_key].view(3, -1)[k]
                own = dict(model.named_parameters())[key.member_key].grad.reshape(-1)
                torch.testing.assert_close(member_grad, own, atol=1e-5, rtol=1e-4, msg=f"{k} {key.member_key}")


def test_packed_adam_gives_each_member_the_update_of_its_own_adam() -> None:
    torch.manual_seed(0)
    k, shapes = 3, [(3 * 8, 4, 3, 3), (3 * 8,), (3, 5, 7)]
    packed = [torch.randn(s).requires_grad_() for s in shapes]
    optimizer = PackedOptimizer(packed, k, TrainConfig(lr=1e-2))
    # Member m of each packed tensor, as a separate tensor with its own torch Adam.
    separate = [[p.detach().view(k, -1)[m].clone().requires_grad_() for p in packed] for m in range(k)]
    references = [torch.optim.Adam(params, lr=1e-2, foreach=False) for params in separate]
    # Member 1 is older: three steps alone first, then its moments and step are copied into the pack.
    for _ in range(3):
        for p in separate[1]:
            p.grad = torch.randn(p.shape)
        references[1].step()
    for i, p in enumerate(separate[1]):
        state = references[1].state[p]
        packed[i].data.view(k, -1)[1] = p.detach()
        optimizer.state[0][i].view(k, -1)[1] = state["exp_avg"]
        optimizer.state[1][i].view(k, -1)[1] = state["exp_avg_sq"]
    optimizer.set_step(1, 3)
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        optimizer.zero_grad()
        for p, g in zip(packed, grads):
            p.grad = g
        optimizer.step()
        for m in range(k):
            for p, g in zip(separate[m], grads):
                p.grad = g.view(k, -1)[m].clone()
            references[m].step()
    assert optimizer.steps == [4, 7, 4]
    for m in range(k):
        for p, own in zip(packed, separate[m]):
            torch.testing.assert_close(p.detach().view(k, -1)[m], own.detach(), atol=1e-6, rtol=1e-5)


def test_each_member_drops_at_its_own_rates() -> None:
    shape = ModelShape(1, 4, 16)
    members = _members("simple-cnn", shape, 3)
    apply_placement(members[0], {"conv1": 0.5, "fc2": 0.0})
    apply_placement(members[1], {"conv1": None, "fc2": 0.8})
    apply_placement(members[2], {"conv1": 0.2, "fc2": 0.3})
    packed = PackedNet(members).train()
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, inputs, output):
            seen[name] = ((output == 0) & (inputs[0] != 0), inputs[0] != 0)
        return hook

    layers = dict(zip([n for n, _ in members[0].named_children()], packed.layers))
    layers["drop_conv1"].register_forward_hook(grab("conv1"))
    layers["drop_fc2"].register_forward_hook(grab("fc2"))
    torch.manual_seed(0)
    packed(torch.randn(256, 1, 16, 16))
    # Share of the non-zero inputs that came out zero, per member.
    dropped, live = (t.reshape(256, 3, -1).float().sum(dim=(0, 2)) for t in seen["conv1"])
    conv_dropped = dropped / live
    dropped, live = (t.float().sum(dim=(1, 2)) for t in seen["fc2"])  # (K, N, 256) features
    fc_dropped = dropped / live
    torch.testing.assert_close(conv_dropped, torch.tensor([0.5, 0.0, 0.2]), atol=0.03, rtol=0)
    torch.testing.assert_close(fc_dropped, torch.tensor([0.0, 0.8, 0.3]), atol=0.03, rtol=0)
    assert packed.placement(1) == {"conv1": None, "conv2": None, "conv3": None, "fc1": None, "fc2": 0.8}


def test_unsupported_layers_are_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LSTM(4, 4))
    assert "LSTM" in packing_problem(model)
    assert packing_problem(nn.Sequential(nn.Conv2d(1, 4, 3, groups=1), DropSite("a", "conv"), nn.Flatten(),
                                         nn.Linear(4, 2))) is None
    assert "Sequential" in packing_problem(nn.Module())


def _trainer(k: int) -> tuple[PackTrainer, list[nn.Module]]:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=10))
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    trainer = PackTrainer(data, Normaliser(data.train_images), TrainConfig(epochs=2, batch_size=32),
                          device=torch.device("cpu"), seed=0, build=lambda: build_model("simple-cnn", shape))
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model("simple-cnn", shape))
    return trainer, models


def _placed(model: nn.Module, rates: dict, variants: dict | None = None) -> nn.Module:
    apply_placement(model, rates, variants)
    return model


def test_replaced_slot_starts_fresh_and_repack_keeps_the_others() -> None:
    trainer, models = _trainer(5)
    trainer.set_members([Member(f"t{i}", _placed(m, {"fc1": 0.1 * i or None}), seed=i) for i, m in enumerate(models[:3])])
    losses = trainer.train_epoch()
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    trainer.update(["t1"], [Member("t3", _placed(models[3], {"conv2": 0.4}), seed=3)])  # same count: in place
    assert trainer.optimizer.steps[1] == 0 and trainer.optimizer.steps[0] > 0
    assert trainer.epoch_of("t3") == 0 and trainer.epoch_of("t0") == 1
    fresh = trainer.net.member_state_dict(1)
    for key, value in models[3].state_dict().items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(fresh[key], value)
    before = trainer.net.member_state_dict(2)
    steps_before = trainer.optimizer.steps[2]
    moments_before = [m.view(3, -1)[2].clone() for m in trainer.optimizer.state[0]]
    trainer.update(["t0"], [])  # shrinks: a repack that keeps the others' state
    assert len(trainer) == 2 and trainer.tags == ["t3", "t2"] and trainer.net.k == 2
    after = trainer.net.member_state_dict(1)
    for key, value in before.items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(after[key], value)
    assert trainer.optimizer.steps == [0, steps_before]
    for old, new in zip(moments_before, trainer.optimizer.state[0]):
        torch.testing.assert_close(new.view(2, -1)[1], old)
    assert trainer.net.placement(1)["fc1"] == pytest.approx(0.2)
    assert trainer.net.placement(0)["conv2"] == pytest.approx(0.4)
    trainer.update([], [Member("t4", _placed(models[4], {"fc2": 0.3}), seed=4)])  # grows: the newcomer starts fresh
    assert trainer.tags == ["t3", "t2", "t4"] and trainer.optimizer.steps == [0, steps_before, 0]
    assert trainer.net.placement(2)["fc2"] == pytest.approx(0.3)
    for key, value in before.items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(trainer.net.member_state_dict(1)[key], value)
    metrics = trainer.epoch_metrics(trainer.train_epoch())
    assert [m.epoch for m in metrics] == [1, 2, 1]


def test_members_keep_their_own_slot_and_dropout_kind() -> None:
    shape = ModelShape(1, 4, 16)
    members = _members("simple-cnn", shape, 3)
    _placed(members[0], {"conv1": 0.5}, {"conv1": {"dropout": "channel"}})
    _placed(members[1], {"conv1": 0.5}, {"conv1": {"dropout": "element", "slot": "before-bn"}})
    _placed(members[2], {"conv1": 0.5})
    packed = PackedNet(members).train()
    layers = dict(zip([n for n, _ in members[0].named_children()], packed.layers))
    seen = {}
    for name in ("drop_conv1_before_bn", "drop_conv1"):
        layers[name].register_forward_hook(lambda module, inputs, output, name=name: seen.__setitem__(name, output))
    x = torch.rand(64, 1, 16, 16) + 0.1
    torch.manual_seed(0)
    packed(x)
    after_act = seen["drop_conv1"].reshape(64, 3, 32, -1)
    before_bn = seen["drop_conv1_before_bn"].reshape(64, 3, 32, -1)
    for member in (0, 2):
        packed.silence(member)
    packed(x)  # the same maps without dropout: some are dark already (ReLU)
    live = ~(seen["drop_conv1"].reshape(64, 3, 32, -1) == 0).all(dim=-1)
    dark = (after_act == 0).all(dim=-1)
    # Member 0 drops whole maps: about half of the live maps go wholly dark.
    assert 0.4 < dark[:, 0][live[:, 0]].float().mean() < 0.6
    # Member 2 drops single pixels after the activation: hardly any live map goes wholly dark.
    assert dark[:, 2][live[:, 2]].float().mean() < 0.02
    # Member 1 drops in the slot before batch norm (inputs there are conv outputs, rarely exactly 0).
    assert 0.45 < (before_bn[:, 1] == 0).float().mean() < 0.55
    assert (before_bn[:, [0, 2]] == 0).float().mean() < 0.01
    assert packed.placement(1) == {"conv1": 0.5, "conv2": None, "conv3": None, "fc1": None, "fc2": None}
    packed.copy_sites_from(0, members[0])
    restored = build_model("simple-cnn", shape)
    packed.copy_sites_to(0, restored)
    assert [(s.site_name, s.slot, s.p, s.dropout_kind) for s in iter_sites(restored) if s.p] == [
        ("conv1", "after-act", 0.5, "channel")
    ]


def test_early_schedule_switches_each_member_off_after_its_own_half() -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=5))
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    trainer = PackTrainer(data, Normaliser(data.train_images), TrainConfig(epochs=4, batch_size=32, schedule="early"),
                          device=torch.device("cpu"), seed=0, build=lambda: build_model("simple-cnn", shape))
    models = [_placed(build_model("simple-cnn", shape), {"fc1": 0.5}) for _ in range(2)]
    trainer.set_members([Member("a", models[0], seed=0)])
    trainer.train_epoch()
    trainer.update([], [Member("b", models[1], seed=1)])
    trainer.train_epoch()  # a: epoch 2 of 4, still with dropout
    assert trainer.net.placement(0)["fc1"] == pytest.approx(0.5)
    trainer.train_epoch()  # a: epoch 3, past its half; b: epoch 2
    assert trainer.net.placement(0)["fc1"] is None and trainer.net.placement(1)["fc1"] == pytest.approx(0.5)


def test_a_diverging_member_leaves_the_others_finite() -> None:
    trainer, models = _trainer(3)
    with torch.no_grad():
        models[1].fc2.weight.fill_(float("nan"))
    trainer.set_members([Member(i, m, seed=i) for i, m in enumerate(models)])
    losses = trainer.train_epoch()
    assert math.isnan(losses[1]) and math.isfinite(losses[0]) and math.isfinite(losses[2])


def test_finish_returns_the_member_as_its_own_model() -> None:
    trainer, models = _trainer(2)
    trainer.set_members([Member("a", _placed(models[0], {"fc1": 0.3}), seed=0), Member("b", models[1], seed=1)])
    last = trainer.epoch_metrics(trainer.train_epoch())
    metrics, model = trainer.finish("b", last[1])
    for key, value in trainer.net.member_state_dict(1).items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert metrics.val_accuracy == last[1].val_accuracy and 0.0 <= metrics.train_accuracy <= 1.0
    assert all(site.p is None for site in iter_sites(model))


@pytest.mark.slow
def test_packed_maps_are_channels_last_from_a_one_channel_input() -> None:
    # Slow kernels follow from plain layout: the first packed conv must already give channels-last maps.
    packed = PackedNet(_members("simple-cnn", ModelShape(1, 4, 16), 2))
    x = torch.randn(4, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    maps = packed.layers[0](x)
    assert maps.shape[1] == 64 and maps.is_contiguous(memory_format=torch.channels_last)

