"""One trial's training: epochs over uint8 images, batches by indexing (on the device, or on the host and copied).

:class:`TrialTrainer` trains one network an epoch at a time; :func:`train_trial` runs it to the end.
:class:`MemberTrainer` is what the search's scheduler drives: up to ``capacity`` trials trained
together, an epoch at a time, with members coming and going between epochs. :class:`SoloTrainer`
is the one-trial kind (with per-epoch checkpoints); autodrop/training/packed.py has the packed kind.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import TrainConfig
from autodrop.nets.sites import iter_sites
from autodrop.training.augment import BatchAugment
from autodrop.training.data import ImageData
from autodrop.training.device import (
    autocast_for,
    eval_chunk_size,
    prepare_device,
    to_device,
    use_channels_last,
)
from autodrop.training.normaliser import Normaliser
from autodrop.training.optim import lr_factor, make_optimizer
from autodrop.training.plan import forward_plan


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the trial is recorded as failed with this reason."""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; validation figures are in eval mode (dropout off)."""

    epoch: int  # 1-based
    train_loss: float  # mean loss over the epoch's batches, dropout on
    val_loss: float
    val_accuracy: float

    @property
    def diverged(self) -> bool:
        """Whether the training loss stopped being finite (the trial cannot go on)."""
        return not math.isfinite(self.train_loss)

    def divergence(self) -> TrainingDiverged:
        """Return the error that says the training loss stopped being finite."""
        return TrainingDiverged(f"training loss became {self.train_loss} in epoch {self.epoch}")


@dataclass(frozen=True)
class TrialMetrics:
    """A finished trial's figures; train figures are re-measured in eval mode at the end."""

    val_accuracy: float
    val_loss: float
    train_accuracy: float
    train_loss: float

    @property
    def gap(self) -> float:
        """Train minus validation accuracy: large means overfitting."""
        return self.train_accuracy - self.val_accuracy


@dataclass(frozen=True)
class TrainingState:
    """A trial's training after a finished epoch: all it takes to go on with the next one."""

    metrics: EpochMetrics  # the finished epoch's figures (its number is metrics.epoch)
    model: dict[str, torch.Tensor]  # state_dict
    optimizer: dict[str, Any]  # state_dict
    batch_rng: torch.Tensor  # state of the generator that orders batches
    dropout_rng: torch.Tensor  # state of torch's global CPU generator (dropout masks on CPU)
    cuda_rng: torch.Tensor | None = None  # state of the device's generator (dropout masks on CUDA)
    step: int = 0  # optimiser steps taken: where the learning-rate schedule goes on from
    augment_rng: torch.Tensor | None = None  # state of the generator of the augmentations


def batches_per_epoch(n_train: int, batch_size: int) -> int:
    """Return how many batches (optimiser steps) :func:`batch_indices` yields per epoch."""
    size = min(batch_size, n_train)
    full, rest = divmod(n_train, size)
    return full + (1 if rest >= 2 else 0)


