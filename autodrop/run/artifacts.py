"""What a search keeps beside its numbers: trial notes, the best trials' weights, and where they live.

The dashboard shows the notes and serves the weights; ``autodrop export`` reads the weights back.
The weights are Optuna artifacts in a ``FileSystemArtifactStore``; its folder is recorded in the
study, because Optuna itself does not remember which store a study used.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from autodrop.config import sqlite_file
from autodrop.errors import AutodropWarning, ConfigError, StorageError
from autodrop.run.records import ARTIFACT_DIR_KEY, NORMALISER_KEY, WEIGHTS, rank_key

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

DEFAULT_ARTIFACT_DIR = "autodrop-artifacts"
# A trial's weights are kept when it finishes among this many best completed trials. A finished
# trial's record cannot be changed afterwards, so weights are never deleted: the store ends with
# the best few plus the earlier leaders, about KEEP_WEIGHTS * ln(trials) files.
KEEP_WEIGHTS = 3


def weights_filename(number: int) -> str:
    """Return the artifact file name of trial ``number``'s weights."""
    return f"trial-{number}-weights.pt"


def default_artifact_dir(storage_url: str) -> Path:
    """Return the default artifact folder: beside an SQLite file, else ./autodrop-artifacts."""
    database = sqlite_file(storage_url)
    if database is not None:
        path = database.expanduser().resolve()
        return path.parent / f"{path.stem}-artifacts"
    return Path.cwd() / DEFAULT_ARTIFACT_DIR


def artifact_dir(storage_url: str, override: str | os.PathLike[str] | None) -> Path:
    """Return the artifact folder to use: ``override`` (``--artifact-dir``), else the default for
    the storage. The folder a study records is never followed: it is shown when it differs."""
    if override is not None:
        return Path(override).expanduser().resolve()
    return default_artifact_dir(storage_url)


def open_artifact_store(path: Path) -> FileSystemArtifactStore | None:
    """Return the store in folder ``path``, or None when the folder does not exist (nothing kept)."""
    return FileSystemArtifactStore(path) if path.is_dir() else None


def prepare_records(
    study: optuna.Study,
    *,
    storage_url: str,
    override: str | None,
    normaliser: Any,
) -> FileSystemArtifactStore:
    """Create the artifact folder, record it and the input scaling in the study; return the store.

    ``normaliser`` is the search's :class:`autodrop.training.normaliser.Normaliser` (its ``scale`` and ``shift``).
    """
    path = artifact_dir(storage_url, override)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--artifact-dir {str(path)!r} cannot be created: {e.strerror or e}.") from e
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--artifact-dir {str(path)!r} is not writable.")
    if study.user_attrs.get(ARTIFACT_DIR_KEY) != str(path):
        study.set_user_attr(ARTIFACT_DIR_KEY, str(path))
    scaling = {
        "scale": [float(v) for v in normaliser.scale.detach().cpu().flatten().tolist()],
        "shift": [float(v) for v in normaliser.shift.detach().cpu().flatten().tolist()],
    }
    if study.user_attrs.get(NORMALISER_KEY) != scaling:
        study.set_user_attr(NORMALISER_KEY, scaling)
    return FileSystemArtifactStore(path)


def save_trial_note(trial: optuna.Trial, placement: Mapping[str, float | None], **details: Any) -> None:
    """Write the trial's markdown note (:func:`trial_note` of ``placement`` and ``details``), which
    the dashboard shows on the trial's page. Best effort: a note that cannot be written warns."""
    from optuna_dashboard import save_note

    try:
        save_note(trial, trial_note(placement, **details))
    except Exception as e:
        # The dashboard keeps a note's version among the study's attributes, which anyone can edit
        # (and a database can fail to write): the trial's results matter, its note does not.
        warnings.warn(f"the dashboard note of trial {trial.number} could not be written ({type(e).__name__}: "
                      f"{str(e)[:200]}); the trial goes on.", AutodropWarning, stacklevel=2)


