"""The checkpoint file of a running trial: all it takes to go on after a finished epoch.

The file is written whole or not at all (written aside, then renamed), so a worker killed while
writing leaves the previous epoch's checkpoint intact. Which file belongs to which trial, and when
a retry may use it, is the search's business (autodrop/run/checkpoints.py).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from autodrop.errors import AutodropWarning
from autodrop.training.loop import EpochMetrics, TrainingState

# 2: records its owner (study, trial, placement, seed, epochs), which a resume must match.
# 3: records the optimiser step (the learning-rate schedule) and the augmentations' generator.
FORMAT_VERSION = 3


def save_checkpoint(path: Path, state: TrainingState, owner: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a reader sees the old file or the new one).

    ``owner`` (plain JSON-like values) says whose state it is: :func:`load_checkpoint` gives it back
    only to a caller with the same owner.
    """
    payload = {
        "format": FORMAT_VERSION,
        "owner": json.dumps(dict(owner), sort_keys=True),
        "metrics": asdict(state.metrics),
        "model": state.model,
        "optimizer": state.optimizer,
        "batch_rng": state.batch_rng,
        "dropout_rng": state.dropout_rng,
        "cuda_rng": state.cuda_rng,
        "step": state.step,
        "augment_rng": state.augment_rng,
    }
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    for attempt in (1, 2):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(payload, partial)
            os.replace(partial, path)
            return
        except (FileNotFoundError, RuntimeError):
            # Another worker removed the emptied folder between mkdir and save (torch.save reports
            # that as a RuntimeError from its file writer): make it again, once.
            partial.unlink(missing_ok=True)
            if attempt == 2:
                raise
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def load_checkpoint(path: Path, device: torch.device, owner: Mapping[str, Any], epochs: int) -> TrainingState | None:
    """Return the state saved at ``path`` if it belongs to ``owner`` and was saved after one of its
    ``epochs`` epochs (after the last: the trial only has to be told it finished); None (with a
    warning that says why) if it is missing, unreadable or another's."""
    if not path.exists():
        warnings.warn(
            f"checkpoint {str(path)!r} of a retried trial is not on this machine; the trial starts over from "
            "epoch 1. Put --checkpoint-dir on a filesystem every worker shares to resume across machines.",
            AutodropWarning,
            stacklevel=2,
        )
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT_VERSION}")
        if payload.get("owner") != json.dumps(dict(owner), sort_keys=True):
            raise ValueError("it belongs to another study, trial or setting")
        metrics = EpochMetrics(**payload["metrics"])
        if not 1 <= metrics.epoch <= epochs:
            raise ValueError(f"it was saved after epoch {metrics.epoch}, not one of the trial's {epochs}")
        return TrainingState(
            metrics=metrics,
            model=payload["model"],
            optimizer=payload["optimizer"],
            # Generator states are CPU byte tensors whatever the device.
            batch_rng=payload["batch_rng"].cpu(),
            dropout_rng=payload["dropout_rng"].cpu(),
            cuda_rng=None if payload["cuda_rng"] is None else payload["cuda_rng"].cpu(),
            step=int(payload["step"]),
            augment_rng=None if payload["augment_rng"] is None else payload["augment_rng"].cpu(),
        )
    except Exception as e:  # a truncated, foreign or stale file: starting over is always safe
        warnings.warn(
            f"checkpoint {str(path)!r} is not used ({e}); the retried trial starts over from epoch 1.",
            AutodropWarning,
            stacklevel=2,
        )
        return None
