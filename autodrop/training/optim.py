"""The optimisers and the learning-rate schedule, for one trial and for a pack of trials.

Adam (AdamW when given weight decay) and SGD with Nesterov momentum work over plain lists of
tensors, compute what ``torch.optim``'s do, and keep their state as tensors a checkpoint can hold.
They do not go through ``torch.optim`` because the first use of any torch.optim optimiser imports
``torch._dynamo``, which takes seconds, once per process. Weight decay is decoupled: each step
multiplies the weights by ``1 - lr * weight_decay`` before the update, for both.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from autodrop.config import TrainConfig

SGD_MOMENTUM = 0.9
WARMUP_SHARE = 0.05  # of the run's steps, the cosine schedule's linear warm-up
ONECYCLE_RISE = 0.3  # of the run's steps, the one-cycle schedule's climb (as torch's OneCycleLR)
ONECYCLE_START = 1 / 25  # of the peak rate, where one cycle starts (torch's div_factor 25)
ONECYCLE_FINAL_DIV = 1e4  # the start divided by this is where it ends (torch's final_div_factor)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Return the share of the peak learning rate to use for optimiser step ``step`` (from 0) of ``total``.

    ``constant``: 1 throughout. ``cosine``: a linear warm-up over the first 5% of the steps, then
    half a cosine down to 0. ``onecycle``: as torch's OneCycleLR (cosine annealing): from 1/25 of
    the peak up to the peak over the first 30% of the steps, then down to 1/250,000 of the peak.
    """
    if schedule == "constant" or total <= 1:
        return 1.0
    if schedule == "cosine":
        warmup = max(1, round(WARMUP_SHARE * total))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        rise_end = ONECYCLE_RISE * total - 1
        if step <= rise_end:
            return _cos_between(ONECYCLE_START, 1.0, step / rise_end if rise_end > 0 else 1.0)
        return _cos_between(1.0, ONECYCLE_START / ONECYCLE_FINAL_DIV, (step - rise_end) / (total - 1 - rise_end))
    raise ValueError(f"schedule must be one of constant, cosine, onecycle, but got {schedule=}.")


