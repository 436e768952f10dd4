"""Adam over plain tensors, for one trial and for a pack of trials, with checkpointable state."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn


class Adam:
    """Adam as torch.optim.Adam computes it, over a list of tensors, each with its own step count.

    It calls the fused kernel that ``torch.optim.Adam(fused=True)`` uses (one pass over all the
    tensors) where the device has it, and the same arithmetic tensor by tensor elsewhere. It does
    not go through ``torch.optim`` because the first use of any torch.optim optimizer imports
    ``torch._dynamo``, which takes seconds, once per process. The tensors may be views (a packed
    model's per-member slices, see :class:`PackedAdam`).
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

    def zero_grad(self) -> None:
        """Drop every tensor's gradient (as torch.optim does by default)."""
        for p in self.params:
            p.grad = None


def make_optimizer(params: Iterable[torch.Tensor], lr: float) -> Adam:
    """Return Adam at ``lr`` over ``params`` (one fused kernel on CPU and CUDA)."""
    return Adam(list(params), lr=lr)


class PackedAdam:
    """Adam over packed parameters with a step count per member, as torch.optim.Adam computes it.

    Each member's slice of each tensor is its own tensor to the Adam kernel (a view), so each
    member gets exactly the update a separate Adam would give it, in one fused call for all.
    ``reset_member`` zeroes one member's moments and step, for a fresh trial placed in that slot.
    """

    def __init__(self, params: Sequence[nn.Parameter], k: int, *, lr: float) -> None:
        self.params = list(params)
        self.k = k
        # Moments laid out as the parameters (member-major), handed to Adam as per-member views.
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self._adam = Adam(
            self._members([p.detach() for p in self.params]),
            lr=lr,
            moments=(self._members(self.exp_avg), self._members(self.exp_avg_sq)),
        )

    def _members(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return each tensor's per-member views, tensor by tensor, member by member."""
        return [t.view(self.k, -1)[i] for t in tensors for i in range(self.k)]

    @property
    def steps(self) -> list[int]:
        """Each member's step count."""
        return [int(self._adam.steps[i]) for i in range(self.k)]

    def set_step(self, member: int, step: int) -> None:
        for j in range(len(self.params)):
            self._adam.steps[j * self.k + member].fill_(step)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset_member(self, member: int) -> None:
        self.set_step(member, 0)
        for state in (*self.exp_avg, *self.exp_avg_sq):
            state.view(self.k, -1)[member].zero_()

    def step(self) -> None:
        grads = [None if p.grad is None else p.grad.view(self.k, -1)[i] for p in self.params for i in range(self.k)]
        self._adam.step(grads)
