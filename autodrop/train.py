"""One trial's training: epochs over uint8 images already on the device, batches by indexing."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import TrainConfig
from autodrop.data import ImageData
from autodrop.sites import iter_sites

EVAL_CHUNK = 1024  # images per forward pass when evaluating; no gradients, so memory is small


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the trial is recorded as failed with this reason."""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; validation figures are in eval mode (dropout off)."""

    epoch: int  # 1-based
    train_loss: float  # mean loss over the epoch's batches, dropout on
    val_loss: float
    val_accuracy: float


@dataclass(frozen=True)
class TrialMetrics:
    """A finished trial's figures; train figures are re-measured in eval mode at the end."""

    val_accuracy: float
    val_loss: float
    train_accuracy: float
    train_loss: float
    epochs: int

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


def resolve_device(name: str) -> torch.device:
    """Return the device ``name`` asks for; ``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


class Normaliser:
    """Turns uint8 batches into float32 with per-channel zero mean and unit variance.

    The statistics come from the training images once; per batch it is one fused multiply-add.
    """

    def __init__(self, images: torch.Tensor) -> None:
        pixels = images.float().transpose(0, 1).reshape(images.shape[1], -1)
        mean = pixels.mean(dim=1)
        std = pixels.std(dim=1).clamp_min(1e-3)
        shape = (1, -1, 1, 1)
        self.scale = (1.0 / std).view(shape)
        self.shift = (-mean / std).view(shape)

    def to(self, device: torch.device) -> "Normaliser":
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def __call__(self, batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
        x = torch.addcmul(self.shift, batch.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
    """Train ``model`` on ``data`` (already on ``device``) and return its final figures.

    ``on_epoch`` sees each epoch's metrics and may raise (Optuna's TrialPruned) to stop early.
    ``resume`` continues after the epoch it was taken at, as if training had never stopped;
    ``on_checkpoint`` receives that state after every epoch, before ``on_epoch``.
    Raises TrainingDiverged when the loss stops being finite.
    """
    torch.manual_seed(seed)  # dropout masks come from the global generator
    batch_generator = torch.Generator().manual_seed(seed)
    channels_last = device.type != "mps"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    n_train = len(data.train_labels)
    batch_size = min(config.batch_size, n_train)
    val_loss = val_accuracy = math.nan
    # "Early dropout": regularise while the network finds its features, then train without it.
    dropout_epochs = math.ceil(config.epochs / 2) if config.schedule == "early" else config.epochs
    first_epoch = 1
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        batch_generator.set_state(resume.batch_rng)
        torch.set_rng_state(resume.dropout_rng)
        if resume.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resume.cuda_rng, device)
        val_loss, val_accuracy = resume.metrics.val_loss, resume.metrics.val_accuracy
        first_epoch = resume.metrics.epoch + 1
    for epoch in range(first_epoch, config.epochs + 1):
        # Dropout goes off at the switch (or at once, in a trial resumed past it).
        if epoch > dropout_epochs and (epoch == dropout_epochs + 1 or epoch == first_epoch):
            for site in iter_sites(model):
                site.p = None
        model.train()
        order = torch.randperm(n_train, generator=batch_generator).to(device)
        loss_sum = torch.zeros((), device=device)
        n_batches = 0
        for start in range(0, n_train, batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # batch norm cannot train on a single image
                continue
            x = normaliser(data.train_images[index], channels_last)
            with autocast:
                # cross_entropy applies log_softmax; on a model that already outputs
                # log-probabilities that is a no-op, so both kinds of output train correctly.
                loss = F.cross_entropy(model(x), data.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            n_batches += 1
        train_loss = float(loss_sum) / max(n_batches, 1)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch}")
        val_loss, val_accuracy = evaluate(model, data.val_images, data.val_labels, normaliser, device)
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_accuracy)
        if on_checkpoint is not None:
            on_checkpoint(TrainingState(
                metrics, model.state_dict(), optimizer.state_dict(), batch_generator.get_state(),
                torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            ))
        if on_epoch is not None:
            on_epoch(metrics)
    train_eval_loss, train_accuracy = evaluate(model, data.train_images, data.train_labels, normaliser, device)
    return TrialMetrics(val_accuracy, val_loss, train_accuracy, train_eval_loss, config.epochs)


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normaliser: Normaliser, device: torch.device
) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` in eval mode, in large chunks without autograd."""
    model.eval()
    channels_last = device.type != "mps"
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    with torch.inference_mode(), autocast:
        for start in range(0, len(labels), EVAL_CHUNK):
            x = normaliser(images[start : start + EVAL_CHUNK], channels_last)
            y = labels[start : start + EVAL_CHUNK]
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
    n = max(len(labels), 1)
    return float(loss_sum) / n, float(correct) / n