def _cos_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2.0 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class Adam:
    """Adam (AdamW with ``weight_decay``) as torch.optim computes it, each tensor with its own step count.

    It calls the fused kernel that ``torch.optim.AdamW(fused=True)`` uses (one pass over all the
    tensors) where the device has it, and the same arithmetic tensor by tensor elsewhere. The
    tensors may be views (a packed model's per-member slices, see :class:`PackedOptimizer`).
    """

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 state: list[list[torch.Tensor]] | None = None) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        if state is None:  # or the caller's tensors (views), laid out as the params
            state = [[torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params] for _ in range(2)]
        self.exp_avg, self.exp_avg_sq = state
        device = self.params[0].device if self.params else torch.device("cpu")
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.params]
        self.fused = hasattr(torch, "_fused_adamw_") and device.type in ("cpu", "cuda")

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Update every tensor from ``grads`` (default: each tensor's ``.grad``); None skips one."""
        present = _with_gradients(self.params, grads, self.exp_avg, self.exp_avg_sq, self.steps)
        if present is None:
            return
        params, g, m, v, steps = present
        beta1, beta2 = self.betas
        if self.fused:
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if self.weight_decay else torch._fused_adam_
            kernel(params, g, m, v, [], steps, lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=self.weight_decay,
                   eps=self.eps, amsgrad=False, maximize=False)
            return
        for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, g, m, v, steps):
            step_t += 1
            step = float(step_t)
            if self.weight_decay:
                param.mul_(1.0 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-self.lr / (1 - beta1**step))

    def state(self) -> list[list[torch.Tensor]]:
        """The state tensors, each list laid out as the params (moments)."""
        return [self.exp_avg, self.exp_avg_sq]

    def state_dict(self) -> dict[str, Any]:
        """Return the moments and step counts, for a checkpoint (the same shape as the params)."""
        return {"exp_avg": [t.clone() for t in self.exp_avg], "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
                "steps": [t.clone() for t in self.steps]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() taken of an optimizer over the same params."""
        _load(state, {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps})

    def zero_grad(self) -> None:
        """Drop every tensor's gradient (as torch.optim does by default)."""
        for p in self.params:
            p.grad = None


class SGD:
    """SGD with Nesterov momentum (as torch.optim.SGD(momentum=0.9, nesterov=True) computes it) and
    decoupled weight decay, over a list of tensors."""

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, weight_decay: float = 0.0,
                 momentum: float = SGD_MOMENTUM, state: list[list[torch.Tensor]] | None = None) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.momentum = lr, weight_decay, momentum
        # Zeros make the first step's buffer the gradient itself, as torch.optim's first step does.
        self.buffers = state[0] if state is not None else [torch.zeros_like(p) for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Update every tensor from ``grads`` (default: each tensor's ``.grad``); None skips one."""
        present = _with_gradients(self.params, grads, self.buffers, self.steps)
        if present is None:
            return
        params, g, buffers, steps = present
        torch._foreach_add_(steps, 1)
        if self.weight_decay:
            torch._foreach_mul_(params, 1.0 - self.lr * self.weight_decay)
        torch._foreach_mul_(buffers, self.momentum)
        torch._foreach_add_(buffers, g)
        updates = torch._foreach_add(g, buffers, alpha=self.momentum)  # Nesterov: look one step ahead
        torch._foreach_add_(params, updates, alpha=-self.lr)

    def state(self) -> list[list[torch.Tensor]]:
        return [self.buffers]

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": [t.clone() for t in self.buffers], "steps": [t.clone() for t in self.steps]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load(state, {"momentum": self.buffers, "steps": self.steps})

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


Optimizer = Adam | SGD


def _with_gradients(params: list[torch.Tensor], grads: Sequence[torch.Tensor | None] | None,
                    *per_param: list[torch.Tensor]) -> list[list[torch.Tensor]] | None:
    """Return params, their gradients and each ``per_param`` list, only where there is a gradient
    (default: each tensor's ``.grad``); None when no tensor has one."""
    grads = [p.grad for p in params] if grads is None else list(grads)
    chosen = [i for i, g in enumerate(grads) if g is not None]
    if not chosen:
        return None
    return [[tensors[i] for i in chosen] for tensors in (params, grads, *per_param)]


def _load(state: dict[str, Any], targets: dict[str, list[torch.Tensor]]) -> None:
    for key, tensors in targets.items():
        values = state[key]
        if len(values) != len(tensors):
            raise ValueError(f"optimizer state has {len(values)} {key} tensors for {len(tensors)} params.")
        for target, value in zip(tensors, values):
            target.copy_(value)


def make_optimizer(params: Iterable[torch.Tensor], config: TrainConfig, *,
                   state: list[list[torch.Tensor]] | None = None) -> Optimizer:
    """Return the optimiser ``config`` names over ``params``, at its peak learning rate."""
    kind = Adam if config.optimizer == "adam" else SGD
    return kind(list(params), lr=config.learning_rate, weight_decay=config.weight_decay, state=state)


class PackedOptimizer:
    """The optimiser ``config`` names over a pack's parameters, each member's slices its own tensors.

    Each member's slice of each tensor is its own tensor to the optimiser (a view), so each member
    gets exactly the update a separate optimiser would give it, with its own step count and its own
    learning rate (members join a pack at different times, so their schedules differ). Members on
    the same learning rate update in one call. ``reset_member`` zeroes one member's state and step,
    for a fresh trial placed in that slot.
    """

    def __init__(self, params: Sequence[nn.Parameter], k: int, config: TrainConfig) -> None:
        self.params = list(params)
        self.k = k
        n_state = 2 if config.optimizer == "adam" else 1
        # State laid out as the parameters (member-major), handed to the optimiser as per-member views.
        self.state = [[torch.zeros_like(p) for p in self.params] for _ in range(n_state)]
        self._optimizer = make_optimizer(self._members([p.detach() for p in self.params]), config,
                                         state=[self._members(tensors) for tensors in self.state])
        self.lrs = [config.learning_rate] * k
        self._steps = [0] * k  # kept on the host too, so reading them never waits for the device

    def _members(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return each tensor's per-member views, member by member, tensor by tensor."""
        return [t.view(self.k, -1)[i] for i in range(self.k) for t in tensors]

    @property
    def steps(self) -> list[int]:
        """Each member's step count."""
        return list(self._steps)

    def set_step(self, member: int, step: int) -> None:
        n = len(self.params)
        for t in self._optimizer.steps[member * n : (member + 1) * n]:
            t.fill_(step)
        self._steps[member] = step

    def set_lr(self, member: int, lr: float) -> None:
        self.lrs[member] = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset_member(self, member: int) -> None:
        self.set_step(member, 0)
        for tensors in self.state:
            for t in tensors:
                t.view(self.k, -1)[member].zero_()

    def step(self) -> None:
        grads = [None if p.grad is None else p.grad.view(self.k, -1)[i] for i in range(self.k) for p in self.params]
        n = len(self.params)
        for lr in dict.fromkeys(self.lrs):
            self._optimizer.lr = lr
            self._optimizer.step([g if self.lrs[j // n] == lr else None for j, g in enumerate(grads)])
        self._steps = [s + 1 for s in self._steps]
