"""Dropout masks from 16-bit random numbers: element-wise dropout that is cheap on a CPU.

PyTorch's CPU dropout draws one 32-bit Mersenne-Twister number per element through
``bernoulli_``, a noticeable share of a training step (benchmarks/README.md). Drawing 64-bit words
with ``random_`` and reading each as four 16-bit numbers costs a fraction of that. A rate is then
kept to 1/65536 (0.1 becomes 0.100006) and the scale uses the rate actually applied, so the
expected activation is unchanged.

The same function takes one rate per channel, which is how a packed model (autodrop.nets.packed)
gives each of its members its own rate at a site.
"""

from __future__ import annotations

import torch

_LEVELS = 65536  # 16-bit random numbers


def keep_threshold(rate: float) -> int:
    """Return the signed 16-bit threshold at or above which an element is kept at ``rate``."""
    return int(round(rate * _LEVELS)) - _LEVELS // 2


def applied_rate(rate: float) -> float:
    """Return the rate a mask from ``keep_threshold(rate)`` actually drops (rate to 1/65536)."""
    return round(rate * _LEVELS) / _LEVELS


def random_int16(shape: torch.Size | tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    """Return uniform int16 numbers of ``shape``, laid out channels-last when asked (4-d only)."""
    n = 1
    for size in shape:
        n *= size
    # random_ with from=-2**63 and no upper bound fills all 64 bits of each word uniformly.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    flat = words.view(torch.int16)[:n]
    if channels_last and len(shape) == 4:
        n_, c, h, w = shape
        return flat.view(n_, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def dropout(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Return ``x`` with elements dropped at ``rate`` and the rest scaled to keep the mean."""
    if rate <= 0.0:
        return x
    applied = applied_rate(rate)
    if applied >= 1.0:
        return x * 0.0
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    noise = random_int16(x.shape, x.device, channels_last)
    # A 0/1 byte mask: multiplying by bytes is as fast as by floats (by bools it is slower), and
    # autograd keeps only the bytes for the backward multiply. The scale is applied in place.
    keep = (noise >= keep_threshold(rate)).view(torch.uint8)
    return (x * keep).mul_(1.0 / (1.0 - applied))


def dropout_per_channel(
    x: torch.Tensor, thresholds: torch.Tensor, scales: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    """Return ``x`` dropped with a rate per index of ``channel_dim``.

    ``thresholds`` (int16) and ``scales`` (x's dtype) hold one entry per index of that dimension,
    as made by :func:`channel_rates`; a threshold of -32768 keeps everything with scale 1.
    """
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    noise = random_int16(x.shape, x.device, channels_last)
    view = [1] * x.dim()
    view[channel_dim] = -1
    keep = (noise >= thresholds.view(view)).view(torch.uint8)
    # The scale stays float32: rounded to bf16, 1/(1-p) would be off by up to 0.4%.
    return (x * keep).mul_(scales.view(view))


def channel_rates(rates: list[float], repeat: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int16 thresholds, float32 scales) for rates given per group, each repeated ``repeat`` times."""
    thresholds = []
    scales = []
    for rate in rates:
        applied = applied_rate(rate) if rate > 0.0 else 0.0
        thresholds.append(keep_threshold(rate) if rate > 0.0 else -(_LEVELS // 2))
        scales.append(1.0 / (1.0 - applied) if applied < 1.0 else 0.0)
    t = torch.tensor(thresholds, dtype=torch.int16).repeat_interleave(repeat)
    s = torch.tensor(scales, dtype=torch.float32).repeat_interleave(repeat)
    return t.to(device), s.to(device)
