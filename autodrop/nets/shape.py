"""What a network must fit: the data's channels, classes and image size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What a model must fit: the data's channels, classes and image size."""

    channels: int  # 1 or 3
    n_classes: int
    image_size: int  # pixels per side
