"""The training recipe: augmentation, weight decay, optimisers and learning-rate schedules, in both loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import DataConfig, TrainConfig
from autodrop.nets.build import ModelShape, build_model
from autodrop.nets.packed import PackedNet, packing_problem
from autodrop.nets.sites import apply_placement
from autodrop.training.augment import BatchAugment
from autodrop.training.data import ImageData, load_data
from autodrop.training.loop import Member, TrialTrainer, batches_per_epoch, evaluate
from autodrop.training.normaliser import Normaliser
from autodrop.training.optim import (
    SGD,
    Adam,
    PackedOptimizer,
    lr_factor,
    make_optimizer,
)
from autodrop.training.packed import PackTrainer

CPU = torch.device("cpu")
FULL_RECIPE = dict(augment=("flip", "crop", "cutout"), weight_decay=5e-4, lr_schedule="cosine", label_smoothing=0.1)


def _planted(n: int = 64, size: int = 16) -> torch.Tensor:
    """Images with one bright pixel each at a known place, on a dim left-to-right ramp (so a flip shows)."""
    ramp = torch.arange(size, dtype=torch.uint8).view(1, 1, 1, size).expand(n, 3, size, size).clone()
    ramp[:, :, 8, 6] = 255
    return ramp


# --- augmentation ------------------------------------------------------------------------------


def test_flip_mirrors_some_images_and_leaves_the_others() -> None:
    batch = _planted()
    before = batch.clone()
    out = BatchAugment(("flip",), 16, seed=0)(batch)
    assert torch.equal(batch, before)  # not changed in place
    mirrored = torch.tensor([torch.equal(o, b.flip(-1)) for o, b in zip(out, batch)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, batch)])
    assert bool((mirrored ^ kept).all())  # each image is one or the other
    assert 16 < int(mirrored.sum()) < 48  # about half mirrored


def test_crop_translates_by_at_most_the_padding_with_a_black_border() -> None:
    batch = _planted()
    aug = BatchAugment(("crop",), 16, seed=1)
    out = aug(batch)
    assert aug.pad == 2 and out.shape == batch.shape and out.dtype == torch.uint8
    shifts = set()
    for image in out:
        rows, cols = torch.nonzero(image[0] == 255, as_tuple=True)
        assert len(rows) == 1  # the bright pixel moved, never lost (it is inside by more than the padding)
        dy, dx = int(rows[0]) - 8, int(cols[0]) - 6
        assert abs(dy) <= aug.pad and abs(dx) <= aug.pad
        shifts.add((dy, dx))
        # The whole image moved with it: where the source is inside, the pixels are the source's.
        source = _planted(1)[0]
        for r in range(16):
            for c in range(16):
                r0, c0 = r - dy, c - dx
                expected = source[0, r0, c0] if 0 <= r0 < 16 and 0 <= c0 < 16 else 0
                assert int(image[0, r, c]) == int(expected)
    assert len(shifts) > 5  # images get their own shifts


def test_cutout_blacks_out_one_square_per_image_and_nothing_else() -> None:
    batch = torch.full((32, 1, 16, 16), 200, dtype=torch.uint8)
    out = BatchAugment(("cutout",), 16, seed=2)(batch)
    assert int(batch.min()) == 200
    for image in out[:, 0]:
        dark = torch.nonzero(image == 0)
        assert set(image.unique().tolist()) <= {0, 200} and len(dark) > 0
        rows, cols = dark[:, 0], dark[:, 1]
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert height <= 8 and width <= 8 and len(dark) == height * width  # one square (clipped at edges)


def test_augmentation_is_deterministic_for_a_seed_and_resumes_from_its_state() -> None:
    batch = _planted()
    names = ("flip", "crop", "cutout")
    a, b, c = BatchAugment(names, 16, seed=5), BatchAugment(names, 16, seed=5), BatchAugment(names, 16, seed=6)
    first = a(batch)
    assert torch.equal(first, b(batch)) and not torch.equal(first, c(batch))
    state = a.state()
    second = a(batch)
    resumed = BatchAugment(names, 16, seed=99)
    resumed.load_state(state)
    assert torch.equal(resumed(batch), second)


def test_augmentation_leaves_validation_and_stored_training_images_untouched() -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=5))
    train_before, val_before = data.train_images.clone(), data.val_images.clone()
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    model = build_model("simple-cnn", shape)
    normaliser = Normaliser(data.train_images)
    config = TrainConfig(epochs=1, batch_size=16, augment=("flip", "crop", "cutout"))
    trainer = TrialTrainer(model, data, normaliser, config, seed=0, device=CPU)
    trainer.train_epoch()
    assert torch.equal(data.train_images, train_before) and torch.equal(data.val_images, val_before)
    # The epoch's validation figures are those of the plain validation images.
    assert evaluate(model, data.val_images, data.val_labels, normaliser, CPU) == (
        trainer.last.val_loss, trainer.last.val_accuracy)


# --- optimisers and schedules ------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_weights_on_a_step_with_zero_gradient(optimizer: str) -> None:
    weights = torch.randn(10, 3).requires_grad_()
    before = weights.detach().clone()
    opt = make_optimizer([weights], TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.01))
    weights.grad = torch.zeros_like(weights)
    opt.step()
    torch.testing.assert_close(weights.detach(), before * (1 - 0.1 * 0.01), atol=1e-7, rtol=0)
    no_decay = make_optimizer([weights], TrainConfig(optimizer=optimizer, lr=0.1))
    after = weights.detach().clone()
    weights.grad = torch.zeros_like(weights)
    no_decay.step()
    assert torch.equal(weights.detach(), after)


def _shapes() -> list[tuple[int, ...]]:
    return [(8, 4, 3, 3), (8,), (5, 7)]


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_optim_adamw_with_a_changing_learning_rate(fused: bool) -> None:
    torch.manual_seed(0)
    ours = [torch.randn(s).requires_grad_() for s in _shapes()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = Adam(ours, lr=1e-2, weight_decay=0.05)
    optimizer.fused = fused and optimizer.fused
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(6):
        lr = 1e-2 * lr_factor("cosine", step, 6)
        optimizer.lr = lr
        reference.param_groups[0]["lr"] = lr
        grads = [torch.randn(s) for s in _shapes()]
        for params, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_matches_torch_optim_nesterov_sgd(weight_decay: float) -> None:
    torch.manual_seed(0)
    ours = [torch.randn(s).requires_grad_() for s in _shapes()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = SGD(ours, lr=0.05, weight_decay=weight_decay)
    reference = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    for step in range(6):
        lr = 0.05 * lr_factor("onecycle", step, 6)
        optimizer.lr = lr
        reference.param_groups[0]["lr"] = lr
        grads = [torch.randn(s) for s in _shapes()]
        with torch.no_grad():  # decoupled decay: torch's SGD couples it, so it is applied by hand there
            for p in theirs:
                p.mul_(1 - lr * weight_decay)
        for params, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_schedules_give_the_expected_rates_at_chosen_steps() -> None:
    assert [lr_factor("constant", s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    # cosine: 5 warm-up steps of 100 (1/5, 2/5, ... 1), then half a cosine to 0.
    assert lr_factor("cosine", 0, 100) == pytest.approx(0.2)
    assert lr_factor("cosine", 4, 100) == pytest.approx(1.0)
    assert lr_factor("cosine", 5, 100) == pytest.approx(1.0)
    assert lr_factor("cosine", 5 + 95 // 2, 100) == pytest.approx(0.5, abs=0.02)
    assert lr_factor("cosine", 99, 100) == pytest.approx(0.0, abs=1e-3)
    # onecycle: torch's OneCycleLR (anneal cos), step by step.
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=100)
    for step in range(100):
        assert lr_factor("onecycle", step, 100) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert lr_factor("onecycle", 0, 100) == pytest.approx(1 / 25)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("linear", 0, 10)


def test_the_schedule_steps_once_per_batch_over_the_whole_run() -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=5))
    config = TrainConfig(epochs=2, batch_size=16, lr_schedule="cosine")
    model = build_model("simple-cnn", ModelShape(data.channels, data.n_classes, data.image_size))
    trainer = TrialTrainer(model, data, Normaliser(data.train_images), config, seed=0, device=CPU)
    per_epoch = batches_per_epoch(len(data.train_labels), 16)
    assert trainer.total_steps == 2 * per_epoch
    trainer.train_epoch()
    assert trainer.step == per_epoch
    trainer.train_epoch()
    assert trainer.step == 2 * per_epoch
    # The last step ran at the schedule's last, near-zero rate.
    assert trainer.optimizer.lr == pytest.approx(config.learning_rate * lr_factor("cosine", 2 * per_epoch - 1,
                                                                                   2 * per_epoch))
    assert trainer.optimizer.lr < 0.05 * config.learning_rate


# --- packed members with the recipe ------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_packed_optimizer_gives_each_member_its_own_optimizer_update_at_its_own_rate(optimizer: str) -> None:
    torch.manual_seed(0)
    k, shapes = 3, [(3 * 8, 4, 3, 3), (3 * 8,), (3, 5, 7)]
    config = TrainConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.02)
    packed = [torch.randn(s).requires_grad_() for s in shapes]
    packed_opt = PackedOptimizer(packed, k, config)
    separate = [[p.detach().view(k, -1)[m].clone().requires_grad_() for p in packed] for m in range(k)]
    own = [make_optimizer(params, config) for params in separate]
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        packed_opt.zero_grad()
        for p, g in zip(packed, grads):
            p.grad = g
        for m in range(k):  # members at different places of their schedules
            lr = 1e-2 * lr_factor("cosine", step + 3 * m, 20)
            packed_opt.set_lr(m, lr)
            own[m].lr = lr
        packed_opt.step()
        for m in range(k):
            for p, g in zip(separate[m], grads):
                p.grad = g.view(k, -1)[m].clone()
            own[m].step()
    assert packed_opt.steps == [5, 5, 5]
    for m in range(k):
        for p, mine in zip(packed, separate[m]):
            torch.testing.assert_close(p.detach().view(k, -1)[m], mine.detach(), atol=1e-6, rtol=1e-5)


def _members(shape: ModelShape, k: int) -> list[nn.Sequential]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model("simple-cnn", shape))
    return models


def test_packed_net_with_member_inputs_equals_separate_models_on_their_own_inputs() -> None:
    shape = ModelShape(3, 5, 16)
    members = _members(shape, 3)
    packed = PackedNet(members, member_inputs=True)
    xs = [torch.randn(6, 3, 16, 16) for _ in members]
    y = torch.randint(0, 5, (6,))
    out = packed.train()(torch.cat(xs, dim=1))
    F.cross_entropy(out.reshape(-1, 5), y.repeat(3), reduction="none").view(3, -1).mean(1).sum().backward()
    grads = {name: p.grad for name, p in packed.named_parameters()}
    for m, model in enumerate(members):
        model.train()
        own = model(xs[m])
        torch.testing.assert_close(out[m], own, atol=1e-5, rtol=1e-4)
        F.cross_entropy(own, y).backward()
        for key in packed._keys:
            if key.packed_key in grads:
                torch.testing.assert_close(grads[key.packed_key].view(3, -1)[m],
                                           dict(model.named_parameters())[key.member_key].grad.reshape(-1),
                                           atol=1e-5, rtol=1e-4, msg=key.member_key)


def test_member_inputs_need_a_first_convolution() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    assert packing_problem(mlp) is None
    assert "convolution" in packing_problem(mlp, member_inputs=True)


def _noisy_stripes() -> ImageData:
    """Three classes of noise images, each with a brighter stripe of its own: no two pixels tie by
    construction (on digits' black background, max-pooling ties, which a grouped first convolution
    breaks differently from a plain one in the last bit; the runs then part ways)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(72) % 3
    images = torch.randint(0, 120, (72, 1, 16, 16), generator=generator, dtype=torch.uint8)
    for c in range(3):
        images[labels == c, :, :, c * 5 : c * 5 + 6] += 100
    return ImageData("stripes", ("a", "b", "c"), images[:54], labels[:54], images[54:], labels[54:])


