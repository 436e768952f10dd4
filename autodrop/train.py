"""One trial's training: epochs over uint8 images already on the device, batches by indexing."""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autodrop.config import TrainConfig
from autodrop.data import ImageData
from autodrop.sites import DropSite, iter_sites

EVAL_CHUNK = 1024  # images per forward pass when evaluating on a GPU; no gradients, so memory is small
# On a CPU a chunk's maps must fit the cache: the built-in CNN's first convolution ran 5x slower per
# image at 256 32x32 images (32 MB of maps, more than this box's L3) than at 128. So a CPU chunk
# holds this many input pixels: 128 images at 32x32, 32 at 64x64.
CPU_EVAL_PIXELS = 128 * 32 * 32


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


def use_channels_last(device: torch.device) -> bool:
    """Whether to lay out images and conv weights channels-last on ``device`` (faster on CPU and CUDA)."""
    return device.type in ("cpu", "cuda")


def eval_chunk_size(device: torch.device, image_size: int) -> int:
    """Return how many ``image_size`` x ``image_size`` images to evaluate per forward pass on ``device``."""
    if device.type == "cpu":
        return max(1, CPU_EVAL_PIXELS // (image_size * image_size))
    return EVAL_CHUNK


def autocast_for(device: torch.device) -> Any:
    """Return the autocast context for ``device``: bf16 on CUDA, none elsewhere (CPU bf16 is slower here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def prepare_device(device: torch.device) -> None:
    """Set the process-wide switches that make training fast on ``device``."""
    if device.type == "cuda":
        # Every trial runs the same shapes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        _keep_freed_memory()


_ALLOCATOR_TUNED = False


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed activation memory instead of handing it back to the system.

    Every step allocates and frees the same tens of megabytes of activations. By default glibc
    serves such blocks with mmap and returns them on free, so each step faults every page in
    again (about 5,000 page faults a step for the built-in CNN at batch 128, seen here). Keeping
    them costs nothing extra at the peak: the process's resident size stays at its high-water mark.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class Adam:
    """Adam as torch.optim.Adam computes it, over a list of tensors, each with its own step count.

    It calls the fused kernel that ``torch.optim.Adam(fused=True)`` uses (one pass over all the
    tensors) where the device has it, and the same arithmetic tensor by tensor elsewhere. It does
    not go through ``torch.optim`` because the first use of any torch.optim optimizer imports
    ``torch._dynamo`` (2.4 s on the 2-core box, far more when it is busy), once per process.
    The tensors may be views (a packed model's per-member slices, see autodrop.packed).
    """

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, moments: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        if moments is None:  # or the caller's tensors (views), laid out as the params
            moments = (
                [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params],
                [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params],
            )
        self.exp_avg, self.exp_avg_sq = moments
        device = self.params[0].device if self.params else torch.device("cpu")
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.params]
        self.fused = hasattr(torch, "_fused_adam_") and device.type in ("cpu", "cuda")

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Update every tensor from ``grads`` (default: each tensor's ``.grad``); None skips one."""
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        chosen = [i for i, g in enumerate(grads) if g is not None]
        if not chosen:
            return
        params = [self.params[i] for i in chosen]
        g = [grads[i] for i in chosen]
        m = [self.exp_avg[i] for i in chosen]
        v = [self.exp_avg_sq[i] for i in chosen]
        steps = [self.steps[i] for i in chosen]
        beta1, beta2 = self.betas
        if self.fused:
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, g, m, v, [], steps, lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                               eps=self.eps, amsgrad=False, maximize=False)
            return
        for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, g, m, v, steps):
            step_t += 1
            step = float(step_t)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-self.lr / (1 - beta1**step))

    def state_dict(self) -> dict[str, Any]:
        """Return the moments and step counts, for a checkpoint (the same shape as the params)."""
        return {"exp_avg": [t.clone() for t in self.exp_avg], "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
                "steps": [t.clone() for t in self.steps]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() taken of an optimizer over the same params."""
        for key, targets in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq), ("steps", self.steps)):
            values = state[key]
            if len(values) != len(targets):
                raise ValueError(f"optimizer state has {len(values)} {key} tensors for {len(targets)} params.")
            for target, value in zip(targets, values):
                target.copy_(value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def make_optimizer(params: Iterable[torch.Tensor], lr: float, device: torch.device) -> Adam:
    """Return Adam at ``lr`` over ``params`` (one fused kernel on CPU and CUDA)."""
    return Adam(list(params), lr=lr)


def forward_plan(model: nn.Module, *, training: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function computing ``model(x)`` with less memory traffic, for flat Sequentials.

    Two rewrites that leave the outputs unchanged:
    - ReLU then max-pooling runs as max-pooling then ReLU. Both are monotone, so the results are
      equal, and the ReLU (and its backward) touch a quarter of the values.
    - In eval mode a convolution followed by batch norm runs as one convolution with the batch
      norm folded into its weights, saving a pass over the largest maps (a quarter of the cost of
      evaluating the built-in CNN on a CPU). The folded weights are made per call.
    Any other model, or one with hooks, runs as it is.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return model
    if model._forward_hooks or model._forward_pre_hooks:
        return model
    layers: list[nn.Module] = []
    # A drop site that is off (and every site in eval mode) is the identity: leaving it out lets a
    # conv meet the batch norm after it, even where an unused before-bn slot sits between them.
    pending = [layer for layer in model if not (isinstance(layer, DropSite) and (layer.p is None or not training))]
    changed = len(pending) != len(model)
    while pending:
        layer = pending.pop(0)
        following = pending[0] if pending else None
        if type(layer) is nn.ReLU and type(following) is nn.MaxPool2d:
            layers += [pending.pop(0), layer]
            changed = True
        elif not training and _foldable(layer, following):
            layers.append(FoldedConv(layer, pending.pop(0)))  # type: ignore[arg-type]
            changed = True
        else:
            layers.append(layer)
    if not changed:
        return model

    def forward(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    return forward


def _foldable(layer: nn.Module, following: nn.Module | None) -> bool:
    conv_like = type(layer) is nn.Conv2d or getattr(layer, "foldable_conv", False)
    return (
        conv_like
        and getattr(layer, "padding_mode", "zeros") == "zeros"
        and type(following) is nn.BatchNorm2d
        and following.running_mean is not None  # type: ignore[union-attr]
        and not following.training  # type: ignore[union-attr]
        and not layer.training
    )


class FoldedConv(nn.Module):
    """A convolution with the eval-mode batch norm after it folded into its weights and bias."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)  # type: ignore[operator]
            if bn.weight is not None:
                scale = scale * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            shift = (bias - bn.running_mean) * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            # Channels-last weights keep the maps channels-last (a one-channel input is ambiguous).
            self.weight = weight.to(memory_format=torch.channels_last) if weight.dim() == 4 else weight
            self.bias = shift
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Normaliser:
    """Turns uint8 batches into float32 with per-channel zero mean and unit variance.

    The statistics come from the training images once; per batch it is one fused multiply-add.
    """

    def __init__(self, images: torch.Tensor) -> None:
        # Sums over chunks in float64: a float copy of the whole set would be 4x its size (8x with
        # the transposed copy), a transient peak of gigabytes on a 50,000-image set.
        channels = images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, len(images), 1024):
            chunk = images[start : start + 1024].to("cpu", torch.float64).transpose(0, 1).reshape(channels, -1)
            total += chunk.sum(dim=1)
            squares += chunk.square().sum(dim=1)
        n = max(images.numel() // max(channels, 1), 2)
        mean = total / n
        variance = ((squares - total * mean) / (n - 1)).clamp_min(0.0)  # unbiased, as Tensor.std
        mean, std = mean.float(), variance.sqrt().float().clamp_min(1e-3)
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
    prepare_device(device)
    channels_last = use_channels_last(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), config.lr, device)
    autocast = autocast_for(device)
    forward = forward_plan(model, training=True)
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
                loss = F.cross_entropy(forward(x), data.train_labels[index])
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
    channels_last = use_channels_last(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    chunk = eval_chunk_size(device, images.shape[-1])
    with torch.inference_mode(), autocast_for(device):
        forward = forward_plan(model, training=False)
        for start in range(0, len(labels), chunk):
            x = normaliser(images[start : start + chunk], channels_last)
            y = labels[start : start + chunk]
            logits = forward(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
    n = max(len(labels), 1)
    return float(loss_sum) / n, float(correct) / n
