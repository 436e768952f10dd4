"""A placement turned into a network, and into a trained one: the one rule "seed, build, place, train".

The search, ``confirm`` and ``export`` all make a trial's network this way, so the same seed and
placement give the same initial weights and the same training wherever it happens.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from autodrop.config import SearchConfig
from autodrop.nets.build import build_model
from autodrop.nets.sites import apply_placement
from autodrop.training.data import ImageData
from autodrop.training.loop import TrialMetrics, train_trial
from autodrop.training.normaliser import Normaliser


def build_placed_model(
    config: SearchConfig,
    data: ImageData,
    placement: Mapping[str, float | None],
    variants: Mapping[str, Mapping[str, str]] | None,
    *,
    seed: int,
) -> nn.Module:
    """Return ``config``'s network for ``data``, initialised from ``seed``, with its dropout placed."""
    torch.manual_seed(seed)
    model = build_model(config.model, data.shape, model_args=config.model_args, in_block=config.in_block)
    apply_placement(model, placement, variants)
    return model


def train_placement(
    config: SearchConfig,
    data: ImageData,
    normaliser: Normaliser,
    placement: Mapping[str, float | None],
    variants: Mapping[str, Mapping[str, str]] | None,
    *,
    seed: int,
    device: torch.device,
    **train_options: Any,
) -> tuple[TrialMetrics, nn.Module]:
    """Train the placed network on ``data`` (placed for ``device`` by ``data.place_data``) and return its figures and itself.

    Raises TrainingDiverged when the loss stops being finite.
    """
    model = build_placed_model(config, data, placement, variants, seed=seed)
    metrics = train_trial(model, data, normaliser, config.train, seed=seed, device=device, **train_options)
    return metrics, model