def _pack_and_separate(config: TrainConfig) -> tuple[PackTrainer, list[TrialTrainer]]:
    """A pack of two members and the same two as lone trials, on the pack's batch order."""
    torch.set_num_threads(1)
    data = _noisy_stripes()
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    normaliser = Normaliser(data.train_images)
    pack_seed, seeds = 11, (11, 12)
    trainer = PackTrainer(data, normaliser, config, device=CPU, seed=pack_seed,
                          build=lambda: build_model("simple-cnn", shape))
    trainer.set_members([Member(s, m, seed=s) for s, m in zip(seeds, _members(shape, 2))])
    # In a pack every member sees the pack's batch order, so each lone run is given that order;
    # the augmentation draws are each member's own seed's either way.
    separate = []
    for seed, model in zip(seeds, _members(shape, 2)):
        solo = TrialTrainer(model, data, normaliser, config, seed=seed, device=CPU)
        solo.batch_generator.manual_seed(pack_seed)
        separate.append(solo)
    return trainer, separate


def test_each_packed_member_sees_the_augmented_batches_its_lone_trial_sees() -> None:
    trainer, separate = _pack_and_separate(TrainConfig(epochs=2, batch_size=16, **FULL_RECIPE))
    packed_inputs: list[torch.Tensor] = []
    trainer.net.layers[0].register_forward_hook(lambda m, i, o: packed_inputs.append(i[0].detach().clone()))
    lone_inputs: list[list[torch.Tensor]] = [[], []]
    for member, solo in enumerate(separate):
        solo.model[0].register_forward_hook(lambda m, i, o, member=member: lone_inputs[member].append(i[0].detach()))
    for _ in range(2):
        trainer.train_epoch()
        for solo in separate:
            solo.train_epoch()
    assert len(packed_inputs) == len(lone_inputs[0]) > 4
    for step, x in enumerate(packed_inputs):
        for member in range(2):
            assert torch.equal(x[:, member : member + 1], lone_inputs[member][step]), (step, member)
    assert not torch.equal(packed_inputs[0][:, 0], packed_inputs[0][:, 1])  # each member its own draws


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_packed_members_train_as_separate_trials_with_the_full_recipe(optimizer: str) -> None:
    config = TrainConfig(epochs=3, batch_size=16, optimizer=optimizer, **FULL_RECIPE)
    trainer, separate = _pack_and_separate(config)
    start = [{k: v.clone() for k, v in solo.model.state_dict().items()} for solo in separate]
    for _ in range(config.epochs):
        packed_metrics = trainer.epoch_metrics(trainer.train_epoch())
        for solo, metrics in zip(separate, packed_metrics):
            own = solo.train_epoch()
            assert metrics.train_loss == pytest.approx(own.train_loss, rel=1e-2)
            assert metrics.val_loss == pytest.approx(own.val_loss, rel=1e-2)
    assert trainer.optimizer.steps == [separate[0].step, separate[1].step]
    # The pack's grouped first convolution rounds differently in the last bit, and over a few
    # epochs Adam's normalised steps grow that (and crop's black border ties max-pooling), so
    # the weights are compared to the distance they travelled: float noise stays within a few
    # percent of it, while a member trained on another recipe (no label smoothing, another
    # schedule, other augmentations) lands 40% or more of it away.
    for m, solo in enumerate(separate):
        member = trainer.net.member_state_dict(m)
        for key, value in solo.model.state_dict().items():
            if value.is_floating_point():
                travelled = (value - start[m][key]).norm()
                assert (member[key] - value).norm() <= 0.1 * travelled + 1e-6, (m, key)


