"""The layers an exported file defines itself, as source: PyTorch has no residual block and no
drop-path layer, and an exported file needs nothing but PyTorch.

Each is written to compute what autodrop trained with (autodrop/nets/residual.py and
autodrop/nets/sites.py's BranchDrop); tests/outputs check the written ones against ours.
"""

from __future__ import annotations

DROP_PATH = '''
class DropPath(nn.Module):
    """Drops each image's whole residual branch with probability p in training (stochastic depth),
    scaling the kept ones by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
'''

RESIDUAL = '''
class Residual(nn.Module):
    """A residual block: drop(branch(pre(x))) + x, or + shortcut(pre(x)) where the block changes
    width or resolution (pre is the pre-activation: batch norm, then ReLU)."""

    def __init__(self, pre: nn.Module, branch: nn.Module, shortcut: nn.Module | None = None,
                 drop: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = pre
        self.branch = branch
        self.shortcut = shortcut
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.pre(x)
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        return self.drop(self.branch(activated)) + shortcut
'''
