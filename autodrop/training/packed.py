"""Several trials trained at once as one packed network (autodrop/nets/packed.py), epoch by epoch.

Every member sees the same batches in the same order (or, with ``own_batches``, each its own seed's
order, as it would alone); each keeps its own weights, batch-norm
statistics, optimiser state and step (so its own place on the learning-rate schedule), dropout
placement, kind and slot, and its own augmentation draws. Between epochs members leave
(finished or pruned) and new trials join, in a freed slot or by repacking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import TrainConfig
from autodrop.nets.packed import PackedNet
from autodrop.training.augment import BatchAugment
from autodrop.training.data import ImageData
from autodrop.training.device import (
    autocast_for,
    eval_chunk_size,
    prepare_device,
    to_device,
    use_channels_last,
)
from autodrop.training.loop import (
    EpochMetrics,
    Member,
    MemberTrainer,
    TrialMetrics,
    batches_on_host,
    batches_per_epoch,
    dropout_epochs,
    epoch_batches,
    evaluate,
)
from autodrop.training.normaliser import Normaliser
from autodrop.training.optim import PackedOptimizer, lr_factor
from autodrop.training.plan import forward_plan

# A GPU's default pack: enough members to fill a large GPU with these small networks, few enough
# that one pack's epoch stays short for pruning. Not yet measured on a GPU (benchmarks/README.md).
GPU_PACK_SIZE = 8


@dataclass
class _Slot:
    """One member of a pack: which trial it trains and how far it got."""

    tag: Any  # the caller's handle (an Optuna trial's number)
    augment: BatchAugment  # the member's own augmentation draws (from its seed)
    batches: torch.Generator | None = None  # the member's own batch order (from its seed), with own_batches
    epoch: int = 0


class PackTrainer(MemberTrainer):
    """Trains up to K trials at once, epoch by epoch, on shared batches; slots can be swapped.

    Every member sees the same batches in the same order (one permutation per pack epoch, from
    ``seed``). Between epochs, :meth:`update` takes finished or pruned members out and new trials
    in: a new trial takes a freed slot (its epoch 1 is the pack's next epoch), and the pack grows or
    shrinks (a repack, which keeps every member's weights, optimiser state and step) when the counts
    differ. With ``config.schedule == "early"``, each member's dropout goes off after its own first
    half. With augmentation, each member augments the shared batch with its own draws.

    With ``own_batches`` each member instead takes its batches in its own seed's order, the order
    it would have trained in alone (autodrop/training/loop.py), so that a member pairs with lone
    runs of its seed; every member then gets an input of its own (as with augmentation).
    """

    packed = True

    def __init__(self, data: ImageData, normaliser: Normaliser, config: TrainConfig, *, device: torch.device,
                 seed: int, build: Callable[[], nn.Module], capacity: int = GPU_PACK_SIZE,
                 own_batches: bool = False) -> None:
        self.data, self.normaliser, self.config, self.device = data, normaliser, config, device
        self.capacity = capacity
        self.own_batches = own_batches
        self.build = build  # returns a fresh member model (weights are replaced when it joins)
        prepare_device(device)
        self.channels_last = use_channels_last(device)
        self.on_host = batches_on_host(data, device, config)
        self.batch_generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout masks come from the global generator
        self.dropout_epochs = dropout_epochs(config)
        self.total_steps = config.epochs * batches_per_epoch(len(data.train_labels), config.batch_size)
        self.slots: list[_Slot] = []
        self.net: PackedNet | None = None
        self.optimizer: PackedOptimizer | None = None

    @property
    def tags(self) -> list[Any]:
        return [slot.tag for slot in self.slots]

    @property
    def member_inputs(self) -> bool:
        """Whether each member gets an input of its own (its own augmentation draws or batches)."""
        return bool(self.config.augment) or self.own_batches

    def epoch_of(self, tag: Any) -> int:
        return self.slots[self._index(tag)].epoch

    def _index(self, tag: Any) -> int:
        for i, slot in enumerate(self.slots):
            if slot.tag == tag:
                return i
        raise KeyError(tag)

    def _slot(self, member: Member) -> _Slot:
        if member.resume is not None:
            raise ValueError("packed members keep no checkpoints, so they cannot resume one.")
        batches = torch.Generator().manual_seed(member.seed) if self.own_batches else None
        return _Slot(member.tag, BatchAugment(self.config.augment, self.data.image_size, member.seed), batches)

    def set_members(self, members: Sequence[Member]) -> None:
        """Start a pack from scratch with these members; each model's drop sites already hold its
        placement (autodrop.nets.sites.apply_placement). Members start at their first epoch."""
        self.slots = [self._slot(member) for member in members]
        if not members:
            self.net = self.optimizer = None
            return
        self.net = PackedNet([member.model for member in members],
                             member_inputs=self.member_inputs).to(self.device)
        self.optimizer = PackedOptimizer(list(self.net.parameters()), len(members), self.config)

    def update(self, done: Sequence[Any], new: Sequence[Member]) -> None:
        """Take the ``done`` trials out and the ``new`` members in."""
        gone = [self._index(tag) for tag in done]
        if self.net is not None and len(gone) == len(new):  # new trials take the freed slots in place
            for i, member in zip(gone, new):
                slot = self._slot(member)
                self.net.load_member(i, member.model)
                self.net.copy_sites_from(i, member.model)
                self.optimizer.reset_member(i)
                self.slots[i] = slot
            return
        self._repack([i for i in range(len(self.slots)) if i not in gone], list(new))

    def _repack(self, keep: list[int], new: list[Member]) -> None:
        """Pack the kept members (state and all) and the new ones into a model of the new size."""
        old_net, old_opt, old_slots = self.net, self.optimizer, self.slots
        members: list[Member] = []
        for i in keep:
            model = old_net.unpack(i, self.build())
            old_net.copy_sites_to(i, model)
            members.append(Member(old_slots[i].tag, model, seed=0))
        self.set_members(members + new)
        for new_i, old_i in enumerate(keep):
            self.slots[new_i] = old_slots[old_i]
        if not keep:
            return
        # Carry each kept member's optimiser state and step over to its new slot; new ones start at 0.
        k = len(self.slots)
        index = torch.tensor(keep, device=self.device)
        for new_tensors, old_tensors in zip(self.optimizer.state, old_opt.state):
            for new_state, old_state in zip(new_tensors, old_tensors):
                new_state.view(k, -1)[: len(keep)].copy_(old_state.view(old_opt.k, -1).index_select(0, index))
        old_steps = old_opt.steps
        for new_i, old_i in enumerate(keep):
            self.optimizer.set_step(new_i, old_steps[old_i])

    def train_epoch(self) -> list[float]:
        """Train every member one epoch (on shared batches, or each on its own); return each member's
        mean training loss."""
        assert self.net is not None and self.optimizer is not None
        net, config, k = self.net, self.config, len(self.slots)
        for i, slot in enumerate(self.slots):
            if slot.epoch >= self.dropout_epochs:  # "early dropout": off after the member's first half
                net.silence(i)
        net.train()
        loss_sums = torch.zeros(k, device=self.device)
        n_batches = 0
        autocast = autocast_for(self.device, config.precision)
        forward = forward_plan(net.layers, training=True)
        for batches, y in self._batches():
            if self.member_inputs:  # each member its own batch or draws, side by side in the channels
                x = torch.cat([self.normaliser(slot.augment(images) if slot.augment else images, self.channels_last)
                               for slot, images in zip(self.slots, batches)], 1)
            else:
                x = self.normaliser(batches[0], self.channels_last)
            with autocast:
                out = forward(x)
            losses = F.cross_entropy(out.float().reshape(len(y), -1), y, reduction="none",
                                     label_smoothing=config.label_smoothing)
            member_losses = losses.view(k, -1).mean(dim=1)
            # The sum of the members' mean losses: each member's gradient is its own loss's.
            self.optimizer.zero_grad()
            member_losses.sum().backward()
            for i, step in enumerate(self.optimizer.steps):
                self.optimizer.set_lr(i, config.learning_rate * lr_factor(config.lr_schedule, step, self.total_steps))
            self.optimizer.step()
            loss_sums += member_losses.detach()
            n_batches += 1
        for slot in self.slots:
            slot.epoch += 1
        return (loss_sums / max(n_batches, 1)).tolist()

    def _batches(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Yield one epoch's training batches, one per member, with their labels member by member:
        the pack's shared batch (gathered once), or with ``own_batches`` each member's from its own
        generator; indexed on the device or gathered on the host and copied (:func:`epoch_batches`)."""
        k, size = len(self.slots), self.config.batch_size
        if not self.own_batches:
            for images, labels in epoch_batches(self.data, size, self.batch_generator, self.device, on_host=self.on_host):
                yield [images] * k, labels.repeat(k)
            return
        # Every member's epoch has the same number of batches of the same sizes: only the order differs.
        streams = [epoch_batches(self.data, size, slot.batches, self.device, on_host=self.on_host) for slot in self.slots]
        for pairs in zip(*streams):
            yield [images for images, _ in pairs], torch.cat([labels for _, labels in pairs])

    def finish(self, tag: Any, last: EpochMetrics) -> tuple[TrialMetrics, nn.Module]:
        """Return a finished member's figures (the training set re-measured in eval mode) and its
        network as a separate model, with the member's weights and drop-site settings."""
        assert self.net is not None
        i = self._index(tag)
        model = self.net.unpack(i, self.build()).to(self.device)
        self.net.copy_sites_to(i, model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        train_loss, train_accuracy = evaluate(model, self.data.train_images, self.data.train_labels,
                                              self.normaliser, self.device, precision=self.config.precision)
        return TrialMetrics(last.val_accuracy, last.val_loss, train_accuracy, train_loss), model

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float]]:
        """Return each member's (mean loss, accuracy) in eval mode."""
        assert self.net is not None
        net, k = self.net, len(self.slots)
        net.eval()
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        chunk = max(1, eval_chunk_size(self.device, images.shape[-1]) // k)
        with torch.inference_mode(), autocast_for(self.device, self.config.precision):
            forward = forward_plan(net.layers, training=False)
            for start in range(0, len(labels), chunk):
                x = self.normaliser(to_device(images[start : start + chunk], self.device), self.channels_last)
                if net.member_inputs:  # every member sees the same (unaugmented) images
                    x = x.repeat(1, k, 1, 1)
                y = to_device(labels[start : start + chunk], self.device)
                logits = forward(x).float()  # (K, n, classes)
                losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="none")
                loss_sum += losses.view(k, -1).sum(dim=1)
                correct += (logits.argmax(dim=-1) == y).sum(dim=1)
        n = max(len(labels), 1)
        return [(float(s) / n, float(c) / n) for s, c in zip(loss_sum.tolist(), correct.tolist())]

    def epoch_metrics(self, train_losses: list[float]) -> list[EpochMetrics]:
        """Return each member's figures for the epoch just trained (validation in eval mode)."""
        val = self.evaluate(self.data.val_images, self.data.val_labels)
        return [
            EpochMetrics(slot.epoch, loss, val_loss, val_acc)
            for slot, loss, (val_loss, val_acc) in zip(self.slots, train_losses, val)
        ]

    def run_epoch(self) -> list[EpochMetrics]:
        return self.epoch_metrics(self.train_epoch())


def auto_pack_size(device: torch.device, n_trials: int, *, n_workers: int = 1) -> int:
    """Return how many trials to pack on ``device``: several on a GPU, one (no packing) elsewhere.

    Workers sharing one GPU split the GPU's pack between them; a CPU is already busy with one trial.
    """
    if device.type != "cuda":
        return 1
    return max(1, min(GPU_PACK_SIZE // max(n_workers, 1), n_trials))