def trial_note(
    placement: Mapping[str, float | None],
    *,
    baseline: str | None = None,
    val_accuracy: float | None = None,
    train_accuracy: float | None = None,
    pruned_at: int | None = None,
    failure: str | None = None,
    variants: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """Return a trial's note in markdown: placement in words, accuracies and gap, baseline name."""
    variants = variants or {}
    on = [
        f"`{site}` at {rate:.2f}" + "".join(f" {v}" for v in variants.get(site, {}).values() if v not in ("element", "after-act"))
        for site, rate in placement.items()
        if rate is not None
    ]
    off = [f"`{site}`" for site, rate in placement.items() if rate is None]
    lines = [f"**Dropout:** {', '.join(on) if on else 'none'}"]
    if off and on:
        lines.append(f"**Off:** {', '.join(off)}")
    if baseline:
        lines.append(f"**Baseline recipe:** {baseline}")
    if failure is not None:
        lines.append(f"**Failed:** {failure}")
    elif pruned_at is not None:
        shown = "" if val_accuracy is None else f" with validation accuracy {100 * val_accuracy:.1f}%"
        lines.append(f"**Pruned** after epoch {pruned_at}{shown}.")
    elif val_accuracy is not None:
        figures = f"validation {100 * val_accuracy:.1f}%"
        if train_accuracy is not None:
            gap = round(100 * (train_accuracy - val_accuracy), 1) + 0.0
            figures += f", train {100 * train_accuracy:.1f}%, gap {gap:+.1f} points"
        lines.append(f"**Accuracy:** {figures}")
    # Two trailing spaces end a markdown line without starting a paragraph.
    return "  \n".join(lines) + "\n"


def keep_weights_if_top(
    study: optuna.Study,
    trial: optuna.Trial,
    model: "nn.Module",
    val_accuracy: float,
    *,
    store: FileSystemArtifactStore,
    keep: int = KEEP_WEIGHTS,
) -> str | None:
    """Store the model's weights as an artifact of ``trial`` if it ranks among the ``keep`` best,
    and record the artifact's id and the file's digest with the trial (export trusts nothing else).

    Ranked as the report ranks (records.rank_key). Returns the artifact id, or None when the
    weights were not kept. Best effort: a failure to write them (a full disk, say) is a warning,
    never the end of a finished trial.
    """
    if not math.isfinite(val_accuracy):
        return None
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    mine = rank_key(trial.number, val_accuracy)
    ahead = sum(1 for t in completed if t.value is not None and rank_key(t.number, t.value) < mine)
    if ahead >= keep:
        return None
    import torch

    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    try:
        with tempfile.TemporaryDirectory(prefix="autodrop-weights-") as folder:
            path = Path(folder) / weights_filename(trial.number)
            torch.save(state, path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            artifact_id = upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=trial,
                mimetype="application/octet-stream",
            )
    except OSError as e:
        warnings.warn(f"the weights of trial {trial.number} could not be kept ({e.strerror or e}); the trial's "
                      "results are, and export would retrain it.", AutodropWarning, stacklevel=2)
        return None
    trial.set_user_attr(WEIGHTS, {"artifact": artifact_id, "sha256": digest})
    return artifact_id


def load_weights(store: FileSystemArtifactStore | None, kept: tuple[str, str]) -> "dict[str, torch.Tensor] | None":
    """Return the state dict kept as ``kept`` (artifact id, sha256), or None when its file is not in
    the store; raise StorageError when the file there is not the one the search kept."""
    if store is None:
        return None
    import torch

    artifact_id, digest = kept
    try:
        with store.open_reader(artifact_id) as reader:
            payload = reader.read()
    except (ArtifactNotFound, ValueError, OSError):
        return None
    if hashlib.sha256(payload).hexdigest() != digest:
        raise StorageError(f"the weights file {artifact_id!r} is not the one the search kept (its digest differs); "
                           "refusing to use it.")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated or foreign file: say which one
        raise StorageError(f"stored weights {artifact_id!r} cannot be read: {e}") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise StorageError(f"stored weights {artifact_id!r} are not a state dict of tensors.")
    return state


def read_normaliser(study: optuna.Study, channels: int) -> tuple[list[float], list[float]] | None:
    """Return the stored (scale, shift) per channel, checked; None when the study has none."""
    stored = study.user_attrs.get(NORMALISER_KEY)
    if stored is None:
        return None
    try:
        scale, shift = stored["scale"], stored["shift"]
        ok = (
            len(scale) == channels == len(shift)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scale + shift)
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise StorageError(
            f"study {study.study_name!r} has an input scaling that autodrop does not write ({NORMALISER_KEY}="
            f"{stored!r}); refusing to use it."
        )
    return [float(v) for v in scale], [float(v) for v in shift]