def test_a_slot_taken_over_restarts_the_schedule_and_augmentation_for_the_newcomer() -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=5))
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    config = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", **FULL_RECIPE)
    trainer = PackTrainer(data, Normaliser(data.train_images), config, device=CPU, seed=0,
                          build=lambda: build_model("simple-cnn", shape))
    models = _members(shape, 3)
    trainer.set_members([Member("a", models[0], seed=0), Member("b", models[1], seed=1)])
    trainer.train_epoch()
    per_epoch = batches_per_epoch(len(data.train_labels), 16)
    trainer.update(["a"], [Member("c", models[2], seed=2)])
    assert trainer.optimizer.steps == [0, per_epoch]
    assert torch.equal(trainer.slots[0].augment.state(), BatchAugment(config.augment, 16, 2).state())
    trainer.train_epoch()
    assert trainer.optimizer.steps == [per_epoch, 2 * per_epoch]
    # b ran the whole schedule (its rate is near 0 at the end); c is half way (near the peak/2).
    lrs = trainer.optimizer.lrs
    assert lrs[1] < 0.05 * config.learning_rate < lrs[0]
    assert all(math.isfinite(x) for x in trainer.evaluate(data.val_images, data.val_labels)[0])


def test_packed_members_are_placed_as_before_with_augmentation() -> None:
    data = load_data(DataConfig(source="digits", image_size=16, train_per_class=5))
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    trainer = PackTrainer(data, Normaliser(data.train_images), TrainConfig(epochs=1, batch_size=16, augment=("crop",)),
                          device=CPU, seed=0, build=lambda: build_model("simple-cnn", shape))
    models = _members(shape, 2)
    apply_placement(models[1], {"fc1": 0.4})
    trainer.set_members([Member("a", models[0], seed=0), Member("b", models[1], seed=1)])
    assert trainer.net.member_inputs and trainer.net.placement(1)["fc1"] == pytest.approx(0.4)
    trainer.train_epoch()
    metrics, model = trainer.finish("b", trainer.epoch_metrics([0.0, 0.0])[1])
    assert 0.0 <= metrics.val_accuracy <= 1.0 and model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
