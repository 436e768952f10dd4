"""Input scaling: uint8 pixels to zero-mean, unit-variance floats, per channel."""

from __future__ import annotations

import torch


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
