"""Augmentation of whole training batches on the device: uint8 in, uint8 out, no Python loop per image.

Each image of a batch gets its own random flip, shift and cut-out square, drawn from a generator
of the trial's own (on the CPU, so a seed gives the same draws on any device) and applied to the
batch at once by indexing. Validation images are never augmented.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Crop: pad by an eighth of the side (4 pixels at 32x32, the usual CIFAR recipe) and crop back.
CROP_PAD_SHARE = 1 / 8
# Cutout: a square of half the side (16 at 32x32, as DeVries and Taylor), centred anywhere.
CUTOUT_SHARE = 1 / 2
# Augmentation draws its own stream, apart from the batch order, so switching it on or off leaves
# the batches a seed gives unchanged.
_STREAM = 0x5EED_A06


class BatchAugment:
    """Augments uint8 batches (N, C, H, W) of ``image_size`` images with ``names`` (flip, crop, cutout)."""

    def __init__(self, names: tuple[str, ...], image_size: int, seed: int) -> None:
        self.names = tuple(names)
        self.pad = max(1, round(image_size * CROP_PAD_SHARE))
        self.cutout = max(1, round(image_size * CUTOUT_SHARE))
        self.generator = torch.Generator().manual_seed((seed ^ _STREAM) % 2**63)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Return an augmented copy of ``batch`` (the batch itself is never changed)."""
        out = batch
        n, device = batch.shape[0], batch.device
        for name in self.names:
            if name == "flip":
                mirrored = torch.rand(n, generator=self.generator) < 0.5
                out = torch.where(mirrored.to(device).view(n, 1, 1, 1), out.flip(-1), out)
            elif name == "crop":
                shifts = torch.randint(-self.pad, self.pad + 1, (n, 2), generator=self.generator).to(device)
                out = translate(out, shifts, self.pad)
            elif name == "cutout":
                centres = torch.randint(0, out.shape[-1], (n, 2), generator=self.generator).to(device)
                out = cut_out(out, centres, self.cutout)
        return out if out is not batch else batch.clone()

    def state(self) -> torch.Tensor:
        """The generator's state, for a checkpoint."""
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def translate(batch: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Return each image shifted by its (down, right) pixels in ``shifts`` (within +-``pad``),
    the uncovered border black: pad by ``pad``, then crop each image back at its offset."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    rows = torch.arange(h, device=batch.device).view(1, h) + (pad - shifts[:, 0:1])
    cols = torch.arange(w, device=batch.device).view(1, w) + (pad - shifts[:, 1:2])
    images = torch.arange(n, device=batch.device).view(n, 1, 1)
    # Advanced indexing around the channel slice puts the indexed dimensions first: (N, H, W, C).
    return padded[images, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def cut_out(batch: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Return each image with a ``size`` square around its (row, column) in ``centres`` set to 0."""
    n, _, h, w = batch.shape
    rows = torch.arange(h, device=batch.device).view(1, h)
    cols = torch.arange(w, device=batch.device).view(1, w)
    half = size // 2
    inside_rows = (rows >= centres[:, 0:1] - half) & (rows < centres[:, 0:1] - half + size)
    inside_cols = (cols >= centres[:, 1:2] - half) & (cols < centres[:, 1:2] - half + size)
    square = (inside_rows.view(n, 1, h, 1) & inside_cols.view(n, 1, 1, w))
    return batch.masked_fill(square, 0)