def batch_indices(n_train: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Yield one epoch's batches of training-image indices: a fresh permutation from ``generator``,
    cut into ``batch_size`` pieces; a last piece of one image is left out (batch norm cannot train
    on a single image)."""
    order = torch.randperm(n_train, generator=generator).to(device)
    size = min(batch_size, n_train)
    for start in range(0, n_train, size):
        index = order[start : start + size]
        if len(index) >= 2:
            yield index


def batches_on_host(data: ImageData, device: torch.device, config: TrainConfig) -> bool:
    """Whether batches are gathered on the host and copied to ``device``: the images were left
    there (training/data.place_data). On a CPU, ``--data-on-device no`` takes this path too: the
    one a GPU takes, without the copy."""
    return data.train_images.device.type != device.type or config.data_on_device == "no"


def epoch_batches(data: ImageData, batch_size: int, generator: torch.Generator, device: torch.device, *,
                  on_host: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield one epoch's (images, labels) training batches on ``device``, in :func:`batch_indices`'s
    order: indexed where the images are on the device, else gathered on the host (from the mapped
    cache file) and copied; the batches are the same either way."""
    where = torch.device("cpu") if on_host else device
    for index in batch_indices(len(data.train_labels), batch_size, generator, where):
        images, labels = data.train_images[index], data.train_labels[index]
        if on_host:
            images, labels = to_device(images, device), to_device(labels, device)
        yield images, labels


def dropout_epochs(config: TrainConfig) -> int:
    """Return how many epochs train with dropout: all of them, or the first half for "early dropout"
    (regularise while the network finds its features, then train without it)."""
    return math.ceil(config.epochs / 2) if config.schedule == "early" else config.epochs


class TrialTrainer:
    """One trial's network trained an epoch at a time on ``data`` (placed for ``device`` by ``data.place_data``).

    ``resume`` continues after the epoch it was taken at, as if training had never stopped.
    """

    def __init__(self, model: nn.Module, data: ImageData, normaliser: Normaliser, config: TrainConfig, *,
                 seed: int, device: torch.device, resume: TrainingState | None = None) -> None:
        torch.manual_seed(seed)  # dropout masks come from the global generator
        self.batch_generator = torch.Generator().manual_seed(seed)
        prepare_device(device)
        self.model, self.data, self.normaliser, self.config, self.device = model, data, normaliser, config, device
        self.channels_last = use_channels_last(device)
        self.on_host = batches_on_host(data, device, config)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(model.parameters(), config)
        self.augment = BatchAugment(config.augment, data.image_size, seed)
        self.autocast = autocast_for(device, config.precision)
        self.forward = forward_plan(model, training=True)
        self.dropout_epochs = dropout_epochs(config)
        self.total_steps = config.epochs * batches_per_epoch(len(data.train_labels), config.batch_size)
        self.step = 0  # optimiser steps taken
        self.epoch = 0  # epochs finished
        self.last: EpochMetrics | None = None
        if resume is not None:
            model.load_state_dict(resume.model)
            self.optimizer.load_state_dict(resume.optimizer)
            self.batch_generator.set_state(resume.batch_rng)
            torch.set_rng_state(resume.dropout_rng)
            if resume.cuda_rng is not None and device.type == "cuda":
                torch.cuda.set_rng_state(resume.cuda_rng, device)
            if resume.augment_rng is not None:
                self.augment.load_state(resume.augment_rng)
            self.step = resume.step
            self.epoch, self.last = resume.metrics.epoch, resume.metrics
        self.first_epoch = self.epoch + 1

    def train_epoch(self) -> EpochMetrics:
        """Train one more epoch and return its figures; a diverged epoch is not evaluated."""
        model, data = self.model, self.data
        epoch = self.epoch + 1
        # Dropout goes off at the switch (or at once, in a trial resumed past it).
        if epoch > self.dropout_epochs and (epoch == self.dropout_epochs + 1 or epoch == self.first_epoch):
            for site in iter_sites(model):
                site.p = None
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        n_batches = 0
        config = self.config
        for images, labels in epoch_batches(data, config.batch_size, self.batch_generator, self.device,
                                            on_host=self.on_host):
            x = self.normaliser(self.augment(images) if self.augment else images, self.channels_last)
            with self.autocast:
                out = self.forward(x)
            # The loss is taken in float32 whatever the network computed in. cross_entropy applies
            # log_softmax; on a model that already outputs log-probabilities that is a no-op, so
            # both kinds of output train correctly.
            loss = F.cross_entropy(out.float(), labels, label_smoothing=config.label_smoothing)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.lr = config.learning_rate * lr_factor(config.lr_schedule, self.step, self.total_steps)
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.detach()
            n_batches += 1
        train_loss = float(loss_sum) / max(n_batches, 1)
        self.epoch = epoch
        if not math.isfinite(train_loss):
            self.last = EpochMetrics(epoch, train_loss, math.nan, math.nan)
        else:
            val_loss, val_accuracy = evaluate(model, data.val_images, data.val_labels, self.normaliser, self.device,
                                              precision=config.precision)
            self.last = EpochMetrics(epoch, train_loss, val_loss, val_accuracy)
        return self.last

    def state(self) -> TrainingState:
        """Return all it takes to go on after the epoch just trained (for a checkpoint)."""
        assert self.last is not None
        device = self.device
        return TrainingState(
            self.last, self.model.state_dict(), self.optimizer.state_dict(), self.batch_generator.get_state(),
            torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            step=self.step, augment_rng=self.augment.state() if self.augment else None,
        )

    def finish(self) -> TrialMetrics:
        """Return the trial's figures after its last epoch, the training images re-measured in eval mode."""
        assert self.last is not None
        train_loss, train_accuracy = evaluate(self.model, self.data.train_images, self.data.train_labels,
                                              self.normaliser, self.device, precision=self.config.precision)
        return TrialMetrics(self.last.val_accuracy, self.last.val_loss, train_accuracy, train_loss)


def train_trial(
    model: nn.Module,
    data: ImageData,
    normaliser: Normaliser,
    config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    resume: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
) -> TrialMetrics:
    """Train ``model`` on ``data`` (placed for ``device`` by ``data.place_data``) and return its final figures.

    ``on_epoch`` sees each epoch's metrics and may raise to stop early. ``resume`` continues after
    the epoch it was taken at, as if training had never stopped; ``on_checkpoint`` receives that
    state after every epoch, before ``on_epoch``. Raises TrainingDiverged when the loss stops
    being finite.
    """
    trainer = TrialTrainer(model, data, normaliser, config, seed=seed, device=device, resume=resume)
    while trainer.epoch < config.epochs:
        metrics = trainer.train_epoch()
        if metrics.diverged:
            raise metrics.divergence()
        if on_checkpoint is not None:
            on_checkpoint(trainer.state())
        if on_epoch is not None:
            on_epoch(metrics)
    return trainer.finish()


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normaliser: Normaliser, device: torch.device,
    *, precision: str = "auto",
) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` in eval mode, in large chunks without autograd, computed
    in ``precision`` (the trial's, so a trial is measured in the arithmetic it trained in); the images
    and labels on ``device`` or on the host, a chunk at a time copied over."""
    model.eval()
    channels_last = use_channels_last(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    chunk = eval_chunk_size(device, images.shape[-1])
    with torch.inference_mode(), autocast_for(device, precision):
        forward = forward_plan(model, training=False)
        for start in range(0, len(labels), chunk):
            x = normaliser(to_device(images[start : start + chunk], device), channels_last)
            y = to_device(labels[start : start + chunk], device)
            logits = forward(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
    n = max(len(labels), 1)
    return float(loss_sum) / n, float(correct) / n


@dataclass(frozen=True)
class Member:
    """A trial joining a trainer: the caller's handle, its placed network, its seed, and where a
    retry resumes (None: from its first epoch)."""

    tag: Any  # the caller's handle (an Optuna trial's number)
    model: nn.Module  # drop sites already hold the trial's placement
    seed: int
    resume: TrainingState | None = None


class MemberTrainer(ABC):
    """Trains up to ``capacity`` trials together, an epoch at a time; members join and leave
    between epochs. The search's scheduler drives one of these whatever the kind."""

    capacity: int
    packed: bool  # members train as one packed network (and keep no per-epoch checkpoints)

    @property
    @abstractmethod
    def tags(self) -> list[Any]:
        """The members training now, in the order :meth:`run_epoch` reports them."""

    @abstractmethod
    def update(self, done: Sequence[Any], new: Sequence[Member]) -> None:
        """Take the ``done`` members out and the ``new`` ones in."""

    @abstractmethod
    def run_epoch(self) -> list[EpochMetrics]:
        """Train every member one epoch and return each one's figures, in :attr:`tags` order."""

    @abstractmethod
    def finish(self, tag: Any, last: EpochMetrics) -> tuple[TrialMetrics, nn.Module]:
        """Return a member's final figures and its network, after its last epoch ``last``."""

    def state(self, tag: Any) -> TrainingState | None:
        """Return what a checkpoint of member ``tag`` holds after its last epoch, or None where
        members keep no checkpoints."""
        return None

    def __len__(self) -> int:
        return len(self.tags)


class SoloTrainer(MemberTrainer):
    """One trial at a time, its batches in its own seed's order, with checkpointable state."""

    capacity = 1
    packed = False

    def __init__(self, data: ImageData, normaliser: Normaliser, config: TrainConfig, *, device: torch.device) -> None:
        self.data, self.normaliser, self.config, self.device = data, normaliser, config, device
        self._tag: Any = None
        self._trainer: TrialTrainer | None = None

    @property
    def tags(self) -> list[Any]:
        return [] if self._trainer is None else [self._tag]

    def update(self, done: Sequence[Any], new: Sequence[Member]) -> None:
        if self._tag in done:
            self._tag = self._trainer = None
        if len(new) + len(self.tags) > 1:
            raise ValueError(f"a SoloTrainer trains one trial at a time, but got {len(new)} more.")
        for member in new:
            self._tag = member.tag
            self._trainer = TrialTrainer(member.model, self.data, self.normaliser, self.config, seed=member.seed,
                                         device=self.device, resume=member.resume)

    def run_epoch(self) -> list[EpochMetrics]:
        assert self._trainer is not None
        return [self._trainer.train_epoch()]

    def finish(self, tag: Any, last: EpochMetrics) -> tuple[TrialMetrics, nn.Module]:
        assert self._trainer is not None and tag == self._tag
        return self._trainer.finish(), self._trainer.model

    def state(self, tag: Any) -> TrainingState | None:
        assert self._trainer is not None and tag == self._tag
        return self._trainer.state()
