"""Per-epoch checkpoints of a running trial, so that a retry resumes instead of starting over.

A trial keeps its checkpoint's path in its user attributes; when a dead worker's trial is retried,
Optuna copies those attributes (and the steps already reported) to the new trial, which finds the
file, loads model, optimizer and random generators, and trains on from the next epoch.
The file is written whole or not at all (written aside, then renamed), so a worker killed while
writing leaves the previous epoch's checkpoint intact.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import optuna
import torch

from autodrop.config import DEFAULT_CHECKPOINT_DIR
from autodrop.errors import AutodropWarning
from autodrop.train import EpochMetrics, TrainingState

CHECKPOINT_ATTR = "checkpoint"  # user attribute: the checkpoint file's path
RESUMED_ATTR = "resumed_at_epoch"  # user attribute of a retried trial: the first epoch it trained itself
FAILED_TRIAL_ATTR = "failed_trial"  # system attribute Optuna's retry callback sets on a retry
FORMAT_VERSION = 1


def checkpoint_path(root: str | Path, study_name: str, trial_number: int) -> Path:
    """Return where trial ``trial_number`` of ``study_name`` keeps its checkpoint under ``root``."""
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-.") or "study"
    return Path(root).absolute() / folder / f"trial-{trial_number}.pt"


class TrialCheckpoint:
    """The checkpoint of one running trial: where it lives, and the state a retry resumes from."""

    def __init__(self, path: Path, resume: TrainingState | None, reported_steps: set[int]) -> None:
        self.path = path
        self.resume = resume  # None: train from the first epoch
        self.reported_steps = reported_steps  # steps this trial already has (inherited by a retry)

    @classmethod
    def for_trial(cls, trial: optuna.Trial, root: str | Path, device: torch.device) -> "TrialCheckpoint":
        """Return the checkpoint of ``trial``; a retried trial loads the one its predecessor left."""
        stored = trial.user_attrs.get(CHECKPOINT_ATTR)
        path = Path(stored) if stored else checkpoint_path(root, trial.study.study_name, trial.number)
        if not stored:
            trial.set_user_attr(CHECKPOINT_ATTR, str(path))
        # Optuna's Trial shows neither system attributes nor reported steps: read them from storage.
        frozen = trial.storage.get_trial(trial._trial_id)
        if FAILED_TRIAL_ATTR not in frozen.system_attrs:
            return cls(path, None, set())
        resume = load_checkpoint(path, device)
        trial.set_user_attr(RESUMED_ATTR, 1 if resume is None else resume.metrics.epoch + 1)
        return cls(path, resume, set(frozen.intermediate_values))

    def save(self, state: TrainingState) -> None:
        """Write ``state`` as this trial's checkpoint, replacing the previous epoch's."""
        save_checkpoint(self.path, state)

    def remove(self) -> None:
        """Delete the checkpoint; the trial needs it no more."""
        remove_checkpoint(self.path)


def save_checkpoint(path: Path, state: TrainingState) -> None:
    """Write ``state`` to ``path`` atomically (a reader sees the old file or the new one)."""
    payload = {
        "format": FORMAT_VERSION,
        "metrics": asdict(state.metrics),
        "model": state.model,
        "optimizer": state.optimizer,
        "batch_rng": state.batch_rng,
        "dropout_rng": state.dropout_rng,
        "cuda_rng": state.cuda_rng,
    }
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    for attempt in (1, 2):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(payload, partial)
            os.replace(partial, path)
            return
        except FileNotFoundError:
            # Another worker removed the emptied folder between mkdir and save: make it again.
            partial.unlink(missing_ok=True)
            if attempt == 2:
                raise
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def load_checkpoint(path: Path, device: torch.device) -> TrainingState | None:
    """Return the state saved at ``path``, or None (with a warning) if it is missing or unreadable."""
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
        return TrainingState(
            metrics=EpochMetrics(**payload["metrics"]),
            model=payload["model"],
            optimizer=payload["optimizer"],
            # Generator states are CPU byte tensors whatever the device.
            batch_rng=payload["batch_rng"].cpu(),
            dropout_rng=payload["dropout_rng"].cpu(),
            cuda_rng=None if payload["cuda_rng"] is None else payload["cuda_rng"].cpu(),
        )
    except Exception as e:  # a truncated or foreign file: starting over is always safe
        warnings.warn(
            f"checkpoint {str(path)!r} cannot be read ({e}); the retried trial starts over from epoch 1.",
            AutodropWarning,
            stacklevel=2,
        )
        return None


def remove_checkpoint(path: str | Path) -> None:
    """Delete the checkpoint at ``path`` if it is there, and its study's folder once empty."""
    path = Path(path)
    path.unlink(missing_ok=True)
    folders = [path.parent]
    if path.parent.parent.name == DEFAULT_CHECKPOINT_DIR:  # a folder autodrop made; one given stays
        folders.append(path.parent.parent)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (other trials run), or already gone
            break
