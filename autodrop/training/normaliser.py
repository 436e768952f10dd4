"""Input scaling: uint8 pixels to zero-mean, unit-variance floats, per channel."""

from __future__ import annotations

import torch

_CHUNK_VALUES = 1 << 20  # pixel values per chunk of the statistics: 8 MiB as float64


class Normaliser:
    """Turns uint8 batches into float32 with per-channel zero mean and unit variance.

    The statistics come from the training images once; per batch it is one fused multiply-add.
    """

    def __init__(self, images: torch.Tensor) -> None:
        # Sums over chunks in float64: a float copy of the whole set would be 8x its size, a peak of
        # gigabytes on a large set. A chunk is bounded in pixels, not images, so large images do not
        # make it large; it is read straight from the (mapped) uint8 images.
        channels = images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        per_image = max(images[0].numel() if len(images) else 1, 1)
        step = max(1, _CHUNK_VALUES // per_image)
        for start in range(0, len(images), step):
            chunk = images[start : start + step].to("cpu", torch.float64)
            total += chunk.sum(dim=(0, 2, 3))
            squares += chunk.square_().sum(dim=(0, 2, 3))
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
