"""The residual block of the built-in wide ResNet, written so that packing and export can read it.

``Residual`` runs ``pre`` (the pre-activation, batch norm then ReLU), then the ``branch`` on its
output; the shortcut is the block's input itself, or ``shortcut`` applied to the pre-activated
input where the block changes width or resolution (as the wide-ResNet paper's code does). The
sum is branch plus shortcut, the branch first passing ``drop`` (residual-branch drop, a
:class:`~autodrop.nets.sites.BranchDrop`). Every part is an ``nn.Sequential`` of known layers, so
a packed network packs each part as it packs a flat model (autodrop/nets/packed.py).
"""

from __future__ import annotations

import torch
from torch import nn

from autodrop.nets.sites import BranchDrop


class Residual(nn.Module):
    """out = drop(branch(pre(x))) + (x if shortcut is None else shortcut(pre(x)))."""

    def __init__(self, pre: nn.Sequential, branch: nn.Sequential, shortcut: nn.Sequential | None,
                 drop: BranchDrop) -> None:
        super().__init__()
        self.pre = pre
        self.branch = branch
        self.shortcut = shortcut
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.pre(x)
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        return self.drop(self.branch(activated)) + shortcut
