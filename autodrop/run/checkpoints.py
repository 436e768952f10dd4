"""Which checkpoint file belongs to a running trial, and when its retry may resume from it.

A trial keeps its checkpoint's path in its user attributes; when a dead or stopped worker's trial
is retried, Optuna copies those attributes (and the steps already reported) to the new trial,
which finds the file and trains on from the epoch after the one saved there.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import torch

from autodrop.config import DEFAULT_CHECKPOINT_DIR
from autodrop.run.records import CHECKPOINT, FAILED_TRIAL, RESUMED_AT
from autodrop.training.checkpoint import load_checkpoint, save_checkpoint
from autodrop.training.loop import TrainingState


def checkpoint_path(root: str | Path, study_name: str, trial_number: int) -> Path:
    """Return where trial ``trial_number`` of ``study_name`` keeps its checkpoint under ``root``."""
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-.") or "study"
    return Path(root).absolute() / folder / f"trial-{trial_number}.pt"


class TrialCheckpoint:
    """The checkpoint of one running trial: where it lives, and the state a retry resumes from."""

    def __init__(self, path: Path, resume: TrainingState | None) -> None:
        self.path = path
        self.resume = resume  # None: train from the first epoch

    @classmethod
    def for_trial(cls, trial: optuna.Trial, root: str | Path, device: torch.device) -> "TrialCheckpoint":
        """Return the checkpoint of ``trial``; a retried trial loads the one its predecessor left."""
        stored = trial.user_attrs.get(CHECKPOINT)
        path = Path(stored) if stored else checkpoint_path(root, trial.study.study_name, trial.number)
        if not stored:
            trial.set_user_attr(CHECKPOINT, str(path))
        # Optuna's Trial does not show system attributes: read them from storage.
        frozen = trial.storage.get_trial(trial._trial_id)
        if FAILED_TRIAL not in frozen.system_attrs:
            return cls(path, None)
        resume = load_checkpoint(path, device)
        trial.set_user_attr(RESUMED_AT, 1 if resume is None else resume.metrics.epoch + 1)
        return cls(path, resume)

    def save(self, state: TrainingState) -> None:
        """Write ``state`` as this trial's checkpoint, replacing the previous epoch's."""
        save_checkpoint(self.path, state)


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
