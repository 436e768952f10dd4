"""Which checkpoint file belongs to a running trial, and when its retry may resume from it.

The path is derived here, never read from the study: the checkpoint folder (``--checkpoint-dir``),
a folder per study named by the study's name and its identity (a random id given when the study
was made, so two studies of one name in one folder never share files), and the number of the
first attempt of the trial (a retry inherits it from Optuna's ``failed_trial``). The file records
whose it is (study, trial, placement, seed, epochs); a retry uses it only if all of that matches.
Writing it is best effort: a trial whose checkpoint cannot be written goes on, and a retry would
start over.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch

from autodrop.config import DEFAULT_CHECKPOINT_DIR
from autodrop.errors import AutodropWarning
from autodrop.run.records import CHECKPOINT, FAILED_TRIAL, RESUMED_AT
from autodrop.run.storage import earlier_trials
from autodrop.training.checkpoint import load_checkpoint, save_checkpoint
from autodrop.training.loop import TrainingState


def study_folder(root: str | Path, study_name: str, uuid: str) -> Path:
    """Return the folder of one study's checkpoints under ``root``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-.")[:60] or "study"
    return Path(root).absolute() / f"{slug}-{uuid[:12]}"


def checkpoint_path(root: str | Path, study_name: str, uuid: str, first_attempt: int) -> Path:
    """Return where the trial whose first attempt was number ``first_attempt`` keeps its checkpoint."""
    return study_folder(root, study_name, uuid) / f"trial-{int(first_attempt)}.pt"


class TrialCheckpoint:
    """The checkpoint of one running trial: where it lives, whose it is, and where a retry resumes."""

    def __init__(self, path: Path, owner: dict[str, Any], resume: TrainingState | None) -> None:
        self.path = path
        self.owner = owner
        self.resume = resume  # None: train from the first epoch

    @classmethod
    def for_trial(cls, trial: optuna.Trial, *, root: str | Path, uuid: str, placement_key: str, seed: int,
                  epochs: int, device: torch.device) -> "TrialCheckpoint":
        """Return the checkpoint of ``trial``; a retry loads the one its first attempt's line left,
        if it is theirs."""
        first = retried_from(trial)
        retry = first is not None
        number = first if retry else trial.number
        path = checkpoint_path(root, trial.study.study_name, uuid, number)
        trial.set_user_attr(CHECKPOINT, str(path))  # for people to read; never followed
        owner = {"study": uuid, "trial": number, "placement": placement_key, "seed": seed, "epochs": epochs}
        if not retry:
            return cls(path, owner, None)
        resume = load_checkpoint(path, device, owner, epochs)
        trial.set_user_attr(RESUMED_AT, 1 if resume is None else resume.metrics.epoch + 1)
        return cls(path, owner, resume)

    def save(self, state: TrainingState) -> None:
        """Write ``state`` as this trial's checkpoint, replacing the previous epoch's; a failure
        (disk full, no permission) is a warning, not the trial's end."""
        try:
            save_checkpoint(self.path, state, self.owner)
        except Exception as e:
            warnings.warn(
                f"the checkpoint of trial {self.owner['trial']} could not be written to {str(self.path)!r} "
                f"({type(e).__name__}: {e}); the trial goes on, but a retry would start over.",
                AutodropWarning,
                stacklevel=2,
            )

    def remove(self) -> None:
        """Delete the checkpoint (the trial needs it no more), and its study's folder once empty."""
        remove_checkpoint(self.path)


def retried_from(trial: optuna.Trial) -> int | None:
    """Return the number of the first attempt of the trial ``trial`` retries, whose checkpoint it
    resumes; None when it is no retry, or its retry records do not hold together.

    Anyone can queue a trial whose records claim to retry another. Its records are taken only when
    they chain (``retry_history`` starts at ``failed_trial`` and ends at the attempt it replaces),
    that attempt failed, and no other trial claims to replace it: so no two trials ever share one
    checkpoint file, and a trial's checkpoint is resumed only by its own retry.
    """
    # Optuna's Trial does not show system attributes: read them from storage.
    attrs = trial.storage.get_trial(trial._trial_id).system_attrs
    first = attrs.get(FAILED_TRIAL)
    history = earlier_trials(attrs.get("retry_history"), trial.number)
    if not history or history[0] != first:
        return None
    replaced = history[-1]
    trials = trial.study.get_trials(deepcopy=False)
    if not any(t.number == replaced and t.state == optuna.trial.TrialState.FAIL for t in trials):
        return None
    claims = [t.number for t in trials if t.number != trial.number
              and earlier_trials(t.system_attrs.get("retry_history"), t.number)[-1:] == [replaced]]
    return None if claims else first


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint at ``path`` if it is there, and its study's folder once empty."""
    try:
        path.unlink(missing_ok=True)
    except OSError:  # already gone, or not ours to delete: nothing to clean up
        return
    folders = [path.parent]
    if path.parent.parent.name == DEFAULT_CHECKPOINT_DIR:  # a folder autodrop made; one given stays
        folders.append(path.parent.parent)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (other trials run), or already gone
            break
